"""Real clients other than google-cloud-storage, each against the sidecar process in front of
fake-gcs-server (through the recording relay): gcsfs, gcloud-aio-storage, the Node
`@google-cloud/storage` package, rclone and gsutil, configured as the README's "Using it from
your app" section says. For each client: an allowed identity succeeds, its bytes are checked directly in
fake-gcs-server and nothing appears outside the granted prefix; a denied identity gets the
client's own 403 error and nothing reaches upstream at all.

Known client and proxy bugs are strict xfails that name the request involved, so they turn
into failures once fixed.

A client that is not installed locally is skipped with the reason; `.ci/run` installs all of
them and sets REQUIRE_ALL_CLIENTS=1, which turns such a skip into a failure.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.oauth2.credentials import Credentials

from proxy.devserver.issuer import DevIssuer
from tests.support.fakegcs import FakeGcs
from tests.support.proxyproc import ProxyProcess, isolated_env
from tests.support.recorder import RecordingRelay


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAVE_GCSFS = _installed("gcsfs")
HAVE_AIO = _installed("gcloud.aio.storage")
if HAVE_GCSFS:
    # The plain HTTP filesystem. In recent gcsfs, `gcsfs.GCSFileSystem` is by default an
    # "extended" class that first asks the Storage Control *gRPC* API for the bucket layout,
    # which a JSON-API sidecar cannot answer (a 60 s timeout per call); see the README.
    from gcsfs.core import GCSFileSystem
if HAVE_AIO:
    import aiohttp
    from gcloud.aio.auth.token import BaseToken, TokenResponse
    from gcloud.aio.storage import Storage as AioStorage

pytestmark = pytest.mark.integration

AUD = "clients-sidecar"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"
BUCKETS = {
    "gcsfs": "clients-gcsfs",
    "aio": "clients-gcloud-aio",
    "node": "clients-node",
    "rclone": "clients-rclone",
    "gsutil": "clients-gsutil",
}
NODE_DIR = Path(__file__).parent / "node"
NODE_SCRIPT = NODE_DIR / "gcs-client.js"
REQUIRE_ALL = os.environ.get("REQUIRE_ALL_CLIENTS") == "1"
# gsutil lives in its own environment (its pins are not ours): `.ci/run` makes it.
GSUTIL = Path(__file__).parent.parent / ".venv-gsutil" / "bin" / "gsutil"

NODE_RESUMABLE_AUTH_BUG = (
    "client bug, @google-cloud/storage 7.22.0: File#startResumableUpload_ does not pass "
    "useAuthWithCustomEndpoint on, so the resumable upload of file.save()/createWriteStream() "
    "sends no Authorization header to a custom apiEndpoint and the sidecar answers 401"
)


def _missing(what: str) -> None:
    message = f"{what} is not installed locally (`.ci/run` installs it)"
    if REQUIRE_ALL:
        pytest.fail(f"{message}, and REQUIRE_ALL_CLIENTS=1")
    pytest.skip(message)


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory,
    dev_issuer: DevIssuer,
    metadata_server,
    fake_gcs: FakeGcs,
    relay: RecordingRelay,
) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("clients-proxy")
    rules = "".join(
        f"  - id: alice-{client}\n"
        f'    principals: ["user:{ALICE}"]\n'
        f"    bucket: {bucket}\n"
        '    prefixes: ["alice/"]\n'
        "    verbs: [read, list, write, delete, metadata]\n"
        for client, bucket in BUCKETS.items()
    )
    policy = tmp / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers:
              - issuer: {dev_issuer.issuer_url}
                audiences: ["{AUD}"]
            rules:
            """
        )
        + rules
    )
    for bucket in BUCKETS.values():
        fake_gcs.create_bucket(bucket)
    _, metadata_port = metadata_server
    process = ProxyProcess(policy, relay.url, isolated_env(tmp, metadata_port))
    try:
        process.wait_ready()
    except RuntimeError:
        process.stop()
        raise
    yield process
    assert process.stop() == 0, process.output()


def id_token(issuer: DevIssuer, email: str) -> str:
    return issuer.mint(audience=AUD, subject=email.split("@")[0], email=email)


def audit_tail(proxy: ProxyProcess, count: int = 12) -> str:
    """The last audit decisions, for assertion messages: method, URL, status, decision."""
    lines = []
    for line in proxy.output().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "audit" not in record:
            continue
        http, audit = record["httpRequest"], record["audit"]
        lines.append(
            f"{http['requestMethod']} {http['requestUrl']} -> {http['status']}"
            f" {audit['decision']} {audit.get('reason') or ''}"
        )
    return "\n".join(lines[-count:])


