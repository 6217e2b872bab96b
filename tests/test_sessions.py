"""Resumable-upload session handles: sealed, bound, expiring, and shared across processes."""

from __future__ import annotations

import contextlib
import http.client
import textwrap
import time

import pytest

from proxy.devserver.fakegcs import FakeGcsError
from proxy.gcs.sessions import (
    _AAD,
    SESSION_KEY_ENV,
    InvalidPageToken,
    InvalidSession,
    SessionSealer,
    UploadSession,
    encode_key,
    session_key,
)
from tests.support.proxyproc import ProxyProcess, isolated_env

KEY = bytes(range(32))
POWERS = {"replaces": False, "privileged": False}


def test_round_trip_and_opacity():
    sealer = SessionSealer(KEY)
    handle = sealer.new("https://issuer", "sub-1", "bkt", "dir/obj", "REAL-UPLOAD-ID-123", **POWERS)
    session = sealer.open(handle)
    assert (session.subject, session.bucket, session.object, session.upload_id) == (
        "sub-1",
        "bkt",
        "dir/obj",
        "REAL-UPLOAD-ID-123",
    )
    assert "REAL-UPLOAD-ID" not in handle
    assert "dir/obj" not in handle
    assert handle != sealer.new(
        "https://issuer", "sub-1", "bkt", "dir/obj", "REAL-UPLOAD-ID-123", **POWERS
    )


@pytest.mark.parametrize(("replaces", "privileged"), [(False, False), (True, False), (False, True)])
def test_a_handle_carries_the_powers_its_session_was_opened_with(replaces, privileged):
    sealer = SessionSealer(KEY)
    handle = sealer.new("i", "s", "b", "o", "u", replaces=replaces, privileged=privileged)
    assert (sealer.open(handle).replaces, sealer.open(handle).privileged) == (replaces, privileged)
    # A handle sealed before sessions carried their powers is taken to replace (its chunks
    # need delete), not to be privileged (every caller without admin would lose its
    # uploads in flight).
    older = sealer._seal(["i", "s", "b", "o", "u", int(time.time()) + 60], _AAD)
    assert (sealer.open(older).replaces, sealer.open(older).privileged) == (True, False)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h[:-2] + ("AA" if h[-2:] != "AA" else "BB"),
        lambda h: h[5:],
        lambda h: "",
        lambda h: "x" * 5000,
        lambda h: h + "%%",
    ],
)
def test_tampered_handles(mutate):
    sealer = SessionSealer(KEY)
    handle = sealer.new("i", "s", "b", "o", "u", **POWERS)
    with pytest.raises(InvalidSession):
        sealer.open(mutate(handle))


def test_other_key_and_expiry():
    handle = SessionSealer(KEY).new("i", "s", "b", "o", "u", **POWERS)
    with pytest.raises(InvalidSession):
        SessionSealer(bytes(32)).open(handle)
    expired = SessionSealer(KEY).seal(UploadSession("i", "s", "b", "o", "u", int(time.time()) - 1))
    with pytest.raises(InvalidSession, match="expired"):
        SessionSealer(KEY).open(expired)


def test_page_tokens_open_only_for_their_identity_bucket_and_listing():
    sealer = SessionSealer(KEY)
    listing = "prefix=alice/"
    handle = sealer.seal_page("https://issuer", "alice", "bkt", listing, "alice/secret/plan.txt")
    assert "secret" not in handle and "alice" not in handle
    opened = sealer.open_page(handle, "https://issuer", "alice", "bkt", listing)
    assert opened == "alice/secret/plan.txt"
    for issuer, subject, bucket, other in [
        ("https://issuer", "mallory", "bkt", listing),
        ("https://other", "alice", "bkt", listing),
        ("https://issuer", "alice", "other-bkt", listing),
        ("https://issuer", "alice", "bkt", "prefix=alice/secret"),  # the same token, replayed
        ("https://issuer", "alice", "bkt", "delimiter=s&prefix=alice/"),
    ]:
        with pytest.raises(InvalidPageToken):
            sealer.open_page(handle, issuer, subject, bucket, other)
    with pytest.raises(InvalidPageToken):
        SessionSealer(bytes(32)).open_page(handle, "https://issuer", "alice", "bkt", listing)


