"""Hot reload, end to end: the sidecar process picks up policy edits (file, directory, secret
volume `..data` swap, SIGHUP), never runs a broken policy, and swaps issuers only with keys."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.devserver.issuer import DevIssuer, bind_socket, http_url, serve_socket
from proxy.policy import load_policy
from proxy.reload import KeysUnavailable, PolicyReloader, fingerprint
from tests.support.fakegcs import FakeGcs
from tests.support.proxyproc import ProxyProcess, isolated_env

pytestmark = pytest.mark.integration

AUD = "reload-sidecar"
BUCKET = "reload-data"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"
OBJECT = "team/plan.txt"


def policy_text(issuer: DevIssuer, *, readers: str, audience: str = AUD, extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
        version: 1
        issuers:
          - issuer: {issuer.issuer_url}
            audiences: ["{audience}"]
        rules:
          - id: team-read
            principals: [{readers}]
            bucket: {BUCKET}
            prefixes: ["team/"]
            verbs: [read, list]
        """
    ) + textwrap.dedent(extra)


@pytest.fixture(scope="module")
def seeded(fake_gcs: FakeGcs) -> FakeGcs:
    fake_gcs.create_bucket(BUCKET)
    fake_gcs.put_object(BUCKET, OBJECT, b"the plan")
    return fake_gcs


@pytest.fixture
def start(
    tmp_path: Path, metadata_server, seeded: FakeGcs
) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def run(policy: Path, *args: str) -> ProxyProcess:
        _, metadata_port = metadata_server
        process = ProxyProcess(policy, seeded.url, isolated_env(tmp_path, metadata_port), *args)
        started.append(process)
        process.wait_ready()
        return process

    yield run
    for process in started:
        assert process.stop() == 0, process.output()