def seen_upstream(relay: RecordingRelay) -> list[str]:
    return [f"{s.method} {s.raw_path}" for s in relay.seen]


class Upstream:
    """Assertions about the bucket in fake-gcs-server, read behind the proxy's back."""

    def __init__(self, fake_gcs: FakeGcs, bucket: str) -> None:
        self.fake_gcs, self.bucket = fake_gcs, bucket
        self.before = set(fake_gcs.list_names(bucket))

    def has(self, name: str, data: bytes) -> None:
        stored = self.fake_gcs.get_object(self.bucket, name)
        assert stored is not None, f"gs://{self.bucket}/{name} was not created"
        assert len(stored) == len(data) and stored == data, f"gs://{self.bucket}/{name} differs"

    def created(self) -> set[str]:
        return set(self.fake_gcs.list_names(self.bucket)) - self.before

    def only_created(self, *names: str) -> None:
        assert self.created() == set(names)


class Untouched(Upstream):
    """For a denied identity: seeds alice/keep.txt and clears the relay; `check()` then
    asserts that nothing reached upstream and nothing changed."""

    def __init__(self, fake_gcs: FakeGcs, bucket: str, relay: RecordingRelay, proxy: ProxyProcess):
        fake_gcs.put_object(bucket, "alice/keep.txt", b"precious")
        super().__init__(fake_gcs, bucket)
        self.relay, self.proxy = relay, proxy
        relay.clear()

    def check(self) -> None:
        assert seen_upstream(self.relay) == [], audit_tail(self.proxy)
        assert self.fake_gcs.get_object(self.bucket, "alice/keep.txt") == b"precious"
        self.only_created()


@pytest.fixture
def untouched(fake_gcs: FakeGcs, relay: RecordingRelay, proxy: ProxyProcess):
    return lambda bucket: Untouched(fake_gcs, bucket, relay, proxy)


# ---------------------------------------------------------------------------------- gcsfs


