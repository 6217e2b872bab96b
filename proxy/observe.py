"""Per-request observability: the SERVER span and its steps, request metrics, the audit record."""

from __future__ import annotations

import re
import time
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from types import TracebackType

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from yarl import URL

from proxy import audit
from proxy.components import RECORD, Components
from proxy.errors import ProxyError
from proxy.forward import Outcome
from proxy.gcs.operation import Operation
from proxy.gcs.parse import KNOWN_PARAMS
from proxy.gcs.rawurl import CREDENTIAL_PARAMS
from proxy.limits import Handler
from proxy.metrics import NULL_METRICS, RequestFacts
from proxy.telemetry import extract

REDACTED = "REDACTED"
# Query parameters whose values are safe to log; any other value (upload handles,
# signatures, keys, tokens) is replaced by REDACTED.
SAFE_PARAMS = frozenset(
    {
        "alt", "prefix", "delimiter", "generation", "uploadType", "name", "projection",
        "maxResults", "versions", "startOffset", "endOffset", "matchGlob",
        "includeTrailingDelimiter", "includeFoldersAsPrefixes", "softDeleted", "fields",
        "prettyPrint", "userProject", "contentEncoding", "ifGenerationMatch",
        "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch",
    }
)  # fmt: skip
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# With no exporter every step is this shared no-op context: no span, no context switch.
_NOTHING: AbstractContextManager[None] = nullcontext()


def safe_query(raw_query: str) -> str:
    """The raw query with every value not known to be harmless replaced by REDACTED, and
    every name not known at all. A name outside the API's, or an item that is not
    `name=value`, may be a secret itself (a token alone, `<JWT>=x`). Known values are
    kept: the free-text ones (prefix, name, matchGlob, ...) unless they hold `?`, `;` or
    `=` (a client's second `?`: `prefix=a?access_token=<JWT>`), the others (alt, numbers,
    flags) only as one short word (`alt=media%3Faccess_token%3D<JWT>` is not one). A page
    token is a sealed handle, or whatever a caller put there."""
    if not raw_query:
        return ""
    parts = []
    for item in raw_query.split("&"):
        name, eq, value = item.partition("=")
        if not eq or not (name in _NAMED or name.lower() in CREDENTIAL_PARAMS):
            parts.append(f"{REDACTED}={REDACTED}" if eq else REDACTED)
        elif name in SAFE_PARAMS and (
            _WORD.fullmatch(value) or (name in _FREE_TEXT and _ONE_VALUE.fullmatch(value))
        ):
            parts.append(item)
        else:
            parts.append(f"{name}={REDACTED}")
    return "&".join(parts)


_NAMED = SAFE_PARAMS | KNOWN_PARAMS
_FREE_TEXT = frozenset(
    {"prefix", "delimiter", "name", "startOffset", "endOffset", "matchGlob", "fields",
     "userProject", "contentEncoding"}
)  # fmt: skip
_ONE_VALUE = re.compile(r"[^?;=#]*")
_WORD = re.compile(r"[A-Za-z0-9_-]{0,32}")


def http_route(route: str | None) -> str | None:
    """The path template of an operation's route (its `?alt=media`-style suffix dropped)."""
    return route.partition("?")[0] if route else None


async def trace_and_audit(
    request: web.BaseRequest, handler: Handler, components: Components
) -> web.StreamResponse:
    path, _, query = request.raw_path.partition("?")
    record = audit.AuditRecord(
        method=request.method,
        path=path,
        query=safe_query(query),
        user_agent=request.headers.get("User-Agent"),
        remote_ip=request.remote,
    )
    request[RECORD] = record
    with _server_span(request, components, record) as entered:
        span = entered or trace.INVALID_SPAN
        try:
            response = await handler(request)
            record.status = response.status
            if not record.response_bytes and isinstance(response, web.Response):
                record.response_bytes = len(response.body or b"")  # type: ignore[arg-type]
            return response
        except BaseException:
            record.status = record.status or 499
            raise
        finally:
            record.seconds = time.perf_counter() - record.started
            record.request_bytes = request.content.total_bytes
            _finish_span(span, record)
            _count(components, record)
            # Every decision, and every refusal of who the caller is or what it may touch.
            if record.decision is not None or record.status in (401, 403):
                record.policy_revision = record.policy_revision or components.policy.revision
                audit.write(record, components.project or components.telemetry.project)


