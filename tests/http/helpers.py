"""Raw-socket client helpers and hook recorder shared by the HTTP tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from podidentity.http import HttpServer, Request, Response
from podidentity.http.settings import ServerSettings

# Short enough to keep the suite fast, long enough to be robust on a loaded 2-core machine.
FAST = ServerSettings(
    listen_address="127.0.0.1",
    port=0,
    idle_timeout_s=5.0,
    request_timeout_s=5.0,
    graceful_timeout_s=2.0,
)
IO_TIMEOUT_S = 5.0
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"

ServerFactory = Callable[..., Awaitable[HttpServer]]


def settings(**overrides: Any) -> ServerSettings:
    return replace(FAST, **overrides)


class Recorder:
    """Collects what the server reports through its hooks."""

    def __init__(self) -> None:
        self.responses: list[tuple[Request, Response, float]] = []
        self.rejects: list[int] = []

    def on_response(self, request: Request, response: Response, seconds: float) -> None:
        self.responses.append((request, response, seconds))

    def on_reject(self, status: int) -> None:
        self.rejects.append(status)


class HttpResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"HttpResponse({self.status}, {self.headers}, {self.body!r})"


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> HttpResponse:
    async with asyncio.timeout(IO_TIMEOUT_S):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                assert name.lower() not in headers, f"duplicate header {name}"
                headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = b"" if head else await reader.readexactly(length)
        return HttpResponse(int(status), headers, body)


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; fails the test if it does not within the I/O timeout."""
    async with asyncio.timeout(IO_TIMEOUT_S):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


def ok(request: Request) -> Response:
    return Response(200, b"path=" + request.raw_path.encode() + b" query=" + request.query.encode())