@pytest.fixture
def gcsfs_for(proxy: ProxyProcess, dev_issuer: DevIssuer, monkeypatch):
    if not HAVE_GCSFS:
        _missing("gcsfs")
    # gcsfs retries 5xx six times with exponential back-off (its `retries` is fixed when the
    # class is defined); a failure here should fail at once.
    monkeypatch.setattr("gcsfs.retry.is_retriable", lambda exception: False)

    def make(email: str) -> Any:
        return GCSFileSystem(
            project="clients-project",
            endpoint_url=proxy.url,
            token=Credentials(id_token(dev_issuer, email)),
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    return make


def test_gcsfs_ls_cat_rm(gcsfs_for, proxy, fake_gcs: FakeGcs):
    bucket = BUCKETS["gcsfs"]
    seeded = os.urandom(3000)
    fake_gcs.put_object(bucket, "alice/seeded.bin", seeded)
    fs = gcsfs_for(ALICE)
    assert f"{bucket}/alice/seeded.bin" in fs.ls(f"{bucket}/alice/", detail=False)
    assert fs.cat(f"{bucket}/alice/seeded.bin") == seeded
    fs.rm(f"{bucket}/alice/seeded.bin")
    assert fake_gcs.get_object(bucket, "alice/seeded.bin") is None, audit_tail(proxy)


def test_gcsfs_pipe_default_multipart(gcsfs_for, proxy, fake_gcs: FakeGcs):
    """Below `chunksize` (50 MiB) gcsfs.pipe sends one uploadType=multipart request."""
    bucket = BUCKETS["gcsfs"]
    upstream = Upstream(fake_gcs, bucket)
    fs = gcsfs_for(ALICE)
    data = os.urandom(70_000)
    fs.pipe(f"{bucket}/alice/piped.bin", data)
    upstream.has("alice/piped.bin", data)
    upstream.only_created("alice/piped.bin")
    assert fs.cat(f"{bucket}/alice/piped.bin") == data


def test_gcsfs_pipe_resumable(gcsfs_for, proxy, fake_gcs: FakeGcs):
    """At `chunksize` and above gcsfs uploads resumably (its chunks are POSTs); a small
    chunksize takes that path: initiation, 256 KiB-multiple chunks, the final chunk."""
    bucket = BUCKETS["gcsfs"]
    upstream = Upstream(fake_gcs, bucket)
    fs = gcsfs_for(ALICE)
    data = os.urandom(600 * 1024)
    fs.pipe_file(f"{bucket}/alice/resumable.bin", data, chunksize=256 * 1024)
    upstream.has("alice/resumable.bin", data)
    upstream.only_created("alice/resumable.bin")
    assert fs.cat(f"{bucket}/alice/resumable.bin") == data


def test_gcsfs_denied(gcsfs_for, untouched):
    bucket = BUCKETS["gcsfs"]
    guard = untouched(bucket)
    fs = gcsfs_for(MALLORY)
    # gcsfs turns a 403 into OSError("Forbidden: ...").
    with pytest.raises(OSError, match=r"^Forbidden"):
        fs.ls(f"{bucket}/alice/")
    with pytest.raises(OSError, match=r"^Forbidden"):
        fs.cat(f"{bucket}/alice/keep.txt")
    with pytest.raises(OSError, match=r"^Forbidden"):
        fs.rm(f"{bucket}/alice/keep.txt")
    with pytest.raises(OSError, match=r"^Forbidden"):
        fs.pipe_file(f"{bucket}/alice/keep.txt", os.urandom(300_000), chunksize=256 * 1024)
    guard.check()


def test_gcsfs_denied_pipe_default_multipart(gcsfs_for, untouched):
    bucket = BUCKETS["gcsfs"]
    guard = untouched(bucket)
    fs = gcsfs_for(MALLORY)
    with pytest.raises(OSError, match=r"^Forbidden"):
        fs.pipe(f"{bucket}/alice/keep.txt", b"overwritten")
    with pytest.raises(OSError, match=r"^Forbidden"):
        fs.pipe(f"{bucket}/alice/planted.txt", b"planted")
    guard.check()


# ----------------------------------------------------------------------- gcloud-aio-storage


if HAVE_AIO:

    class StaticIdToken(BaseToken):
        """A gcloud-aio token class that hands out a caller ID token (the README's, minus
        fetching: this one was minted by the test issuer)."""

        def __init__(self, token: str) -> None:
            super().__init__()
            self._token = token

        async def refresh(self, *, timeout: int) -> TokenResponse:  # noqa: ASYNC109 (the base class signature)
            return TokenResponse(value=self._token, expires_in=3000)


@pytest.fixture
def aio_run(proxy: ProxyProcess, dev_issuer: DevIssuer):
    if not HAVE_AIO:
        _missing("gcloud-aio-storage")

    def run(email: str, work: Any) -> Any:
        async def main() -> Any:
            token = StaticIdToken(id_token(dev_issuer, email))
            async with aiohttp.ClientSession() as session:
                storage = AioStorage(
                    token=token, session=session, api_root=proxy.url, api_is_dev=False
                )
                try:
                    return await work(storage)
                finally:
                    await token.close()

        return asyncio.run(main())

    return run


@pytest.mark.parametrize(
    ("mode", "size", "kwargs"),
    [
        ("media", 40_000, {}),  # the default up to 5 MB: uploadType=media
        ("multipart", 40_000, {"metadata": {"metadata": {"owner": "alice"}}}),
        ("resumable", 6 * 1024 * 1024, {}),  # the default above 5 MB: one PUT to the session
    ],
)
def test_gcloud_aio_upload_download(aio_run, proxy, fake_gcs: FakeGcs, mode, size, kwargs):
    bucket = BUCKETS["aio"]
    upstream = Upstream(fake_gcs, bucket)
    name = f"alice/{mode}.bin"
    data = os.urandom(size)

    async def work(storage: Any) -> bytes:
        await storage.upload(bucket, name, data, content_type="application/x-demo", **kwargs)
        downloaded: bytes = await storage.download(bucket, name)
        return downloaded

    downloaded = aio_run(ALICE, work)
    upstream.has(name, data)
    upstream.only_created(name)
    assert downloaded == data
    if "metadata" in kwargs:
        assert fake_gcs.get_metadata(bucket, name)["metadata"] == {"owner": "alice"}


def test_gcloud_aio_denied(aio_run, untouched):
    bucket = BUCKETS["aio"]
    guard = untouched(bucket)

    async def work(storage: Any) -> list[int]:
        attempts = [
            lambda: storage.download(bucket, "alice/keep.txt"),
            lambda: storage.upload(bucket, "alice/keep.txt", b"overwritten"),
            lambda: storage.upload(bucket, "alice/planted.txt", b"planted"),
            lambda: storage.upload(
                bucket, "alice/planted.txt", b"planted", metadata={"metadata": {"a": "b"}}
            ),
            lambda: storage.upload(
                bucket, "alice/planted.txt", b"planted", force_resumable_upload=True
            ),
        ]
        statuses = []
        for attempt in attempts:
            with pytest.raises(aiohttp.ClientResponseError) as caught:
                await attempt()
            statuses.append(caught.value.status)
        return statuses

    assert aio_run(MALLORY, work) == [403] * 5
    guard.check()


# ------------------------------------------------------------- Node @google-cloud/storage


@pytest.fixture
def node(proxy: ProxyProcess, dev_issuer: DevIssuer, tmp_path: Path):
    node_bin = shutil.which("node")
    if node_bin is None or not (NODE_DIR / "node_modules" / "@google-cloud" / "storage").is_dir():
        _missing("node with @google-cloud/storage (`npm ci` in tests/node)")

    def run(email: str, op: str, *args: str) -> dict[str, Any]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "GCS_ID_TOKEN": id_token(dev_issuer, email),
        }
        done = subprocess.run(
            [node_bin, str(NODE_SCRIPT), op, proxy.url, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = done.stdout.strip().splitlines()
        assert lines, f"node printed nothing (exit {done.returncode}):\n{done.stderr}"
        result: dict[str, Any] = json.loads(lines[-1])
        assert (done.returncode == 0) == result["ok"], done.stderr
        return result

    return run


@pytest.mark.parametrize(
    "mode",
    [
        "simple",
        pytest.param(
            "default", marks=pytest.mark.xfail(strict=True, reason=NODE_RESUMABLE_AUTH_BUG)
        ),
        "resumable-interceptor",
    ],
)
def test_node_save_download(node, proxy, fake_gcs: FakeGcs, tmp_path: Path, mode):
    """`simple` is `resumable: false` (one multipart request); `default` sets no `resumable`
    option (a resumable upload); `resumable-interceptor` is resumable with the README's
    work-around for the client bug above (an interceptor adding the Authorization header)."""
    bucket = BUCKETS["node"]
    upstream = Upstream(fake_gcs, bucket)
    name = f"alice/{mode}.bin"
    data = os.urandom(300_000)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    saved = node(ALICE, "save", bucket, name, str(source), mode)
    assert saved["ok"], f"{saved}\n{audit_tail(proxy)}"
    upstream.has(name, data)
    upstream.only_created(name)

    target = tmp_path / "downloaded.bin"
    downloaded = node(ALICE, "download", bucket, name, str(target))
    assert downloaded["ok"], f"{downloaded}\n{audit_tail(proxy)}"
    assert target.read_bytes() == data


def test_node_denied(node, untouched, tmp_path: Path):
    bucket = BUCKETS["node"]
    guard = untouched(bucket)
    source = tmp_path / "evil.bin"
    source.write_bytes(b"overwritten")
    results = [
        node(MALLORY, "download", bucket, "alice/keep.txt", str(tmp_path / "out.bin")),
        node(MALLORY, "save", bucket, "alice/keep.txt", str(source), "simple"),
        node(MALLORY, "save", bucket, "alice/planted.txt", str(source), "simple"),
        node(MALLORY, "save", bucket, "alice/planted.txt", str(source), "resumable-interceptor"),
    ]
    assert [(r["ok"], r["code"]) for r in results] == [(False, 403)] * 4, results
    guard.check()


# ----------------------------------------------------------------------------------- rclone


@pytest.fixture
def rclone(proxy: ProxyProcess, dev_issuer: DevIssuer, tmp_path: Path):
    rclone_bin = shutil.which("rclone")
    if rclone_bin is None:
        _missing("rclone")

    def run(
        email: str, *args: str, check_bucket: bool = False, object_acls: bool = False
    ) -> subprocess.CompletedProcess:
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=50)
        token = {
            "access_token": id_token(dev_issuer, email),
            "token_type": "Bearer",
            "expiry": expiry.isoformat(),
        }
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "RCLONE_CONFIG": str(tmp_path / "rclone.conf"),  # absent: the remote is env-only
            "RCLONE_CONFIG_SIDECAR_TYPE": "gcs",
            "RCLONE_CONFIG_SIDECAR_ENDPOINT": f"{proxy.url}/storage/v1/",
            "RCLONE_CONFIG_SIDECAR_TOKEN": json.dumps(token),
        }
        if not check_bucket:
            env["RCLONE_CONFIG_SIDECAR_NO_CHECK_BUCKET"] = "true"
        if not object_acls:
            env["RCLONE_CONFIG_SIDECAR_BUCKET_POLICY_ONLY"] = "true"
        return subprocess.run(
            [rclone_bin, *args, "--retries", "1", "--low-level-retries", "1"],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )

    return run


