"""OpenTelemetry set-up from the standard OTEL_* variables; no endpoint means no SDK at all."""

from __future__ import annotations

import asyncio
import logging
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy import __version__
from proxy.metrics import NULL_METRICS, Metrics, Watched

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

log = logging.getLogger(__name__)
PROPAGATOR = TraceContextTextMapPropagator()
SERVICE_NAME = "gcs-iap-proxy"
METADATA_TIMEOUT = 2.0
_METADATA_HEADERS = {"Metadata-Flavor": "Google"}


def _signal_configured(env: Mapping[str, str], signal: str) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def traces_configured(env: Mapping[str, str] = os.environ) -> bool:
    return _signal_configured(env, "TRACES")


def metrics_configured(env: Mapping[str, str] = os.environ) -> bool:
    return _signal_configured(env, "METRICS")


def exporter_configured(env: Mapping[str, str] = os.environ) -> bool:
    return traces_configured(env) or metrics_configured(env)


def protocol(env: Mapping[str, str], signal: str) -> str:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _span_exporter(env: Mapping[str, str]) -> Any:
    # Exporters are imported only when configured: grpc alone costs tens of MiB.
    # They read their endpoint, headers, timeout and compression from OTEL_* themselves.
    # Both serialize with proxy.otlp.encode_spans, not the stock encoder: see proxy.otlp.
    if protocol(env, "TRACES") == "grpc":
        return _grpc_span_exporter()
    return _http_span_exporter()


def _grpc_span_exporter() -> Any:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from proxy import otlp

    class GrpcSpanExporter(OTLPSpanExporter):
        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            # grpc serializes the message again, but parsing and serializing are upb's C.
            request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
                otlp.encode_spans(data)
            )
            return request

    return GrpcSpanExporter()


class _Encoded:
    """What the stock http exporter uses of `encode_spans(spans)`: its serialization."""

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        from proxy import otlp

        self._data = otlp.encode_spans(spans)

    def SerializePartialToString(self) -> bytes:
        return self._data


