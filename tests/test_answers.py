"""What an upstream answer can carry to the caller, with a real sidecar in front of a scripted
upstream: answers fake-gcs-server never gives (a 401 to the sidecar's own token, hop-by-hop
headers it names, lowercase header names, a gzipped JSON document) and Cloud Storage or
something between may."""

from __future__ import annotations

import gzip
import http.client
import json
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from proxy.devserver.issuer import DevIssuer, bind_socket, serve_socket
from proxy.devserver.metadata import DevMetadataServer
from tests.support.proxyproc import ProxyProcess, isolated_env
from tests.support.threaded import LoopThread

pytestmark = pytest.mark.integration

AUD = "answers"
BUCKET = "answers-bucket"
ALICE = "alice@example.com"
REAL_ID = "real-upload-id-never-for-the-caller"
SIDECAR_ACCOUNT = "gcs-sidecar@acme-prod-4711.iam.gserviceaccount.com"


@dataclass
class Scripted:
    """Answers by object name; records the Authorization and Accept-Encoding it was sent."""

    seen: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path
        self.seen.append(
            (path, request.headers.get("Authorization"), request.headers.get("Accept-Encoding"))
        )
        document = {
            "kind": "storage#object",
            "bucket": BUCKET,
            "name": "alice/a.txt",
            "selfLink": f"https://storage.googleapis.com/storage/v1/b/{BUCKET}/o/alice%2Fa.txt",
        }
        if "inject" in path:  # a 403 without a reason, quoting XML in its message
            answer = web.Response(
                status=403,
                body=b'{"error": {"code": 403, "errors": [], "message": "<Code>Smuggled</Code>"}}',
            )
        elif "forbidden" in path:  # Cloud Storage's own 403, in its own words
            reason = "retentionPolicyNotMet" if "retention" in path else "forbidden"
            message = (
                f"{SIDECAR_ACCOUNT} does not have storage.objects.get access to the Google "
                f"Cloud Storage object. Permission 'storage.objects.get' denied on resource."
            )
            if path.startswith(f"/{BUCKET}/"):  # the XML API
                body = (
                    "<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                    f"<Message>Access denied.</Message><Details>{message}</Details></Error>"
                ).encode()
            else:
                body = json.dumps(
                    {
                        "error": {
                            "code": 403,
                            "message": message,
                            "errors": [{"message": message, "domain": "global", "reason": reason}],
                        }
                    }
                ).encode()
            answer = web.Response(status=403, body=body)
            answer.headers["WWW-Authenticate"] = (
                'Bearer realm="https://accounts.google.com/", error="insufficient_scope"'
            )
        elif "fields" in request.query:  # as the JSON API answers `fields`: only those
            full = document | {
                "mediaLink": f"https://storage.googleapis.com/download/storage/v1/b/{BUCKET}"
                "/o/alice%2Fa.txt?generation=1&alt=media",
                "generation": "1",
                "acl": [{"entity": "user-bob@example.com", "role": "OWNER"}],
                "owner": {"entity": "user-bob@example.com"},
            }
            if "generation" in request.query:
                full["mediaLink"] = full["mediaLink"].replace(
                    "generation=1", f"generation={request.query['generation']}"
                )
            wanted = request.query["fields"].split(",")
            answer = web.Response(
                body=json.dumps({k: full[k] for k in wanted if k in full}).encode()
            )
        elif "refused" in path:
            answer = web.Response(
                status=401,
                body=b'{"error": {"code": 401, "message": "Invalid Credentials"}}',
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
            )
        elif "hop" in path:
            answer = web.Response(body=b"data", content_type="application/octet-stream")
            answer.headers["Connection"] = "X-Hop-Secret"
            answer.headers["X-Hop-Secret"] = "hop"
            answer.headers["Set-Cookie2"] = "up=1"
            answer.headers["Content-Location"] = f"https://x/upload?upload_id={REAL_ID}"
            answer.headers["X-Goog-Generation"] = "7"
            answer.headers["WWW-Authenticate"] = f'Bearer realm="x", scope="{SIDECAR_ACCOUNT}"'
            answer.headers["Via"] = "1.1 google"
            answer.headers["X-Cloud-Trace-Context"] = "105445aa7843bc8bf206b12000100000/1"
        elif "gzipped" in path and "gzip" in request.headers.get("Accept-Encoding", ""):
            answer = web.Response(body=gzip.compress(json.dumps(document).encode()))
            answer.headers["Content-Type"] = "application/json"
            answer.headers["Content-Encoding"] = "gzip"
        else:
            answer = web.Response(body=json.dumps(document).encode())
        return answer


