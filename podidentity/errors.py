"""Errors that reach a client, each with its IMDS-style status, code and description.

Every error a token request can end with is one of these; the HTTP layer renders them as
``{"error": ..., "error_description": ...}`` and never adds upstream URLs or secrets.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error with a fixed HTTP mapping."""

    status: int = 500
    error: str = "internal_error"

    def __init__(self, description: str, *, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.retry_after = retry_after


class BadRequest(ServiceError):
    status = 400
    error = "invalid_request"


class Forbidden(ServiceError):
    """The caller may not have what it asked for (e.g. a blocked path)."""

    status = 403
    error = "forbidden"


class IdentityNotFound(ServiceError):
    """No identity the caller may use matches the request (nmi-spec §2.5: 404)."""

    status = 404
    error = "invalid_request"


class NoSuchIdentity(ServiceError):
    """The caller has no identity matching the request, and waiting would not change that.

    IMDS's own answer for an identity the VM does not have (400 ``invalid_request``, "Identity not
    found"): every SDK treats it as final, where a 404 is retried for half a minute.
    """

    status = 400
    error = "invalid_request"


class PodNotFound(ServiceError):
    """The caller's address belongs to no known pod on this node."""

    status = 404
    error = "invalid_request"


class AmbiguousPod(ServiceError):
    """Several live pods claim the caller's address: refuse rather than guess."""

    status = 500
    error = "ambiguous_caller"


class UpstreamRefused(ServiceError):
    """IMDS or Azure AD answered and refused (nmi-spec §3.5: 403)."""

    status = 403

    def __init__(
        self,
        error: str,
        description: str,
        *,
        upstream_status: int,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(description, retry_after=retry_after)
        self.error = error
        self.upstream_status = upstream_status


class UpstreamUnavailable(ServiceError):
    """IMDS or Azure AD could not be reached in time, or kept failing (503)."""

    status = 503
    error = "service_unavailable"


class ConfigError(Exception):
    """Invalid configuration or input file: reported clearly, never half-applied."""
