"""Server-sent events for byte-exact pass-through: split a stream into events, read usage on the side."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmroute_sidecar.openai.tokens import tokens_for_chars

SSE_DONE = b"data: [DONE]\n\n"
_EOL = re.compile(rb"[\r\n]")
_LINES = re.compile(rb"\r\n|\r|\n")
_CR, _LF = 13, 10


@dataclass(frozen=True)
class SSEEvent:
    """One event: its exact bytes (terminating blank line included) and what it says.

    ``data`` joins the ``data:`` lines with newlines (None without any); ``is_comment`` means only
    ``:`` comment lines, such as heartbeats.
    """

    raw: bytes
    data: str | None
    is_comment: bool

    @classmethod
    def parse(cls, raw: bytes) -> SSEEvent:
        """Read one complete event's bytes per the SSE spec (one space after the colon is dropped)."""
        one_line = raw.find(b"\n") == len(raw) - 2 and raw[-1] == _LF and b"\r" not in raw
        if one_line and raw.startswith(b"data:"):
            # The usual event, one ``data:`` line ended by LF LF: what the loop below finds, without it.
            return cls(raw, raw[5:-2].removeprefix(b" ").decode("utf-8", "replace"), is_comment=False)
        data: list[str] = []
        fields = comments = 0
        for line in _LINES.split(raw):
            if not line:
                continue
            if line.startswith(b":"):
                comments += 1
                continue
            fields += 1
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value.removeprefix(b" ").decode("utf-8", "replace"))
        return cls(raw, "\n".join(data) if data else None, is_comment=comments > 0 and fields == 0)

    @functools.cached_property
    def document(self) -> dict[str, Any] | None:
        """The data as a JSON object (None when it is not one), parsed once however many readers ask.

        Shared: readers that change it work on a copy.
        """
        data = self.data
        if data is None or not data.lstrip().startswith("{"):
            return None
        document = loads(data)
        return document if isinstance(document, dict) else None


def loads(text: str | bytes) -> Any:
    """JSON as the standard library reads it (None when it is not JSON), through orjson when it can.

    orjson is several times faster on an SSE chunk; what it refuses but ``json`` accepts (NaN,
    Infinity) falls back to ``json``. One difference remains: an integer past 64 bits reads as a
    float (a usage count that large is then ignored, as any non-integer count is).
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return None


class SSEParser:
    """Incremental splitter: feed chunks split anywhere, get complete events back.

    An event ends at a blank line; lines end with CRLF, LF or CR. The raw bytes of all events
    returned plus ``pending()`` are always exactly the bytes fed.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._line_start = 0  # where the current line starts in the buffer
        self._scan = 0  # where to resume looking for line ends (long lines are scanned once)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete."""
        buffer = self._buffer
        buffer += chunk
        if b"\r" not in buffer:
            return self._feed_lf(buffer)
        events: list[SSEEvent] = []
        event_start, line_start, scan = 0, self._line_start, self._scan
        while True:
            match = _EOL.search(buffer, scan)
            if match is None:
                scan = len(buffer)
                break
            at = match.start()
            if buffer[at] == _CR and at + 1 == len(buffer):
                scan = at  # maybe the first half of CRLF: wait for the next byte
                break
            end = at + 2 if buffer[at] == _CR and buffer[at + 1] == _LF else at + 1
            if at == line_start:  # a blank line: the event is complete
                events.append(SSEEvent.parse(bytes(buffer[event_start:end])))
                event_start = end
            line_start = scan = end
        del buffer[:event_start]
        self._line_start, self._scan = line_start - event_start, scan - event_start
        return events

    def _feed_lf(self, buffer: bytearray) -> list[SSEEvent]:
        """``feed`` for a buffer whose lines all end with LF (the usual case): an event ends at a LF
        that starts a line, i.e. at the buffer's (an event's) start or right after another LF."""
        events: list[SSEEvent] = []
        start, size = 0, len(buffer)
        while start < size:
            if buffer[start] == _LF:
                end = start + 1
            else:
                found = buffer.find(b"\n\n", start)
                if found < 0:
                    break
                end = found + 2
            events.append(SSEEvent.parse(bytes(buffer[start:end])))
            start = end
        del buffer[:start]
        self._line_start = buffer.rfind(b"\n") + 1
        self._scan = len(buffer)
        return events

    def pending(self) -> bytes:
        """Bytes of an event not yet complete."""
        return bytes(self._buffer)


