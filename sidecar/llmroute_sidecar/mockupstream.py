"""A built-in mock OpenAI upstream (JSON and SSE), for ``make demo``, tests and benchmarks.

Test-control request headers:
``X-Mock-Status: N`` answer N with an OpenAI-style error; ``X-Mock-Fail-First: N`` with
``X-Mock-Key: K`` the first N requests of key K get 503; ``X-Mock-Latency: S`` extra seconds before
the first byte; ``X-Mock-Stream-Error-After: N`` break the stream after N content chunks;
``X-Mock-Tokens: N`` completion tokens; ``X-Mock-No-Usage: 1`` never send usage in a stream;
``X-Mock-Hold: 1`` hold the stream after its first chunk until ``POST /mock/release``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from llmroute_sidecar.openai.requests import RequestValidationError, parse_request
from llmroute_sidecar.openai.tokens import estimate_prompt_tokens

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "rate",
    "limits",
    "keep",
    "every",
    "replica",
    "honest",
]


@dataclass(frozen=True)
class MockSettings:
    first_token_latency: float = 0.05
    token_interval: float = 0.01
    completion_tokens: int = 16
    json_latency: float = 0.05


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "code": f"mock_{status}"}}
    return web.json_response(body, status=status)


def _completion_tokens(request: web.Request, settings: MockSettings, max_tokens: int | None) -> int:
    wanted = int(request.headers.get("X-Mock-Tokens", settings.completion_tokens))
    return min(wanted, max_tokens) if max_tokens else wanted


def create_app(settings: MockSettings | None = None) -> web.Application:
    """The mock upstream application."""
    settings = settings or MockSettings()
    app = web.Application()
    app["settings"] = settings
    app["requests"] = []
    app["counters"] = defaultdict(int)
    app["healthy"] = True
    app["release"] = asyncio.Event()
    app.router.add_get("/health", _health)
    app.router.add_post("/mock/health", _set_health)
    app.router.add_post("/mock/release", _release)
    app.router.add_get("/mock/requests", _requests)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _completion)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def _health(request: web.Request) -> web.Response:
    healthy = request.app["healthy"]
    return web.json_response({"status": "ok" if healthy else "unhealthy"}, status=200 if healthy else 503)


async def _set_health(request: web.Request) -> web.Response:
    request.app["healthy"] = bool((await request.json()).get("healthy", True))
    return web.json_response({"healthy": request.app["healthy"]})


async def _release(request: web.Request) -> web.Response:
    request.app["release"].set()
    request.app["release"] = asyncio.Event()
    return web.json_response({"released": True})


async def _requests(request: web.Request) -> web.Response:
    return web.json_response(request.app["requests"])


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "mock-gpt", "object": "model"}]})


async def _record(request: web.Request) -> tuple[bytes, web.Response | None]:
    body = await request.read()
    app = request.app
    app["requests"].append(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body_length": len(body),
        }
    )
    app["counters"][request.path] += 1
    latency = float(request.headers.get("X-Mock-Latency", "0") or 0)
    if latency:
        await asyncio.sleep(latency)
    if "X-Mock-Status" in request.headers:
        status = int(request.headers["X-Mock-Status"])
        return body, _error(status, f"mock answered {status} as asked")
    if "X-Mock-Fail-First" in request.headers:
        key = f"fail:{request.headers.get('X-Mock-Key', '')}"
        app["counters"][key] += 1
        if app["counters"][key] <= int(request.headers["X-Mock-Fail-First"]):
            return body, _error(503, "mock upstream failing as asked")
    return body, None


async def _completion(request: web.Request) -> web.StreamResponse:
    raw, failure = await _record(request)
    if failure is not None:
        return failure
    try:
        parsed = parse_request(request.path, raw)
    except RequestValidationError as error:
        return _error(400, error.message)
    settings: MockSettings = request.app["settings"]
    prompt = estimate_prompt_tokens(parsed)
    completion = _completion_tokens(request, settings, parsed.max_output_tokens)
    chat = parsed.kind == "chat"
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if not parsed.stream:
        await asyncio.sleep(settings.json_latency)
        text = " ".join(WORDS[i % len(WORDS)] for i in range(completion))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": parsed.model,
                "choices": [choice],
                "usage": usage,
            }
        )
    return await _stream(
        request, parsed.model, chat, ident, completion, usage, parsed.include_usage_requested
    )


async def _stream(
    request: web.Request,
    model: str,
    chat: bool,
    ident: str,
    completion: int,
    usage: dict[str, int],
    include_usage: bool,
) -> web.StreamResponse:
    settings: MockSettings = request.app["settings"]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    created = int(time.time())
    break_after = request.headers.get("X-Mock-Stream-Error-After")
    hold = request.headers.get("X-Mock-Hold") == "1"
    send_usage = include_usage and request.headers.get("X-Mock-No-Usage") != "1"

    def chunk(delta: dict[str, Any] | str | None, finish: str | None = None) -> bytes:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            obj = "text_completion"
        payload: dict[str, Any] = {
            "id": ident,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if send_usage:
            payload["usage"] = None
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    await asyncio.sleep(settings.first_token_latency)
    if chat:
        await response.write(chunk({"role": "assistant", "content": ""}))
    for index in range(completion):
        if break_after is not None and index >= int(break_after):
            assert request.transport is not None
            request.transport.close()
            return response
        word = WORDS[index % len(WORDS)] + " "
        await response.write(chunk({"content": word} if chat else word))
        if hold and index == 0:
            await request.app["release"].wait()
        if settings.token_interval:
            await asyncio.sleep(settings.token_interval)
    await response.write(chunk({} if chat else "", finish="stop"))
    if send_usage:
        payload: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _embeddings(request: web.Request) -> web.Response:
    raw, failure = await _record(request)
    if failure is not None:
        return failure
    try:
        parsed = parse_request(request.path, raw)
    except RequestValidationError as error:
        return _error(400, error.message)
    inputs = parsed.body["input"]
    count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    prompt = estimate_prompt_tokens(parsed)
    data = [
        {"object": "embedding", "index": i, "embedding": [round(0.1 * (i + j), 3) for j in range(8)]}
        for i in range(count)
    ]
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    return web.json_response({"object": "list", "data": data, "model": parsed.model, "usage": usage})


async def _echo(request: web.Request) -> web.Response:
    raw, failure = await _record(request)
    if failure is not None:
        return failure
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body_length": len(raw),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mock OpenAI-compatible upstream for llmroute.")
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT")
    parser.add_argument("--first-token-latency", type=float, default=MockSettings.first_token_latency)
    parser.add_argument("--token-interval", type=float, default=MockSettings.token_interval)
    parser.add_argument("--json-latency", type=float, default=MockSettings.json_latency)
    parser.add_argument("--tokens", type=int, default=MockSettings.completion_tokens)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    settings = MockSettings(args.first_token_latency, args.token_interval, args.tokens, args.json_latency)
    web.run_app(create_app(settings), host=host or "127.0.0.1", port=int(port), print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
