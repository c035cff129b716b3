"""Refresh timing, servability and cache keys: pure functions, tested by value."""

from __future__ import annotations

import dataclasses
import random

import pytest

from nmi.tokens.policy import CacheKey, cache_key, refresh_at, servable
from podidentity.model import AzureIdentity, IdentityType, SecretRef
from podidentity.tokens import Token, TokenRequest

T0 = 1_700_000_000.0


def token(lifetime: float, *, obtained: float = T0) -> Token:
    return Token(
        access_token="x",
        resource="https://vault.azure.net",
        token_type="Bearer",
        client_id="c",
        expires_on=obtained + lifetime,
        not_before=obtained,
        obtained_at=obtained,
    )


IDENT = AzureIdentity(
    namespace="team-a",
    name="reader",
    type=IdentityType.USER_ASSIGNED_MSI,
    client_id="AAAA-1111",
    resource_id="/subscriptions/S/resourceGroups/RG/providers/x/ID",
    tenant_id="tenant-1",
    resource_version="10",
)


def key(
    identity: AzureIdentity | None = IDENT, resource: str = "https://vault.azure.net", **kw: str
) -> CacheKey:
    return cache_key(TokenRequest(identity=identity, resource=resource, api_version="2018-02-01", **kw))


# --- refresh_at ---------------------------------------------------------------------------------


def test_long_token_refreshes_at_half_life() -> None:
    # 24 h: half-life (12 h) comes well before "5 min before expiry".
    assert refresh_at(token(86_400), margin_s=300, jitter_fraction=0.1, rand=0.0) == T0 + 43_200


def test_short_token_refreshes_margin_before_expiry() -> None:
    # 10 min token, 400 s margin: expiry - margin (200 s) comes before half-life (300 s).
    assert refresh_at(token(600), margin_s=400, jitter_fraction=0.1, rand=0.0) == T0 + 200


def test_refresh_never_before_obtained_even_when_margin_exceeds_lifetime() -> None:
    assert refresh_at(token(120), margin_s=300, jitter_fraction=0.1, rand=0.99) == T0
    assert refresh_at(token(0), margin_s=0, jitter_fraction=0.5, rand=0.5) == T0


def test_negative_lifetime_never_moves_refresh_later() -> None:
    expired = dataclasses.replace(token(10), expires_on=T0 - 100)
    assert refresh_at(expired, margin_s=0, jitter_fraction=0.5, rand=0.9) == T0


def test_jitter_moves_refresh_earlier_by_the_documented_fraction() -> None:
    tok = token(3600)
    base = refresh_at(tok, margin_s=300, jitter_fraction=0.1, rand=0.0)
    assert base == T0 + 1800
    assert refresh_at(tok, margin_s=300, jitter_fraction=0.1, rand=0.5) == pytest.approx(base - 180)
    assert refresh_at(tok, margin_s=300, jitter_fraction=0.0, rand=0.9) == base


def test_jitter_bounds_hold_for_many_draws() -> None:
    rng = random.Random(1234)
    for _ in range(5000):
        lifetime = rng.uniform(0, 100_000)
        margin = rng.uniform(0, 1000)
        fraction = rng.uniform(0, 0.5)
        obtained = T0 + rng.uniform(-1e6, 1e6)
        tok = token(lifetime, obtained=obtained)
        base = min(obtained + lifetime / 2, obtained + lifetime - margin)
        r1, r2 = sorted((rng.random(), rng.random()))
        at1 = refresh_at(tok, margin_s=margin, jitter_fraction=fraction, rand=r1)
        at2 = refresh_at(tok, margin_s=margin, jitter_fraction=fraction, rand=r2)
        for at in (at1, at2):
            assert obtained <= at <= max(obtained, base) + 1e-6
            assert at >= base - fraction * lifetime - 1e-6
            assert at < tok.expires_on or lifetime == 0
        assert at2 <= at1 + 1e-6, "a larger draw never refreshes later"


# --- servable -----------------------------------------------------------------------------------


def test_servable_until_safety_window_before_expiry() -> None:
    tok = token(3600)
    assert servable(tok, T0, 60)
    assert servable(tok, T0 + 3539.9, 60)
    assert not servable(tok, T0 + 3540, 60)
    assert not servable(tok, T0 + 4000, 60)
    assert not servable(token(30), T0, 60), "a token shorter than the safety window is never served"


# --- cache keys ---------------------------------------------------------------------------------


def test_same_identity_content_shares_a_key_across_resource_versions() -> None:
    assert key(dataclasses.replace(IDENT, resource_version="11")) == key()
    assert hash(key(dataclasses.replace(IDENT, resource_version="11"))) == hash(key())


def test_client_and_resource_id_case_does_not_split_keys() -> None:
    upper = dataclasses.replace(IDENT, client_id="aaaa-1111", resource_id=IDENT.resource_id.upper())
    assert key(upper) == key()


@pytest.mark.parametrize(
    "change",
    [
        {"client_id": "BBBB-2222"},
        {"resource_id": "/subscriptions/S/other"},
        {"tenant_id": "tenant-2"},
        {"type": IdentityType.SERVICE_PRINCIPAL},
        {"ad_endpoint": "https://login.example.test/"},
        {"auxiliary_tenant_ids": ("t-3",)},
        {"client_password": SecretRef("team-a", "other-secret")},
        {"namespace": "team-b"},
        {"name": "writer"},
    ],
)
def test_changed_identity_content_gets_a_new_key(change: dict[str, object]) -> None:
    changed = dataclasses.replace(IDENT, **change)  # type: ignore[arg-type]
    assert key(changed) != key()


def test_resource_is_kept_as_given_trailing_slash_included() -> None:
    assert key(resource="https://vault.azure.net/") != key(resource="https://vault.azure.net")
    assert key(resource="https://management.azure.com/") != key()


def test_node_identity_keyed_by_requested_ids_casefolded() -> None:
    node = key(None, client_id="AbC", resource_id="")
    assert node == key(None, client_id="abc")
    assert node != key(None, client_id="abd")
    assert node != key(None, client_id="abc", resource_id="/x")
    assert node.identity.kind == "node"


def test_node_key_never_equals_an_identity_key_with_the_same_client_id() -> None:
    assert key(None, client_id=IDENT.client_id, resource_id=IDENT.resource_id) != key()
