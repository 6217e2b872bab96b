"""Request parsing: raw targets into operations, and operations back into upstream targets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import SERVER, BadRequest, Forbidden, MethodNotAllowed, ProxyError
from proxy.forward import _usable_host
from proxy.gcs.build import response_headers, upstream_headers, upstream_target
from proxy.gcs.operation import Kind
from proxy.gcs.parse import parse_request
from proxy.policy import Access, Verb


def parse(method: str, target: str, headers: dict[str, str] | None = None):
    return parse_request(method, target, headers or {})


@pytest.mark.parametrize(
    ("method", "target", "kind", "access"),
    [
        ("GET", "/storage/v1/b/bkt/o/a%2Fb.txt", Kind.GET, (Verb.READ, "a/b.txt")),
        ("HEAD", "/storage/v1/b/bkt/o/a%2Fb.txt", Kind.GET, (Verb.READ, "a/b.txt")),
        ("GET", "/storage/v1/b/bkt/o/a%2Fb.txt?alt=media", Kind.MEDIA, (Verb.READ, "a/b.txt")),
        (
            "GET",
            "/download/storage/v1/b/bkt/o/a%2Fb.txt?alt=media",
            Kind.MEDIA,
            (Verb.READ, "a/b.txt"),
        ),
        (
            "GET",
            "/storage/v1/b/bkt/o?prefix=reports%2F&delimiter=%2F",
            Kind.LIST,
            (Verb.LIST, "reports/"),
        ),
        ("GET", "/storage/v1/b/bkt/o", Kind.LIST, (Verb.LIST, "")),
        ("DELETE", "/storage/v1/b/bkt/o/x", Kind.DELETE, (Verb.DELETE, "x")),
        ("PATCH", "/storage/v1/b/bkt/o/x", Kind.PATCH, (Verb.METADATA, "x")),
        ("PUT", "/storage/v1/b/bkt/o/x", Kind.UPDATE, (Verb.METADATA, "x")),
        (
            "POST",
            "/upload/storage/v1/b/bkt/o?uploadType=media&name=a+b%2Bc",
            Kind.INSERT_MEDIA,
            (Verb.WRITE, "a b+c"),
        ),
        ("GET", "/storage/v1/b/bkt/o/..%2F..%2Fetc", Kind.GET, (Verb.READ, "../../etc")),
        ("GET", "/storage/v1/b/bkt/o/%C3%A9t%C3%A9", Kind.GET, (Verb.READ, "été")),
        ("GET", "/storage/v1/b/bkt/o/a;b", Kind.GET, (Verb.READ, "a;b")),
    ],
)
def test_routes(method, target, kind, access):
    operation = parse(method, target)
    assert operation.kind is kind
    assert operation.accesses == (Access(access[0], "bkt", access[1]),)


W, R, D, M, A = Verb.WRITE, Verb.READ, Verb.DELETE, Verb.METADATA, Verb.ADMIN


@pytest.mark.parametrize(
    ("method", "target", "kind", "accesses"),
    [
        (
            "POST",
            "/storage/v1/b/src/o/a%2Fb/copyTo/b/dst/o/c",
            Kind.COPY,
            [(R, "src", "a/b"), (W, "dst", "c")],
        ),
        (
            "POST",
            "/storage/v1/b/src/o/a/rewriteTo/b/dst/o/c?rewriteToken=t",
            Kind.REWRITE,
            [(R, "src", "a"), (W, "dst", "c")],
        ),
        (
            "POST",
            "/storage/v1/b/bkt/o/a/moveTo/o/b",
            Kind.MOVE,
            [(R, "bkt", "a"), (W, "bkt", "b"), (D, "bkt", "a")],
        ),
        (
            "POST",
            "/storage/v1/b/bkt/o/a/restore?generation=7",
            Kind.RESTORE,
            [(R, "bkt", "a"), (W, "bkt", "a")],
        ),
        ("POST", "/storage/v1/b/bkt/o/a/compose", Kind.COMPOSE, [(W, "bkt", "a")]),
        ("GET", "/storage/v1/b/bkt/o/a/acl", Kind.ACL, [(A, "bkt", "a")]),
        ("DELETE", "/storage/v1/b/bkt/o/a/acl/allUsers", Kind.ACL, [(A, "bkt", "a")]),
        (
            "PATCH",
            "/storage/v1/b/bkt/o/x?predefinedAcl=publicRead",
            Kind.PATCH,
            [(M, "bkt", "x"), (A, "bkt", "x")],
        ),
        (
            "POST",
            "/upload/storage/v1/b/bkt/o?uploadType=media&name=x&kmsKeyName=k",
            Kind.INSERT_MEDIA,
            [(W, "bkt", "x"), (A, "bkt", "x")],
        ),
        ("GET", "/bkt/dir/a%20b.txt", Kind.XML_GET, [(R, "bkt", "dir/a b.txt")]),
        ("HEAD", "/bkt/dir%2Fa", Kind.XML_GET, [(R, "bkt", "dir/a")]),
        ("GET", "/bkt/a/../b", Kind.XML_GET, [(R, "bkt", "a/../b")]),
    ],
)
def test_compound_routes(method, target, kind, accesses):
    operation = parse(method, target)
    assert operation.kind is kind
    assert operation.accesses == tuple(Access(v, b, p) for v, b, p in accesses)


def test_resumable_routes():
    start = parse("POST", "/upload/storage/v1/b/bkt/o?uploadType=resumable&name=big")
    assert (start.kind, start.object, start.accesses) == (Kind.RESUMABLE_START, "big", ())
    chunk = parse("PUT", "/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=HANDLE")
    assert (chunk.kind, chunk.upload_handle, chunk.object) == (Kind.RESUMABLE_CHUNK, "HANDLE", None)
    cancel = parse("DELETE", "/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=HANDLE")
    assert cancel.kind is Kind.RESUMABLE_CANCEL
    with pytest.raises(BadRequest):
        parse(
            "POST",
            "/upload/storage/v1/b/bkt/o?uploadType=resumable",
            {"x-goog-upload-protocol": "resumable"},
        )


def test_multipart_name_may_come_later():
    operation = parse("POST", "/upload/storage/v1/b/bkt/o?uploadType=multipart")
    assert operation.kind is Kind.INSERT_MULTIPART
    assert operation.object is None
    assert operation.accesses == ()


@pytest.mark.parametrize(
    "target",
    [
        "/storage/v1/b/bkt/o/%zz",
        "/storage/v1/b/bkt/o/%2",
        "/storage/v1/b/bkt/o/%FF%FE",
        "/storage/v1/b/bkt/o/a%0Ab",
        "/storage/v1/b/bkt/o/a%0D%0Ab",
        "/storage/v1/b/bkt/o/a%00b",
        "/storage/v1/b/bkt/o/%2E%2E",
        "/storage/v1/b/bkt/o/.",
        "/storage/v1/b/bkt//o/x",
        "/storage/v1/b/bkt/o/x#frag",
        "/storage/v1/b/bkt/o/a\\b",
        "/storage/v1/b/../o/x",
        "/storage/v1/b/BKT/o/x",
        "/storage/v1/b/bkt/o/x?alt=media&alt=json",
        "/storage/v1/b/bkt/o/x?$fields=x",
        "/storage/v1/b/bkt/o/x?access_token=abc",
        "/storage/v1/b/bkt/o/x?key=abc",
        "/storage/v1/b/bkt/o/x?X-Goog-Signature=abc",
        "/storage/v1/b/bkt/o/x?X-HTTP-Method-Override=DELETE",
        "/storage/v1/b/bkt/o/x?alt=proto",
        "/storage/v1/b/bkt/o/x?generation=abc",
        "/storage/v1/b/bkt/o/x?surprise=1",
        "/storage/v1/b/bkt/o/" + "a" * 1025,
        "storage/v1/b/bkt/o/x",
        "/upload/storage/v1/b/bkt/o?uploadType=media",
        "/upload/storage/v1/b/bkt/o?uploadType=weird&name=x",
        "/upload/storage/v1/b/bkt/o?uploadType=media&upload_id=abc",
    ],
)
def test_bad_targets_are_400(target):
    with pytest.raises(BadRequest):
        parse("GET" if not target.startswith("/upload") else "POST", target)


@pytest.mark.parametrize(
    ("method", "target", "error"),
    [
        ("GET", "/storage/v1/b", Forbidden),
        ("POST", "/storage/v1/b?project=p", Forbidden),
        ("GET", "/storage/v1/b/bkt", Forbidden),
        ("DELETE", "/storage/v1/b/bkt", Forbidden),
        ("GET", "/storage/v1/b/bkt/iam", Forbidden),
        ("GET", "/storage/v1/b/bkt/iam/testPermissions", Forbidden),
        ("POST", "/storage/v1/b/bkt/o/watch", MethodNotAllowed),
        ("GET", "/storage/v1/b/bkt/o/x/unknownThing", Forbidden),
        ("POST", "/batch/storage/v1", Forbidden),
        ("POST", "/batch", Forbidden),
        ("GET", "/storage/v1/projects/p/hmacKeys", Forbidden),
        ("GET", "/storage/v1/projects/p/serviceAccount", Forbidden),
        ("GET", "/storage/v1/b/bkt/notificationConfigs", Forbidden),
        ("POST", "/storage/v1/channels/stop", Forbidden),
        ("POST", "/storage/v1/b/bkt/o/x", MethodNotAllowed),
        ("GET", "/storage/v1/b/bkt/o/x/copyTo/b/other/o/y", MethodNotAllowed),
        ("PUT", "/bkt/object", Forbidden),
        ("DELETE", "/bkt/object", Forbidden),
        ("GET", "/bkt", Forbidden),
        ("PUT", "/upload/storage/v1/b/bkt/o?uploadType=media&name=x", MethodNotAllowed),
    ],
)
def test_refused_surface(method, target, error):
    with pytest.raises(error):
        parse(method, target)


def test_method_override_header_refused():
    with pytest.raises(BadRequest):
        parse("GET", "/storage/v1/b/bkt/o/x", {"x-http-method-override": "DELETE"})


def test_user_project_header_and_query_must_agree():
    operation = parse("GET", "/storage/v1/b/bkt/o/x", {"x-goog-user-project": "billing"})
    assert operation.user_project == "billing"
    with pytest.raises(BadRequest):
        parse("GET", "/storage/v1/b/bkt/o/x?userProject=a", {"x-goog-user-project": "b"})


@pytest.mark.parametrize(
    ("method", "target", "upstream"),
    [
        ("POST", "/storage/v1/b/src/o/a%2Fb/copyTo/b/dst/o/..", None),
        (
            "POST",
            "/storage/v1/b/src/o/a%2Fb/copyTo/b/dst/o/c%3Fd",
            "/storage/v1/b/src/o/a%2Fb/copyTo/b/dst/o/c%3Fd?projection=noAcl",
        ),
        (
            "POST",
            "/storage/v1/b/src/o/a/moveTo/o/b%23c",
            "/storage/v1/b/src/o/a/moveTo/o/b%23c?projection=noAcl",
        ),
        ("GET", "/src/a/b%3Bc", "/src/a%2Fb%3Bc"),
        (
            "DELETE",
            "/storage/v1/b/src/o/a/acl/user-x%40example.com",
            "/storage/v1/b/src/o/a/acl/user-x%40example.com",
        ),
        (
            "GET",
            "/storage/v1/b/bkt/o?prefix=c%2F;prefix=a%2F",
            "/storage/v1/b/bkt/o?prefix=c%2F%3Bprefix%3Da%2F&projection=noAcl",
        ),
        ("GET", "/storage/v1/b/bkt/o/a%2Fb%20c", "/storage/v1/b/bkt/o/a%2Fb%20c?projection=noAcl"),
        (
            "GET",
            "/download/storage/v1/b/bkt/o/a%2Fb?generation=5",
            "/storage/v1/b/bkt/o/a%2Fb?generation=5&alt=media",
        ),
        ("GET", "/storage/v1/b/bkt/o/..%2Fx?alt=media", "/storage/v1/b/bkt/o/..%2Fx?alt=media"),
        (
            "GET",
            "/storage/v1/b/bkt/o?prefix=r%2F&fields=items(name)",
            "/storage/v1/b/bkt/o?prefix=r%2F&projection=noAcl",
        ),
        ("GET", "/storage/v1/b/bkt/o/x?projection=full", "/storage/v1/b/bkt/o/x?projection=noAcl"),
        (
            "POST",
            "/upload/storage/v1/b/bkt/o?uploadType=media&name=a+b",
            "/upload/storage/v1/b/bkt/o?uploadType=media&name=a%20b&projection=noAcl",
        ),
        (
            "DELETE",
            "/storage/v1/b/bkt/o/x?ifGenerationMatch=3",
            "/storage/v1/b/bkt/o/x?ifGenerationMatch=3",
        ),
    ],
)
def test_upstream_target_is_rebuilt(method, target, upstream):
    if upstream is None:
        with pytest.raises(BadRequest):
            parse(method, target)
        return
    assert upstream_target(parse(method, target)) == upstream


def test_create_only_precondition_replaces_caller_value():
    operation = parse(
        "POST", "/upload/storage/v1/b/bkt/o?uploadType=media&name=x&ifGenerationMatch=7"
    )
    assert "ifGenerationMatch=0" in upstream_target(operation.with_param("ifGenerationMatch", "0"))
    assert "ifGenerationMatch=7" not in upstream_target(
        operation.with_param("ifGenerationMatch", "0")
    )


def headers_of(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_upstream_headers_drop_credentials_and_hop_by_hop():
    incoming = headers_of(
        ("Authorization", "Bearer caller-token"),
        ("Cookie", "session=1"),
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Host", "evil"),
        ("Proxy-Authorization", "Basic x"),
        ("Range", "bytes=0-9"),
        ("If-None-Match", '"etag"'),
        ("If-Range", '"etag"'),
        ("X-Goog-Encryption-Key", "k"),
        ("X-Goog-User-Project", "p"),
    )
    headers = upstream_headers(incoming, "sidecar-token", Kind.MEDIA, reads_answer=False)
    assert headers == {
        "Authorization": "Bearer sidecar-token",
        "range": "bytes=0-9",
        "if-none-match": '"etag"',
        "if-range": '"etag"',
        "x-goog-encryption-key": "k",
    }


def test_headers_the_connection_header_names_stay_here():
    incoming = headers_of(
        ("Connection", "keep-alive, Range"),
        ("connection", "If-None-Match , X-Goog-Api-Client"),
        ("Range", "bytes=0-9"),
        ("If-None-Match", '"etag"'),
        ("X-Goog-Api-Client", "gl-python"),
        ("If-Match", '"kept"'),
    )
    headers = upstream_headers(incoming, "t", Kind.MEDIA, reads_answer=False)
    assert headers == {"Authorization": "Bearer t", "if-match": '"kept"'}


def test_a_repeated_list_header_is_joined_any_other_repeat_is_400():
    incoming = headers_of(("X-Goog-Hash", "crc32c=AAAAAA=="), ("x-goog-hash", "md5=BBBB"))
    headers = upstream_headers(incoming, "t", Kind.INSERT_MEDIA, reads_answer=True)
    assert headers["x-goog-hash"] == "crc32c=AAAAAA==,md5=BBBB"
    for name in ("X-Goog-Encryption-Key", "Range", "If-Range", "User-Agent"):
        for other in (name, name.lower(), name.upper()):
            incoming = headers_of((name, "one"), (other, "two"))
            with pytest.raises(BadRequest, match="more than one"):
                upstream_headers(incoming, "t", Kind.MEDIA, reads_answer=False)


def test_xml_preconditions_go_upstream_on_xml_reads_only():
    incoming = headers_of(
        ("X-Goog-If-Generation-Match", "1"), ("x-goog-if-metageneration-match", "2")
    )
    xml = upstream_headers(incoming, "t", Kind.XML_GET, reads_answer=False)
    assert xml["x-goog-if-generation-match"] == "1"
    assert xml["x-goog-if-metageneration-match"] == "2"
    # On the JSON API preconditions are parameters, decided by the proxy (create-only).
    json_upload = upstream_headers(incoming, "t", Kind.INSERT_MEDIA, reads_answer=True)
    assert json_upload == {"Authorization": "Bearer t"}


def test_accept_encoding_goes_upstream_only_for_answers_relayed_as_they_are():
    incoming = headers_of(("Accept-Encoding", "gzip"), ("Accept", "*/*"))
    media = upstream_headers(incoming, "t", Kind.MEDIA, reads_answer=False)
    assert media["accept-encoding"] == "gzip"  # decompressive transcoding stays the caller's
    document = upstream_headers(incoming, "t", Kind.GET, reads_answer=True)
    assert "accept-encoding" not in document and document["accept"] == "*/*"


def test_answer_headers_drop_what_upstream_connection_names_in_any_case():
    upstream = headers_of(
        ("content-type", "application/json"),
        ("Connection", "X-Hop"),
        ("x-hop", "1"),
        ("Set-Cookie2", "a=1"),
        ("Content-Location", "https://storage.googleapis.com/upload?upload_id=real"),
        ("ETag", '"e"'),
    )
    headers = response_headers(upstream)
    assert dict(headers) == {"content-type": "application/json", "ETag": '"e"', "Server": SERVER}
    headers.popall("Content-Type")  # a later pop finds it whatever its spelling
    assert "content-type" not in headers


def test_errors_render_in_gcs_shape():
    error: ProxyError = Forbidden("no")
    assert error.body() == {
        "error": {
            "code": 403,
            "message": "no",
            "errors": [{"domain": "global", "reason": "forbidden", "message": "no"}],
        }
    }


@pytest.mark.parametrize(
    ("host", "usable"),
    [
        ("localhost", True), ("storage.internal:9180", True), ("my_service:80", True),
        ("127.0.0.1", True), ("[::1]:9180", True), ("a.b.c.", True), ("x" * 63 + ".com", True),
        ("x" * 64 + ".com", False), ("a..b", False), ("-a", False), ("a:1:2", False),
        ("localhost:0", False), ("localhost:65536", False), ("localhost:\u0663", False),
        ("localhost:", False), ("[::1]:", False), ("[::1]x", False), ("[1.2.3.4]", False),
        ("[fe80::1%eth0]", False), ("", False), ("a,b", False), ("evil@127.0.0.1", False),
    ],
)  # fmt: skip
def test_which_host_headers_links_may_carry(host, usable):
    assert _usable_host(host) is usable
