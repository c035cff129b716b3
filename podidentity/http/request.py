"""One parsed HTTP request, as handed to the handler."""

from __future__ import annotations


class Request:
    """A fully received request.

    ``raw_path`` and ``query`` are exactly as sent (no percent-decoding), so routing can reject
    odd spellings instead of normalising them. Header names are lower-cased; repeated headers are
    joined with ``", "``.
    """

    __slots__ = (
        "body",
        "headers",
        "http_version",
        "keep_alive",
        "local_ip",
        "local_port",
        "method",
        "peer_ip",
        "peer_port",
        "query",
        "raw_path",
        "received_at",
    )

    def __init__(
        self,
        method: str,
        raw_path: str,
        query: str,
        headers: dict[str, str],
        http_version: str,
        keep_alive: bool,
        peer_ip: str,
        peer_port: int,
        local_ip: str,
        local_port: int,
        received_at: float,
        body: bytes = b"",
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.local_ip = local_ip
        self.local_port = local_port
        self.received_at = received_at
        self.body = body

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_path} from {self.peer_ip}:{self.peer_port}>"
