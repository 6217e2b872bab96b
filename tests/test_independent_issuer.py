"""Tokens from an issuer we did not write: the npm package oauth2-mock-server, found through
OIDC discovery, verified by the real sidecar process in front of fake-gcs-server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fakegcs import FakeGcs
from tests.support.proxyproc import ProxyProcess, isolated_env
from tests.support.recorder import RecordingRelay

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).parent / "node"
AUD = "independent-sidecar"
BUCKET = "indep-bucket"


class MockIssuer:
    def __init__(self, alg: str) -> None:
        node = shutil.which("node")
        if node is None or not (NODE_DIR / "node_modules" / "oauth2-mock-server").is_dir():
            message = "node and tests/node/node_modules (npm ci) are needed for oauth2-mock-server"
            if os.environ.get("REQUIRE_ALL_CLIENTS") == "1":
                pytest.fail(message)
            pytest.skip(message)
        self.process = subprocess.Popen(
            [node, "mock-issuer.mjs", alg], cwd=NODE_DIR, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.url = json.loads(self.process.stdout.readline())["url"]

    def token(self, email: str, audience: str = AUD) -> str:
        form = urllib.parse.urlencode(
            {"grant_type": "client_credentials", "aud": audience, "email": email}
        )
        with urllib.request.urlopen(self.url + "/token", form.encode()) as response:
            return str(json.load(response)["access_token"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module", params=["RS256", "ES256"])
def issuer(request) -> Iterator[MockIssuer]:
    mock = MockIssuer(request.param)
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def proxy(
    issuer: MockIssuer, tmp_path_factory, metadata_server, fake_gcs: FakeGcs, relay: RecordingRelay
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("independent")
    policy = tmp / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers:
              - issuer: {issuer.url}
                audiences: ["{AUD}"]
            rules:
              - id: carol-reads
                principals: ["user:carol@example.org"]
                bucket: {BUCKET}
                prefixes: ["shared/"]
                verbs: [read]
            """
        )
    )
    status, _, _ = fake_gcs.request("GET", f"/storage/v1/b/{BUCKET}")
    if status == 404:
        fake_gcs.create_bucket(BUCKET)
    fake_gcs.put_object(BUCKET, "shared/hello.txt", b"hello from fake-gcs")
    process = ProxyProcess(policy, relay.url, isolated_env(tmp, metadata_server[1]))
    process.wait_ready()
    yield process
    assert process.stop() == 0


def fetch(proxy: ProxyProcess, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        proxy.url + f"/storage/v1/b/{BUCKET}/o/shared%2Fhello.txt?alt=media",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def test_granted_identity_reads(issuer, proxy):
    assert fetch(proxy, issuer.token("carol@example.org")) == (200, b"hello from fake-gcs")


def test_other_identity_is_denied(issuer, proxy, relay):
    relay.clear()
    status, body = fetch(proxy, issuer.token("dave@example.org"))
    assert status == 403
    assert b"dave@example.org does not have read access" in body
    assert relay.seen == []


def test_wrong_audience_and_tampering_are_401(issuer, proxy):
    status, body = fetch(proxy, issuer.token("carol@example.org", audience="someone-else"))
    assert (status, b"audience" in body) == (401, True)
    head, _, signature = issuer.token("carol@example.org").split(".")
    _, other_payload, _ = issuer.token("dave@example.org").split(".")
    assert fetch(proxy, f"{head}.{other_payload}.{signature}")[0] == 401
