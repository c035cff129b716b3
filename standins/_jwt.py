"""JWT-shaped access tokens for the stand-ins: real structure, a signature nobody checks.

Clients of IMDS treat the token as opaque, but tools and humans decode its claims (``aud``,
``appid``, ``exp``), so the shape and claims follow Azure AD v1 access tokens. The HS256
signature uses a per-process random key: it makes every token distinct and unforgeable by
accident, not verifiable by anyone else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from typing import Any

_KEY = os.urandom(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(
    *,
    audience: str,
    client_id: str,
    object_id: str,
    tenant_id: str,
    issued_at: int,
    expires_at: int,
    resource_id: str = "",
) -> str:
    header = {"typ": "JWT", "alg": "HS256", "kid": "standin"}
    issuer = f"https://sts.windows.net/{tenant_id}/"
    claims: dict[str, Any] = {
        "aud": audience,
        "iss": issuer,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": expires_at,
        "appid": client_id,
        "appidacr": "2",
        "idp": issuer,
        "idtyp": "app",
        "oid": object_id,
        "sub": object_id,
        "tid": tenant_id,
        "uti": uuid.uuid4().hex[:22],
        "ver": "1.0",
    }
    if resource_id:
        claims["xms_mirid"] = resource_id
    signing_input = ".".join(
        _b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(_KEY, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a JWT-shaped token, unverified: for tests and demos."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT: expected three dot-separated parts")
    payload = json.loads(_unb64(parts[1]))
    if not isinstance(payload, dict):
        raise ValueError("not a JWT: the payload is not an object")
    return payload
