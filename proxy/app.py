"""App wiring: the data and admin applications and the request pipeline, in reading order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from opentelemetry import trace

from proxy import audit
from proxy.components import COMPONENTS, RECORD, Components
from proxy.errors import BadRequest, Forbidden, ProxyError, error_response
from proxy.forward import Body, Outcome, stream_body
from proxy.gcs.metadata import checked_metadata, parse_metadata, read_bounded
from proxy.gcs.multipart import read_multipart
from proxy.gcs.operation import Kind, Operation, parse_request
from proxy.observe import trace_and_audit
from proxy.policy import Access, Decision, Identity, PolicyIndex, Verb, evaluate, evaluate_all

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
__all__ = ["Components", "admin_app", "data_app", "upstream_session"]


# -- middlewares: error rendering (tracing and audit live in proxy.observe) -------------


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as error:
        return error_response(error)
    except web.HTTPException as exc:  # aiohttp's own 4xx (e.g. body too large)
        return error_response(_from_http_exception(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ProxyError("internal error"))


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    error = ProxyError(exc.reason)
    error.status = exc.status  # type: ignore[misc]
    return error


# -- the pipeline -----------------------------------------------------------------------


async def handle(request: web.Request) -> web.StreamResponse:
    """authenticate → parse → authorise → forward."""
    components = request.app[COMPONENTS]
    record: audit.AuditRecord = request[RECORD]
    tracer = components.telemetry.tracer
    with tracer.start_as_current_span("authenticate"):
        identity = await components.verifier.verify(request.headers)
    record.identity = _identity_fields(identity)
    operation, body = await parse(request, identity, components.policy)
    record.operation = operation.kind.value
    record.route = operation.route
    record.bucket, record.object, record.prefix = (
        operation.bucket,
        operation.object,
        operation.prefix,
    )
    with tracer.start_as_current_span("authorize"):
        operation = authorize(components.policy, identity, operation, record)
    token = await components.tokens.token()
    keep = _list_filter(components.policy, identity, operation)
    outcome = Outcome()
    with tracer.start_as_current_span("upstream", kind=trace.SpanKind.CLIENT) as span:
        try:
            return await components.forwarder.forward(
                request, operation, body, token, keep, outcome
            )
        finally:
            record.response_bytes = outcome.response_bytes
            span.set_attribute("http.response.status_code", outcome.status)


def _identity_fields(identity: Identity) -> dict[str, str]:
    fields = {"issuer": identity.issuer, "subject": identity.subject}
    if identity.email:
        fields["email"] = identity.email
    return fields


async def parse(
    request: web.Request, identity: Identity, policy: PolicyIndex
) -> tuple[Operation, Body]:
    """The operation and the upstream body; reads only bounded metadata, never media."""
    operation = parse_request(request.method, request.raw_path, request.headers)
    if (
        operation.user_project is not None
        and operation.user_project not in policy.policy.user_projects
    ):
        raise Forbidden(
            f"billing project {operation.user_project!r} may not be used through this proxy"
        )
    if operation.kind is Kind.INSERT_MEDIA:
        return operation, _media_body(request)
    if operation.kind is Kind.INSERT_MULTIPART:
        upload = await read_multipart(request.headers, request.content)
        metadata, name, extra = checked_metadata(
            upload.metadata, operation.bucket, operation.object
        )
        operation = _with_object(operation, name, Verb.WRITE, extra)
        content_type, data = upload.rebuilt(metadata)
        return operation, Body(data, (("Content-Type", content_type),))
    if operation.kind in {Kind.PATCH, Kind.UPDATE}:
        raw = await read_bounded(request.content.iter_any())
        metadata, _, extra = checked_metadata(
            parse_metadata(raw), operation.bucket, operation.object
        )
        operation = _with_object(operation, operation.object or "", Verb.METADATA, extra)
        import json

        return operation, Body(
            json.dumps(metadata).encode(), (("Content-Type", "application/json"),)
        )
    return operation, Body()


def _media_body(request: web.Request) -> Body:
    headers = [("Content-Type", request.headers.get("Content-Type", "application/octet-stream"))]
    if request.content_length is not None:
        headers.append(("Content-Length", str(request.content_length)))
    elif request.headers.get("Transfer-Encoding", "").lower() != "chunked":
        raise BadRequest("a media upload needs Content-Length or chunked encoding")
    return Body(stream_body(request.content), tuple(headers))


def _with_object(
    operation: Operation, name: str, verb: Verb, extra: tuple[Access, ...]
) -> Operation:
    from dataclasses import replace

    from proxy.gcs.rawurl import check_object_name

    check_object_name(name)
    accesses = (Access(verb, operation.bucket, name), *extra)
    return replace(operation, object=name, accesses=accesses)


def authorize(
    policy: PolicyIndex, identity: Identity, operation: Operation, record: audit.AuditRecord
) -> Operation:
    decision = evaluate_all(policy, identity, operation.accesses)
    _record_decision(record, decision, policy)
    if not decision.allowed:
        if policy.enforcing:
            raise Forbidden(_refusal(identity, decision))
        record.enforced = False
        return operation
    if operation.kind in {Kind.INSERT_MEDIA, Kind.INSERT_MULTIPART}:
        overwrite = Access(Verb.DELETE, operation.bucket, operation.object or "")
        if not evaluate(policy, identity, overwrite).allowed:
            # write without delete: create only, as Cloud Storage IAM would have it.
            return operation.with_param("ifGenerationMatch", "0")
    return operation


def _record_decision(record: audit.AuditRecord, decision: Decision, policy: PolicyIndex) -> None:
    record.verb = decision.access.verb.value
    record.resource = decision.access.resource
    record.decision = "allow" if decision.allowed else "deny"
    record.rule_id = decision.rule_id
    record.reason = decision.reason
    record.policy_revision = policy.revision


def _refusal(identity: Identity, decision: Decision) -> str:
    return f"{identity.display} does not have {decision.access.verb.value} access to {decision.access.resource}"


def _list_filter(
    policy: PolicyIndex, identity: Identity, operation: Operation
) -> Callable[[str], bool]:
    if operation.kind is not Kind.LIST or not policy.enforcing:
        return lambda _: True
    return lambda name: (
        evaluate(policy, identity, Access(Verb.LIST, operation.bucket, name)).allowed
    )


# -- assembly ---------------------------------------------------------------------------


def data_app(components: Components) -> web.Application:
    app = web.Application(middlewares=[trace_and_audit, render_errors], client_max_size=1 << 20)
    app[COMPONENTS] = components
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def admin_app(components: Components) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready = components.ready
        return web.json_response(
            {"ready": ready, "policy_revision": components.policy.revision},
            status=200 if ready else 503,
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def upstream_session(connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=300, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout, sock_read=read_timeout
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
    )
