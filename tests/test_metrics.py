"""proxy.metrics' in-process latency histograms against the OpenTelemetry SDK's own:
the same measurements must give the same exported points, exemplars and scopes."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from proxy.metrics import (
    LATENCY_BUCKETS,
    Histogram,
    OtlpMetrics,
    RequestFacts,
    Watched,
    histogram_reader,
    own_histograms,
)
from proxy.telemetry import Platform, Telemetry
from tests.support.proxyproc import free_port

NAME, CLIENT = "http.server.request.duration", "http.client.request.duration"
UNIT, DESCRIPTION = "s", "Latency"
SCOPE = InstrumentationScope("gcs-iap-proxy", "0.1.0")
RESOURCE = Resource({"service.name": "metrics-test"})
GET = (("http.request.method", "GET"), ("http.response.status_code", 200))
PUT = (("http.request.method", "PUT"), ("http.response.status_code", 503), ("http.route", "/o"))
SPREAD = [0.0, 0.0003, 0.0005, 0.001, 0.07, 0.075, 0.1, 0.3, 1.0, 9.9, 60.0, 61.0, 1e6]
Key = tuple[tuple[str, Any], ...]


def sdk_histogram(**provider: Any) -> tuple[InMemoryMetricReader, Any]:
    """An SDK histogram made as OtlpMetrics makes it when `own` is false."""
    reader = InMemoryMetricReader()
    meter = MeterProvider([reader], **provider).get_meter(SCOPE.name, SCOPE.version)
    sdk = meter.create_histogram(
        NAME,
        unit=UNIT,
        description=DESCRIPTION,
        explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
    )
    return reader, sdk


def ours(exemplars: bool = True) -> Histogram:
    return Histogram(NAME, UNIT, DESCRIPTION, LATENCY_BUCKETS, exemplars=exemplars)


def record(sdk: Any, mine: Histogram, value: float, key: Key) -> None:
    """The same measurement into both; the SDK gets the attributes in reverse order."""
    sdk.record(value, dict(reversed(key)))
    mine.record(value, key)


def metric_named(data: MetricsData | None, name: str) -> Any:
    assert data is not None
    found = [m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics]
    [metric] = [m for m in found if m.name == name]
    return metric


def by_attributes(points: Sequence[Any]) -> dict[frozenset[Any], Any]:
    table = {frozenset(p.attributes.items()): p for p in points}
    assert len(table) == len(points), "two points with the same attributes"
    return table


def exemplars(p: Any) -> list[tuple[Any, ...]]:
    """What must match the SDK's: all but the time."""
    return [(e.value, e.span_id, e.trace_id, e.filtered_attributes) for e in p.exemplars]


def view(points: dict[Any, Any]) -> dict[Any, Any]:
    """Per attribute set: everything but the timestamps."""
    return {
        key: (dict(p.attributes), p.count, p.sum, tuple(p.bucket_counts))
        + (tuple(p.explicit_bounds), p.min, p.max, exemplars(p))
        for key, p in points.items()
    }


def both_points(reader: InMemoryMetricReader, mine: Histogram) -> tuple[dict[Any, Any], ...]:
    """Collect both; the metrics' envelopes agree; their points by attribute set."""
    sdk_metric = metric_named(reader.get_metrics_data(), NAME)
    our_metric = mine.collect(time.time_ns())
    assert our_metric is not None
    for metric in (sdk_metric, our_metric):
        assert (metric.name, metric.unit, metric.description) == (NAME, UNIT, DESCRIPTION)
        assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    return by_attributes(sdk_metric.data.data_points), by_attributes(our_metric.data.data_points)


@contextmanager
def current_span(trace_id: int, span_id: int, sampled: bool) -> Iterator[None]:
    span = NonRecordingSpan(SpanContext(trace_id, span_id, False, TraceFlags(int(sampled))))
    token = context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        context.detach(token)