def _tracing(tracer: trace.Tracer) -> bool:
    return type(tracer) is not trace.NoOpTracer


def _server_span(
    request: web.BaseRequest, components: Components, record: audit.AuditRecord
) -> AbstractContextManager[trace.Span | None]:
    tracer = components.telemetry.tracer
    parent = extract(request.headers) if "traceparent" in request.headers else None
    if not _tracing(tracer):
        if parent is None:
            return _NOTHING
        # Nothing recorded, but the caller's trace still reaches the audit record and upstream.
        return trace.use_span(trace.get_current_span(parent))
    span = tracer.start_span(
        request.method,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={
            "http.request.method": _method(request.method),
            "url.path": record.path,
            "url.scheme": request.scheme,
        },
        record_exception=False,
        set_status_on_exception=False,
    )
    return _Current(span)


class _Current:
    """`start_as_current_span` for a span already started, without its two generator-based
    context managers (measured per request): current on entry; ended on exit, exceptions
    neither recorded nor turned into a status (refusals are answers, not errors)."""

    __slots__ = ("_token", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]
        self.span.end()


def _method(method: str) -> str:
    return method if method in _KNOWN_METHODS else "_OTHER"


def _finish_span(span: trace.Span, record: audit.AuditRecord) -> None:
    context = span.get_span_context()
    if context.is_valid:
        record.trace_id = f"{context.trace_id:032x}"
        record.span_id = f"{context.span_id:016x}"
        record.sampled = context.trace_flags.sampled
    if not span.is_recording():
        return
    route = http_route(record.route)
    span.update_name(f"{_method(record.method)} {route}" if route else _method(record.method))
    attributes: dict[str, str | int] = {
        "http.response.status_code": record.status,
        "http.request.body.size": record.request_bytes,
        "http.response.body.size": record.response_bytes,
    }
    optional = {
        "url.query": record.query,
        "http.route": route,
        "user_agent.original": record.user_agent,
        "client.address": record.remote_ip,
        "enduser.id": record.who,
        "gcs.operation": record.operation,
        **_gcs_attributes(record),
        **_authz_attributes(record),
    }
    attributes.update({k: v for k, v in optional.items() if v})
    span.set_attributes(attributes)  # one call: the SDK takes its lock once per call
    if record.status >= 500:
        span.set_attribute("error.type", str(record.status))
        span.set_status(trace.StatusCode.ERROR)


def _gcs_attributes(record: audit.AuditRecord) -> dict[str, str | None]:
    return {"gcs.bucket": record.bucket, "gcs.object": record.object, "gcs.prefix": record.prefix}


def _authz_attributes(record: audit.AuditRecord) -> dict[str, str | None]:
    if record.decision is None:
        return {}
    return {
        "authz.verb": record.verb,
        "authz.resource": record.resource,
        "authz.decision": record.decision,
        "authz.enforced": "true" if record.enforced else "false",
        "authz.rule_id": record.rule_id,
        "authz.policy_revision": record.policy_revision,
    }


def _count(components: Components, record: audit.AuditRecord) -> None:
    metrics = components.telemetry.metrics
    if metrics is NULL_METRICS:
        return
    metrics.request(
        RequestFacts(
            method=_method(record.method),
            route=http_route(record.route),
            operation=record.operation,
            status=record.status,
            seconds=record.seconds or 0.0,
            bytes_in=record.request_bytes,
            bytes_out=record.response_bytes,
            decision=record.decision,
            verb=record.verb,
            enforced=record.enforced,
        )
    )


# -- the steps inside the SERVER span (used by proxy.app.handle) -----------------------
# Classes rather than @contextmanager generators: with an exporter they run three times
# per request, and a generator-based context manager costs several times a class's.


class _Step:
    """A child span; a refusal raised inside (401, 403) is an answer, not an error.

    Never made current (nothing inside starts spans or sends requests): that saves a
    context attach and detach per step on every request."""

    __slots__ = ("_record", "_span")

    def __init__(self, tracer: trace.Tracer, name: str, record: audit.AuditRecord) -> None:
        self._span = tracer.start_span(name, record_exception=False, set_status_on_exception=False)
        self._record = record

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        if span.is_recording():
            self._describe(span, exc)
        span.end()

    def _describe(self, span: trace.Span, exc: BaseException | None) -> None:
        pass


class _Authenticating(_Step):
    def _describe(self, span: trace.Span, exc: BaseException | None) -> None:
        if isinstance(exc, ProxyError):
            span.set_attribute("authn.result", f"rejected ({exc.status})")


