"""The official ``openai`` SDK through a real sidecar sees what it sees talking to the upstream itself.

Each test runs against two stacks (a Redis-backed sidecar in front of the LiteLLM proxy, and one in
front of llmroute's mock upstream) and, where it makes sense, makes the same call directly to the
upstream and compares.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.interop.stack import (
    CLIENT_KEY,
    Stack,
    access_record,
    require_module,
    sse_data,
)

require_module("openai", "pip install -e '.[test]' (openai>=2.20,<3)")

import openai  # noqa: E402

PROMPT = [{"role": "user", "content": "Say something about drop-in proxies."}]


def sidecar_client(stack: Stack, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.sidecar_base, api_key=CLIENT_KEY, max_retries=0, timeout=20, **options
    )


def direct_client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.direct_base, api_key=stack.upstream.api_key, max_retries=0, timeout=20
    )


def stream_view(client: openai.OpenAI, stack: Stack, **extra: Any) -> list[tuple[Any, ...]]:
    """What a streaming SDK user reads: per chunk its choices (index, role, content, finish) and usage."""
    view = []
    with client.chat.completions.create(
        model=stack.upstream.chat_model, messages=PROMPT, stream=True, **extra
    ) as stream:
        for chunk in stream:
            choices = tuple((c.index, c.delta.role, c.delta.content, c.finish_reason) for c in chunk.choices)
            usage = chunk.usage.model_dump(exclude_none=True) if chunk.usage else None
            view.append((chunk.object, chunk.model, choices, usage))
    return view


def test_sync_chat_matches_the_upstream(stack: Stack) -> None:
    through = sidecar_client(stack).chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    direct = direct_client(stack).chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert through.choices[0].message.content
    assert through.choices[0].finish_reason == direct.choices[0].finish_reason == "stop"
    assert through.model == direct.model
    assert through.usage is not None and direct.usage is not None
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens > 0
    assert through.usage.completion_tokens == direct.usage.completion_tokens > 0


async def test_async_chat_and_concurrent_calls(stack: Stack) -> None:
    import asyncio

    client = openai.AsyncOpenAI(base_url=stack.sidecar_base, api_key=CLIENT_KEY, max_retries=0, timeout=20)
    direct = openai.AsyncOpenAI(
        base_url=stack.direct_base, api_key=stack.upstream.api_key, max_retries=0, timeout=20
    )
    async with client, direct:
        expected = await direct.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
                for _ in range(4)
            )
        )
    assert {a.choices[0].message.content for a in answers} == {expected.choices[0].message.content}
    assert len({a.id for a in answers}) == 4  # four real upstream calls, not one answer replayed


def test_stream_content_is_identical_to_the_direct_stream(stack: Stack) -> None:
    """Chunk by chunk the same choices (a usage chunk, item 5, is the next test's concern)."""
    through = [chunk for chunk in stream_view(sidecar_client(stack), stack) if not chunk[3]]
    direct = stream_view(direct_client(stack), stack)
    assert through == direct
    text = "".join(content for _, _, choices, _ in through for (_, _, content, _) in choices if content)
    assert len(through) > 3 and text


async def test_async_stream_content_is_identical_to_the_direct_stream(stack: Stack) -> None:
    async def read(client: openai.AsyncOpenAI) -> list[str | None]:
        async with client:
            stream = await client.chat.completions.create(
                model=stack.upstream.chat_model, messages=PROMPT, stream=True
            )
            return [c.choices[0].delta.content async for c in stream if c.choices and not c.usage]

    through = await read(openai.AsyncOpenAI(base_url=stack.sidecar_base, api_key=CLIENT_KEY, max_retries=0))
    direct = await read(
        openai.AsyncOpenAI(base_url=stack.direct_base, api_key=stack.upstream.api_key, max_retries=0)
    )
    assert through == direct and any(through)


def test_stream_with_include_usage_delivers_the_upstream_usage(stack: Stack) -> None:
    options = {"stream_options": {"include_usage": True}}
    through = stream_view(sidecar_client(stack), stack, **options)
    direct = stream_view(direct_client(stack), stack, **options)
    assert through == direct
    usages = [usage for *_, usage in through if usage]
    assert len(usages) == 1 and usages[0]["total_tokens"] > 0


@pytest.mark.parametrize(
    "options", [{}, {"stream_options": {"include_usage": False}}], ids=["unset", "false"]
)
def test_stream_without_include_usage_gets_no_usage_chunk(stack: Stack, options: dict[str, Any]) -> None:
    through = stream_view(sidecar_client(stack), stack, **options)
    direct = stream_view(direct_client(stack), stack, **options)
    assert [usage for *_, usage in direct if usage] == []
    assert [chunk for chunk in through if chunk[3]] == []
    assert through == direct


def test_embeddings_match_the_upstream(stack: Stack) -> None:
    inputs = ["first text to embed", "second text"]
    through = sidecar_client(stack).embeddings.create(model=stack.upstream.embed_model, input=inputs)
    direct = direct_client(stack).embeddings.create(model=stack.upstream.embed_model, input=inputs)
    assert [d.embedding for d in through.data] == [d.embedding for d in direct.data]
    assert through.data and through.data[0].embedding
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens > 0


def test_raw_response_has_request_id_and_rate_limit_headers(stack: Stack) -> None:
    raw = sidecar_client(stack).chat.completions.with_raw_response.create(
        model=stack.upstream.chat_model, messages=PROMPT, extra_headers={"X-Request-ID": "interop-req-1"}
    )
    completion = raw.parse()
    assert raw.status_code == 200 and completion.choices[0].message.content
    assert raw.request_id == raw.headers["x-request-id"] == "interop-req-1"
    assert int(raw.headers["x-ratelimit-limit"]) == 100_000
    assert 0 <= int(raw.headers["x-ratelimit-remaining"]) < 100_000
    assert '"fleet-' in raw.headers["ratelimit-policy"] and raw.headers["ratelimit"]
    assert access_record(stack.sidecar, "interop-req-1")["status"] == 200
    if stack.upstream.kind == "litellm":  # the upstream's own headers reach the client too
        assert raw.headers["x-litellm-model-group"] == stack.upstream.chat_model


def test_unknown_client_key_is_an_authentication_error(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.sidecar_base, api_key="sk-not-a-known-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    error = caught.value
    assert error.status_code == 401 and error.code == "invalid_api_key"
    assert error.type == "authentication_error" and error.message
    assert error.request_id and access_record(stack.sidecar, error.request_id)["status"] == 401


def test_invalid_body_is_a_bad_request_error_naming_the_parameter(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sidecar_client(stack).chat.completions.create(model=stack.upstream.chat_model, messages=[])
    error = caught.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.param is not None and "messages" in error.param
    assert error.request_id


def test_upstream_errors_reach_the_sdk_as_the_same_exception(stack: Stack) -> None:
    """An error the upstream itself answers (unknown model) is relayed, not rewritten."""
    if stack.upstream.kind != "litellm":
        pytest.skip("llmroute's mock upstream serves any model name")
    with pytest.raises(openai.APIStatusError) as direct:
        direct_client(stack).chat.completions.create(model="no-such-model", messages=PROMPT)
    with pytest.raises(openai.APIStatusError) as through:
        sidecar_client(stack).chat.completions.create(model="no-such-model", messages=PROMPT)
    assert type(through.value) is type(direct.value)
    assert through.value.status_code == direct.value.status_code
    assert through.value.message == direct.value.message


def raw_stream(base: str, key: str, model: str) -> tuple[str, list[Any]]:
    """A streamed chat as raw SSE (content type and JSON documents), ids and timestamps blanked."""
    import httpx

    body = {"model": model, "messages": PROMPT, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=20) as client:
        response = client.post(f"{base}/chat/completions", json=body, headers=headers)
    documents = sse_data(response.content)
    for document in documents:
        if isinstance(document, dict):
            document.pop("id", None)
            document.pop("created", None)
    return response.headers["content-type"], documents


def test_raw_stream_documents_are_unchanged(stack: Stack) -> None:
    """Below the SDK: every SSE document as the upstream sent it, no field added or removed."""
    through = raw_stream(stack.sidecar_base, CLIENT_KEY, stack.upstream.chat_model)
    direct = raw_stream(stack.direct_base, stack.upstream.api_key, stack.upstream.chat_model)
    assert through == direct
    assert direct[1][-1] == "[DONE]"
