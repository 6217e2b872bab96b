"""Metrics over OTLP: requests, decisions, latency, bytes, upstream errors, token refreshes, reloads."""

from __future__ import annotations

import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from opentelemetry.sdk.metrics.export import Metric, MetricExporter, MetricsData
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

PREFIX = "gcs_iap_proxy"
# Seconds; the SDK's default boundaries are meant for milliseconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip


class CountsRefreshes(Protocol):
    """An upstream token source that counts its refreshes (proxy.credentials.AdcTokenSource)."""

    @property
    def refreshes(self) -> int: ...


class CountsReloads(Protocol):
    """Policy reload outcomes so far (proxy.reload's ReloadStats)."""

    @property
    def ok(self) -> int: ...

    @property
    def failed(self) -> int: ...


@dataclass
class Watched:
    """Counters owned by other components, read by observable instruments at export time.

    Set `tokens` to the token source and `reloads` to the policy reloader's stats; either
    may stay None (then that metric is simply not reported).
    """

    tokens: CountsRefreshes | None = None
    reloads: CountsReloads | None = None


@dataclass(frozen=True)
class RequestFacts:
    """What the metrics need from one finished request."""

    method: str
    route: str | None
    operation: str | None
    status: int
    seconds: float
    bytes_in: int
    bytes_out: int
    decision: str | None
    verb: str | None
    enforced: bool


class Metrics:
    """The no-op metrics used when no exporter is configured: every call returns at once."""

    def request(self, facts: RequestFacts) -> None:
        pass

    def upstream(
        self, method: str, server: str, status: int, seconds: float, error: str | None
    ) -> None:
        pass


NULL_METRICS = Metrics()
Key = tuple[tuple[str, str | int | bool], ...]


