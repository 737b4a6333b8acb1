"""``SSEStream``, the relay's per-chunk SSE work, against the event-by-event reference it shortcuts."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmroute_sidecar.openai.sse import (
    SSEParser,
    SSEStream,
    StreamUsage,
    _any_streamed_chars,
    _streamed_chars,
    is_terminal_event,
    without_injected_usage,
)

HEAD = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 5,
    "total_tokens": 16,
    "prompt_tokens_details": {"cached_tokens": 3},
}
Outcome = tuple[bytes, list[bool], StreamUsage, list[dict[str, Any]]]


def data(obj: Any, sep: tuple[str, str] = (",", ":"), ascii_only: bool = False) -> bytes:
    return b"data: " + json.dumps(obj, separators=sep, ensure_ascii=ascii_only).encode() + b"\n\n"


def chunk(text: str | None, usage: Any = None, **more: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": None}
    return {**HEAD, "choices": [choice], "usage": usage, **more}


EVENTS = [
    data(chunk("hello ")),
    data(chunk("héllo ✓ ")),
    data(chunk("héllo ✓ "), ascii_only=True),
    data(chunk('say "usage" ')),
    data(chunk("x"), sep=(", ", ": ")),  # "usage": null with a space: re-serialised
    data({k: v for k, v in chunk("no usage key").items() if k != "usage"}),
    data({**HEAD, "choices": [], "usage": USAGE}),  # the injected usage chunk: dropped
    data({**HEAD, "choices": [{"index": 0, "delta": {}}], "usage": USAGE}),  # LiteLLM's
    data(chunk("last words", usage=USAGE)),  # usage on a content chunk: the key goes, the text stays
    data({**HEAD, "choices": [{"index": 0, "text": "completions text"}]}),
    data({**HEAD, "choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]}),
    data({"type": "response.output_text.delta", "delta": "resp text"}),
    data({"type": "response.completed", "response": {"usage": {"input_tokens": 4, "output_tokens": 2}}}),
    b"data: [DONE]\n\n",
    b": keep-alive\n\n",
    b"event: message\ndata: " + json.dumps(chunk("two lines")).encode() + b"\n\n",
    b"data: " + json.dumps(chunk("bad \xff")).encode()[:-2] + b'\xff"}\n\n',  # invalid UTF-8
    b"data: {not json}\n\n",
    b"data: [1, 2]\n\n",
    b'data: {"usage": NaN}\n\n',
    b"data:" + json.dumps(chunk("no space")).encode() + b"\n\n",
    b"\n",  # a stray blank line
    b"data: " + json.dumps(chunk("crlf")).encode() + b"\r\n\r\n",
]


def reference(chunks: list[bytes], strip: bool) -> Outcome:
    """What the relay did before ``SSEStream``: split, consume, terminal, strip, event by event."""
    seen: list[dict[str, Any]] = []
    parser, usage, out, ends = SSEParser(), StreamUsage(on_document=seen.append), b"", []
    for piece in chunks:
        events = parser.feed(piece)
        for event in events:
            usage.consume(event)
        ends.append(any(is_terminal_event(e) for e in events))
        out += b"".join(filter(None, map(without_injected_usage, events))) if strip else piece
    return out + (parser.pending() if strip else b""), ends, usage, seen


def streamed(chunks: list[bytes], strip: bool) -> Outcome:
    seen: list[dict[str, Any]] = []
    usage = StreamUsage(on_document=seen.append)
    stream, out, ends = SSEStream(usage, strip), b"", []
    for piece in chunks:
        forward, terminal = stream.feed(piece)
        out += forward
        ends.append(terminal)
    return out + (stream.pending() if strip else b""), ends, usage, seen


def counts(usage: StreamUsage) -> tuple[Any, ...]:
    return (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.saw_usage,
        usage.cached_tokens,
        usage.done,
        usage.streamed_chars,
    )


def same(chunks: list[bytes], strip: bool) -> None:
    got, want = streamed(chunks, strip), reference(chunks, strip)
    assert got[0] == want[0]
    assert got[1] == want[1]
    assert counts(got[2]) == counts(want[2])
    assert got[3] == want[3]


@pytest.mark.parametrize("strip", [True, False])
@pytest.mark.parametrize("event", EVENTS)
def test_each_event_alone_as_the_reference(event: bytes, strip: bool) -> None:
    same([event], strip)
    same([data(chunk("before")), event, b"data: [DONE]\n\n"], strip)


@pytest.mark.parametrize("strip", [True, False])
def test_many_events_in_one_read(strip: bool) -> None:
    same([b"".join(EVENTS[:14])], strip)
    same([b"".join(EVENTS)], strip)


@settings(max_examples=200, deadline=None)
@given(
    picks=st.lists(st.sampled_from(EVENTS), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
    strip=st.booleans(),
)
def test_any_stream_split_anywhere(picks: list[bytes], cuts: list[int], strip: bool) -> None:
    body = b"".join(picks)
    edges = sorted({0, len(body), *(cut % (len(body) + 1) for cut in cuts)})
    same([body[a:b] for a, b in itertools.pairwise(edges) if b > a], strip)
    same(list(picks), strip)  # one event per read: the usual case


@pytest.mark.parametrize(
    "document",
    [
        {"choices": [{"index": 0, "delta": {"content": "héllo\n"}}]},
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"content": None}, "finish_reason": "stop"}]},
        {
            "choices": [
                {"index": 0, "delta": {"content": "a", "tool_calls": [{"function": {"arguments": "{}"}}]}}
            ]
        },
        {"choices": [{"index": 0, "text": "legacy"}]},
        {"choices": [{"delta": {"content": "one"}}, {"delta": {"content": "two"}}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
        {"choices": ["odd"]},
        {"choices": [{"delta": "odd"}]},
        {"type": "response.output_text.delta", "delta": "abc"},
        {"delta": "x", "choices": [{"delta": {"content": "yz"}}]},
    ],
)
def test_streamed_chars_fast_path_counts_as_the_full_walk(document: dict[str, Any]) -> None:
    assert _streamed_chars(document) == _any_streamed_chars(document)
