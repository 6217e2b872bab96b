"""Per-request observability: the SERVER span and the audit record written when a request ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import trace

from proxy import audit
from proxy.components import COMPONENTS, RECORD
from proxy.telemetry import extract

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def trace_and_audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    components = request.app[COMPONENTS]
    record = audit.AuditRecord(
        method=request.method,
        path=request.raw_path.partition("?")[0],
        user_agent=request.headers.get("User-Agent"),
        remote_ip=request.remote,
    )
    request[RECORD] = record
    tracer = components.telemetry.tracer
    with tracer.start_as_current_span(
        f"{request.method}", kind=trace.SpanKind.SERVER, context=extract(request.headers)
    ) as span:
        try:
            response = await handler(request)
            record.status = response.status
            return response
        except BaseException:
            record.status = record.status or 499
            raise
        finally:
            _finish_span(span, record)
            if record.decision is not None or record.status == 401:
                record.policy_revision = components.policy.revision
                audit.write(record, components.project)


def _finish_span(span: trace.Span, record: audit.AuditRecord) -> None:
    context = span.get_span_context()
    if context.is_valid:
        record.trace_id = f"{context.trace_id:032x}"
        record.span_id = f"{context.span_id:016x}"
        record.sampled = context.trace_flags.sampled
    if not span.is_recording():
        return
    span.update_name(f"{record.method} {record.route}" if record.route else record.method)
    attributes: dict[str, str | int] = {
        "http.request.method": record.method,
        "url.path": record.path,
        "http.response.status_code": record.status,
        "authz.decision": record.decision or "deny",
        "authz.policy_revision": record.policy_revision or "",
    }
    optional = {
        "enduser.id": (record.identity or {}).get("email")
        or (record.identity or {}).get("subject"),
        "authz.verb": record.verb,
        "authz.rule_id": record.rule_id,
        "user_agent.original": record.user_agent,
        "client.address": record.remote_ip,
        "gcs.operation": record.operation,
        "http.route": record.route,
        "gcs.bucket": record.bucket,
        "gcs.object": record.object,
        "gcs.prefix": record.prefix,
    }
    span.set_attributes(attributes)
    span.set_attributes({k: v for k, v in optional.items() if v})
    if record.status >= 500:
        span.set_status(trace.StatusCode.ERROR)
