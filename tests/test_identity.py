"""Token verification against a real issuer process serving JWKS over HTTP."""

from __future__ import annotations

import contextlib
import time

import aiohttp
import pytest

from proxy import identity as identity_module
from proxy.devserver.issuer import DevIssuer, start_issuer
from proxy.errors import Unauthenticated
from proxy.identity import JwtVerifier
from proxy.keys import UNKNOWN_KID_REFRESH_INTERVAL
from proxy.policy import Issuer

AUD = "storage-sidecar"


@pytest.fixture
async def issuer():
    dev, runner = await start_issuer()
    yield dev
    await runner.cleanup()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def verifier_for(issuer: DevIssuer, session, **overrides) -> JwtVerifier:
    config = Issuer(issuer=issuer.issuer_url, audiences=(AUD,), **overrides)
    return JwtVerifier([config], session)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def refused(verifier: JwtVerifier, headers: dict[str, str]) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(headers)
    return caught.value


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_valid_tokens_via_discovery(issuer, session, alg):
    verifier = verifier_for(issuer, session)
    token = issuer.mint(audience=AUD, subject="s1", email="Alice@Example.com", alg=alg)
    identity = await verifier.verify(bearer(token))
    assert (identity.issuer, identity.subject, identity.email) == (
        issuer.issuer_url,
        "s1",
        "alice@example.com",
    )
    assert issuer.discovery_fetches == 1


async def test_explicit_jwks_uri_skips_discovery(issuer, session):
    verifier = verifier_for(issuer, session, jwks_uri=issuer.issuer_url + "/jwks")
    await verifier.verify(bearer(issuer.mint(audience=AUD, subject="s")))
    assert issuer.discovery_fetches == 0


async def test_unverified_email_is_not_an_identity(issuer, session):
    verifier = verifier_for(issuer, session)
    token = issuer.mint(audience=AUD, subject="s", email="alice@example.com", email_verified=False)
    identity = await verifier.verify(bearer(token))
    assert identity.email is None
    token = issuer.mint(
        audience=AUD, subject="s", email="a@example.com", extra={"email_verified": "false"}
    )
    assert (await verifier.verify(bearer(token))).email is None


@pytest.mark.parametrize(
    ("verified", "vouched"),
    [
        (True, True),
        ("true", True),
        ("TRUE", True),
        (False, False),
        ("FALSE", False),  # counted as verified before a review found it
        ("no", False),
        (0, False),
        (1, False),
        (None, False),
        (["true"], False),
    ],
)
async def test_only_a_true_email_verified_vouches_for_the_email(issuer, session, verified, vouched):
    verifier = verifier_for(issuer, session)
    token = issuer.mint(
        audience=AUD, subject="s", email="a@example.com", extra={"email_verified": verified}
    )
    assert (await verifier.verify(bearer(token))).email == ("a@example.com" if vouched else None)


@pytest.mark.parametrize(
    ("mint", "message"),
    [
        (dict(lifetime=-120), "expired"),
        (dict(audience="someone-else"), "audience"),
        (dict(extra={"nbf": int(time.time()) + 600}), "not yet valid"),
        (dict(now=int(time.time()) + 600), "not yet valid"),
        (dict(extra={"iss": "https://evil.example.com"}), "issuer is not trusted"),
        (dict(alg="none"), "algorithm"),
        (dict(alg="HS256"), "algorithm"),
        (dict(kid="no-such-kid"), "signing key is not recognised"),
        (dict(extra={"exp": None}), "exp"),
    ],
)
async def test_bad_tokens_are_refused(issuer, session, mint, message):
    verifier = verifier_for(issuer, session)
    claims = {"audience": AUD, "subject": "s", **mint}
    error = await refused(verifier, bearer(issuer.mint(**claims)))
    assert message in error.message
    assert error.status == 401
    assert 'error="invalid_token"' in error.headers()["WWW-Authenticate"]


async def test_leeway_accepts_small_skew(issuer, session):
    verifier = verifier_for(issuer, session, leeway_seconds=60)
    token = issuer.mint(audience=AUD, subject="s", lifetime=-30)
    assert (await verifier.verify(bearer(token))).subject == "s"


async def test_tampered_payload_fails_signature(issuer, session):
    verifier = verifier_for(issuer, session)
    token = issuer.mint(audience=AUD, subject="alice")
    forged = issuer.mint(audience=AUD, subject="admin")
    head, _, sig = token.split(".")
    error = await refused(verifier, bearer(f"{head}.{forged.split('.')[1]}.{sig}"))
    assert "signature" in error.message


async def test_algorithm_allowlist_is_per_issuer(issuer, session):
    verifier = verifier_for(issuer, session, algorithms=("RS256",))
    error = await refused(verifier, bearer(issuer.mint(audience=AUD, subject="s", alg="ES256")))
    assert "algorithm 'ES256'" in error.message


