"""An OTLP receiver for tests: both protocols on loopback, every export decoded from protobuf.

``OtlpReceiver().start()`` serves OTLP/gRPC (TraceService and MetricsService servicers on
grpcio) and OTLP/HTTP with protobuf bodies (``POST /v1/traces``, ``/v1/metrics`` on a tiny
aiohttp server in its own thread). What arrives is kept as decoded
``ExportTraceServiceRequest`` / ``ExportMetricsServiceRequest`` messages; ``spans()`` and
``metrics()`` flatten them into plain dataclasses for assertions, and ``decoded_text()``
renders everything received, for grepping.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf import text_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.support.proxyproc import free_port
from tests.support.threaded import LoopThread

T = TypeVar("T")
SPAN_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_CODES = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes(items: Any) -> dict[str, Any]:
    pairs: list[KeyValue] = list(items)
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class Span:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status: str
    resource: dict[str, Any]
    protocol: str


@dataclass(frozen=True)
class Point:
    """One data point of one metric: its attributes and value (sum, or histogram count)."""

    metric: str
    unit: str
    attributes: dict[str, Any]
    value: float
    resource: dict[str, Any]


class OtlpReceiver:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._traces: list[tuple[str, trace_pb.ExportTraceServiceRequest]] = []
        self._metrics: list[tuple[str, metrics_pb.ExportMetricsServiceRequest]] = []
        self._grpc: grpc.Server | None = None
        self._loop: LoopThread | None = None
        self._runner: web.AppRunner | None = None
        self.grpc_port = free_port()
        self.http_port = free_port()

    # -- endpoints, as OTEL_EXPORTER_OTLP_ENDPOINT values --------------------------------

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self, protocol: str) -> dict[str, str]:
        endpoint = self.grpc_endpoint if protocol == "grpc" else self.http_endpoint
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), self._grpc)
        metrics_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._grpc.start()
        self._loop = LoopThread("otlp-http")
        self._runner = self._loop.run(self._start_http())
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._loop is not None and self._runner is not None:
            self._loop.run(self._runner.cleanup())
            self._loop.stop()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _start_http(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/traces", self._http_traces)
        app.router.add_post("/v1/metrics", self._http_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.http_port).start()
        return runner

    async def _http_body(self, request: web.Request) -> bytes:
        assert request.content_type == "application/x-protobuf", request.content_type
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body

    async def _http_traces(self, request: web.Request) -> web.Response:
        message = trace_pb.ExportTraceServiceRequest.FromString(await self._http_body(request))
        self.add_traces("http/protobuf", message)
        reply = trace_pb.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def _http_metrics(self, request: web.Request) -> web.Response:
        message = metrics_pb.ExportMetricsServiceRequest.FromString(await self._http_body(request))
        self.add_metrics("http/protobuf", message)
        reply = metrics_pb.ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    # -- what arrived ---------------------------------------------------------------------

    def add_traces(self, protocol: str, message: trace_pb.ExportTraceServiceRequest) -> None:
        with self._lock:
            self._traces.append((protocol, message))

    def add_metrics(self, protocol: str, message: metrics_pb.ExportMetricsServiceRequest) -> None:
        with self._lock:
            self._metrics.append((protocol, message))

    def spans(self, trace_id: str | None = None) -> list[Span]:
        with self._lock:
            exports = list(self._traces)
        return [
            span
            for protocol, message in exports
            for span in _spans(protocol, message)
            if trace_id is None or span.trace_id == trace_id
        ]

    def metrics(self) -> list[Point]:
        with self._lock:
            exports = [message for _, message in self._metrics]
        return [point for message in exports for point in _points(message)]

    def protocols(self) -> set[str]:
        with self._lock:
            return {p for p, _ in self._traces} | {p for p, _ in self._metrics}

    def decoded_text(self) -> str:
        """Every export received, decoded and printed as protobuf text (strings unescaped)."""
        with self._lock:
            messages: list[Any] = [m for _, m in self._traces] + [m for _, m in self._metrics]
        return "\n".join(text_format.MessageToString(m, as_utf8=True) for m in messages)

    def wait_for(self, probe: Callable[[], T], timeout: float = 15.0) -> T:
        """Poll `probe` until it returns something truthy (exports arrive in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.05)


def _spans(protocol: str, message: trace_pb.ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in message.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield Span(
                    name=span.name,
                    kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    attributes=attributes(span.attributes),
                    status=STATUS_CODES[span.status.code],
                    resource=resource,
                    protocol=protocol,
                )


def _points(message: metrics_pb.ExportMetricsServiceRequest) -> Iterator[Point]:
    for resource_metrics in message.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                for point in getattr(metric, kind).data_points:
                    if kind == "histogram":
                        value = float(point.count)
                    else:
                        value = float(point.as_int or point.as_double)
                    yield Point(
                        metric.name, metric.unit, attributes(point.attributes), value, resource
                    )


class _TraceServicer(trace_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.add_traces("grpc", request)
        return trace_pb.ExportTraceServiceResponse()


class _MetricsServicer(metrics_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.add_metrics("grpc", request)
        return metrics_pb.ExportMetricsServiceResponse()
