"""Strict decoding of a raw request target: path segments and query parameters, each decoded once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from proxy.errors import BadRequest

MAX_OBJECT_NAME_BYTES = 1024
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")  # never escaped by quote(value, safe="")
_FORBIDDEN_RAW = re.compile(r"[#\\\x00\r\n\t ]")
# Names that carry credentials or signed-URL material: never accepted on the data port.
CREDENTIAL_PARAMS = frozenset(
    name.lower()
    for name in (
        "access_token",
        "key",
        "oauth_token",
        "bearer_token",
        "GoogleAccessId",
        "Signature",
        "Expires",
        "X-Goog-Algorithm",
        "X-Goog-Credential",
        "X-Goog-Date",
        "X-Goog-Expires",
        "X-Goog-SignedHeaders",
        "X-Goog-Signature",
        "X-Amz-Signature",
        "X-Amz-Credential",
    )
)


@dataclass(frozen=True)
class RawTarget:
    segments: tuple[str, ...]
    query: dict[str, str]


def decode_component(raw: str, *, plus_is_space: bool, what: str) -> str:
    """Percent-decode exactly once; reject malformed escapes, invalid UTF-8 and control characters."""
    if raw.isascii() and "%" not in raw and not (plus_is_space and "+" in raw):
        if _CONTROL.search(raw):  # nothing to decode: the common case, checked alone
            raise BadRequest(f"{what} contains a control character")
        return raw
    data = raw.encode("utf-8", "surrogateescape")
    if b"%" in data and len(_ESCAPE.findall(data)) != data.count(b"%"):
        raise BadRequest(f"malformed percent-escape in {what}")
    if plus_is_space:
        data = data.replace(b"+", b" ")
    decoded = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not valid UTF-8") from None
    if _CONTROL.search(text):
        raise BadRequest(f"{what} contains a control character")
    return text


def parse_target(raw_target: str) -> RawTarget:
    if _FORBIDDEN_RAW.search(raw_target) or not raw_target.startswith("/"):
        raise BadRequest("malformed request path")
    if not raw_target.isascii():
        raise BadRequest("request path must be ASCII (percent-encode other characters)")
    path, _, query = raw_target.partition("?")
    raw_segments = path[1:].split("/")
    if "" in raw_segments:
        raise BadRequest("empty path segment")
    if _CONTROL.search(path):
        raise BadRequest("path contains a control character")
    # ASCII (checked above) with no escape: the segment as it is; the rest decoded once.
    segments = tuple(
        decode_component(s, plus_is_space=False, what="path") if "%" in s else s
        for s in raw_segments
    )
    return RawTarget(segments, parse_query(query))


def parse_query(query: str) -> dict[str, str]:
    """Split on '&' only; duplicate, '$'-prefixed and credential-bearing parameters are refused."""
    params: dict[str, str] = {}
    for piece in query.split("&") if query else ():
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition("=")
        name = decode_component(raw_name, plus_is_space=True, what="query parameter name")
        value = decode_component(raw_value, plus_is_space=True, what=f"query parameter {name!r}")
        if not name or name.startswith("$"):
            raise BadRequest(f"unsupported query parameter {name!r}")
        lowered = name.lower()
        if lowered in CREDENTIAL_PARAMS:
            raise BadRequest(f"credentials in the query string ({name!r}) are not accepted")
        if lowered == "x-http-method-override":
            raise BadRequest("method override is not accepted")
        if name in params:
            raise BadRequest(f"duplicate query parameter {name!r}")
        params[name] = value
    return params


def check_object_name(name: str) -> str:
    if not name:
        raise BadRequest("object name must not be empty")
    if name in {".", ".."}:
        raise BadRequest("object name must not be '.' or '..'")
    if len(name.encode()) > MAX_OBJECT_NAME_BYTES:
        raise BadRequest("object name is longer than 1024 bytes")
    if _CONTROL.search(name):
        raise BadRequest("object name contains a control character")
    return name


def encode_segment(value: str) -> str:
    """One path segment, every reserved character escaped ('/' becomes %2F)."""
    if _UNRESERVED.fullmatch(value):
        return value  # what quote() would return, without its per-call machinery
    return quote(value, safe="")


def encode_query(params: tuple[tuple[str, str], ...]) -> str:
    return "&".join(f"{encode_segment(k)}={encode_segment(v)}" for k, v in params)
