"""SSE splitting for byte-exact relay, stream usage accounting and usage extraction."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from llmroute_sidecar.openai.sse import (
    SSE_DONE,
    SSEEvent,
    SSEParser,
    StreamUsage,
    heartbeat,
    is_injected_usage_event,
    loads,
    sse_error_event,
    usage_from_json,
)


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chat_chunk(content: str) -> bytes:
    return data({"id": "c", "choices": [{"index": 0, "delta": {"content": content}}], "usage": None})


USAGE_CHUNK = data(
    {"id": "c", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}
)


def feed_all(chunks: list[bytes]) -> tuple[list[SSEEvent], bytes]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events, parser.pending()


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# -- parser ---------------------------------------------------------------------------------------

LINE_END = st.sampled_from([b"\n", b"\r\n", b"\r"])
TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=12)
LINE = st.one_of(
    TEXT.map(lambda t: b"data: " + t.encode()),
    TEXT.map(lambda t: b"data:" + t.encode()),
    TEXT.map(lambda t: b":" + t.encode()),
    TEXT.map(lambda t: b"event: " + t.encode()),
    st.just(b"data"),
)


@st.composite
def sse_events(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """One event's bytes (with its blank line) and the expected data lines."""
    lines = draw(st.lists(LINE, min_size=1, max_size=4))
    ends = [draw(LINE_END) for _ in range(len(lines) + 1)]
    if ends[-2] == b"\r" and ends[-1] == b"\n":
        ends[-1] = b"\r\n"  # "\r" + "\n" would be a single CRLF, not a blank line
    raw = b"".join(line + end for line, end in zip(lines, ends, strict=False)) + ends[-1]
    values = [line[5:].removeprefix(b" ").decode() for line in lines if line.split(b":")[0] == b"data"]
    return raw, values


