"""The policy model: frozen values built by the loader, read by the evaluator."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Verb(enum.StrEnum):
    READ = "read"
    LIST = "list"
    WRITE = "write"
    DELETE = "delete"
    METADATA = "metadata"
    ADMIN = "admin"


ALL_VERBS: frozenset[Verb] = frozenset(Verb)


class Effect(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"


@dataclass(frozen=True)
class Source:
    """Where a policy element was written: shown by `explain`, never to callers."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Issuer:
    issuer: str
    audiences: tuple[str, ...]
    header: str | None = None
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_seconds: int = 30
    source: Source | None = None


@dataclass(frozen=True)
class Rule:
    id: str
    effect: Effect
    principals: tuple[str, ...]
    bucket: str
    prefixes: tuple[str, ...]
    verbs: frozenset[Verb]
    source: Source


@dataclass(frozen=True)
class Policy:
    """A complete, validated policy; `revision` is a hash of the source files."""

    mode: Mode
    issuers: tuple[Issuer, ...]
    groups: dict[str, tuple[str, ...]]
    rules: tuple[Rule, ...]
    user_projects: frozenset[str]
    revision: str
    files: tuple[str, ...] = field(default=())
    group_sources: dict[str, Source] = field(default_factory=dict)


# What `${...}` may name in a prefix; Identity.template_values gives each one.
TEMPLATE_VARIABLES = frozenset(["email", "sub", "domain"])


def email_vouched(claims: Mapping[str, object]) -> bool:
    """Whether a token vouches for its `email`: `email_verified` true, or absent (IAP's
    header JWT has none). Anything else counts as unverified, not only `false`: "FALSE",
    0, null, "no", a list."""
    verified = claims.get("email_verified", True)
    return verified is True or (isinstance(verified, str) and verified.lower() == "true")


def template_safe(value: str | None) -> bool:
    """Whether an identity value may be substituted into a prefix template."""
    if not value or ".." in value:
        return False
    return not any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in value)


class InputError(ValueError):
    """A resource, claim or identity given on the command line or in a case is malformed."""


@dataclass(frozen=True)
class Identity:
    """A verified caller. `email` is set only when the token vouches for it."""

    issuer: str
    subject: str
    email: str | None = None

    @property
    def domain(self) -> str | None:
        return self.email.rpartition("@")[2] if self.email else None

    @property
    def display(self) -> str:
        return self.email or f"{self.issuer}#{self.subject}"

    def principals(self) -> frozenset[str]:
        found = {"allAuthenticatedUsers", f"subject:{self.issuer}#{self.subject}"}
        if self.email:
            kind = "serviceAccount" if self.email.endswith(".gserviceaccount.com") else "user"
            found.add(f"{kind}:{self.email}")
            found.add(f"domain:{self.domain}")
        return frozenset(found)

    def template_values(self) -> dict[str, str | None]:
        return {"email": self.email, "sub": self.subject, "domain": self.domain}