async def lowercase_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Header names as HTTP/1.1 allows them: in any case (aiohttp would capitalise them)."""
    if "lowercase" in request.raw_path:
        response.headers.popall("Content-Type", None)
        response.headers["content-type"] = "application/json; charset=UTF-8"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, loop_thread: LoopThread, dev_issuer: DevIssuer, metadata_server):  # type: ignore[no-untyped-def]
    script = Scripted()
    app = web.Application()
    app.on_response_prepare.append(lowercase_headers)
    app.router.add_route("*", "/{tail:.*}", script.handle)
    sock = bind_socket("127.0.0.1", 0)
    runner = loop_thread.run(serve_socket(app, sock))
    tmp = tmp_path_factory.mktemp("answers")
    policy = tmp / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            issuers:
              - issuer: {dev_issuer.issuer_url}
                audiences: ["{AUD}"]
            rules:
              - id: alice-home
                principals: ["user:{ALICE}"]
                bucket: {BUCKET}
                prefixes: ["alice/"]
                verbs: [read, write]
            """
        )
    )
    upstream = f"http://127.0.0.1:{sock.getsockname()[1]}"
    process = ProxyProcess(policy, upstream, isolated_env(tmp, metadata_server[1]))
    process.wait_ready()
    token = dev_issuer.mint(audience=AUD, subject="alice", email=ALICE)
    yield process, script, token, metadata_server[0]
    process.stop()
    loop_thread.run(runner.cleanup())