def test_rclone_copyto_cat_lsf(rclone, proxy, fake_gcs: FakeGcs, tmp_path: Path):
    bucket = BUCKETS["rclone"]
    upstream = Upstream(fake_gcs, bucket)
    data = os.urandom(123_456)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    done = rclone(ALICE, "copyto", str(source), f"sidecar:{bucket}/alice/copied.bin")
    assert done.returncode == 0, f"{done.stderr.decode()}\n{audit_tail(proxy)}"
    upstream.has("alice/copied.bin", data)
    upstream.only_created("alice/copied.bin")

    done = rclone(ALICE, "cat", f"sidecar:{bucket}/alice/copied.bin")
    assert done.returncode == 0, f"{done.stderr.decode()}\n{audit_tail(proxy)}"
    assert done.stdout == data

    done = rclone(ALICE, "lsf", f"sidecar:{bucket}/alice/")
    assert done.returncode == 0, f"{done.stderr.decode()}\n{audit_tail(proxy)}"
    assert "copied.bin" in done.stdout.decode().splitlines()


def test_rclone_copyto_large_resumable(rclone, proxy, fake_gcs: FakeGcs, tmp_path: Path):
    """Above 16 MiB (google-api-go-client's chunk size) rclone uploads resumably."""
    bucket = BUCKETS["rclone"]
    upstream = Upstream(fake_gcs, bucket)
    data = os.urandom(20 * 1024 * 1024)
    source = tmp_path / "large.bin"
    source.write_bytes(data)
    done = rclone(ALICE, "copyto", str(source), f"sidecar:{bucket}/alice/large.bin")
    assert done.returncode == 0, f"{done.stderr.decode()}\n{audit_tail(proxy)}"
    upstream.has("alice/large.bin", data)
    upstream.only_created("alice/large.bin")