class Keep(MetricExporter):
    """Keeps every MetricsData it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **_: Any) -> Any:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **_: Any) -> None:
        pass


def provider_for(exporter: Keep, histograms: Sequence[Histogram]) -> MeterProvider:
    reader = histogram_reader(exporter, lambda: histograms, SCOPE)
    return MeterProvider([reader], resource=RESOURCE)


def test_points_equal_the_sdk_and_stay_cumulative() -> None:
    """Count, sum, buckets (a bound falls in the bucket it ends), min and max per attribute
    set equal the SDK's, over two collections, each point keeping its start time."""
    reader, sdk = sdk_histogram()
    mine = ours()
    for i, value in enumerate(SPREAD):
        record(sdk, mine, value, GET)
        record(sdk, mine, value * 2, PUT if i % 2 else GET)
    record(sdk, mine, 0.02, (("http.request.method", "HEAD"),))
    theirs, got = both_points(reader, mine)
    assert len(got) == 3 and view(got) == view(theirs)
    get = got[frozenset(GET)]
    assert tuple(get.bucket_counts[:2]) == (4, 2)  # 0.0005 is in bucket 0, 0.001 in 1
    assert (get.bucket_counts[-1], get.min, get.max) == (4, 0.0, 2e6)

    for value in (0.005, 0.4, 75.0):
        record(sdk, mine, value, PUT)
    theirs_again, got_again = both_points(reader, mine)
    assert view(got_again) == view(theirs_again)
    assert got_again[frozenset(PUT)].count == got[frozenset(PUT)].count + 3
    for key, point in got.items():
        assert got_again[key].start_time_unix_nano == point.start_time_unix_nano
        assert theirs_again[key].start_time_unix_nano == theirs[key].start_time_unix_nano


def test_keys_are_ordered_tuples() -> None:
    """Unlike the SDK's attribute dicts, keys that differ only in order make two points:
    callers must build a key in one fixed order (OtlpMetrics does)."""
    reader, sdk = sdk_histogram()
    mine = ours()
    for key in (GET, tuple(reversed(GET))):
        sdk.record(0.1, dict(key))
        mine.record(0.1, key)
    metric = mine.collect(time.time_ns())
    assert metric is not None
    assert [(p.attributes, p.count) for p in metric.data.data_points] == [(dict(GET), 1)] * 2
    assert [p.count for p in metric_named(reader.get_metrics_data(), NAME).data.data_points] == [2]


def test_negative_nan_and_infinite_values_are_dropped() -> None:
    """Measurements the SDK drops change nothing here either."""
    reader, sdk = sdk_histogram()
    mine = ours()
    invalid = (-1.0, -1e-9, math.nan, math.inf, -math.inf)
    for value in invalid:
        record(sdk, mine, value, GET)
    assert reader.get_metrics_data() is None and mine.collect(time.time_ns()) is None
    for value in (0.2, *invalid):
        record(sdk, mine, value, GET)
    theirs, got = both_points(reader, mine)
    assert view(got) == view(theirs)
    assert (got[frozenset(GET)].count, got[frozenset(GET)].sum) == (1, 0.2)


def test_exemplars_equal_the_sdk() -> None:
    """Per bucket, the last measurement under a sampled span; unsampled or no span give
    none; each collection starts afresh."""
    reader, sdk = sdk_histogram()
    mine = ours()
    with current_span(0xA1, 0x11, sampled=True):
        for value in (0.0001, 0.3, 0.3, 5.0, 100.0):
            record(sdk, mine, value, GET)
        record(sdk, mine, 0.05, PUT)
    with current_span(0xB2, 0x22, sampled=True):
        record(sdk, mine, 0.4, GET)  # replaces 0.3 in bucket (0.25, 0.5]
    with current_span(0xC3, 0x33, sampled=False):
        record(sdk, mine, 0.45, GET)  # unsampled: 0.4 stays
        record(sdk, mine, 2.0, GET)
    record(sdk, mine, 0.26, GET)  # no span
    record(sdk, mine, 7.0, GET)
    theirs, got = both_points(reader, mine)
    assert view(got) == view(theirs)
    assert exemplars(got[frozenset(GET)]) == [
        (0.0001, 0x11, 0xA1, {}),
        (0.4, 0x22, 0xB2, {}),
        (5.0, 0x11, 0xA1, {}),
        (100.0, 0x11, 0xA1, {}),
    ]

    with current_span(0xC3, 0x33, sampled=False):
        record(sdk, mine, 0.3, GET)
    record(sdk, mine, 0.3, PUT)
    theirs, got = both_points(reader, mine)
    assert view(got) == view(theirs)
    assert not any(p.exemplars for p in got.values())

    with current_span(0xD4, 0x44, sampled=True):
        record(sdk, mine, 0.3, PUT)
    theirs, got = both_points(reader, mine)
    assert view(got) == view(theirs)
    assert exemplars(got[frozenset(PUT)]) == [(0.3, 0x44, 0xD4, {})]


