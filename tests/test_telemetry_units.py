"""Telemetry pieces in-process: configuration, sampling agreement, what the request path gathers.

The span and metric tests use the OpenTelemetry SDK's in-memory span exporter and metric reader in
place of OTLP (``tests/test_telemetry.py`` covers the real export to a receiver process).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from llmroute_sidecar.api.spec import Telemetry as TelemetrySpec
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.genai import RequestTelemetry, span_attributes
from llmroute_sidecar.openai.requests import parse_request
from llmroute_sidecar.telemetry import DEFAULT_SERVICE_NAME, TelemetryConfig, resolve_config
from llmroute_sidecar.telemetry_sdk import OtelExport
from llmroute_sidecar.tracing import child_trace

CHAT_M = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


# -- configuration -------------------------------------------------------------------------------


def test_off_unless_the_spec_or_an_otlp_endpoint_variable_turns_it_on() -> None:
    assert resolve_config(None, {}) is None
    assert resolve_config(None, {"OTEL_SERVICE_NAME": "x"}) is None
    from_env = resolve_config(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert from_env is not None and from_env.source == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    assert from_env.endpoint is None and from_env.service_name == DEFAULT_SERVICE_NAME
    assert (from_env.traces, from_env.metrics) == (True, False)  # only the signal that has a collector
    both = resolve_config(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert both is not None and (both.traces, both.metrics) == (True, True)
    assert resolve_config(TelemetrySpec(), {"OTEL_SDK_DISABLED": "true"}) is None
    both_off = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    assert resolve_config(TelemetrySpec(), both_off) is None


def test_spec_fields_win_over_the_environment() -> None:
    spec = TelemetrySpec.model_validate(
        {"endpoint": "http://collector:4318/", "samplingRatio": 0.25, "serviceName": "gw", "metrics": False}
    )
    env = {
        "OTEL_SERVICE_NAME": "env",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
    }
    config = resolve_config(spec, env)
    assert config is not None
    assert (config.endpoint, config.sampling_ratio) == ("http://collector:4318", 0.25)
    assert config.service_name == "gw"
    assert (config.traces, config.metrics, config.source) == (True, False, "spec.telemetry")
    unset = resolve_config(TelemetrySpec(), env)
    assert unset is not None and (unset.sampling_ratio, unset.service_name) == (0.5, "env")


def test_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"sampling_?[rR]atio"):
        TelemetrySpec.model_validate({"samplingRatio": 1.5})
    with pytest.raises(ValueError, match="headers"):
        TelemetrySpec.model_validate({"headers": {"bad header": "x"}})


# -- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75])
def test_new_traces_are_sampled_as_the_sdk_samples_them(ratio: float) -> None:
    """The flag sent upstream for a new trace is the SDK sampler's decision for that trace id."""
    sampler = TraceIdRatioBased(ratio)
    sampled = 0
    for _ in range(2000):
        trace = child_trace(None, ratio)
        decision = sampler.should_sample(None, int(trace.trace_id, 16), "s").decision
        assert trace.sampled == (decision is Decision.RECORD_AND_SAMPLE)
        sampled += trace.sampled
    assert abs(sampled / 2000 - ratio) < 0.05


def test_a_callers_flags_are_kept_whatever_the_ratio() -> None:
    unsampled = child_trace(f"00-{'a' * 32}-{'b' * 16}-00", 1.0)
    sampled = child_trace(f"00-{'a' * 32}-{'b' * 16}-01", 0.0)
    assert (unsampled.flags, sampled.flags) == ("00", "01")
    assert sampled.caller_span == "b" * 16 and sampled.parent_id != "b" * 16


# -- what the request path gathers ---------------------------------------------------------------


class _Discard:
    def record(self, ex: Exchange, duration: float) -> None:
        pass


def _record(incoming: str | None = None) -> RequestTelemetry:
    return RequestTelemetry(_Discard(), child_trace(incoming), None, "http://upstream.example:8000")


def test_chat_chunks_give_model_id_and_finish_reasons_per_choice() -> None:
    rt = _record()
    raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}'
    rt.request(parse_request("/v1/chat/completions", raw))
    assert (rt.operation, rt.request_model, rt.max_tokens) == ("chat", "gpt-4o", 7)
    rt.observe({"id": "c-1", "model": "gpt-4o-2024", "choices": [{"index": 1, "delta": {"content": "x"}}]})
    rt.observe({"id": "c-1", "choices": [{"index": 1, "finish_reason": "length"}]})
    rt.observe({"id": "c-1", "choices": [{"index": 0, "finish_reason": "stop"}]})
    rt.observe({"id": "c-1", "choices": [], "usage": {"prompt_tokens": 3}})
    ex = Exchange("r", "t", "ns/route", "POST", "/v1/chat/completions", 0.0, status=200)
    ex.tokens_actual, ex.prompt_tokens, ex.completion_tokens = 10, 3, 7
    attributes = span_attributes(ex, rt)
    assert attributes["gen_ai.response.model"] == "gpt-4o-2024"
    assert attributes["gen_ai.response.id"] == "c-1"
    assert attributes["gen_ai.response.finish_reasons"] == ("stop", "length")
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (3, 7)
    assert (attributes["server.address"], attributes["server.port"]) == ("upstream.example", 8000)