def test_rclone_needs_no_check_bucket(rclone, fake_gcs: FakeGcs, tmp_path: Path):
    """Without `no_check_bucket`, rclone first probes the bucket with a listing of the whole
    bucket (`GET /storage/v1/b/B/o?maxResults=1`), which a prefix grant does not cover."""
    bucket = BUCKETS["rclone"]
    upstream = Upstream(fake_gcs, bucket)
    source = tmp_path / "source.bin"
    source.write_bytes(b"data")
    done = rclone(
        ALICE, "copyto", str(source), f"sidecar:{bucket}/alice/probe.bin", check_bucket=True
    )
    assert done.returncode != 0
    assert b"Error 403: alice@example.com does not have list access" in done.stderr
    upstream.only_created()


def test_rclone_needs_bucket_policy_only(rclone, fake_gcs: FakeGcs, tmp_path: Path):
    """Without `bucket_policy_only`, rclone uploads with `predefinedAcl=private` (multipart
    below 16 MiB, name in the query), and setting an ACL needs `admin`."""
    bucket = BUCKETS["rclone"]
    upstream = Upstream(fake_gcs, bucket)
    source = tmp_path / "source.bin"
    source.write_bytes(b"data")
    done = rclone(ALICE, "copyto", str(source), f"sidecar:{bucket}/alice/acl.bin", object_acls=True)
    assert b"Error 403: alice@example.com does not have" in done.stderr
    assert done.returncode != 0
    upstream.only_created()


def test_rclone_denied(rclone, untouched, tmp_path: Path):
    bucket = BUCKETS["rclone"]
    guard = untouched(bucket)
    source = tmp_path / "evil.bin"
    source.write_bytes(b"overwritten")
    attempts = [
        ("copyto", str(source), f"sidecar:{bucket}/alice/keep.txt"),
        ("copyto", str(source), f"sidecar:{bucket}/alice/planted.txt"),
        ("cat", f"sidecar:{bucket}/alice/keep.txt"),
        ("lsf", f"sidecar:{bucket}/alice/"),
    ]
    for attempt in attempts:
        done = rclone(MALLORY, *attempt)
        assert done.returncode != 0, attempt
        assert b"Error 403: mallory@example.net does not have" in done.stderr, (
            attempt,
            done.stderr.decode(),
        )
    guard.check()