def test_no_exemplars_when_off() -> None:
    """exemplars=False is the SDK's always_off filter."""
    reader, sdk = sdk_histogram(exemplar_filter=AlwaysOffExemplarFilter())
    mine = ours(exemplars=False)
    with current_span(0xA1, 0x11, sampled=True):
        record(sdk, mine, 0.3, GET)
    theirs, got = both_points(reader, mine)
    assert view(got) == view(theirs)
    assert got[frozenset(GET)].count == 1 and not got[frozenset(GET)].exemplars


def test_attribute_sets_beyond_the_cardinality_limit_overflow_as_in_the_sdk() -> None:
    """The SDK keeps 2000 attribute sets per instrument by default and folds further ones
    into one {"otel.metric.overflow": True} point."""
    reader, sdk = sdk_histogram()
    mine = ours(exemplars=False)
    for i in range(2005):
        record(sdk, mine, 0.1, (("i", i),))
    theirs, got = both_points(reader, mine)
    assert len(got) == len(theirs) and view(got) == view(theirs)


ELSEWHERE = InstrumentationScope("elsewhere", "9")


@pytest.mark.parametrize(
    ("counter_scope", "scopes"),
    [
        (SCOPE, {SCOPE: ["calls", NAME]}),
        (ELSEWHERE, {ELSEWHERE: ["calls"], SCOPE: [NAME]}),
    ],
    ids=["same scope", "other scope"],
)
def test_reader_adds_histograms_under_their_scope(
    counter_scope: InstrumentationScope, scopes: dict[Any, list[str]]
) -> None:
    """One ResourceMetrics with the provider's resource; our histogram joins the SDK's
    metrics of SCOPE, or comes in a ScopeMetrics of its own if there are none."""
    exporter, mine = Keep(), ours()
    provider = provider_for(exporter, [mine])
    try:
        provider.get_meter(SCOPE.name, SCOPE.version).create_counter("unused")
        meter = provider.get_meter(counter_scope.name, counter_scope.version)
        meter.create_counter("calls").add(3)
        mine.record(0.3, GET)
        provider.force_flush()
    finally:
        provider.shutdown()
    assert exporter.exported, "nothing exported"
    data = exporter.exported[0]
    assert [rm.resource for rm in data.resource_metrics] == [RESOURCE]
    got = {
        s.scope: sorted(m.name for m in s.metrics) for s in data.resource_metrics[0].scope_metrics
    }
    assert got == scopes
    histogram = metric_named(data, NAME)
    assert (histogram.unit, histogram.description) == (UNIT, DESCRIPTION)
    assert histogram.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    assert [p.count for p in histogram.data.data_points] == [1]


def test_histograms_ride_along_with_the_sdks_next_collection() -> None:
    """A collection that finds nothing in the SDK's instruments is not exported (its
    MetricReader.collect is final); the histogram's cumulative points leave with the next
    one that does, earlier measurements included."""
    exporter, mine = Keep(), ours()
    provider = provider_for(exporter, [mine])
    try:
        calls = provider.get_meter(SCOPE.name, SCOPE.version).create_counter("calls")
        mine.record(0.3, GET)
        provider.force_flush()
        assert exporter.exported == []
        calls.add(1)
        mine.record(0.7, GET)
        provider.force_flush()
    finally:
        provider.shutdown()
    histogram = metric_named(exporter.exported[0], NAME)
    [point] = histogram.data.data_points
    assert (point.count, point.sum) == (2, 1.0)


TEMPORALITY = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
AGGREGATION = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"
FILTER = "OTEL_METRICS_EXEMPLAR_FILTER"


@pytest.mark.parametrize(
    ("env", "own"),
    [
        ({}, True),
        ({TEMPORALITY: "delta"}, False),
        ({TEMPORALITY: "lowmemory"}, False),
        ({TEMPORALITY: "CUMULATIVE"}, True),
        ({AGGREGATION: "base2_exponential_bucket_histogram"}, False),
        ({FILTER: "always_on"}, False),
        ({FILTER: "always_off"}, True),
    ],
    ids=["empty", "delta", "lowmemory", "CUMULATIVE", "exponential", "always_on", "always_off"],
)
def test_own_histograms_only_for_the_default_configuration(env: dict[str, str], own: bool) -> None:
    assert own_histograms(env) is own


