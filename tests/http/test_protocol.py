"""The protocol driven directly, with a fake transport: exact bytes, flow control, timer use."""

from __future__ import annotations

import asyncio
from typing import Any

from podidentity.http import Request, Response
from podidentity.http._state import ServerState
from podidentity.http.handler import Handler
from podidentity.http.protocol import HttpProtocol
from tests.http.helpers import GET, settings

DEFAULTS = b"server: nmi\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.protocol: HttpProtocol | None = None
        self.written = bytearray()
        self.writes = 0
        self.reading = True
        self.eof = False
        self.closed = False
        self.pause_after_write = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof and not self.closed
        self.written += data
        self.writes += 1
        if self.pause_after_write and self.protocol is not None:
            self.protocol.pause_writing()  # As a real transport does above its high-water mark.

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.1.2.3", 40000), "sockname": ("127.0.0.1", 2579)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0


class CountingLoop:
    """Delegates to the running loop, counting timers created."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_at(when, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def connect(handler: Handler, loop: Any = None, **overrides: Any) -> tuple[HttpProtocol, FakeTransport]:
    state = ServerState(settings(**overrides), handler, name="nmi", default_headers=DEFAULTS)
    protocol = HttpProtocol(state, loop or asyncio.get_running_loop())
    transport = FakeTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


def echo(request: Request) -> Response:
    return Response(200, request.method.encode() + b" " + request.raw_path.encode() + b" " + request.body)


async def test_request_fed_one_byte_at_a_time() -> None:
    protocol, transport = connect(echo)
    raw = b"POST /p?q HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    for i in range(len(raw)):
        assert transport.written == b""
        protocol.data_received(raw[i : i + 1])
    assert transport.written == b"HTTP/1.1 200 OK\r\n" + DEFAULTS + b"content-length: 11\r\n\r\nPOST /p abc"
    assert transport.writes == 1
    protocol.connection_lost(None)


async def test_pipelined_responses_wait_while_the_transport_is_paused() -> None:
    protocol, transport = connect(echo)
    transport.pause_after_write = True
    protocol.data_received(GET + b"GET /second HTTP/1.1\r\n\r\n")
    assert transport.written.count(b"HTTP/1.1 200") == 1
    assert not transport.reading
    transport.pause_after_write = False
    protocol.resume_writing()
    assert transport.written.count(b"HTTP/1.1 200") == 2
    assert transport.written.endswith(b"GET /second ")
    assert transport.reading
    protocol.connection_lost(None)


async def test_reading_pauses_when_the_pipeline_is_full_and_resumes_at_half() -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Response]] = []

    def handler(request: Request) -> asyncio.Future[Response]:
        futures.append(loop.create_future())
        return futures[-1]

    protocol, transport = connect(handler, max_pipelined=4)
    protocol.data_received(GET * 4)
    assert not transport.reading
    assert len(futures) == 1
    futures[0].set_result(Response(200))
    for _ in range(10):
        if len(futures) == 2:
            break
        await asyncio.sleep(0)
    assert len(futures) == 2  # Two left queued: at the low-water mark, reading resumes.
    assert transport.reading
    await asyncio.sleep(0)  # Let the second handler's task start awaiting its future.
    protocol.connection_lost(None)
    assert futures[1].cancelled()


async def test_more_pipelined_requests_than_allowed_in_one_read_are_answered_up_to_the_cap() -> None:
    seen: list[str] = []

    def handler(request: Request) -> Response:
        seen.append(request.raw_path)
        return Response(200)

    protocol, transport = connect(handler, max_pipelined=2)
    protocol.data_received(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
    assert seen == ["/1", "/2"]
    first, second = transport.written.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b"connection" not in first
    assert b"connection: close" in second
    assert transport.eof
    protocol.connection_lost(None)


async def test_keep_alive_requests_do_not_create_a_timer_each() -> None:
    loop = CountingLoop(asyncio.get_running_loop())
    protocol, transport = connect(echo, loop=loop)
    for _ in range(100):
        protocol.data_received(GET)
    assert transport.written.count(b"HTTP/1.1 200 OK") == 100
    # One for the idle deadline at connect, one when the (earlier) request deadline first applies.
    assert loop.timers <= 2
    protocol.connection_lost(None)


async def test_client_half_close_cancels_the_running_handler() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Response] = loop.create_future()
    protocol, transport = connect(lambda request: future)
    protocol.data_received(GET)
    assert protocol.eof_received() is None  # Let the transport close itself.
    protocol.connection_lost(None)
    await asyncio.sleep(0)
    assert future.cancelled()
    assert transport.written == b""
