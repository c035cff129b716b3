"""The listener: binds, owns the shared state and the once-a-second tick, and shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import Final, cast

from podidentity.http._state import ServerState
from podidentity.http.handler import Handler, RejectHook, ResponseHook
from podidentity.http.protocol import HttpProtocol
from podidentity.http.response import default_headers
from podidentity.http.settings import ServerSettings

logger = logging.getLogger(__name__)

_CANCEL_WAIT_S: Final = 1.0
"""How long cancelled handlers get to unwind before their connections are closed anyway."""
_CLOSE_WAIT_S: Final = 1.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


def release_memory(state: ServerState) -> float:
    """Shrink the connection tables and return freed heap pages to the OS; the seconds it took.

    After a flood, closed connections' memory is free but still resident: the connection sets keep
    their peak size, and glibc keeps freed chunks below the top of its heaps. ``malloc_trim(0)``
    (a documented, thread-safe glibc call) releases whole free pages anywhere in the heaps.
    CPython's own arenas need no help: an arena is unmapped once every object in it is freed.
    """
    started = time.perf_counter()
    state.compact()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return time.perf_counter() - started


class HttpServer:
    """HTTP/1.1 server for one handler.

    >>> server = HttpServer(settings.server, router.handle, on_response=metrics_hook)
    >>> await server.start(settings.server.listen_address, settings.server.port)
    >>> ...
    >>> await server.shutdown()
    """

    def __init__(
        self,
        settings: ServerSettings,
        handler: Handler,
        *,
        name: str = "nmi",
        loop: asyncio.AbstractEventLoop | None = None,
        on_response: ResponseHook | None = None,
        on_reject: RejectHook | None = None,
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._name = name
        self._server_header = name.encode("ascii")
        self._loop = loop
        self._on_response = on_response
        self._on_reject = on_reject
        self._state: ServerState | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._shutdown: asyncio.Future[None] | None = None
        self.port = 0
        """The bound port, known after ``start`` (useful with port 0)."""

    @property
    def connections(self) -> int:
        return 0 if self._state is None else len(self._state.connections)

    @property
    def connections_shed(self) -> int:
        """Idle connections closed at the connection cap to admit a caller holding fewer."""
        return 0 if self._state is None else self._state.connections_shed

    @property
    def serving(self) -> bool:
        return (
            self._server is not None
            and self._server.is_serving()
            and self._state is not None
            and not self._state.shutting_down
        )

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> None:
        if self._state is not None:
            raise RuntimeError("server already started")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        state = ServerState(
            self._settings,
            self._handler,
            name=self._name,
            default_headers=default_headers(self._server_header, time.time()),
            on_response=self._on_response,
            on_reject=self._on_reject,
        )
        self._state = state

        def factory() -> HttpProtocol:
            return HttpProtocol(state, loop)

        if sock is not None:
            server = await loop.create_server(factory, sock=sock, backlog=self._settings.backlog)
        else:
            server = await loop.create_server(
                factory, host, port, backlog=self._settings.backlog, reuse_address=True
            )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._tick()

    def _tick(self) -> None:
        assert self._loop is not None and self._state is not None
        now = time.time()
        state = self._state
        state.default_headers = default_headers(self._server_header, now)
        trim_peak = self._settings.memory_trim_peak
        peak = state.peak_connections
        if trim_peak and peak >= trim_peak and len(state.connections) * 4 <= peak:
            took = release_memory(state)
            logger.info(
                "connections down from %d to %d: returned freed memory in %.1f ms",
                peak,
                len(state.connections),
                took * 1000,
            )
        # Aligned to the wall-clock second so the Date header is never more than a tick stale.
        self._tick_handle = self._loop.call_later(1.0 - now % 1.0, self._tick)

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting, close idle connections, give in-flight requests ``grace_s``, then cancel."""
        if self._shutdown is not None:
            await asyncio.shield(self._shutdown)
            return
        state, server, loop = self._state, self._server, self._loop
        if state is None or server is None or loop is None:
            return
        self._shutdown = loop.create_future()
        try:
            await self._drain(
                state, server, loop, self._settings.graceful_timeout_s if grace_s is None else grace_s
            )
        finally:
            if self._tick_handle is not None:
                self._tick_handle.cancel()
                self._tick_handle = None
            self._shutdown.set_result(None)

    async def _drain(
        self,
        state: ServerState,
        server: asyncio.AbstractServer,
        loop: asyncio.AbstractEventLoop,
        grace_s: float,
    ) -> None:
        deadline = loop.time() + grace_s
        state.shutting_down = True
        server.close()
        for connection in list(state.connections):
            connection.shutdown()
        if state.tasks:
            await asyncio.wait(set(state.tasks), timeout=grace_s)
        remaining = deadline - loop.time()
        if state.connections and remaining > 0:
            # Answers are written; connections close once their clients have read them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.all_closed.wait(), remaining)
        if state.tasks:
            logger.warning("cancelling %d request(s) still running after %.1f s", len(state.tasks), grace_s)
            pending = set(state.tasks)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=_CANCEL_WAIT_S)
        for connection in list(state.connections):
            connection.abort()
        if state.connections:
            try:
                await asyncio.wait_for(state.all_closed.wait(), _CLOSE_WAIT_S)
            except TimeoutError:
                logger.warning("%d connection(s) did not close", len(state.connections))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), _CLOSE_WAIT_S)
