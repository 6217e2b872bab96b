"""proxy.spans against the SDK's own tracer, run side by side on the same inputs: what
reaches the span processor (and so the exporter), sampling, span limits, status rules,
the trace context propagated, and the tracer proxy.telemetry builds."""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from proxy import otlp, spans
from proxy.telemetry import Platform, Telemetry
from tests.support.proxyproc import free_port

RESOURCE = Resource({"service.name": "gcs-iap-proxy", "service.version": "0.1.0"})
SCOPE = ("gcs-iap-proxy", "0.1.0")
REMOTE_TRACE, REMOTE_SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
TRACESTATE = "vendor=abc,other=x1"
PROPAGATOR = TraceContextTextMapPropagator()
Side = tuple[trace.Tracer, "Collector"]


class Collector(SpanProcessor):
    """Keeps what `on_end` receives: what an exporting processor would be handed."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def tracers() -> tuple[Side, Side]:
    """The SDK's tracer and ours, built alike (as proxy.telemetry does) from the environment."""
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    sdk_spans, our_spans = Collector(), Collector()
    provider.add_span_processor(sdk_spans)
    ours = spans.Tracer(
        resource=provider.resource,
        scope=InstrumentationScope(*SCOPE),
        sampler=provider.sampler,
        limits=SpanLimits(),
        processor=our_spans,
    )
    return (provider.get_tracer(*SCOPE), sdk_spans), (ours, our_spans)


def remote(
    flags: str = "01", tracestate: str | None = TRACESTATE, trace_id: int = REMOTE_TRACE
) -> Context:
    headers = {"traceparent": f"00-{trace_id:032x}-{REMOTE_SPAN:016x}-{flags}"}
    if tracestate:
        headers["tracestate"] = tracestate
    return PROPAGATOR.extract(headers)