def test_responses_events_give_the_model_and_why_they_ended() -> None:
    done = _record()
    response = {"id": "r-1", "model": "o4", "status": "completed"}
    done.observe({"type": "response.completed", "response": response})
    assert (done.response_model, done.response_id, done.finish_reasons) == ("o4", "r-1", {0: "stop"})
    cut = _record()
    cut.observe(
        {
            "object": "response",
            "model": "o4",
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
        }
    )
    assert cut.finish_reasons == {0: "max_output_tokens"}


def test_a_pass_through_request_has_no_genai_attributes() -> None:
    ex = Exchange("r", "t", "ns/route", "GET", "/v1/models", 0.0, status=200)
    attributes = span_attributes(ex, _record())
    assert not any(key.startswith("gen_ai.") for key in attributes)
    assert attributes["llmroute.quota.decision"] == "none"


# -- spans and metrics through the SDK (in-memory exporter and reader) ---------------------------


@pytest.fixture
def export() -> Any:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    config = TelemetryConfig(source="test", service_name="unit", resource={"llmroute.route": "ns/route"})
    otel = OtelExport(config, span_exporter=spans, metric_reader=reader)
    yield otel, spans, reader
    otel.shutdown(1.0)


def _finished(rt: RequestTelemetry, status: int = 200, outcome: str = "ok") -> Exchange:
    ex = Exchange("req-9", rt.trace.trace_id, "ns/route", "POST", "/v1/chat/completions", time.monotonic())
    ex.status, ex.outcome, ex.attempts, ex.stream = status, outcome, 1, True
    ex.first_byte = ex.started + 0.05
    ex.tokens_actual, ex.prompt_tokens, ex.completion_tokens = 12, 4, 8
    rt.request(parse_request("/v1/chat/completions", CHAT_M))
    ex.telemetry = rt
    return ex


def test_the_span_carries_the_ids_sent_upstream(export: Any) -> None:
    otel, spans, _ = export
    rt = _record(f"00-{'1' * 32}-{'2' * 16}-01")
    ex = _finished(rt)
    otel.record(ex, rt, 0.25)
    otel.shutdown(1.0)  # flushes the batch processor
    (span,) = spans.get_finished_spans()
    assert span.context.trace_id == int("1" * 32, 16)
    assert span.context.span_id == int(rt.trace.parent_id, 16)
    assert span.parent is not None and span.parent.span_id == int("2" * 16, 16)
    assert span.kind is SpanKind.SERVER and span.name == "chat m"
    assert span.end_time - span.start_time == pytest.approx(0.25e9, rel=0.01)
    assert span.resource.attributes["service.name"] == "unit"
    assert span.status.status_code is StatusCode.UNSET


def test_an_unsampled_trace_makes_no_span_but_counts_in_metrics(export: Any) -> None:
    otel, spans, reader = export
    rt = _record(f"00-{'1' * 32}-{'2' * 16}-00")
    otel.record(_finished(rt, 502, "upstream_error"), rt, 0.5)
    assert spans.get_finished_spans() == ()
    data = reader.get_metrics_data()
    points: dict[str, list[HistogramDataPoint]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points[metric.name] = list(metric.data.data_points)  # type: ignore[arg-type]
    (duration,) = points["gen_ai.server.request.duration"]
    assert duration.attributes is not None and duration.attributes["error.type"] == "upstream_error"
    assert sorted(p.sum for p in points["gen_ai.client.token.usage"]) == [4, 8]
    # Failed requests have no time-to-first-token or time-per-output-token points.
    assert "gen_ai.server.time_to_first_token" not in points


def test_a_5xx_span_is_an_error(export: Any) -> None:
    otel, spans, _ = export
    rt = _record(f"00-{'1' * 32}-{'2' * 16}-01")
    ex = _finished(rt, 502, "upstream_error")
    ex.error = "upstream_error"
    otel.record(ex, rt, 0.1)
    otel.shutdown(1.0)
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "upstream_error"
