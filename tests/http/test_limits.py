"""Oversized and malformed requests get an IMDS-style error and a closed connection."""

from __future__ import annotations

import asyncio
import json

import pytest

from podidentity.http import Request, Response
from tests.http.helpers import Recorder, ServerFactory, close, connect, ok, read_eof, read_response


async def expect_refusal(
    reader: asyncio.StreamReader, status: int, description: str, *, head: bool = False
) -> None:
    response = await read_response(reader, head=head)
    assert response.status == status
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["connection"] == "close"
    if not head:
        assert json.loads(response.body) == {"error": "invalid_request", "error_description": description}
    assert await read_eof(reader) == b""


async def test_long_request_line_gets_414(make_server: ServerFactory, recorder: Recorder) -> None:
    server = await make_server(ok, max_request_line_bytes=1000)
    reader, writer = await connect(server)
    writer.write(b"GET /" + b"a" * 1000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    await expect_refusal(reader, 414, "request line too long")
    assert recorder.rejects == [414]
    await close(writer)


async def test_long_request_line_is_refused_before_it_ends(make_server: ServerFactory) -> None:
    server = await make_server(ok, max_request_line_bytes=1000)
    reader, writer = await connect(server)
    writer.write(b"GET /" + b"a" * 1500)
    await expect_refusal(reader, 414, "request line too long")
    await close(writer)


async def test_large_header_block_gets_431(make_server: ServerFactory, recorder: Recorder) -> None:
    server = await make_server(ok, max_header_bytes=2048)
    reader, writer = await connect(server)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nCookie: " + b"c" * 2100 + b"\r\n\r\n")
    await expect_refusal(reader, 431, "request header fields too large")
    assert recorder.rejects == [431]
    await close(writer)


async def test_unfinished_huge_header_is_refused_without_waiting_for_its_end(
    make_server: ServerFactory,
) -> None:
    server = await make_server(ok, max_header_bytes=2048)
    reader, writer = await connect(server)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nCookie: ")
    await writer.drain()
    # httptools reports a header only once it ends; the raw byte bound must catch it meanwhile.
    writer.write(b"c" * 4096)
    await writer.drain()
    writer.write(b"c" * 20000)
    await expect_refusal(reader, 431, "request header fields too large")
    await close(writer)


async def test_too_many_headers_get_431(make_server: ServerFactory) -> None:
    server = await make_server(ok, max_headers=10)
    reader, writer = await connect(server)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(11))
    writer.write(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    await expect_refusal(reader, 431, "request header fields too large")
    await close(writer)


async def test_headers_at_the_limits_are_accepted(make_server: ServerFactory) -> None:
    server = await make_server(ok, max_headers=10, max_header_bytes=2048, max_request_line_bytes=1000)
    reader, writer = await connect(server)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(9)) + b"Cookie: " + b"c" * 1900 + b"\r\n"
    writer.write(b"GET /" + b"a" * 999 + b" HTTP/1.1\r\n" + headers + b"\r\n")
    assert (await read_response(reader)).status == 200
    await close(writer)


async def test_declared_body_over_the_limit_gets_413_before_it_is_sent(
    make_server: ServerFactory, recorder: Recorder
) -> None:
    server = await make_server(ok, max_body_bytes=1024)
    reader, writer = await connect(server)
    writer.write(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n")
    await expect_refusal(reader, 413, "request body too large")
    # A parsed request exists, so the refusal is reported with it.
    ((request, response, _),) = recorder.responses
    assert (request.raw_path, response.status) == ("/big", 413)
    await close(writer)


async def test_chunked_body_over_the_limit_gets_413(make_server: ServerFactory) -> None:
    server = await make_server(ok, max_body_bytes=1024)
    reader, writer = await connect(server)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n" + b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n")
    await expect_refusal(reader, 413, "request body too large")
    await close(writer)


async def test_chunked_body_within_the_limit_is_assembled(make_server: ServerFactory) -> None:
    server = await make_server(lambda request: Response(200, request.body), max_body_bytes=1024)
    reader, writer = await connect(server)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"
    )
    assert (await read_response(reader)).body == b"hello!"
    await close(writer)


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_malformed_request_gets_400(make_server: ServerFactory, recorder: Recorder, raw: bytes) -> None:
    server = await make_server(ok)
    reader, writer = await connect(server)
    writer.write(raw)
    await expect_refusal(reader, 400, "malformed request")
    await close(writer)


async def test_refusal_waits_for_answers_already_owed(make_server: ServerFactory) -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.05)
        return Response(200, b"first")

    server = await make_server(slow)
    reader, writer = await connect(server)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nNOT HTTP\r\n\r\n")
    first = await read_response(reader)
    assert (first.status, first.body, "connection" in first.headers) == (200, b"first", False)
    await expect_refusal(reader, 400, "malformed request")
    await close(writer)


async def test_head_refusal_has_no_body(make_server: ServerFactory) -> None:
    server = await make_server(ok, max_body_bytes=10)
    reader, writer = await connect(server)
    writer.write(b"HEAD / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    await expect_refusal(reader, 413, "", head=True)
    await close(writer)
