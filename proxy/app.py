"""App wiring: the data server, the admin application and the request pipeline, in reading order."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

from aiohttp import HttpVersion11, http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from proxy import audit
from proxy.components import RECORD, Components
from proxy.errors import (
    SERVER,
    BadRequest,
    CredentialsRefused,
    ExpectationFailed,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    error_body,
    error_response,
    json_error,
)
from proxy.forward import Outcome, ResponsePlan
from proxy.gcs.bodies import METADATA_BODIES, STREAMED_BODIES, Body, read_body
from proxy.gcs.operation import WRITES, Kind, Operation
from proxy.gcs.parse import parse_request
from proxy.gcs.sessions import InvalidSession, SessionSealer, UploadSession
from proxy.limits import Handler, Limits, body_deadline, limit_requests
from proxy.observe import authenticating, authorizing, calling_upstream, trace_and_audit
from proxy.policy import (
    Access,
    Decision,
    Identity,
    PolicyIndex,
    Verb,
    carved_out,
    evaluate,
    evaluate_all,
    granting_prefixes,
    may_be_granted,
)

log = logging.getLogger(__name__)
__all__ = ["Components", "admin_app", "data_server"]


# -- layers around the pipeline: error rendering (tracing and audit live in proxy.observe)


async def render_errors(request: web.BaseRequest, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as error:
        record: audit.AuditRecord | None = request.get(RECORD)
        if record is not None and record.reason is None and error.status in (401, 403):
            record.reason = error.summary  # refusals before a policy decision say why, too
        return error_response(error)
    except web.HTTPException as exc:  # aiohttp's own 4xx (e.g. body too large)
        return error_response(_from_http_exception(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ProxyError("internal error"))


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    kinds: dict[int, type[ProxyError]] = {
        400: BadRequest,
        404: NotFound,
        405: MethodNotAllowed,
        413: PayloadTooLarge,
    }
    return kinds.get(exc.status, BadRequest if exc.status < 500 else ProxyError)(exc.reason)


# -- the pipeline -----------------------------------------------------------------------


async def handle(
    request: web.BaseRequest, components: Components, limits: Limits
) -> web.StreamResponse:
    """authenticate → parse → authorise → forward."""
    # One revision decides the request, even across a reload: the one in force when the
    # decision is made, after any metadata body (a slow body must not outlast a revocation).
    policy = components.policy
    record: audit.AuditRecord = request[RECORD]
    tracer = components.telemetry.tracer
    waiting = _expects_continue(request)
    verifier = components.verifier
    with authenticating(tracer, record):
        identity = await verifier.verify(request.headers)
    record.identity = _identity_fields(identity)
    operation = parse_request(request.method, request.raw_path, request.headers)
    _describe(record, described := operation)  # a refusal from here on names what was asked
    _check_billing(operation, policy)
    session = _open_session(components.sessions, operation, identity)
    if session is not None:
        operation = _in_session(operation, session)
        _describe(record, described := operation)  # the session names the object
    operation = _open_page_token(components.sessions, operation, identity)
    if operation.kind in METADATA_BODIES and policy.enforcing:
        refusal = _refused_before_the_body(policy, identity, operation)
        if refusal is not None:
            with authorizing(tracer, record):
                _record_decision(record, refusal, policy)
                raise Forbidden(_refusal(identity, refusal))
    if waiting and operation.kind not in STREAMED_BODIES:
        await _continue(request)  # the metadata in the body is needed to decide
    operation, body = await _read_body(request, operation, limits)
    if components.policy is not policy:  # reloaded while the body came: the newest decides
        policy = components.policy
        _check_billing(operation, policy)
        if components.verifier is not verifier:  # and the issuers it trusts now say who
            identity = await components.verifier.verify(request.headers)
            record.identity = _identity_fields(identity)
    if operation is not described:  # the body (or a page token) may have named more
        _describe(record, operation)
    with authorizing(tracer, record):
        operation = authorize(policy, identity, operation, record)
    if waiting and operation.kind in STREAMED_BODIES:
        await _continue(request)  # authorised: now the media may come
    token = await components.tokens.token()
    plan = _plan(components.sessions, policy, identity, operation, session)
    outcome = Outcome()
    with calling_upstream(components, operation, outcome, record):
        try:
            return await components.forwarder.forward(
                request, operation, body, token, plan, outcome
            )
        except CredentialsRefused:
            components.tokens.refused(token)
            raise


def _expects_continue(request: web.BaseRequest) -> bool:
    """Whether the caller waits for 100 Continue before sending its body (RFC 9110 10.1.1).

    It is sent only once the body is needed: after authentication for bodies that carry
    metadata, after authorisation for media. A caller that is refused never sends it."""
    expect = request.headers.get("Expect")
    if expect is None or request.version != HttpVersion11:
        return False
    if expect.lower() != "100-continue":
        raise ExpectationFailed(f"unsupported expectation {expect[:32]!r}")
    return True


async def _continue(request: web.BaseRequest) -> None:
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # an interim answer: not part of the response's size


async def _read_body(
    request: web.BaseRequest, operation: Operation, limits: Limits
) -> tuple[Operation, Body]:
    limit = limits.max_metadata_bytes
    if not request.body_exists:  # nothing can arrive late: no deadline to keep
        return await read_body(operation, request.headers, request.content, limit)
    async with body_deadline(limits.body_timeout):
        return await read_body(operation, request.headers, request.content, limit)


def _identity_fields(identity: Identity) -> dict[str, str]:
    fields = {"issuer": identity.issuer, "subject": identity.subject}
    if identity.email:
        fields["email"] = identity.email
    if identity.hosted_domain:  # a Google token's domain: principal
        fields["hd"] = identity.hosted_domain
    return fields


def _describe(record: audit.AuditRecord, operation: Operation) -> None:
    record.operation = operation.kind.value
    record.route = operation.route
    record.bucket, record.object, record.prefix = (
        operation.bucket,
        operation.object,
        operation.prefix,
    )
    path = operation.object if operation.object is not None else operation.prefix
    if record.verb is None and operation.bucket and path is not None:
        record.resource = f"gs://{operation.bucket}/{path}"  # until a decision names its own


def _check_billing(operation: Operation, policy: PolicyIndex) -> None:
    project = operation.user_project
    if project is not None and project not in policy.policy.user_projects:
        raise Forbidden(f"billing project {project!r} may not be used through this proxy")


def _open_session(
    sealer: SessionSealer, operation: Operation, identity: Identity
) -> UploadSession | None:
    if operation.upload_handle is None:
        return None
    session = sealer.open(operation.upload_handle)
    if session.bucket != operation.bucket:
        raise InvalidSession("no such upload session")
    if (session.issuer, session.subject) != (identity.issuer, identity.subject):
        raise Forbidden("this upload session belongs to another identity")
    return session


def _open_page_token(sealer: SessionSealer, operation: Operation, identity: Identity) -> Operation:
    """A list's pageToken is one of ours (see _plan): the upstream token it seals, or 400."""
    if operation.kind is not Kind.LIST:
        return operation
    handle = dict(operation.params).get("pageToken")
    if handle is None:
        return operation
    listing = _listing(operation)
    token = sealer.open_page(handle, identity.issuer, identity.subject, operation.bucket, listing)
    return operation.with_param("pageToken", token)


