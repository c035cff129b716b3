"""Graceful shutdown: stop accepting, drop idle connections, drain, then cancel."""

from __future__ import annotations

import asyncio
import json

import pytest

from podidentity.http import HttpServer, Request, Response
from tests.http.helpers import GET, ServerFactory, close, connect, ok, read_eof, read_response, settings


async def wait_until_not_serving(server: HttpServer) -> None:
    for _ in range(100):
        if not server.serving:
            return
        await asyncio.sleep(0)
    raise AssertionError("server still serving")


async def test_in_flight_request_completes_while_new_connections_are_refused(
    make_server: ServerFactory,
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.raw_path == "/slow":
            entered.set()
            await release.wait()
            return Response(200, b"finished")
        return ok(request)

    server = await make_server(handler)
    idle_reader, idle_writer = await connect(server)
    idle_writer.write(GET)
    assert (await read_response(idle_reader)).status == 200
    busy_reader, busy_writer = await connect(server)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.wait_for(entered.wait(), 5)

    shutdown = asyncio.create_task(server.shutdown(grace_s=5.0))
    await wait_until_not_serving(server)
    # The idle keep-alive connection is closed at once, while the slow request is still running.
    assert await read_eof(idle_reader) == b""
    assert not release.is_set()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)

    release.set()
    response = await read_response(busy_reader)
    assert (response.status, response.body) == (200, b"finished")
    assert response.headers["connection"] == "close"
    assert await read_eof(busy_reader) == b""
    await close(busy_writer)
    await close(idle_writer)
    # Shutdown ends as soon as the clients have closed, well before the grace period.
    await asyncio.wait_for(shutdown, 1.5)
    assert server.connections == 0


async def test_request_outliving_the_grace_period_is_cancelled(make_server: ServerFactory) -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(request: Request) -> Response:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    server = await make_server(stuck)
    reader, writer = await connect(server)
    writer.write(GET)
    await asyncio.wait_for(entered.wait(), 5)
    started = loop.time()
    await server.shutdown(grace_s=0.2)
    assert 0.2 * 0.9 <= loop.time() - started < 2.0
    assert cancelled.is_set()
    response = await read_response(reader)
    assert response.status == 503
    assert json.loads(response.body)["error_description"] == "server shutting down"
    assert await read_eof(reader) == b""
    assert server.connections == 0
    await close(writer)


async def test_shutdown_with_nothing_in_flight_is_prompt(make_server: ServerFactory) -> None:
    loop = asyncio.get_running_loop()
    server = await make_server(ok)
    reader, writer = await connect(server)
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    started = loop.time()
    await asyncio.gather(server.shutdown(grace_s=5.0), server.shutdown(grace_s=5.0))
    assert loop.time() - started < 1.0
    assert await read_eof(reader) == b""
    assert not server.serving
    await close(writer)


async def test_shutdown_before_start_is_a_no_op() -> None:
    server = HttpServer(settings(), ok)
    await server.shutdown()
    assert server.connections == 0
    assert not server.serving