@contextmanager
def current(span: trace.Span) -> Iterator[trace.Span]:
    """As proxy.observe's _Current: current while inside, ended on exit."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        otel_context.detach(token)
        span.end()


def request_tree(tracer: trace.Tracer, parent: Context | None) -> None:
    """The spans of one proxied request, made the way proxy.observe makes them."""
    attributes: Attributes = {"http.request.method": "GET", "url.path": "/b/o", "server.port": 8080}
    server = tracer.start_span("GET", context=parent, kind=SpanKind.SERVER, attributes=attributes)
    with current(server):
        authenticate = tracer.start_span("authenticate")
        authenticate.set_attribute("authn.result", "ok")
        authenticate.end()
        authorize = tracer.start_span("authorize")
        authorize.set_attributes({"authz.decision": "allow", "authz.enforced": True})
        authorize.end()
        with current(tracer.start_span("upstream", kind=SpanKind.CLIENT)) as upstream:
            upstream.set_attributes({"http.response.status_code": 503, "url.full": "http://g/o"})
            upstream.set_status(StatusCode.ERROR, "upstream answered 503")
        server.update_name("GET /storage/v1/b/{bucket}/o/{object}")
        server.set_attributes({"http.response.status_code": 502, "gcs.bucket": "b"})
        server.set_attribute("error.type", "502")
        server.set_status(StatusCode.ERROR)


def shape(message: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """The encoded request without ids and times; each span names its parent instead."""
    groups = []
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            names = {span.span_id: span.name for span in scope_spans.spans}
            shaped = []
            for span in scope_spans.spans:
                fields = MessageToDict(span)
                for key in ("traceId", "spanId", "parentSpanId"):
                    fields.pop(key, None)
                assert fields.pop("startTimeUnixNano") <= fields.pop("endTimeUnixNano")
                parent = span.parent_span_id
                fields["parent"] = names.get(parent, "remote" if parent else None)
                shaped.append(fields)
            resource, scope = resource_spans.resource, scope_spans.scope
            groups.append({"resource": MessageToDict(resource), "scope": MessageToDict(scope)})
            groups[-1]["spans"] = shaped
    return groups


@pytest.mark.parametrize("continued", [False, True], ids=["root", "remote-parent"])
def test_request_tree_encodes_as_the_sdks(continued: bool) -> None:
    """Same names, kinds, parents, trace state, attributes, status, flags, resource and
    scope once encoded; one trace id per tree (the caller's when continued)."""
    sides = tracers()
    for tracer, _ in sides:
        request_tree(tracer, remote() if continued else None)
    sdk, ours = (encode_spans(collector.spans) for _, collector in sides)
    assert shape(ours) == shape(sdk)
    assert ExportTraceServiceRequest.FromString(otlp.encode_spans(sides[1][1].spans)) == ours

    spans_ = ours.resource_spans[0].scope_spans[0].spans
    names = ["authenticate", "authorize", "upstream", "GET /storage/v1/b/{bucket}/o/{object}"]
    assert [s.name for s in spans_] == names
    assert len({s.trace_id for s in spans_}) == 1
    server = spans_[3]
    assert all(s.parent_span_id == server.span_id for s in spans_[:3])
    assert spans_[2].status.message == "upstream answered 503"
    if continued:
        assert server.trace_id == REMOTE_TRACE.to_bytes(16, "big")
        assert server.parent_span_id == REMOTE_SPAN.to_bytes(8, "big")
        assert server.flags == 0x300 and {s.trace_state for s in spans_} == {TRACESTATE}
    else:
        assert not server.parent_span_id and server.flags == 0x100 and not server.trace_state


SAMPLERS = "always_on always_off traceidratio parentbased_always_off parentbased_traceidratio"


def decision(sampler: str, flags: str | None, trace_id: int) -> bool:
    """What the SDK's samplers decide (ratio 0.5: the low 64 bits of the trace id)."""
    by_ratio = trace_id & ((1 << 64) - 1) < 1 << 63
    if sampler in ("always_on", "always_off"):
        return sampler == "always_on"
    if sampler == "traceidratio" or (flags is None and sampler == "parentbased_traceidratio"):
        return by_ratio
    return flags == "01"


def outcome(side: Side, parent: Context | None) -> list[tuple[bool, bool, int, bool, bool]]:
    """Per span (server, child): recording, valid context, trace id, sampled, exported."""
    tracer, collector = side
    server = tracer.start_span("GET", context=parent, kind=SpanKind.SERVER)
    with current(server):
        child = tracer.start_span("authenticate")
        recording = [server.is_recording(), child.is_recording()]
        child.end()
    exported = {span.context.span_id for span in collector.spans if span.context}
    contexts = [server.get_span_context(), child.get_span_context()]
    return [
        (rec, ctx.is_valid, ctx.trace_id, ctx.trace_flags.sampled, ctx.span_id in exported)
        for rec, ctx in zip(recording, contexts, strict=True)
    ]


@pytest.mark.parametrize("sampler", SAMPLERS.split())
def test_sampling_decides_as_the_sdk(sampler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_TRACES_SAMPLER(_ARG) as the SDK reads it: which spans record and are exported,
    their contexts (valid and of the right trace even when dropped), children following."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    sdk, ours = tracers()
    ids = [int.from_bytes(hashlib.sha256(b"%d" % n).digest()[:16]) | 1 for n in range(40)]
    decisions = set()
    for trace_id in ids:
        for flags in ("01", "00"):
            parent = remote(flags, trace_id=trace_id)
            expected = decision(sampler, flags, trace_id)
            decisions.add(expected)
            assert (
                outcome(ours, parent)
                == outcome(sdk, parent)
                == [(expected, True, trace_id, expected, expected)] * 2
            ), (flags, hex(trace_id))
    for side in (sdk, ours) * 20:
        server, child = outcome(side, None)
        expected = decision(sampler, None, server[2])
        decisions.add(expected)
        assert server == child == (expected, True, server[2], expected, expected)
    if "ratio" in sampler:
        assert decisions == {True, False}


@pytest.mark.parametrize("length_limit", [None, "4"])
def test_attribute_limits_as_the_sdk(
    length_limit: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT: the same
    attributes kept, in the same order (a key set again moves last), the same count dropped."""
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    if length_limit:
        monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", length_limit)
    results = []
    for tracer, collector in tracers():
        span = tracer.start_span("s", attributes={"a": "abcdefgh"})
        span.set_attributes({"b": 1})
        span.set_attributes({"a": "again-and-again"})  # a key set again, with room to spare
        span.set_attributes({"c": True, "d": "xyzxyz"})  # one over: the oldest goes
        span.set_attribute("d", "longer-still")  # a key set again when full
        span.end()
        (record,) = collector.spans
        results.append((list((record.attributes or {}).items()), record.dropped_attributes))
    sdk, ours = results
    assert ours == sdk
    assert len(ours[0]) == 3 and ours[1] == 1  # the limits were read from the environment
    if length_limit:
        assert [value for _, value in ours[0] if isinstance(value, str)] == ["agai", "long"]


def test_value_length_limit_applies_inside_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT cuts the strings of an array value too, as the SDK's."""
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    encoded = []
    for tracer, collector in tracers():
        span = tracer.start_span("s", attributes={"start": ["abcdefgh", "ok"]})
        span.set_attribute("later", ["ijklmnop"])
        span.end()
        encoded.append(shape(encode_spans(collector.spans))[0]["spans"][0]["attributes"])
    sdk, ours = encoded
    assert ours == sdk


class Color(enum.StrEnum):
    RED = "red-and-long"


class Size(enum.IntEnum):
    BIG = 7


@pytest.mark.parametrize("length_limit", [None, "4"])
def test_enum_and_odd_values_as_the_sdk(
    length_limit: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """str and int subclasses stay single values (a StrEnum is not an array of letters);
    bytes and a mapping are kept as bytes and a key-value list, as by the SDK."""
    if length_limit:
        monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", length_limit)
    encoded = []
    for tracer, collector in tracers():
        span = tracer.start_span("s", attributes={"color": Color.RED, "size": Size.BIG})
        span.set_attribute("raw", b"bytes-value")
        span.set_attribute("map", {"key": "a-long-value"})  # type: ignore[arg-type]
        span.end()
        encoded.append(shape(encode_spans(collector.spans))[0]["spans"][0]["attributes"])
    sdk, ours = encoded
    assert ours == sdk
    assert [a["key"] for a in ours] == ["color", "size", "raw", "map"]
    assert ours[0]["value"] == {"stringValue": "red-" if length_limit else "red-and-long"}


Calls = list[tuple[Status | StatusCode, str | None]]
STATUS_CASES: list[tuple[Calls, tuple[StatusCode, str | None]]] = [
    ([(StatusCode.OK, None), (StatusCode.ERROR, "late")], (StatusCode.OK, None)),
    ([(StatusCode.ERROR, "kept"), (StatusCode.UNSET, None)], (StatusCode.ERROR, "kept")),
    ([(Status(StatusCode.UNSET), None)], (StatusCode.UNSET, None)),
    ([(Status(StatusCode.ERROR, "object"), "ignored")], (StatusCode.ERROR, "object")),
    ([(StatusCode.ERROR, "described")], (StatusCode.ERROR, "described")),
    ([(StatusCode.OK, "only with ERROR")], (StatusCode.OK, None)),
    ([(StatusCode.ERROR, "first"), (Status(StatusCode.OK), None)], (StatusCode.OK, None)),
]


@pytest.mark.parametrize(("calls", "expected"), STATUS_CASES)
def test_status_rules_and_ended_spans_as_the_sdk(
    calls: Calls, expected: tuple[StatusCode, str | None]
) -> None:
    """The SDK's status rules; after end() nothing changes and a second end() is ignored."""
    records = []
    for tracer, collector in tracers():
        span = tracer.start_span("s", attributes={"k": 1})
        for status, description in calls:
            span.set_status(status, description)
        span.end()
        span.set_status(StatusCode.ERROR, "after end")
        span.update_name("renamed")
        span.set_attribute("k", 2)
        span.set_attributes({"late": "x"})
        span.end()
        assert not span.is_recording()
        (record,) = collector.spans
        status = record.status
        records.append(
            (record.name, dict(record.attributes or {}), status.status_code, status.description)
        )
    sdk, ours = records
    assert ours == sdk == ("s", {"k": 1}, *expected)


def injected(tracer: trace.Tracer, parent: Context | None) -> tuple[dict[str, str], Any, Any]:
    """The headers injected while a CLIENT span is current in a SERVER span; their contexts."""
    carrier: dict[str, str] = {}
    server = tracer.start_span("GET", context=parent, kind=SpanKind.SERVER)
    with current(server), current(tracer.start_span("upstream", kind=SpanKind.CLIENT)) as upstream:
        PROPAGATOR.inject(carrier)
    return carrier, server.get_span_context(), upstream.get_span_context()


@pytest.mark.parametrize("continued", [False, True], ids=["root", "remote-parent"])
def test_traceparent_injected_from_our_current_span(continued: bool) -> None:
    """The propagator reads our current span: the trace id (the caller's when continued),
    the CLIENT span's id, sampled, and the caller's tracestate; the headers the SDK's give."""
    (sdk_tracer, _), (tracer, _) = tracers()
    parent = remote() if continued else None
    carrier, server, upstream = injected(tracer, parent)
    assert carrier["traceparent"].startswith(f"00-{server.trace_id:032x}-{upstream.span_id:016x}-")
    assert upstream.span_id != server.span_id and int(carrier["traceparent"][-2:], 16) & 1
    if continued:
        assert carrier["traceparent"] == f"00-{REMOTE_TRACE:032x}-{upstream.span_id:016x}-01"
    assert carrier.get("tracestate") == (TRACESTATE if continued else None)
    sdk_carrier, _, _ = injected(sdk_tracer, parent)
    assert carrier.keys() == sdk_carrier.keys()
    assert carrier.get("tracestate") == sdk_carrier.get("tracestate")


@pytest.mark.parametrize(
    ("sampler", "flags"),
    [("parentbased_always_on", None), ("parentbased_always_on", "03"), ("always_off", None)],
)
def test_trace_flags_as_the_sdk(
    sampler: str, flags: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The W3C trace flags of our spans (what the traceparent sent upstream carries) are the
    SDK's: with its random trace ids it also sets the random-trace-id flag (0x02)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    parent = remote(flags) if flags else None
    (sdk_tracer, _), (tracer, _) = tracers()
    sdk, ours = (
        [int(c.trace_flags) for c in injected(t, parent)[1:]] for t in (sdk_tracer, tracer)
    )
    assert ours == sdk


def test_telemetry_builds_our_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    """proxy.telemetry's tracer is proxy.spans.Tracer, its spans carry the service's resource
    and scope, and shutdown (flushing to an endpoint nobody listens on) returns soon."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED", *env):
        monkeypatch.setenv(name, env.get(name, ""))  # the exporters read os.environ themselves
    telemetry = Telemetry(env)
    telemetry._start_providers(Platform())
    try:
        tracer = telemetry.tracer
        assert isinstance(tracer, spans.Tracer)
        span = tracer.start_span("GET", kind=SpanKind.SERVER)
        assert isinstance(span, spans.Span) and span.is_recording()
        span.end()
        assert span.resource.attributes["service.name"] == "gcs-iap-proxy"
        assert span.instrumentation_scope.name == "gcs-iap-proxy"
        exported: list[ReadableSpan] = [span]  # type: ignore[list-item]  # read as the SDK's
        assert shape(encode_spans(exported))[0]["scope"]["name"] == "gcs-iap-proxy"
    finally:
        started = time.monotonic()
        telemetry.shutdown()
    assert time.monotonic() - started < 10
    assert not telemetry.enabled and isinstance(telemetry.tracer, trace.NoOpTracer)
