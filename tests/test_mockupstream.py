"""The built-in mock OpenAI upstream, served on a loopback test server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llmroute_sidecar.mockupstream import COUNTERS, REQUESTS, MockSettings, create_app
from llmroute_sidecar.openai.requests import parse_request
from llmroute_sidecar.openai.sse import SSEParser, StreamUsage, is_injected_usage_event
from llmroute_sidecar.openai.tokens import estimate_prompt_tokens

CHAT = "/v1/chat/completions"
FAST = MockSettings(first_token_latency=0, token_interval=0, json_latency=0)


@pytest.fixture
async def app() -> web.Application:
    return create_app(FAST)


@pytest.fixture
async def client(app: web.Application) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as test_client:
        yield test_client


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": "How are you today?"}], **extra}


def events_of(raw: bytes) -> list[str]:
    parser = SSEParser()
    events = parser.feed(raw)
    assert parser.pending() == b""
    return [event.data for event in events if event.data is not None]


async def test_health_toggle(client: TestClient[web.Request, web.Application]) -> None:
    response = await client.get("/health")
    assert response.status == 200 and await response.json() == {"status": "ok"}
    assert (await client.post("/mock/health", json={"healthy": False})).status == 200
    assert (await client.get("/health")).status == 503
    await client.post("/mock/health", json={"healthy": True})
    assert (await client.get("/health")).status == 200


async def test_chat_json_usage_matches_the_estimate(client: TestClient[web.Request, web.Application]) -> None:
    body = chat_body(max_tokens=5)
    response = await client.post(CHAT, json=body)
    document = await response.json()
    assert response.status == 200 and document["object"] == "chat.completion"
    assert document["id"].startswith("chatcmpl-") and document["model"] == "mock-gpt"
    assert isinstance(document["created"], int)
    (choice,) = document["choices"]
    assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "length"
    prompt = estimate_prompt_tokens(parse_request(CHAT, json.dumps(body).encode()))
    assert document["usage"] == {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}


async def test_completions_and_embeddings_and_models(
    client: TestClient[web.Request, web.Application],
) -> None:
    body = {"model": "m", "prompt": "abcdefgh"}
    document = await (await client.post("/v1/completions", json=body, headers={"X-Mock-Tokens": "3"})).json()
    assert document["object"] == "text_completion" and document["choices"][0]["text"] == "the quick brown"
    assert document["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    embedded = await (await client.post("/v1/embeddings", json={"model": "m", "input": ["ab", "cd"]})).json()
    assert [len(item["embedding"]) for item in embedded["data"]] == [8, 8]
    assert embedded["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
    models = await (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "mock-gpt"


async def test_stream_ends_with_done(client: TestClient[web.Request, web.Application]) -> None:
    response = await client.post(CHAT, json=chat_body(stream=True), headers={"X-Mock-Tokens": "4"})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    data = events_of(await response.read())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == [
        "the ",
        "quick ",
        "brown ",
        "fox ",
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in chunk for chunk in chunks)


async def test_include_usage_adds_the_usage_only_chunk(
    client: TestClient[web.Request, web.Application],
) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    raw = await (await client.post(CHAT, json=body)).read()
    events = SSEParser().feed(raw)
    usage = StreamUsage()
    for event in events:
        usage.consume(event)
    assert [is_injected_usage_event(e) for e in events][-2:] == [True, False] and usage.done
    prompt = estimate_prompt_tokens(parse_request(CHAT, json.dumps(body).encode()))
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, FAST.completion_tokens)
    assert usage.completion_tokens_estimate() > 0


async def test_no_usage_header_suppresses_usage(client: TestClient[web.Request, web.Application]) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    raw = await (await client.post(CHAT, json=body, headers={"X-Mock-No-Usage": "1"})).read()
    assert not any(is_injected_usage_event(e) for e in SSEParser().feed(raw))
    assert events_of(raw)[-1] == "[DONE]"


async def test_fail_first_is_counted_per_key(
    client: TestClient[web.Request, web.Application], app: web.Application
) -> None:
    statuses = []
    for key in ("a", "a", "b", "a", "b"):
        headers = {"X-Mock-Fail-First": "2", "X-Mock-Key": key}
        response = await client.post(CHAT, json=chat_body(), headers=headers)
        statuses.append(response.status)
        if response.status == 503:
            assert (await response.json())["error"]["code"] == "mock_503"
    assert statuses == [503, 503, 503, 200, 503]
    assert app[COUNTERS]["fail:a"] == 3 and app[COUNTERS][CHAT] == 5


async def test_fail_switch_fails_every_request_until_cleared(
    client: TestClient[web.Request, web.Application],
) -> None:
    assert (await client.post("/mock/fail", json={"status": 42})).status == 400
    assert (await client.post("/mock/fail", json={"status": 429})).status == 200
    for _ in range(2):
        response = await client.post(CHAT, json=chat_body())
        assert response.status == 429 and (await response.json())["error"]["code"] == "mock_429"
    await client.post("/mock/fail", json={"status": 0})
    assert (await client.post(CHAT, json=chat_body())).status == 200


async def test_status_header_answers_an_openai_error(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.post(CHAT, json=chat_body(), headers={"X-Mock-Status": "429"})
    document = await response.json()
    assert response.status == 429 and document["error"]["code"] == "mock_429"
    assert (await client.post(CHAT, json=chat_body(), headers={"X-Mock-Latency": "soon"})).status == 400


async def test_stream_error_after_n_chunks_has_no_done(
    client: TestClient[web.Request, web.Application],
) -> None:
    headers = {"X-Mock-Stream-Error-After": "2"}
    received = b""
    response = await client.post(CHAT, json=chat_body(stream=True), headers=headers)
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            received += chunk
    data = events_of(received)
    assert "[DONE]" not in data
    assert [json.loads(item)["choices"][0]["delta"].get("content") for item in data[1:]] == ["the ", "quick "]


async def test_other_paths_echo_and_requests_are_recorded(
    client: TestClient[web.Request, web.Application], app: web.Application
) -> None:
    headers = {"Authorization": "Bearer sk-x", "traceparent": "00-ab-cd-01", "X-Request-ID": "r-1"}
    response = await client.put("/anything/here?q=1", data=b"12345", headers=headers)
    echoed = await response.json()
    assert response.status == 200 and echoed["method"] == "PUT" and echoed["path"] == "/anything/here?q=1"
    assert {k: echoed["headers"][k] for k in headers} == headers and echoed["body_length"] == 5
    (recorded,) = app[REQUESTS]
    assert recorded["headers"]["X-Request-ID"] == "r-1" and recorded["body_length"] == 5
    assert await (await client.get("/mock/requests")).json() == [recorded]
