"""proxy.otlp.encode_spans against opentelemetry's own encoder: every span shape the SDK
makes, parsed back, must be the very ExportTraceServiceRequest the stock encoder builds;
and the span exporters the sidecar configures must send what proxy.otlp encodes."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    encode_spans as stock_encode_spans,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from proxy import otlp
from proxy.telemetry import _span_exporter
from tests.support.otlp_receiver import OtlpReceiver

RESOURCE = Resource(
    {"service.name": "gcs-iap-proxy", "service.version": "0.1.0", "cloud.provider": "gcp"},
    schema_url="https://opentelemetry.io/schemas/1.26.0",
)
OTHER_RESOURCE = Resource({"service.name": "other", "service.instance.id": "ü-1"})
REMOTE = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "abc"), ("other", "x1")]),
)
EVERY_TYPE: dict[str, Any] = {
    "str": "GET",
    "empty.str": "",
    "unicode": "Grüße, 世界 🌍",
    "true": True,
    "false": False,
    "zero": 0,
    "negative": -42,
    "int64.max": 2**63 - 1,
    "int64.min": -(2**63),
    "large": 2**40 + 7,
    "float": 3.25,
    "negative.float": -0.5,
    "zero.float": 0.0,
    "inf": math.inf,
    "strs": ["a", "", "é"],
    "bools": [True, False],
    "ints": [1, -1, 2**62],
    "floats": [1.5, -2.0],
    "empty.list": [],
    "bytes": b"\x00\xff",
}


def assert_same(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    ours = ExportTraceServiceRequest.FromString(otlp.encode_spans(spans))
    stock = stock_encode_spans(spans)
    assert text_format.MessageToString(ours) == text_format.MessageToString(stock)
    assert ours == stock
    return ours


class Recorder:
    """A TracerProvider whose finished spans are kept in memory."""

    def __init__(self, resource: Resource = RESOURCE, limits: SpanLimits | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(
            resource=resource, span_limits=limits or SpanLimits(), shutdown_on_exit=False
        )
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("gcs-iap-proxy", "0.1.0")

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.provider.shutdown()


def request_spans(tracer: trace.Tracer, parent: SpanContext | None, status: int) -> None:
    """The four spans of one proxied request, shaped like proxy.observe's."""
    context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
    with tracer.start_as_current_span(
        "GET", context=context, kind=SpanKind.SERVER, attributes={"url.scheme": "http"}
    ) as server:
        with tracer.start_as_current_span("authenticate"):
            pass
        with tracer.start_as_current_span("authorize") as authorize:
            authorize.set_attributes({"authz.decision": "allow", "enduser.id": "alice@example.com"})
        with tracer.start_as_current_span("upstream", kind=SpanKind.CLIENT) as upstream:
            upstream.set_attributes({"server.port": 4443, "http.response.status_code": status})
            if status >= 500:
                upstream.set_status(StatusCode.ERROR, "upstream answered 503")
        server.set_attributes(
            {"http.route": "/storage/v1/b/{bucket}/o/{object}", "gcs.bucket": "b"}
        )
        server.set_status(Status(StatusCode.ERROR) if status >= 500 else Status(StatusCode.OK))


def test_request_spans_with_remote_and_local_parents(recorder: Recorder) -> None:
    request_spans(recorder.tracer, REMOTE, 200)
    request_spans(recorder.tracer, None, 503)
    message = assert_same(recorder.spans())
    spans = message.resource_spans[0].scope_spans[0].spans
    assert [s.kind for s in spans[:4]] == [1, 1, 3, 2]  # INTERNAL, INTERNAL, CLIENT, SERVER
    assert spans[3].flags == 0x300 and spans[3].trace_state == "vendor=abc,other=x1"
    assert spans[0].flags == 0x100 and spans[0].parent_span_id == spans[3].span_id
    assert spans[7].flags == 0x100 and not spans[7].parent_span_id


def test_every_kind_and_attribute_type(recorder: Recorder) -> None:
    for kind in SpanKind:
        with recorder.tracer.start_as_current_span(kind.name, kind=kind, attributes=EVERY_TYPE):
            pass
    message = assert_same(recorder.spans())
    assert len(message.resource_spans[0].scope_spans[0].spans[0].attributes) == len(EVERY_TYPE)


def test_attributes_the_stock_encoder_cannot_encode_are_dropped_alike(recorder: Recorder) -> None:
    with recorder.tracer.start_as_current_span("s", attributes={"big": 2**63, "ok": 1}):
        pass
    message = assert_same(recorder.spans())
    assert [a.key for a in message.resource_spans[0].scope_spans[0].spans[0].attributes] == ["ok"]


def test_equal_values_of_other_types_are_not_mixed_up(recorder: Recorder) -> None:
    """proxy.otlp keeps recurring attributes encoded: True == 1 == 1.0 and 0.0 == -0.0."""
    for value in (True, 1, 1.0, "1", False, 0, 0.0, -0.0, "", [1], (True,)):
        with recorder.tracer.start_as_current_span("s", attributes={"v": value}):
            pass
    assert_same(recorder.spans())
    assert_same(recorder.spans()[::-1])


def test_events_links_and_status(recorder: Recorder) -> None:
    with recorder.tracer.start_as_current_span("first") as first:
        first.add_event("retry", {"attempt": 2, "reason": "503", "delays": [0.1, 0.2]})
        first.add_event("plain")
        first.set_status(Status(StatusCode.ERROR, "upstream said no: ✗"))
    local = recorder.spans()[0].get_span_context()
    links = [Link(REMOTE, {"link.kind": "caller", "n": [1, 2]}), Link(local), Link(REMOTE, {})]
    with recorder.tracer.start_as_current_span("second", links=links) as second:
        second.set_status(StatusCode.OK)
    message = assert_same(recorder.spans())
    spans = message.resource_spans[0].scope_spans[0].spans
    assert [link.flags for link in spans[1].links] == [0x300, 0x100, 0x300]
    assert spans[0].status.message == "upstream said no: ✗" and spans[0].status.code == 2


