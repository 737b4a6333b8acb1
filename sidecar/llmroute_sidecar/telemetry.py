"""Optional OpenTelemetry export: a span per request and GenAI metrics, over OTLP/HTTP.

On when the route has ``spec.telemetry`` or the environment names an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._TRACES_ENDPOINT``, ``..._METRICS_ENDPOINT``); off with
``OTEL_SDK_DISABLED=true``. Off, nothing here touches a request beyond ``Gateway.telemetry is None``
and OpenTelemetry is never imported. On, the SDK (``telemetry_sdk``, imported only then) gets each
finished request in the shielded finish; its batch processor and metric reader export from their own
threads, never from the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmroute_sidecar.api.spec import Telemetry as TelemetrySpec
from llmroute_sidecar.genai import OPERATIONS, RequestTelemetry
from llmroute_sidecar.openai.requests import kind_for_path
from llmroute_sidecar.tracing import TraceContext

if TYPE_CHECKING:
    from llmroute_sidecar.exchange import Exchange
    from llmroute_sidecar.telemetry_sdk import OtelExport

log = logging.getLogger("llmroute.telemetry")

DEFAULT_SERVICE_NAME = "llmroute-sidecar"
#: At shutdown, buffered spans and metric points get this long to reach the collector.
SHUTDOWN_SECONDS = 3.0
ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)
MISSING_PACKAGES = (
    "telemetry is configured ({source}) but the OpenTelemetry packages are missing ({error}); "
    "install the sidecar with its otel extra (pip install 'llmroute[otel]') or remove {source}"
)


class TelemetryError(ValueError):
    """Telemetry is configured but cannot run (its packages are missing): a configuration error."""


@dataclass(frozen=True)
class TelemetryConfig:
    """What to export and where; None fields leave the OpenTelemetry SDK its OTEL_* defaults."""

    source: str
    """What turned telemetry on: ``spec.telemetry`` or the environment variable's name."""
    endpoint: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    sampling_ratio: float = 1.0
    service_name: str = DEFAULT_SERVICE_NAME
    traces: bool = True
    metrics: bool = True
    resource: Mapping[str, str] = field(default_factory=dict)
    """Extra resource attributes (route, pod)."""


def resolve_config(
    spec: TelemetrySpec | None, env: Mapping[str, str], resource: Mapping[str, str] | None = None
) -> TelemetryConfig | None:
    """The telemetry configuration of a route in an environment; None when telemetry is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if spec is not None:
        source = "spec.telemetry"
    else:
        named = [name for name in ENDPOINT_VARIABLES if env.get(name, "").strip()]
        if not named:
            return None
        source, everything = named[0], ENDPOINT_VARIABLES[0] in named
        # From the environment alone, a signal is on when an endpoint variable names its collector.
        spec = TelemetrySpec(
            traces=everything or ENDPOINT_VARIABLES[1] in named,
            metrics=everything or ENDPOINT_VARIABLES[2] in named,
        )
    traces = spec.traces and env.get("OTEL_TRACES_EXPORTER", "").strip().lower() != "none"
    metrics = spec.metrics and env.get("OTEL_METRICS_EXPORTER", "").strip().lower() != "none"
    if not traces and not metrics:
        return None
    ratio = spec.sampling_ratio if spec.sampling_ratio is not None else _env_ratio(env)
    return TelemetryConfig(
        source=source,
        endpoint=spec.endpoint.rstrip("/") if spec.endpoint else None,
        headers=dict(spec.headers),
        sampling_ratio=ratio,
        service_name=spec.service_name or env.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME,
        traces=traces,
        metrics=metrics,
        resource=dict(resource or {}),
    )


def _env_ratio(env: Mapping[str, str]) -> float:
    """``OTEL_TRACES_SAMPLER_ARG`` when ``OTEL_TRACES_SAMPLER`` is a ratio sampler, else 1."""
    if "traceidratio" not in env.get("OTEL_TRACES_SAMPLER", ""):
        return 1.0
    try:
        return min(1.0, max(0.0, float(env.get("OTEL_TRACES_SAMPLER_ARG", "1"))))
    except ValueError:
        return 1.0


class Telemetry:
    """The running export: hands each request a ``RequestTelemetry`` and records it when it finishes."""

    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self.sampling_ratio = config.sampling_ratio if config.traces else 1.0
        """Sampling of new traces; 1 without traces (the flag sent upstream stays as it always was)."""
        try:
            from llmroute_sidecar.telemetry_sdk import OtelExport
        except ImportError as error:
            raise TelemetryError(MISSING_PACKAGES.format(source=config.source, error=error)) from None
        self._export: OtelExport = OtelExport(config)

    def begin(self, trace: TraceContext, ex: Exchange, upstream: str) -> RequestTelemetry:
        """The record a request fills in (``Exchange.telemetry``); the operation known from the path."""
        operation = OPERATIONS.get(kind_for_path(ex.path) or "")
        return RequestTelemetry(self, trace, ex.headers.get("tracestate"), upstream, operation)

    def record(self, ex: Exchange, duration: float) -> None:
        """The finished request's span and metric points; never raises into the request path."""
        rt = ex.telemetry
        if rt is None:
            return
        try:
            self._export.record(ex, rt, duration)
        except Exception:
            log.exception("recording telemetry failed", extra={"fields": {"request_id": ex.request_id}})

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Flush what is buffered and stop the exporters, waiting at most ``timeout`` seconds (an
        unreachable collector is retried by the exporters for longer); True when it finished."""
        worker = threading.Thread(
            target=self._export.shutdown, args=(timeout,), name="telemetry-shutdown", daemon=True
        )
        worker.start()
        worker.join(timeout)
        return not worker.is_alive()

    def retire(self) -> None:
        """Shut down from a thread of its own (a reload replaced it): the event loop never waits."""
        threading.Thread(target=self.shutdown, name="telemetry-retire", daemon=True).start()


def start_telemetry(
    spec: TelemetrySpec | None, env: Mapping[str, str], resource: Mapping[str, str] | None = None
) -> Telemetry | None:
    """A running ``Telemetry`` when configured, else None; ``TelemetryError`` without the packages."""
    config = resolve_config(spec, env, resource)
    if config is None:
        return None
    telemetry = Telemetry(config)
    log.info(
        "telemetry on",
        extra={
            "fields": {
                "source": config.source,
                "endpoint": config.endpoint or "OTEL_* environment",
                "traces": config.traces,
                "metrics": config.metrics,
                "sampling_ratio": config.sampling_ratio,
                "service_name": config.service_name,
            }
        },
    )
    return telemetry
