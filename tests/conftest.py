"""Shared real servers: fake-gcs-server, a recording relay, the dev issuer and metadata server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.devserver.issuer import DevIssuer, bind_socket, http_url, serve_socket
from proxy.devserver.metadata import DevMetadataServer, start_metadata
from tests.support.fakegcs import FakeGcs
from tests.support.recorder import RecordingRelay
from tests.support.threaded import LoopThread


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def dev_issuer(loop_thread: LoopThread) -> Iterator[DevIssuer]:
    sock = bind_socket("127.0.0.1", 0)
    issuer = DevIssuer(http_url("127.0.0.1", sock.getsockname()[1]))
    runner = loop_thread.run(serve_socket(issuer.app(), sock))
    yield issuer
    loop_thread.run(runner.cleanup())


@pytest.fixture(scope="session")
def metadata_server(
    loop_thread: LoopThread, dev_issuer: DevIssuer
) -> Iterator[tuple[DevMetadataServer, int]]:
    server = DevMetadataServer(issuer=dev_issuer)
    runner, port = loop_thread.run(start_metadata(server))
    yield server, port
    loop_thread.run(runner.cleanup())


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[FakeGcs]:
    with FakeGcs() as server:
        yield server


@pytest.fixture(scope="session")
def relay(fake_gcs: FakeGcs) -> Iterator[RecordingRelay]:
    with RecordingRelay(fake_gcs.url) as recorder:
        yield recorder