@contextmanager
def telemetry(monkeypatch: pytest.MonkeyPatch, **extra: str) -> Iterator[OtlpMetrics]:
    """Telemetry's metrics with an OTLP endpoint nobody listens on (OTEL_* also set in
    os.environ, which the SDK and its exporter read), shut down afterwards."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        **extra,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = Telemetry(env)
    started._start_providers(Platform())
    try:
        assert isinstance(started.metrics, OtlpMetrics)
        yield started.metrics
    finally:
        started.shutdown()


@pytest.mark.parametrize(
    ("extra", "names"),
    [({}, [NAME, CLIENT]), ({TEMPORALITY: "delta"}, [])],
    ids=["default", "delta"],
)
def test_telemetry_keeps_histograms_only_by_default(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, str], names: list[str]
) -> None:
    with telemetry(monkeypatch, **extra) as metrics:
        assert [h.name for h in metrics.histograms] == names


def test_telemetry_honours_exemplar_filter_always_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """always_off keeps the histograms in process, and then they must carry no exemplar."""
    with telemetry(monkeypatch, **{FILTER: "always_off"}) as metrics:
        assert [h.name for h in metrics.histograms] == [NAME, CLIENT]
        with current_span(0xA1, 0x11, sampled=True):
            metrics.upstream("GET", "storage.googleapis.com", 200, 0.3, None)
        metric = metrics.histograms[1].collect(time.time_ns())
        assert metric is not None
        assert [exemplars(p) for p in metric.data.data_points] == [[]]


def drive(metrics: OtlpMetrics) -> None:
    def request(method: str, route: str | None, status: int, seconds: float) -> None:
        operation = "objects.get" if route else None
        facts = (method, route, operation, status, seconds, 0, 9, None, None, False)
        metrics.request(RequestFacts(*facts))

    with current_span(0xA1, 0x11, sampled=True):
        request("GET", "/b/{bucket}/o/{object}", 200, 0.012)
        metrics.upstream("GET", "storage.googleapis.com", 200, 0.01, None)
    for seconds in (0.0, 0.5, 2.5, 90.0):
        request("GET", "/b/{bucket}/o/{object}", 200, seconds)
        request("PUT", None, 403, seconds / 3)
        metrics.upstream("GET", "storage.googleapis.com", 0, seconds, "timeout")
    metrics.upstream("PUT", "storage.googleapis.com", 503, 0.1, None)


def test_otlp_metrics_exports_what_the_sdk_path_exports() -> None:
    """OtlpMetrics(own=True) through histogram_reader exports the same metric names and
    histogram points (attributes, counts, buckets, exemplars) as OtlpMetrics(own=False)."""
    exporter, histograms = Keep(), []
    provider = provider_for(exporter, histograms)
    sdk_reader = InMemoryMetricReader()
    sdk_provider = MeterProvider([sdk_reader], resource=RESOURCE)
    try:
        own = OtlpMetrics(provider.get_meter(SCOPE.name, SCOPE.version), Watched(), own=True)
        histograms.extend(own.histograms)
        drive(own)
        drive(OtlpMetrics(sdk_provider.get_meter(SCOPE.name, SCOPE.version), Watched()))
        provider.force_flush()
        got, theirs = exporter.exported[-1], sdk_reader.get_metrics_data()
    finally:
        provider.shutdown()
        sdk_provider.shutdown()
    assert theirs is not None
    [scoped] = got.resource_metrics[0].scope_metrics
    [sdk_scoped] = theirs.resource_metrics[0].scope_metrics
    assert scoped.scope == sdk_scoped.scope == SCOPE
    assert sorted(m.name for m in scoped.metrics) == sorted(m.name for m in sdk_scoped.metrics)
    counts = {}
    for name in (NAME, CLIENT):
        points = by_attributes(metric_named(got, name).data.data_points)
        assert view(points) == view(by_attributes(metric_named(theirs, name).data.data_points))
        assert any(p.exemplars for p in points.values())
        counts[name] = sorted(p.count for p in points.values())
    assert counts == {NAME: [4, 5], CLIENT: [1, 1, 4]}


def test_a_point_is_read_whole_while_the_loop_records() -> None:
    """A measurement recorded the moment collect() lets go of the lock (the event loop can
    run between any two bytecodes of the reader thread) is in all of a point or none of it:
    count, buckets, sum and max agree."""
    mine = ours(exemplars=False)
    mine.record(0.001, GET)
    real = threading.Lock()
    recorded = []

    class RecordOnRelease:
        def __enter__(self) -> None:
            real.acquire()

        def __exit__(self, *_: object) -> None:
            real.release()
            if not recorded:
                recorded.append(True)
                mine.record(9.0, GET)

    mine._lock = RecordOnRelease()  # type: ignore[assignment]
    metric = mine.collect(time.time_ns())
    assert metric is not None and recorded
    [point] = metric.data.data_points
    assert (point.count, sum(point.bucket_counts), point.sum, point.max) == (1, 1, 0.001, 0.001)
