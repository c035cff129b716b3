from __future__ import annotations

import itertools

import pytest

from nmi.routing import Route, classify
from nmi.selectors import SELECTOR_KEYS, IdentityQuery, parse_token_query
from podidentity.errors import BadRequest

CID = "6F1C3E2A-52B4-4D0E-9A57-2B7C0D1E4F10"
RID = "/subscriptions/S/resourceGroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/Web"


def _spellings(key: str) -> list[str]:
    return sorted({key, key.upper(), key.title(), key[0].upper() + key[1:]})


@pytest.mark.parametrize(("key", "prop"), sorted(SELECTOR_KEYS.items()))
def test_every_key_in_any_case_names_an_identity(key: str, prop: str) -> None:
    value = CID if prop != "resource_id" else RID
    for spelled in _spellings(key):
        parsed = parse_token_query(f"resource=https://vault.azure.net&{spelled}={value}")
        assert parsed.identity == IdentityQuery(**{prop: value.casefold()}), spelled
        assert parsed.params["resource"] == "https://vault.azure.net"


def test_keys_the_sdks_send_are_all_known() -> None:
    assert set(SELECTOR_KEYS) == {
        "client_id",
        "msi_res_id",
        "mi_res_id",
        "resource_id",
        "object_id",
        "principal_id",
    }


@pytest.mark.parametrize(
    ("first", "second"),
    list(itertools.permutations(["msi_res_id", "mi_res_id", "resource_id", "MSI_RES_ID"], 2)),
)
def test_two_spellings_of_one_property_must_agree(first: str, second: str) -> None:
    same = parse_token_query(f"resource=r&{first}={RID}&{second}={RID.upper()}")
    assert same.identity == IdentityQuery(resource_id=RID.casefold())
    with pytest.raises(BadRequest):
        parse_token_query(f"resource=r&{first}={RID}&{second}={RID}x")


def test_repeated_key_with_another_value_is_refused() -> None:
    with pytest.raises(BadRequest):
        parse_token_query("resource=r&client_id=a&client_id=b")
    with pytest.raises(BadRequest):
        parse_token_query("resource=r&object_id=a&principal_id=b")


def test_empty_selector_names_nothing_and_percent_encoding_is_decoded() -> None:
    assert not parse_token_query("resource=r&client_id=").identity.named
    parsed = parse_token_query("resource=r&msi_res_id=%2Fsubscriptions%2Fs&cLiEnT_iD=AB%2Dcd")
    assert parsed.identity == IdentityQuery(client_id="ab-cd", resource_id="/subscriptions/s")


@pytest.mark.parametrize("query", ["resource=r&client_id=%zz", "resource=%", "resource=r%4"])
def test_broken_escapes_in_the_query_are_refused(query: str) -> None:
    with pytest.raises(BadRequest):
        parse_token_query(query)


@pytest.mark.parametrize("path", ["/%", "/metadata/%zz", "/metadata/instance%", "/metadata/%4g/x", "/%%"])
def test_broken_escapes_in_the_path_are_not_canonical(path: str) -> None:
    assert classify(path) is Route.NON_CANONICAL