# Parameters of a listing that do not change which entries it holds, or where.
_PAGING = frozenset({"pageToken", "maxResults", "fields", "prettyPrint"})


def _listing(operation: Operation) -> str:
    """The parameters that make a listing what it is, canonically (JSON: no value can
    pass for another pair): a page token from one listing must not continue another (a
    review replayed a token pointing into a deny carve-out under other parameters)."""
    return json.dumps(sorted((k, v) for k, v in operation.params if k not in _PAGING))


def _in_session(operation: Operation, session: UploadSession) -> Operation:
    """A chunk or status query needs what the session was opened with, decided again with
    the policy of now: `write`, and `delete` if it may replace an object, `admin` if it
    carries an ACL, retention, hold or KMS key (a review saw a week-long session keep both
    after a reload took them away). A cancel needs `write` only: it writes nothing, and a
    caller who may no longer finish a session may still end it."""
    verbs = [Verb.WRITE]
    if operation.kind is not Kind.RESUMABLE_CANCEL:  # discarding one writes nothing
        verbs += [Verb.DELETE] if session.replaces else []
        verbs += [Verb.ADMIN] if session.privileged else []
    accesses = tuple(Access(verb, session.bucket, session.object) for verb in verbs)
    return replace(operation, object=session.object, accesses=accesses)


def _refused_before_the_body(
    policy: PolicyIndex, identity: Identity, operation: Operation
) -> Decision | None:
    """What the URL already says is decided before a metadata body is read, so a caller
    with no grant there cannot hold a request slot for the body timeout. The body only
    adds needs (its names must agree with the URL's), so a refusal here is final; an
    allowance is not, and leaves no trace: `authorize` decides once the body is in."""
    if operation.accesses:
        decision = evaluate_all(policy, identity, operation.accesses)
        return None if decision.allowed else decision
    bucket = operation.bucket  # an upload naming its object in the body only
    if may_be_granted(policy, identity, Verb.WRITE, bucket):
        return None
    reason = f"no rule grants write on any object of gs://{bucket}/"
    return Decision(False, Access(Verb.WRITE, bucket, ""), None, reason)


