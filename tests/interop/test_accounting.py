"""What the sidecar records about SDK traffic: outcomes of completed streams, tokens of embeddings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from tests.interop.stack import CLIENT_KEY, Stack, Upstream, access_record, require_module, start_stack
from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import SidecarProcess

require_module("openai", "pip install -e '.[test]' (openai>=2.20,<3)")

import openai  # noqa: E402

PROMPT = [{"role": "user", "content": "count my tokens"}]
STREAMS = 20


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.sidecar_base, api_key=CLIENT_KEY, max_retries=0, timeout=20)


def tokens(stack: Stack, kind: str) -> float:
    return stack.sidecar.metric("llmroute_tokens_total", kind=kind)


def test_completed_sdk_streams_are_ok_not_client_disconnects(
    stack: Stack,
) -> None:
    """The SDK closes its connection right after ``data: [DONE]``; the stream was delivered: ``ok``.

    Against the LiteLLM proxy its body ends a moment after ``[DONE]``; the next test makes that
    ordering certain.
    """
    sdk = client(stack)
    disconnects = stack.sidecar.metric("llmroute_client_disconnects_total")
    ids = []
    for _ in range(STREAMS):
        with sdk.chat.completions.create(
            model=stack.upstream.chat_model, messages=PROMPT, stream=True
        ) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            ids.append(stream.response.headers["x-request-id"])
    records = [access_record(stack.sidecar, request_id) for request_id in ids]
    outcomes = [(r["status"], r["outcome"], r["client_disconnected"]) for r in records]
    assert outcomes == [(200, "ok", False)] * STREAMS
    assert stack.sidecar.metric("llmroute_client_disconnects_total") == disconnects


class LateEndUpstream:
    """An OpenAI-style stream whose HTTP body ends only after the client has finished reading."""

    def __init__(self) -> None:
        self.client_done = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        head = {"id": "chatcmpl-late", "object": "chat.completion.chunk", "created": 1, "model": "late"}
        for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": "done"}, "stop")):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            await response.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await self.client_done.wait()  # the terminating zero-length chunk comes after the client left
        await response.write_eof()
        return response

    async def __aenter__(self) -> LateEndUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client_done.set()
        assert self.runner is not None
        await self.runner.cleanup()


async def test_stream_whose_body_ends_after_done_is_ok(
    interop_redis: RedisServer, interop_secrets: Path, tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    """Deterministic form of the above: the SDK has read ``[DONE]`` and closed before the body ends."""
    async with LateEndUpstream() as upstream:
        built, sidecar = start_stack(
            Upstream("late", upstream.url, "sk-any", "late", "late"), interop_redis, interop_secrets, tmp_path
        )
        sidecars.append(sidecar)
        async with openai.AsyncOpenAI(base_url=built.sidecar_base, api_key=CLIENT_KEY, max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(model="late", messages=PROMPT, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            request_id = stream.response.headers["x-request-id"]
        assert text == "done"
        upstream.client_done.set()
        record = await sidecar.record(
            lambda r: r.get("msg") == "access" and r.get("request_id") == request_id
        )
    assert (record["status"], record["outcome"], record["client_disconnected"]) == (200, "ok", False)
    assert sidecar.metric("llmroute_client_disconnects_total") == 0


def test_streamed_usage_is_what_the_sidecar_charges(stack: Stack) -> None:
    with client(stack).chat.completions.create(
        model=stack.upstream.chat_model,
        messages=PROMPT,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        usage = [c.usage for c in stream if c.usage]
        request_id = stream.response.headers["x-request-id"]
    assert len(usage) == 1
    record = access_record(stack.sidecar, request_id)
    assert record["tokens_actual"] == usage[0].total_tokens > 0


def test_embeddings_are_charged_their_prompt_tokens_when_total_is_zero(litellm_stack: Stack) -> None:
    """LiteLLM reports embeddings as ``prompt_tokens: N, total_tokens: 0``: N tokens were used."""
    stack = litellm_stack
    direct = openai.OpenAI(base_url=stack.direct_base, api_key=stack.upstream.api_key, max_retries=0)
    upstream_usage = direct.embeddings.create(model=stack.upstream.embed_model, input="embed me").usage
    assert upstream_usage.total_tokens == 0 < upstream_usage.prompt_tokens  # LiteLLM's convention

    kinds = ("reserved", "refunded", "overrun", "prompt")
    before = {kind: tokens(stack, kind) for kind in kinds}
    raw = client(stack).embeddings.with_raw_response.create(
        model=stack.upstream.embed_model, input="embed me"
    )
    used = raw.parse().usage.prompt_tokens
    record = access_record(stack.sidecar, raw.request_id)
    delta = {kind: tokens(stack, kind) - before[kind] for kind in kinds}
    charged = delta["reserved"] - delta["refunded"] + delta["overrun"]
    assert delta["prompt"] == used
    assert record["tokens_actual"] == used
    assert charged == used
