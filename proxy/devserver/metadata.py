"""A stand-in for the GCE / Cloud Run metadata server that google-auth talks to unmodified."""

from __future__ import annotations

import secrets

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.devserver.issuer import DevIssuer, bind_socket, serve_socket, stable_subject

FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
TOKEN_PREFIX = "dev-sa-token-"  # noqa: S105 - a recognisable prefix, not a secret
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# The real server answers plain values as "application/text"; google-auth only
# JSON-decodes "application/json", and needs some Content-Type on every 200.
TEXT = "application/text"
V1 = "/computeMetadata/v1"
ACCOUNT = V1 + "/instance/service-accounts/{account}"


class DevMetadataServer:
    """The metadata server of one Cloud Run instance running as service account `email`.

    Tests read `token_requests`, `issued_tokens`, `requested_scopes` and
    `request_log`, and set `fail_tokens` to make the token endpoint answer 503.
    """

    def __init__(
        self,
        *,
        project_id: str = "dev-project",
        email: str = "gcs-iap-proxy@dev-project.iam.gserviceaccount.com",
        issuer: DevIssuer | None = None,
        expires_in: int = 3599,
        numeric_project_id: str = "123456789012",
        region: str = "us-central1",
    ) -> None:
        self.project_id = project_id
        self.numeric_project_id = numeric_project_id
        self.region = region
        self.email = email
        self.issuer = issuer
        self.expires_in = expires_in
        self.unique_id = stable_subject(email)
        self.instance_id = secrets.token_hex(32)
        self.scopes = [CLOUD_PLATFORM_SCOPE]
        self.fail_tokens = False
        self.token_requests = 0
        self.identity_requests = 0
        self.issued_tokens: list[str] = []
        self.requested_scopes: list[tuple[str, ...]] = []
        self.request_log: list[str] = []

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(_add_flavor)
        for path, value in self._plain_values().items():
            app.router.add_get(path, _text_handler(value))
        app.router.add_get(ACCOUNT + "/", self._handle_account)
        app.router.add_get(ACCOUNT + "/email", self._handle_email)
        app.router.add_get(ACCOUNT + "/scopes", self._handle_scopes)
        app.router.add_get(ACCOUNT + "/aliases", self._handle_aliases)
        # POST is what google-auth sends to ask for a certificate-bound token.
        for method in ("GET", "POST"):
            app.router.add_route(method, ACCOUNT + "/token", self._handle_token)
            app.router.add_route(method, ACCOUNT + "/identity", self._handle_identity)
        return app

    def _plain_values(self) -> dict[str, str]:
        return {
            "/": "computeMetadata/\n",
            V1 + "/project/project-id": self.project_id,
            V1 + "/project/numeric-project-id": self.numeric_project_id,
            V1 + "/instance/id": self.instance_id,
            V1 + "/instance/region": f"projects/{self.numeric_project_id}/regions/{self.region}",
            V1 + "/instance/zone": f"projects/{self.numeric_project_id}/zones/{self.region}-1",
            V1 + "/universe/universe-domain": "googleapis.com",
            V1 + "/instance/service-accounts/": f"default/\n{self.email}/\n",
        }

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.request_log.append(f"{request.method} {request.path_qs}")
        if "X-Forwarded-For" in request.headers:
            raise web.HTTPForbidden(text="Requests with X-Forwarded-For are rejected.\n")
        if request.headers.get(FLAVOR_HEADER) != FLAVOR:
            raise web.HTTPForbidden(text="Missing required header: Metadata-Flavor: Google\n")
        return await handler(request)

    def _check_account(self, request: web.Request) -> None:
        if request.match_info["account"] not in ("default", self.email):
            raise web.HTTPNotFound(text="no such service account\n")

    async def _handle_account(self, request: web.Request) -> web.Response:
        self._check_account(request)
        if request.query.get("recursive") == "true":
            info = {"aliases": ["default"], "email": self.email, "scopes": self.scopes}
            return web.json_response(info)
        return _text("aliases\nemail\nidentity\nscopes\ntoken\n")

    async def _handle_email(self, request: web.Request) -> web.Response:
        self._check_account(request)
        return _text(self.email)

    async def _handle_scopes(self, request: web.Request) -> web.Response:
        self._check_account(request)
        return _text("".join(scope + "\n" for scope in self.scopes))

    async def _handle_aliases(self, request: web.Request) -> web.Response:
        self._check_account(request)
        return _text("default\n")

    async def _handle_token(self, request: web.Request) -> web.Response:
        self._check_account(request)
        self.token_requests += 1
        if self.fail_tokens:
            raise web.HTTPServiceUnavailable(text="token endpoint unavailable (fault injected)\n")
        scopes = request.query.get("scopes", "")
        self.requested_scopes.append(tuple(scope for scope in scopes.split(",") if scope))
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.issued_tokens.append(token)
        body = {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        return web.json_response(body)

    async def _handle_identity(self, request: web.Request) -> web.Response:
        self._check_account(request)
        self.identity_requests += 1
        if self.issuer is None:
            raise web.HTTPNotFound(text="no identity issuer configured\n")
        audience = request.query.get("audience", "")
        if not audience:
            raise web.HTTPBadRequest(text="non-empty audience parameter required\n")
        # As on the real server, only format=full carries the email claims.
        full = request.query.get("format") == "full"
        token = self.issuer.mint(
            audience=audience,
            subject=self.unique_id,
            email=self.email if full else None,
            extra={"azp": self.unique_id},
        )
        return _text(token)


def _text(value: str) -> web.Response:
    return web.Response(text=value, content_type=TEXT)


def _text_handler(value: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return _text(value)

    return handle


async def _add_flavor(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[FLAVOR_HEADER] = FLAVOR


async def start_metadata(
    server: DevMetadataServer, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve `server`; returns the runner (stop it with `cleanup()`) and the bound port.

    Starting again with the same server and port models a metadata server restart.
    """
    sock = bind_socket(host, port)
    bound_port: int = sock.getsockname()[1]
    return await serve_socket(server.app(), sock), bound_port