def authorize(
    policy: PolicyIndex, identity: Identity, operation: Operation, record: audit.AuditRecord
) -> Operation:
    decision = evaluate_all(policy, identity, operation.accesses)
    if decision.allowed and operation.kind is Kind.LIST:
        region = _granted_region(identity, decision)
        probes = _carve_out_probes(policy, identity, operation, region)
        if probes:
            refused = Decision(False, decision.access, None, f"{probes} over a deny carve-out")
            _record_decision(record, refused, policy)
            if policy.enforcing:
                raise Forbidden(
                    f"{identity.display} may not use {probes} listing {refused.access.resource}"
                )
            record.enforced = False  # audit mode: logged as the refusal it would be
            return operation
    _record_decision(record, decision, policy)
    if not decision.allowed:
        if policy.enforcing:
            raise Forbidden(_refusal(identity, decision))
        record.enforced = False
        return operation
    if operation.kind in WRITES:
        overwrite = Access(Verb.DELETE, operation.bucket, operation.object or "")
        if not evaluate(policy, identity, overwrite).allowed:
            # write without delete: create only, as Cloud Storage IAM would have it.
            return operation.with_param("ifGenerationMatch", "0")
    return operation


def _carve_out_probes(
    policy: PolicyIndex, identity: Identity, operation: Operation, access: Access
) -> str:
    """The list filter drops what a deny rule hides inside a granted prefix, but each
    dropped item still shapes its page (an empty or short page with a next token). With
    offsets, a glob or a delimiter chosen freely, a caller could probe that shape and
    spell out hidden names (found by reviews). Over such a carve-out those are
    refused; the folder view (delimiter "/") stays, folding a carve-out into one entry.
    The parameters to refuse, in words; empty if none."""
    probes = {
        name
        for name, value in operation.params
        if (name in _PROBES and value != "false")  # booleans arrive lowercased
        or (name == "delimiter" and value not in ("/", ""))
    }
    if not probes or not carved_out(policy, identity, access):
        return ""
    return ", ".join(sorted(probes))


def _granted_region(identity: Identity, decision: Decision) -> Access:
    """Where to look for carve-outs a listing's probes could reach: under the folder asked
    for (a prefix ending in `/`), else under the whole prefix of the rule that allowed it.
    A refusal that depended on any prefix asked for would let a caller grow it a letter at
    a time and spell out a hidden folder from 403s (a review did, in 342 requests, with
    nothing stored there). A folder named whole still tells whether something under it
    is hidden: a guessed name is confirmed (as listing it is, where the deny covers
    `list`), never spelled out."""
    access = decision.access
    if access.path.endswith("/") or not access.path or decision.rule is None:
        return access
    granted = granting_prefixes(decision.rule, identity, access.path)
    return Access(access.verb, access.bucket, min(granted, key=len, default=access.path))


# List parameters that choose where a listing starts, which names it matches or how it
# folds them: with "delimiter" (other than "/") refused over deny carve-outs.
# includeTrailingDelimiter stays allowed: it acts only with a delimiter, and over a
# carve-out that can only be "/" (the folder view of google-cloud-storage sets it).
_PROBES = frozenset({"startOffset", "endOffset", "matchGlob", "includeFoldersAsPrefixes"})


def _plan(
    sealer: SessionSealer,
    policy: PolicyIndex,
    identity: Identity,
    operation: Operation,
    session: UploadSession | None,
) -> ResponsePlan:
    if operation.kind is Kind.LIST:
        bucket = operation.bucket

        listing = _listing(operation)

        def seal(token: str) -> str:
            # The next page's token names an object, maybe one the caller may not see.
            return sealer.seal_page(identity.issuer, identity.subject, bucket, listing, token)

        if not policy.enforcing:
            return ResponsePlan(page_token=seal)
        return ResponsePlan(
            keep=lambda name: evaluate(policy, identity, Access(Verb.LIST, bucket, name)).allowed,
            page_token=seal,
        )
    if operation.kind is Kind.RESUMABLE_START:
        bucket, name = operation.bucket, operation.object or ""
        # Create-only sent upstream: the session can never replace an object. Privileged
        # by a parameter (predefinedAcl) or by its metadata body (acl, holds, KMS key).
        replaces = operation.param("ifGenerationMatch") != "0"
        privileged = operation.privileged or any(a.verb is Verb.ADMIN for a in operation.accesses)
        return ResponsePlan(
            mint_session=lambda upload_id: sealer.new(
                identity.issuer,
                identity.subject,
                bucket,
                name,
                upload_id,
                replaces=replaces,
                privileged=privileged,
            )
        )
    if session is not None:
        return ResponsePlan(upload_id=session.upload_id)
    return ResponsePlan()


