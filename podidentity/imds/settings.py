"""Where IMDS is and how hard a node may ask it for tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    metadata_ip: str = "169.254.169.254"
    metadata_port: int = 80
    api_version: str = "2018-02-01"
    """Used when the caller names none."""
    max_concurrent: int = 5
    """Azure documents 5 concurrent identity requests per VM."""
    max_concurrent_per_pod: int = 2
    """Cold fetches one pod may have queued for that budget at once; its others wait their turn."""
    rate_per_s: float = 15.0
    """Azure documents 20 identity requests/s per VM; stay under it."""
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 10.0
    """Cap for one upstream attempt; the caller's own deadline may shorten it."""
    retry_backoff_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    """Waits between attempts on 410/429/5xx/transport errors; its length bounds the attempts."""
    proxy_timeout_s: float = 10.0
    """Total time for one proxied (non-token) IMDS request."""
    custom_user_agent: str = ""
    """Appended to NMI's user agent on upstream calls (``--custom-user-agent``)."""
    aad_ca_bundle: str | None = None
    """CA bundle for Azure AD (private clouds, the test stand-in); ``None`` uses the system store."""
