"""Property tests on the parsers at the proxy's edge: whatever arrives, the answer is an
operation or a 4xx, never a crash; and a parsed request rebuilt for upstream parses back
to the same bucket and object. Example counts are bounded so `make test` stays quick."""

from __future__ import annotations

import asyncio
import json
import string
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.gcs.build import upstream_target
from proxy.gcs.metadata import checked_metadata
from proxy.gcs.multipart import read_multipart
from proxy.gcs.operation import Kind, Operation
from proxy.gcs.parse import parse_request
from proxy.gcs.rawurl import encode_query, parse_query
from proxy.policy import PolicyError, parse_policy
from proxy.policy.load import PolicyText

FAST = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
URL_ALPHABET = string.ascii_letters + string.digits + "/?&=%.-_~+$;:@!*'(), #\\é\x00\r\n"
HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "content-type",
            "x-goog-user-project",
            "x-http-method-override",
            "range",
            "x-goog-upload-protocol",
        ]
    ),
    st.text(max_size=20),
    max_size=3,
)
BUCKETS = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{1,20}[a-z0-9]\Z")
NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(
    lambda n: n not in {".", ".."}
)


def parsed_or_4xx(method: str, target: str, headers: dict[str, str]) -> Operation | None:
    try:
        return parse_request(method, target, headers)
    except ProxyError as error:
        assert 400 <= error.status < 500, (target, error)
        return None


@FAST
@given(METHODS, st.text(URL_ALPHABET, max_size=120), HEADERS)
def test_any_target_is_an_operation_or_a_4xx(method, tail, headers):
    parsed_or_4xx(method, "/" + tail, headers)


@FAST
@given(
    METHODS,
    st.sampled_from(["/storage/v1/b/", "/upload/storage/v1/b/", "/download/storage/v1/b/", "/"]),
    BUCKETS,
    st.lists(NAMES, max_size=4),
    st.dictionaries(
        st.sampled_from(
            [
                "alt",
                "uploadType",
                "name",
                "prefix",
                "generation",
                "ifGenerationMatch",
                "upload_id",
                "userProject",
                "projection",
                "fields",
            ]
        ),
        st.text(max_size=12),
        max_size=4,
    ),
)
def test_api_shaped_targets_are_operations_or_4xx(method, api, bucket, segments, query):
    path = api + bucket + "/o/" + "/".join(quote(s, safe="") for s in segments)
    target = path.rstrip("/") + ("?" + encode_query(tuple(query.items())) if query else "")
    parsed_or_4xx(method, target, {})


# -- parse -> rebuild -> parse ---------------------------------------------------------

SHAPES = {
    "json-get": ("GET", "/storage/v1/b/{b}/o/{o}"),
    "json-media": ("GET", "/storage/v1/b/{b}/o/{o}?alt=media"),
    "download": ("GET", "/download/storage/v1/b/{b}/o/{o}?alt=media"),
    "xml": ("GET", "/{b}/{o}"),
    "delete": ("DELETE", "/storage/v1/b/{b}/o/{o}?ifGenerationMatch=7"),
    "patch": ("PATCH", "/storage/v1/b/{b}/o/{o}"),
    "list": ("GET", "/storage/v1/b/{b}/o?prefix={o}"),
    "media-upload": ("POST", "/upload/storage/v1/b/{b}/o?uploadType=media&name={o}"),
    "copy": ("POST", "/storage/v1/b/{b}/o/{o}/copyTo/b/{b}/o/{o}2"),
}


@FAST
@given(st.sampled_from(sorted(SHAPES)), BUCKETS, NAMES)
def test_rebuilt_upstream_target_names_the_same_object(shape, bucket, name):
    method, template = SHAPES[shape]
    target = template.format(b=bucket, o=quote(name, safe=""))
    operation = parsed_or_4xx(method, target, {})
    if operation is None:
        return  # e.g. a name the proxy refuses: nothing to rebuild
    rebuilt = upstream_target(operation)
    again = parse_request(operation.method, rebuilt, {})
    assert (again.kind, again.bucket, again.object, again.prefix) == (
        operation.kind if operation.kind is not Kind.XML_GET else Kind.XML_GET,
        operation.bucket,
        operation.object,
        operation.prefix,
    ), (target, rebuilt)
    assert again.sources == operation.sources
    if shape == "list":
        assert operation.prefix == name
    else:
        assert operation.object == (name + "2" if shape == "copy" else name)