def test_page_tokens_and_upload_handles_are_not_interchangeable():
    sealer = SessionSealer(KEY)
    upload = sealer.new("https://issuer", "alice", "bkt", "alice/x", "UPLOAD-ID", **POWERS)
    page = sealer.seal_page("https://issuer", "alice", "bkt", "", "alice/x")
    with pytest.raises(InvalidPageToken):
        sealer.open_page(upload, "https://issuer", "alice", "bkt", "")
    with pytest.raises(InvalidSession):
        sealer.open(page)
    for garbage in ["", "alice/x", "Zm9v", "!" * 10, "A" * 5000]:
        with pytest.raises(InvalidPageToken):
            sealer.open_page(garbage, "https://issuer", "alice", "bkt", "")


def test_handles_hold_the_longest_names_they_are_given():
    """A review: JSON's \\u escapes made a legal 1,022-byte name of emoji a handle over
    the size limit, issued and then refused."""
    sealer = SessionSealer(KEY)
    name = "alice/" + "\N{GRINNING FACE}" * 254  # 1,022 UTF-8 bytes
    handle = sealer.new("https://issuer", "alice", "bkt", name, "UPLOAD-" + "u" * 200, **POWERS)
    assert sealer.open(handle).object == name
    page = sealer.seal_page("https://issuer", "alice", "bkt", "prefix=alice/", name)
    assert sealer.open_page(page, "https://issuer", "alice", "bkt", "prefix=alice/") == name


def test_page_tokens_do_not_tell_how_long_the_name_inside_is():
    """Nor can a parameter the caller picks move the length: a review grew quotaUser a
    byte at a time and read a hidden name's exact length off the one step."""
    sealer = SessionSealer(KEY)
    lengths = {
        len(sealer.seal_page("https://issuer", "alice", "bkt", listing, "alice/secret/" + "x" * n))
        for n in (5, 100, 200, 400, 1010)
        for listing in ("", '[["quotaUser", "' + "q" * 300 + '"]]')
    }
    assert len(lengths) == 1, lengths


def test_session_key_from_environment():
    assert session_key({SESSION_KEY_ENV: encode_key(KEY)}) == KEY
    assert len(session_key({})) == 32
    for bad in ("not base64!!", encode_key(b"short")):
        with pytest.raises(ValueError):
            session_key({SESSION_KEY_ENV: bad})


