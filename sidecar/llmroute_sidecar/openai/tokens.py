"""Token cost estimates at admission, before the upstream says what a request really used.

Heuristic, not a tokenizer: about four characters per token (OpenAI's rule of thumb for English), plus
a small per-message overhead for chat. Measured against o200k_base (``bench/estimate_error.py``,
docs/quotas.md): prose and code within about 20 %; digits, CJK text and base64 under-estimated by half
or more. Settlement replaces the estimate with the upstream's reported usage, so it only sizes the
admission reservation; ``promptCounting: tiktoken`` (``openai.tokenizer``) counts exactly instead.

A request without a maximum output reserves the route's ``spec.tokens.defaultReservation``;
``bound_completion`` optionally writes that maximum into the request so the reservation is a bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from llmroute_sidecar.api.spec import DEFAULT_RESERVATION, TokenAccounting
from llmroute_sidecar.openai.requests import ParsedRequest

#: Completion tokens reserved when neither the client nor the route says otherwise.
DEFAULT_COMPLETION_BUDGET = DEFAULT_RESERVATION
#: The maximum-output field ``bound_completion`` adds, per request kind.
MAX_OUTPUT_FIELDS = {
    "chat": "max_completion_tokens",
    "completions": "max_tokens",
    "responses": "max_output_tokens",
}
CHARS_PER_TOKEN = 4
PER_MESSAGE_TOKENS = 4
PRIMING_TOKENS = 3


def tokens_for_chars(chars: int) -> int:
    """ceil(chars / 4): the character heuristic shared by every estimate here."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens of a text, e.g. a streamed completion without upstream usage."""
    return tokens_for_chars(len(text))


def estimate_prompt_tokens(parsed: ParsedRequest) -> int:
    """Prompt tokens: the tokenizer's exact count when there is one (``promptCounting: tiktoken``),
    else ceil(chars / 4) + literal token ids, plus 4 per message + 3 for chat.

    The estimate is rough (see the module docstring): good for admission, not for billing.
    """
    if parsed.prompt_tokens is not None:
        return parsed.prompt_tokens
    tokens = tokens_for_chars(parsed.prompt_chars) + parsed.prompt_token_ids
    if parsed.kind == "chat":
        tokens += PER_MESSAGE_TOKENS * parsed.messages + PRIMING_TOKENS
    return tokens


def estimate_cost(parsed: ParsedRequest, default_completion: int = DEFAULT_COMPLETION_BUDGET) -> int:
    """Tokens reserved at admission: prompt estimate + (max output tokens or ``default_completion``) * n.

    Embeddings produce no completion, so they cost their prompt estimate (at least 1).
    """
    if parsed.kind == "embeddings":
        return max(1, estimate_prompt_tokens(parsed))
    completion = parsed.max_output_tokens or default_completion
    return estimate_prompt_tokens(parsed) + completion * parsed.n


def bound_completion(
    parsed: ParsedRequest, raw: bytes, tokens: TokenAccounting
) -> tuple[ParsedRequest, bytes]:
    """With ``injectMaxTokens``, the request with the default reservation as its maximum output.

    Only for generating requests that set no maximum; anything else comes back unchanged (same
    bytes). The rewritten body is ASCII JSON, like ``with_stream_usage`` writes it.
    """
    field = MAX_OUTPUT_FIELDS.get(parsed.kind)
    if not tokens.inject_max_tokens or field is None or parsed.max_output_tokens is not None:
        return parsed, raw
    body = {**parsed.body, field: tokens.default_reservation}
    bounded = replace(parsed, body=body, max_output_tokens=tokens.default_reservation)
    return bounded, json.dumps(body, separators=(",", ":")).encode("ascii")
