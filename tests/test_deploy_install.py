"""The image's install steps, performed for real (no Docker engine runs here).

Build the wheel from exactly what the Dockerfile copies, install requirements.lock into a
fresh virtual environment with the Dockerfile's own pip flags, add the wheel with its flags
(--no-deps), drop pip as the image does, then start that environment's
`gcs-iap-proxy serve` against fake-gcs-server and make one allowed and one denied read.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from proxy.devserver.issuer import DevIssuer
from tests.support import dockerfile
from tests.support.fakegcs import FakeGcs
from tests.support.proxyproc import free_port, isolated_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
AUD = "deploy-smoke"
BUCKET = "deploy-smoke"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"


def run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def image_pip(build: dockerfile.Stage, verb: str, marker: str, local: dict[str, Path]) -> list[str]:
    """The build stage's `pip VERB` whose arguments mention MARKER, with the image's paths
    mapped to LOCAL ones. --no-cache-dir is dropped so repeated runs can use pip's cache."""
    [args] = [a for a in dockerfile.pip_commands(build, verb) if any(marker in w for w in a)]
    mapped = []
    for word in args:
        if word.endswith(".whl"):
            word = glob.glob(str(local["dist"] / Path(word).name))[0]
        elif word in local:
            word = str(local[word])
        if word != "--no-cache-dir":
            mapped.append(word)
    return [verb, *mapped]


def copy_build_context(build: dockerfile.Stage, into: Path) -> None:
    for copy in build.all("COPY"):
        *sources, destination = copy.split()
        assert not destination.startswith("/"), "relative to WORKDIR"
        for source in sources:
            target = (
                into / destination / source if destination.endswith("/") else into / destination
            )
            if (ROOT / source).is_dir():
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(ROOT / source, target, ignore=ignore, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding what the image's /opt/venv holds."""
    tmp = tmp_path_factory.mktemp("image")
    build = dockerfile.load(ROOT / "Dockerfile")[0]
    context, dist, venv = tmp / "src", tmp / "dist", tmp / "venv"
    copy_build_context(build, context)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, context)
    run(sys.executable, "-m", "venv", venv)
    local = {"requirements.lock": context / "requirements.lock", "dist": dist}
    pip = (venv / "bin" / "python", "-m", "pip")
    run(*pip, *image_pip(build, "install", "requirements.lock", local), "--quiet")
    run(*pip, *image_pip(build, "install", ".whl", local), "--quiet")
    run(*pip, "check")
    run(*pip, *image_pip(build, "uninstall", "pip", local))
    [compile_venv] = dockerfile.module_commands(build, "compileall")
    run("sh", "-c", compile_venv.replace("/opt/venv", str(venv)))
    return venv


DISTRIBUTIONS = "import importlib.metadata as m; print(*sorted(d.name for d in m.distributions()))"

# Imported at interpreter start (PYTHONPATH): reports every source file compiled to bytecode.
COMPILE_WATCH = """\
import sys

def _watch(event, args):
    if event == "compile" and isinstance(args[1], str) and args[1].endswith(".py"):
        sys.stderr.write("compiled from source: " + args[1] + "\\n")

sys.addaudithook(_watch)
sys.stderr.write("compile watch on\\n")
"""
COMPILED = re.compile(r"^compiled from source: (.*)$", re.M)