# ---------------------------------------------------------------------------------- gsutil
# gsutil is apitools inside: multipart bodies from the email package with `boundary=%r`,
# resumable sessions started on /resumable/upload/storage/v1, gzip with `cp -J`. Its JSON
# API is HTTPS only, so a TLS relay (a throwaway certificate it is told to trust) sits in
# front of the sidecar; its credentials are a service-account key whose token_uri is a
# small OAuth2 token endpoint here, answering the JWT-bearer grant with the caller's ID
# token (gsutil sends whatever access token it is given).


def _certificate(directory: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, private = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, private


async def _tls_relay(port: int, cert: Path, key: Path) -> tuple[asyncio.AbstractServer, int]:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def _token_endpoint(tokens: dict[str, str]) -> tuple[Any, int]:
    import jwt
    from aiohttp import web

    from proxy.devserver.issuer import bind_socket, serve_socket

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        claims = jwt.decode(str(form["assertion"]), options={"verify_signature": False})
        access = tokens[claims["iss"]]  # the key's client_email: whose ID token to hand out
        return web.json_response(
            {"access_token": access, "token_type": "Bearer", "expires_in": 3000}
        )

    app = web.Application()
    app.router.add_post("/token", token)
    sock = bind_socket("127.0.0.1", 0)
    runner = await serve_socket(app, sock)
    return runner, sock.getsockname()[1]


@pytest.fixture(scope="module")
def gsutil_front(proxy: ProxyProcess, dev_issuer: DevIssuer, loop_thread, tmp_path_factory):
    if not GSUTIL.exists():
        _missing("gsutil (.venv-gsutil)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    tmp = tmp_path_factory.mktemp("gsutil")
    cert, key = _certificate(tmp)
    server, tls_port = loop_thread.run(_tls_relay(proxy.port, cert, key))
    accounts = {
        email: f"{email.split('@')[0]}-gsutil@test.iam.gserviceaccount.com"
        for email in (ALICE, MALLORY)
    }
    tokens = {account: id_token(dev_issuer, email) for email, account in accounts.items()}
    runner, token_port = loop_thread.run(_token_endpoint(tokens))
    configs = {}
    for email, account in accounts.items():
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_file = tmp / f"{account}.json"
        key_file.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "test",
                    "private_key_id": "k1",
                    "private_key": private.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode(),
                    "client_email": account,
                    "client_id": "1",
                    "token_uri": f"http://127.0.0.1:{token_port}/token",
                }
            )
        )
        boto = tmp / f"{account}.boto"
        boto.write_text(
            textwrap.dedent(
                f"""\
                [Credentials]
                gs_json_host = 127.0.0.1
                gs_json_port = {tls_port}
                gs_service_key_file = {key_file}
                [Boto]
                ca_certificates_file = {cert}
                num_retries = 1
                [GSUtil]
                prefer_api = json
                default_project_id = test
                resumable_threshold = 1048576
                [OAuth2]
                provider_token_uri = http://127.0.0.1:{token_port}/token
                """
            )
        )
        configs[email] = boto
    yield configs
    loop_thread.run(runner.cleanup())
    server.close()


@pytest.fixture
def gsutil(gsutil_front: dict[str, Path], tmp_path: Path):
    def run(email: str, *args: str) -> subprocess.CompletedProcess:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "BOTO_CONFIG": str(gsutil_front[email]),
            "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
            "NO_GCE_CHECK": "True",
        }
        return subprocess.run(
            [str(GSUTIL), "-q", *args], env=env, capture_output=True, timeout=120, check=False
        )

    return run