def fetch(proxy: ProxyProcess, issuer: DevIssuer, email: str, audience: str = AUD) -> int:
    token = issuer.mint(audience=audience, subject=email.split("@")[0], email=email)
    request = urllib.request.Request(
        f"{proxy.url}/storage/v1/b/{BUCKET}/o/{OBJECT.replace('/', '%2F')}?alt=media",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.read() == b"the plan"
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def readyz(proxy: ProxyProcess) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(proxy.admin_url + "/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def replace_file(path: Path, text: str) -> None:
    """Write the way editors and `kubectl cp` do: a new file renamed over the old one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def audit_revisions(proxy: ProxyProcess, email: str) -> list[tuple[str, str]]:
    found = []
    for line in proxy.output().splitlines():
        if line.startswith("{") and '"audit"' in line:
            audit = json.loads(line)["audit"]
            if (audit.get("identity") or {}).get("email") == email:
                found.append((audit["decision"], audit["policy_revision"]))
    return found


def test_valid_edit_is_applied_without_restart(tmp_path, start, dev_issuer):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(dev_issuer, readers='"user:bob@example.com"'))
    proxy = start(policy)
    old = load_policy(policy).revision
    assert fetch(proxy, dev_issuer, ALICE) == 403

    replace_file(policy, policy_text(dev_issuer, readers=f'"user:{ALICE}"'))
    new = load_policy(policy).revision
    eventually(lambda: fetch(proxy, dev_issuer, ALICE) == 200)

    assert readyz(proxy) == (200, {"ready": True, "policy_revision": new})
    # Audit records are written just after each response: wait for the last one.
    eventually(lambda: audit_revisions(proxy, ALICE)[-1:] == [("allow", new)])
    assert audit_revisions(proxy, ALICE)[0] == ("deny", old)
    assert f"revision {old} -> {new}" in proxy.output()
    assert proxy.process.pid and proxy.process.poll() is None


def test_broken_edit_is_ignored_and_the_last_good_policy_stays(tmp_path, start, dev_issuer):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(dev_issuer, readers=f'"user:{ALICE}"'))
    proxy = start(policy)
    good = load_policy(policy).revision
    # Would let everyone in, but one rule has an unknown verb: the whole file is rejected.
    broken = policy_text(dev_issuer, readers="allAuthenticatedUsers") + (
        "  - id: typo\n"
        "    principals: [allAuthenticatedUsers]\n"
        "    bucket: other-bucket\n"
        '    prefixes: ["x/"]\n'
        "    verbs: [raed]\n"
    )
    replace_file(policy, broken)
    eventually(lambda: "policy reload rejected" in proxy.output())

    assert f"{policy}:15: unknown verb 'raed'" in proxy.output()
    assert f"still enforcing revision {good}" in proxy.output()
    assert fetch(proxy, dev_issuer, MALLORY) == 403
    assert fetch(proxy, dev_issuer, ALICE) == 200
    assert readyz(proxy) == (200, {"ready": True, "policy_revision": good})

    # Fixing the file is picked up as usual.
    replace_file(policy, policy_text(dev_issuer, readers="allAuthenticatedUsers"))
    eventually(lambda: fetch(proxy, dev_issuer, MALLORY) == 200)
    assert readyz(proxy)[1]["policy_revision"] == load_policy(policy).revision


@pytest.mark.parametrize("watched", ["policy.yaml", "."], ids=["file", "directory"])
def test_secret_volume_data_symlink_swap(tmp_path, start, dev_issuer, watched):
    # The layout Kubernetes and Cloud Run give a mounted secret: the visible file is a symlink
    # through `..data`, which is atomically re-pointed at a new timestamped directory.
    mount = tmp_path / "secret"
    first = mount / "..2026_01_01_00_00_00.1"
    first.mkdir(parents=True)
    (first / "policy.yaml").write_text(policy_text(dev_issuer, readers='"user:carol@example.com"'))
    (mount / "..data").symlink_to(first.name)
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    proxy = start(mount / watched)  # PROXY_POLICY: the file in the mount, or the mount
    assert fetch(proxy, dev_issuer, ALICE) == 403

    second = mount / "..2026_01_01_00_05_00.2"
    second.mkdir()
    (second / "policy.yaml").write_text(policy_text(dev_issuer, readers=f'"user:{ALICE}"'))
    # Same size and modification time as the old file: only the swap itself can give it away.
    old = os.stat(first / "policy.yaml")
    assert os.stat(second / "policy.yaml").st_size == old.st_size
    os.utime(second / "policy.yaml", ns=(old.st_atime_ns, old.st_mtime_ns))
    (mount / "..data_tmp").symlink_to(second.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    (first / "policy.yaml").unlink()
    first.rmdir()

    eventually(lambda: fetch(proxy, dev_issuer, ALICE) == 200)
    assert readyz(proxy)[1]["policy_revision"] == load_policy(mount).revision


def test_sighup_reloads(tmp_path, start, dev_issuer):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(dev_issuer, readers='"user:bob@example.com"'))
    proxy = start(policy, "--reload-interval", "0")  # no polling: only SIGHUP reloads
    policy.write_text(policy_text(dev_issuer, readers=f'"user:{ALICE}"'))
    time.sleep(1.5)
    assert fetch(proxy, dev_issuer, ALICE) == 403

    proxy.process.send_signal(signal.SIGHUP)
    eventually(lambda: fetch(proxy, dev_issuer, ALICE) == 200)
    assert "policy reloaded (SIGHUP)" in proxy.output()
    assert proxy.process.poll() is None


def test_changed_issuers_are_trusted_only_once_their_keys_are_fetched(tmp_path, start, dev_issuer):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(dev_issuer, readers=f'"user:{ALICE}"', audience="aud-1"))
    proxy = start(policy)
    assert fetch(proxy, dev_issuer, ALICE, audience="aud-1") == 200
    assert fetch(proxy, dev_issuer, ALICE, audience="aud-2") == 401

    # A new issuer whose keys cannot be fetched: the reload is refused and nothing changes.
    unreachable = policy_text(dev_issuer, readers=f'"user:{ALICE}"', audience="aud-2").replace(
        "issuers:\n",
        "issuers:\n  - issuer: http://127.0.0.1:9\n    audiences: [elsewhere]\n",
    )
    replace_file(policy, unreachable)
    eventually(lambda: "policy reload rejected" in proxy.output())
    assert "keys of issuer http://127.0.0.1:9 could not be fetched" in proxy.output()
    assert fetch(proxy, dev_issuer, ALICE, audience="aud-1") == 200
    assert fetch(proxy, dev_issuer, ALICE, audience="aud-2") == 401
    assert readyz(proxy)[0] == 200

    replace_file(policy, policy_text(dev_issuer, readers=f'"user:{ALICE}"', audience="aud-2"))
    eventually(lambda: fetch(proxy, dev_issuer, ALICE, audience="aud-2") == 200)
    assert fetch(proxy, dev_issuer, ALICE, audience="aud-1") == 401
    assert readyz(proxy) == (200, {"ready": True, "policy_revision": load_policy(policy).revision})


def test_a_policy_refused_for_unavailable_keys_is_tried_again(
    tmp_path, start, dev_issuer, loop_thread
):
    """The file on disk wins once it can load. Found by a review: a reload refused because
    a new issuer's keys could not be fetched was never tried again, so a grant the file
    had removed stayed in force (and with --workers, one worker could keep it while the
    other dropped it) until someone touched the file again."""
    keys_up = False

    async def jwks(_: web.Request) -> web.Response:
        if keys_up:
            return web.json_response(dev_issuer.jwks())
        return web.Response(status=500, text="down")

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    sock = bind_socket("127.0.0.1", 0)
    jwks_url = http_url("127.0.0.1", sock.getsockname()[1]) + "/jwks"
    runner = loop_thread.run(serve_socket(app, sock))
    try:
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy_text(dev_issuer, readers=f'"user:{ALICE}"'))
        proxy = start(policy)
        assert fetch(proxy, dev_issuer, ALICE) == 200
        # Alice's read moves to mallory, and an issuer whose keys are down arrives.
        second = f"issuers:\n  - issuer: https://second.example\n    jwks_uri: {jwks_url}\n"
        second += "    audiences: [elsewhere]\n"
        edited = policy_text(dev_issuer, readers=f'"user:{MALLORY}"').replace("issuers:\n", second)
        replace_file(policy, edited)
        eventually(lambda: "policy reload rejected" in proxy.output())
        assert fetch(proxy, dev_issuer, ALICE) == 200  # the last good policy, meanwhile
        keys_up = True
        eventually(lambda: fetch(proxy, dev_issuer, ALICE) == 403, timeout=10)
        assert fetch(proxy, dev_issuer, MALLORY) == 200
        assert "retrying: issuer keys were unavailable" in proxy.output()
        assert readyz(proxy) == (
            200,
            {"ready": True, "policy_revision": load_policy(policy).revision},
        )
    finally:
        loop_thread.run(runner.cleanup())


def writer_policy(issuer: DevIssuer) -> str:
    return policy_text(issuer, readers=f'"user:{ALICE}"').replace("[read, list]", "[read, write]")


def upload_across_a_reload(
    proxy: ProxyProcess, policy: Path, reloaded: str, token: str, name: str
) -> bytes:
    """A multipart upload of `name` whose body is still coming when `policy` becomes
    `reloaded` (SIGHUP, reload confirmed); the raw answer."""
    body = (
        b'--B\r\nContent-Type: application/json\r\n\r\n{"name": "' + name.encode() + b'"}\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nDATA\r\n--B--\r\n"
    )
    head = (
        f"POST /upload/storage/v1/b/{BUCKET}/o?uploadType=multipart HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: multipart/related; boundary=B\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
        sock.sendall(head + body[:10])
        replace_file(policy, reloaded)
        proxy.process.send_signal(signal.SIGHUP)
        eventually(lambda: "policy reloaded (SIGHUP)" in proxy.output())
        sock.sendall(body[10:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_a_revocation_during_a_metadata_body_decides_the_upload(tmp_path, start, dev_issuer):
    """Found by a review: the revision in force when the headers arrived decided, so a
    grant revoked while a multipart body was still coming (up to the body timeout)
    still let the object be written."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(writer_policy(dev_issuer))
    proxy = start(policy, "--reload-interval", "0")
    token = dev_issuer.mint(audience=AUD, subject="alice", email=ALICE)
    revoked = policy_text(dev_issuer, readers=f'"user:{ALICE}"')
    reply = upload_across_a_reload(proxy, policy, revoked, token, "team/late.txt")
    assert reply.split(b" ", 2)[1] == b"403", reply[:300]
    assert proxy.audit_records(f"gs://{BUCKET}/team/late.txt")[-1]["audit"]["decision"] == "deny"


def test_tokens_an_issuer_change_revokes_during_a_body_decide_nothing(tmp_path, start, dev_issuer):
    """A review: after a reload during a metadata body the newest policy decided, but the
    identity was still the old verifier's; with the issuer's audience changed, a token a
    fresh request could no longer use finished its upload."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(writer_policy(dev_issuer))
    proxy = start(policy, "--reload-interval", "0")
    token = dev_issuer.mint(audience=AUD, subject="alice", email=ALICE)
    moved = policy.read_text().replace(f'audiences: ["{AUD}"]', 'audiences: ["elsewhere"]')
    reply = upload_across_a_reload(proxy, policy, moved, token, "team/late2.txt")
    assert reply.split(b" ", 2)[1] == b"401", reply[:300]


class _Held:
    """What PolicyReloader reads and writes of Components, without a sidecar."""

    def __init__(self, path: Path) -> None:
        from proxy.policy import compile_policy

        self.policy = compile_policy(load_policy(path))
        self.verifier = None


def _keys_down(reloader: PolicyReloader) -> None:
    async def unavailable(policy: object, current: object) -> None:
        raise KeysUnavailable(["keys down"])

    reloader._verifier_for = unavailable  # type: ignore[method-assign,assignment]


def test_each_refused_file_starts_its_own_backoff(tmp_path, dev_issuer):
    """A review: after one file's retries (1, 2, 4, 8 s) ended, the next file refused for
    keys waited 16 s, the revoked grant meanwhile in force."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(dev_issuer, readers=f'"user:{ALICE}"'))

    async def gaps() -> list[int]:
        reloader = PolicyReloader(policy, _Held(policy), session=None, interval=1.0)  # type: ignore[arg-type]
        _keys_down(reloader)
        seen = []
        for readers, times in ((f'"user:{MALLORY}"', 4), ("allAuthenticatedUsers", 1)):
            replace_file(policy, policy_text(dev_issuer, readers=readers))
            reloader._signature = fingerprint(policy)  # as the poll or SIGHUP sets it
            for _ in range(times):
                assert not await reloader.reload("test")
                assert reloader._retry_at is not None
                seen.append(round(reloader._retry_at - asyncio.get_running_loop().time()))
        return seen

    assert asyncio.run(gaps()) == [1, 2, 4, 8, 1]


def test_sighup_only_retries_never_load_an_unsignalled_edit(tmp_path, dev_issuer):
    """With --reload-interval 0 a retry loads the file it was for, not one written after
    it without a SIGHUP (a review saw a later edit go live)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(dev_issuer, readers=f'"user:{ALICE}"'))
    held = _Held(policy)
    first = held.policy.revision
    reloads: list[str] = []

    async def run() -> None:
        reloader = PolicyReloader(policy, held, session=None, interval=0)  # type: ignore[arg-type]
        _keys_down(reloader)
        reload = reloader.reload

        async def counted(why: str, **options: bool) -> bool:
            try:
                return await reload(why, **options)
            finally:
                reloads.append(why)

        reloader.reload = counted  # type: ignore[method-assign]

        async def until(done: Callable[[], bool]) -> None:  # polled: a loaded machine is slow
            for _ in range(500):
                if done():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"reloads so far: {reloads}")

        task = asyncio.create_task(reloader.run())
        await until(lambda: len(reloads) == 1)  # the start-up check
        replace_file(policy, policy_text(dev_issuer, readers=f'"user:{MALLORY}"'))
        reloader._hangup.set()  # SIGHUP: refused, keys down; a retry is due in 1 s
        await until(lambda: len(reloads) == 2 and reloader._retry_at is not None)
        replace_file(policy, policy_text(dev_issuer, readers="allAuthenticatedUsers"))
        reloader._verifier_for = lambda policy, current: asyncio.sleep(0)  # type: ignore[method-assign,assignment,return-value]
        await until(lambda: reloader._retry_at is None)  # the retry saw another file: settled
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert held.policy.revision == first
    assert reloads == ["start-up check", "SIGHUP"]  # the retry loaded nothing
