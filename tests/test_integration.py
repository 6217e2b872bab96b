"""End to end: the sidecar process between the official google-cloud-storage client and
fake-gcs-server, with a real issuer and the metadata stand-in. A recording relay in front of
fake-gcs-server shows exactly what reached "Cloud Storage"."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.api_core import exceptions
from google.cloud import storage
from google.oauth2.credentials import Credentials

from proxy.devserver.issuer import DevIssuer
from tests.support.fakegcs import FakeGcs
from tests.support.proxyproc import ProxyProcess, isolated_env
from tests.support.recorder import RecordingRelay

pytestmark = pytest.mark.integration

AUD = "integration-sidecar"
BUCKET = "it-data"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"
WRITER = "etl@acme-prod.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory,
    dev_issuer: DevIssuer,
    metadata_server,
    fake_gcs: FakeGcs,
    relay: RecordingRelay,
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("proxy")
    policy = tmp / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers:
              - issuer: {dev_issuer.issuer_url}
                audiences: ["{AUD}"]
            rules:
              - id: alice-owns-her-folder
                principals: ["user:{ALICE}"]
                bucket: {BUCKET}
                prefixes: ["alice/"]
                verbs: [read, list, write, delete, metadata]
              - id: writer-creates
                principals: ["serviceAccount:{WRITER}"]
                bucket: {BUCKET}
                prefixes: ["drop/"]
                verbs: [write, read]
              - id: alice-not-private
                effect: deny
                principals: [allAuthenticatedUsers]
                bucket: {BUCKET}
                prefixes: ["alice/private/"]
                verbs: ["*"]
            """
        )
    )
    fake_gcs.create_bucket(BUCKET)
    _, metadata_port = metadata_server
    process = ProxyProcess(policy, relay.url, isolated_env(tmp, metadata_port))
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.output()


def client_for(proxy: ProxyProcess, issuer: DevIssuer, email: str) -> storage.Client:
    token = issuer.mint(audience=AUD, subject=email.split("@")[0], email=email)
    return storage.Client(
        project="it-project",
        credentials=Credentials(token),
        client_options={"api_endpoint": proxy.url},
    )


@pytest.fixture(autouse=True)
def _quiet_bucket_metadata(monkeypatch):
    # google-cloud-storage 3.x fetches bucket metadata from a background thread.
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")


@pytest.fixture
def alice(proxy, dev_issuer) -> storage.Bucket:
    return client_for(proxy, dev_issuer, ALICE).bucket(BUCKET)


@pytest.fixture
def mallory(proxy, dev_issuer) -> storage.Bucket:
    return client_for(proxy, dev_issuer, MALLORY).bucket(BUCKET)


def test_allowed_identity_full_cycle(alice, fake_gcs: FakeGcs):
    data = bytes(range(256)) * 40
    blob = alice.blob("alice/report.bin")
    blob.upload_from_string(data, content_type="application/x-demo")
    assert fake_gcs.get_object(BUCKET, "alice/report.bin") == data

    assert alice.blob("alice/report.bin").download_as_bytes() == data
    assert alice.blob("alice/report.bin").download_as_bytes(start=10, end=19) == data[10:20]

    names = [b.name for b in alice.client.list_blobs(BUCKET, prefix="alice/")]
    assert "alice/report.bin" in names

    fetched = alice.get_blob("alice/report.bin")
    assert fetched is not None and fetched.size == len(data)
    fetched.metadata = {"owner": "alice"}
    fetched.patch()
    assert fake_gcs.get_metadata(BUCKET, "alice/report.bin")["metadata"] == {"owner": "alice"}

    fetched.delete()
    assert fake_gcs.get_object(BUCKET, "alice/report.bin") is None


def test_media_link_keeps_the_client_behind_the_proxy(alice, proxy, relay: RecordingRelay):
    alice.blob("alice/linked.txt").upload_from_string(b"linked")
    fetched = alice.get_blob("alice/linked.txt")
    assert fetched.media_link.startswith(
        proxy.url + "/download/storage/v1/b/it-data/o/alice%2Flinked.txt"
    )
    assert fetched.self_link.startswith(proxy.url + "/storage/v1/")
    relay.clear()
    assert fetched.download_as_bytes() == b"linked"
    # The download went through the proxy (and therefore through the relay).
    assert any(s.method == "GET" and "alt=media" in s.query for s in relay.seen)


