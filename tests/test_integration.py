"""End to end: the sidecar process between the official google-cloud-storage client and
fake-gcs-server, with a real issuer and the metadata stand-in. A recording relay in front of
fake-gcs-server shows exactly what reached "Cloud Storage"."""

from __future__ import annotations

import hashlib
import io
import json
import os
import textwrap
import urllib.error
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
    for name in ("alice/visible-1.txt", "alice/visible-2.txt"):  # pages, whatever ran before
        fake_gcs.put_object(BUCKET, name, b"v")
    with pytest.raises(exceptions.Forbidden) as caught:
        alice.blob("alice/private/diary.txt").download_as_bytes()
    assert (
        "alice@example.com does not have read access to gs://it-data/alice/private/diary.txt"
        in str(caught.value)
    )
    # Listing the parent is allowed, but the carve-out is filtered from the answer.
    names = [b.name for b in alice.client.list_blobs(BUCKET, prefix="alice/")]
    assert "alice/private/diary.txt" not in names
    # Page by page the client follows the sidecar's sealed page tokens to the same names.
    pages = alice.client.list_blobs(BUCKET, prefix="alice/", page_size=1).pages
    paged = [[b.name for b in page] for page in pages]
    assert [name for page in paged for name in page] == names and len(paged) > 1
    # The client spells its flags True: accepted, as Cloud Storage does.
    versioned = alice.client.list_blobs(BUCKET, prefix="alice/", versions=True, soft_deleted=False)
    assert {b.name for b in versioned} >= set(names)
    fake_gcs.put_object(BUCKET, "alice/public/note.txt", b"ok")
    listing = alice.client.list_blobs(BUCKET, prefix="alice/", delimiter="/")
    list(listing)
    assert "alice/public/" in listing.prefixes
    assert "alice/private/" not in listing.prefixes
    # Offsets and globs could bisect the carve-out through the pages' shapes: refused over
    # it, fine where nothing is hidden.
    with pytest.raises(exceptions.Forbidden):
        list(alice.client.list_blobs(BUCKET, prefix="alice/", start_offset="alice/p"))
    ranged = alice.client.list_blobs(
        BUCKET,
        prefix="alice/public/",
        start_offset="alice/public/m",
        end_offset="alice/public/o",
        match_glob="alice/public/**",
    )
    assert [b.name for b in ranged] == ["alice/public/note.txt"]


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
        assert response.headers["Server"] == "gcs-iap-proxy"  # no versions, as on the data port
    with urllib.request.urlopen(proxy.admin_url + "/readyz") as response:
        body = json.load(response)
        assert response.headers["Server"] == "gcs-iap-proxy"
    assert body["ready"] is True
    assert len(body["policy_revision"]) == 16
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(proxy.admin_url + "/metrics")
    missing.value.close()
    assert missing.value.code == 404
    assert missing.value.headers["Server"] == "gcs-iap-proxy"


def test_audit_records_are_structured_and_never_hold_tokens(alice, proxy):
    alice.blob("alice/audited.txt").upload_from_string(b"x")
    token = alice.client._credentials.token
    writes = proxy.audit_records(f"gs://{BUCKET}/alice/audited.txt")
    output = proxy.output()
    assert token not in output
    assert token.split(".")[2] not in output
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


def test_resumable_upload_in_chunks(alice, fake_gcs: FakeGcs, relay: RecordingRelay, proxy):
    data = os.urandom(20 * 1024 * 1024 + 12345)
    blob = alice.blob("alice/big.bin", chunk_size=4 * 1024 * 1024)
    relay.clear()
    blob.upload_from_file(io.BytesIO(data), content_type="application/octet-stream")
    stored = fake_gcs.get_object(BUCKET, "alice/big.bin")
    assert stored is not None and hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    chunks = [s for s in relay.seen if s.method == "PUT" and "upload_id=" in s.query]
    assert len(chunks) == 6
    assert alice.blob("alice/big.bin").download_as_bytes(start=5, end=9) == data[5:10]


def test_resumable_location_hides_the_upload_id(proxy, dev_issuer, relay: RecordingRelay):
    token = dev_issuer.mint(audience=AUD, subject="alice", email=ALICE)
    response = _request(
        proxy.url
        + f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&name=alice%2Fsession.bin",
        token,
        "POST",
        b"{}",
        {"Content-Type": "application/json"},
    )
    location = response.headers["Location"]
    response.close()
    assert location.startswith(
        proxy.url + f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&upload_id="
    )
    real = [s for s in relay.seen if s.method == "POST" and "uploadType=resumable" in s.query][-1]
    assert real is not None
    upstream_ids = {
        part.split("=", 1)[1]
        for s in relay.seen
        for part in s.query.split("&")
        if part.startswith("upload_id=")
    }
    assert not any(uid and uid in location for uid in upstream_ids)


def _request(
    url: str,
    token: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
):
    request = urllib.request.Request(
        url,
        data=body,
        method=method,
        headers={"Authorization": f"Bearer {token}", **(headers or {})},
    )
    return urllib.request.urlopen(request)


def test_copy_compose_rewrite(alice, fake_gcs: FakeGcs):
    alice.blob("alice/part-1").upload_from_string(b"hello ")
    alice.blob("alice/part-2").upload_from_string(b"world")
    copied = alice.copy_blob(alice.blob("alice/part-1"), alice, "alice/copy-1")
    assert copied.name == "alice/copy-1"
    assert fake_gcs.get_object(BUCKET, "alice/copy-1") == b"hello "
    composed = alice.blob("alice/joined")
    composed.compose([alice.blob("alice/part-1"), alice.blob("alice/part-2")])
    assert fake_gcs.get_object(BUCKET, "alice/joined") == b"hello world"
    rewritten = alice.blob("alice/rewritten")
    rewritten.rewrite(alice.blob("alice/joined"))
    assert fake_gcs.get_object(BUCKET, "alice/rewritten") == b"hello world"


def test_copy_from_ungranted_source_is_refused(alice, fake_gcs: FakeGcs, relay: RecordingRelay):
    fake_gcs.put_object(BUCKET, "drop/theirs.csv", b"not alice's")
    relay.clear()
    with pytest.raises(exceptions.Forbidden):
        alice.copy_blob(alice.blob("drop/theirs.csv"), alice, "alice/stolen.csv")
    with pytest.raises(exceptions.Forbidden):
        alice.blob("alice/stolen2.csv").compose(
            [alice.blob("alice/part-1"), alice.blob("drop/theirs.csv")]
        )
    assert relay.seen == []
    assert fake_gcs.get_object(BUCKET, "alice/stolen.csv") is None


def test_xml_api_get_and_head(alice, proxy, dev_issuer):
    alice.blob("alice/xml one.txt").upload_from_string(b"xml api data")
    token = dev_issuer.mint(audience=AUD, subject="alice", email=ALICE)
    with _request(proxy.url + f"/{BUCKET}/alice/xml%20one.txt", token) as response:
        assert response.read() == b"xml api data"
    with _request(
        proxy.url + f"/{BUCKET}/alice/xml%20one.txt", token, headers={"Range": "bytes=0-2"}
    ) as response:
        assert response.status == 206 and response.read() == b"xml"
    mallory_token = dev_issuer.mint(audience=AUD, subject="mallory", email=MALLORY)
    with pytest.raises(urllib.error.HTTPError) as caught:
        _request(proxy.url + f"/{BUCKET}/alice/xml%20one.txt", mallory_token)
    assert caught.value.code == 403
    caught.value.close()
