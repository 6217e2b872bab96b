"""The soak program (tests/soak.py), briefly: mixed load, no 5xx, no wrong decision, exact bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_is_clean():
    # Its own process group: on a timeout the soak's servers (fake-gcs-server, the sidecar)
    # go down with it instead of outliving the test run.
    soak = subprocess.Popen(
        [sys.executable, "-m", "tests.soak", "--duration", "6", "--concurrency", "4"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = soak.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(soak.pid, signal.SIGKILL)
        out, err = soak.communicate()
        pytest.fail(f"the soak did not finish in 120 s:\n{out}{err}")
    assert soak.returncode == 0, out + err
    report = json.loads(out)
    assert report["server_errors"] == report["wrong_decisions"] == report["data_mismatches"] == 0
    assert set(report["by_operation"]) >= {"write", "read", "list", "resumable.chunk"}
    assert report["requests"] > 100
