"""A built-in mock OpenAI upstream (JSON and SSE), for ``make demo``, tests and benchmarks.

Prompt tokens in ``usage`` use :func:`estimate_prompt_tokens`, so tests can predict exact numbers;
completion tokens are the number of content chunks. Test-control request headers:
``X-Mock-Status: N`` answer N with an OpenAI-style error; ``X-Mock-Fail-First: N`` with
``X-Mock-Key: K`` the first N requests of key K get 503; ``X-Mock-Latency: S`` extra seconds before
the first byte; ``X-Mock-Stream-Error-After: N`` close the connection after N content chunks;
``X-Mock-Tokens: N`` completion tokens (capped by the request's maximum, if it sets one);
``X-Mock-Token-Interval: S`` seconds between streamed tokens; ``X-Mock-No-Usage: 1`` never send
usage in a stream; ``X-Mock-Cached-Tokens: N`` report N of the prompt tokens as cached
(``usage.prompt_tokens_details.cached_tokens``);
``X-Mock-Hold: 1`` hold the stream after its first content chunk until ``POST /mock/release``;
``X-Mock-Usage-Shape: S`` how a stream carries usage: ``openai`` (default: ``"usage": null`` on every
chunk, then a ``choices: []`` usage chunk), ``litellm`` (no ``usage`` on content chunks, then a usage
chunk with ``choices: [{"index": 0, "delta": {}}]``) or ``final`` (usage on the finish chunk itself).
Received requests are kept in ``app[REQUESTS]`` (also ``GET /mock/requests``), counters in
``app[COUNTERS]``; ``POST /mock/health {"healthy": false}`` makes ``GET /health`` answer 503;
``POST /mock/fail {"status": 500}`` makes every following request answer that status (an
OpenAI-style error) until ``{"status": 0}``: one upstream failing while another serves.
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

from llmroute_sidecar.openai.requests import ParsedRequest, RequestValidationError, parse_request
from llmroute_sidecar.openai.tokens import estimate_prompt_tokens

_SENTENCE = "the quick brown fox jumps over the lazy dog while rate limits keep every replica honest"
WORDS = tuple(_SENTENCE.split())


@dataclass(frozen=True)
class MockSettings:
    """Pacing of the mock's answers, in seconds, and its default completion length."""

    first_token_latency: float = 0.05
    token_interval: float = 0.01
    completion_tokens: int = 16
    json_latency: float = 0.05


SETTINGS = web.AppKey("settings", MockSettings)
REQUESTS = web.AppKey("requests", list[dict[str, Any]])
COUNTERS = web.AppKey("counters", defaultdict[str, int])
HEALTHY = web.AppKey("healthy", list[bool])
RELEASE = web.AppKey("release", list[asyncio.Event])
FAIL = web.AppKey("fail", list[int])


def create_app(settings: MockSettings | None = None) -> web.Application:
    """The mock upstream application."""
    app = web.Application()
    app[SETTINGS] = settings or MockSettings()
    app[REQUESTS] = []
    app[COUNTERS] = defaultdict(int)
    app[HEALTHY] = [True]
    app[RELEASE] = [asyncio.Event()]
    app[FAIL] = [0]
    app.router.add_get("/health", _health)
    app.router.add_post("/mock/fail", _set_fail)
    app.router.add_post("/mock/health", _set_health)
    app.router.add_post("/mock/release", _release)
    app.router.add_get("/mock/requests", _requests)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _completion)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "param": None, "code": f"mock_{status}"}}
    return web.json_response(body, status=status)


def _number(request: web.Request, name: str, default: float = 0) -> float:
    """A numeric control header; a malformed one is answered 400."""
    try:
        return float(request.headers.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"message": f"bad {name} header", "code": "mock_bad_header"}}),
            content_type="application/json",
        ) from None


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _health(request: web.Request) -> web.Response:
    healthy = request.app[HEALTHY][0]
    return web.json_response({"status": "ok" if healthy else "unhealthy"}, status=200 if healthy else 503)


async def _set_health(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, 'expected a JSON body like {"healthy": false}')
    request.app[HEALTHY][0] = bool(body.get("healthy", True)) if isinstance(body, dict) else True
    return web.json_response({"healthy": request.app[HEALTHY][0]})


