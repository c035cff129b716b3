from __future__ import annotations

import pytest

from podidentity.http import STATUS_LINES, Response, imds_error, json_response, text_response
from podidentity.http.response import default_headers, render

DEFAULTS = b"server: nmi\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"


def test_status_lines_cover_100_to_599() -> None:
    assert STATUS_LINES[200] == b"HTTP/1.1 200 OK\r\n"
    assert STATUS_LINES[431] == b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    assert STATUS_LINES[599] == b"HTTP/1.1 599 \r\n"
    assert all(
        line.startswith(b"HTTP/1.1 %d " % code) for code, line in enumerate(STATUS_LINES) if code >= 100
    )


def test_render_sets_length_and_joins_headers() -> None:
    response = json_response(200, b'{"a":1}', [(b"x-trace", b"abc")])
    assert render(response, DEFAULTS, keep_alive=True, http10=False, head=False) == (
        b"HTTP/1.1 200 OK\r\n" + DEFAULTS + b"content-length: 7\r\n"
        b"content-type: application/json; charset=utf-8\r\nx-trace: abc\r\n\r\n"
        b'{"a":1}'
    )


def test_render_head_keeps_length_but_drops_body() -> None:
    data = render(text_response(200, "hello"), DEFAULTS, keep_alive=True, http10=False, head=True)
    assert data.endswith(b"content-length: 5\r\ncontent-type: text/plain; charset=utf-8\r\n\r\n")


def test_render_connection_header_follows_keep_alive_and_version() -> None:
    closing = render(Response(200), DEFAULTS, keep_alive=False, http10=False, head=False)
    assert b"connection: close\r\n" in closing
    http10 = render(Response(200), DEFAULTS, keep_alive=True, http10=True, head=False)
    assert b"connection: keep-alive\r\n" in http10
    http11 = render(Response(200), DEFAULTS, keep_alive=True, http10=False, head=False)
    assert b"connection:" not in http11


def test_render_no_content_has_neither_length_nor_body() -> None:
    data = render(Response(204, b"ignored"), DEFAULTS, keep_alive=True, http10=False, head=False)
    assert data == b"HTTP/1.1 204 No Content\r\n" + DEFAULTS + b"\r\n"


@pytest.mark.parametrize(
    "header",
    [
        (b"x-a", b"v\r\nset-cookie: evil=1"),
        (b"x-a", b"v\nx"),
        (b"x-a", b"v\x00"),
        (b"x-a\r\nx-b", b"v"),
        (b"bad name", b"v"),
        (b"", b"v"),
        (b"Content-Length", b"1"),
        (b"connection", b"keep-alive"),
    ],
)
def test_unsafe_headers_are_rejected_where_the_response_is_built(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        json_response(200, b"{}", [header])
    with pytest.raises(ValueError):
        text_response(200, "x", [header])
    with pytest.raises(ValueError):
        Response(200, b"", [header])


def test_header_values_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        Response(200, b"", [(b"x-a", "str")])  # type: ignore[list-item]


def test_status_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError):
        Response(600)
    with pytest.raises(ValueError):
        Response(99)


def test_imds_error_shape() -> None:
    response = imds_error(404, "invalid_request", "Identity not found", close=True)
    assert response.body == b'{"error":"invalid_request","error_description":"Identity not found"}'
    assert response.headers == ((b"content-type", b"application/json; charset=utf-8"),)
    assert response.close


def test_default_headers_carry_name_and_http_date() -> None:
    assert default_headers(b"nmi", 0.0) == b"server: nmi\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