def test_denied_identity_changes_nothing(alice, mallory, fake_gcs: FakeGcs, relay: RecordingRelay):
    alice.blob("alice/keep.txt").upload_from_string(b"precious")
    relay.clear()
    attempts = [
        lambda: mallory.blob("alice/keep.txt").download_as_bytes(),
        lambda: mallory.get_blob("alice/keep.txt"),
        lambda: list(mallory.client.list_blobs(BUCKET, prefix="alice/")),
        lambda: mallory.blob("alice/keep.txt").upload_from_string(b"overwritten"),
        lambda: mallory.blob("alice/new.txt").upload_from_string(b"planted"),
        lambda: mallory.blob("alice/keep.txt").delete(),
        lambda: _patch(mallory.blob("alice/keep.txt")),
    ]
    for attempt in attempts:
        with pytest.raises(exceptions.Forbidden):
            attempt()
    assert relay.seen == []
    assert fake_gcs.get_object(BUCKET, "alice/keep.txt") == b"precious"
    assert fake_gcs.get_object(BUCKET, "alice/new.txt") is None
    assert fake_gcs.get_metadata(BUCKET, "alice/keep.txt").get("metadata") is None


def _patch(blob: storage.Blob) -> None:
    blob.metadata = {"pwned": "yes"}
    blob.patch()


def test_deny_rule_beats_allow(alice, fake_gcs: FakeGcs):
    fake_gcs.put_object(BUCKET, "alice/private/diary.txt", b"secret")
    with pytest.raises(exceptions.Forbidden) as caught:
        alice.blob("alice/private/diary.txt").download_as_bytes()
    assert (
        "alice@example.com does not have read access to gs://it-data/alice/private/diary.txt"
        in str(caught.value)
    )
    # Listing the parent is allowed, but the carve-out is filtered from the answer.
    names = [b.name for b in alice.client.list_blobs(BUCKET, prefix="alice/")]
    assert "alice/private/diary.txt" not in names


def test_list_outside_granted_prefix_is_refused(alice):
    with pytest.raises(exceptions.Forbidden):
        list(alice.client.list_blobs(BUCKET, prefix="ali"))
    with pytest.raises(exceptions.Forbidden):
        list(alice.client.list_blobs(BUCKET))


def test_write_without_delete_is_create_only(
    proxy, dev_issuer, fake_gcs: FakeGcs, relay: RecordingRelay
):
    writer = client_for(proxy, dev_issuer, WRITER).bucket(BUCKET)
    writer.blob("drop/batch-1.csv").upload_from_string(b"v1")
    with pytest.raises(exceptions.PreconditionFailed):
        writer.blob("drop/batch-1.csv").upload_from_string(b"v2")
    assert fake_gcs.get_object(BUCKET, "drop/batch-1.csv") == b"v1"
    uploads = [s for s in relay.seen if s.method == "POST" and s.path.startswith("/upload/")]
    assert uploads and all("ifGenerationMatch=0" in s.query for s in uploads[-2:])


def test_upstream_only_ever_sees_the_sidecar_token(
    alice, mallory, metadata_server, relay: RecordingRelay
):
    alice.blob("alice/token-check.txt").upload_from_string(b"x")
    alice.blob("alice/token-check.txt").download_as_bytes()
    server, _ = metadata_server
    seen = relay.seen
    assert seen
    caller_token = alice.client._credentials.token
    for request in seen:
        authorization = request.headers.get("authorization", "")
        assert authorization.removeprefix("Bearer ") in server.issued_tokens
        assert caller_token not in json.dumps(request.headers)
        assert "x-forwarded-for" not in request.headers
        assert "cookie" not in request.headers


def test_health_and_readiness(proxy):
    with urllib.request.urlopen(proxy.admin_url + "/healthz") as response:
        assert json.load(response) == {"status": "ok"}
    with urllib.request.urlopen(proxy.admin_url + "/readyz") as response:
        body = json.load(response)
    assert body["ready"] is True
    assert len(body["policy_revision"]) == 16


def test_audit_records_are_structured_and_never_hold_tokens(alice, proxy):
    alice.blob("alice/audited.txt").upload_from_string(b"x")
    token = alice.client._credentials.token
    output = proxy.output()
    assert token not in output
    assert token.split(".")[2] not in output
    records = [
        json.loads(line)
        for line in output.splitlines()
        if line.startswith('{"severity"') and '"audit"' in line
    ]
    writes = [r for r in records if r["audit"]["resource"] == f"gs://{BUCKET}/alice/audited.txt"]
    assert writes, output[-2000:]
    record = writes[-1]
    assert record["audit"]["decision"] == "allow"
    assert record["audit"]["rule_id"] == "alice-owns-her-folder"
    assert record["audit"]["identity"]["email"] == ALICE
    assert record["httpRequest"]["status"] == 200
    assert record["severity"] == "NOTICE"


def test_broken_policy_at_start_exits_non_zero(tmp_path: Path, relay):
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\nrules:\n  - id: x\n    verbs: [fly]\n")
    process = ProxyProcess(policy, relay.url, isolated_env(tmp_path, 1))
    code = process.process.wait(timeout=20)
    output = process.output()
    process.stop()
    assert code == 1
    assert f"{policy}:4: unknown verb 'fly'" in output
    assert f"{policy}:3: rule: missing required key 'bucket'" in output
