"""Exact prompt counting with tiktoken, for routes with ``spec.tokens.promptCounting: tiktoken``.

Only models tiktoken maps to an encoding (OpenAI's: gpt-4o, gpt-4.1, o-series, gpt-3.5, embeddings)
are counted; any other model, and every model until its encoding is loaded, keeps the estimate of
``tokens``. Encodings load in a background thread (never on the event loop): from
``TIKTOKEN_CACHE_DIR`` (the sidecar image bakes them in) or, where the pod may reach it, tiktoken's
download. A failed load is logged and retried at most every ``RETRY_SECONDS``.

Chat prompts follow OpenAI's published accounting: 3 tokens per message, 1 more per ``name``, 3 to
prime the reply. Text parts count exactly; token ids count one each; images, audio and tool
definitions are not counted (nor are they by the estimate).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

from llmroute_sidecar.openai.requests import TEXT_KEYS, ParsedRequest

log = logging.getLogger("llmroute.tokenizer")

PER_MESSAGE_TOKENS = 3
PER_NAME_TOKENS = 1
PRIMING_TOKENS = 3
RETRY_SECONDS = 300.0
#: Prompts longer than this (characters) are counted in a worker thread, off the event loop.
THREAD_CHARS = 16_384
#: Loaded when a route turns counting on, before the first request needs them.
PRELOAD = ("o200k_base", "cl100k_base")
_UNKNOWN = "\0unknown"


class Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


class PromptTokenizer:
    """Encodings by name, loaded off the event loop; counts prompts once an encoding is there."""

    def __init__(
        self,
        load: Callable[[str], Encoding] | None = None,
        model_encoding: Callable[[str], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load or _tiktoken_encoding
        self._model_encoding = model_encoding or _tiktoken_model_encoding
        self._clock = clock
        self._encodings: dict[str, Encoding] = {}
        self._attempted: dict[str, float] = {}
        self._by_model: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def preload(self, names: tuple[str, ...] = PRELOAD) -> None:
        """Start loading ``names`` in the background (returns at once)."""
        for name in names:
            self._ensure(name)

    def loaded(self, name: str) -> bool:
        return name in self._encodings

    def count(self, parsed: ParsedRequest) -> ParsedRequest:
        """``parsed`` with its exact ``prompt_tokens``, or unchanged when its model cannot be counted yet."""
        encoding = self._for_model(parsed.model)
        if encoding is None:
            return parsed
        return replace(parsed, prompt_tokens=prompt_tokens(encoding, parsed))

    def _for_model(self, model: str) -> Encoding | None:
        # Also called from worker threads (long prompts): read and write the memo without a gap.
        name = self._by_model.get(model, _UNKNOWN)
        if name is _UNKNOWN:
            name = self._model_encoding(model)
            if len(self._by_model) >= 1024:  # models come from clients: bound the memo
                self._by_model.clear()
            self._by_model[model] = name
        if name is None:
            return None
        encoding = self._encodings.get(name)
        if encoding is None:
            self._ensure(name)
        return encoding

    def _ensure(self, name: str) -> None:
        with self._lock:
            if name in self._encodings:
                return
            last = self._attempted.get(name)
            if last is not None and self._clock() - last < RETRY_SECONDS:
                return
            self._attempted[name] = self._clock()
        threading.Thread(target=self._load_one, args=(name,), name=f"tiktoken-{name}", daemon=True).start()

    def _load_one(self, name: str) -> None:
        try:
            encoding = self._load(name)
        except Exception as error:  # any loader failure leaves the estimate in place
            fields = {"encoding": name, "error": str(error)[:300], "retry_seconds": RETRY_SECONDS}
            log.warning(
                "tokenizer encoding unavailable; prompts of its models keep the estimate",
                extra={"fields": fields},
            )
            return
        self._encodings[name] = encoding
        log.info("tokenizer encoding loaded", extra={"fields": {"encoding": name}})


def prompt_tokens(encoding: Encoding, parsed: ParsedRequest) -> int:
    """Exact prompt tokens of a request under ``encoding``."""
    body = parsed.body
    if parsed.kind == "chat":
        total = PRIMING_TOKENS
        for message in body.get("messages") or ():
            total += PER_MESSAGE_TOKENS
            if not isinstance(message, dict):
                continue
            for key in ("role", "content", "name"):
                value = message.get(key)
                if value is not None:
                    total += _tokens(encoding, value)
            if message.get("name"):
                total += PER_NAME_TOKENS
        return total
    if parsed.kind == "responses":
        return _tokens(encoding, body.get("instructions")) + _tokens(encoding, body.get("input"))
    if parsed.kind in ("completions", "embeddings"):
        key = "prompt" if parsed.kind == "completions" else "input"
        return _tokens(encoding, body.get(key))
    return 0


def _tokens(encoding: Encoding, value: Any) -> int:
    """Tokens of the text in ``value`` (the estimate's text keys), token ids one each."""
    return sum(len(encoding.encode_ordinary(text)) if isinstance(text, str) else 1 for text in _texts(value))


def _texts(value: Any) -> Iterator[str | int]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool)):
            yield item
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(item[key] for key in reversed(TEXT_KEYS) if key in item)


def _tiktoken_encoding(name: str) -> Encoding:
    import tiktoken  # the 'tokenizer' extra; imported only when a route counts with it

    encoding: Encoding = tiktoken.get_encoding(name)
    return encoding


def _tiktoken_model_encoding(model: str) -> str | None:
    try:
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    try:
        return encoding_name_for_model(model)
    except KeyError:
        return None


#: The process's tokenizer: encodings are large and the same for every route.
TOKENIZER = PromptTokenizer()


async def count_prompt(parsed: ParsedRequest, tokenizer: PromptTokenizer = TOKENIZER) -> ParsedRequest:
    """``tokenizer.count``, in a worker thread for long prompts (tiktoken releases the GIL)."""
    if parsed.prompt_chars > THREAD_CHARS:
        return await asyncio.to_thread(tokenizer.count, parsed)
    return tokenizer.count(parsed)