class _Tally:
    """A monotonic sum per attribute set, kept in process and reported by an observable
    counter at export time: a dict update per request instead of an SDK measurement (each
    of which takes a lock, hashes its attributes and offers an exemplar: ~20 us here).
    The exported points are the same cumulative monotonic sums a Counter would give."""

    def __init__(self) -> None:
        self._sums: dict[Key, int] = {}

    def add(self, amount: int, key: Key) -> None:
        self._sums[key] = self._sums.get(key, 0) + amount

    def observe(self, _: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        sums = self._sums.copy()  # one C-level copy: safe against the event loop's updates
        return [Observation(value, dict(key)) for key, value in sums.items()]


def exemplars_on(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("OTEL_METRICS_EXEMPLAR_FILTER", "").strip().lower() != "always_off"


def own_histograms(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the latency histograms can be kept in process (`Histogram`) rather than by
    SDK instruments: with the settings a default configuration has (cumulative
    temporality, explicit buckets, exemplars from sampled spans or none). Any other
    OTEL_* choice is the SDK's to honour, so its instruments are used then."""

    def setting(name: str) -> str:
        return env.get(name, "").strip().lower()

    return (
        setting("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE") in ("", "cumulative")
        and setting("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION")
        in ("", "explicit_bucket_histogram")
        and setting("OTEL_METRICS_EXEMPLAR_FILTER") in ("", "trace_based", "always_off")
    )


CARDINALITY_LIMIT = 2000  # the SDK's default: attribute sets per instrument
_OVERFLOW: Key = (("otel.metric.overflow", True),)


class _Point:
    __slots__ = ("count", "counts", "exemplars", "max", "min", "start", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.count, self.sum = 0, 0.0
        self.min, self.max = math.inf, -math.inf
        self.start = time.time_ns()
        self.exemplars: dict[int, tuple[float, int, int, int]] = {}


class Histogram:
    """An explicit-bucket histogram per attribute set, kept in process and exported by
    `HistogramReader` as the SDK's own data points: a bisect and a few adds per
    measurement, where an SDK `Histogram.record` costs ~20 us here (it copies and hashes
    the attributes, takes locks, offers an exemplar through three layers).

    What the SDK's default configuration gives, and only that (see `own_histograms`):
    cumulative points from each attribute set's first measurement, min and max, and per
    bucket the last measurement made under a sampled span since the previous export as
    an exemplar (its trace_based filter with the aligned-bucket reservoir)."""

    def __init__(
        self,
        name: str,
        unit: str,
        description: str,
        bounds: Sequence[float],
        *,
        exemplars: bool,
    ) -> None:
        self.name, self.unit, self.description = name, unit, description
        self._bounds = tuple(bounds)
        self._exemplars = exemplars
        self._points: dict[Key, _Point] = {}
        self._lock = threading.Lock()

    def record(self, value: float, key: Key) -> None:
        if not 0 <= value < math.inf:
            return  # as the SDK: negative, NaN and infinite measurements are dropped
        index = bisect_left(self._bounds, value)  # bucket i holds (bounds[i-1], bounds[i]]
        exemplar = None
        if self._exemplars:
            context = trace.get_current_span().get_span_context()
            if context.is_valid and context.trace_flags.sampled:
                exemplar = (value, time.time_ns(), context.span_id, context.trace_id)
        with self._lock:
            point = self._points.get(key)
            if point is None:
                if len(self._points) >= CARDINALITY_LIMIT:  # as the SDK: one overflow point
                    key = _OVERFLOW
                    point = self._points.get(key)
                if point is None:
                    point = self._points[key] = _Point(len(self._bounds) + 1)
            point.counts[index] += 1
            point.count += 1
            point.sum += value
            point.min = min(point.min, value)
            point.max = max(point.max, value)
            if exemplar is not None:
                point.exemplars[index] = exemplar

    def collect(self, now: int) -> Metric | None:
        """The points so far (None before the first measurement); exemplars start afresh."""
        from opentelemetry.sdk.metrics import Exemplar
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            HistogramDataPoint,
            Metric,
        )
        from opentelemetry.sdk.metrics.export import Histogram as HistogramData

        with self._lock:  # every field of a point read together: the loop keeps recording
            taken = [
                (key, p.start, tuple(p.counts), p.sum, p.min, p.max, sorted(p.exemplars.items()))
                for key, p in self._points.items()
            ]
            for point in self._points.values():
                point.exemplars = {}
        if not taken:
            return None
        points = [
            HistogramDataPoint(
                attributes=dict(key),
                start_time_unix_nano=min(start, now),
                time_unix_nano=now,
                count=sum(counts),
                sum=total,
                bucket_counts=counts,
                explicit_bounds=self._bounds,
                min=low,
                max=high,
                exemplars=[
                    Exemplar({}, value, at, span_id, trace_id)
                    for _, (value, at, span_id, trace_id) in exemplars
                ],
            )
            for key, start, counts, total, low, high, exemplars in taken
        ]
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=HistogramData(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


def histogram_reader(
    exporter: MetricExporter,
    histograms: Callable[[], Sequence[Histogram]],
    scope: InstrumentationScope,
) -> Any:
    """A PeriodicExportingMetricReader (OTEL_METRIC_EXPORT_INTERVAL and _TIMEOUT apply)
    that adds `histograms()`' points to what the SDK collected, under `scope`.

    They ride along with the SDK's collections: one that finds nothing in the SDK's own
    instruments is not exported (MetricReader.collect is final). In the proxy every
    request counts itself in an SDK-collected counter when it ends, so that is only ever
    a first request still in flight, and its points, cumulative, leave with the next."""
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader, ScopeMetrics

    class HistogramReader(PeriodicExportingMetricReader):
        def _receive_metrics(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> None:
            now = time.time_ns()
            ours = [m for m in (h.collect(now) for h in histograms()) if m is not None]
            if ours:
                metrics_data = _merged(metrics_data, ours)
            super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    def _merged(data: MetricsData, ours: list[Metric]) -> MetricsData:
        # The SDK's collection has one ResourceMetrics, the provider's (never an empty list).
        first, *others = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scoped in enumerate(scopes):
            if scoped.scope == scope:
                scopes[i] = replace(scoped, metrics=[*scoped.metrics, *ours])
                break
        else:
            scopes.append(ScopeMetrics(scope, ours, scope.schema_url or ""))
        return replace(data, resource_metrics=[replace(first, scope_metrics=scopes), *others])

    return HistogramReader(exporter)


class OtlpMetrics(Metrics):
    """Instruments on an SDK meter; the meter provider's reader exports them periodically.
    The two latency histograms are `Histogram`s kept in process when `own` is true (the
    reader must then be `histogram_reader(..., self.histograms, ...)`), else SDK ones."""

    def __init__(
        self, meter: Meter, watched: Watched, *, own: bool = False, exemplars: bool = True
    ) -> None:
        self._watched = watched
        self._exemplars = exemplars  # for the histograms kept in process
        self.histograms: list[Histogram] = []
        self._requests, self._decisions, self._bytes = _Tally(), _Tally(), _Tally()
        meter.create_observable_counter(
            f"{PREFIX}.requests",
            [self._requests.observe],
            unit="{request}",
            description="Requests by route and status",
        )
        self._duration = self._histogram(
            meter,
            own,
            "http.server.request.duration",
            "Time from request to the last byte of the response",
        )
        meter.create_observable_counter(
            f"{PREFIX}.decisions",
            [self._decisions.observe],
            unit="{decision}",
            description="Policy decisions by outcome",
        )
        meter.create_observable_counter(
            f"{PREFIX}.bytes",
            [self._bytes.observe],
            unit="By",
            description="Body bytes received from and sent to callers",
        )
        self._upstream_duration = self._histogram(
            meter,
            own,
            "http.client.request.duration",
            "Cloud Storage calls, until the response body was relayed",
        )
        self._upstream_errors = meter.create_counter(
            f"{PREFIX}.upstream.errors",
            unit="{error}",
            description="Cloud Storage calls that failed or answered 5xx",
        )
        meter.create_observable_counter(
            f"{PREFIX}.upstream.token_refreshes",
            [self._token_refreshes],
            unit="{refresh}",
            description="Upstream access tokens obtained from Application Default Credentials",
        )
        meter.create_observable_counter(
            f"{PREFIX}.policy.reloads",
            [self._reloads],
            unit="{reload}",
            description="Policy reloads by outcome",
        )

    def _histogram(self, meter: Meter, own: bool, name: str, description: str) -> Any:
        if not own:
            sdk = meter.create_histogram(
                name,
                unit="s",
                description=description,
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
            )
            return lambda value, key: sdk.record(value, dict(key))
        histogram = Histogram(name, "s", description, LATENCY_BUCKETS, exemplars=self._exemplars)
        self.histograms.append(histogram)
        return histogram.record

    def request(self, facts: RequestFacts) -> None:
        attributes: dict[str, str | int] = {
            "http.request.method": facts.method,
            "http.response.status_code": facts.status,
        }
        if facts.route:
            attributes["http.route"] = facts.route
        if facts.operation:
            attributes["gcs.operation"] = facts.operation
        key = tuple(attributes.items())
        self._requests.add(1, key)
        self._duration(facts.seconds, key)
        route: Key = (("http.route", facts.route),) if facts.route else ()
        if facts.bytes_in:
            self._bytes.add(facts.bytes_in, (("network.io.direction", "receive"), *route))
        if facts.bytes_out:
            self._bytes.add(facts.bytes_out, (("network.io.direction", "transmit"), *route))
        if facts.decision is not None:
            self._decisions.add(
                1,
                (
                    ("authz.decision", facts.decision),
                    ("authz.verb", facts.verb or ""),
                    ("authz.enforced", facts.enforced),
                ),
            )

    def upstream(
        self, method: str, server: str, status: int, seconds: float, error: str | None
    ) -> None:
        attributes: dict[str, str | int] = {"http.request.method": method, "server.address": server}
        if status:
            attributes["http.response.status_code"] = status
        if error:
            attributes["error.type"] = error
            self._upstream_errors.add(1, {"error.type": error, "server.address": server})
        self._upstream_duration(seconds, tuple(attributes.items()))

    def _token_refreshes(self, _: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        tokens = self._watched.tokens
        return [] if tokens is None else [Observation(tokens.refreshes)]

    def _reloads(self, _: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        reloads = self._watched.reloads
        if reloads is None:
            return []
        return [
            Observation(reloads.ok, {"outcome": "ok"}),
            Observation(reloads.failed, {"outcome": "failed"}),
        ]
