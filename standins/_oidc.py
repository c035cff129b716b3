"""RS256 JWTs and JSON Web Keys, as an OpenID Connect issuer publishes and a relying party checks them.

Shared by the API server stand-in (which signs service-account tokens and serves its JWKS) and the
Azure AD stand-in (which verifies them as federated client assertions). Compact serialisation only.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def key_id(public: rsa.RSAPublicKey) -> str:
    """Kubernetes' key id: base64url (unpadded) of the SHA-256 of the PKIX DER public key."""
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b64url(hashlib.sha256(der).digest())


def jwk(public: rsa.RSAPublicKey, kid: str) -> dict[str, str]:
    """The public key as the API server's ``/openid/v1/jwks`` lists it."""
    numbers = public.public_numbers()
    return {
        "use": "sig",
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "n": _uint(numbers.n),
        "e": _uint(numbers.e),
    }


def public_key_from_jwk(key: dict[str, Any]) -> rsa.RSAPublicKey:
    """An RSA public key from a JWK; ``ValueError`` if it is not one."""
    if key.get("kty") != "RSA":
        raise ValueError("not an RSA key")
    n = int.from_bytes(b64url_decode(key["n"]), "big")
    e = int.from_bytes(b64url_decode(key["e"]), "big")
    return rsa.RSAPublicNumbers(e, n).public_key()


def sign_rs256(private: rsa.RSAPrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":"), sort_keys=True).encode()) for part in (header, claims)
    )
    signature = private.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Header, claims, signing input and signature of a compact JWT; ``ValueError`` if malformed."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWT")
    header = json.loads(b64url_decode(parts[0]))
    claims = json.loads(b64url_decode(parts[1]))
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("header and payload must be JSON objects")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), b64url_decode(parts[2])


def verify_rs256(public: rsa.RSAPublicKey, signing_input: bytes, signature: bytes) -> bool:
    try:
        public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
