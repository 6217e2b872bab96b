"""The dev issuer and metadata server speak the real protocols: pyjwt and google-auth agree."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from proxy.devserver.issuer import DevIssuer, start_issuer
from proxy.devserver.metadata import TOKEN_PREFIX, DevMetadataServer, start_metadata

AUDIENCE = "https://my-app-abc123-uc.a.run.app"
DEVSTORAGE = "https://www.googleapis.com/auth/devstorage.full_control"
FLAVOR = {"Metadata-Flavor": "Google"}

ADC_SCRIPT = f"""
import json, google.auth, google.auth.transport.requests
creds, project = google.auth.default(scopes=[{DEVSTORAGE!r}])
creds.refresh(google.auth.transport.requests.Request())
print(json.dumps({{"token": creds.token, "project": project,
                  "email": creds.service_account_email, "type": type(creds).__module__}}))
"""

ID_TOKEN_SCRIPT = f"""
import google.auth.transport.requests, google.oauth2.id_token
request = google.auth.transport.requests.Request()
print(google.oauth2.id_token.fetch_id_token(request, {AUDIENCE!r}))
"""


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def issuer() -> AsyncIterator[DevIssuer]:
    issuer, runner = await start_issuer()
    yield issuer
    await runner.cleanup()


@pytest.fixture
async def metadata(issuer: DevIssuer) -> AsyncIterator[tuple[DevMetadataServer, str]]:
    server = DevMetadataServer(issuer=issuer)
    runner, port = await start_metadata(server)
    yield server, f"127.0.0.1:{port}"
    await runner.cleanup()


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200
        return await response.json()


async def verify(http: aiohttp.ClientSession, issuer: DevIssuer, token: str) -> dict[str, Any]:
    """Verify `token` the way a relying party would: discovery, then JWKS, then pyjwt."""
    config = await get_json(http, issuer.issuer_url + "/.well-known/openid-configuration")
    keys = jwt.PyJWKSet.from_dict(await get_json(http, config["jwks_uri"]))
    key = keys[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=config["id_token_signing_alg_values_supported"],
        audience=AUDIENCE,
        issuer=issuer.issuer_url,
    )
    return claims


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_minted_tokens_verify_against_served_jwks(
    http: aiohttp.ClientSession, issuer: DevIssuer, alg: str
) -> None:
    token = issuer.mint(audience=AUDIENCE, subject="42", email="alice@example.com", alg=alg)

    claims = await verify(http, issuer, token)

    assert jwt.get_unverified_header(token)["alg"] == alg
    assert claims["sub"] == "42"
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["exp"] - claims["iat"] == 3600


async def test_discovery_document_and_jwks_headers(
    http: aiohttp.ClientSession, issuer: DevIssuer
) -> None:
    config = await get_json(http, issuer.issuer_url + "/.well-known/openid-configuration")
    async with http.get(config["jwks_uri"]) as response:
        jwks = await response.json()
        cache_control = response.headers["Cache-Control"]

    assert config["issuer"] == issuer.issuer_url
    assert config["jwks_uri"] == issuer.issuer_url + "/jwks"
    assert config["token_endpoint"] == issuer.issuer_url + "/token"
    assert set(config["id_token_signing_alg_values_supported"]) == {"RS256", "ES256"}
    assert config["response_types_supported"] and config["subject_types_supported"]
    assert cache_control == "public, max-age=300"
    published = {(key["kty"], key["alg"], key["use"], key["kid"]) for key in jwks["keys"]}
    assert published == {
        ("RSA", "RS256", "sig", issuer.kids["RS256"]),
        ("EC", "ES256", "sig", issuer.kids["ES256"]),
    }
    assert all("=" not in key.get("n", "") + key.get("x", "") for key in jwks["keys"])
    assert not any("d" in key for key in jwks["keys"])


async def test_jwks_fetches_are_counted(http: aiohttp.ClientSession, issuer: DevIssuer) -> None:
    for _ in range(3):
        await get_json(http, issuer.issuer_url + "/jwks")

    stats = await get_json(http, issuer.issuer_url + "/stats")

    assert issuer.jwks_fetches == 3
    assert stats["jwks_fetches"] == 3


async def test_rotation_replaces_every_kid(http: aiohttp.ClientSession, issuer: DevIssuer) -> None:
    old_token = issuer.mint(audience=AUDIENCE, subject="42")
    old_kids = {key["kid"] for key in (await get_json(http, issuer.issuer_url + "/jwks"))["keys"]}

    async with http.post(issuer.issuer_url + "/rotate") as response:
        assert response.status == 200
    new_jwks = jwt.PyJWKSet.from_dict(await get_json(http, issuer.issuer_url + "/jwks"))

    assert {key.key_id for key in new_jwks.keys}.isdisjoint(old_kids)
    with pytest.raises(KeyError):
        new_jwks[jwt.get_unverified_header(old_token)["kid"]]
    new_token = issuer.mint(audience=AUDIENCE, subject="42", alg="ES256")
    assert (await verify(http, issuer, new_token))["sub"] == "42"


@pytest.mark.parametrize("as_json", [True, False])
async def test_token_endpoint_mints_for_curl(
    http: aiohttp.ClientSession, issuer: DevIssuer, as_json: bool
) -> None:
    fields = {"audience": AUDIENCE, "email": "bob@example.com"}
    url = issuer.issuer_url + "/token"
    request = http.post(url, json=fields) if as_json else http.post(url, data=fields)

    async with request as response:
        assert response.status == 200
        token = (await response.json())["id_token"]

    claims = await verify(http, issuer, token)
    assert claims["email"] == "bob@example.com"
    assert claims["email_verified"] is True
    assert claims["sub"].isdigit()


async def test_token_endpoint_requires_an_audience(
    http: aiohttp.ClientSession, issuer: DevIssuer
) -> None:
    async with http.post(issuer.issuer_url + "/token", json={"email": "x@example.com"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"


async def test_extra_and_kid_overrides_craft_bad_tokens(
    http: aiohttp.ClientSession, issuer: DevIssuer
) -> None:
    token = issuer.mint(
        audience=AUDIENCE,
        subject="42",
        extra={"iss": ["not", "a", "string"], "aud": "someone-else"},
        kid="unknown-kid",
        now=1_000_000,
        lifetime=60,
        email="eve@example.com",
        email_verified=False,
    )

    claims = jwt.decode(token, options={"verify_signature": False})
    assert jwt.get_unverified_header(token)["kid"] == "unknown-kid"
    assert claims["iss"] == ["not", "a", "string"]
    assert claims["aud"] == "someone-else"
    assert (claims["iat"], claims["exp"]) == (1_000_000, 1_000_060)
    assert claims["email_verified"] is False


async def test_unsafe_algorithms_are_rejected_by_a_strict_verifier(
    http: aiohttp.ClientSession, issuer: DevIssuer
) -> None:
    jwks = jwt.PyJWKSet.from_dict(await get_json(http, issuer.issuer_url + "/jwks"))
    rsa_key = jwks[issuer.kids["RS256"]]
    unsigned = issuer.mint(audience=AUDIENCE, subject="42", alg="none")
    confused = issuer.mint(audience=AUDIENCE, subject="42", alg="HS256")

    signing_input, _, signature = confused.rpartition(".")
    # The attacker's HMAC key: the issuer's published RSA key, as PEM.
    pem = rsa_key.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "==") == expected
    assert unsigned.endswith(".")
    for token in (unsigned, confused):
        with pytest.raises(jwt.InvalidAlgorithmError):
            jwt.decode(token, rsa_key, algorithms=["RS256", "ES256"], audience=AUDIENCE)


async def run_with_google_auth(script: str, metadata_host: str, home: Path) -> str:
    """Run `script` in a fresh interpreter that sees only the dev metadata server."""
    # A minimal environment: no ADC file, no project or proxy variables, no NO_GCE_CHECK.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "GCE_METADATA_HOST": metadata_host,
        "GCE_METADATA_IP": metadata_host,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode().strip()


async def test_google_auth_default_credentials_come_from_dev_metadata(
    metadata: tuple[DevMetadataServer, str], tmp_path: Path
) -> None:
    server, host = metadata

    result = json.loads(await run_with_google_auth(ADC_SCRIPT, host, tmp_path))

    assert result["type"] == "google.auth.compute_engine.credentials"
    assert result["token"].startswith(TOKEN_PREFIX)
    assert server.issued_tokens == [result["token"]]
    assert server.token_requests == 1
    assert server.requested_scopes == [(DEVSTORAGE,)]
    assert result["project"] == "dev-project"
    assert result["email"] == server.email


async def test_google_auth_fetches_an_id_token_from_dev_metadata(
    http: aiohttp.ClientSession,
    issuer: DevIssuer,
    metadata: tuple[DevMetadataServer, str],
    tmp_path: Path,
) -> None:
    server, host = metadata

    token = await run_with_google_auth(ID_TOKEN_SCRIPT, host, tmp_path)

    claims = await verify(http, issuer, token)
    assert claims["email"] == server.email
    assert claims["email_verified"] is True
    assert claims["sub"] == server.unique_id
    assert server.identity_requests == 1


async def test_identity_without_format_full_omits_email(
    http: aiohttp.ClientSession, issuer: DevIssuer, metadata: tuple[DevMetadataServer, str]
) -> None:
    _, host = metadata
    url = f"http://{host}/computeMetadata/v1/instance/service-accounts/default/identity"

    async with http.get(url, params={"audience": AUDIENCE}, headers=FLAVOR) as response:
        assert response.status == 200
        token = await response.text()

    claims = await verify(http, issuer, token)
    assert "email" not in claims
    assert "email_verified" not in claims


async def test_identity_without_an_issuer_is_not_found(http: aiohttp.ClientSession) -> None:
    runner, port = await start_metadata(DevMetadataServer())
    url = f"http://127.0.0.1:{port}/computeMetadata/v1/instance/service-accounts/default/identity"
    try:
        async with http.get(url, params={"audience": AUDIENCE}, headers=FLAVOR) as response:
            assert response.status == 404
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Metadata-Flavor": "google-ish"}, {**FLAVOR, "X-Forwarded-For": "10.0.0.1"}],
)
async def test_requests_without_flavor_or_forwarded_are_forbidden(
    http: aiohttp.ClientSession, metadata: tuple[DevMetadataServer, str], headers: dict[str, str]
) -> None:
    server, host = metadata
    url = f"http://{host}/computeMetadata/v1/instance/service-accounts/default/token"

    async with http.get(url, headers=headers) as response:
        assert response.status == 403
        assert response.headers["Metadata-Flavor"] == "Google"
    assert server.token_requests == 0


async def test_every_response_carries_the_flavor_header(
    http: aiohttp.ClientSession, metadata: tuple[DevMetadataServer, str]
) -> None:
    _, host = metadata

    for path, status in [("/", 200), ("/computeMetadata/v1/nope", 404)]:
        async with http.get(f"http://{host}{path}", headers=FLAVOR) as response:
            assert response.status == status
            assert response.headers["Metadata-Flavor"] == "Google"


async def test_plain_metadata_values(
    http: aiohttp.ClientSession, metadata: tuple[DevMetadataServer, str]
) -> None:
    server, host = metadata
    expected = {
        "project/project-id": "dev-project",
        "project/numeric-project-id": "123456789012",
        "instance/region": "projects/123456789012/regions/us-central1",
        "instance/id": server.instance_id,
        "instance/service-accounts/default/email": server.email,
    }

    for path, value in expected.items():
        async with http.get(f"http://{host}/computeMetadata/v1/{path}", headers=FLAVOR) as resp:
            assert await resp.text() == value


async def test_unknown_service_account_is_not_found(
    http: aiohttp.ClientSession, metadata: tuple[DevMetadataServer, str]
) -> None:
    _, host = metadata
    url = f"http://{host}/computeMetadata/v1/instance/service-accounts/other@x.iam.gserviceaccount.com/token"

    async with http.get(url, headers=FLAVOR) as response:
        assert response.status == 404


async def test_fail_tokens_answers_503_until_cleared(
    http: aiohttp.ClientSession, metadata: tuple[DevMetadataServer, str]
) -> None:
    server, host = metadata
    url = f"http://{host}/computeMetadata/v1/instance/service-accounts/default/token"

    server.fail_tokens = True
    async with http.get(url, headers=FLAVOR) as response:
        assert response.status == 503
    server.fail_tokens = False
    async with http.get(url, headers=FLAVOR) as response:
        body = await response.json()

    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3599
    assert server.issued_tokens == [body["access_token"]]
    assert server.token_requests == 2


async def test_metadata_server_restarts_on_the_same_port(http: aiohttp.ClientSession) -> None:
    server = DevMetadataServer(expires_in=120)
    runner, port = await start_metadata(server)
    url = f"http://127.0.0.1:{port}/computeMetadata/v1/instance/service-accounts/default/token"

    await runner.cleanup()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(url, headers=FLAVOR):
            pass
    runner, _ = await start_metadata(server, port=port)
    try:
        async with http.get(url, headers=FLAVOR) as response:
            assert (await response.json())["expires_in"] == 120
    finally:
        await runner.cleanup()
