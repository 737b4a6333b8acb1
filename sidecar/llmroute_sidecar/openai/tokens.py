"""Token cost estimates at admission, before the upstream says what a request really used.

Heuristic: about four characters per token for English text (OpenAI's rule of thumb), plus a small
per-message overhead. It is an estimate: typical prose lands within ±25 % of a BPE tokenizer; code,
CJK text and numbers can be off by 2x. Settlement replaces it with the upstream's actual usage, so
the estimate only decides admission, never the final charge.
"""

from __future__ import annotations

import math

from llmroute_sidecar.openai.requests import ParsedRequest

DEFAULT_COMPLETION_BUDGET = 256
CHARS_PER_TOKEN = 4
PER_MESSAGE_TOKENS = 4
PRIMING_TOKENS = 3


def estimate_text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_prompt_tokens(parsed: ParsedRequest) -> int:
    """Prompt tokens: ceil(chars / 4) + 4 per chat message + 3 (chat), plus literal token ids."""
    tokens = math.ceil(parsed.prompt_chars / CHARS_PER_TOKEN) + parsed.prompt_token_ids
    if parsed.kind == "chat":
        tokens += PER_MESSAGE_TOKENS * parsed.messages + PRIMING_TOKENS
    return tokens


def estimate_cost(parsed: ParsedRequest) -> int:
    """Tokens reserved at admission: the prompt estimate plus the most the response may use."""
    if parsed.kind == "embeddings":
        return max(1, estimate_prompt_tokens(parsed))
    completion = parsed.max_output_tokens or DEFAULT_COMPLETION_BUDGET
    return estimate_prompt_tokens(parsed) + completion * parsed.n
