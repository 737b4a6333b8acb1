"""Stripping the usage the sidecar asked for on a client's behalf: exactly that, whatever its shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmroute_sidecar.openai.sse import SSEParser, is_injected_usage_event, without_injected_usage

USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
HEAD = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def data(obj: Any, sep: tuple[str, str] = (",", ":")) -> bytes:
    return b"data: " + json.dumps(obj, separators=sep).encode() + b"\n\n"


def one(raw: bytes) -> bytes | None:
    (event,) = SSEParser().feed(raw)
    return without_injected_usage(event)


@pytest.mark.parametrize(
    "chunk",
    [
        {**HEAD, "choices": [], "usage": USAGE},  # OpenAI
        {**HEAD, "choices": [{"index": 0, "delta": {}}], "usage": USAGE},  # LiteLLM
        {**HEAD, "choices": [{"index": 0, "delta": {"content": None}, "finish_reason": None}], "usage": {}},
        {**HEAD, "choices": [{"index": 0, "text": "", "logprobs": None}], "usage": USAGE},  # completions
        {**HEAD, "choices": [], "usage": USAGE, "provider_specific_fields": None, "obfuscation": "x1"},
    ],
)
def test_usage_only_chunks_are_dropped_whatever_their_shape(chunk: dict[str, Any]) -> None:
    raw = data(chunk)
    assert one(raw) is None
    (event,) = SSEParser().feed(raw)
    assert is_injected_usage_event(event)


def test_chunks_without_usage_pass_byte_exact() -> None:
    for raw in (
        data({**HEAD, "choices": [{"index": 0, "delta": {"content": "hi"}}]}, (", ", ": ")),
        b"data: [DONE]\n\n",
        b": keep-alive\n\n",
        b'event: x\r\ndata: {not json "usage"}\r\n\r\n',
        data({**HEAD, "choices": [{"index": 0, "delta": {"content": 'say "usage"'}}]}),
    ):
        assert one(raw) == raw


def test_usage_null_is_removed_and_the_rest_kept() -> None:
    chunk = {**HEAD, "choices": [{"index": 0, "delta": {"content": "hé"}}], "usage": None}
    out = one(data(chunk, (", ", ": ")))
    assert out is not None and b'"usage"' not in out and out.endswith(b"\n\n")
    assert json.loads(out.removeprefix(b"data: ")) == {k: v for k, v in chunk.items() if k != "usage"}
    assert "hé".encode() in out  # no needless escaping
    # a chunk whose usage was null is the upstream's own chunk: kept even when it carries nothing
    empty = one(data({**HEAD, "choices": [{"index": 0, "delta": {}}], "usage": None}))
    assert empty is not None and b"usage" not in empty


def test_compact_usage_null_is_cut_from_the_original_bytes() -> None:
    first = (
        b'data: {"usage":null,"id":"c","choices":[{"delta":{"content":"caf\\u00e9 \\"usage\\":null"}}]}\n\n'
    )
    assert (
        one(first) == b'data: {"id":"c","choices":[{"delta":{"content":"caf\\u00e9 \\"usage\\":null"}}]}\n\n'
    )
    last = b'data: {"id":"c" , "choices":[],"usage":null}\n\n'
    assert one(last) == b'data: {"id":"c" , "choices":[]}\n\n'
    # a nested "usage":null beside the top-level one: not cut by text, re-serialised instead
    nested = data({"id": "c", "choices": [{"index": 0, "delta": {"usage": None}}], "usage": None})
    assert one(nested) == data({"id": "c", "choices": [{"index": 0, "delta": {"usage": None}}]})


def test_usage_on_a_content_chunk_is_removed_not_the_content() -> None:
    finish = {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE}
    out = one(b"id: 7\r\n" + data(finish).replace(b"\n", b"\r\n"))
    assert out is not None and out.startswith(b"id: 7\r\ndata: {") and out.endswith(b"}\r\n\r\n")
    assert json.loads(out.split(b"\r\n")[1].removeprefix(b"data: ")) == {
        k: v for k, v in finish.items() if k != "usage"
    }
    role = {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant"}}], "usage": USAGE}
    assert one(data(role)) is not None


def test_multi_line_data_becomes_one_line() -> None:
    raw = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}],\ndata: "usage": null}\n\n'
    assert one(raw) == b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=8), JSON, max_size=5), st.one_of(st.none(), st.just(USAGE)))
def test_stripped_output_never_carries_usage_and_keeps_everything_else(
    chunk: dict[str, Any], usage: dict[str, int] | None
) -> None:
    out = one(data({**chunk, "usage": usage}))
    rest = {k: v for k, v in chunk.items() if k != "usage"}
    if out is None:
        assert usage is not None
        return
    (event,) = SSEParser().feed(out)
    assert event.data is not None and json.loads(event.data) == rest
