"""The request pipeline's tracer: OpenTelemetry API spans without the SDK's per-span machinery.

The SDK's tracer costs about 60 us of CPU per span here (measured: a lock per attribute
call and per end, a sampler call, limits applied to every value, a second span object
built for the processors at `end()`, processor fan-out), and a request makes four. The
spans made here are API spans (`trace.Span`: they go into contexts, the propagator
injects them) and at the same time the finished-span record the SDK's exporters take
(the attributes `ReadableSpan` offers), handed to the SDK's own BatchSpanProcessor. What
stays the SDK's: the sampler (from OTEL_TRACES_SAMPLER), span limits (OTEL_SPAN_*,
OTEL_ATTRIBUTE_*), the batching thread and queue limits (OTEL_BSP_*), the exporters.

Differences from the SDK's spans, none of which the pipeline uses: no span processors
other than the one given (no `on_start`), no links, no exceptions recorded as events.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, SpanProcessor
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.util.types import Attributes, AttributeValue

log = logging.getLogger(__name__)
# By (sampled, random trace id): the SDK marks trace ids it generated (random, like ours)
# and keeps the mark of a parent's.
_FLAGS = {
    (sampled, random_id): TraceFlags(
        (TraceFlags.SAMPLED if sampled else 0) | (TraceFlags.RANDOM_TRACE_ID if random_id else 0)
    )
    for sampled in (False, True)
    for random_id in (False, True)
}
_SCALARS = (str, bool, int, float)
_PLAIN = frozenset(_SCALARS)
_UNSET = Status(StatusCode.UNSET)
_getrandbits = random.getrandbits
_time_ns = time.time_ns


def _inherits(sampler: Sampler) -> bool:
    """Whether the sampler's decision for a span with a local parent is the parent's.

    True of every sampler OTEL_TRACES_SAMPLER names without a plugin: the parent-based
    ones by definition (their local-parent delegates cannot be set from the environment),
    and always_on, always_off and traceidratio because they decide alike for every span
    of a trace. A sampler from a plugin is asked for every span."""
    from opentelemetry.sdk.trace import sampling

    kinds = (
        sampling.ParentBased,
        sampling.ParentBasedTraceIdRatio,
        sampling.StaticSampler,
        sampling.TraceIdRatioBased,
    )
    if type(sampler) not in kinds:
        return False
    if isinstance(sampler, sampling.ParentBased):
        # pylint: disable=protected-access
        local = (sampler._local_parent_sampled, sampler._local_parent_not_sampled)
        return local == (sampling.ALWAYS_ON, sampling.ALWAYS_OFF)
    return True


class Tracer(trace.Tracer):
    """Starts `Span`s and hands the sampled ones, once ended, to `processor`."""

    def __init__(
        self,
        *,
        resource: Resource,
        scope: InstrumentationScope,
        sampler: Sampler,
        limits: SpanLimits,
        processor: SpanProcessor,
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.sampler = sampler
        self.processor = processor
        self._inherit = _inherits(sampler)
        most = limits.max_span_attributes
        self.max_attributes: int = sys.maxsize if most is None else most
        self.max_length: int | None = limits.max_span_attribute_length

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is not None and not parent.is_valid:
            parent = None
        trace_state: TraceState | None
        if parent is None:
            trace_id = _getrandbits(128) or 1
            trace_state, random_id = None, True
        else:
            trace_id = parent.trace_id
            trace_state = parent.trace_state
            random_id = bool(parent.trace_flags & TraceFlags.RANDOM_TRACE_ID)
        if self._inherit and parent is not None and not parent.is_remote:
            sampled = recording = parent.trace_flags.sampled
        else:
            result = self.sampler.should_sample(
                context, trace_id, name, kind, attributes, links if links else None
            )
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            recording = result.decision is not Decision.DROP
            attributes = result.attributes
            trace_state = result.trace_state
        span_context = SpanContext(
            trace_id,
            _getrandbits(64) or 1,
            is_remote=False,
            trace_flags=_FLAGS[sampled, random_id],
            trace_state=trace_state,
        )
        if not recording:
            # As the SDK: a dropped span is not recorded, yet its context propagates.
            return NonRecordingSpan(span_context)
        span = Span(self, name, span_context, parent, kind, start_time or _time_ns())
        span.error_on_exit = set_status_on_exception
        if attributes:
            span.set_attributes(attributes)
        return span

    # The API types this with its private decorator; the protocol is the same.
    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=False,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class Span(trace.Span):
    """A recording span, and once ended the finished-span record exporters read."""

    __slots__ = (
        "_attributes",
        "_tracer",
        "context",
        "dropped_attributes",
        "end_time",
        "error_on_exit",
        "events",
        "kind",
        "name",
        "parent",
        "start_time",
        "status",
    )  # fmt: skip
    # What a ReadableSpan has that these spans never carry.
    links: Sequence[Any] = ()
    dropped_events = 0
    dropped_links = 0

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        start_time: int,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.start_time = start_time
        self.end_time: int | None = None
        self._attributes: dict[str, AttributeValue] = {}
        self.dropped_attributes = 0
        self.status = _UNSET
        self.events: list[Any] = []
        self.error_on_exit = True

    # -- what ReadableSpan offers the exporters ------------------------------------------

    @property
    def attributes(self) -> Mapping[str, AttributeValue]:
        return MappingProxyType(self._attributes)

    @property
    def resource(self) -> Resource:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._tracer.scope

    # -- trace.Span ----------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self.end_time is not None:
            log.warning("Setting attributes on an ended span.")
            return
        mine, tracer = self._attributes, self._tracer
        if tracer.max_length is None and len(mine) + len(attributes) <= tracer.max_attributes:
            # No limit can bite (what every span of the pipeline meets): plain values are
            # stored as they are, a key set again moving to the end as in `_set`.
            for key, value in attributes.items():
                if type(value) in _PLAIN:
                    if key in mine:
                        del mine[key]
                    mine[key] = value
                else:
                    self._set(key, value)
            return
        for key, value in attributes.items():
            self._set(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.end_time is not None:
            log.warning("Setting attribute on an ended span.")
            return
        self._set(key, value)

    def _set(self, key: str, value: AttributeValue) -> None:
        tracer, attributes = self._tracer, self._attributes
        kind = type(value)
        if kind is str or isinstance(value, str):  # str subclasses (StrEnum) are strings too
            if tracer.max_length is not None:
                value = value[: tracer.max_length]  # type: ignore[index]
        elif kind not in _SCALARS and not isinstance(value, _SCALARS):
            cleaned = _clean(value, tracer.max_length)
            if cleaned is None:
                log.warning("Invalid type %s for attribute %r: dropped", kind.__name__, key)
                self.dropped_attributes += 1
                return
            value = cleaned
        if not tracer.max_attributes:
            self.dropped_attributes += 1
            return
        # As the SDK's BoundedAttributes: a key set again moves to the end; when full, the
        # oldest pair makes room.
        if key in attributes:
            del attributes[key]
        elif len(attributes) >= tracer.max_attributes:
            del attributes[next(iter(attributes))]
            self.dropped_attributes += 1
        attributes[key] = value

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        from opentelemetry.sdk.trace import Event

        if self.end_time is None:
            self.events.append(Event(name, attributes, timestamp or _time_ns()))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET is never set, a description only with ERROR.
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        pass  # the pipeline records what it needs as attributes and status, never stacks

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time or _time_ns()
        self._tracer.processor.on_end(self)  # type: ignore[arg-type]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.error_on_exit and self.end_time is None:
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    def __repr__(self) -> str:
        return f"Span(name={self.name!r}, context={self.context!r})"


def _clean(value: Any, limit: int | None) -> Any:
    """A value that is not a plain scalar, as the SDK keeps it: its own (private) cleaning
    function, so that sequences, mappings, bytes and odd types come out as they would from
    the SDK's tracer. The pipeline never sets such values; None means dropped."""
    try:
        from opentelemetry.attributes import _clean_attribute_value
    except ImportError:  # a release without it: sequences of scalars only
        if isinstance(value, Sequence) and all(isinstance(v, _SCALARS) for v in value):
            return tuple(v[:limit] if isinstance(v, str) else v for v in value)
        return None
    return _clean_attribute_value(value, limit)
