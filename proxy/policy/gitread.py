"""Policy sources for `diff`: a path on disk, or `REV:PATH` read from git with `git show`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from proxy.policy.load import PolicyError, PolicyText, read_policy_texts


def read_source(spec: str) -> list[PolicyText]:
    """The policy texts `spec` names; an existing path wins over a `REV:PATH` reading."""
    path = Path(spec)
    if path.exists() or ":" not in spec:
        return read_policy_texts([path])
    rev, _, inner = spec.partition(":")
    kind = _git(spec, "cat-file", "-t", spec).strip()
    if kind == "blob":
        names = [inner]
    elif kind == "tree":
        listing = _git(spec, "ls-tree", "--name-only", spec).splitlines()
        base = inner.rstrip("/")
        names = [
            f"{base}/{n}" if base else n
            for n in sorted(listing)
            if n.endswith(".yaml") and not n.endswith("_test.yaml")
        ]
    else:
        raise PolicyError([f"{spec}:0: not a file or directory in git"])
    if not names:
        raise PolicyError([f"{spec}:0: no policy file found"])
    return [PolicyText(f"{rev}:{name}", _git(spec, "show", f"{rev}:{name}")) for name in names]


def _git(spec: str, *args: str) -> str:
    git = shutil.which("git")
    if git is None:
        raise PolicyError([f"{spec}:0: git is not installed"])
    done = subprocess.run(  # noqa: S603 - fixed program, arguments are not a shell line
        [git, *args], capture_output=True, text=True, encoding="utf-8", check=False
    )
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1:] or [f"git {args[0]} failed"]
        raise PolicyError([f"{spec}:0: {message[0]}"])
    return done.stdout
