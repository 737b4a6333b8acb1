"""Server-sent events for byte-exact pass-through: split a stream into events, read usage on the side."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from llmroute_sidecar.openai.tokens import tokens_for_chars

#: Cheap pre-check before decoding: only chunks with an empty choices list can be usage-only.
_EMPTY_CHOICES = re.compile(r'"choices"\s*:\s*\[\s*\]')

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
    done: bool = False
    _chars: int = field(default=0, init=False, repr=False)

    def consume(self, event: SSEEvent) -> None:
        """Read one event; non-JSON and unknown events are ignored."""
        data = event.data
        if data is None:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            document = json.loads(data)
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        response = document.get("response")
        found = usage_from_json(document)
        if found is None and isinstance(response, dict):
            found = usage_from_json(response)
        if found is not None:
            self.prompt_tokens, self.completion_tokens, self.total_tokens = found
            self.saw_usage = True
        self._chars += _streamed_chars(document)

    def completion_tokens_estimate(self) -> int:
        """Estimated completion tokens of the text streamed so far."""
        return tokens_for_chars(self._chars)

    def actual_tokens(self, prompt_estimate: int) -> int:
        """The usage total when the upstream reported it, else prompt estimate + streamed estimate."""
        if self.saw_usage:
            return self.total_tokens
        return prompt_estimate + self.completion_tokens_estimate()


def _streamed_chars(document: dict[str, Any]) -> int:
    """Characters of completion text (content, text, tool-call arguments, responses deltas) in a chunk."""
    texts: list[Any] = [document.get("delta")]
    choices = document.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        texts.append(choice.get("text"))
        delta = choice.get("delta")
        if isinstance(delta, dict):
            texts.append(delta.get("content"))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                texts.append(function.get("arguments") if isinstance(function, dict) else None)
    return sum(len(text) for text in texts if isinstance(text, str))


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


def is_injected_usage_event(event: SSEEvent) -> bool:
    """The usage-only chunk sent for ``include_usage``: ``usage`` an object and ``choices`` empty."""
    if event.data is None or '"usage"' not in event.data or not _EMPTY_CHOICES.search(event.data):
        return False
    try:
        document = json.loads(event.data)
    except ValueError:
        return False
    return (
        isinstance(document, dict)
        and document.get("choices") == []
        and isinstance(document.get("usage"), dict)
    )


def sse_error_event(message: str, type_: str, code: str, request_id: str) -> bytes:
    """An OpenAI-style error as one SSE event, for failures after the stream has started."""
    body = {"error": {"message": message, "type": type_, "code": code}, "request_id": request_id}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def heartbeat() -> bytes:
    """An SSE comment that keeps idle connections (and intermediaries) from timing out."""
    return b": keep-alive\n\n"