@pytest.fixture(scope="module")
def bytecode(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both stages' compileall commands run for real, writing into a PYTHONPYCACHEPREFIX.

    Here the standard library already has bytecode; the image's base does not. Sending
    every write to an empty prefix, and reading only from it, makes this interpreter see
    exactly the bytecode the image's commands produce, without touching the host's.
    """
    prefix = tmp_path_factory.mktemp("pycache")
    stages = dockerfile.load(ROOT / "Dockerfile")
    commands = [c for stage in stages for c in dockerfile.module_commands(stage, "compileall")]
    assert len(commands) == 2, "the project's environment and the standard library"
    env = {
        "PATH": f"{installed / 'bin'}:/usr/bin:/bin",  # `python` is the image's interpreter
        "PYTHONPYCACHEPREFIX": str(prefix),
    }
    for command in commands:
        shell = command.replace("/opt/venv", str(installed))
        result = subprocess.run(
            ["sh", "-c", shell], env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{shell}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return prefix


@pytest.fixture(scope="module")
def compile_watch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("watch")
    (where / "sitecustomize.py").write_text(COMPILE_WATCH)
    return where


def test_installed_bytecode_never_consults_source_timestamps(installed: Path):
    """pip compiles with timestamp checks; the build stage must replace all of it (a
    review found compileall without -f keeping every one of pip's files)."""
    kinds = Counter()
    for cached in installed.glob("lib/python3*/site-packages/**/__pycache__/*.pyc"):
        flags = int.from_bytes(cached.read_bytes()[4:8], "little")
        kinds[{0: "timestamp", 1: "unchecked-hash", 3: "checked-hash"}[flags]] += 1
    assert set(kinds) == {"unchecked-hash"} and kinds["unchecked-hash"] > 500, kinds


def test_installed_environment_holds_the_lock_and_the_project_only(installed: Path, tmp_path: Path):
    python = installed / "bin" / "python"
    where = run(python, "-c", "import proxy; print(proxy.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(installed), "imported from the venv, not the tree"
    names = {canonicalize_name(n) for n in run(python, "-c", DISTRIBUTIONS).split()}
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {canonicalize_name(n) for n in re.findall(r"^([A-Za-z0-9_.-]+)==", lock, re.M)}
    assert names == pinned | {"gcs-iap-proxy"}
    assert not (installed / "bin" / "pip").exists()


@dataclass(frozen=True)
class Served:
    url: str  # an object the policy lets alice read
    log: Path  # the sidecar's stdout and stderr
    pid: int


@pytest.fixture(scope="module")
def served(
    installed: Path,
    bytecode: Path,
    compile_watch: Path,
    tmp_path_factory: pytest.TempPathFactory,
    dev_issuer: DevIssuer,
    metadata_server,
    fake_gcs: FakeGcs,
) -> Iterator[Served]:
    """The installed sidecar, run as the image runs it."""
    tmp_path = tmp_path_factory.mktemp("served")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers:
              - issuer: {dev_issuer.issuer_url}
                audiences: ["{AUD}"]
            rules:
              - id: alice-reads-reports
                principals: ["user:{ALICE}"]
                bucket: {BUCKET}
                prefixes: ["reports/"]
                verbs: [read]
            """
        )
    )
    fake_gcs.create_bucket(BUCKET)
    fake_gcs.put_object(BUCKET, "reports/q1.csv", b"region,total\nemea,42\n")
    port, admin = free_port(), free_port()
    _, metadata_port = metadata_server
    env = isolated_env(tmp_path, metadata_port, **dockerfile.image_env(ROOT / "Dockerfile"))
    env.update(
        PROXY_LISTEN=f"127.0.0.1:{port}",
        PROXY_ADMIN_LISTEN=f"127.0.0.1:{admin}",  # the image's 0.0.0.0 is for probes
        PROXY_POLICY=str(policy),
        PROXY_UPSTREAM=fake_gcs.url,
        PYTHONPYCACHEPREFIX=str(bytecode),  # the image's bytecode only
        PYTHONPATH=str(compile_watch),
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [installed / "bin" / "gcs-iap-proxy", "serve"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(f"http://127.0.0.1:{admin}/readyz", process, log)
            path = f"/download/storage/v1/b/{BUCKET}/o/reports%2Fq1.csv?alt=media"
            yield Served(f"http://127.0.0.1:{port}{path}", log, process.pid)
        finally:
            process.terminate()
            code = process.wait(timeout=20)
    assert code == 0, log.read_text()


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise AssertionError(f"not ready in 30s:\n{log.read_text()}")


def read(url: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def test_installed_sidecar_serves_an_allowed_read_and_refuses_a_denied_one(
    served: Served, dev_issuer: DevIssuer
):
    alice = dev_issuer.mint(audience=AUD, subject="alice", email=ALICE)
    assert read(served.url, alice) == (200, b"region,total\nemea,42\n")
    mallory = dev_issuer.mint(audience=AUD, subject="mallory", email=MALLORY)
    status, body = read(served.url, mallory)
    assert status == 403 and b"mallory@example.net" in body


def test_the_image_compiles_nothing_while_starting_and_serving(
    served: Served, dev_issuer: DevIssuer
):
    """The base image has no bytecode for the standard library and the image never
    writes any: without the Dockerfile's compileall steps every start compiles ~250
    modules (measured: +0.6 s and +3 MiB)."""
    assert read(served.url, dev_issuer.mint(audience=AUD, subject="a", email=ALICE))[0] == 200
    assert read(served.url, dev_issuer.mint(audience=AUD, subject="m", email=MALLORY))[0] == 403
    log = served.log.read_text()
    assert "compile watch on" in log
    assert COMPILED.findall(log) == []


def test_the_image_maps_no_cplusplus_runtime(served: Served, dev_issuer: DevIssuer):
    """frozenlist's C++ extension would map libstdc++ (0.9 MiB of idle RSS); the image's
    FROZENLIST_NO_EXTENSIONS keeps it out, and nothing else the sidecar loads needs it."""
    assert read(served.url, dev_issuer.mint(audience=AUD, subject="a", email=ALICE))[0] == 200
    mapped = Path(f"/proc/{served.pid}/maps").read_text()
    assert "/libpython" in mapped or "/python3" in mapped  # the sidecar's own map
    assert "aiohttp/_http_parser" in mapped  # compiled extensions are still used
    assert "libstdc++" not in mapped
    assert "frozenlist/_frozenlist" not in mapped


def test_the_compile_watch_sees_a_module_without_bytecode(
    installed: Path, compile_watch: Path, tmp_path: Path
):
    env = {"PYTHONPYCACHEPREFIX": str(tmp_path), "PYTHONPATH": str(compile_watch)}
    result = subprocess.run(
        [installed / "bin" / "python", "-c", "import asyncio"],
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert any("/asyncio/" in path for path in COMPILED.findall(result.stderr))