def get(
    process: ProxyProcess, target: str, token: str, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.request(
        "GET", target, headers={"Authorization": f"Bearer {token}", **(headers or {})}
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def object_path(name: str) -> str:
    return f"/storage/v1/b/{BUCKET}/o/alice%2F{name}"


def test_a_401_to_the_sidecar_token_is_a_502_and_another_token_is_fetched_at_once(
    scripted: tuple[ProxyProcess, Scripted, str, DevMetadataServer],
) -> None:
    """Cloud Storage refusing the sidecar's own token is not the caller's 401 (its client
    would throw away a good ID token and retry): 502, without upstream's challenge. The
    sidecar fetches another token straight away, with no request needed, and stays ready
    meanwhile (readiness takes a pod out of its Service: no request might come)."""
    process, script, token, metadata = scripted
    issued = len(metadata.issued_tokens)
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.request(
        "GET", object_path("refused.txt"), headers={"Authorization": f"Bearer {token}"}
    )
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    connection.close()
    assert response.status == 502
    assert response.getheader("WWW-Authenticate") is None
    assert error["code"] == 502 and "credentials" in error["message"]
    refused_with = script.seen[-1][1]
    deadline = time.monotonic() + 10
    while len(metadata.issued_tokens) == issued:
        assert time.monotonic() < deadline, "no new token was fetched"
        time.sleep(0.05)
    with urllib.request.urlopen(f"{process.admin_url}/readyz", timeout=5) as ready:
        assert ready.status == 200
    # The metadata server counts a token as issued before the sidecar has it in hand:
    # requests until one carries another token (the old one is used meanwhile).
    while True:
        get(process, object_path("fine.txt"), token)
        if script.seen[-1][1] != refused_with:
            break
        assert time.monotonic() < deadline, "the refused token is still in use"
        time.sleep(0.05)
    assert script.seen[-1][1] == f"Bearer {metadata.issued_tokens[-1]}"
    assert "Cloud Storage refused the upstream token" in process.output()


def test_answer_headers_upstream_connection_names_and_session_urls_stay_behind(
    scripted: tuple[ProxyProcess, Scripted, str, DevMetadataServer],
) -> None:
    process, _, token, _ = scripted
    response = get(process, object_path("hop.txt") + "?alt=media", token)
    assert response.status == 200
    names = {name.lower() for name, _ in response.getheaders()}
    assert not names & {"x-hop-secret", "set-cookie2", "content-location"}
    # A review: a challenge naming the sidecar's account, Google's hops and its trace id.
    assert not names & {"www-authenticate", "via", "x-cloud-trace-context"}
    assert response.getheader("X-Goog-Generation") == "7"  # Cloud Storage's own stay
    assert all(REAL_ID not in value for _, value in response.getheaders())


def test_a_lowercase_content_type_from_upstream_is_still_one_content_type(
    scripted: tuple[ProxyProcess, Scripted, str, DevMetadataServer],
) -> None:
    process, _, token, _ = scripted
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.request(
        "GET", object_path("lowercase.txt"), headers={"Authorization": f"Bearer {token}"}
    )
    response = connection.getresponse()
    document = json.loads(response.read())
    connection.close()
    assert response.status == 200
    assert [v for k, v in response.getheaders() if k.lower() == "content-type"] == [
        "application/json; charset=UTF-8"
    ]
    assert document["selfLink"].startswith(f"http://127.0.0.1:{process.port}/")


def test_json_answers_are_asked_for_uncompressed_media_keeps_the_callers_choice(
    scripted: tuple[ProxyProcess, Scripted, str, DevMetadataServer],
) -> None:
    """The sidecar rewrites JSON documents (links, list filtering), so it never asks for a
    compressed one; a download is relayed as it comes, so the caller's choice stands."""
    process, script, token, _ = scripted
    asked = {"Accept-Encoding": "gzip", "User-Agent": "app (gzip)"}
    response = get(process, object_path("gzipped.txt"), token, asked)
    assert response.status == 200
    assert script.seen[-1][2] is None
    get(process, object_path("gzipped.txt") + "?alt=media", token, asked)
    assert script.seen[-1][2] == "gzip"


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (object_path("forbidden.txt"), "forbidden"),
        (object_path("forbidden.txt") + "?alt=media", "forbidden"),
        (f"/download/storage/v1/b/{BUCKET}/o/alice%2Fforbidden.txt?alt=media", "forbidden"),
        (object_path("retention-forbidden.txt"), "retentionPolicyNotMet"),
        (f"/{BUCKET}/alice/forbidden.txt", "AccessDenied"),
        (object_path("inject.txt"), "forbidden"),  # a JSON answer's text is never a reason
    ],
)
def test_a_403_from_cloud_storage_keeps_its_reason_not_its_words(
    scripted: tuple[ProxyProcess, Scripted, str, DevMetadataServer], target: str, reason: str
) -> None:
    """A review: Cloud Storage's own 403 reached the caller verbatim, naming the sidecar's
    service account and project, with upstream's challenge. The reason stays (clients act
    on `retentionPolicyNotMet`); the message and headers are the sidecar's."""
    process, _, token, _ = scripted
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.request("GET", target, headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 403
    assert response.getheader("WWW-Authenticate") is None
    assert b"acme-prod" not in body and b"gcs-sidecar" not in body
    error = json.loads(body)["error"]
    assert error["code"] == 403 and error["errors"][0]["reason"] == reason
    assert error["message"] == f"Cloud Storage refused the request ({reason})"


@pytest.mark.parametrize(
    "fields", ["name,selfLink,mediaLink", "selfLink,mediaLink", "mediaLink,acl,owner"]
)
def test_fields_without_kind_still_get_links_through_the_sidecar_and_no_acl(
    scripted: tuple[ProxyProcess, Scripted, str, DevMetadataServer], fields: str
) -> None:
    """A review: the answer was rewritten only when it said `kind: storage#object`, so a
    caller's `fields` without `kind` got upstream's links (and, where the sidecar cannot ask
    for noAcl, the ACL)."""
    process, _, token, _ = scripted
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    connection.request(
        "GET",
        object_path("a.txt") + f"?fields={fields}",
        headers={"Authorization": f"Bearer {token}"},
    )
    response = connection.getresponse()
    document = json.loads(response.read())
    connection.close()
    assert response.status == 200
    assert "acl" not in document and "owner" not in document
    links = [document[k] for k in ("selfLink", "mediaLink") if k in document]
    assert links and all(link.startswith(process.url + "/") for link in links), links
    assert document["mediaLink"] == (
        f"{process.url}/download/storage/v1/b/{BUCKET}/o/alice%2Fa.txt"
        + ("?generation=1&alt=media" if "generation" in document else "?alt=media")
    )


def test_a_rebuilt_media_link_keeps_the_generation_asked_for(
    scripted: tuple[ProxyProcess, Scripted, str, DevMetadataServer],
) -> None:
    """A review: with `fields=mediaLink` (no `generation` in the answer) the link was
    rebuilt without one, and downloaded the live object instead of generation 5."""
    process, _, token, _ = scripted
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=30)
    target = object_path("v.txt") + "?generation=5&fields=mediaLink"
    connection.request("GET", target, headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    document = json.loads(response.read())
    connection.close()
    assert response.status == 200
    assert document == {  # built from the object asked for: the answer names none
        "mediaLink": f"{process.url}/download/storage/v1/b/{BUCKET}/o/alice%2Fv.txt"
        "?generation=5&alt=media"
    }
