"""Tuning of the Kubernetes client and watches; units are in the names."""

from __future__ import annotations

from dataclasses import dataclass

from podidentity import __version__

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class KubeSettings:
    qps: float = 5.0
    """Sustained requests/s to the API server, watches included (client-go's default)."""
    burst: int = 10
    """Requests allowed at once before ``qps`` applies: start-up needs one list and one watch per cache."""
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    """Deadline for one list page or GET, from sending the request to the last byte."""
    list_page_size: int = 500
    """``limit`` per list page (client-go's pager default)."""
    watch_timeout_s: float = 300.0
    """Server-side ``timeoutSeconds``; each watch picks a value in [t, 2t) so reconnects spread out."""
    inactivity_timeout_s: float = 120.0
    """A watch silent this long is treated as dead. The API server sends a bookmark about once a
    minute to watches that allow them, so this is two missed bookmarks."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    """Reconnect waits double from ``backoff_initial_s`` up to this, each jittered to [d/2, d)."""
    max_event_bytes: int = 16 * MiB
    """Longest watch line accepted; etcd caps objects near 1.5 MiB, so this is only a guard."""
    token_refresh_s: float = 60.0
    """Bearer-token files (service account tokens rotate) are re-read this often, like client-go."""
    secret_ttl_s: float = 30.0
    """A secret is read again after this long, so a rotated credential is used within it."""
    secret_max_stale_s: float = 300.0
    """If the API server fails, a cached secret younger than this is still served."""
    secret_cache_entries: int = 256
    user_agent: str = f"aad-pod-identity/{__version__}"
    """Each daemon names itself (``nmi/…``, ``aad-pod-identity/MIC/…``)."""
