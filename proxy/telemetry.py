"""OpenTelemetry set-up from the standard OTEL_* variables; no endpoint means a no-op tracer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy import __version__

PROPAGATOR = TraceContextTextMapPropagator()
_TRACES_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def exporter_configured(env: Mapping[str, str] = os.environ) -> bool:
    return (
        any(env.get(name) for name in _TRACES_ENDPOINTS)
        and env.get("OTEL_SDK_DISABLED", "").lower() != "true"
    )


def _protocol(env: Mapping[str, str]) -> str:
    return (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


def _span_exporter(env: Mapping[str, str]) -> Any:
    # Exporters are imported only when configured: grpc alone costs tens of MiB.
    if _protocol(env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def _resource(env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, str] = {"service.version": __version__}
    cloud_run = {
        "K_SERVICE": "faas.name",
        "K_REVISION": "faas.version",
        "K_CONFIGURATION": "gcp.cloud_run.configuration",
    }
    for var, key in cloud_run.items():
        if env.get(var):
            attributes[key] = env[var]
    if env.get("K_SERVICE"):
        attributes["cloud.provider"] = "gcp"
        attributes["cloud.platform"] = "gcp_cloud_run"
    if "OTEL_SERVICE_NAME" not in env:
        attributes["service.name"] = "gcs-iap-proxy"
    return Resource.create(attributes)


class Telemetry:
    """The tracer the request pipeline uses, and the provider to flush at shutdown."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self._provider: Any = None
        if exporter_configured(env):
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self._provider = TracerProvider(resource=_resource(env))
            self._provider.add_span_processor(BatchSpanProcessor(_span_exporter(env)))
            self.tracer: trace.Tracer = self._provider.get_tracer("gcs-iap-proxy", __version__)
        else:
            self.tracer = trace.NoOpTracer()

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def extract(headers: Mapping[str, str]) -> Context:
    return PROPAGATOR.extract(headers)


def inject(headers: dict[str, str]) -> None:
    PROPAGATOR.inject(headers)
