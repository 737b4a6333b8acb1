"""Validation of OpenAI-compatible request bodies (pydantic v2).

Only what the sidecar relies on is checked — sizes, roles, token bounds, NUL bytes; unknown fields
are allowed and the original bytes are forwarded untouched unless usage must be requested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
_KINDS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
DEFAULT_MAX_CHARS = 4_000_000
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
TokenIds = list[Annotated[int, Field(ge=0)]]


def kind_for_path(path: str) -> str | None:
    """``chat``, ``completions``, ``embeddings`` or ``responses`` for OpenAI endpoints, else None."""
    return _KINDS.get(path.rstrip("/") if path != "/" else path)


class RequestValidationError(Exception):
    """A request body the sidecar refuses: ``status`` 400 (not JSON) or 422 (schema)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool | None = None


class Message(_Open):
    role: Role
    content: str | list[dict[str, Any]] | None = None


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
    prompt: str | list[str] | TokenIds | list[TokenIds] = ""
    max_tokens: MaxTokens | None = None


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | TokenIds | list[TokenIds]


class ResponsesRequest(_Base):
    input: str | list[Any] = ""
    max_output_tokens: MaxTokens | None = None


_MODELS: dict[str, type[BaseModel]] = {
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


def _location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _find_nul(value: Any, path: str = "") -> str | None:
    if isinstance(value, str):
        return path or "body" if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in str(key):
                return f"{path}.{key}" if path else str(key)
            found = _find_nul(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_nul(item, f"{path}[{index}]")
            if found:
                return found
    return None


def _text_chars(value: Any) -> tuple[int, int]:
    """(characters of text, count of token ids) in a prompt/content/input value."""
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, int) and not isinstance(value, bool):
        return 0, 1
    if isinstance(value, dict):
        chars = ids = 0
        for key in ("text", "content", "input", "output", "arguments"):
            if key in value:
                c, i = _text_chars(value[key])
                chars, ids = chars + c, ids + i
        return chars, ids
    if isinstance(value, list):
        chars = ids = 0
        for item in value:
            c, i = _text_chars(item)
            chars, ids = chars + c, ids + i
        return chars, ids
    return 0, 0


def parse_request(path: str, raw: bytes, *, max_chars: int = DEFAULT_MAX_CHARS) -> ParsedRequest:
    """Validate an OpenAI request body; raise RequestValidationError with a field-naming message."""
    kind = kind_for_path(path)
    if kind is None:
        raise RequestValidationError(404, "unknown_endpoint", f"{path} is not an OpenAI endpoint")
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestValidationError(400, "invalid_encoding", "the request body is not valid UTF-8") from None
    except ValueError as error:
        raise RequestValidationError(
            400, "invalid_json", f"the request body is not valid JSON: {error}"
        ) from None
    if not isinstance(document, dict):
        raise RequestValidationError(400, "invalid_json", "the request body must be a JSON object")
    nul = _find_nul(document)
    if nul:
        raise RequestValidationError(
            422, "null_byte", f"{nul}: strings must not contain NUL (\\u0000) characters"
        )
    try:
        model = _MODELS[kind].model_validate(document)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        message = f"{_location(first['loc'])}: {first['msg']}"
        if len(error.errors()) > 1:
            message += f" (and {len(error.errors()) - 1} more problem(s))"
        raise RequestValidationError(422, "invalid_request", message) from None
    chars, ids, messages = _prompt_size(kind, model)
    if chars > max_chars:
        raise RequestValidationError(
            413, "prompt_too_large", f"the prompt has {chars} characters; the limit is {max_chars}"
        )
    options = getattr(model, "stream_options", None)
    return ParsedRequest(
        kind=kind,
        model=str(document["model"]),
        stream=bool(getattr(model, "stream", False)),
        include_usage_requested=bool(options and options.include_usage),
        max_output_tokens=_max_output(model),
        prompt_chars=chars,
        n=int(getattr(model, "n", 1)),
        body=document,
        messages=messages,
        prompt_token_ids=ids,
    )


def _prompt_size(kind: str, model: BaseModel) -> tuple[int, int, int]:
    if isinstance(model, ChatRequest):
        chars, ids = _text_chars([m.content for m in model.messages if m.content is not None])
        return chars, ids, len(model.messages)
    if isinstance(model, CompletionRequest):
        return (*_text_chars(model.prompt), 0)
    if isinstance(model, EmbeddingRequest | ResponsesRequest):
        return (*_text_chars(model.input), 0)
    return 0, 0, 0


def _max_output(model: BaseModel) -> int | None:
    if isinstance(model, ChatRequest):
        return model.max_completion_tokens or model.max_tokens
    if isinstance(model, CompletionRequest):
        return model.max_tokens
    if isinstance(model, ResponsesRequest):
        return model.max_output_tokens
    return None


def with_stream_usage(parsed: ParsedRequest) -> bytes | None:
    """The body re-serialised with ``stream_options.include_usage`` when the sidecar must ask for usage."""
    if not parsed.stream or parsed.include_usage_requested or parsed.kind not in ("chat", "completions"):
        return None
    body = dict(parsed.body)
    options = body.get("stream_options")
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
