"""Secrets to service-principal credentials: key choice, namespaces, PKCS#12 chains, RSA and EC keys."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from nmi.tokens.credentials import (
    CertificateCredential,
    ClientSecretCredential,
    CredentialError,
    SecretNamespaceError,
    check_secret_namespace,
    credential_fingerprint,
    load_credential,
    sign_client_assertion,
)
from podidentity.model import AzureIdentity, IdentityType, Secret, SecretRef
from standins.aad import ClientCertificate, issue_client_certificate

SECRET_VALUE = "Sup3r~Secret.Value_123"
CERT = IdentityType.SERVICE_PRINCIPAL_CERTIFICATE


def sp(
    type_: IdentityType = IdentityType.SERVICE_PRINCIPAL, *, ns: str = "apps", secret_ns: str | None = None
):
    return AzureIdentity(
        namespace=ns,
        name="sp",
        type=type_,
        client_id="11111111-2222-3333-4444-555555555555",
        tenant_id="tenant",
        client_password=SecretRef(secret_ns or ns, "sp-secret"),
    )


def secret(**data: bytes) -> Secret:
    return Secret("apps", "sp-secret", data)


@pytest.fixture(scope="module")
def rsa_chain() -> ClientCertificate:
    return issue_client_certificate(key_type="RSA", password=b"p@ss", with_chain=True)


@pytest.fixture(scope="module")
def ec_scrambled() -> ClientCertificate:
    return issue_client_certificate(key_type="EC", with_chain=True, leaf_first=False)


# ----------------------------------------------------------------- type 1


def test_client_secret_key_is_preferred_over_other_keys() -> None:
    cred = load_credential(sp(), secret(clientSecret=SECRET_VALUE.encode(), other=b"x"))
    assert cred == ClientSecretCredential(secret=SECRET_VALUE, fingerprint=cred.fingerprint)


def test_a_single_key_of_any_name_is_used_for_compatibility() -> None:
    cred = load_credential(sp(), secret(password=SECRET_VALUE.encode()))
    assert isinstance(cred, ClientSecretCredential)
    assert cred.secret == SECRET_VALUE


def test_several_keys_without_client_secret_are_refused_listing_keys_not_values() -> None:
    with pytest.raises(CredentialError) as err:
        load_credential(sp(), secret(zeta=SECRET_VALUE.encode(), alpha=b"other-value"))
    message = str(err.value)
    assert "alpha, zeta" in message
    assert "clientSecret" in message
    assert SECRET_VALUE not in message and "other-value" not in message


def test_empty_secret_is_refused() -> None:
    with pytest.raises(CredentialError, match="no data"):
        load_credential(sp(), secret())
    with pytest.raises(CredentialError, match="empty"):
        load_credential(sp(), secret(clientSecret=b"\n"))


def test_trailing_newline_from_echo_is_dropped() -> None:
    cred = load_credential(sp(), secret(clientSecret=SECRET_VALUE.encode() + b"\n"))
    assert isinstance(cred, ClientSecretCredential)
    assert cred.secret == SECRET_VALUE


def test_non_utf8_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(CredentialError, match="not UTF-8") as err:
        load_credential(sp(), secret(clientSecret=b"\xff\xfe\x00secret"))
    assert "\\xff" not in str(err.value)


def test_secret_value_is_not_in_repr() -> None:
    cred = load_credential(sp(), secret(clientSecret=SECRET_VALUE.encode()))
    assert SECRET_VALUE not in repr(cred)


def test_unsupported_identity_type() -> None:
    with pytest.raises(CredentialError, match="unsupported identity type 0"):
        load_credential(sp(IdentityType.USER_ASSIGNED_MSI), secret(clientSecret=b"x"))


# ------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_the_material_in_use() -> None:
    one = credential_fingerprint(sp(), secret(clientSecret=b"a", note=b"1"))
    assert one == credential_fingerprint(sp(), secret(clientSecret=b"a", note=b"2"))  # Unused key: same.
    assert one != credential_fingerprint(sp(), secret(clientSecret=b"b", note=b"1"))


def test_certificate_fingerprint_covers_password(rsa_chain: ClientCertificate) -> None:
    ident = sp(CERT)
    one = credential_fingerprint(ident, secret(certificate=rsa_chain.pfx, password=b"a"))
    assert one == credential_fingerprint(ident, secret(certificate=rsa_chain.pfx, password=b"a"))
    assert one != credential_fingerprint(ident, secret(certificate=rsa_chain.pfx, password=b"b"))


# -------------------------------------------------------------- namespaces


def test_secret_in_own_namespace_is_allowed() -> None:
    assert check_secret_namespace(sp(), False) == SecretRef("apps", "sp-secret")


def test_cross_namespace_secret_is_refused_by_default() -> None:
    with pytest.raises(SecretNamespaceError, match="kube-system/sp-secret is outside"):
        check_secret_namespace(sp(secret_ns="kube-system"), False)


def test_cross_namespace_secret_allowed_when_enabled() -> None:
    assert check_secret_namespace(sp(secret_ns="kube-system"), True).namespace == "kube-system"


def test_missing_client_password_is_an_error() -> None:
    ident = AzureIdentity("apps", "sp", IdentityType.SERVICE_PRINCIPAL, "c")
    with pytest.raises(CredentialError, match="clientPassword is required"):
        check_secret_namespace(ident, True)


# ----------------------------------------------------------------- type 2


def test_rsa_pfx_with_chain(rsa_chain: ClientCertificate) -> None:
    cred = load_credential(sp(CERT), secret(certificate=rsa_chain.pfx, password=b"p@ss"))
    assert isinstance(cred, CertificateCredential)
    leaf = x509.load_pem_x509_certificate(cred.certificate_pem.encode())
    assert cred.certificate_pem == rsa_chain.leaf_pem
    assert cred.key_type == "RSA" and cred.algorithm == "PS256"
    assert cred.thumbprint_sha1 == leaf.fingerprint(hashes.SHA1()).hex()
    assert cred.thumbprint_sha256 == leaf.fingerprint(hashes.SHA256()).hex()
    # Chain in issuer order: the intermediate first, then the root.
    assert cred.chain_pems == rsa_chain.chain_pems
    names = [x509.load_pem_x509_certificate(p.encode()).subject.rfc4514_string() for p in cred.chain_pems]
    assert names == ["CN=nmi-service-principal intermediate", "CN=nmi-service-principal root"]
    assert "PRIVATE KEY" not in repr(cred)


def test_ec_leaf_is_found_by_its_key_not_its_position(ec_scrambled: ClientCertificate) -> None:
    cred = load_credential(sp(CERT), secret(certificate=ec_scrambled.pfx))
    assert isinstance(cred, CertificateCredential)
    assert cred.key_type == "EC" and cred.algorithm == "ES256"
    assert cred.certificate_pem == ec_scrambled.leaf_pem
    assert len(cred.chain_pems) == 2


def test_password_with_trailing_newline_is_accepted(rsa_chain: ClientCertificate) -> None:
    cred = load_credential(sp(CERT), secret(certificate=rsa_chain.pfx, password=b"p@ss\n"))
    assert isinstance(cred, CertificateCredential)


def test_wrong_password_is_refused_without_echoing_it(rsa_chain: ClientCertificate) -> None:
    with pytest.raises(CredentialError, match="not a PKCS#12 blob") as err:
        load_credential(sp(CERT), secret(certificate=rsa_chain.pfx, password=b"hunter2"))
    assert "hunter2" not in str(err.value)


def test_missing_certificate_key_lists_keys() -> None:
    with pytest.raises(CredentialError, match=r"keys present: clientSecret, password"):
        load_credential(sp(CERT), secret(clientSecret=b"x", password=b"y"))


def test_base64_text_instead_of_pfx_bytes_is_refused(rsa_chain: ClientCertificate) -> None:
    with pytest.raises(CredentialError, match="encoded twice"):
        load_credential(
            sp(CERT),
            secret(certificate=base64.b64encode(rsa_chain.pfx), password=b"p@ss"),
        )


def test_pfx_without_private_key_is_refused(rsa_chain: ClientCertificate) -> None:
    leaf = x509.load_pem_x509_certificate(rsa_chain.leaf_pem.encode())
    pfx = pkcs12.serialize_key_and_certificates(b"x", None, leaf, None, serialization.NoEncryption())
    with pytest.raises(CredentialError, match="no private key"):
        load_credential(sp(CERT), secret(certificate=pfx))


def test_pfx_whose_certificates_do_not_match_the_key_is_refused(rsa_chain: ClientCertificate) -> None:
    other = issue_client_certificate(key_type="EC", with_chain=False)
    key = serialization.load_pem_private_key(other.key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    certs = [x509.load_pem_x509_certificate(p.encode()) for p in rsa_chain.chain_pems]
    pfx = pkcs12.serialize_key_and_certificates(b"x", key, None, certs, serialization.NoEncryption())
    with pytest.raises(CredentialError, match="matches its private key"):
        load_credential(sp(CERT), secret(certificate=pfx))


def test_ed25519_key_is_refused_clearly() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )
    pfx = pkcs12.serialize_key_and_certificates(b"x", key, cert, None, serialization.NoEncryption())
    with pytest.raises(CredentialError, match="not RSA or EC"):
        load_credential(sp(CERT), secret(certificate=pfx))


# --------------------------------------------------------------- assertion


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _parts(assertion: str) -> tuple[dict[str, object], dict[str, object], bytes, bytes]:
    h, p, s = assertion.split(".")

    def dec(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    return json.loads(dec(h)), json.loads(dec(p)), dec(s), f"{h}.{p}".encode()


def test_ec_assertion_is_es256_signed_with_thumbprints(ec_scrambled: ClientCertificate) -> None:
    cred = load_credential(sp(CERT), secret(certificate=ec_scrambled.pfx))
    assert isinstance(cred, CertificateCredential)
    header, claims, sig, signed = _parts(
        sign_client_assertion(cred, audience="https://aad/t/oauth2/v2.0/token", client_id="cid", now=1000)
    )
    leaf = x509.load_pem_x509_certificate(cred.certificate_pem.encode())
    assert header["alg"] == "ES256"
    assert header["x5t"] == b64u(leaf.fingerprint(hashes.SHA1()))
    assert header["x5t#S256"] == b64u(leaf.fingerprint(hashes.SHA256()))
    assert claims["aud"] == "https://aad/t/oauth2/v2.0/token"
    assert claims["iss"] == claims["sub"] == "cid"
    assert claims["nbf"] == 1000 and claims["exp"] == 1600
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert len(sig) == 64  # Raw r||s, not DER.
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    public.verify(der, signed, ec.ECDSA(hashes.SHA256()))  # Raises if the signature is wrong.


def test_rsa_assertion_is_ps256(rsa_chain: ClientCertificate) -> None:
    cred = load_credential(sp(CERT), secret(certificate=rsa_chain.pfx, password=b"p@ss"))
    assert isinstance(cred, CertificateCredential)
    header, _claims, sig, signed = _parts(sign_client_assertion(cred, audience="a", client_id="c"))
    assert header["alg"] == "PS256"
    public = x509.load_pem_x509_certificate(cred.certificate_pem.encode()).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(
        sig, signed, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
