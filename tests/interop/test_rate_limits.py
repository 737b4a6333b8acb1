"""Rate limits as the ``openai`` SDK meets them: RateLimitError, Retry-After honoured, OpenAI's headers.

Each test starts its own Redis-backed sidecar (a route with tight limits) in front of the LiteLLM proxy.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.interop.stack import CLIENT_KEY, Stack, access_record, require_module, start_stack, upstream_of
from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import SidecarProcess, wait_for

require_module("openai", "pip install -e '.[test]' (openai>=2.20,<3)")

import openai  # noqa: E402

PROMPT = [{"role": "user", "content": "hello"}]
#: OpenAI's reset durations: "1s", "6m0s", "59.5s", "20ms", "1h2m3s".
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$|^(\d+)ms$")


def duration_seconds(text: str) -> float:
    match = DURATION.match(text)
    assert text and match, f"not an OpenAI reset duration: {text!r}"
    hours, minutes, seconds, millis = match.groups()
    if millis is not None:
        return int(millis) / 1000
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


@pytest.fixture
def limited(
    request: pytest.FixtureRequest,
    interop_redis: RedisServer,
    interop_secrets: Path,
    tmp_path: Path,
    sidecars: list[SidecarProcess],
) -> Callable[..., Stack]:
    """Start a sidecar in front of the LiteLLM proxy with the given ``limits``."""

    def make(limits: list[dict[str, Any]]) -> Stack:
        upstream = upstream_of("litellm", request)
        built, sidecar = start_stack(upstream, interop_redis, interop_secrets, tmp_path, limits=limits)
        sidecars.append(sidecar)
        return built

    return make


def client(stack: Stack, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.sidecar_base, api_key=CLIENT_KEY, max_retries=max_retries, timeout=20)


def test_429_is_a_rate_limit_error_with_retry_after(limited: Callable[..., Stack]) -> None:
    stack = limited([{"name": "tight", "requestsPerMinute": 1}])
    sdk = client(stack)
    sdk.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    error = caught.value
    assert error.status_code == 429 and error.type == "rate_limit_error"
    assert error.code == "requests_per_minute_exceeded" and "'tight'" in error.message
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.request_id and access_record(stack.sidecar, error.request_id)["status"] == 429


def test_sdk_waits_the_retry_after_and_then_succeeds(limited: Callable[..., Stack]) -> None:
    """One request per 2 s (burst 1): the SDK's own backoff (< 1 s) would be refused again, so a
    success after exactly one retry means it waited for the sidecar's Retry-After."""
    stack = limited([{"name": "paced", "requestsPerMinute": 30, "burst": 1}])
    sdk = client(stack, max_retries=1)
    sdk.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    started = time.monotonic()
    raw = sdk.chat.completions.with_raw_response.create(model=stack.upstream.chat_model, messages=PROMPT)
    assert raw.status_code == 200 and raw.retries_taken == 1
    assert raw.parse().choices[0].message.content
    records = wait_for(lambda: len(stack.sidecar.access_records()) >= 3 and stack.sidecar.access_records())
    assert [r["status"] for r in records] == [200, 429, 200]
    assert records[2]["request_id"] == raw.request_id
    assert time.monotonic() - started < 15  # a short window: the test stays short too


def test_request_that_can_never_fit_is_not_retried(limited: Callable[..., Stack]) -> None:
    stack = limited([{"name": "small-tpm", "tokensPerMinute": 100}])
    with pytest.raises(openai.APIStatusError) as caught:
        client(stack).chat.completions.create(
            model=stack.upstream.chat_model, messages=PROMPT, max_tokens=1000
        )
    error = caught.value
    assert 400 <= error.status_code < 500 and error.status_code not in (408, 409, 429)
    assert error.response.headers.get("x-should-retry") != "true"
    assert "small-tpm" in error.message and "100" in error.message
    assert any(int(n) >= 1000 for n in re.findall(r"\d+", error.message))  # the request's size
    access_record(stack.sidecar, error.request_id)  # its line is out (read lags) before counting
    before = len(stack.sidecar.access_records())
    with pytest.raises(openai.APIStatusError) as again:  # the SDK itself does not retry it
        client(stack, max_retries=2).chat.completions.create(
            model=stack.upstream.chat_model, messages=PROMPT, max_tokens=1000
        )
    # The last answer's line comes after any retry's (each line is written before its answer is sent).
    access_record(stack.sidecar, again.value.request_id)
    assert len(stack.sidecar.access_records()) == before + 1


def test_openai_rate_limit_headers_on_success_and_on_429(limited: Callable[..., Stack]) -> None:
    stack = limited([{"name": "rpm", "requestsPerMinute": 2}, {"name": "tpm", "tokensPerMinute": 100_000}])
    sdk = client(stack)
    raw = sdk.chat.completions.with_raw_response.create(model=stack.upstream.chat_model, messages=PROMPT)
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert 0 < duration_seconds(headers["x-ratelimit-reset-requests"]) <= 60
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert 0 <= int(headers["x-ratelimit-remaining-tokens"]) < 100_000
    assert 0 <= duration_seconds(headers["x-ratelimit-reset-tokens"]) <= 60
    assert "rpm" in headers["ratelimit-policy"] and "tpm" in headers["ratelimit-policy"]

    sdk.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model=stack.upstream.chat_model, messages=PROMPT)
    rejected = caught.value.response.headers
    retry_after = int(rejected["retry-after"])
    retry_after_ms = int(rejected["retry-after-ms"])
    assert 0 < retry_after_ms <= 60_000 and math.ceil(retry_after_ms / 1000) == retry_after
    assert rejected["x-ratelimit-remaining-requests"] == "0"
    assert abs(duration_seconds(rejected["x-ratelimit-reset-requests"]) - retry_after_ms / 1000) <= 1
    reset = re.search(r";\s*t=(\d+)", rejected["ratelimit"])
    assert reset is not None and abs(int(reset.group(1)) - retry_after) <= 1


def test_rate_limit_header_stays_when_concurrency_is_tightest(limited: Callable[..., Stack]) -> None:
    stack = limited([{"name": "conc", "concurrentRequests": 1}, {"name": "rpm", "requestsPerMinute": 1000}])
    raw = client(stack).chat.completions.with_raw_response.create(
        model=stack.upstream.chat_model, messages=PROMPT
    )
    assert raw.status_code == 200
    assert "rpm" in raw.headers["ratelimit-policy"]
    assert raw.headers.get("ratelimit"), dict(raw.headers)
