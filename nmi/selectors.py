"""The identity a token request names: every spelling the SDKs send, pure, so it is easy to test.

IMDS names a user-assigned identity by client id, by ARM resource id or by object id, and the
clients spell those keys in several ways (azure-identity sync ``msi_res_id``, its aio client
``resource_id``, msal ``mi_res_id``, App Service style ``principal_id``, and upper-case variants
from hand-written code). Every one of them names an identity here, keys matched without regard to
case: a key NMI failed to recognise would fall back to the pod's default identity, which is how a
request that named one identity could silently get another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_plus

from podidentity.errors import BadRequest

# key (case-folded) -> which property of the identity it names
SELECTOR_KEYS: dict[str, str] = {
    "client_id": "client_id",
    "msi_res_id": "resource_id",
    "mi_res_id": "resource_id",
    "resource_id": "resource_id",
    "object_id": "object_id",
    "principal_id": "object_id",
}
_BROKEN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def has_broken_escape(text: str) -> bool:
    """A ``%`` not followed by two hex digits: decoders disagree on what it means."""
    return "%" in text and _BROKEN_ESCAPE.search(text) is not None


@dataclass(frozen=True, slots=True)
class IdentityQuery:
    """The identity a request names, case-folded; all empty means "any"."""

    client_id: str = ""
    resource_id: str = ""
    object_id: str = ""

    @property
    def named(self) -> bool:
        return bool(self.client_id or self.resource_id or self.object_id)


ANY = IdentityQuery()


@dataclass(frozen=True, slots=True)
class TokenQuery:
    """A token request's query string, parsed once."""

    params: dict[str, str]
    """First value of each parameter, decoded; selector keys as sent."""
    identity: IdentityQuery


def parse_token_query(query: str) -> TokenQuery:
    """Parameters (first value wins) and the named identity; ``BadRequest`` for what is ambiguous.

    Two selectors of the same property with different values (``client_id=A&CLIENT_ID=B``,
    ``msi_res_id=X&resource_id=Y``) disagree with each other: that is refused, never resolved by
    picking one. Empty selector values name nothing, as the SDKs never send them.
    """
    params: dict[str, str] = {}
    named: dict[str, str] = {}
    if not query:
        return TokenQuery(params, ANY)
    if has_broken_escape(query):
        raise BadRequest("malformed percent-escape in the query string")
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if "%" in key or "+" in key:
            key = unquote_plus(key)
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        params.setdefault(key, value)
        prop = SELECTOR_KEYS.get(key.casefold())
        if prop is None or not value:
            continue
        folded = value.casefold()
        seen = named.setdefault(prop, folded)
        if seen != folded:
            raise BadRequest(f"the query names two different identities by {prop.replace('_', ' ')}")
    if not named:
        return TokenQuery(params, ANY)
    return TokenQuery(params, IdentityQuery(**named))
