"""Forwarding: send an authorised operation to Cloud Storage and stream the answer back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.gcs.build import response_headers, upstream_headers, upstream_target
from proxy.gcs.operation import Kind, Operation
from proxy.gcs.responses import KeepName, reshape_list, reshape_object
from proxy.telemetry import inject

STREAM_CHUNK = 1 << 20
MAX_JSON_RESPONSE = 64 << 20
_JSON_KINDS = frozenset(
    {Kind.GET, Kind.LIST, Kind.INSERT_MEDIA, Kind.INSERT_MULTIPART, Kind.PATCH, Kind.UPDATE}
)


@dataclass(frozen=True)
class Body:
    """What goes upstream as the request body, with the headers that describe it."""

    data: Any = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class Outcome:
    status: int = 0
    response_bytes: int = 0


class Forwarder:
    """The upstream HTTP client: one pooled session, requests rebuilt from operations."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")

    async def forward(
        self,
        request: web.Request,
        operation: Operation,
        body: Body,
        token: str,
        keep: KeepName,
        outcome: Outcome,
    ) -> web.StreamResponse:
        headers = upstream_headers(request.headers, token)
        headers.update(body.headers)
        inject(headers)
        url = URL(self.base_url + upstream_target(operation), encoded=True)
        try:
            async with self.session.request(
                operation.method, url, headers=headers, data=body.data, allow_redirects=False
            ) as upstream:
                outcome.status = upstream.status
                if (
                    operation.kind in _JSON_KINDS
                    and upstream.status < 300
                    and operation.method != "HEAD"
                ):
                    return await self._json(request, operation, upstream, keep, outcome)
                return await self._stream(request, upstream, outcome)
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamTimeout("Cloud Storage did not answer in time") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout("Cloud Storage did not answer in time") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            if request.transport is None or request.transport.is_closing():
                raise  # the caller went away; nothing left to answer
            raise UpstreamError("could not reach Cloud Storage") from exc

    async def _json(
        self,
        request: web.Request,
        operation: Operation,
        upstream: aiohttp.ClientResponse,
        keep: KeepName,
        outcome: Outcome,
    ) -> web.Response:
        raw = await upstream.content.read(MAX_JSON_RESPONSE + 1)
        if len(raw) > MAX_JSON_RESPONSE:
            raise UpstreamError("Cloud Storage sent an oversized metadata response")
        try:
            document = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise UpstreamError("Cloud Storage sent a malformed response") from exc
        origin = f"{request.scheme}://{request.host}"
        if operation.kind is Kind.LIST:
            document = reshape_list(document, origin, keep)
        else:
            document = reshape_object(document, origin)
        payload = json.dumps(document).encode()
        outcome.response_bytes = len(payload)
        headers = response_headers(upstream.headers)
        headers.pop("Content-Type", None)
        headers.pop("Content-Encoding", None)
        headers.pop("ETag", None) if operation.kind is Kind.LIST else None
        return web.Response(
            status=upstream.status,
            body=payload,
            headers=headers,
            content_type="application/json",
            charset="UTF-8",
        )

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, outcome: Outcome
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status, headers=response_headers(upstream.headers)
        )
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
            await response.write(chunk)
            outcome.response_bytes += len(chunk)
        await response.write_eof()
        return response


async def stream_body(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The caller's body, chunk by chunk, as it arrives."""
    async for chunk in content.iter_chunked(STREAM_CHUNK):
        yield chunk