class _Authorizing(_Step):
    def _describe(self, span: trace.Span, exc: BaseException | None) -> None:
        record = self._record
        attributes = {k: v for k, v in _authz_attributes(record).items() if v is not None}
        if record.who:
            attributes["enduser.id"] = record.who
        span.set_attributes(attributes)


def authenticating(tracer: trace.Tracer, record: audit.AuditRecord) -> AbstractContextManager[None]:
    return _Authenticating(tracer, "authenticate", record) if _tracing(tracer) else _NOTHING


def authorizing(tracer: trace.Tracer, record: audit.AuditRecord) -> AbstractContextManager[None]:
    return _Authorizing(tracer, "authorize", record) if _tracing(tracer) else _NOTHING


def calling_upstream(
    components: Components, operation: Operation, outcome: Outcome, record: audit.AuditRecord
) -> AbstractContextManager[None]:
    """The CLIENT span and metrics of one Cloud Storage call (HTTP client semantic conventions)."""
    telemetry = components.telemetry
    if _tracing(telemetry.tracer) or telemetry.metrics is not NULL_METRICS:
        return _CallingUpstream(components, operation, outcome, record)
    return _KeepResponseBytes(outcome, record)


class _KeepResponseBytes:
    __slots__ = ("_outcome", "_record")

    def __init__(self, outcome: Outcome, record: audit.AuditRecord) -> None:
        self._outcome, self._record = outcome, record

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._record.response_bytes = self._outcome.response_bytes


@lru_cache(maxsize=8)
def _server(base_url: str) -> tuple[str, int]:
    url = URL(base_url)
    return url.host or "", url.port or 0


class _CallingUpstream(_KeepResponseBytes):
    """The CLIENT span, current while the upstream request is made so that it carries this
    span's traceparent; with metrics but no traces, only the call's duration (the caller's
    trace, if any, is current already)."""

    __slots__ = ("_components", "_current", "_operation", "_started")

    def __init__(
        self,
        components: Components,
        operation: Operation,
        outcome: Outcome,
        record: audit.AuditRecord,
    ) -> None:
        super().__init__(outcome, record)
        self._components, self._operation = components, operation
        tracer = components.telemetry.tracer
        self._current: _Current | None = None
        if _tracing(tracer):
            span = tracer.start_span(
                "upstream",
                kind=trace.SpanKind.CLIENT,
                record_exception=False,
                set_status_on_exception=False,
            )
            self._current = _Current(span)
        self._started = 0.0

    def __enter__(self) -> None:
        if self._current is not None:
            self._current.__enter__()
        self._started = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._finish(exc)
        finally:
            if self._current is not None:
                self._current.__exit__(kind, exc, tb)

    def _finish(self, exc: BaseException | None) -> None:
        outcome = self._outcome
        span = self._current.span if self._current is not None else None
        error: str | None = None
        self._record.response_bytes = outcome.response_bytes
        if isinstance(exc, (ProxyError, ConnectionError, TimeoutError)):
            error = type(exc).__name__
            if span is not None:
                message = str(exc) if isinstance(exc, ProxyError) else ""
                span.set_status(trace.StatusCode.ERROR, message)
        elif outcome.status >= 500:
            error = str(outcome.status)
            if span is not None:
                span.set_status(trace.StatusCode.ERROR)
        components, operation = self._components, self._operation
        if span is not None and span.is_recording():
            _client_attributes(span, components, operation, outcome, error)
        metrics = components.telemetry.metrics
        if metrics is not NULL_METRICS:
            seconds = time.perf_counter() - self._started
            server, _ = _server(components.forwarder.base_url)
            metrics.upstream(operation.method, server, outcome.status, seconds, error)


def _client_attributes(
    span: trace.Span,
    components: Components,
    operation: Operation,
    outcome: Outcome,
    error: str | None,
) -> None:
    host, port = _server(components.forwarder.base_url)
    target = outcome.target.partition("?")[0]
    attributes: dict[str, str | int] = {
        "http.request.method": operation.method,
        "server.address": host,
        "server.port": port,
        "url.full": components.forwarder.base_url + target,
        "url.template": http_route(operation.route) or "",
        "http.response.body.size": outcome.response_bytes,
    }
    if outcome.status:
        attributes["http.response.status_code"] = outcome.status
    if error:
        attributes["error.type"] = error
    span.set_attributes(attributes)