@dataclass
class StreamUsage:
    """Usage of a streamed response: from the upstream's usage data, or estimated from streamed text.

    Understands chat/completions chunks (``usage`` on a final ``choices: []`` chunk, text in
    ``choices[].delta.content`` / ``choices[].text``) and ``/v1/responses`` events (``delta`` strings,
    ``response.usage`` on ``response.completed``). The last usage seen wins.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    saw_usage: bool = False
    cached_tokens: int = 0
    """Cached prompt tokens of the usage seen (``prompt_tokens_details.cached_tokens``)."""
    done: bool = False
    on_document: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    """Also given every JSON chunk parsed here (telemetry reads the model and finish reasons)."""
    _chars: int = field(default=0, init=False, repr=False)

    def consume(self, event: SSEEvent) -> None:
        """Read one event; non-JSON and unknown events are ignored."""
        data = event.data
        if data is None:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        document = event.document
        if document is None:
            return
        if self.on_document is not None:
            self.on_document(document)
        self._read_usage(document)
        self._chars += _streamed_chars(document)

    def _read_usage(self, document: dict[str, Any]) -> None:
        response = document.get("response")
        found = usage_from_json(document)
        carrier = document
        if found is None and isinstance(response, dict):
            found, carrier = usage_from_json(response), response
        if found is not None:
            self.prompt_tokens, self.completion_tokens, self.total_tokens = found
            self.cached_tokens = cached_tokens_from_json(carrier)
            self.saw_usage = True

    @property
    def streamed_chars(self) -> int:
        """Characters of completion text streamed so far: grows with every content event."""
        return self._chars

    def completion_tokens_estimate(self) -> int:
        """Estimated completion tokens of the text streamed so far."""
        return tokens_for_chars(self._chars)

    def actual_tokens(self, prompt_estimate: int) -> int:
        """The usage total when the upstream reported it, else prompt estimate + streamed estimate."""
        if self.saw_usage:
            return self.total_tokens
        return prompt_estimate + self.completion_tokens_estimate()


class SSEStream:
    """The relay's work on one SSE stream, a chunk at a time: split, read usage, strip, find the end.

    ``feed(chunk)`` returns what to forward and whether the chunk completed the terminal event; it is
    exactly ``SSEParser.feed`` + ``StreamUsage.consume`` of each event + ``is_terminal_event`` + (with
    ``strip``) ``without_injected_usage``, which the chunks and events it cannot take the fast way
    still go through. The fast way: a chunk of whole LF-only events (what servers write, one or a few
    events per read) is split with one ``bytes.split``, and a one-line ``data: {...}`` event is parsed
    once by orjson straight from its bytes, with no ``SSEEvent`` and no decoded copy of its data.
    """

    __slots__ = ("_parser", "strip", "usage")

    def __init__(self, usage: StreamUsage, strip: bool) -> None:
        self.usage = usage
        self.strip = strip
        self._parser = SSEParser()

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """(bytes to forward now, whether a terminal event was among the chunk's events)."""
        if (
            self._parser._buffer
            or not chunk.endswith(b"\n\n")
            or chunk[0] == _LF
            or b"\r" in chunk
            or b"\n\n\n" in chunk
        ):
            events = self._parser.feed(chunk)
            terminal = self._consume(events)
            return self._forward(chunk, events), terminal
        lines = chunk[:-2].split(b"\n\n")  # whole events, their blank line cut off
        single = len(lines) == 1
        usage, strip = self.usage, self.strip
        observe = usage.on_document
        terminal = changed = False
        out: list[bytes] = []
        for line in lines:
            document = None
            if line.startswith(b"data: {") and b"\n" not in line:
                try:
                    document = orjson.loads(line[6:])
                except orjson.JSONDecodeError:  # invalid UTF-8, NaN: the event's own way below
                    document = None
            raw = chunk if single else line + b"\n\n"
            if type(document) is not dict:
                if line == b"data: [DONE]":
                    usage.done = terminal = True
                    out.append(raw)
                    continue
                events = [SSEEvent.parse(raw)]
                terminal = self._consume(events) or terminal
                if strip:
                    forward = self._forward(raw, events)
                    changed = changed or forward != raw
                    out.append(forward)
                continue
            if observe is not None:
                observe(document)
            found = document.get("usage")
            if isinstance(found, dict) or isinstance(document.get("response"), dict):
                usage._read_usage(document)
            usage._chars += _streamed_chars(document)
            kind = document.get("type")
            if kind is not None and kind in _TERMINAL_TYPES and b"response." in line:
                terminal = True
            if not strip:
                continue
            if b'"usage"' in line and (found is not None or "usage" in document):
                changed = True
                if found is None:
                    if line.endswith(_NULL_TAIL) and line.count(_NULL_USAGE) == 1:
                        out.append(line[: -len(_NULL_TAIL)] + b"}\n\n")  # OpenAI's: the last member
                        continue
                    cut = _cut_null_member(raw)  # ``raw`` is one ``data:`` line and its blank line
                    if cut is not None:
                        out.append(cut)
                        continue
                event = SSEEvent.parse(raw)
                event.__dict__["document"] = document  # parsed already (``document`` is cached)
                kept = without_injected_usage(event)
                if kept is not None:
                    out.append(kept)
                continue
            out.append(raw)
        if not changed:
            return chunk, terminal
        return (out[0] if len(out) == 1 else b"".join(out)), terminal

    def _consume(self, events: list[SSEEvent]) -> bool:
        """Read the events' usage; True when one of them is terminal."""
        usage = self.usage
        for event in events:
            usage.consume(event)
        return any(is_terminal_event(event) for event in events)

    def _forward(self, chunk: bytes, events: list[SSEEvent]) -> bytes:
        if not self.strip:
            return chunk  # byte-exact, a partial event included
        return b"".join(filter(None, map(without_injected_usage, events)))

    def pending(self) -> bytes:
        """Bytes of an event not yet complete."""
        return self._parser.pending()


def _streamed_chars(document: dict[str, Any]) -> int:
    """Characters of completion text (content, text, tool-call arguments, responses deltas) in a chunk."""
    choices = document.get("choices")
    if type(choices) is list and len(choices) == 1 and "delta" not in document:
        choice = choices[0]  # the usual chat chunk: one choice, its delta's content at most
        if type(choice) is dict and "text" not in choice:
            delta = choice.get("delta")
            if type(delta) is dict and "tool_calls" not in delta:
                text = delta.get("content")
                return len(text) if type(text) is str else 0
    return _any_streamed_chars(document)


def _any_streamed_chars(document: dict[str, Any]) -> int:
    """``_streamed_chars`` for any chunk shape."""
    text = document.get("delta")
    count = len(text) if isinstance(text, str) else 0
    choices = document.get("choices")
    if not isinstance(choices, list):
        return count
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        if isinstance(text, str):
            count += len(text)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        text = delta.get("content")
        if isinstance(text, str):
            count += len(text)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                text = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(text, str):
                    count += len(text)
    return count


def _count(usage: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return max(0, value)
    return None


def usage_from_json(document: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, total) from a response's ``usage`` object, if it has a usable one.

    Chat/completions name them prompt/completion/total_tokens, embeddings only prompt/total,
    ``/v1/responses`` input/output/total_tokens. The total charged is ``max(total, prompt +
    completion)``: a missing or understated total (LiteLLM reports ``total_tokens: 0`` for
    embeddings) never makes a request cheaper than its parts.
    """
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    completion = _count(usage, "completion_tokens", "output_tokens")
    total = _count(usage, "total_tokens")
    if prompt is None and completion is None and total is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    return prompt, completion, max(total or 0, prompt + completion)


def cached_tokens_from_json(document: dict[str, Any]) -> int:
    """Cached prompt tokens of a response's usage (``prompt_tokens_details.cached_tokens``, or
    ``input_tokens_details`` for /v1/responses); 0 when not reported."""
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return 0
    for name in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(name)
        if isinstance(details, dict):
            found = _count(details, "cached_tokens")
            if found is not None:
                return found
    return 0


#: Top-level chunk fields that describe a chunk rather than carry content.
_CHUNK_METADATA = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "service_tier", "obfuscation", "choices"}
)
_NULL_USAGE = b'"usage":null'
_NULL_TAIL = b',"usage":null}'
_ONE_LINE = re.compile(rb"data:[^\r\n]*\n\n")
_DATA_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")


def without_injected_usage(event: SSEEvent) -> bytes | None:
    """What to forward of ``event`` to a client that did not ask for usage when the sidecar asked for it.

    Events without a ``usage`` key pass byte-exact. Otherwise the key is removed: an event then
    carrying no content (usage was an object and every choice is empty, e.g. ``choices: []`` or
    LiteLLM's ``[{"index": 0, "delta": {}}]``) is dropped (None). Any other loses only the key: a
    compact ``"usage":null`` member is cut out of the original bytes, anything else is re-serialised
    (compact JSON, the event's other lines kept), so nothing the upstream sent is lost and no
    ``"usage": null`` reaches the client.
    """
    data = event.data
    if data is None or '"usage"' not in data:
        return event.raw
    parsed = event.document
    if parsed is None or "usage" not in parsed:
        return event.raw
    document = dict(parsed)  # shared with the usage reader: change a copy
    usage = document.pop("usage")
    if usage is None:
        cut = _cut_null_usage(event.raw)
        if cut is not None:
            return cut
    elif isinstance(usage, dict) and not _carries_content(document):
        return None
    return _with_data(event.raw, _compact(document))


def _cut_null_usage(raw: bytes) -> bytes | None:
    """A one-line event with its only ``"usage":null`` member cut out, every other byte kept.

    An unescaped ``"usage":null`` can only be a member (quotes inside strings are escaped); when it is
    the only one, it is the top-level member the caller found. None when the event is not that simple.
    """
    if not _ONE_LINE.fullmatch(raw):
        return None
    return _cut_null_member(raw)


def _cut_null_member(raw: bytes) -> bytes | None:
    """``_cut_null_usage`` of an event known to be one line."""
    if raw.count(_NULL_USAGE) != 1:
        return None
    for member in (b"," + _NULL_USAGE, _NULL_USAGE + b","):
        if member in raw:
            return raw.replace(member, b"", 1)
    return None


#: ``/v1/responses`` events after which nothing follows.
_TERMINAL_TYPES = ("response.completed", "response.incomplete", "response.failed")


def is_terminal_event(event: SSEEvent) -> bool:
    """``data: [DONE]`` (chat/completions) or a terminal ``/v1/responses`` event (``response.completed``)."""
    data = event.data
    if data is None:
        return False
    if data.strip() == "[DONE]":
        return True
    if "response." not in data or not any(name in data for name in _TERMINAL_TYPES):
        return False
    document = event.document
    return document is not None and document.get("type") in _TERMINAL_TYPES


def is_injected_usage_event(event: SSEEvent) -> bool:
    """A usage chunk with nothing else in it: dropped when the sidecar injected ``include_usage``."""
    return without_injected_usage(event) is None


def _empty(value: Any) -> bool:
    """Null, an empty string/list/object, or an object of such values (``{"content": null}``)."""
    if isinstance(value, dict):
        return all(_empty(item) for item in value.values())
    return value is None or value == "" or value == []


def _carries_content(document: dict[str, Any]) -> bool:
    if any(not _empty(v) for k, v in document.items() if k not in _CHUNK_METADATA):
        return True
    choices = document.get("choices")
    if not isinstance(choices, list):
        return not _empty(choices)
    return any(
        not isinstance(choice, dict) or any(not _empty(v) for k, v in choice.items() if k != "index")
        for choice in choices
    )


def _compact(document: dict[str, Any]) -> bytes:
    try:
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate only survives as an escape
        return json.dumps(document, separators=(",", ":")).encode()


def _with_data(raw: bytes, data: bytes) -> bytes:
    """``raw`` with its ``data:`` lines replaced by one carrying ``data``; other lines kept as they are."""
    if _ONE_LINE.fullmatch(raw):
        return b"data: " + data + b"\n\n"  # the usual one-line event
    out = bytearray()
    written = False
    for match in _DATA_LINE.finditer(raw):
        line, eol = match.group(1), match.group(2)
        if line == b"data" or line.startswith(b"data:"):
            if not written:
                out += b"data: " + data + eol
                written = True
            continue
        out += line + eol
    return bytes(out)


def sse_error_event(message: str, type_: str, code: str, request_id: str) -> bytes:
    """An OpenAI-style error as one SSE event, for failures after the stream has started."""
    body = {"error": {"message": message, "type": type_, "code": code}, "request_id": request_id}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def heartbeat() -> bytes:
    """An SSE comment that keeps idle connections (and intermediaries) from timing out."""
    return b": keep-alive\n\n"
