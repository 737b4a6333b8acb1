"""What one request tells OpenTelemetry: GenAI semantic-convention attributes, gathered on the way.

Pure Python, no OpenTelemetry import: a ``RequestTelemetry`` exists only while telemetry is on
(``Exchange.telemetry``); the request path hands it what it already parsed (the request, each JSON
document of the response) and the shielded finish turns it into span and metric attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from llmroute_sidecar.tracing import TraceContext

if TYPE_CHECKING:
    from llmroute_sidecar.exchange import Exchange
    from llmroute_sidecar.openai.requests import ParsedRequest

#: ``gen_ai.operation.name`` per OpenAI endpoint kind (``kind_for_path``); /v1/responses is a chat.
OPERATIONS = {
    "chat": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
#: The API shape the sidecar speaks; ``gen_ai.provider.name`` names the telemetry flavour.
PROVIDER = "openai"

AttributeValue = str | bool | int | float | tuple[str, ...]


class Recorder(Protocol):
    """Records a finished request (``telemetry.Telemetry``)."""

    def record(self, ex: Exchange, duration: float) -> None: ...


@dataclass(slots=True)
class RequestTelemetry:
    """One request's facts for its span and the GenAI metrics; filled in along the request path."""

    recorder: Recorder
    trace: TraceContext
    tracestate: str | None
    upstream: str
    operation: str | None = None
    request_model: str | None = None
    max_tokens: int | None = None
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: dict[int, str] = field(default_factory=dict)

    def request(self, parsed: ParsedRequest) -> None:
        """The validated OpenAI request: operation, model, maximum output tokens."""
        self.operation = OPERATIONS.get(parsed.kind, parsed.kind)
        self.request_model = parsed.model or None
        self.max_tokens = parsed.max_output_tokens

    def observe(self, document: Mapping[str, Any]) -> None:
        """A JSON body or SSE chunk the relay parsed anyway: response model, id, finish reasons."""
        response = document.get("response")
        if isinstance(response, Mapping):  # /v1/responses events carry the response object
            self._response(response)
            return
        if document.get("object") == "response":  # a /v1/responses JSON body
            self._response(document)
            return
        self._identity(document)
        choices = document.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, Mapping):
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    index = choice.get("index")
                    at = index if isinstance(index, int) else len(self.finish_reasons)
                    self.finish_reasons[at] = reason

    def _identity(self, document: Mapping[str, Any]) -> None:
        model, ident = document.get("model"), document.get("id")
        if isinstance(model, str) and model:
            self.response_model = model
        if isinstance(ident, str) and ident:
            self.response_id = ident

    def _response(self, response: Mapping[str, Any]) -> None:
        self._identity(response)
        status = response.get("status")
        if status == "completed":
            self.finish_reasons[0] = "stop"
        elif status in ("incomplete", "failed"):
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, Mapping) else None
            self.finish_reasons[0] = reason if isinstance(reason, str) and reason else str(status)


def quota_decision(ex: Exchange) -> str:
    """``limited`` (a limit rejected it), ``admitted`` (a lease was granted) or ``none`` (no decision)."""
    if ex.limit is not None:
        return "limited"
    return "admitted" if ex.lease is not None else "none"


def error_type(ex: Exchange) -> str | None:
    """A low-cardinality ``error.type``: the outcome of a failed request, else None."""
    if ex.outcome != "ok":
        return ex.outcome
    return str(ex.status) if ex.status >= 400 else None


def _server(upstream: str) -> tuple[str, int]:
    parts = urlsplit(upstream)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def metric_attributes(ex: Exchange, rt: RequestTelemetry) -> dict[str, AttributeValue]:
    """Attributes of the GenAI metrics (low cardinality: no ids)."""
    address, port = _server(rt.upstream)
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": rt.operation or "",
        "gen_ai.provider.name": PROVIDER,
        "server.address": address,
        "server.port": port,
        "llmroute.route": ex.route,
    }
    if rt.request_model:
        attributes["gen_ai.request.model"] = rt.request_model
    if rt.response_model:
        attributes["gen_ai.response.model"] = rt.response_model
    error = error_type(ex)
    if error is not None:
        attributes["error.type"] = error
    return attributes


def span_attributes(ex: Exchange, rt: RequestTelemetry) -> dict[str, AttributeValue]:
    """The request span's attributes: GenAI conventions (OpenAI endpoints), HTTP, llmroute's own."""
    address, port = _server(rt.upstream)
    attributes: dict[str, AttributeValue] = {
        "http.request.method": ex.method,
        "url.path": ex.path,
        "http.response.status_code": ex.status or 499,
        "server.address": address,
        "server.port": port,
        "llmroute.route": ex.route,
        "llmroute.request_id": ex.request_id,
        "llmroute.outcome": ex.outcome,
        "llmroute.upstream": rt.upstream,
        "llmroute.attempts": ex.attempts,
        "llmroute.stream": ex.stream,
        "llmroute.quota.decision": quota_decision(ex),
        "llmroute.queue.wait_seconds": ex.queue_wait,
        "llmroute.tokens.reserved": ex.tokens_reserved,
    }
    optional: dict[str, AttributeValue | None] = {
        "llmroute.quota.limit": ex.limit,
        "llmroute.client": ex.client,
        "llmroute.upstream.seconds": ex.upstream_seconds,
        "error.type": error_type(ex),
    }
    if rt.operation is not None:
        optional |= {
            "gen_ai.operation.name": rt.operation,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": rt.request_model,
            "gen_ai.request.max_tokens": rt.max_tokens,
            "gen_ai.response.model": rt.response_model,
            "gen_ai.response.id": rt.response_id,
        }
        if rt.finish_reasons:
            optional["gen_ai.response.finish_reasons"] = tuple(
                rt.finish_reasons[i] for i in sorted(rt.finish_reasons)
            )
        if ex.tokens_actual is not None:
            optional["gen_ai.usage.input_tokens"] = ex.prompt_tokens
            optional["gen_ai.usage.output_tokens"] = max(0, ex.completion_tokens)
    attributes.update({key: value for key, value in optional.items() if value is not None})
    return attributes


def span_name(ex: Exchange, rt: RequestTelemetry) -> str:
    """``{operation} {model}`` for GenAI requests (the convention), else the HTTP method."""
    if rt.operation is None:
        return ex.method
    return f"{rt.operation} {rt.request_model}" if rt.request_model else rt.operation
