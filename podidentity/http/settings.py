"""Limits and deadlines of the HTTP server (docs/server-behavior.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen_address: str = "127.0.0.1"
    """Bind address of the token listener (``--nmi-listen-address``)."""
    port: int = 2579
    """``--nmi-port``; also the DNAT target port."""
    max_connections: int = 4096
    """Open connections above this are closed at once: a node has at most a few hundred pods."""
    max_connections_per_peer: int = 256
    """One caller (a pod's address) above this gets 503: it cannot take every slot on the node."""
    max_request_line_bytes: int = 8190
    """Longer request lines get 414 (aiohttp's limit)."""
    max_header_bytes: int = 16384
    """A larger header block gets 431."""
    max_headers: int = 128
    max_body_bytes: int = 8 * 1024
    """IMDS requests are GETs without bodies; this bounds what queued requests can buffer. Larger gets 413."""
    idle_timeout_s: float = 30.0
    """A connection with no request in progress is closed after this long, also before its first byte."""
    request_timeout_s: float = 10.0
    """Absolute deadline to receive one whole request once its first byte arrived (slowloris)."""
    graceful_timeout_s: float = 10.0
    """On SIGTERM, in-flight requests get this long to finish."""
    max_pipelined: int = 16
    """Queued pipelined requests per connection before reading pauses."""
    backlog: int = 2048
    memory_trim_peak: int = 1024
    """After this many connections were open at once, the server gives freed memory back to the
    operating system once they drop to a quarter (glibc ``malloc_trim``); 0 never does."""
