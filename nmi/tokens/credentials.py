"""Service-principal credentials from a Kubernetes secret: pure parsing, no I/O (nmi-spec §3.5).

Two shapes, chosen by ``AzureIdentity.spec.type``:

* type 1 (``SERVICE_PRINCIPAL``): the client secret, under key ``clientSecret``. For compatibility with the
  original, which took "the first key" of the secret, a secret with exactly one key is accepted whatever the
  key's name. Several keys and none named ``clientSecret`` is refused with the key names listed: the original
  picked one at random (Go map order, nmi-spec §9.15), which breaks on every other restart.
* type 2 (``SERVICE_PRINCIPAL_CERTIFICATE``): a PKCS#12 blob under ``certificate`` and its password under
  ``password`` (absent or empty means none). Unlike the original, chains are accepted (the leaf is the
  certificate whose public key matches the private key, the rest is kept as the chain) and EC keys work.

Errors name the secret and its keys, never a value: their text reaches clients and logs.

The fingerprint identifies the secret material so a rotation can be detected without keeping the material
around for comparison. It is a keyed BLAKE2b with a per-process random key: stable within a process, which
is all rotation detection needs, and useless for guessing a low-entropy secret should it ever be logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs12

from podidentity.model import AzureIdentity, IdentityType, Secret, SecretRef

CLIENT_SECRET_KEY = "clientSecret"
CERTIFICATE_KEY = "certificate"
PASSWORD_KEY = "password"

KeyType = Literal["RSA", "EC"]

# Per process: fingerprints only need to be comparable within one NMI process (see module docstring).
_FINGERPRINT_KEY = os.urandom(32)

# ECDSA curve -> (JWS algorithm, hash, coordinate size in bytes), RFC 7518 §3.4.
_EC_ALGORITHMS: dict[str, tuple[str, hashes.HashAlgorithm, int]] = {
    "secp256r1": ("ES256", hashes.SHA256(), 32),
    "secp384r1": ("ES384", hashes.SHA384(), 48),
    "secp521r1": ("ES512", hashes.SHA512(), 66),
}


class CredentialError(ValueError):
    """The secret cannot give a credential. The message names keys, never values."""


class SecretNamespaceError(CredentialError):
    """The identity names a secret outside its own namespace and that is not allowed."""


@dataclass(frozen=True, slots=True)
class ClientSecretCredential:
    secret: str = field(repr=False)
    fingerprint: str


@dataclass(frozen=True, slots=True)
class CertificateCredential:
    private_key_pem: str = field(repr=False)
    """PKCS#8, unencrypted: it only ever lives in this process's memory."""
    certificate_pem: str
    """The leaf: the certificate whose public key matches the private key."""
    thumbprint_sha1: str
    """Hex, lower case; the ``x5t`` header."""
    thumbprint_sha256: str
    """Hex, lower case; the ``x5t#S256`` header."""
    chain_pems: tuple[str, ...]
    """The other certificates of the PKCS#12, issuer order when it can be worked out."""
    key_type: KeyType
    algorithm: str
    """The JWS algorithm of a client assertion signed by this key: PS256 for RSA, ES256/384/512 for EC."""
    fingerprint: str


Credential = ClientSecretCredential | CertificateCredential


def check_secret_namespace(identity: AzureIdentity, allow_cross_namespace: bool) -> SecretRef:
    """The identity's secret reference, refused if it points outside the identity's namespace.

    The original let ``clientPassword.namespace`` name any namespace (nmi-spec §9.2): whoever may create an
    AzureIdentity could then make NMI read any secret in the cluster. Off by default, opt-in by setting.
    """
    ref = identity.client_password
    if ref is None:
        raise CredentialError(
            f"AzureIdentity {identity.namespace}/{identity.name}: spec.clientPassword is required "
            f"for identity type {int(identity.type)}"
        )
    if ref.namespace != identity.namespace and not allow_cross_namespace:
        raise SecretNamespaceError(
            f"AzureIdentity {identity.namespace}/{identity.name}: secret {ref.namespace}/{ref.name} is "
            f"outside the identity's namespace; cross-namespace secrets are disabled"
        )
    return ref


