"""`edp serve`'s connection guard (GuardedH11Protocol) under uvicorn, on a real socket."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="the web extra is not installed")

from edp.web.server import GuardedH11Protocol  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class QuickHeads(GuardedH11Protocol):
    head_timeout = 0.5


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A route that answers at once, and /slow that takes 1.5 s (an ingest's commit)."""
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           http=QuickHeads))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield int(sock.getsockname()[1])
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def exchange(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload``; everything the server answers until it closes, and when."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    started, got = time.monotonic(), b""
    try:
        conn.sendall(payload)
        while chunk := conn.recv(65536):
            got += chunk
    finally:
        conn.close()
    return got, time.monotonic() - started


def test_a_pipelined_request_slower_than_the_head_timeout_is_answered(port: int) -> None:
    # When a client pipelines a quick request and one that takes longer than the head
    # timeout to answer
    got, _ = exchange(port, b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n"
                            b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    # Then both are answered: the head timeout applies only while waiting for a head
    assert got.count(b"HTTP/1.1 200") == 2, got


def test_an_idle_kept_alive_connection_is_closed_after_the_head_timeout(port: int) -> None:
    # When a client gets its answer and then sends nothing more on the connection
    got, seconds = exchange(port, b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
    # Then the server closes it once the head timeout passed, not at uvicorn's
    # keep-alive of 5 s, nor never
    assert got.count(b"HTTP/1.1 200") == 1
    assert seconds < 4
