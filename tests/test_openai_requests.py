"""OpenAI request validation, stream-usage injection and admission estimates."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmroute_sidecar.api.spec import TokenAccounting
from llmroute_sidecar.openai.requests import (
    OPENAI_PATHS,
    RequestValidationError,
    kind_for_path,
    parse_request,
    with_stream_usage,
)
from llmroute_sidecar.openai.tokens import (
    DEFAULT_COMPLETION_BUDGET,
    bound_completion,
    estimate_cost,
    estimate_prompt_tokens,
    estimate_text_tokens,
)

CHAT = "/v1/chat/completions"


def raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there!"}], **extra}


def refused(path: str, body: bytes, **kwargs: Any) -> RequestValidationError:
    with pytest.raises(RequestValidationError) as caught:
        parse_request(path, body, **kwargs)
    return caught.value


def test_paths_and_kinds() -> None:
    assert {kind_for_path(p) for p in OPENAI_PATHS} == {"chat", "completions", "embeddings", "responses"}
    assert kind_for_path("/v1/chat/completions/") == "chat"
    assert kind_for_path("/v1/models") is None and kind_for_path("/") is None


def test_chat_parses_with_unknown_fields_preserved() -> None:
    body = chat(
        temperature=0.2,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        x_vendor={"nested": [1, 2]},
        max_completion_tokens=50,
        n=2,
    )
    body["messages"].append({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]})
    parsed = parse_request(CHAT, raw(body))
    assert parsed.kind == "chat" and parsed.model == "gpt-4o-mini"
    assert parsed.body == body  # the decoded document, unknown fields included
    assert parsed.max_output_tokens == 50 and parsed.n == 2 and parsed.messages == 2
    assert parsed.stream is False and parsed.include_usage_requested is False
    assert parsed.prompt_chars == len("Hello there!")


def test_chat_content_parts_count_text_only() -> None:
    parts = [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": "data:" + "x" * 99}},
    ]
    parsed = parse_request(CHAT, raw(chat(messages=[{"role": "developer", "content": parts}])))
    assert parsed.prompt_chars == 4
    assert estimate_prompt_tokens(parsed) == 1 + 4 * 1 + 3


@pytest.mark.parametrize(
    ("path", "body", "kind", "chars", "ids", "max_out"),
    [
        ("/v1/completions", {"model": "m", "prompt": "abcdefgh", "max_tokens": 7}, "completions", 8, 0, 7),
        ("/v1/completions", {"model": "m", "prompt": ["ab", "cd"]}, "completions", 4, 0, None),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}, "completions", 0, 3, None),
        ("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]]}, "completions", 0, 3, None),
        ("/v1/embeddings", {"model": "m", "input": ["hello", "world"]}, "embeddings", 10, 0, None),
        ("/v1/embeddings", {"model": "m", "input": [[5, 6, 7]]}, "embeddings", 0, 3, None),
        ("/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 9}, "responses", 2, 0, 9),
        (
            "/v1/responses",
            {"model": "m", "instructions": "be brief", "input": [{"role": "user", "content": "yo"}]},
            "responses",
            10,
            0,
            None,
        ),
    ],
)
def test_other_endpoints_parse(
    path: str, body: dict[str, Any], kind: str, chars: int, ids: int, max_out: int | None
) -> None:
    parsed = parse_request(path, raw(body))
    assert (parsed.kind, parsed.prompt_chars, parsed.prompt_token_ids) == (kind, chars, ids)
    assert parsed.max_output_tokens == max_out
    assert estimate_prompt_tokens(parsed) == -(-chars // 4) + ids


def test_estimates() -> None:
    parsed = parse_request(CHAT, raw(chat(messages=[{"role": "user", "content": "x" * 9}] * 3, n=2)))
    assert estimate_prompt_tokens(parsed) == 7 + 4 * 3 + 3  # ceil(27 / 4) over all messages
    assert estimate_cost(parsed) == estimate_prompt_tokens(parsed) + DEFAULT_COMPLETION_BUDGET * 2
    capped = parse_request(CHAT, raw(chat(max_tokens=10, max_completion_tokens=20)))
    assert estimate_cost(capped) == estimate_prompt_tokens(capped) + 20
    embeddings = parse_request("/v1/embeddings", raw({"model": "m", "input": "abcdefgh"}))
    assert estimate_cost(embeddings) == 2
    assert [estimate_text_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    assert estimate_cost(parsed, 100) == estimate_prompt_tokens(parsed) + 100 * 2  # defaultReservation
    assert estimate_cost(capped, 100) == estimate_prompt_tokens(capped) + 20


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (CHAT, chat(), "max_completion_tokens"),
        ("/v1/completions", {"model": "m", "prompt": "hi"}, "max_tokens"),
        ("/v1/responses", {"model": "m", "input": "hi"}, "max_output_tokens"),
    ],
)
def test_inject_max_tokens_bounds_requests_without_a_maximum(
    path: str, body: dict[str, Any], field: str
) -> None:
    original = raw(body)
    parsed = parse_request(path, original)
    bounded, rewritten = bound_completion(parsed, original, TokenAccounting(inject_max_tokens=True))
    assert json.loads(rewritten) == {**body, field: DEFAULT_COMPLETION_BUDGET}
    assert bounded.max_output_tokens == DEFAULT_COMPLETION_BUDGET and bounded.body[field] == 1024
    assert (
        parse_request(path, rewritten).max_output_tokens == DEFAULT_COMPLETION_BUDGET
    )  # what upstream reads
    assert estimate_cost(bounded, 5) == estimate_cost(parsed, DEFAULT_COMPLETION_BUDGET)


def test_inject_leaves_bounded_requests_embeddings_and_default_routes_alone() -> None:
    inject = TokenAccounting(inject_max_tokens=True, default_reservation=50)
    cases = [
        (CHAT, raw(chat(max_tokens=7)), inject),
        ("/v1/embeddings", raw({"model": "m", "input": "x"}), inject),
        (CHAT, raw(chat()), TokenAccounting()),
    ]
    for path, body, settings in cases:
        parsed = parse_request(path, body)
        assert bound_completion(parsed, body, settings) == (parsed, body)


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        (b"{nope", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", 400, "invalid_json", "must be a JSON object"),
        (b'"text"', 400, "invalid_json", "must be a JSON object"),
        (b'{"model": "m", "model": "n", "messages": []}', 400, "invalid_json", "duplicate key 'model'"),
        (b'{"model": "m", "n": NaN}', 400, "invalid_json", "NaN"),
        (b"[" * 100_000, 400, "invalid_json", "nested too deeply"),
        (b'{"model": "caf\xe9"}', 400, "invalid_encoding", "UTF-8"),
        (raw(chat(messages=[])), 400, "invalid_request", "messages: List should have at least 1 item"),
        (raw({"messages": [{"role": "user"}]}), 400, "invalid_request", "model: Field required"),
        (raw(chat(model="")), 400, "invalid_request", "model: String should have at least 1 character"),
        (raw(chat(model="m" * 257)), 400, "invalid_request", "model: String should have at most 256"),
        (raw(chat(stream="true")), 400, "invalid_request", "stream: Input should be a valid boolean"),
        (raw(chat(n=0)), 400, "invalid_request", "n: Input should be greater than or equal to 1"),
        (raw(chat(n=129)), 400, "invalid_request", "n: Input should be less than or equal to 128"),
        (raw(chat(max_tokens=2.0)), 400, "invalid_request", "max_tokens: Input should be a valid integer"),
        (raw(chat(max_tokens=1_000_001)), 400, "invalid_request", "max_tokens: Input should be less than"),
        (
            raw(chat(stream_options={"include_usage": 1})),
            400,
            "invalid_request",
            "stream_options.include_usage",
        ),
        (raw(chat(messages=["hi"])), 400, "invalid_request", "messages[0]: Input should be an object"),
        (raw(chat(messages=[{"role": "user", "content": 5}])), 400, "invalid_request", "messages[0].content"),
        (
            raw({"model": "m", "prompt": [1, "a"]}),
            400,
            "invalid_request",
            "prompt: Input should be a string, a",
        ),
    ],
)
def test_refusals_name_the_problem(body: bytes, status: int, code: str, words: str) -> None:
    path = "/v1/completions" if b'"prompt"' in body else CHAT
    error = refused(path, body)
    assert (error.status, error.code) == (status, code)
    assert words in error.message, error.message
    # param is the field the message starts with (OpenAI's notation); None for whole-body problems
    whole_body = code != "invalid_request"
    assert error.param == (None if whole_body else error.message.split(":")[0])


def test_bad_role_names_the_message_index_and_choices() -> None:
    messages = [{"role": "user", "content": "a"}] * 3 + [{"role": "wizard", "content": "b"}]
    error = refused(CHAT, raw(chat(messages=messages)))
    assert (error.status, error.code) == (400, "invalid_request")
    assert error.message.startswith("messages[3].role: Input should be 'system', 'developer', 'user'")
    assert error.param == "messages[3].role"


def test_too_many_messages_and_too_many_characters() -> None:
    error = refused(CHAT, raw(chat(messages=[{"role": "user", "content": ""}] * 2049)))
    assert error.status == 400 and error.message.startswith("messages: List should have at most 2048")
    error = refused(CHAT, raw(chat(messages=[{"role": "user", "content": "x" * 101}])), max_chars=100)
    assert (error.status, error.code) == (413, "prompt_too_large") and "101" in error.message
    assert parse_request(CHAT, raw(chat(messages=[{"role": "user", "content": "x" * 100}])), max_chars=100)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (chat(messages=[{"role": "user", "content": "a\u0000b"}]), "messages[0].content"),
        (chat(metadata={"deep": [{"x": "ok"}, {"y": "\u0000"}]}), "metadata.deep[1].y"),
        (chat(metadata={"k\u0000": 1}), "metadata.k\\u0000"),
        ({"model": "m\u0000", "messages": []}, "model"),
    ],
)
def test_nul_characters_are_refused_anywhere(body: dict[str, Any], where: str) -> None:
    error = refused(CHAT, raw(body))
    assert (error.status, error.code, error.param) == (400, "null_byte", where)
    assert error.message.startswith(f"{where}: "), error.message


def test_escaped_backslash_u0000_is_not_a_nul() -> None:
    assert parse_request(CHAT, raw(chat(messages=[{"role": "user", "content": "\\u0000"}])))


def test_with_stream_usage_only_when_needed() -> None:
    assert with_stream_usage(parse_request(CHAT, raw(chat()))) is None
    asked = chat(stream=True, stream_options={"include_usage": True})
    assert with_stream_usage(parse_request(CHAT, raw(asked))) is None
    responses = {"model": "m", "input": "hi", "stream": True}
    assert with_stream_usage(parse_request("/v1/responses", raw(responses))) is None


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False, "vendor_flag": "keep"}])
def test_with_stream_usage_adds_include_usage_and_keeps_the_rest(options: dict[str, Any] | None) -> None:
    body = chat(stream=True, temperature=0.5, messages=[{"role": "user", "content": "h\u00e9 \ud83d"}])
    if options is not None:
        body["stream_options"] = options
    rewritten = with_stream_usage(parse_request(CHAT, raw(body)))
    assert rewritten is not None
    decoded = json.loads(rewritten)
    assert decoded["stream_options"] == {**(options or {}), "include_usage": True}
    assert {k: v for k, v in decoded.items() if k != "stream_options"} == {
        k: v for k, v in body.items() if k != "stream_options"
    }
    assert list(decoded)[: len(body)] == list(body)  # field order kept
    again = parse_request(CHAT, rewritten)
    assert again.include_usage_requested and again.stream


def test_completions_stream_usage() -> None:
    body = {"model": "m", "prompt": "p", "stream": True}
    rewritten = with_stream_usage(parse_request("/v1/completions", raw(body)))
    assert rewritten is not None and json.loads(rewritten)["stream_options"] == {"include_usage": True}
