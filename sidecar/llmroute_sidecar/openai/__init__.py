"""OpenAI awareness: request validation, token estimates, SSE parsing and usage accounting."""

from llmroute_sidecar.openai.requests import (
    OPENAI_PATHS,
    ParsedRequest,
    RequestValidationError,
    kind_for_path,
    parse_request,
    with_stream_usage,
)
from llmroute_sidecar.openai.sse import (
    SSE_DONE,
    SSEEvent,
    SSEParser,
    StreamUsage,
    heartbeat,
    is_injected_usage_event,
    sse_error_event,
    usage_from_json,
)
from llmroute_sidecar.openai.tokens import (
    DEFAULT_COMPLETION_BUDGET,
    estimate_cost,
    estimate_prompt_tokens,
    estimate_text_tokens,
)

__all__ = [
    "DEFAULT_COMPLETION_BUDGET",
    "OPENAI_PATHS",
    "SSE_DONE",
    "ParsedRequest",
    "RequestValidationError",
    "SSEEvent",
    "SSEParser",
    "StreamUsage",
    "estimate_cost",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
    "heartbeat",
    "is_injected_usage_event",
    "kind_for_path",
    "parse_request",
    "sse_error_event",
    "usage_from_json",
    "with_stream_usage",
]
