"""Validation of OpenAI-compatible request bodies (pydantic v2, strict types).

Only what the sidecar relies on is checked: sizes, roles, token bounds, NUL characters. Unknown fields
are allowed and the original bytes are forwarded untouched unless stream usage must be requested.
Types are strict (``"stream": "true"`` or ``"n": 2.0`` are refused) and duplicate keys are rejected,
so what the sidecar validated is exactly what the upstream will read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
_KINDS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
DEFAULT_MAX_CHARS = 4_000_000
TEXT_KEYS = ("text", "content", "input", "output", "arguments", "instructions")


def kind_for_path(path: str) -> str | None:
    """``chat``, ``completions``, ``embeddings`` or ``responses`` for OpenAI endpoints, else None."""
    return _KINDS.get(path.rstrip("/") if path != "/" else path)


class RequestValidationError(Exception):
    """A refused body: ``status`` 400 (bad JSON or schema, as OpenAI answers) or 413 (prompt too long).

    ``param`` names the offending field in OpenAI's notation (``messages[0].role``) when one is known.
    """

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def _one_of(expected: str) -> WrapValidator:
    """Report a failed union as one readable error instead of one per union member."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "union_type", "Input should be {expected}", {"expected": expected}
            ) from None

    return WrapValidator(validate)


MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = Annotated[
    str | list[str] | TokenIds | list[TokenIds],
    _one_of("a string, a list of strings, a list of token ids or a list of token-id lists"),
]
Content = Annotated[
    str | list[dict[str, Any]] | None, _one_of("a string, null or a list of content parts (objects)")
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Open):
    include_usage: bool | None = None


class Message(_Open):
    role: Role
    content: Content = None


class _Base(_Open):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)


class ChatRequest(_Base):
    messages: list[Message] = Field(min_length=1, max_length=2048)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None


class CompletionRequest(_Base):
    prompt: Prompt = ""
    max_tokens: MaxTokens | None = None


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    input: Prompt


class ResponsesRequest(_Base):
    input: Annotated[str | list[Any], _one_of("a string or a list")] = ""
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None


_MODELS: dict[str, type[_Open]] = {
    "chat": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
    "responses": ResponsesRequest,
}


@dataclass(frozen=True)
class ParsedRequest:
    """What the sidecar needs to know about a valid OpenAI request."""

    kind: str
    model: str
    stream: bool
    include_usage_requested: bool
    max_output_tokens: int | None
    prompt_chars: int
    n: int
    body: dict[str, Any]
    messages: int = 0
    prompt_token_ids: int = 0
    prompt_tokens: int | None = None
    """Exact prompt tokens when a tokenizer counted them (``openai.tokenizer``), else None."""


def _decode(raw: bytes) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            duplicate = next(k for k, count in Counter(k for k, _ in pairs).items() if count > 1)
            raise ValueError(f"duplicate key {duplicate!r}")
        return obj

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestValidationError(400, "invalid_encoding", "the request body is not valid UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=unique, parse_constant=constant)
    except RecursionError:
        raise RequestValidationError(400, "invalid_json", "the request body is nested too deeply") from None
    except ValueError as error:
        raise RequestValidationError(
            400, "invalid_json", f"the request body is not valid JSON: {error}"
        ) from None


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) in a JSON document, depth first, without recursion."""
    stack = [(path, value)]
    while stack:
        here, item = stack.pop()
        yield here, item
        if isinstance(item, dict):
            stack.extend((f"{here}.{k}" if here else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{here}[{i}]", v) for i, v in reversed(list(enumerate(item))))


def _find_nul(document: dict[str, Any], raw: bytes) -> str | None:
    if b"\\u0000" not in raw:  # a decoded NUL can only come from this escape
        return None
    for path, value in _walk(document):
        if isinstance(value, str) and "\x00" in value:
            return path
        for key in value if isinstance(value, dict) else ():
            if "\x00" in key:
                return (f"{path}." if path else "") + str(key).replace("\x00", "\\u0000")
    return None


def _text_size(value: Any) -> tuple[int, int]:
    """(characters of text, count of token ids) in a prompt, message content or input value."""
    chars = ids = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            ids += 1
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item[key] for key in TEXT_KEYS if key in item)
    return chars, ids


def _location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _describe(errors: list[ErrorDetails]) -> str:
    first = errors[0]
    text = "Input should be an object" if first["type"] == "model_type" else first["msg"]
    message = f"{_location(first['loc'])}: {text}"
    return message + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else "")


def _param(errors: list[ErrorDetails]) -> str | None:
    """The first failing field (None when the whole body is at fault)."""
    location = _location(errors[0]["loc"])
    return None if location == "body" else location


def parse_request(path: str, raw: bytes, *, max_chars: int = DEFAULT_MAX_CHARS) -> ParsedRequest:
    """Validate an OpenAI request body; raise RequestValidationError with a field-naming message."""
    kind = kind_for_path(path)
    if kind is None:
        raise RequestValidationError(404, "unknown_endpoint", f"{path} is not an OpenAI endpoint")
    document = _decode(raw)
    if not isinstance(document, dict):
        raise RequestValidationError(400, "invalid_json", "the request body must be a JSON object")
    nul = _find_nul(document, raw)
    if nul:
        raise RequestValidationError(
            400, "null_byte", f"{nul}: strings must not contain NUL (\\u0000) characters", nul
        )
    try:
        model = _MODELS[kind].model_validate(document)
    except ValidationError as error:
        details = error.errors(include_url=False)
        raise RequestValidationError(400, "invalid_request", _describe(details), _param(details)) from None
    chars, ids, messages = _prompt_size(model)
    if chars > max_chars:
        raise RequestValidationError(
            413, "prompt_too_large", f"the prompt has {chars} characters; the limit is {max_chars}"
        )
    options = model.stream_options if isinstance(model, _Base) else None
    return ParsedRequest(
        kind=kind,
        model=document["model"],
        stream=isinstance(model, _Base) and model.stream,
        include_usage_requested=bool(options and options.include_usage),
        max_output_tokens=_max_output(model),
        prompt_chars=chars,
        n=model.n if isinstance(model, _Base) else 1,
        body=document,
        messages=messages,
        prompt_token_ids=ids,
    )


def _prompt_size(model: _Open) -> tuple[int, int, int]:
    """(characters, token ids, chat messages) of the prompt."""
    if isinstance(model, ChatRequest):
        return (*_text_size([m.content for m in model.messages]), len(model.messages))
    if isinstance(model, CompletionRequest):
        return (*_text_size(model.prompt), 0)
    if isinstance(model, ResponsesRequest):
        return (*_text_size([model.instructions, model.input]), 0)
    if isinstance(model, EmbeddingRequest):
        return (*_text_size(model.input), 0)
    return 0, 0, 0


def _max_output(model: _Open) -> int | None:
    if isinstance(model, ChatRequest):
        return model.max_completion_tokens or model.max_tokens
    if isinstance(model, CompletionRequest):
        return model.max_tokens
    if isinstance(model, ResponsesRequest):
        return model.max_output_tokens
    return None


def with_stream_usage(parsed: ParsedRequest) -> bytes | None:
    """The body with ``stream_options.include_usage: true`` added, when the sidecar must ask for usage.

    Only for streaming chat/completions requests whose client did not ask itself; otherwise None and
    the caller forwards the original bytes. Re-serialised as ASCII JSON (safe for lone surrogates).
    """
    if not parsed.stream or parsed.include_usage_requested or parsed.kind not in ("chat", "completions"):
        return None
    body = dict(parsed.body)
    options = body.get("stream_options")
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode("ascii")
