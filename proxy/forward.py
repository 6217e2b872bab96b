"""Forwarding: send an authorised operation to Cloud Storage and stream the answer back."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web

from proxy.errors import (
    BadRequest,
    CredentialsRefused,
    UpstreamError,
    UpstreamForbidden,
    UpstreamTimeout,
)
from proxy.gcs.bodies import Body
from proxy.gcs.build import response_headers, upstream_headers, upstream_target
from proxy.gcs.operation import Kind, Operation
from proxy.gcs.rawurl import encode_segment
from proxy.gcs.responses import KeepName, reshape
from proxy.limits import SlowClient
from proxy.retry import RetryPolicy, StreamedBody, retryable_status
from proxy.telemetry import inject
from proxy.upstream import (
    BodyLengthError,
    ReadTimeout,
    Response,
    StaleConnection,
    Upstream,
    UpstreamConnectionError,
    UpstreamTimeoutError,
)

MAX_JSON_RESPONSE = 64 << 20
SMALL_BODY = 64 << 10  # answers up to this size are relayed whole rather than streamed
_JSON_KINDS = frozenset(
    {
        Kind.GET,
        Kind.LIST,
        Kind.INSERT_MEDIA,
        Kind.INSERT_MULTIPART,
        Kind.RESUMABLE_CHUNK,
        Kind.PATCH,
        Kind.UPDATE,
        Kind.COPY,
        Kind.REWRITE,
        Kind.COMPOSE,
        Kind.MOVE,
        Kind.RESTORE,
        Kind.ACL,
    }
)


@dataclass(frozen=True)
class ResponsePlan:
    """How to treat Cloud Storage's answer: list filter and page tokens, session minting,
    the real upload id."""

    keep: KeepName = lambda _: True
    page_token: Callable[[str], str] | None = None
    mint_session: Callable[[str], str] | None = None
    upload_id: str | None = None


@dataclass
class Outcome:
    status: int = 0
    response_bytes: int = 0
    target: str = ""  # the upstream request target, once built


class Forwarder:
    """Requests rebuilt from operations, sent over the upstream's pooled connections."""

    def __init__(
        self,
        upstream: Upstream,
        retry: RetryPolicy | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.upstream = upstream
        self.base_url = upstream.base_url
        self.retry = retry or RetryPolicy()
        self.idle_timeout = idle_timeout  # a caller's body or download left idle this long: cut

    async def forward(
        self,
        request: web.BaseRequest,
        operation: Operation,
        body: Body,
        token: str,
        plan: ResponsePlan,
        outcome: Outcome,
    ) -> web.StreamResponse:
        reads_answer = operation.kind in _JSON_KINDS and operation.method != "HEAD"
        links = reads_answer or plan.mint_session is not None
        origin = _origin(request) if links else ""  # checked before anything is sent
        headers = upstream_headers(
            request.headers, token, operation.kind, reads_answer=reads_answer
        )
        headers.update(body.headers)
        inject(headers)
        target = outcome.target = upstream_target(operation, plan.upload_id)
        data = body.data
        if isinstance(data, AsyncIterator):
            data = StreamedBody(data, self.idle_timeout)
        try:
            async with await self._send(operation, target, headers, data) as upstream:
                outcome.status = upstream.status
                if upstream.status == 401:  # the sidecar's token, not the caller's
                    raise CredentialsRefused("Cloud Storage refused the proxy's credentials")
                if upstream.status == 403:
                    raise UpstreamForbidden(await _refusal_reason(upstream))
                if plan.mint_session is not None and upstream.status < 300:
                    return self._session_started(origin, operation, upstream, plan.mint_session)
                if reads_answer and upstream.status < 300:
                    return await self._json(origin, operation, upstream, plan, outcome)
                if upstream.status == 308:
                    # A resumable chunk taken, more to come: its Range says how far. Cloud
                    # Storage sends no body; one that came (fake-gcs-server sends the object,
                    # ACL and upstream links included) is not the sidecar's to relay.
                    kept = response_headers(upstream.headers)
                    for name in ("Content-Length", "Content-Type", "Content-Encoding"):
                        kept.popall(name, None)
                    return web.Response(status=308, headers=kept)
                return await self._stream(request, upstream, outcome)
        except UpstreamTimeoutError as exc:
            raise UpstreamTimeout("Cloud Storage did not answer in time") from exc
        except BodyLengthError as exc:
            raise BadRequest("the request body did not match its Content-Length") from exc
        except TimeoutError as exc:
            if isinstance(data, StreamedBody) and data.stalled:
                raise SlowClient(_stalled(self.idle_timeout)) from exc
            raise UpstreamTimeout("Cloud Storage did not answer in time") from exc
        except (ConnectionError, aiohttp.ClientPayloadError) as exc:
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the caller went away") from exc  # nothing to answer
            raise UpstreamError("could not reach Cloud Storage") from exc

    async def _send(
        self, operation: Operation, target: str, headers: dict[str, str], data: object
    ) -> Response:
        """Cloud Storage's answer, retried as its guidance allows (see proxy.retry)."""
        for attempt in self.retry.tries():
            try:
                upstream = await self.upstream.request(
                    operation.method,
                    target,
                    headers.items(),
                    data,  # type: ignore[arg-type]
                )
            except ReadTimeout:
                raise  # a read timeout already spent its budget: not retried
            except (UpstreamConnectionError, UpstreamTimeoutError) as exc:
                if not self.retry.may_retry(attempt, operation, data):
                    raise
                # A pooled connection the server had closed: resend at once (RFC 9112 9.3.1).
                stale = attempt == 1 and isinstance(exc, StaleConnection)
                await asyncio.sleep(0 if stale else self.retry.delay(attempt))
                continue
            if not retryable_status(upstream.status) or not self.retry.may_retry(
                attempt, operation, data
            ):
                return upstream
            upstream.release()
            await asyncio.sleep(self.retry.delay(attempt, upstream.headers.get("Retry-After")))
        raise AssertionError("unreachable: the last attempt always returns or raises")

    async def _json(
        self,
        origin: str,
        operation: Operation,
        upstream: Response,
        plan: ResponsePlan,
        outcome: Outcome,
    ) -> web.Response:
        raw = bytearray()
        async for chunk in upstream.chunks():
            raw += chunk
            if len(raw) > MAX_JSON_RESPONSE:
                raise UpstreamError("Cloud Storage sent an oversized metadata response")
        try:
            document = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise UpstreamError("Cloud Storage sent a malformed response") from exc
        document = reshape(document, origin, plan.keep, operation)
        if plan.page_token is not None and isinstance(document, dict):
            following = document.pop("nextPageToken", None)
            if isinstance(following, str) and following:
                document["nextPageToken"] = plan.page_token(following)
        payload = json.dumps(document).encode()
        outcome.response_bytes = len(payload)
        headers = response_headers(upstream.headers)
        headers.popall("Content-Type", None)
        headers.popall("Content-Encoding", None)
        if operation.kind is Kind.LIST:
            headers.popall("ETag", None)  # the filtered list is not the document upstream tagged
        return web.Response(
            status=upstream.status,
            body=payload,
            headers=headers,
            content_type="application/json",
            charset="UTF-8",
        )

    def _session_started(
        self,
        origin: str,
        operation: Operation,
        upstream: Response,
        mint: Callable[[str], str],
    ) -> web.Response:
        location = upstream.headers.get("Location", "")
        upload_ids = parse_qs(urlsplit(location).query).get("upload_id", [])
        if len(upload_ids) != 1 or not upload_ids[0]:
            raise UpstreamError("Cloud Storage did not open an upload session")
        handle = mint(upload_ids[0])
        path = f"/upload/storage/v1/b/{encode_segment(operation.bucket)}/o"
        proxied = f"{origin}{path}?uploadType=resumable&upload_id={handle}"
        headers = response_headers(upstream.headers)
        headers.popall("Content-Type", None)
        headers["Location"] = proxied
        return web.Response(status=upstream.status, headers=headers)

    async def _stream(
        self, request: web.BaseRequest, upstream: Response, outcome: Outcome
    ) -> web.StreamResponse:
        headers = response_headers(upstream.headers)
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and _has_body(request, upstream):
            # Read whole, so headers and body leave in one write; an upstream failure while
            # reading is still an error document (502/504), not a cut connection.
            body = await upstream.read()
            outcome.response_bytes = len(body)
            return web.Response(status=upstream.status, body=body, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        try:
            # Each chunk as it was received, never copied into a bigger one.
            async for chunk in upstream.chunks():
                async with asyncio.timeout(self.idle_timeout):
                    await response.write(chunk)
                outcome.response_bytes += len(chunk)
            async with asyncio.timeout(self.idle_timeout):
                await response.write_eof()  # a chunked answer's last chunk drains too
        except (UpstreamConnectionError, TimeoutError) as exc:
            # Headers are out: no error document can follow. Cutting the connection is the
            # only way to tell the caller its body is incomplete (never a clean end).
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("download cut short") from exc
        await _flushed(request, self.idle_timeout)
        return response


_REASON = re.compile(r"[A-Za-z]{1,64}")
_XML_CODE = re.compile(rb"<Code>([A-Za-z]{1,64})</Code>")


async def _refusal_reason(upstream: Response) -> str:
    """The reason of Cloud Storage's 403 (`forbidden`, `retentionPolicyNotMet`,
    `userProjectMissing`; an XML answer's `Code`), or `forbidden`."""
    raw = bytearray()
    async for chunk in upstream.chunks():
        raw += chunk
        if len(raw) > MAX_JSON_RESPONSE:
            return "forbidden"
    try:
        document = json.loads(raw)
    except ValueError:  # the XML API's answer: its Code, never text found elsewhere
        code = _XML_CODE.search(raw)
        reason = code.group(1).decode() if code else None
    else:
        try:
            reason = document["error"]["errors"][0]["reason"]
        except (LookupError, TypeError):
            reason = None
    return reason if isinstance(reason, str) and _REASON.fullmatch(reason) else "forbidden"


async def _flushed(request: web.BaseRequest, limit: float | None) -> None:
    """Wait until the tail of a body has left our buffers for the kernel's: a drain on
    SIGTERM ends the process once handlers return, and must not drop that tail."""
    transport = request.transport
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            while transport is not None and not transport.is_closing():
                if not transport.get_write_buffer_size():
                    return
                await asyncio.sleep(0.005)


def _has_body(request: web.BaseRequest, upstream: Response) -> bool:
    return request.method != "HEAD" and upstream.status not in (204, 304)


def _stalled(seconds: float | None) -> str:
    return f"the request body was idle for more than {seconds or 0:g} s"


def _origin(request: web.BaseRequest) -> str:
    """Where the caller reached the sidecar, for the links and session URLs answers carry:
    its Host header when that is a host name or address with an optional port (anything
    else is 400), else the address the connection came in on."""
    host = request.headers.get("Host")
    if host is None:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname:
            raise BadRequest("the request has no Host header")
        address, port = sockname[0], sockname[1]
        host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    elif not _usable_host(host):
        raise BadRequest("the Host header is not a host name or address")
    return f"{request.scheme}://{host}"


def _usable_host(host: str) -> bool:
    """A DNS name (underscores allowed, as container names have them; no empty label), an
    IPv4 address or a bracketed IPv6 literal without a zone, then an optional port 1-65535:
    nothing that changes what a URL means or that a URL parser refuses."""
    if host.startswith("["):
        literal, bracket, rest = host[1:].partition("]")
        if not bracket or "%" in literal or (rest and not rest.startswith(":")):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        colon, port = rest[:1], rest[1:]
    else:
        name, colon, port = host.partition(":")
        if len(name) > 253 or not _NAME.fullmatch(name):
            return False
    return not colon or (
        port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536
    )


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
