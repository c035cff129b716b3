"""When a cached token is refreshed, when it may still be served, and which requests share one.

Pure functions over ``Token`` and ``TokenRequest``: no clock, no randomness, no I/O. The cache
passes the current time and a random draw in, so every decision here is testable by value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from podidentity.model import AzureIdentity, SecretRef
from podidentity.tokens import Token, TokenRequest

NODE_KIND = "node"
IDENTITY_KIND = "identity"


def refresh_at(token: Token, *, margin_s: float, jitter_fraction: float, rand: float) -> float:
    """Epoch seconds at which ``token`` should be replaced in the background.

    The earlier of half its lifetime and ``margin_s`` before expiry, moved earlier by up to
    ``jitter_fraction`` of the lifetime (``rand`` in [0, 1)) so tokens fetched together (a
    deployment's pods starting at once) are not all refreshed in the same instant. Never before
    the token was obtained.
    """
    lifetime = max(0.0, token.lifetime_s)
    base = min(token.obtained_at + lifetime / 2, token.expires_on - margin_s)
    return max(token.obtained_at, base - rand * jitter_fraction * lifetime)


def servable(token: Token, now: float, safety_s: float) -> bool:
    """Whether ``token`` may still be handed out at ``now``.

    The safety window covers clock skew and the time the client needs to use the token: a
    token expiring within it is worth less than the wait for a fresh one.
    """
    return now < token.expires_on - safety_s


@dataclass(frozen=True, slots=True)
class IdentityKey:
    """Everything about the identity that decides which token upstream returns.

    Built from the identity's content, not its ``resource_version``: an unrelated edit keeps
    the cached tokens, but an edited client ID, tenant, type, authority or secret reference
    makes a new key, so the old identity's token is never served for the new one.
    """

    kind: str
    namespace: str
    name: str
    type: int
    client_id: str
    resource_id: str
    tenant_id: str = ""
    ad_endpoint: str = ""
    auxiliary_tenant_ids: tuple[str, ...] = ()
    secret: SecretRef | None = None


@dataclass(frozen=True, slots=True)
class CacheKey:
    identity: IdentityKey
    resource: str
    """As the caller sent it: IMDS treats ``https://vault.azure.net`` and
    ``https://vault.azure.net/`` as different audiences, so they are not merged."""
    tenant: str = ""
    """An auxiliary tenant's tokens are other tokens."""
    subject: str = ""
    """A federated identity's tokens are per service account (``namespace/name``): Azure AD checks
    the subject against the federated credential, so each service account's exchange is its own."""


def cache_key(request: TokenRequest) -> CacheKey:
    identity = request.identity
    if identity is None:
        return CacheKey(_node_key(request.client_id, request.resource_id), request.resource)
    if request.tenant_id:
        return CacheKey(_identity_key(identity), request.resource, request.tenant_id.casefold())
    if request.service_account:
        return CacheKey(_identity_key(identity), request.resource, subject=request.service_account)
    return CacheKey(_identity_key(identity), request.resource)


# Memoised so the serve path builds no IdentityKey, and the CacheKey comparison on a hit meets
# the same IdentityKey object (identity compares before field compares). Identities are frozen
# and few; the bound only matters for a cluster that churns identity objects.
@lru_cache(maxsize=4096)
def _identity_key(identity: AzureIdentity) -> IdentityKey:
    return IdentityKey(
        kind=IDENTITY_KIND,
        namespace=identity.namespace,
        name=identity.name,
        type=int(identity.type),
        client_id=identity.client_id_folded,
        resource_id=identity.resource_id_folded,
        tenant_id=identity.tenant_id.casefold(),
        ad_endpoint=identity.ad_endpoint,
        auxiliary_tenant_ids=tuple(t.casefold() for t in identity.auxiliary_tenant_ids),
        secret=identity.client_password,
    )


@lru_cache(maxsize=1024)
def _node_key(client_id: str, resource_id: str) -> IdentityKey:
    return IdentityKey(NODE_KIND, "", "", -1, client_id.casefold(), resource_id.casefold())
