"""One HTTP/1.1 connection: httptools parsing, pipelining, flow control, limits and deadlines.

Parser callbacks only assemble requests into ``_pending``; ``_advance`` then answers them strictly
in order, one at a time. A handler that returns a ``Response`` is answered on the spot; one that
returns an awaitable runs as a task, and later requests wait in the queue behind it. Reading goes
on while a task runs so that a client leaving is noticed (and its task cancelled); it pauses only
when the queue is full or the transport asks us to stop writing.

A request is refused (400/408/413/414/431) by queueing the error behind the requests already
received, so answers stay in order; after it the connection is closed. Every close we start is a
lingering one: send FIN, keep reading (and discarding) until the client closes or a short deadline
passes, so the client reads our last answer instead of a reset.

Deadlines (idle, per-request receipt, linger) share one timer per connection. The timer is moved
only when a deadline becomes earlier than it; otherwise it fires, re-checks and re-arms itself, so
a busy keep-alive connection does not cancel and create a timer per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Awaitable, Coroutine
from typing import Final, cast

import httptools

from podidentity.http._state import ServerState
from podidentity.http.request import Request
from podidentity.http.response import (
    BAD_REQUEST,
    BODY_TOO_LARGE,
    HEADERS_TOO_LARGE,
    INTERNAL_ERROR,
    REQUEST_TIMEOUT,
    SHUTTING_DOWN,
    URI_TOO_LONG,
    Response,
    render,
)

logger = logging.getLogger(__name__)

_INF: Final = math.inf
_LINGER_S: Final = 2.0
"""Longest wait for the client's FIN after ours; shortened to the idle timeout when that is smaller."""
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# Decoding header names and methods allocates; the common ones are mapped once.
_KNOWN_HEADERS: Final[dict[bytes, str]] = {
    spelling: name
    for name in (
        "host",
        "user-agent",
        "accept",
        "accept-encoding",
        "connection",
        "content-length",
        "content-type",
        "transfer-encoding",
        "expect",
        "metadata",
        "podname",
        "podns",
        "x-identity-header",
        "x-ms-client-request-id",
        "x-ms-return-client-request-id",
        "traceparent",
    )
    for spelling in (name.encode(), name.title().encode(), name.upper().encode())
}
_METHODS: Final[dict[bytes, str]] = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
}


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the answer is in ``HttpProtocol._refusal``."""


_PIPELINE_OVERFLOW: Final = Response(503)
"""Marker refusal: more pipelined requests than allowed arrived in one read."""


_NO_HEADERS: Final[dict[str, str]] = {}
"""Headers of a connection before its first request; never written to (on_message_begin makes a dict)."""


def _new_parser(protocol: HttpProtocol) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(protocol)
    if hasattr(parser, "set_dangerous_leniencies"):
        # Bytes after a "Connection: close" request are parsed (and then dropped) rather than
        # failing the parser before the first answer is written.
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


async def _await(awaitable: Awaitable[Response]) -> Response:
    return await awaitable


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_body",
        "_body_len",
        "_closing",
        "_error_tail",
        "_gone",
        "_head_raw",
        "_header_bytes_left",
        "_headers",
        "_headers_left",
        "_idle_deadline",
        "_in_head",
        "_in_message",
        "_local_ip",
        "_local_port",
        "_loop",
        "_messages",
        "_now",
        "_parser",
        "_peer_ip",
        "_peer_port",
        "_pending",
        "_pipeline_full",
        "_read_paused",
        "_refusal",
        "_request",
        "_request_deadline",
        "_settings",
        "_state",
        "_stopped",
        "_task",
        "_timer",
        "_timer_when",
        "_transport",
        "_url",
        "_write_paused",
    )

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._settings = state.settings
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        # Memory per open connection is what a flood of idle connections costs (docs/server-
        # behavior.md, "Memory"): what an idle connection does not need is made when first used.
        self._parser: httptools.HttpRequestParser | None = None
        """One per connection, made at its first byte and reused for every request on it."""
        self._peer_ip = ""
        self._peer_port = 0
        self._local_ip = ""
        self._local_port = 0

        # Request being received.
        self._in_message = False
        self._in_head = False
        self._messages = 0
        self._now = 0.0
        """Loop time at the start of the current ``data_received``, for the parser callbacks."""
        self._head_raw = 0
        self._url = b""
        self._headers: dict[str, str] = _NO_HEADERS
        # Counted down from the limits, so each header is checked without reading the settings.
        self._header_bytes_left = 0
        self._headers_left = 0
        self._body: list[bytes] | None = None
        self._body_len = 0
        self._request: Request | None = None
        self._refusal: Response | None = None

        # Requests received, in answer order. A list, not a deque: it holds at most max_pipelined
        # requests, and an empty deque allocates a 64-slot block (~600 bytes) per connection.
        self._pending: list[Request] = []
        self._active: Request | None = None
        self._task: asyncio.Future[Response] | None = None
        """The running handler: a named task, or the future the handler returned."""
        self._error_tail: tuple[Response, Request | None] | None = None
        self._pipeline_full = False

        self._stopped = False
        """No further requests are parsed; incoming bytes are discarded."""
        self._closing = False
        """Our FIN is sent (or about to be); waiting for the client's."""
        self._gone = False
        """``connection_lost`` ran."""
        self._read_paused = False
        self._write_paused = False

        self._idle_deadline = _INF
        self._request_deadline = _INF
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = _INF

    # ── transport callbacks ──

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        # Addresses are interned: a caller's connections share one string, not one each. TCP_NODELAY
        # is not set here: uvloop's and asyncio's TCP transports both set it themselves.
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer_ip, self._peer_port = sys.intern(peer[0]), peer[1]
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self._local_ip, self._local_port = sys.intern(local[0]), local[1]
        refusal = self._state.admit(self, self._peer_ip)
        if refusal is not None:
            self._send_error(refusal, None)
            return
        # Armed before the first byte, so a client that connects and stays silent is dropped too.
        self._idle_deadline = self._loop.time() + self._settings.idle_timeout_s
        self._schedule(self._idle_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._closing = True
        self._state.release(self, self._peer_ip)
        # The parser holds this protocol's bound callbacks: dropping it breaks the cycle, so the
        # connection is freed by reference counting now rather than by a later cycle collection.
        self._parser = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._error_tail = None
        if self._task is not None:
            # The client left: stop the work done on its behalf (e.g. waiting for the pod cache).
            self._task.cancel()

    def eof_received(self) -> bool | None:
        # A client half-close is treated as leaving, as Go's net/http does: in-flight work is
        # cancelled. Returning None lets the transport close itself.
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        # A peer that stops reading must not hold the connection forever.
        if self._idle_deadline == _INF:
            self._idle_deadline = self._loop.time() + self._settings.idle_timeout_s
            self._schedule(self._idle_deadline)
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._pending:
            self._idle_deadline = _INF
        self._update_reading()
        self._advance()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return  # Refused, upgrading or closing: nothing more is parsed.
        # Read once per read rather than in each callback: no handler runs while parsing, so the
        # callbacks of one read would all see this time anyway.
        self._now = self._loop.time()
        messages_before = self._messages
        was_between_messages = not self._in_message
        pending = self._pending
        parser = self._parser
        if parser is None:
            parser = self._parser = _new_parser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrades (e.g. curl's h2c offer) are declined by answering in HTTP/1.1 and closing:
            # what follows the head is no longer HTTP/1.1.
            self._stop_parsing()
        except httptools.HttpParserError as exc:
            refusal = self._refusal
            if refusal is _PIPELINE_OVERFLOW:
                self._stop_parsing()
            elif refusal is not None:
                self._refuse(refusal, self._request)
            else:
                if isinstance(exc.__context__, Exception):
                    logger.debug("request parse failed", exc_info=exc.__context__)
                self._refuse(BAD_REQUEST, self._request)
        else:
            if self._in_head:
                # httptools buffers a header internally until it ends, so the header limits alone
                # cannot bound an unfinished one; raw bytes do. A read that began this message after
                # the end of an earlier one is not counted: at most one read's worth of slack.
                began = self._messages - messages_before
                if began == 0:
                    self._head_raw += len(data)
                elif began == 1 and was_between_messages:
                    self._head_raw = len(data)
                if self._head_raw > self._state.head_limit:
                    self._refuse(HEADERS_TOO_LARGE, None)
        if len(pending) >= self._settings.max_pipelined and not self._pipeline_full:
            self._pipeline_full = True
            self._update_reading()
        self._advance()

    # ── parser callbacks ──

    def on_message_begin(self) -> None:
        settings = self._settings
        if len(self._pending) >= settings.max_pipelined:
            self._refusal = _PIPELINE_OVERFLOW
            raise _Refused
        self._messages += 1
        self._in_message = True
        self._in_head = True
        self._head_raw = 0
        self._url = b""
        self._headers = {}
        self._header_bytes_left = settings.max_header_bytes
        self._headers_left = settings.max_headers
        # ``_body`` is already None: on_message_complete takes it, and a message cut short stops
        # parsing for good, so no allocation is needed here.
        self._body_len = 0
        self._request = None
        self._idle_deadline = _INF
        deadline = self._request_deadline = self._now + settings.request_timeout_s
        # _schedule's own early return, inlined: on a busy connection the timer almost always
        # fires first, and this runs once per request.
        if self._timer is None or deadline < self._timer_when:
            self._schedule(deadline)

    def on_url(self, fragment: bytes) -> None:
        # Concatenation is cheap here: the URL almost always arrives in one piece, and b"" + x is x.
        url = self._url = self._url + fragment
        if len(url) > self._settings.max_request_line_bytes:
            self._refusal = URI_TOO_LONG
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        bytes_left = self._header_bytes_left = self._header_bytes_left - len(name) - len(value)
        headers_left = self._headers_left = self._headers_left - 1
        if bytes_left < 0 or headers_left < 0:
            self._refusal = HEADERS_TOO_LARGE
            raise _Refused
        headers = self._headers
        key = _KNOWN_HEADERS.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in headers:
            headers[key] += ", " + text
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        assert parser is not None  # Parser callbacks run only inside feed_data.
        method_bytes = parser.get_method()
        method = _METHODS.get(method_bytes)
        if method is None:
            method = method_bytes.decode("ascii")
        headers = self._headers
        keep_alive = parser.should_keep_alive()
        if keep_alive and "connection" not in headers and "proxy-connection" not in headers:
            # llhttp keeps a connection alive without a Connection (or Proxy-Connection) header only
            # for a minor version above 0, and it rejects every version but 0.9, 1.0, 1.1 and 2.0:
            # this is HTTP/1.1. get_http_version() formats a new string each call, a sizeable share
            # of the per-request cost, so it is left for the other cases.
            http_version = "1.1"
        else:
            http_version = parser.get_http_version()
            if http_version != "1.0" and http_version != "1.1":
                # llhttp takes a request line without a version as HTTP/0.9 and still parses the
                # lines after it as headers; 2.0 cannot arrive as text. Neither is a request to serve.
                self._refusal = BAD_REQUEST
                raise _Refused
        url = self._url
        if url.startswith(b"/") and b"#" not in url:
            path, _, query = url.partition(b"?")
        else:
            # Absolute-form targets, fragments: rare enough to take the full parser.
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._refusal = BAD_REQUEST
                raise _Refused from None
            path = parsed.path or b"/"
            query = parsed.query or b""
        request = Request(
            method,
            path.decode("latin-1"),
            query.decode("latin-1"),
            headers,
            http_version,
            keep_alive,
            self._peer_ip,
            self._peer_port,
            self._local_ip,
            self._local_port,
            self._now,
        )
        self._request = request
        length = headers.get("content-length")
        if length is not None and int(length) > self._settings.max_body_bytes:
            # Refused before the body is read: with Expect: 100-continue it is never sent.
            self._refusal = BODY_TOO_LARGE
            raise _Refused
        if (
            "expect" in headers
            and length != "0"
            and headers["expect"].lower() == "100-continue"
            and self._active is None
            and not self._pending
            and not self._write_paused
            and self._transport is not None
        ):
            # Only when nothing is owed to the client yet; otherwise it would interleave answers.
            self._transport.write(_CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        self._body_len += len(chunk)
        if self._body_len > self._settings.max_body_bytes:
            self._refusal = BODY_TOO_LARGE
            raise _Refused
        if self._body is None:
            self._body = [chunk]
        else:
            self._body.append(chunk)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._request_deadline = _INF
        request = self._request
        assert request is not None
        self._request = None
        if self._body is not None:
            request.body = b"".join(self._body)
            self._body = None
        self._pending.append(request)

    # ── answering ──

    def _advance(self) -> None:
        """Answer what can be answered now, in order; then decide whether the connection is idle."""
        pending = self._pending
        while not self._closing and self._active is None and not self._write_paused:
            if pending:
                request = pending.pop(0)
                if self._pipeline_full and len(pending) <= self._settings.max_pipelined // 2:
                    self._pipeline_full = False
                    self._update_reading()
                self._dispatch(request)
                continue
            if self._error_tail is not None:
                refusal, refused = self._error_tail
                self._error_tail = None
                self._send_error(refusal, refused)
                return
            if self._stopped:
                self._close_lingering()
                return
            if not self._in_message and self._idle_deadline == _INF:
                deadline = self._idle_deadline = self._loop.time() + self._settings.idle_timeout_s
                # _schedule's early return, inlined: this runs after every keep-alive answer.
                if self._timer is None or deadline < self._timer_when:
                    self._schedule(deadline)
            return

    def _dispatch(self, request: Request) -> None:
        self._active = request
        try:
            result = self._state.handler(request)
        except Exception:
            logger.exception("request handler failed: %s %r", request.method, request.raw_path)
            self._respond(request, INTERNAL_ERROR)
            return
        if isinstance(result, Response):
            self._respond(request, result)
            return
        task: asyncio.Future[Response]
        if isinstance(result, Coroutine):
            task = self._loop.create_task(result, name=self._task_name())
        elif isinstance(result, asyncio.Future):
            task = result  # Tracked as is, so cancelling it reaches whoever will resolve it.
        else:
            task = self._loop.create_task(_await(result), name=self._task_name())
        self._task = task
        self._state.tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _task_name(self) -> str:
        # Built per task rather than per connection: only requests that need I/O run as tasks.
        return f"{self._state.name}-request-{self._peer_ip}:{self._peer_port}"

    def _on_task_done(self, task: asyncio.Future[Response]) -> None:
        self._state.tasks.discard(task)
        if task is self._task:
            self._task = None
        request = self._active
        if self._gone or request is None:
            return  # The client left; nobody to answer.
        if task.cancelled():
            response = SHUTTING_DOWN if self._state.shutting_down else INTERNAL_ERROR
        else:
            exc = task.exception()
            if exc is not None:
                logger.error("request handler failed: %s %r", request.method, request.raw_path, exc_info=exc)
                response = INTERNAL_ERROR
            else:
                response = task.result()
                if not isinstance(response, Response):
                    logger.error("request handler returned %r, not a Response", type(response))
                    response = INTERNAL_ERROR
        self._respond(request, response)
        self._advance()

    def _respond(self, request: Request, response: Response) -> None:
        self._active = None
        # After this answer the connection closes if anyone asked for it, or if nothing more will
        # be parsed and nothing is left to answer.
        keep_alive = (
            request.keep_alive
            and not response.close
            and not self._state.shutting_down
            and not (self._stopped and not self._pending and self._error_tail is None)
        )
        self._write(request, response, keep_alive)
        if not keep_alive:
            self._close_lingering()

    def _send_error(self, response: Response, request: Request | None) -> None:
        """Answer a request the server refused, then close."""
        self._write(request, response, False)
        self._close_lingering()

    def _write(self, request: Request | None, response: Response, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or self._closing or transport.is_closing():
            return
        state = self._state
        defaults = state.default_headers
        if request is None:
            data = render(response, defaults, keep_alive=False, http10=False, head=False)
        elif (
            keep_alive
            and response._wire_defaults is defaults
            and request.method != "HEAD"
            and request.http_version != "1.0"
        ):
            # render()'s cached keep-alive rendering, read here to spare a keyword-argument call
            # on the path nearly every answer takes.
            data = response._wire
        else:
            data = render(
                response,
                defaults,
                keep_alive=keep_alive,
                http10=request.http_version == "1.0",
                head=request.method == "HEAD",
            )
        transport.write(data)
        try:
            if request is not None:
                if state.on_response is not None:
                    state.on_response(request, response, self._loop.time() - request.received_at)
            elif state.on_reject is not None:
                state.on_reject(response.status)
        except Exception:
            logger.exception("response hook failed")

    # ── closing ──

    def _stop_parsing(self) -> None:
        self._stopped = True
        self._in_message = False
        self._in_head = False
        self._request_deadline = _INF

    def _refuse(self, response: Response, request: Request | None) -> None:
        """Queue an error answer behind what is already owed, and parse nothing more."""
        self._stop_parsing()
        self._error_tail = (response, request)

    def _close_lingering(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_parsing()
        self._pending.clear()
        self._error_tail = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                transport.abort()
                return
        else:
            transport.close()
            return
        self._update_reading()
        linger_s = min(_LINGER_S, self._settings.idle_timeout_s)
        self._idle_deadline = self._loop.time() + linger_s
        self._schedule(self._idle_deadline)

    def _close_now(self) -> None:
        transport = self._transport
        if transport is None or self._gone:
            return
        self._closing = True
        self._stop_parsing()
        if transport.get_write_buffer_size():
            transport.abort()  # The peer is not reading; flushing could take forever.
        else:
            transport.close()

    def shutdown(self) -> None:
        """Server shutdown: close at once if idle, else close after the answer in progress."""
        if self._gone or self._closing:
            return
        if self._active is None and not self._pending and not self._in_message and self._error_tail is None:
            self._close_now()
        # Busy connections see ``state.shutting_down`` and close after their current answer.

    def idle_since(self) -> float:
        """When this connection became idle (loop time), or infinity if it is not idle.

        Idle: no request being received, running, queued or refused, nothing left to write, not
        closing. Only such a connection may be shed; its client can retry on another connection
        as it would after an idle timeout.
        """
        if (
            self._closing
            or self._active is not None
            or self._pending
            or self._in_message
            or self._error_tail is not None
            or self._write_paused
            or self._transport is None
            or self._transport.get_write_buffer_size()
        ):
            return _INF
        # The idle deadline is armed when the connection becomes idle, always idle_timeout_s ahead.
        return self._idle_deadline - self._settings.idle_timeout_s

    def shed(self) -> None:
        """Close an idle connection at once to make room at the global cap (``ServerState.admit``)."""
        # Forgotten now, not at connection_lost: a newcomer in the same loop iteration counts the
        # room as made and the caller's count as lowered.
        self._state.release(self, self._peer_ip)
        self._close_now()

    def abort(self) -> None:
        """Server shutdown, grace period over."""
        if self._transport is not None and not self._gone:
            self._closing = True
            if self._transport.get_write_buffer_size():
                self._transport.abort()
            else:
                self._transport.close()

    # ── flow control and deadlines ──

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        # While closing we keep reading, to see the client's FIN and discard what it still sends.
        pause = not self._closing and (self._pipeline_full or self._write_paused)
        if pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _schedule(self, deadline: float) -> None:
        if self._timer is not None:
            if self._timer_when <= deadline:
                return  # Fires first; _on_timer re-arms for this one.
            self._timer.cancel()
        self._timer_when = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = _INF
        if self._gone:
            return
        now = self._loop.time()
        if self._request_deadline <= now:
            # Slowloris: bytes may keep trickling in, but the request had its time.
            self._request_deadline = _INF
            self._refuse(REQUEST_TIMEOUT, self._request)
            self._advance()
        elif self._idle_deadline <= now:
            self._idle_deadline = _INF
            self._close_now()
            return
        following = min(self._request_deadline, self._idle_deadline)
        if following != _INF:
            self._schedule(following)
