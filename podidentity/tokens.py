"""What a token source returns and how it is rendered, IMDS-shaped, at serve time."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Protocol

from podidentity.model import AzureIdentity, Pod


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str
    resource: str
    token_type: str
    client_id: str
    expires_on: float
    """Epoch seconds."""
    not_before: float
    """Epoch seconds."""
    obtained_at: float
    """Epoch seconds when NMI received it; with ``expires_on`` gives the lifetime."""
    ext_expires_in: int | None = None

    @property
    def lifetime_s(self) -> float:
        return self.expires_on - self.obtained_at

    def render(self, now: float) -> bytes:
        """The IMDS body: every value a string, ``expires_in`` counted from ``now``."""
        body = {
            "access_token": self.access_token,
            "client_id": self.client_id,
            "expires_in": str(max(0, int(self.expires_on - now))),
            "expires_on": str(int(self.expires_on)),
            "ext_expires_in": str(
                self.ext_expires_in if self.ext_expires_in is not None else max(0, int(self.expires_on - now))
            ),
            "not_before": str(int(self.not_before)),
            "resource": self.resource,
            "token_type": self.token_type,
        }
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What the upstream is asked for on behalf of one identity."""

    identity: AzureIdentity | None
    """``None`` means the node's own (system-assigned) identity: exception pods only."""
    resource: str
    api_version: str
    client_id: str = ""
    """For pass-through without an identity object: the user-assigned identity asked for."""
    resource_id: str = ""
    tenant_id: str = ""
    """An auxiliary tenant of a service principal (the ``tenant_id`` query opt-in); empty for its own."""
    service_account: str = ""
    """Federated identities: ``namespace/name`` of the service account whose token is exchanged."""
    pod: Pod | None = field(default=None, compare=False)
    """Federated identities: the pod on whose behalf the service-account token is requested (bound
    to it); any pod of that service account will do, so it is not part of what the request is."""


class TokenSource(Protocol):
    """Gets a fresh token from IMDS or Azure AD. Raises ``UpstreamRefused`` / ``UpstreamUnavailable``.

    ``deadline`` is a ``loop.time()`` value; a source never retries or waits past it.
    """

    async def fetch(self, request: TokenRequest, *, deadline: float) -> Token: ...


def number(value: object) -> float | None:
    """A finite number from a token answer (IMDS sends strings, Azure AD v2 integers; no bools)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None
