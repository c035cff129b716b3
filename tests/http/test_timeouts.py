"""Idle connections and slowly sent requests are closed on time."""

from __future__ import annotations

import asyncio
import contextlib
import json

from podidentity.http import Request, Response
from tests.http.helpers import GET, Recorder, ServerFactory, close, connect, ok, read_eof, read_response

SHORT = 0.2
SLACK = 2.0  # Upper bound on lateness; generous for a loaded 2-core machine.


async def test_silent_connection_is_closed_after_the_idle_timeout(
    make_server: ServerFactory, recorder: Recorder
) -> None:
    loop = asyncio.get_running_loop()
    server = await make_server(ok, idle_timeout_s=SHORT)
    reader, writer = await connect(server)
    started = loop.time()
    assert await read_eof(reader) == b""
    assert SHORT * 0.9 <= loop.time() - started < SHORT + SLACK
    assert recorder.rejects == []  # Idle closes are silent.
    await close(writer)


async def test_keep_alive_connection_is_closed_after_the_idle_timeout(make_server: ServerFactory) -> None:
    loop = asyncio.get_running_loop()
    server = await make_server(ok, idle_timeout_s=SHORT)
    reader, writer = await connect(server)
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    answered = loop.time()
    assert await read_eof(reader) == b""
    assert SHORT * 0.9 <= loop.time() - answered < SHORT + SLACK
    await close(writer)


async def test_idle_timeout_restarts_after_each_request(make_server: ServerFactory) -> None:
    """Requests spaced under the idle timeout keep the connection open well past it."""
    loop = asyncio.get_running_loop()
    server = await make_server(ok, idle_timeout_s=0.3)
    reader, writer = await connect(server)
    started = loop.time()
    for _ in range(6):
        writer.write(GET)
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(0.1)  # Pacing, not synchronisation.
    assert loop.time() - started > 0.6
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    await close(writer)


async def test_slow_handler_is_not_cut_by_the_idle_timeout(make_server: ServerFactory) -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.3)
        return Response(200, b"done")

    server = await make_server(slow, idle_timeout_s=0.1, request_timeout_s=0.1)
    reader, writer = await connect(server)
    writer.write(GET)
    assert (await read_response(reader)).body == b"done"
    await close(writer)


async def test_trickled_request_is_refused_at_its_deadline(make_server: ServerFactory) -> None:
    loop = asyncio.get_running_loop()
    server = await make_server(ok, request_timeout_s=0.3, idle_timeout_s=5.0)
    reader, writer = await connect(server)
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        writer.write(b"GET / HTTP/1.1\r\n")
        for i in range(200):
            writer.write(b"X-Slow-%d: y\r\n" % i)
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.02)  # Pacing the attacker, not synchronisation.

    started = loop.time()
    trickler = asyncio.create_task(trickle())
    try:
        response = await read_response(reader)
        assert response.status == 408
        assert json.loads(response.body)["error_description"] == "request not received in time"
        assert response.headers["connection"] == "close"
        assert await read_eof(reader) == b""
        elapsed = loop.time() - started
        assert 0.3 * 0.9 <= elapsed < 0.3 + SLACK
        assert sent >= 5  # Bytes really were still arriving when the deadline hit.
    finally:
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickler
    await close(writer)


async def test_trickled_body_is_refused_at_its_deadline(
    make_server: ServerFactory, recorder: Recorder
) -> None:
    server = await make_server(ok, request_timeout_s=0.2)
    reader, writer = await connect(server)
    writer.write(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
    response = await read_response(reader)
    assert response.status == 408
    assert await read_eof(reader) == b""
    ((request, refusal, _),) = recorder.responses
    assert (request.raw_path, refusal.status) == ("/b", 408)
    await close(writer)


async def test_partial_request_after_an_answer_gets_the_request_deadline(make_server: ServerFactory) -> None:
    loop = asyncio.get_running_loop()
    server = await make_server(ok, request_timeout_s=0.2, idle_timeout_s=5.0)
    reader, writer = await connect(server)
    writer.write(GET + b"GET /never-finished HTTP/1.1\r\n")
    assert (await read_response(reader)).status == 200
    started = loop.time()
    assert (await read_response(reader)).status == 408
    assert loop.time() - started < 0.2 + SLACK
    assert await read_eof(reader) == b""
    await close(writer)
