from __future__ import annotations

import pytest

from iptables.savefile import SaveFormatError, parse_save, parse_table
from tests.iptables.samples import DNAT, LEGACY_SAVE, NFT_SAVE


def test_parses_nft_output_keeping_rule_text_verbatim() -> None:
    nat = parse_table(NFT_SAVE, "nat")
    assert list(nat.chains)[:4] == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
    assert nat.chains["PREROUTING"].policy == "ACCEPT"
    assert nat.chains["aad-metadata"].policy == "-"
    assert nat.rules("PREROUTING") == [
        "-j aad-metadata",
        '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    ]
    assert nat.rules("aad-metadata") == [DNAT, "-j RETURN"]
    assert nat.rules("KUBE-NODEPORTS") == []


def test_parses_legacy_output_with_several_tables_and_counters() -> None:
    tables = parse_save(LEGACY_SAVE)
    assert set(tables) == {"filter", "nat"}
    assert tables["nat"].rules("PREROUTING")[1] == "-j aad-metadata"
    assert tables["filter"].rules("KUBE-FIREWALL")[0].startswith("! -s 127.0.0.0/8")


def test_empty_output_is_an_empty_table() -> None:
    # iptables-nft-save prints nothing for a table that was never used.
    assert parse_table("", "nat").chains == {}
    assert parse_table("# Warning: iptables-legacy tables present\n", "nat").rules("PREROUTING") == []


@pytest.mark.parametrize(
    "text",
    [
        "-A PREROUTING -j RETURN\n",
        "*nat\n:PREROUTING ACCEPT [0:0]\n",
        "*nat\n-A NOPE -j RETURN\nCOMMIT\n",
        "*nat\n:PREROUTING ACCEPT [0:0]\n-I PREROUTING 1 -j RETURN\nCOMMIT\n",
        "*nat\n*filter\nCOMMIT\n",
        "*nat\n:X\nCOMMIT\n",
    ],
)
def test_malformed_output_raises_instead_of_reading_as_empty(text: str) -> None:
    with pytest.raises(SaveFormatError):
        parse_save(text)
