"""Process-wide server state shared by every connection: what graceful shutdown iterates."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from podidentity.http.handler import Handler, RejectHook, ResponseHook
from podidentity.http.response import Response
from podidentity.http.settings import ServerSettings

if TYPE_CHECKING:
    from podidentity.http.protocol import HttpProtocol

# Request line and header block limits count field bytes; the raw backstop also allows for the
# method, version, ": " and CRLFs around them.
_HEAD_FRAMING_BYTES_PER_HEADER = 4
_HEAD_FRAMING_BYTES = 64


class ServerState:
    __slots__ = (
        "all_closed",
        "connections",
        "default_headers",
        "handler",
        "head_limit",
        "name",
        "on_reject",
        "on_response",
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
        self.per_peer: dict[str, int] = {}
        """Open connections by peer address: one pod must not take every slot on the node."""
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

    def peer_opened(self, peer_ip: str) -> int:
        count = self.per_peer.get(peer_ip, 0) + 1
        self.per_peer[peer_ip] = count
        return count

    def peer_closed(self, peer_ip: str) -> None:
        count = self.per_peer.get(peer_ip, 0) - 1
        if count > 0:
            self.per_peer[peer_ip] = count
        else:
            self.per_peer.pop(peer_ip, None)

    def connection_lost(self, protocol: HttpProtocol) -> None:
        self.connections.discard(protocol)
        if self.shutting_down and not self.connections:
            self.all_closed.set()
