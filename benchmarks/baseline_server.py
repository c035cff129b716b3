"""The floor NMI is measured against: the least a uvloop + httptools server can do per request.

The shape of vmbench's ``echoserver.py`` HTTP mode: one ``asyncio.Protocol`` per connection, one
``httptools.HttpRequestParser`` reused for every request on it, keep-alive, and a single
``transport.write`` per answer. It answers every request with the same body and the same headers
as NMI's cached token answer (``server: nmi``, ``date``, ``content-length``, ``content-type``), so
the bytes on the wire match and the difference in throughput is NMI's own work: routing, the pod
and identity lookups, the cache, rendering the token, metrics and the audit log.

    python -m benchmarks.baseline_server --port 8081 --body-file token.json
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from email.utils import formatdate
from typing import cast

import httptools
import uvloop

_CONTENT_TYPE = b"application/json; charset=utf-8"


class _Answer:
    """The response bytes, rebuilt once per second for the ``date`` header (as NMI's tick does)."""

    __slots__ = ("_body", "_server", "close", "keep_alive")

    def __init__(self, body: bytes, server: bytes) -> None:
        self._body = body
        self._server = server
        self.keep_alive = b""
        self.close = b""
        self.refresh(time.time())

    def refresh(self, now: float) -> None:
        head = b"HTTP/1.1 200 OK\r\nserver: %s\r\ndate: %s\r\ncontent-length: %d\r\ncontent-type: %s\r\n" % (
            self._server,
            formatdate(now, usegmt=True).encode("ascii"),
            len(self._body),
            _CONTENT_TYPE,
        )
        self.keep_alive = head + b"\r\n" + self._body
        self.close = head + b"connection: close\r\n\r\n" + self._body


class BaselineProtocol(asyncio.Protocol):
    __slots__ = ("_answer", "_parser", "_transport")

    def __init__(self, answer: _Answer) -> None:
        self._answer = answer
        self._transport: asyncio.Transport | None = None
        # Reused for the whole connection, as uvicorn does (vmbench recreates it per request).
        self._parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, hence a cast, not a check.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        # Answered synchronously in the parser callback: pipelined requests stay in order for free.
        if self._parser.should_keep_alive():
            transport.write(self._answer.keep_alive)
        else:
            transport.write(self._answer.close)
            transport.close()


async def serve(host: str, port: int, body: bytes, server_name: bytes) -> None:
    loop = asyncio.get_running_loop()
    answer = _Answer(body, server_name)

    def tick() -> None:
        now = time.time()
        answer.refresh(now)
        loop.call_later(1.0 - now % 1.0, tick)

    tick()
    server = await loop.create_server(
        lambda: BaselineProtocol(answer), host, port, backlog=2048, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"baseline listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port; it is printed")
    parser.add_argument("--body-file", required=True, help="the exact body bytes to answer with")
    parser.add_argument("--server-name", default="nmi", help="value of the server header (NMI's: nmi)")
    args = parser.parse_args(argv)
    with open(args.body_file, "rb") as f:
        body = f.read()
    uvloop.run(serve(args.host, args.port, body, args.server_name.encode("ascii")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