def _http_span_exporter() -> Any:
    from opentelemetry.exporter.otlp.proto.http import trace_exporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    # The stock export() serializes with `encode_spans(spans).SerializePartialToString()`, a
    # module global, and goes on with private helpers of the installed version (internal
    # metrics, size limit, the transport). Rather than copy those steps, or replace the global
    # for every exporter in the process, the subclass runs that very code object with a copy
    # of the module's globals in which encode_spans is _Encoded. Should a release stop
    # calling encode_spans (tests/test_otlp_encode.py would fail), we keep the stock exporter.
    stock = trace_exporter.OTLPSpanExporter.export
    if "encode_spans" not in stock.__code__.co_names or stock.__closure__:
        log.warning("telemetry: unexpected OTLP http exporter, spans use the stock encoder")
        return trace_exporter.OTLPSpanExporter()
    names = {**vars(trace_exporter), "encode_spans": _Encoded}
    fast_export = types.FunctionType(stock.__code__, names, "export", stock.__defaults__)

    class HttpSpanExporter(trace_exporter.OTLPSpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            result: SpanExportResult = fast_export(self, spans)
            return result

    return HttpSpanExporter()


def _metric_exporter(env: Mapping[str, str]) -> Any:
    if protocol(env, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
    return OTLPMetricExporter()


@dataclass(frozen=True)
class Platform:
    """Where the sidecar runs, as far as the environment and the metadata server tell."""

    project: str | None = None
    region: str | None = None
    instance: str | None = None


def metadata_base(env: Mapping[str, str]) -> str:
    host = env.get("GCE_METADATA_HOST") or env.get("GCE_METADATA_IP") or "metadata.google.internal"
    return f"http://{host}/computeMetadata/v1/"


async def _metadata_value(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url, headers=_METADATA_HEADERS, allow_redirects=False) as answer:
            if answer.status != 200 or answer.headers.get("Metadata-Flavor") != "Google":
                return None
            return (await answer.text()).strip() or None
    except (aiohttp.ClientError, OSError, UnicodeDecodeError):
        return None


async def detect_platform(env: Mapping[str, str], *, full: bool) -> Platform:
    """Project (and with `full`, region and instance) from the metadata server, bounded in time.

    Runs as a background task: the listeners are up before it finishes, and off Google
    Cloud it gives up after METADATA_TIMEOUT without delaying anything but telemetry.
    """
    base = metadata_base(env)
    paths = ["project/project-id"] + (["instance/region", "instance/id"] if full else [])
    timeout = aiohttp.ClientTimeout(total=METADATA_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            async with asyncio.timeout(METADATA_TIMEOUT):
                values = await asyncio.gather(*(_metadata_value(session, base + p) for p in paths))
    except TimeoutError:
        return Platform()
    values += [None] * (3 - len(values))
    region = values[1].rpartition("/")[2] if values[1] else None
    return Platform(project=values[0], region=region, instance=values[2])


def resource_attributes(env: Mapping[str, str], platform: Platform) -> dict[str, str]:
    """OpenTelemetry resource attributes for Cloud Run (semantic conventions for GCP and FaaS)."""
    attributes = {"service.version": __version__}
    if env.get("K_SERVICE"):
        attributes.update({"cloud.provider": "gcp", "cloud.platform": "gcp_cloud_run"})
    optional = {
        "faas.name": env.get("K_SERVICE"),
        "faas.version": env.get("K_REVISION"),
        "gcp.cloud_run.configuration": env.get("K_CONFIGURATION"),
        "cloud.account.id": platform.project or env.get("GOOGLE_CLOUD_PROJECT"),
        "cloud.region": platform.region,
        "faas.instance": platform.instance,
    }
    attributes.update({key: value for key, value in optional.items() if value})
    if "cloud.account.id" in attributes:
        attributes.setdefault("cloud.provider", "gcp")
    return attributes


def _resource(env: Mapping[str, str], platform: Platform) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over what we detect.
    configured = Resource.create({})
    detected = Resource(resource_attributes(env, platform))
    resource = detected.merge(configured)
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    return resource


class Telemetry:
    """The tracer and metrics the request pipeline uses, and the providers to flush at shutdown.

    Until `start()` has learned the platform (before /readyz turns 200), and always when
    no OTLP endpoint is configured, the tracer is the API's no-op tracer and the metrics
    are no-ops: no SDK is imported and nothing is exported.
    """

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self._env = dict(env)
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.metrics: Metrics = NULL_METRICS
        self.watched = Watched()
        self.project: str | None = env.get("GOOGLE_CLOUD_PROJECT") or None
        self.started = False
        self._tracer_provider: Any = None
        self._meter_provider: Any = None

    @property
    def enabled(self) -> bool:
        return self._tracer_provider is not None

    async def start(self) -> None:
        """Learn the platform from the metadata server (if needed), then start the providers."""
        try:
            full = exporter_configured(self._env)
            platform = Platform()
            if full or self.project is None:
                platform = await detect_platform(self._env, full=full)
            self.project = self.project or platform.project
            self._start_providers(platform)
        finally:
            self.started = True

    def _start_providers(self, platform: Platform) -> None:
        if not exporter_configured(self._env):
            return
        resource = _resource(self._env, platform)
        if traces_configured(self._env):
            from opentelemetry.sdk.trace import SpanLimits, TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope

            from proxy import spans

            # No sampler argument: the SDK reads OTEL_TRACES_SAMPLER(_ARG) itself. The
            # provider owns the batch processor (its shutdown flushes it); the spans come
            # from proxy.spans, which uses the provider's sampler (see there why).
            provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            processor = BatchSpanProcessor(_span_exporter(self._env))
            provider.add_span_processor(processor)
            self._tracer_provider = provider
            self.tracer = spans.Tracer(
                resource=provider.resource,
                scope=InstrumentationScope(SERVICE_NAME, __version__),
                sampler=provider.sampler,
                limits=SpanLimits(),
                processor=processor,
            )
        if metrics_configured(self._env):
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope

            from proxy.metrics import OtlpMetrics, exemplars_on, histogram_reader, own_histograms

            own = own_histograms(self._env)
            histograms: list[Any] = []
            exporter = _metric_exporter(self._env)
            reader = (
                histogram_reader(
                    exporter,
                    lambda: histograms,
                    InstrumentationScope(SERVICE_NAME, __version__),
                )
                if own
                else PeriodicExportingMetricReader(exporter)
            )
            meters = MeterProvider([reader], resource=resource, shutdown_on_exit=False)
            self._meter_provider = meters
            metrics = OtlpMetrics(
                meters.get_meter(SERVICE_NAME, __version__),
                self.watched,
                own=own,
                exemplars=exemplars_on(self._env),
            )
            histograms.extend(metrics.histograms)
            self.metrics = metrics
        log.info(
            "telemetry: traces %s, metrics %s",
            protocol(self._env, "TRACES") if self._tracer_provider else "off",
            protocol(self._env, "METRICS") if self._meter_provider else "off",
        )

    def shutdown(self) -> None:
        """Flush what is batched; called once the listeners have drained."""
        self.tracer = trace.NoOpTracer()
        self.metrics = NULL_METRICS
        for provider in (self._tracer_provider, self._meter_provider):
            if provider is not None:
                provider.shutdown()
        self._tracer_provider = self._meter_provider = None


def extract(headers: Mapping[str, str]) -> Context:
    return PROPAGATOR.extract(headers)


def inject(headers: dict[str, str]) -> None:
    PROPAGATOR.inject(headers)
