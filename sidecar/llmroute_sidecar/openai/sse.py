"""Server-sent events for byte-exact pass-through: split a stream into events, read usage on the side."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from llmroute_sidecar.openai.tokens import estimate_text_tokens

SSE_DONE = b"data: [DONE]\n\n"
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n")


@dataclass(frozen=True)
class SSEEvent:
    """One event: its exact bytes (terminating blank line included) and its parsed data."""

    raw: bytes
    data: str | None
    is_comment: bool

    @classmethod
    def parse(cls, raw: bytes) -> SSEEvent:
        data_lines: list[str] = []
        fields = 0
        for line in re.split(rb"\r\n|\n|\r", raw):
            if not line:
                continue
            if line.startswith(b":"):
                continue
            fields += 1
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data_lines.append(value.decode("utf-8", "replace"))
        data = "\n".join(data_lines) if data_lines else None
        return cls(raw, data, is_comment=fields == 0)


class SSEParser:
    """Incremental splitter: feed chunks split anywhere, get complete events back."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events = []
        start = 0
        while True:
            match = _BOUNDARY.search(self._buffer, start)
            if match is None:
                break
            end = match.end()
            # A lone '\r' at the buffer's end may be half of '\r\n': wait for more bytes.
            if self._buffer[match.start() : end] == b"\r\r" and end == len(self._buffer):
                break
            if end == len(self._buffer) and self._buffer.endswith(b"\r"):
                break
            events.append(SSEEvent.parse(self._buffer[start:end]))
            start = end
        self._buffer = self._buffer[start:]
        return events

    def pending(self) -> bytes:
        """Bytes of an event not yet complete."""
        return self._buffer


@dataclass
class StreamUsage:
    """Usage of a streamed response: from the upstream's usage chunk, or estimated from the text."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    saw_usage: bool = False
    done: bool = False
    _text: list[str] = field(default_factory=list)

    def consume(self, event: SSEEvent) -> None:
        if event.data is None:
            return
        if event.data.strip() == "[DONE]":
            self.done = True
            return
        try:
            document = json.loads(event.data)
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        found = usage_from_json(document)
        if found is None and isinstance(document.get("response"), dict):
            found = usage_from_json(document["response"])
        if found is not None:
            self.prompt_tokens, self.completion_tokens, self.total_tokens = found
            self.saw_usage = True
        self._collect_text(document)

    def _collect_text(self, document: dict[str, Any]) -> None:
        for choice in document.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                self._text.append(delta["content"])
            if isinstance(choice.get("text"), str):
                self._text.append(choice["text"])
        if isinstance(document.get("delta"), str):
            self._text.append(document["delta"])

    def completion_tokens_estimate(self) -> int:
        return estimate_text_tokens("".join(self._text))

    def actual_tokens(self, prompt_estimate: int) -> int:
        """The usage total when the upstream reported it, else prompt estimate + streamed estimate."""
        if self.saw_usage:
            return self.total_tokens
        return prompt_estimate + self.completion_tokens_estimate()


def usage_from_json(document: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, total) from a response's ``usage`` object, if it has one."""
    usage = document.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = usage.get("total_tokens")
    return prompt, completion, total if isinstance(total, int) else prompt + completion


def is_injected_usage_event(event: SSEEvent) -> bool:
    """The usage-only chunk an upstream sends for ``include_usage``: usage set, ``choices`` empty."""
    if event.data is None or '"usage"' not in event.data:
        return False
    try:
        document = json.loads(event.data)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("choices") == [] and bool(document.get("usage"))


def sse_error_event(message: str, type_: str, code: str, request_id: str) -> bytes:
    body = {"error": {"message": message, "type": type_, "code": code}, "request_id": request_id}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def heartbeat() -> bytes:
    return b": keep-alive\n\n"