@pytest.mark.parametrize(
    ("headers", "missing"),
    [
        ({}, True),
        ({"authorization": "Basic dXNlcjpwYXNz"}, False),
        ({"authorization": "Bearer "}, False),
        ({"authorization": "Bearer not.a.jwt"}, False),
        ({"authorization": "Bearer " + "a" * 20000}, False),
    ],
)
async def test_missing_and_garbage(issuer, session, headers, missing):
    error = await refused(verifier_for(issuer, session), headers)
    assert error.missing is missing
    assert "WWW-Authenticate" in error.headers()


async def test_unknown_kid_refreshes_at_most_once_per_interval(issuer, session):
    verifier = verifier_for(issuer, session, jwks_uri=issuer.issuer_url + "/jwks")
    await verifier.verify(bearer(issuer.mint(audience=AUD, subject="s")))
    assert issuer.jwks_fetches == 1
    issuer.rotate()
    # First token with the new kid: one refresh, accepted.
    assert (await verifier.verify(bearer(issuer.mint(audience=AUD, subject="t")))).subject == "t"
    assert issuer.jwks_fetches == 2
    # Garbage kids right after: refused without hammering the issuer.
    for n in range(5):
        await refused(verifier, bearer(issuer.mint(audience=AUD, subject="u", kid=f"bogus-{n}")))
    assert issuer.jwks_fetches == 2
    assert UNKNOWN_KID_REFRESH_INTERVAL == 30.0


async def test_failed_refresh_keeps_old_keys(session):
    issuer, runner = await start_issuer()
    verifier = verifier_for(issuer, session, jwks_uri=issuer.issuer_url + "/jwks")
    await verifier.verify(bearer(issuer.mint(audience=AUD, subject="first")))
    await runner.cleanup()  # the issuer is gone
    await refused(verifier, bearer(issuer.mint(audience=AUD, subject="x", kid="unknown")))
    keys = verifier.issuer_keys(verifier.issuers[0])
    assert keys.last_error is not None
    # A not-yet-cached token signed with the old key still verifies.
    assert (
        await verifier.verify(bearer(issuer.mint(audience=AUD, subject="second")))
    ).subject == "second"


async def test_header_issuer_reads_only_its_header(issuer, session):
    config = Issuer(
        issuer=issuer.issuer_url,
        audiences=(AUD,),
        header="x-goog-iap-jwt-assertion",
        algorithms=("ES256",),
    )
    verifier = JwtVerifier([config], session)
    token = issuer.mint(audience=AUD, subject="iap-user", email="u@example.com", alg="ES256")
    identity = await verifier.verify({"x-goog-iap-jwt-assertion": token})
    assert identity.email == "u@example.com"
    # The same token as a bearer token matches no bearer issuer.
    error = await refused(verifier, bearer(token))
    assert "issuer is not trusted" in error.message


async def test_verified_tokens_are_cached_until_expiry(issuer, session):
    verifier = verifier_for(issuer, session, jwks_uri=issuer.issuer_url + "/jwks", leeway_seconds=0)
    token = issuer.mint(audience=AUD, subject="s", lifetime=2)
    await verifier.verify(bearer(token))
    await verifier.verify(bearer(token))
    assert len(verifier._cache) == 1
    time.sleep(2.1)  # noqa: ASYNC251 - the token must really expire
    error = await refused(verifier, bearer(token))
    assert "expired" in error.message


async def test_a_token_far_from_expiry_is_verified_again_after_the_cache_limit(
    issuer, session, monkeypatch
):
    """A review: `exp` years ahead kept a verified identity cached that long, past any
    key the issuer withdrew since. Remembered for CACHE_SECONDS at most."""
    verifier = verifier_for(issuer, session, jwks_uri=issuer.issuer_url + "/jwks")
    token = issuer.mint(audience=AUD, subject="s", lifetime=10 * 365 * 86400)
    await verifier.verify(bearer(token))
    (remembered,) = verifier._cache.values()
    assert remembered[1] <= time.time() + identity_module.CACHE_SECONDS
    monkeypatch.setattr(identity_module.time, "time", lambda: remembered[1] + 1)
    verifications = 0
    decode = identity_module._decode

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal verifications
        verifications += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(identity_module, "_decode", counted)
    with contextlib.suppress(Unauthenticated):  # the clock moved on: `iat` ahead is fine
        await verifier.verify(bearer(token))
    assert verifications == 1  # the signature was checked again, not taken from the cache


async def test_a_token_with_a_byte_outside_ascii_is_refused_not_a_crash(issuer, session):
    """A review: `Bearer <jwt>\\xff` (aiohttp hands the byte on as a surrogate) failed to
    encode for the cache key: 500, and no audit record."""
    verifier = verifier_for(issuer, session)
    token = issuer.mint(audience=AUD, subject="s1")
    error = await refused(verifier, bearer(token + "\udcff"))
    assert error.message == "identity token is not a JWT"