@pytest.mark.integration
def test_handles_work_across_processes_sharing_the_key(
    tmp_path, dev_issuer, metadata_server, fake_gcs, relay
):
    fake_gcs.create_bucket("sessions-bucket")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers: [{{issuer: "{dev_issuer.issuer_url}", audiences: [sessions]}}]
            rules:
              - {{id: w, principals: ["user:w@example.com"], bucket: sessions-bucket, prefixes: [up/], verbs: [write, delete]}}
            """
        )
    )
    _, metadata_port = metadata_server
    shared = {SESSION_KEY_ENV: encode_key(KEY)}
    first = ProxyProcess(policy, relay.url, isolated_env(tmp_path, metadata_port, **shared))
    second = ProxyProcess(policy, relay.url, isolated_env(tmp_path, metadata_port, **shared))
    stranger = ProxyProcess(policy, relay.url, isolated_env(tmp_path, metadata_port))
    try:
        for process in (first, second, stranger):
            process.wait_ready()
        token = dev_issuer.mint(audience="sessions", subject="w", email="w@example.com")
        location = _start(first, token)
        assert _put(stranger, location, token, b"abc").status == 404
        assert _put(second, location, token, b"abc").status == 200
        assert fake_gcs.get_object("sessions-bucket", "up/file.bin") == b"abc"
    finally:
        for process in (first, second, stranger):
            process.stop()


@pytest.mark.integration
def test_a_session_keeps_only_the_powers_the_policy_still_grants(
    tmp_path, dev_issuer, metadata_server, fake_gcs, relay
):
    """A review: a session opened by a caller with delete (so without create-only) went
    on replacing the object after a reload took delete away, for up to the session's
    week; one opened with an ACL went on after admin was taken away. Chunks need what
    the session was opened with, decided with the policy of now. Here the policy of now
    is a second sidecar's, sharing the session key."""
    with contextlib.suppress(FakeGcsError):  # made by an earlier test
        fake_gcs.create_bucket("sessions-bucket")
    fake_gcs.put_object("sessions-bucket", "up/file.bin", b"original")

    def sidecar(verbs: str) -> ProxyProcess:
        policy = tmp_path / f"{verbs.replace(', ', '-')}.yaml"
        policy.write_text(
            f"version: 1\nissuers: [{{issuer: '{dev_issuer.issuer_url}', audiences: [sessions]}}]\n"
            f"rules:\n  - {{id: w, principals: ['user:w@example.com'], bucket: sessions-bucket, prefixes: [up/], verbs: [{verbs}]}}\n"
        )
        shared = {SESSION_KEY_ENV: encode_key(KEY)}
        return ProxyProcess(policy, relay.url, isolated_env(tmp_path, metadata_server[1], **shared))

    everything, write_delete, write_only = (
        sidecar("write, delete, admin"),
        sidecar("write, delete"),
        sidecar("write"),
    )
    try:
        for process in (everything, write_delete, write_only):
            process.wait_ready()
        token = dev_issuer.mint(audience="sessions", subject="w", email="w@example.com")
        replacing = _start(everything, token)
        ended = _start(everything, token)
        created = _start(write_only, token)  # create-only upstream: never replaces
        acl = _start(everything, token, "&predefinedAcl=publicRead")
        held = _start(everything, token, body=b'{"temporaryHold": true}')  # admin by its body
        relay.clear()
        assert _put(write_only, replacing, token, b"gone").status == 403
        assert _put(write_delete, acl, token, b"public").status == 403
        assert _put(write_delete, held, token, b"held").status == 403
        assert relay.seen == []
        assert fake_gcs.get_object("sessions-bucket", "up/file.bin") == b"original"
        assert _cancel(write_only, ended, token).status != 403  # ends it, writes nothing
        assert _put(write_only, created, token, b"new").status in (200, 412)
        assert _put(write_delete, replacing, token, b"replaced").status == 200
        assert fake_gcs.get_object("sessions-bucket", "up/file.bin") == b"replaced"
    finally:
        for process in (everything, write_delete, write_only):
            process.stop()


@pytest.mark.integration
def test_invalid_session_key_is_a_usage_error(tmp_path, metadata_server, relay):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nissuers: [{issuer: 'http://127.0.0.1:1', audiences: [a]}]\n")
    process = ProxyProcess(
        policy, relay.url, isolated_env(tmp_path, 1, **{SESSION_KEY_ENV: "short"})
    )
    assert process.process.wait(timeout=20) == 2
    assert SESSION_KEY_ENV in process.output()
    process.stop()


def _start(process: ProxyProcess, token: str, more: str = "", body: bytes = b"{}") -> str:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.request(
        "POST",
        "/upload/storage/v1/b/sessions-bucket/o?uploadType=resumable&name=up%2Ffile.bin" + more,
        body=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200
    return response.getheader("Location").split(f"127.0.0.1:{process.port}", 1)[1]


def _put(process: ProxyProcess, location: str, token: str, data: bytes) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}",
    }
    connection.request("PUT", location, body=data, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def _cancel(process: ProxyProcess, location: str, token: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.request("DELETE", location, headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response
