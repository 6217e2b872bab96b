"""A small Dockerfile reader for tests: stages, their instructions, and the pip commands they run."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        pairs = [token.split("=", 1) for args in self.all("ENV") for token in shlex.split(args)]
        return {key: value for key, value in pairs}


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions: comments dropped, continuations joined, global ARGs applied."""
    logical, pending = [], ""
    for raw in text.splitlines():
        if raw.strip().startswith("#"):
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[tuple[str, str | None, list[Instruction]]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], args.split()[0])
            name = args.split()[2] if " AS " in args.upper() else None
            stages.append((base, name, []))
        else:
            stages[-1][2].append(Instruction(keyword, args))
    return [Stage(base, name, tuple(body)) for base, name, body in stages]


def load(path: Path) -> list[Stage]:
    return parse_dockerfile(path.read_text())


def pip_commands(stage: Stage, verb: str) -> list[list[str]]:
    """Every `pip VERB ...` in the stage's RUN lines, as argument lists after VERB."""
    found = []
    for run in stage.all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            for i, word in enumerate(words[:-1]):
                if word.endswith("pip") and words[i + 1] == verb:
                    found.append(words[i + 2 :])
    return found


def module_commands(stage: Stage, module: str) -> list[str]:
    """Every `... -m MODULE ...` command in the stage's RUN lines, as shell text."""
    return [
        command.strip()
        for run in stage.all("RUN")
        for command in run.split("&&")
        if f"-m {module} " in command
    ]


def image_env(path: Path) -> dict[str, str]:
    """The final stage's ENV as a process here needs it: the interpreter settings, without
    PATH (the image's) and the listen addresses (each caller picks its own ports)."""
    env = load(path)[-1].env()
    for name in ("PATH", "PROXY_LISTEN", "PROXY_ADMIN_LISTEN"):
        env.pop(name, None)
    return env
