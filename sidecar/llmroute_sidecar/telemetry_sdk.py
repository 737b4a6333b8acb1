"""The OpenTelemetry SDK side of telemetry: providers, OTLP/HTTP exporters, the GenAI instruments.

The only module that imports OpenTelemetry, and only ``telemetry.Telemetry`` imports it, when
telemetry is on. Spans are made after the fact, in the shielded finish, with the ids the request path
already sent upstream (``traceparent``): the span's trace id is the request's, its span id the one the
upstream saw as its parent, so upstream spans nest under it. Providers are private (never the global
ones), so a reload can replace them.
"""

from __future__ import annotations

import random
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.genai import RequestTelemetry, metric_attributes, span_attributes, span_name
from llmroute_sidecar.telemetry import TelemetryConfig

#: Bucket boundaries the GenAI semantic conventions recommend for each histogram.
TOKEN_BUCKETS = [4.0**i for i in range(14)]  # 1, 4, 16, ... 67108864
DURATION_BUCKETS = [0.01 * 2**i for i in range(14)]  # 0.01 ... 81.92
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
SCOPE = "llmroute_sidecar"


class PresetIds(IdGenerator):
    """Ids for the next span: the request's own (set right before ``start_span``), else random."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        value, self.span_id = self.span_id, 0
        return value or random.getrandbits(64)

    def generate_trace_id(self) -> int:
        value, self.trace_id = self.trace_id, 0
        return value or random.getrandbits(128)


class OtelExport:
    """Tracer and meter providers exporting over OTLP/HTTP (protobuf)."""

    def __init__(
        self,
        config: TelemetryConfig,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
    ) -> None:
        """OTLP/HTTP exporters per ``config``; ``span_exporter``/``metric_reader`` replace them (tests)."""
        attributes = {"service.name": config.service_name, **config.resource}
        resource = Resource.create(attributes)
        headers = dict(config.headers) or None
        self._ids = PresetIds()
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        self._tracer: trace.Tracer | None = None
        if config.traces:
            endpoint = f"{config.endpoint}/v1/traces" if config.endpoint else None
            self._tracer_provider = TracerProvider(
                resource=resource,
                sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio)),
                id_generator=self._ids,
                shutdown_on_exit=False,  # Telemetry.shutdown does it, bounded
            )
            exporter = span_exporter or OTLPSpanExporter(endpoint=endpoint, headers=headers)
            self._tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
            self._tracer = self._tracer_provider.get_tracer(SCOPE)
        if config.metrics:
            endpoint = f"{config.endpoint}/v1/metrics" if config.endpoint else None
            reader = metric_reader or PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=endpoint, headers=headers)
            )
            self._meter_provider = MeterProvider(
                resource=resource, metric_readers=[reader], shutdown_on_exit=False
            )
            meter = self._meter_provider.get_meter(SCOPE)
            self._token_usage = meter.create_histogram(
                "gen_ai.client.token.usage",
                "{token}",
                "Input and output tokens used, as the upstream reported them",
                explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
            )
            self._duration = meter.create_histogram(
                "gen_ai.server.request.duration",
                "s",
                "Request duration through the sidecar, to the last byte",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
            self._ttft = meter.create_histogram(
                "gen_ai.server.time_to_first_token",
                "s",
                "Time to the first response byte of successful streamed responses",
                explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
            )
            self._tpot = meter.create_histogram(
                "gen_ai.server.time_per_output_token",
                "s",
                "Time per output token after the first, of successful streamed responses",
                explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
            )

    def record(self, ex: Exchange, rt: RequestTelemetry, duration: float) -> None:
        """The finished request's span (when sampled) and its GenAI metric points."""
        if self._tracer is not None:
            self._span(ex, rt, duration)
        if self._meter_provider is not None and rt.operation is not None:
            self._metrics(ex, rt, duration)

    def _span(self, ex: Exchange, rt: RequestTelemetry, duration: float) -> None:
        assert self._tracer is not None
        context = None
        trace_context = rt.trace
        if trace_context.caller_span is not None:
            caller = SpanContext(
                int(trace_context.trace_id, 16),
                int(trace_context.caller_span, 16),
                is_remote=True,
                trace_flags=TraceFlags(int(trace_context.flags, 16)),
                trace_state=TraceState.from_header([rt.tracestate]) if rt.tracestate else None,
            )
            context = trace.set_span_in_context(NonRecordingSpan(caller))
        end = time.time_ns()
        # Single-threaded: nothing else starts a span between presetting the ids and using them.
        self._ids.trace_id = int(trace_context.trace_id, 16)
        self._ids.span_id = int(trace_context.parent_id, 16)
        try:
            span = self._tracer.start_span(
                span_name(ex, rt),
                context,
                SpanKind.SERVER,
                span_attributes(ex, rt),
                start_time=end - int(duration * 1e9),
            )
        finally:
            self._ids.trace_id = self._ids.span_id = 0
        if ex.status >= 500:
            span.set_status(Status(StatusCode.ERROR, ex.error or ex.outcome))
        span.end(end_time=end)

    def _metrics(self, ex: Exchange, rt: RequestTelemetry, duration: float) -> None:
        attributes = metric_attributes(ex, rt)
        self._duration.record(duration, attributes)
        if ex.tokens_actual is not None:
            output = max(0, ex.completion_tokens)
            self._token_usage.record(ex.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
            self._token_usage.record(output, {**attributes, "gen_ai.token.type": "output"})
        if ex.outcome != "ok" or not ex.stream or ex.first_byte is None:
            return
        first = ex.first_byte - ex.started
        self._ttft.record(first, attributes)
        if ex.tokens_actual is not None and ex.completion_tokens > 1:
            self._tpot.record(max(0.0, duration - first) / (ex.completion_tokens - 1), attributes)

    def shutdown(self, timeout: float) -> None:
        """Flush and stop both providers within ``timeout`` seconds."""
        millis = int(timeout * 1000)
        if self._tracer_provider is not None:
            self._tracer_provider.force_flush(millis)
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown(timeout_millis=millis)