def test_dropped_counts() -> None:
    limits = SpanLimits(
        max_span_attributes=2,
        max_events=1,
        max_links=1,
        max_event_attributes=1,
        max_link_attributes=1,
    )
    recorder = Recorder(limits=limits)
    links = [Link(REMOTE), Link(REMOTE, {"a": 1, "b": 2})]  # the oldest is dropped
    with recorder.tracer.start_as_current_span("s", links=links, attributes=EVERY_TYPE) as span:
        span.add_event("e1", {"a": 1, "b": 2, "c": 3})
        span.add_event("e2")
    message = assert_same(recorder.spans())
    recorder.provider.shutdown()
    encoded = message.resource_spans[0].scope_spans[0].spans[0]
    assert encoded.dropped_attributes_count == len(EVERY_TYPE) - 2
    assert (encoded.dropped_events_count, encoded.dropped_links_count) == (1, 1)
    assert encoded.links[0].dropped_attributes_count == 1


def test_resources_and_scopes_grouped_in_order_of_appearance() -> None:
    one, two = Recorder(), Recorder(OTHER_RESOURCE)
    # An equal but distinct Resource object groups with the first, as in the stock encoder.
    three = Recorder(Resource(dict(RESOURCE.attributes), RESOURCE.schema_url))
    scoped = one.provider.get_tracer(
        "proxy.gcs", "2.0", schema_url="https://example.com/s", attributes={"scope.attr": 1}
    )
    for tracer in (two.tracer, scoped, one.tracer, three.tracer, two.tracer, scoped, one.tracer):
        with tracer.start_as_current_span("s", kind=SpanKind.CLIENT):
            pass
    spans = sorted(
        [*one.spans(), *two.spans(), *three.spans()], key=lambda span: span.start_time or 0
    )
    unscoped = ReadableSpan("no scope", REMOTE, resource=OTHER_RESOURCE, start_time=1, end_time=2)
    message = assert_same([*spans, unscoped])
    assert [len(r.scope_spans) for r in message.resource_spans] == [2, 2]
    assert message.resource_spans[1].scope_spans[0].scope.attributes[0].key == "scope.attr"
    for recorder in (one, two, three):
        recorder.provider.shutdown()


def test_hand_made_spans() -> None:
    """ReadableSpans as tests and other SDK code make them: no end, no attributes, values
    the SDK's cleaning would never let through (mappings, None), and no scope."""
    scope = InstrumentationScope("hand", None)
    spans = [
        ReadableSpan("", REMOTE, resource=RESOURCE, instrumentation_scope=scope),
        ReadableSpan(
            "nested",
            REMOTE,
            parent=REMOTE,
            attributes={"map": {"k": 1, "l": ["x"], "m": {}}, "none": None, "tuple": ("a",)},
            events=[Event("e", {"x": None}, timestamp=5)],
            resource=RESOURCE,
            kind=SpanKind.PRODUCER,
            start_time=1,
            end_time=2**64 - 1,
        ),
        ReadableSpan("unscoped", REMOTE, resource=RESOURCE, status=Status(StatusCode.OK, "ok")),
    ]
    assert_same(spans)


SCALARS = st.one_of(
    st.text(max_size=30),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),  # outside int64: dropped by both
    st.floats(),
    st.binary(max_size=10),
    st.none(),
)
ARRAYS = st.one_of(
    st.lists(st.text(max_size=10), max_size=5),
    st.lists(st.booleans(), max_size=5),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=5),
    st.lists(st.floats(), max_size=5),
)
ATTRIBUTES = st.dictionaries(
    st.text(max_size=20),
    st.one_of(SCALARS, ARRAYS, st.dictionaries(st.text(max_size=5), SCALARS, max_size=3)),
    max_size=12,
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ATTRIBUTES, ATTRIBUTES, st.text(max_size=20))
def test_any_attributes(
    recorder: Recorder, span_attributes: dict[str, Any], other: dict[str, Any], name: str
) -> None:
    recorder.exporter.clear()
    with recorder.tracer.start_as_current_span(name, attributes=span_attributes) as span:
        span.add_event(name, other)
    raw = ReadableSpan(
        name,
        REMOTE,
        attributes=span_attributes,
        links=[Link(REMOTE, other)],
        resource=Resource(other),
        instrumentation_scope=InstrumentationScope(name, name, attributes=other),
    )
    assert_same([*recorder.spans(), raw])


@pytest.fixture(params=["http/protobuf", "grpc"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_configured_span_exporters_send_what_proxy_otlp_encodes(
    protocol: str, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[int] = []
    encode = otlp.encode_spans

    def counting(spans: Sequence[ReadableSpan]) -> bytes:
        encoded.append(len(spans))
        return encode(spans)

    monkeypatch.setattr(otlp, "encode_spans", counting)
    request_spans(recorder.tracer, REMOTE, 200)
    spans = recorder.spans()
    with OtlpReceiver() as receiver:
        for name, value in receiver.env(protocol).items():
            monkeypatch.setenv(name, value)
        exporter = _span_exporter(receiver.env(protocol))
        try:
            assert exporter.export(spans) == SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
        received = receiver.wait_for(receiver.decoded_text)
    assert encoded == [len(spans)]
    assert received == text_format.MessageToString(stock_encode_spans(spans), as_utf8=True)
