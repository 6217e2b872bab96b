"""`dev`: the whole system on loopback with no cloud account.

fake-gcs-server as upstream, a local OIDC issuer, a metadata-server stand-in for the
sidecar's own token, `policies/example.yaml` with its issuers swapped for the local one,
demo objects, and copy-paste commands for an allowed and a denied identity.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import tempfile
from pathlib import Path

from proxy import audit
from proxy.devserver.fakegcs import FakeGcsProcess
from proxy.devserver.issuer import DevIssuer, serve_issuer
from proxy.devserver.metadata import DevMetadataServer, start_metadata
from proxy.policy import Issuer, Policy, PolicyError, load_policy
from proxy.settings import Address, Settings

AUDIENCE = "gcs-iap-proxy-dev"
ALLOWED = "alice@example.com"
DENIED = "mallory@example.net"
TOKEN_LIFETIME = 12 * 3600
DEMO_OBJECTS = {
    ("acme-reports", "reports/2026/q1.csv"): b"region,revenue\nemea,1200\namer,3400\n",
    ("acme-reports", "reports/secret/salaries.csv"): b"name,salary\nredacted,0\n",
    ("acme-reports", "shared/readme.txt"): b"Shared with the analysts.\n",
    ("acme-home", f"home/{ALLOWED}/notes.txt"): b"alice's notes\n",
}


@dataclasses.dataclass(frozen=True)
class Ports:
    data: int

    @property
    def admin(self) -> int:
        return self.data + 1

    @property
    def issuer(self) -> int:
        return self.data + 2

    @property
    def metadata(self) -> int:
        return self.data + 3

    @property
    def storage(self) -> int:
        return self.data + 4


def default_policy() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "policies" / "example.yaml"
        if candidate.exists():
            return candidate
    raise FileNotFoundError("policies/example.yaml not found; pass --policy")


def with_dev_issuer(policy: Policy, issuer_url: str) -> Policy:
    """The policy's rules and groups, trusting only the local issuer."""
    return dataclasses.replace(policy, issuers=(Issuer(issuer=issuer_url, audiences=(AUDIENCE,)),))


def run_dev(policy_arg: str | None, port: int) -> int:
    audit.configure_logging("text")
    try:
        policy_path = Path(policy_arg) if policy_arg else default_policy()
        policy = load_policy(policy_path)
    except (PolicyError, FileNotFoundError) as exc:
        print(exc, file=sys.stderr)
        return 1
    ports = Ports(port)
    # google-auth reads these when it is first imported: set them before anything imports it.
    os.environ["GCE_METADATA_HOST"] = f"127.0.0.1:{ports.metadata}"
    os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{ports.metadata}"
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    os.environ["CLOUDSDK_CONFIG"] = tempfile.mkdtemp(prefix="gcs-iap-proxy-dev-")  # no gcloud ADC
    storage = FakeGcsProcess(ports.storage)
    try:
        storage.start()
        seed(storage)
        asyncio.run(_run(policy, policy_path, ports, storage))
    finally:
        storage.stop()
        audit.stop_logging()
    return 0


def seed(storage: FakeGcsProcess) -> None:
    for bucket in sorted({b for b, _ in DEMO_OBJECTS}):
        storage.create_bucket(bucket)
    for (bucket, name), data in DEMO_OBJECTS.items():
        storage.put_object(bucket, name, data, "text/plain")


async def _run(policy: Policy, policy_path: Path, ports: Ports, storage: FakeGcsProcess) -> None:
    from proxy.serve import running

    issuer_url = f"http://127.0.0.1:{ports.issuer}"
    issuer = await asyncio.to_thread(DevIssuer, issuer_url)
    issuer_runner = await serve_issuer(issuer, "127.0.0.1", ports.issuer)
    metadata_runner, _ = await start_metadata(DevMetadataServer(issuer=issuer), port=ports.metadata)
    settings = Settings(
        listen=Address("127.0.0.1", ports.data),
        admin_listen=Address("127.0.0.1", ports.admin),
        policy=policy_path,
        upstream=storage.url,
        workers=1,
        log_format="text",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running(
            settings,
            with_dev_issuer(policy, issuer_url),
            transform=lambda reloaded: with_dev_issuer(reloaded, issuer_url),
        ) as components:
            for _ in range(200):
                if components.ready:
                    break
                await asyncio.sleep(0.05)
            print(
                banner(issuer, ports, storage, policy_path, components.policy.revision), flush=True
            )
            await stop.wait()
            print("\nstopping…", flush=True)
    finally:
        await metadata_runner.cleanup()
        await issuer_runner.cleanup()


def banner(
    issuer: DevIssuer, ports: Ports, storage: FakeGcsProcess, policy: Path, revision: str
) -> str:
    alice = issuer.mint(audience=AUDIENCE, subject="alice", email=ALLOWED, lifetime=TOKEN_LIFETIME)
    mallory = issuer.mint(
        audience=AUDIENCE, subject="mallory", email=DENIED, lifetime=TOKEN_LIFETIME
    )
    proxy = f"http://127.0.0.1:{ports.data}"
    python = sys.executable
    return f"""
gcs-iap-proxy dev is running (Ctrl-C stops everything)
  data port     {proxy}
  admin port    http://127.0.0.1:{ports.admin}/readyz
  upstream      fake-gcs-server {storage.url} (buckets acme-reports, acme-home)
  issuer        http://127.0.0.1:{ports.issuer} (audience {AUDIENCE})
  metadata      http://127.0.0.1:{ports.metadata} (the sidecar's own token)
  policy        {policy} revision {revision} (issuers replaced by the local issuer)

# Paste into another shell. Tokens are valid for 12 hours.
export ALICE_TOKEN='{alice}'
export MALLORY_TOKEN='{mallory}'

# {ALLOWED} reads a report: 200
curl -sS -H "Authorization: Bearer $ALICE_TOKEN" '{proxy}/storage/v1/b/acme-reports/o/reports%2F2026%2Fq1.csv?alt=media'

# {ALLOWED} may not read the secret carve-out: 403
curl -sS -H "Authorization: Bearer $ALICE_TOKEN" '{proxy}/storage/v1/b/acme-reports/o/reports%2Fsecret%2Fsalaries.csv?alt=media'

# {DENIED} has no grant: 403
curl -sS -H "Authorization: Bearer $MALLORY_TOKEN" '{proxy}/storage/v1/b/acme-reports/o/reports%2F2026%2Fq1.csv?alt=media'

# google-cloud-storage, as {ALLOWED} (swap in $MALLORY_TOKEN to see a 403)
{python} - <<'PY'
import os
from google.cloud import storage
from google.oauth2.credentials import Credentials

client = storage.Client(
    project="dev-project",
    credentials=Credentials(os.environ["ALICE_TOKEN"]),
    client_options={{"api_endpoint": "{proxy}"}},
)
bucket = client.bucket("acme-home")
bucket.blob("home/{ALLOWED}/hello.txt").upload_from_string("hello from the sidecar")
print([b.name for b in client.list_blobs("acme-home", prefix="home/{ALLOWED}/")])
print(bucket.blob("home/{ALLOWED}/hello.txt").download_as_text())
PY
"""
