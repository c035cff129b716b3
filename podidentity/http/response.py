"""Responses and their wire form: prebuilt status lines, validated headers, one buffer per response."""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus

# Index by status code; codes without a registered phrase get an empty one, which RFC 9112 allows.
STATUS_LINES: tuple[bytes, ...] = tuple(
    b"HTTP/1.1 %d %s\r\n" % (code, HTTPStatus(code).phrase.encode("ascii"))
    if code in HTTPStatus._value2member_map_
    else b"HTTP/1.1 %d \r\n" % code
    for code in range(600)
)

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"
TEXT_CONTENT_TYPE = b"text/plain; charset=utf-8"
_JSON_HEADERS = ((b"content-type", JSON_CONTENT_TYPE),)
_TEXT_HEADERS = ((b"content-type", TEXT_CONTENT_TYPE),)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Visible ASCII, obs-text, space and tab: anything else (CR, LF, NUL) could split the response.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# Framing and connection management belong to the server; a handler setting them would corrupt the stream.
_RESERVED = frozenset({b"content-length", b"transfer-encoding", b"connection", b"date", b"server"})

_CRLF = b"\r\n"
_CONTENT_LENGTH_ZERO = b"content-length: 0\r\n"
_CONNECTION_CLOSE = b"connection: close\r\n"
_CONNECTION_KEEP_ALIVE = b"connection: keep-alive\r\n"


def validate_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """Return the headers as a tuple, or raise ``ValueError`` for any that could split the response."""
    checked = tuple(headers)
    for name, value in checked:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise TypeError(f"header names and values must be bytes: {name!r}: {value!r}")
        if _TOKEN.fullmatch(name) is None:
            raise ValueError(f"invalid header name {name!r}")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise ValueError(f"invalid value for header {name!r}")
        if name.lower() in _RESERVED:
            raise ValueError(f"header {name!r} is set by the server")
    return checked


class Response:
    """A complete response; the server adds framing, ``Server``, ``Date`` and ``Connection``.

    >>> Response(204)
    >>> Response(503, b'{"error":"busy"}', ((b"content-type", JSON_CONTENT_TYPE), (b"retry-after", b"20")))

    Headers are validated here, so an unsafe value fails where it is built, not on the wire.
    """

    __slots__ = ("_wire", "_wire_defaults", "body", "close", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Iterable[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        if not 100 <= status <= 599:
            raise ValueError(f"status out of range: {status}")
        self.status = status
        self.body = body
        self.headers = validate_headers(headers)
        self.close = close
        # The common keep-alive rendering, kept while the Server/Date lines are the same object:
        # a shared response (a cached token, a canned error) is then rendered once per second.
        self._wire = b""
        self._wire_defaults: bytes | None = None

    def __repr__(self) -> str:
        return f"Response({self.status}, {len(self.body)} bytes, close={self.close})"


def json_response(status: int, body: bytes, extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    return Response(status, body, (*_JSON_HEADERS, *extra_headers))


def text_response(
    status: int, body: str | bytes, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> Response:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return Response(status, data, (*_TEXT_HEADERS, *extra_headers))


def imds_error(status: int, error: str, description: str, *, close: bool = False) -> Response:
    """IMDS-shaped error body; callers pass fixed texts only, never request data."""
    body = b'{"error":"%s","error_description":"%s"}' % (error.encode("ascii"), description.encode("ascii"))
    response = json_response(status, body)
    response.close = close
    return response


# Server-generated answers, built once; the server closes the connection after each (except 500).
BAD_REQUEST = imds_error(400, "invalid_request", "malformed request", close=True)
REQUEST_TIMEOUT = imds_error(408, "invalid_request", "request not received in time", close=True)
BODY_TOO_LARGE = imds_error(413, "invalid_request", "request body too large", close=True)
URI_TOO_LONG = imds_error(414, "invalid_request", "request line too long", close=True)
HEADERS_TOO_LARGE = imds_error(431, "invalid_request", "request header fields too large", close=True)
INTERNAL_ERROR = imds_error(500, "internal_error", "internal error")
TOO_MANY_CONNECTIONS = imds_error(503, "service_unavailable", "too many connections", close=True)
SHUTTING_DOWN = imds_error(503, "service_unavailable", "server shutting down", close=True)


def default_headers(server_name: bytes, now: float) -> bytes:
    """The ``Server`` and ``Date`` lines shared by every response in one second."""
    return b"server: %s\r\ndate: %s\r\n" % (server_name, formatdate(now, usegmt=True).encode("ascii"))


def render(response: Response, defaults: bytes, *, keep_alive: bool, http10: bool, head: bool) -> bytes:
    """The whole response as one buffer, so it goes out in a single ``transport.write``."""
    if keep_alive and not http10 and not head:
        if response._wire_defaults is defaults:
            return response._wire
        data = _render(response, defaults, keep_alive=True, http10=False, head=False)
        response._wire = data
        response._wire_defaults = defaults
        return data
    return _render(response, defaults, keep_alive=keep_alive, http10=http10, head=head)


def _render(response: Response, defaults: bytes, *, keep_alive: bool, http10: bool, head: bool) -> bytes:
    status = response.status
    body = response.body
    parts = [STATUS_LINES[status], defaults]
    if status in (204, 304) or status < 200:
        # These carry no body by definition; 304 may not even imply the length of one.
        body = b""
    elif body:
        parts.append(b"content-length: %d\r\n" % len(body))
    else:
        parts.append(_CONTENT_LENGTH_ZERO)
    for name, value in response.headers:
        parts += (name, b": ", value, _CRLF)
    if not keep_alive:
        parts.append(_CONNECTION_CLOSE)
    elif http10:
        parts.append(_CONNECTION_KEEP_ALIVE)
    parts.append(_CRLF)
    if body and not head:
        parts.append(body)
    return b"".join(parts)
