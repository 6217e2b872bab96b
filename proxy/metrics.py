"""Metrics over OTLP: requests, decisions, latency, bytes, upstream errors, token refreshes, reloads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

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


class OtlpMetrics(Metrics):
    """Instruments on an SDK meter; the meter provider's reader exports them periodically."""

    def __init__(self, meter: Meter, watched: Watched) -> None:
        self._watched = watched
        self._requests, self._decisions, self._bytes = _Tally(), _Tally(), _Tally()
        meter.create_observable_counter(
            f"{PREFIX}.requests",
            [self._requests.observe],
            unit="{request}",
            description="Requests by route and status",
        )
        self._duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Time from request to the last byte of the response",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
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
        self._upstream_duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Cloud Storage calls, until the response body was relayed",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
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

    def request(self, facts: RequestFacts) -> None:
        attributes: dict[str, str | int] = {
            "http.request.method": facts.method,
            "http.response.status_code": facts.status,
        }
        if facts.route:
            attributes["http.route"] = facts.route
        if facts.operation:
            attributes["gcs.operation"] = facts.operation
        self._requests.add(1, tuple(attributes.items()))
        self._duration.record(facts.seconds, attributes)
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
        self._upstream_duration.record(seconds, attributes)

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
