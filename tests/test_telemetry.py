"""OpenTelemetry export end to end: real sidecar processes, the mock upstream, and an OTLP receiver.

The receiver is ``tests/support/otlp_receiver.py`` run as its own process — an aiohttp server that
decodes OTLP/HTTP protobuf (``ExportTraceServiceRequest`` / ``ExportMetricsServiceRequest``) with the
``opentelemetry-proto`` package — because the OpenTelemetry Collector is a Go binary that no PyPI or
Debian package provides. Everything is on loopback; waits poll with deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.sidecar_procs import (
    STARTUP_SECONDS,
    ManagedProcess,
    MockUpstream,
    SidecarProcess,
    free_port,
    http_get,
    start,
    wait_for,
)
from tests.test_sidecar_proxy import CHAT, chat_body, mock_requests, write_route

ROOT = Path(__file__).resolve().parent.parent
#: Export quickly: spans within 50 ms, metric points every 200 ms.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "200"}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class OtlpReceiver(ManagedProcess):
    """``python -m tests.support.otlp_receiver`` on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "tests.support.otlp_receiver", "--listen", f"127.0.0.1:{self.port}"]
        super().__init__(argv, cwd=ROOT)
        wait_for(lambda: http_get(f"{self.url}/health")[0] == 200 or not self.alive, STARTUP_SECONDS)
        if not self.alive:
            raise RuntimeError(f"OTLP receiver failed to start:\n{self.output()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self) -> dict[str, list[dict[str, Any]]]:
        status, body = http_get(f"{self.url}/received")
        assert status == 200, body
        result: dict[str, list[dict[str, Any]]] = json.loads(body)
        return result

    def spans(self, **attributes: Any) -> list[dict[str, Any]]:
        return [
            span
            for span in self.received()["spans"]
            if all(span["attributes"].get(k) == v for k, v in attributes.items())
        ]

    def span(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The span of the request with this id, once it arrived."""
        found: list[dict[str, Any]] = wait_for(
            lambda: self.spans(**{"llmroute.request_id": request_id}), timeout, what=f"span of {request_id}"
        )
        assert len(found) == 1, found
        return found[0]

    def latest_points(self, name: str) -> list[dict[str, Any]]:
        """The newest point of each attribute set of metric ``name`` (points are cumulative)."""
        latest: dict[str, dict[str, Any]] = {}
        for point in self.received()["metrics"]:
            if point["name"] == name:
                latest[json.dumps(point["attributes"], sort_keys=True)] = point
        return list(latest.values())


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    process = OtlpReceiver()
    try:
        yield process
    finally:
        process.stop()


def upstream_traceparent(mock: MockUpstream, key: str) -> list[str]:
    (seen,) = mock_requests(mock, key)
    parts: list[str] = seen["headers"]["traceparent"].split("-")
    return parts


async def test_spans_and_genai_metrics_for_json_stream_and_limited_requests(
    tmp_path: Path, mock: MockUpstream, receiver: OtlpReceiver, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        limits=[{"name": "per-route", "key": "route", "requestsPerMinute": 2}],
        telemetry={"endpoint": receiver.url, "headers": {"X-Scope": "team-a"}, "serviceName": "llm-gw"},
    )
    sidecar = start(sidecars, route, env=FAST_EXPORT)
    async with aiohttp.ClientSession() as session:
        headers = {
            "X-Request-ID": "json-1",
            "X-Mock-Key": "otel-json",
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
            "tracestate": "vendor=abc",
        }
        async with session.post(sidecar.url + CHAT, json=chat_body(), headers=headers) as response:
            assert response.status == 200
            json_usage = (await response.json())["usage"]
        body = chat_body(stream=True, stream_options={"include_usage": True})
        headers = {"X-Request-ID": "sse-1", "X-Mock-Key": "otel-sse", "X-Mock-Tokens": "5"}
        async with session.post(sidecar.url + CHAT, json=body, headers=headers) as response:
            assert response.status == 200
            events = (await response.text()).split("\n\n")
        chunks = [json.loads(event[6:]) for event in events if event.startswith("data: {")]
        (stream_usage,) = [c["usage"] for c in chunks if c.get("usage")]
        async with session.post(sidecar.url + CHAT, json=chat_body(), headers={"X-Request-ID": "lim-1"}) as r:
            assert r.status == 429
        async with session.post(sidecar.url + CHAT, data=b"{", headers={"X-Request-ID": "bad-1"}) as r:
            assert r.status == 400

    # A caller's trace continues: same trace id, the caller's span as parent, and the span id the
    # upstream received as its parent is this span's own, so upstream spans nest under it.
    span = receiver.span("json-1")
    _, trace_id, upstream_parent, flags = upstream_traceparent(mock, "otel-json")
    assert (span["trace_id"], span["parent_span_id"]) == (CALLER_TRACE, CALLER_SPAN)
    assert (trace_id, upstream_parent, flags) == (CALLER_TRACE, span["span_id"], "01")
    assert span["trace_state"] == "vendor=abc"
    assert span["name"] == "chat m" and span["kind"] == 2  # SPAN_KIND_SERVER
    assert span["resource"]["service.name"] == "llm-gw"
    assert span["resource"]["llmroute.route"] == "tests/t"
    attributes = span["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "m"
    assert attributes["gen_ai.usage.input_tokens"] == json_usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == json_usage["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["llmroute.quota.decision"] == "admitted"
    assert attributes["llmroute.attempts"] == 1
    assert attributes["llmroute.outcome"] == "ok"
    assert attributes["llmroute.upstream"] == mock.url
    assert attributes["http.response.status_code"] == 200
    assert attributes["server.port"] == mock.port
    assert "error.type" not in attributes and "llmroute.quota.limit" not in attributes

    # A request without traceparent starts a trace: the span is its root, upstream nests under it.
    stream_span = receiver.span("sse-1")
    _, trace_id, upstream_parent, _ = upstream_traceparent(mock, "otel-sse")
    assert stream_span["parent_span_id"] == ""
    assert (stream_span["trace_id"], stream_span["span_id"]) == (trace_id, upstream_parent)
    stream_attributes = stream_span["attributes"]
    assert stream_attributes["llmroute.stream"] is True
    assert stream_attributes["gen_ai.usage.input_tokens"] == stream_usage["prompt_tokens"]
    assert stream_attributes["gen_ai.usage.output_tokens"] == stream_usage["completion_tokens"] == 5
    assert stream_attributes["gen_ai.response.finish_reasons"] == ["stop"]

    limited = receiver.span("lim-1")["attributes"]
    assert limited["llmroute.quota.decision"] == "limited"
    assert limited["llmroute.quota.limit"] == "per-route"
    assert limited["http.response.status_code"] == 429
    assert limited["error.type"] == "quota_rejected"
    assert limited["llmroute.attempts"] == 0
    assert "gen_ai.usage.input_tokens" not in limited

    # A body that fails validation is still a chat operation, ended in an error before admission.
    bad = receiver.span("bad-1")
    assert bad["name"] == "chat"
    assert bad["attributes"]["error.type"] == "validation_error"
    assert bad["attributes"]["llmroute.quota.decision"] == "none"

    # The spec's headers reach the collector with every export.
    exports = receiver.received()["headers"]
    assert exports and all(h.get("x-scope") == "team-a" for h in exports)

    # GenAI metrics: token usage per type equals the upstream's usage, summed over both requests.
    def usage_points() -> dict[str, dict[str, Any]]:
        points = receiver.latest_points("gen_ai.client.token.usage")
        return {p["attributes"]["gen_ai.token.type"]: p for p in points if p["count"] == 2}

    points = wait_for(lambda: len(usage_points()) == 2 and usage_points(), 10, what="token usage points")
    assert points["input"]["sum"] == json_usage["prompt_tokens"] + stream_usage["prompt_tokens"]
    assert points["output"]["sum"] == json_usage["completion_tokens"] + stream_usage["completion_tokens"]
    assert points["input"]["unit"] == "{token}"
    assert points["input"]["bounds"][:3] == [1, 4, 16]
    assert points["input"]["attributes"]["gen_ai.request.model"] == "m"

    def durations() -> dict[str, int]:
        points = receiver.latest_points("gen_ai.server.request.duration")
        return {p["attributes"].get("error.type", "ok"): p["count"] for p in points}

    expected = {"ok": 2, "quota_rejected": 1, "validation_error": 1}
    wait_for(lambda: durations() == expected, 10, what="request duration points")
    (ttft,) = receiver.latest_points("gen_ai.server.time_to_first_token")
    assert ttft["count"] == 1 and ttft["unit"] == "s" and 0 < ttft["sum"] < 10
    (tpot,) = receiver.latest_points("gen_ai.server.time_per_output_token")
    assert tpot["count"] == 1 and tpot["sum"] >= 0


async def test_environment_turns_it_on_and_a_ratio_of_zero_keeps_only_callers_sampled_traces(
    tmp_path: Path, mock: MockUpstream, receiver: OtlpReceiver, sidecars: list[SidecarProcess]
) -> None:
    env = {
        **FAST_EXPORT,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
        "OTEL_SERVICE_NAME": "from-env",
    }
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url), env=env)
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-ID": "root-1", "X-Mock-Key": "otel-root"}
        async with session.post(sidecar.url + CHAT, json=chat_body(), headers=headers) as response:
            assert response.status == 200
        caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        headers = {"X-Request-ID": "caller-1", "traceparent": caller}
        async with session.post(sidecar.url + CHAT, json=chat_body(), headers=headers) as response:
            assert response.status == 200
    # The unsampled root tells the upstream so (flags 00); the caller's sampled trace is exported.
    assert upstream_traceparent(mock, "otel-root")[3] == "00"
    span = receiver.span("caller-1")
    assert span["resource"]["service.name"] == "from-env"
    # Spans leave in the order they end: the earlier, unsampled request was never exported.
    assert receiver.spans(**{"llmroute.request_id": "root-1"}) == []
    # Metrics do not depend on sampling: both requests are counted.
    wait_for(
        lambda: [p["count"] for p in receiver.latest_points("gen_ai.server.request.duration")] == [2],
        10,
        what="request duration points",
    )


def test_configured_without_the_packages_is_a_configuration_error(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    """Packages hidden by a shadowing ``opentelemetry`` that fails to import: exit 2, one clear line;
    the same sidecar without telemetry configured starts and serves (nothing imports them then)."""
    shadow = tmp_path / "shadow"
    (shadow / "opentelemetry").mkdir(parents=True)
    (shadow / "opentelemetry" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)])}
    configured = write_route(tmp_path / "on.yaml", mock.url, telemetry={"endpoint": "http://127.0.0.1:9"})
    process = start(sidecars, configured, env=env, wait_ready=False)
    assert process.wait_exit(STARTUP_SECONDS) == 2
    output = process.output()
    assert "telemetry is configured (spec.telemetry) but the OpenTelemetry packages are missing" in output
    assert "llmroute[otel]" in output and "Traceback" not in output

    plain = start(sidecars, write_route(tmp_path / "off.yaml", mock.url), env=env)
    request = urllib.request.Request(plain.url + CHAT, json.dumps(chat_body()).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read())["usage"]["completion_tokens"] > 0


async def test_a_route_edit_turns_telemetry_on_without_a_restart(
    tmp_path: Path, mock: MockUpstream, receiver: OtlpReceiver, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url)
    sidecar = start(sidecars, route, env=FAST_EXPORT)
    async with aiohttp.ClientSession() as session:
        before = {"X-Request-ID": "before"}
        async with session.post(sidecar.url + CHAT, json=chat_body(), headers=before) as r:
            assert r.status == 200
        write_route(route, mock.url, telemetry={"endpoint": receiver.url})
        await sidecar.record(lambda r: r.get("msg") == "configuration reloaded")
        async with session.post(sidecar.url + CHAT, json=chat_body(), headers={"X-Request-ID": "after"}) as r:
            assert r.status == 200
    assert receiver.span("after")["attributes"]["gen_ai.operation.name"] == "chat"
    assert receiver.spans(**{"llmroute.request_id": "before"}) == []


def test_an_unreachable_collector_never_fails_requests_and_delays_exit_by_seconds_at_most(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, telemetry={"endpoint": dead}))
    for _ in range(3):
        request = urllib.request.Request(sidecar.url + CHAT, json.dumps(chat_body()).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    started = time.monotonic()
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait_exit(30) == 0
    assert time.monotonic() - started < 3.0 + 3.0  # the telemetry flush bound, plus slack for 2 cores
    assert any(r.get("msg", "").startswith("telemetry not flushed") for r in sidecar.records())
