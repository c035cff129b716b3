"""Errors from the Kubernetes API, with the status, reason and Retry-After the watch loop acts on."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("podidentity.kube")


# --- errors ---------------------------------------------------------------------------------


class KubeError(Exception):
    """Any failure talking to the API server."""


class KubeApiError(KubeError):
    """The API server answered with a non-success status (or a watch ERROR event)."""

    def __init__(self, status: int, reason: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def gone(self) -> bool:
        """The resourceVersion or continue token is too old: the caller must list again."""
        return self.status == 410


class KubeUnavailable(KubeError):
    """No usable answer: connection refused or reset, timeout, malformed or truncated body."""


class WatchStalled(KubeUnavailable):
    """A watch stream stayed silent longer than the inactivity timeout."""


def api_error_from_status(
    status: int, body: Mapping[str, Any] | None, retry_after: float | None
) -> KubeApiError:
    """Build the error from a ``Status`` object when the server sent one, else from the HTTP code."""
    reason = ""
    message = ""
    if isinstance(body, Mapping):
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")
        code = body.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and code >= 400:
            status = code
    return KubeApiError(status, reason or _REASONS.get(status, "Error"), message, retry_after=retry_after)


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def retry_after_of(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # An HTTP-date: the API server never sends one; fall back to our backoff.