def credential_fingerprint(identity: AzureIdentity, secret: Secret) -> str:
    """Identifies the material ``load_credential`` would use; cheap enough for every token fetch."""
    digest = hashlib.blake2b(key=_FINGERPRINT_KEY, digest_size=16)
    digest.update(int(identity.type).to_bytes(1, "big"))
    if identity.type == IdentityType.SERVICE_PRINCIPAL:
        _key, value = _select_client_secret(secret)
        digest.update(value)
    elif identity.type == IdentityType.SERVICE_PRINCIPAL_CERTIFICATE:
        pfx, password = _select_certificate(secret)
        # Length-prefixed so that no (pfx, password) pair can collide with another.
        digest.update(len(pfx).to_bytes(8, "big"))
        digest.update(pfx)
        digest.update(password)
    else:
        raise CredentialError(_unsupported(identity))
    return digest.hexdigest()


def load_credential(identity: AzureIdentity, secret: Secret) -> Credential:
    """Parse the secret into a credential for ``identity``. CPU-bound for certificates: not for the loop."""
    fingerprint = credential_fingerprint(identity, secret)
    if identity.type == IdentityType.SERVICE_PRINCIPAL:
        key, value = _select_client_secret(secret)
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise CredentialError(f"secret {_where(secret)}: key {key!r} is not UTF-8 text") from None
        # `echo secret | base64` adds a newline; Azure-issued client secrets never end with one.
        text = text.rstrip("\r\n")
        if not text:
            raise CredentialError(f"secret {_where(secret)}: key {key!r} is empty")
        return ClientSecretCredential(secret=text, fingerprint=fingerprint)
    pfx, password = _select_certificate(secret)
    return _load_pkcs12(pfx, password, fingerprint, _where(secret))


def sign_client_assertion(
    credential: CertificateCredential,
    *,
    audience: str,
    client_id: str,
    now: float | None = None,
    lifetime_s: int = 600,
) -> str:
    """A signed JWT client assertion (RFC 7523 with Azure AD's ``x5t``/``x5t#S256``/``x5c`` headers).

    PS256 for RSA keys (what Azure AD documents, and what MSAL itself sends), ES256/384/512 for EC keys,
    which MSAL cannot sign.
    """
    issued = int(time.time() if now is None else now)
    header = {
        "alg": credential.algorithm,
        "typ": "JWT",
        "x5t": _b64url(bytes.fromhex(credential.thumbprint_sha1)),
        "x5t#S256": _b64url(bytes.fromhex(credential.thumbprint_sha256)),
        "x5c": [_pem_body(credential.certificate_pem)],
    }
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime_s,
    }
    signing_input = _b64url(_json(header)) + "." + _b64url(_json(claims))
    key = _load_private_key(credential.private_key_pem)
    signature = _sign(key, signing_input.encode("ascii"))
    return signing_input + "." + _b64url(signature)


def _where(secret: Secret) -> str:
    return f"{secret.namespace}/{secret.name}"


def _unsupported(identity: AzureIdentity) -> str:
    return f"unsupported identity type {int(identity.type)} for a service-principal credential"


def _key_list(data: Mapping[str, bytes]) -> str:
    return ", ".join(sorted(data)) or "none"


def _select_client_secret(secret: Secret) -> tuple[str, bytes]:
    data = secret.data
    if CLIENT_SECRET_KEY in data:
        return CLIENT_SECRET_KEY, data[CLIENT_SECRET_KEY]
    if len(data) == 1:
        ((key, value),) = data.items()
        return key, value
    if not data:
        raise CredentialError(f"secret {_where(secret)} has no data; expected key {CLIENT_SECRET_KEY!r}")
    raise CredentialError(
        f"secret {_where(secret)} has several keys ({_key_list(data)}) and none is {CLIENT_SECRET_KEY!r}; "
        f"refusing to guess which holds the client secret"
    )