def _record_decision(record: audit.AuditRecord, decision: Decision, policy: PolicyIndex) -> None:
    record.verb = decision.access.verb.value
    record.resource = decision.access.resource
    record.decision = "allow" if decision.allowed else "deny"
    record.rule_id = decision.rule_id
    record.reason = decision.reason
    record.policy_revision = policy.revision
    if decision.checks:
        record.checks = [
            {
                "verb": check.access.verb.value,
                "resource": check.access.resource,
                "decision": "allow" if check.allowed else "deny",
                "rule_id": check.rule_id,
            }
            for check in decision.checks
        ]


def _refusal(identity: Identity, decision: Decision) -> str:
    access = decision.access
    if not access.path and access.verb is Verb.WRITE:  # the object is named in a body not yet read
        return f"{identity.display} does not have write access to any object of {access.resource}"
    return f"{identity.display} does not have {access.verb.value} access to {access.resource}"


# -- assembly ---------------------------------------------------------------------------


def data_server(components: Components, limits: Limits | None = None, **options: Any) -> web.Server:
    """The data port: aiohttp's low-level server in front of the pipeline, with no router
    and no middleware machinery (an Application costs ~40 us more per request here; every
    target goes to the pipeline anyway, which parses the raw path, encoded newlines and all).

    Layers, outermost first: limits, then tracing and audit, then error rendering."""
    limits = limits or Limits()
    limit = limit_requests(limits)

    async def pipeline(request: web.BaseRequest) -> web.StreamResponse:
        return await handle(request, components, limits)

    async def errors(request: web.BaseRequest) -> web.StreamResponse:
        return await render_errors(request, pipeline)

    async def traced(request: web.BaseRequest) -> web.StreamResponse:
        return await trace_and_audit(request, errors, components)

    async def limited(request: web.BaseRequest) -> web.StreamResponse:
        return await limit(request, traced)

    return _Server(limited, access_log=None, **options)


# What was wrong, by the parser's exception: never its message, which quotes the bytes.
_REFUSED_HEADS: dict[type[BaseException], str] = {
    http_exceptions.LineTooLong: "the request line or a header is too long",
    http_exceptions.InvalidHeader: "a header is not valid",
    http_exceptions.BadHttpMethod: "the method is not an HTTP method",
    http_exceptions.BadStatusLine: "the request line is not valid",
    http_exceptions.InvalidURLError: "the request target is not valid",
    http_exceptions.TransferEncodingError: "the chunked body is not valid",
    http_exceptions.ContentLengthError: "the body does not match its length",
}


class _Server(web.Server):
    """aiohttp's low-level server whose connections answer its own refusals our way."""

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class _Connection(RequestHandler):
    """What aiohttp answers itself, the pipeline never seeing the request (a head that is
    not valid HTTP/1.1; an exception that escaped the pipeline), in the GCS error shape.

    aiohttp's own answer and its log line quote the parser's message, which quotes the
    offending bytes: a bearer token or a CSEK key with a stray control byte, a folded
    Authorization header, a whole head with bare LF line ends. Neither is kept here."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400:
            said = _REFUSED_HEADS.get(type(exc), "not valid HTTP/1.1") if exc else "not valid"
            # A first line that is no HTTP at all (a TLS hello, a port scan) is noise.
            quiet = isinstance(exc, http_exceptions.BadHttpMethod) and self._request_count == 1
            (log.debug if quiet else log.warning)(
                "refused a malformed HTTP request from %s (%s)",
                request.remote,
                type(exc).__name__ if exc else "bad request",
            )
            body = BadRequest(f"Malformed HTTP request: {said}").body()
        else:  # the pipeline renders its own errors: this is a defect, worth a traceback
            log.error("error %s answering a request from %s", status, request.remote, exc_info=exc)
            body = error_body(status, ProxyError.reason, "internal error")  # as render_errors
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, drop the link
            raise ConnectionError("an answer was already under way")
        response = json_error(status, body)
        response.force_close()
        return response


def admin_app(components: Components) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready = components.ready
        return web.json_response(
            {"ready": ready, "policy_revision": components.policy.revision},
            status=200 if ready else 503,
        )

    async def named(_: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER  # as on the data port: no versions announced

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_response_prepare.append(named)
    return app