# -- query strings -----------------------------------------------------------------------


@FAST
@given(st.text(URL_ALPHABET, max_size=80))
def test_any_query_is_parameters_or_a_4xx(query):
    try:
        params = parse_query(query)
    except ProxyError as error:
        assert error.status == 400
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())


@FAST
@given(
    st.dictionaries(
        st.text(string.ascii_letters + "_-", min_size=1, max_size=10).filter(
            lambda n: n.lower() not in {"key", "signature", "expires", "access_token"}
        ),
        st.text(max_size=20).filter(lambda v: not any(ord(c) < 32 or ord(c) == 127 for c in v)),
        max_size=5,
    )
)
def test_query_encoding_round_trips(params):
    assert parse_query(encode_query(tuple(params.items()))) == params


# -- multipart metadata ------------------------------------------------------------------


def _reader(loop: asyncio.AbstractEventLoop, body: bytes) -> aiohttp.StreamReader:
    reader = aiohttp.StreamReader(BaseProtocol(loop), 1 << 16, loop=loop)
    reader.feed_data(body)
    reader.feed_eof()
    return reader


async def _read_multipart(content_type: str, body: bytes) -> None:
    upload = await read_multipart(
        {"content-type": content_type}, _reader(asyncio.get_running_loop(), body)
    )
    metadata, name, _ = checked_metadata(upload.metadata, "bkt", None)
    _, chunks = upload.rebuilt(metadata)
    async for _ in chunks:
        pass
    assert isinstance(name, str)


def multipart_or_4xx(content_type: str, body: bytes) -> None:
    try:
        asyncio.run(_read_multipart(content_type, body))
    except ProxyError as error:
        assert 400 <= error.status < 500, error


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.dictionaries(
        st.sampled_from(["name", "bucket", "contentType", "metadata", "acl", "kind", "bogus"]),
        JSON_VALUES,
        max_size=4,
    ),
    st.binary(max_size=200),
    st.sampled_from(["", "\r\n--b\r\nContent-Type: x\r\n\r\nextra", "garbage"]),
)
def test_multipart_bodies_are_uploads_or_4xx(metadata, media, tail):
    body = (
        (
            f"--b\r\nContent-Type: application/json\r\n\r\n{json.dumps(metadata)}\r\n"
            "--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + media
        + f"{tail}\r\n--b--\r\n".encode()
    )
    multipart_or_4xx("multipart/related; boundary=b", body)


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.binary(max_size=300),
    st.sampled_from(["multipart/related; boundary=b", "text/plain", "multipart/related"]),
)
def test_any_multipart_body_is_an_upload_or_4xx(body, content_type):
    multipart_or_4xx(content_type, b"--b\r\n" + body)


def test_malformed_part_header_is_a_400():
    multipart_or_4xx("multipart/related; boundary=b", b"--b\r\n\x00")


# -- policy loader -----------------------------------------------------------------------

YAML_ALPHABET = string.ascii_letters + string.digits + " :-[]{}\"'\n#*&!|>.,/$@"
POLICY = """\
version: 1
issuers:
  - issuer: https://accounts.google.com
    audiences: ["a"]
rules:
  - id: r
    principals: ["user:a@example.com"]
    bucket: b
    prefixes: ["p/"]
    verbs: [read]
"""


def loaded_or_policy_error(text: str) -> None:
    try:
        parse_policy([PolicyText("fuzz.yaml", text)])
    except PolicyError as error:
        assert error.errors and all(isinstance(e, str) for e in error.errors)


@FAST
@given(st.text(YAML_ALPHABET, max_size=300))
def test_any_policy_text_loads_or_is_a_policy_error(text):
    loaded_or_policy_error(text)


@FAST
@given(st.integers(0, len(POLICY) - 1), st.text(YAML_ALPHABET, max_size=12), st.integers(0, 12))
def test_mutated_policies_load_or_are_policy_errors(at, insert, drop):
    loaded_or_policy_error(POLICY[:at] + insert + POLICY[at + drop :])


def test_bracket_in_an_issuer_url_is_a_policy_error():
    with pytest.raises(PolicyError, match="is not a valid URL"):
        parse_policy([PolicyText("fuzz.yaml", POLICY.replace("https://", "https://["))])
