"""A small OTLP/HTTP receiver for tests: ``python -m tests.support.otlp_receiver --listen HOST:PORT``.

No OpenTelemetry Collector package installs from PyPI or Debian (it is a Go binary), so the tests
run this instead, as a separate process: it accepts ``POST /v1/traces`` and ``POST /v1/metrics``
with protobuf bodies (gzip or plain), decodes ``ExportTraceServiceRequest`` and
``ExportMetricsServiceRequest`` with the ``opentelemetry-proto`` messages, answers with the empty
success response, and serves what it received as JSON at ``GET /received`` (spans, metric points,
the export requests' headers). ``GET /health`` answers 200.
"""

from __future__ import annotations

import argparse
import gzip
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

RECEIVED = web.AppKey("received", dict)


def value_of(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as plain JSON."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind) if kind else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    items: list[KeyValue] = list(pairs)
    return {pair.key: value_of(pair.value) for pair in items}


def _body(request_bytes: bytes, encoding: str) -> bytes:
    return gzip.decompress(request_bytes) if encoding == "gzip" else request_bytes


async def traces(request: web.Request) -> web.Response:
    message = ExportTraceServiceRequest()
    message.ParseFromString(_body(await request.read(), request.headers.get("Content-Encoding", "")))
    received = request.app[RECEIVED]
    received["headers"].append({k.lower(): v for k, v in request.headers.items()})
    for resource_spans in message.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                received["spans"].append(
                    {
                        "name": span.name,
                        "kind": span.kind,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "trace_state": span.trace_state,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "status": span.status.code,
                        "attributes": attributes_of(span.attributes),
                        "resource": resource,
                        "scope": scope_spans.scope.name,
                    }
                )
    return _protobuf(ExportTraceServiceResponse().SerializeToString())


async def metrics(request: web.Request) -> web.Response:
    message = ExportMetricsServiceRequest()
    message.ParseFromString(_body(await request.read(), request.headers.get("Content-Encoding", "")))
    received = request.app[RECEIVED]
    received["headers"].append({k.lower(): v for k, v in request.headers.items()})
    for resource_metrics in message.resource_metrics:
        resource = attributes_of(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                for point in getattr(metric, kind).data_points if kind else ():
                    entry: dict[str, Any] = {
                        "name": metric.name,
                        "unit": metric.unit,
                        "type": kind,
                        "attributes": attributes_of(point.attributes),
                        "resource": resource,
                    }
                    if kind == "histogram":
                        entry.update(
                            count=point.count,
                            sum=point.sum,
                            bounds=list(point.explicit_bounds),
                            temporality=metric.histogram.aggregation_temporality,
                        )
                    received["metrics"].append(entry)
    return _protobuf(ExportMetricsServiceResponse().SerializeToString())


def _protobuf(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/x-protobuf")


async def received_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[RECEIVED])


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RECEIVED] = {"spans": [], "metrics": [], "headers": []}
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    app.router.add_get("/received", received_json)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    web.run_app(make_app(), host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