def _select_certificate(secret: Secret) -> tuple[bytes, bytes]:
    data = secret.data
    pfx = data.get(CERTIFICATE_KEY)
    if not pfx:
        raise CredentialError(
            f"secret {_where(secret)}: key {CERTIFICATE_KEY!r} (a PKCS#12 blob) is missing or empty; "
            f"keys present: {_key_list(data)}"
        )
    return pfx, data.get(PASSWORD_KEY, b"")


def _password_candidates(password: bytes) -> list[bytes | None]:
    candidates: list[bytes | None] = [password]
    stripped = password.rstrip(b"\r\n")
    if stripped != password:
        candidates.append(stripped)  # A password written with `echo` carries a newline.
    if not stripped:
        candidates.append(None)  # Some tools treat "no password" and "" differently.
    return candidates


def _load_pkcs12(pfx: bytes, password: bytes, fingerprint: str, where: str) -> CertificateCredential:
    loaded = None
    for candidate in _password_candidates(password):
        try:
            loaded = pkcs12.load_key_and_certificates(pfx, candidate)
            break
        except ValueError:
            continue
        except UnsupportedAlgorithm:
            raise CredentialError(f"secret {where}: the PKCS#12 uses an unsupported algorithm") from None
    if loaded is None:
        raise CredentialError(
            f"secret {where}: key {CERTIFICATE_KEY!r} is not a PKCS#12 blob that key {PASSWORD_KEY!r} opens "
            f"(a value that is base64 text was encoded twice)"
        )
    key, cert, extra = loaded
    if key is None:
        raise CredentialError(f"secret {where}: the PKCS#12 holds no private key")
    key_type: KeyType
    if isinstance(key, rsa.RSAPrivateKey):
        key_type, algorithm = "RSA", "PS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_ALGORITHMS:
            raise CredentialError(f"secret {where}: EC curve {key.curve.name} is not supported")
        key_type, algorithm = "EC", _EC_ALGORITHMS[key.curve.name][0]
    else:
        raise CredentialError(f"secret {where}: private key type {type(key).__name__} is not RSA or EC")
    certs = ([cert] if cert is not None else []) + list(extra)
    public = _spki(key.public_key())
    leaves = [c for c in certs if _spki(c.public_key()) == public]
    if not leaves:
        raise CredentialError(f"secret {where}: no certificate in the PKCS#12 matches its private key")
    leaf = leaves[0]
    others: list[x509.Certificate] = []
    for c in certs:
        if c != leaf and c not in others:
            others.append(c)
    chain = _issuer_order(leaf, others)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    return CertificateCredential(
        private_key_pem=key_pem,
        certificate_pem=_cert_pem(leaf),
        thumbprint_sha1=leaf.fingerprint(hashes.SHA1()).hex(),  # x5t is SHA-1 by definition
        thumbprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        chain_pems=tuple(_cert_pem(c) for c in chain),
        key_type=key_type,
        algorithm=algorithm,
        fingerprint=fingerprint,
    )


def _issuer_order(leaf: x509.Certificate, others: list[x509.Certificate]) -> list[x509.Certificate]:
    """Leaf's issuer first, then its issuer, ...; certificates off that path keep their order at the end."""
    ordered: list[x509.Certificate] = []
    remaining = list(others)
    current = leaf
    while True:
        parent = next((c for c in remaining if c.subject == current.issuer), None)
        if parent is None or current.subject == current.issuer:
            break
        ordered.append(parent)
        remaining.remove(parent)
        current = parent
    return ordered + remaining


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _pem_body(pem: str) -> str:
    return "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))


def _load_private_key(pem: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    # The key was validated when its PKCS#12 was decoded. Validating an RSA key again costs ~40 ms of CPU
    # with the GIL held (primality checks), which would stall the event loop from a worker thread.
    key = serialization.load_pem_private_key(
        pem.encode("ascii"), password=None, unsafe_skip_rsa_key_validation=True
    )
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


def _sign(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        # PS256 with the salt as long as the hash, as PyJWT and Azure AD use.
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return key.sign(data, pss, hashes.SHA256())
    _alg, digest, size = _EC_ALGORITHMS[key.curve.name]
    # JWS wants the raw r||s pair, not the DER sequence cryptography returns (RFC 7518 §3.4).
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