async def _set_fail(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        status = int(body.get("status", 0)) if isinstance(body, dict) else -1
    except (ValueError, TypeError):
        status = -1
    if status != 0 and not 400 <= status <= 599:
        return _error(400, 'expected a JSON body like {"status": 500} (400..599, or 0 to stop failing)')
    request.app[FAIL][0] = status
    return web.json_response({"status": status})


async def _release(request: web.Request) -> web.Response:
    events = request.app[RELEASE]
    events[0].set()
    events[0] = asyncio.Event()
    return web.json_response({"released": True})


async def _requests(request: web.Request) -> web.Response:
    return web.json_response(request.app[REQUESTS])


async def _models(request: web.Request) -> web.Response:
    model = {"id": "mock-gpt", "object": "model", "created": 0, "owned_by": "llmroute-mock"}
    return web.json_response({"object": "list", "data": [model]})


async def _record(request: web.Request) -> tuple[bytes, web.Response | None]:
    """Record the request, apply latency and failure headers; a response here ends the request."""
    body = await request.read()
    app = request.app
    record = {"method": request.method, "path": request.path_qs, "headers": dict(request.headers)}
    app[REQUESTS].append({**record, "body_length": len(body)})
    app[COUNTERS][request.path] += 1
    latency = _number(request, "X-Mock-Latency")
    if latency > 0:
        await asyncio.sleep(latency)
    if app[FAIL][0]:
        return body, _error(app[FAIL][0], f"mock failing with {app[FAIL][0]} as asked")
    if "X-Mock-Status" in request.headers:
        status = int(_number(request, "X-Mock-Status"))
        if not 400 <= status <= 599:
            return body, _error(400, "X-Mock-Status must be 400..599")
        return body, _error(status, f"mock answered {status} as asked")
    if "X-Mock-Fail-First" in request.headers:
        key = f"fail:{request.headers.get('X-Mock-Key', '')}"
        app[COUNTERS][key] += 1
        if app[COUNTERS][key] <= _number(request, "X-Mock-Fail-First"):
            return body, _error(503, "mock upstream failing as asked")
    return body, None


async def _parsed(request: web.Request) -> ParsedRequest | web.Response:
    raw, failure = await _record(request)
    if failure is not None:
        return failure
    try:
        return parse_request(request.path, raw)
    except RequestValidationError as error:
        return _error(400, error.message)


async def _completion(request: web.Request) -> web.StreamResponse:
    parsed = await _parsed(request)
    if isinstance(parsed, web.Response):
        return parsed
    settings = request.app[SETTINGS]
    wanted = int(_number(request, "X-Mock-Tokens", settings.completion_tokens))
    limit = parsed.max_output_tokens
    completion = min(wanted, limit) if limit else wanted
    finish = "length" if limit is not None and limit < wanted else "stop"
    prompt = estimate_prompt_tokens(parsed)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = int(_number(request, "X-Mock-Cached-Tokens", 0))
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": min(cached, prompt)}
    chat = parsed.kind == "chat"
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": parsed.model,
        "system_fingerprint": "fp_llmroute_mock",
    }
    if parsed.stream:
        return await _stream(request, head, completion, finish, usage, parsed.include_usage_requested)
    await asyncio.sleep(settings.json_latency)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(completion))
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    return web.json_response({**head, "choices": [choice], "usage": usage})


async def _stream(
    request: web.Request,
    head: dict[str, Any],
    completion: int,
    finish: str,
    usage: dict[str, Any],
    include_usage: bool,
) -> web.StreamResponse:
    """Role chunk (chat), one word per chunk, finish chunk, optional usage-only chunk, [DONE]."""
    settings = request.app[SETTINGS]
    chat = head["object"] == "chat.completion"
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    break_after = int(_number(request, "X-Mock-Stream-Error-After", -1))
    hold = request.headers.get("X-Mock-Hold") == "1"
    send_usage = include_usage and request.headers.get("X-Mock-No-Usage") != "1"
    shape = request.headers.get("X-Mock-Usage-Shape", "openai")
    null_usage = {"usage": None} if send_usage and shape == "openai" else {}
    interval = _number(request, "X-Mock-Token-Interval", settings.token_interval)

    def chunk(text: str | None, finish_reason: str | None = None) -> bytes:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": {} if finish_reason else delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        if finish_reason and send_usage and shape == "final":
            return _sse({**head, "choices": [choice], "usage": usage})
        return _sse({**head, "choices": [choice], **null_usage})

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await asyncio.sleep(settings.first_token_latency)
    if chat:
        await response.write(chunk(None))
    for index in range(completion):
        if index == break_after:
            assert request.transport is not None
            request.transport.close()  # abrupt: no terminating chunk, no [DONE]
            return response
        await response.write(chunk(WORDS[index % len(WORDS)] + " "))
        if hold and index == 0:
            await request.app[RELEASE][0].wait()
        if interval:
            await asyncio.sleep(interval)
    await response.write(chunk("", finish_reason=finish))
    if send_usage and shape != "final":
        empty = [{"index": 0, "delta": {}}] if shape == "litellm" else []
        await response.write(_sse({**head, "choices": empty, "usage": usage}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _embeddings(request: web.Request) -> web.Response:
    parsed = await _parsed(request)
    if isinstance(parsed, web.Response):
        return parsed
    await asyncio.sleep(request.app[SETTINGS].json_latency)
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
    """``python -m llmroute_sidecar.mockupstream --listen HOST:PORT [pacing options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m llmroute_sidecar.mockupstream",
        description="Mock OpenAI-compatible upstream for llmroute: /v1/chat/completions, /v1/completions "
        "(JSON and SSE), /v1/embeddings, /v1/models, /health; any other path echoes the request.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT", help="where to listen")
    parser.add_argument(
        "--first-token-latency",
        type=float,
        default=MockSettings.first_token_latency,
        metavar="SECONDS",
        help="delay before a stream's first chunk",
    )
    parser.add_argument(
        "--token-interval",
        type=float,
        default=MockSettings.token_interval,
        metavar="SECONDS",
        help="delay between a stream's chunks",
    )
    parser.add_argument(
        "--json-latency",
        type=float,
        default=MockSettings.json_latency,
        metavar="SECONDS",
        help="delay before a non-streamed answer",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=MockSettings.completion_tokens,
        metavar="N",
        help="completion tokens per answer; header X-Mock-Tokens overrides",
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    settings = MockSettings(args.first_token_latency, args.token_interval, args.tokens, args.json_latency)
    web.run_app(create_app(settings), host=host or "127.0.0.1", port=int(port), print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
