"""The sidecar's own upstream token: google-auth ADC, refreshed ahead of expiry, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from typing import Any, Protocol

from proxy.errors import Unavailable

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/devstorage.full_control"
REFRESH_MARGIN = 300.0  # seconds before expiry the background task refreshes
_MIN_SLEEP, _MAX_BACKOFF = 1.0, 60.0
# google-auth retries an unreachable metadata server for ~15 s; a request waits this long at most.
TOKEN_WAIT = 2.0
USABLE_MARGIN = 10.0  # seconds before expiry a token is no longer handed out
REFUSED_GAP = 30.0  # seconds between refreshes forced by Cloud Storage refusing the token


class TokenSource(Protocol):
    """Where the sidecar's upstream access token comes from."""

    @property
    def ready(self) -> bool: ...

    async def token(self) -> str: ...

    def refused(self, token: str) -> None:
        """Cloud Storage answered 401 to `token`."""


class KeyFileRefused(Exception):
    """ADC resolved to a service-account key file; the sidecar never uses one."""


def _load_credentials() -> Any:
    # Imported lazily: google.auth reads GCE_METADATA_* when these modules load.
    import google.auth
    from google.oauth2 import service_account

    credentials, _ = google.auth.default(scopes=[SCOPE])
    if isinstance(credentials, service_account.Credentials):
        raise KeyFileRefused(
            "Application Default Credentials point at a service-account key file; "
            "gcs-iap-proxy uses the metadata server (or workload identity) only"
        )
    return credentials


def _refresh(credentials: Any) -> None:
    import google.auth.transport.requests

    credentials.refresh(google.auth.transport.requests.Request())


class AdcTokenSource:
    """Application Default Credentials; a background task refreshes before expiry.

    Every blocking google-auth call runs in a worker thread; concurrent callers that
    find no valid token share one refresh.
    """

    def __init__(self) -> None:
        self._credentials: Any = None
        self._token: str | None = None
        self._expires_at = 0.0  # epoch seconds (no expiry given: infinity)
        self._refreshing: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.refreshes = 0
        self._refused_at = -math.inf
        self._forced: asyncio.Task[None] | None = None  # kept: a task nobody holds may vanish

    @property
    def ready(self) -> bool:
        return self._valid()

    def _valid(self) -> bool:
        # Checked on every request: a float compare, not datetime arithmetic.
        return self._token is not None and time.time() < self._expires_at - USABLE_MARGIN

    async def token(self) -> str:
        if not self._valid():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.refresh(), TOKEN_WAIT)
        if self._token is None or not self._valid():
            if self.last_error is None and self._token is None:
                raise Unavailable("the proxy has no upstream credentials yet; retry shortly")
            raise Unavailable(
                "the proxy cannot obtain Cloud Storage credentials from the metadata server; "
                "retry shortly"
            )
        return self._token

    async def refresh(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_once())
        await asyncio.shield(self._refreshing)

    async def _refresh_once(self) -> None:
        try:
            if self._credentials is None:
                self._credentials = await asyncio.to_thread(_load_credentials)
            await asyncio.to_thread(_refresh, self._credentials)
        except KeyFileRefused as exc:
            self.last_error = str(exc)
            log.error("%s", exc)
            return
        except Exception as exc:  # google-auth raises many types; none may escape to callers
            self.last_error = f"{exc.__class__.__name__}: {exc}"
            log.warning("upstream token refresh failed: %s", self.last_error)
            return
        self._token = self._credentials.token
        expiry = self._credentials.expiry  # naive UTC, as google-auth keeps it
        self._expires_at = math.inf if expiry is None else expiry.replace(tzinfo=dt.UTC).timestamp()
        self.last_error = None
        self.refreshes += 1

    def refused(self, token: str) -> None:
        """Cloud Storage refused the current token (revoked, or the clock is off): fetch
        another now, in the background. The token stays in use (and /readyz stays 200)
        until a new one replaces it: readiness must not wait for a request to come. At
        most once per REFUSED_GAP, so a storm of refusals is not a storm of refreshes."""
        now = time.monotonic()
        if token == self._token and now - self._refused_at >= REFUSED_GAP:
            self._refused_at = now
            log.warning("Cloud Storage refused the upstream token; fetching another")
            self._forced = asyncio.get_running_loop().create_task(self.refresh())

    def _seconds_until_refresh(self) -> float:
        if self._token is None or math.isinf(self._expires_at):
            return _MIN_SLEEP
        return max(self._expires_at - REFRESH_MARGIN - time.time(), _MIN_SLEEP)

    async def keep_fresh(self) -> None:
        """Background task: obtain a token, then refresh it a few minutes before it expires."""
        backoff = _MIN_SLEEP
        while True:
            await self.refresh()
            if self.last_error is None:
                backoff = _MIN_SLEEP
                await asyncio.sleep(self._seconds_until_refresh())
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)


class StaticTokenSource:
    """A fixed token, for tests and for upstreams that need none."""

    def __init__(self, value: str) -> None:
        self._value = value

    @property
    def ready(self) -> bool:
        return True

    async def token(self) -> str:
        return self._value

    def refused(self, token: str) -> None:
        pass  # nothing else to offer
