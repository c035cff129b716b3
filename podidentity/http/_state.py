"""Process-wide server state shared by every connection: what graceful shutdown iterates.

It also admits connections. Above ``max_connections_per_peer`` a caller is refused. At
``max_connections`` a newcomer is refused only when no room can be made fairly: otherwise the
oldest idle connection of the caller holding the most (more than the newcomer's caller) is shed, so
that idle connections hoarded by a few pods cannot lock out a pod that holds none.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from podidentity.http.handler import Handler, RejectHook, ResponseHook
from podidentity.http.response import SHUTTING_DOWN, TOO_MANY_CONNECTIONS, Response
from podidentity.http.settings import ServerSettings

if TYPE_CHECKING:
    from podidentity.http.protocol import HttpProtocol

# Request line and header block limits count field bytes; the raw backstop also allows for the
# method, version, ": " and CRLFs around them.
_HEAD_FRAMING_BYTES_PER_HEADER = 4
_HEAD_FRAMING_BYTES = 64
_INF = math.inf


class ServerState:
    __slots__ = (
        "all_closed",
        "connections",
        "connections_shed",
        "default_headers",
        "handler",
        "head_limit",
        "name",
        "on_reject",
        "on_response",
        "peak_connections",
        "per_peer",
        "settings",
        "shutting_down",
        "tasks",
    )

    def __init__(
        self,
        settings: ServerSettings,
        handler: Handler,
        *,
        name: str,
        default_headers: bytes,
        on_response: ResponseHook | None = None,
        on_reject: RejectHook | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.name = name
        self.on_response = on_response
        self.on_reject = on_reject
        self.connections: set[HttpProtocol] = set()
        self.per_peer: dict[str, list[HttpProtocol]] = {}
        """Open connections by peer address, oldest first: one pod must not take every slot on the
        node. Lists, not sets: most callers hold one or two connections (a set costs 216 bytes)."""
        self.connections_shed = 0
        """Idle connections closed at the global cap to admit a caller holding fewer."""
        self.peak_connections = 0
        """Most connections open at once since the server last gave memory back (see ``HttpServer``)."""
        self.tasks: set[asyncio.Future[Response]] = set()
        """Handlers in flight, across all connections."""
        self.default_headers = default_headers
        """``Server`` and ``Date`` lines, refreshed once per second by the server's tick."""
        self.shutting_down = False
        self.all_closed = asyncio.Event()
        """Set when the last connection closes during shutdown."""
        self.head_limit = (
            settings.max_request_line_bytes
            + settings.max_header_bytes
            + _HEAD_FRAMING_BYTES_PER_HEADER * settings.max_headers
            + _HEAD_FRAMING_BYTES
        )
        """Raw bytes an unfinished request head may reach before it is refused."""

    def admit(self, protocol: HttpProtocol, peer_ip: str) -> Response | None:
        """Register a new connection; return the refusal to send it, or None to serve it."""
        connections = self.connections
        connections.add(protocol)
        held = self.per_peer.get(peer_ip)
        if held is None:
            held = self.per_peer[peer_ip] = []
        held.append(protocol)
        open_now = len(connections)
        if open_now > self.peak_connections:
            self.peak_connections = open_now
        if len(held) > self.settings.max_connections_per_peer:
            return TOO_MANY_CONNECTIONS
        if open_now > self.settings.max_connections and not self._shed_for(held):
            return TOO_MANY_CONNECTIONS
        if self.shutting_down:
            # Accepted just before the listener closed; shutdown has already passed over it.
            return SHUTTING_DOWN
        return None

    def _shed_for(self, newcomer: list[HttpProtocol]) -> bool:
        """At the cap: close one idle connection of a bigger holder, biggest first. False if none."""
        # Runs only at the cap, so a scan of the callers is affordable; nothing is kept up to date
        # per request for it. The newcomer's own connection is already in ``newcomer``.
        newcomer_holds = len(newcomer) - 1
        bigger = [
            held for held in self.per_peer.values() if len(held) > newcomer_holds and held is not newcomer
        ]
        bigger.sort(key=len, reverse=True)
        for held in bigger:
            victim: HttpProtocol | None = None
            since = _INF
            for protocol in held:
                idle_since = protocol.idle_since()
                if idle_since < since:
                    victim, since = protocol, idle_since
            if victim is not None:
                self.connections_shed += 1
                victim.shed()
                return True
        return False

    def release(self, protocol: HttpProtocol, peer_ip: str) -> None:
        """Forget a connection: when it is lost, or earlier when it is shed. Idempotent."""
        self.connections.discard(protocol)
        held = self.per_peer.get(peer_ip)
        # At most max_connections_per_peer (and a few refused ones) long; a shed one is gone already.
        if held is not None and protocol in held:
            held.remove(protocol)
            if not held:
                del self.per_peer[peer_ip]
        if self.shutting_down and not self.connections:
            self.all_closed.set()

    def compact(self) -> None:
        """Rebuild the connection tables: a set keeps the size of its peak after entries leave."""
        self.connections = set(self.connections)
        self.per_peer = dict(self.per_peer)
        self.peak_connections = len(self.connections)
