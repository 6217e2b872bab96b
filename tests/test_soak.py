"""The soak program (tests/soak.py), briefly: mixed load, no 5xx, no wrong decision, exact bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--duration", "6", "--concurrency", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["server_errors"] == report["wrong_decisions"] == report["data_mismatches"] == 0
    assert set(report["by_operation"]) >= {"write", "read", "list", "resumable.chunk"}
    assert report["requests"] > 100
