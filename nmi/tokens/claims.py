"""Claims read from an access token NMI already holds, without verifying it (it came from IMDS or
Azure AD over a trusted channel; only the object id is read, to name identities by ``object_id``)."""

from __future__ import annotations

import base64
import binascii
import json


def object_id(access_token: str) -> str:
    """The ``oid`` claim, case-folded; ``""`` when the token is not a JWT or carries none."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return ""
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return ""
    oid = claims.get("oid") if isinstance(claims, dict) else None
    return oid.casefold() if isinstance(oid, str) else ""