def test_gsutil_cp_cat_ls(gsutil, proxy, relay, fake_gcs: FakeGcs, tmp_path: Path):
    bucket = BUCKETS["gsutil"]
    upstream = Upstream(fake_gcs, bucket)
    small, large = os.urandom(2_000), os.urandom(3 << 20)
    (tmp_path / "small.bin").write_bytes(small)
    (tmp_path / "large.bin").write_bytes(large)  # over resumable_threshold: a session
    relay.clear()
    for source, name, extra in (
        ("small.bin", "alice/small.bin", ()),  # multipart, boundary=%r
        ("large.bin", "alice/large.bin", ()),  # resumable, on /resumable/upload/...
        ("small.bin", "alice/small-gz.bin", ("-J",)),  # multipart, gzip as a whole
        ("large.bin", "alice/large-gz.bin", ("-J",)),  # resumable, gzip chunks
    ):
        done = gsutil(ALICE, "cp", *extra, str(tmp_path / source), f"gs://{bucket}/{name}")
        assert done.returncode == 0, f"{done.stderr.decode()}\n{audit_tail(proxy)}"
    upstream.has("alice/small.bin", small)
    upstream.has("alice/large.bin", large)
    upstream.has("alice/small-gz.bin", small)
    upstream.has("alice/large-gz.bin", large)
    upstream.only_created(
        "alice/small.bin", "alice/large.bin", "alice/small-gz.bin", "alice/large-gz.bin"
    )
    uploads = [s for s in relay.seen if s.method == "POST"]
    assert all(s.path == f"/upload/storage/v1/b/{bucket}/o" for s in uploads), uploads
    assert any("uploadType=resumable" in s.query for s in uploads)
    assert any("uploadType=multipart" in s.query for s in uploads)

    done = gsutil(ALICE, "cat", f"gs://{bucket}/alice/small.bin")
    assert (done.returncode, done.stdout) == (0, small), done.stderr.decode()
    done = gsutil(ALICE, "cat", "-r", "10-19", f"gs://{bucket}/alice/large.bin")
    assert (done.returncode, done.stdout) == (0, large[10:20]), done.stderr.decode()
    done = gsutil(ALICE, "ls", f"gs://{bucket}/alice/*")
    assert done.returncode == 0, done.stderr.decode()
    assert f"gs://{bucket}/alice/large-gz.bin" in done.stdout.decode().splitlines()


def test_gsutil_rewrite_setmeta_compose(gsutil, proxy, fake_gcs: FakeGcs, tmp_path: Path):
    # (`rm` and `mv` are left out: fake-gcs-server answers DELETE with 200 `null`, which
    # apitools cannot decode; see tests/FAKE_GCS_NOTES.md.)
    bucket = BUCKETS["gsutil"]
    fake_gcs.put_object(bucket, "alice/one.txt", b"one,")
    fake_gcs.put_object(bucket, "alice/two.txt", b"two")
    upstream = Upstream(fake_gcs, bucket)
    for attempt in (
        ("cp", f"gs://{bucket}/alice/one.txt", f"gs://{bucket}/alice/copied.txt"),  # rewrite
        ("setmeta", "-h", "x-goog-meta-owner:alice", f"gs://{bucket}/alice/copied.txt"),
        ("compose", f"gs://{bucket}/alice/one.txt", f"gs://{bucket}/alice/two.txt",
         f"gs://{bucket}/alice/both.txt"),
    ):  # fmt: skip
        done = gsutil(ALICE, *attempt)
        assert done.returncode == 0, f"{attempt}: {done.stderr.decode()}\n{audit_tail(proxy)}"
    upstream.has("alice/copied.txt", b"one,")
    upstream.has("alice/both.txt", b"one,two")
    upstream.only_created("alice/copied.txt", "alice/both.txt")
    metadata = fake_gcs.get_metadata(bucket, "alice/copied.txt")
    assert metadata is not None and metadata["metadata"] == {"owner": "alice"}
    done = gsutil(ALICE, "cp", f"gs://{bucket}/alice/one.txt", f"gs://{bucket}/bob/one.txt")
    assert done.returncode != 0 and b"403" in done.stderr, done.stderr.decode()
    upstream.only_created("alice/copied.txt", "alice/both.txt")


def test_gsutil_denied(gsutil, untouched, tmp_path: Path):
    bucket = BUCKETS["gsutil"]
    guard = untouched(bucket)
    source = tmp_path / "evil.bin"
    source.write_bytes(b"overwritten")
    for attempt in (
        ("cp", str(source), f"gs://{bucket}/alice/keep.txt"),
        ("cp", str(source), f"gs://{bucket}/alice/planted.txt"),
        ("cat", f"gs://{bucket}/alice/keep.txt"),
    ):
        done = gsutil(MALLORY, *attempt)
        assert done.returncode != 0, attempt
        assert b"403" in done.stderr and MALLORY.encode() in done.stderr, done.stderr.decode()
    guard.check()