@given(
    st.lists(sse_events(), max_size=6),
    st.binary(max_size=20).filter(lambda b: b"\n\n" not in b and b"\r" not in b and b"\n" not in b),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_any_split_yields_the_same_events_and_exact_bytes(
    events: list[tuple[bytes, list[str]]], tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(raw for raw, _ in events) + tail
    got, pending = feed_all(split(stream, [c for c in cuts if c <= len(stream)]))
    whole, whole_pending = feed_all([stream])
    assert got == whole and pending == whole_pending
    assert b"".join(event.raw for event in got) + pending == stream
    # A final lone CR may be half of a CRLF: that event stays pending until more bytes come.
    held = 1 if events and not tail and stream.endswith(b"\r") else 0
    complete = events[: len(events) - held]
    assert [event.raw for event in got] == [raw for raw, _ in complete]
    assert [event.data for event in got] == [("\n".join(v) if v else None) for _, v in complete]
    assert pending == b"".join(raw for raw, _ in events[len(complete) :]) + tail


@given(
    st.lists(st.one_of(st.lists(LINE, min_size=1, max_size=3), st.just([])), max_size=6),
    st.lists(st.integers(min_value=0, max_value=300), max_size=12),
)
def test_lf_only_streams_split_anywhere(events: list[list[bytes]], cuts: list[int]) -> None:
    """The LF-only fast path: the same events (a lone LF is an empty event) whatever the chunks."""
    raws = [b"".join(line + b"\n" for line in lines) + b"\n" for lines in events]
    stream = b"".join(raws)
    got, pending = feed_all(split(stream, [c for c in cuts if c <= len(stream)]))
    assert [event.raw for event in got] == raws and pending == b""
    expected = [SSEEvent.parse(raw.replace(b"\n", b"\r\n")) for raw in raws]  # the general parser
    assert [(e.data, e.is_comment) for e in got] == [(e.data, e.is_comment) for e in expected]


def test_byte_by_byte_crlf_and_cr_boundaries() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\rdata: c\n\ndata: d\r\n\n: hb\r\n\r\n"
    events, pending = feed_all([stream[i : i + 1] for i in range(len(stream))])
    assert [e.data for e in events] == ["a", "b", "c", "d", None]
    assert [e.raw for e in events] == [
        b"data: a\r\n\r\n",
        b"data: b\r\r",
        b"data: c\n\n",
        b"data: d\r\n\n",
        b": hb\r\n\r\n",
    ]
    assert pending == b"" and events[-1].is_comment


def test_cr_at_chunk_end_waits_for_a_possible_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r\n\r") == []
    assert parser.pending() == b"data: x\r\n\r"
    (event,) = parser.feed(b"\ndata: y")
    assert event.raw == b"data: x\r\n\r\n" and parser.pending() == b"data: y"


def test_event_fields() -> None:
    parser = SSEParser()
    events = parser.feed(b"data:no-space\ndata:  two\n\n: ping\n\nevent: x\nid: 1\n\ndata\n\n")
    assert [(e.data, e.is_comment) for e in events] == [
        ("no-space\n two", False),
        (None, True),
        (None, False),
        ("", False),
    ]
    (beat,) = SSEParser().feed(heartbeat())
    assert beat.is_comment and beat.data is None


# -- usage ----------------------------------------------------------------------------------------


def consume(stream: bytes) -> StreamUsage:
    usage = StreamUsage()
    for event in SSEParser().feed(stream):
        usage.consume(event)
    return usage


def test_usage_chunk_is_used() -> None:
    usage = consume(chat_chunk("Hello") + chat_chunk(" world") + USAGE_CHUNK + SSE_DONE)
    assert usage.saw_usage and usage.done
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 5, 16)
    assert usage.actual_tokens(prompt_estimate=999) == 16


def test_without_usage_the_streamed_text_is_estimated() -> None:
    completion = data({"choices": [{"index": 0, "text": "abcde"}]})
    tool = data({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": '{"a":1}'}}]}}]})
    usage = consume(chat_chunk("Hello") + chat_chunk(" world") + completion + tool + b"data: junk\n\n")
    assert not usage.saw_usage and not usage.done
    assert usage.completion_tokens_estimate() == -(-len("Hello world" + "abcde" + '{"a":1}') // 4)
    assert usage.actual_tokens(prompt_estimate=10) == 10 + usage.completion_tokens_estimate()


def test_responses_api_stream() -> None:
    completed = {
        "type": "response.completed",
        "response": {"id": "r", "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}},
    }
    deltas = data({"type": "response.output_text.delta", "delta": "Hi there"})
    partial = consume(b"event: response.output_text.delta\n" + deltas)
    assert partial.completion_tokens_estimate() == 2 and not partial.saw_usage
    usage = consume(deltas + b"event: response.completed\n" + data(completed))
    assert usage.saw_usage and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        7,
        3,
        10,
    )


def test_usage_from_json() -> None:
    chat = {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    assert usage_from_json(chat) == (3, 4, 7)
    assert usage_from_json({"usage": {"prompt_tokens": 5, "total_tokens": 5}}) == (5, 0, 5)
    assert usage_from_json({"usage": {"input_tokens": 2, "output_tokens": 6}}) == (2, 6, 8)
    # LiteLLM's embeddings: total_tokens 0 beside the real prompt count is charged the prompt
    assert usage_from_json({"usage": {"prompt_tokens": 10, "total_tokens": 0}}) == (10, 0, 10)
    assert usage_from_json({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 5}}) == (
        3,
        4,
        7,
    )
    assert usage_from_json({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 9}}) == (
        3,
        4,
        9,
    )
    unusable: list[dict[str, Any]] = [{}, {"usage": None}, {"usage": {}}, {"usage": {"prompt_tokens": "3"}}]
    assert [usage_from_json(document) for document in unusable] == [None] * 4


def test_injected_usage_event_detection() -> None:
    (usage_only,) = SSEParser().feed(USAGE_CHUNK)
    assert is_injected_usage_event(usage_only)
    others = chat_chunk("x") + SSE_DONE + heartbeat() + data({"choices": [], "usage": None})
    assert not any(is_injected_usage_event(e) for e in SSEParser().feed(others + b"data: {usage\n\n"))


def test_error_event_and_constants() -> None:
    event = sse_error_event("upstream went away", "api_error", "upstream_error", "req-1")
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n") and b", " not in event
    (parsed,) = SSEParser().feed(event)
    assert parsed.data is not None and json.loads(parsed.data) == {
        "error": {"message": "upstream went away", "type": "api_error", "code": "upstream_error"},
        "request_id": "req-1",
    }
    assert SSE_DONE == b"data: [DONE]\n\n" and heartbeat() == b": keep-alive\n\n"


def test_json_reads_the_same_whichever_parser_reads_it() -> None:
    """orjson first; what only the standard library accepts (NaN) still parses."""
    assert loads('{"a": [1, 2.5, "é"], "b": null}') == {"a": [1, 2.5, "é"], "b": None}
    assert loads(b'{"n": 1}') == {"n": 1}
    assert loads('{"n": 18446744073709551615}') == {"n": 18446744073709551615}
    nan = loads('{"x": NaN}')
    assert isinstance(nan, dict) and nan["x"] != nan["x"]
    assert loads("{not json") is None
    event = SSEEvent.parse(b'data: {"usage": {"total_tokens": 3}}\n\n')
    assert event.document == {"usage": {"total_tokens": 3}}
