"""Request/response behaviour over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable

from podidentity.http import HttpServer, Request, Response, json_response
from tests.http.helpers import GET, Recorder, ServerFactory, close, connect, ok, read_eof, read_response


async def test_simple_get_exposes_the_request_as_sent(make_server: ServerFactory, recorder: Recorder) -> None:
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return json_response(200, b'{"ok":true}')

    server = await make_server(handler)
    reader, writer = await connect(server)
    writer.write(
        b"GET /metadata/identity/oauth2/token%2F?resource=https%3A%2F%2Fvault&api-version=1 HTTP/1.1\r\n"
        b"Host: 169.254.169.254\r\nMetadata: true\r\nX-Multi: a\r\nx-multi: b\r\nX-Odd: caf\xe9\r\n\r\n"
    )
    response = await read_response(reader)
    assert response.status == 200
    assert response.body == b'{"ok":true}'
    assert response.headers["content-length"] == "11"
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["server"] == "nmi-test"
    assert response.headers["date"].endswith(" GMT")
    assert "connection" not in response.headers

    (request,) = seen
    assert request.method == "GET"
    assert request.raw_path == "/metadata/identity/oauth2/token%2F"
    assert request.query == "resource=https%3A%2F%2Fvault&api-version=1"
    assert request.headers == {
        "host": "169.254.169.254",
        "metadata": "true",
        "x-multi": "a, b",
        "x-odd": "caf\xe9",
    }
    assert request.body == b""
    assert request.http_version == "1.1"
    assert request.keep_alive is True
    assert request.peer_ip == "127.0.0.1"
    assert request.peer_port == writer.get_extra_info("sockname")[1]
    assert (request.local_ip, request.local_port) == ("127.0.0.1", server.port)
    assert [(r.status, s >= 0) for _, r, s in recorder.responses] == [(200, True)]
    await close(writer)


async def test_keep_alive_serves_several_requests_on_one_connection(make_server: ServerFactory) -> None:
    ports: list[int] = []

    def handler(request: Request) -> Response:
        ports.append(request.peer_port)
        return ok(request)

    server = await make_server(handler)
    reader, writer = await connect(server)
    for i in range(3):
        writer.write(b"GET /r%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        response = await read_response(reader)
        assert response.body == b"path=/r%d query=" % i
    assert len(ports) == 3 and len(set(ports)) == 1
    assert server.connections == 1
    await close(writer)


async def test_connection_close_is_echoed_and_honoured(make_server: ServerFactory) -> None:
    server = await make_server(ok)
    reader, writer = await connect(server)
    # The second request follows a "Connection: close" one and must be dropped, not answered.
    writer.write(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n" + GET)
    response = await read_response(reader)
    assert response.headers["connection"] == "close"
    assert response.body == b"path=/a query="
    assert await read_eof(reader) == b""
    await close(writer)


async def test_http10_closes_unless_keep_alive_is_asked_for(make_server: ServerFactory) -> None:
    server = await make_server(ok)
    reader, writer = await connect(server)
    writer.write(b"GET /a HTTP/1.0\r\n\r\n")
    assert (await read_response(reader)).headers["connection"] == "close"
    assert await read_eof(reader) == b""
    await close(writer)

    reader, writer = await connect(server)
    for _ in range(2):
        writer.write(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = await read_response(reader)
        assert response.headers["connection"] == "keep-alive"
        assert response.body == b"path=/b query="
    await close(writer)


async def test_pipelined_requests_are_answered_in_order(make_server: ServerFactory) -> None:
    events: list[str] = []

    async def slow(request: Request) -> Response:
        events.append("slow-start")
        await asyncio.sleep(0.05)
        events.append("slow-end")
        return Response(200, b"slow")

    def handler(request: Request) -> Response | Awaitable[Response]:
        if request.raw_path == "/slow":
            return slow(request)
        events.append(request.raw_path)
        return Response(200, request.raw_path.encode())

    server = await make_server(handler)
    reader, writer = await connect(server)
    writer.write(
        b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /three HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    )
    bodies = [(await read_response(reader)).body for _ in range(3)]
    assert bodies == [b"slow", b"/two", b"/three"]
    assert events == ["slow-start", "slow-end", "/two", "/three"]
    await close(writer)


async def test_request_sent_one_byte_at_a_time(make_server: ServerFactory) -> None:
    bodies: list[bytes] = []

    def handler(request: Request) -> Response:
        bodies.append(request.body)
        return ok(request)

    server = await make_server(handler)
    reader, writer = await connect(server)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = b"POST /one/byte?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
    for i in range(len(request)):
        writer.write(request[i : i + 1])
        await writer.drain()
    response = await read_response(reader)
    assert response.body == b"path=/one/byte query=x=1"
    assert bodies == [b"hello"]
    await close(writer)


async def test_head_response_has_no_body(make_server: ServerFactory) -> None:
    server = await make_server(lambda request: Response(200, b"0123456789"))
    reader, writer = await connect(server)
    writer.write(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n" + GET)
    head = await read_response(reader, head=True)
    assert head.status == 200
    assert head.headers["content-length"] == "10"
    # Had a body been sent, this would read it instead of the next status line.
    get = await read_response(reader)
    assert get.body == b"0123456789"
    await close(writer)


async def test_handler_exceptions_become_500_and_the_connection_survives(
    make_server: ServerFactory, recorder: Recorder
) -> None:
    async def fails_later(request: Request) -> Response:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    def handler(request: Request) -> Response | Awaitable[Response]:
        if request.raw_path == "/sync":
            raise RuntimeError("boom")
        if request.raw_path == "/async":
            return fails_later(request)
        return Response(200, b"fine")

    server = await make_server(handler)
    reader, writer = await connect(server)
    for path in (b"/sync", b"/async"):
        writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
        response = await read_response(reader)
        assert response.status == 500
        assert json.loads(response.body) == {"error": "internal_error", "error_description": "internal error"}
    writer.write(GET)
    assert (await read_response(reader)).body == b"fine"
    assert [r.status for _, r, _ in recorder.responses] == [500, 500, 200]
    await close(writer)


async def test_handler_task_is_cancelled_when_the_client_leaves(make_server: ServerFactory) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def waits_for_ever(request: Request) -> Response:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    server = await make_server(waits_for_ever)
    _reader, writer = await connect(server)
    writer.write(GET)
    await asyncio.wait_for(entered.wait(), 5)
    await close(writer)
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_awaitables_other_than_coroutines_are_accepted(make_server: ServerFactory) -> None:
    loop = asyncio.get_running_loop()

    def handler(request: Request) -> asyncio.Future[Response]:
        future: asyncio.Future[Response] = loop.create_future()
        loop.call_soon(future.set_result, Response(202, b"later"))
        return future

    server = await make_server(handler)
    reader, writer = await connect(server)
    writer.write(GET)
    response = await read_response(reader)
    assert (response.status, response.body) == (202, b"later")
    await close(writer)


async def test_expect_continue_gets_100_before_the_body(make_server: ServerFactory) -> None:
    server = await make_server(lambda request: Response(200, request.body))
    reader, writer = await connect(server)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ping")
    assert (await read_response(reader)).body == b"ping"
    await close(writer)


async def test_absolute_form_target_is_split_into_path_and_query(make_server: ServerFactory) -> None:
    server = await make_server(ok)
    reader, writer = await connect(server)
    writer.write(b"GET http://169.254.169.254/metadata/instance?api-version=2021 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader)).body == b"path=/metadata/instance query=api-version=2021"
    await close(writer)


async def test_upgrade_offer_is_declined_in_http11(make_server: ServerFactory) -> None:
    server = await make_server(ok)
    reader, writer = await connect(server)
    writer.write(
        b"GET /u HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    )
    response = await read_response(reader)
    assert (response.status, response.body) == (200, b"path=/u query=")
    assert response.headers["connection"] == "close"
    assert await read_eof(reader) == b""
    await close(writer)


async def test_connections_above_the_cap_get_503(make_server: ServerFactory, recorder: Recorder) -> None:
    server = await make_server(ok, max_connections=2)
    first = await connect(server)
    second = await connect(server)
    # A completed exchange proves each connection is registered before the next one arrives.
    for reader, writer in (first, second):
        writer.write(GET)
        assert (await read_response(reader)).status == 200
    reader, writer = await connect(server)
    response = await read_response(reader)
    assert response.status == 503
    assert json.loads(response.body)["error"] == "service_unavailable"
    assert response.headers["connection"] == "close"
    assert await read_eof(reader) == b""
    assert recorder.rejects == [503]
    await close(writer)
    for _, w in (first, second):
        await close(w)


async def test_server_binds_an_existing_socket() -> None:
    from podidentity.http.settings import ServerSettings

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = HttpServer(ServerSettings(), ok)
    await server.start("ignored", 0, sock=sock)
    assert server.port == sock.getsockname()[1]
    assert server.serving
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    await close(writer)
    await server.shutdown(grace_s=0.5)
    assert not server.serving
