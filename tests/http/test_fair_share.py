"""At the connection cap, a caller holding fewer connections gets one: a bigger holder's idle one is shed."""

from __future__ import annotations

import asyncio

from podidentity.http import HttpServer, Request, Response
from tests.http.helpers import GET, Recorder, ServerFactory, close, ok, read_eof, read_response

A, B, C = "127.0.0.10", "127.0.0.11", "127.0.0.12"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_from(server: HttpServer, source: str) -> Connection:
    return await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))


async def status_of(connection: Connection, request: bytes = GET) -> int:
    reader, writer = connection
    writer.write(request)
    return (await read_response(reader)).status


async def idle_connections(server: HttpServer, source: str, count: int) -> list[Connection]:
    """``count`` connections from ``source``, each answered once (so registered), then idle."""
    opened = []
    for _ in range(count):
        connection = await open_from(server, source)
        assert await status_of(connection) == 200
        opened.append(connection)
        await asyncio.sleep(0.01)  # uvloop's clock has millisecond steps: keep idle times apart.
    return opened


async def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        await close(writer)


async def test_caller_without_connections_gets_one_at_the_cap(
    make_server: ServerFactory, recorder: Recorder
) -> None:
    """Shed: the oldest idle connection of the biggest holder, not its oldest connection."""
    server = await make_server(ok, max_connections=5, max_connections_per_peer=4)
    a = await idle_connections(server, A, 3)
    b = await idle_connections(server, B, 2)
    assert await status_of(a[0]) == 200  # a[0] is A's oldest connection, but a[1] is idle longest.
    await asyncio.sleep(0.01)
    c = await open_from(server, C)
    assert await status_of(c) == 200
    assert await read_eof(a[1][0]) == b""  # Closed silently, as an idle timeout would.
    for survivor in (a[0], a[2], *b):
        assert await status_of(survivor) == 200
    assert server.connections_shed == 1
    assert recorder.rejects == []
    await close_all([*a, *b, c])


async def test_busy_connections_are_never_shed(make_server: ServerFactory, recorder: Recorder) -> None:
    """A request running, or half received, keeps a connection: the newcomer is refused as before."""
    loop = asyncio.get_running_loop()
    held: list[asyncio.Future[Response]] = []

    def handler(request: Request) -> Response | asyncio.Future[Response]:
        if request.raw_path != "/hold":
            return Response(200)
        held.append(loop.create_future())
        return held[-1]

    server = await make_server(handler, max_connections=4, max_connections_per_peer=4)
    a = [await open_from(server, A) for _ in range(2)]
    for _, writer in a:
        writer.write(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
    b = [await open_from(server, B) for _ in range(2)]
    for _, writer in b:
        writer.write(b"GET /half HTTP/1.1\r\nHost:")
    for _ in range(250):
        if len(held) == 2 and server.connections == 4:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # Let the half requests reach the parser.
    c = await open_from(server, C)
    assert (await read_response(c[0])).status == 503
    assert server.connections_shed == 0
    assert recorder.rejects == [503]
    for future in held:
        future.set_result(Response(200))
    for reader, _ in a:
        assert (await read_response(reader)).status == 200
    await close_all([*a, *b, c])


async def test_only_a_bigger_holder_is_shed(make_server: ServerFactory, recorder: Recorder) -> None:
    """A newcomer's caller must hold fewer connections than the victim's: equal or more is refused."""
    server = await make_server(ok, max_connections=4, max_connections_per_peer=4)
    a = await idle_connections(server, A, 3)
    b = await idle_connections(server, B, 1)
    a_more = await open_from(server, A)  # A holds the most: nobody is shed for it.
    assert (await read_response(a_more[0])).status == 503
    await close(a_more[1])
    for _ in range(100):
        if server.connections == 4:
            break
        await asyncio.sleep(0.02)
    b_more = await open_from(server, B)  # B holds 1 < A's 3: A's oldest idle one goes.
    assert await status_of(b_more) == 200
    assert await read_eof(a[0][0]) == b""
    # Now A holds 2 and B holds 2: neither is shed for the other.
    b_third = await open_from(server, B)
    assert (await read_response(b_third[0])).status == 503
    assert server.connections_shed == 1
    assert recorder.rejects == [503, 503]
    await close_all([*a, *b, a_more, b_more, b_third])
