from __future__ import annotations

import pytest

from iptables.drift import Problem, detect, removal, render_install
from iptables.rules import HostNetworkInterception, RuleSpec
from iptables.savefile import Table, parse_table
from tests.iptables.samples import DNAT, LEGACY_SAVE, NFT_SAVE, apply_restore

SPEC = RuleSpec()
HOST_SPEC = RuleSpec(host_network=HostNetworkInterception(exempt_uids=(4242,)))


def installed() -> Table:
    return parse_table(NFT_SAVE, "nat")


def assert_fixes(table: Table, spec: RuleSpec = SPEC) -> Table:
    """The payload, applied, leaves nothing to fix and keeps every foreign rule."""
    drift = detect(table, spec)
    assert drift.payload is not None
    fixed = apply_restore(table, drift.payload)
    assert detect(fixed, spec).ok, detect(fixed, spec).describe()
    managed = set(spec.managed_chains())
    for chain in table.chains.values():
        if chain.name in managed:
            continue
        foreign = [r for r in chain.rules if not managed & set(r.split())]
        assert [r for r in fixed.rules(chain.name) if r not in {h.jump for h in spec.hooks()}] == foreign
    return fixed


def test_installed_rules_are_in_sync_with_either_backend_output() -> None:
    assert detect(installed(), SPEC).ok
    assert detect(installed(), SPEC).payload is None
    legacy = parse_table(LEGACY_SAVE, "nat")
    assert detect(legacy, SPEC).problems == {Problem.JUMP_NOT_FIRST}


def test_empty_table_gets_the_install_payload() -> None:
    drift = detect(Table("nat"), SPEC)
    assert drift.problems == {Problem.CHAIN_MISSING, Problem.JUMP_MISSING}
    assert drift.payload == render_install(SPEC)
    assert_fixes(Table("nat"))


def test_flushed_chain_is_redeclared_without_touching_the_jump() -> None:
    table = installed()
    table.chains["aad-metadata"].rules.clear()
    drift = detect(table, SPEC)
    assert drift.problems == {Problem.CHAIN_CONTENT}
    assert drift.payload == (
        f"*nat\n:aad-metadata - [0:0]\n-A aad-metadata {DNAT}\n-A aad-metadata -j RETURN\nCOMMIT\n"
    )
    assert_fixes(table)


def test_edited_rule_is_content_drift() -> None:
    table = installed()
    table.chains["aad-metadata"].rules[0] = DNAT.replace("2579", "2580")
    assert detect(table, SPEC).problems == {Problem.CHAIN_CONTENT}
    assert_fixes(table)


def test_missing_chain_and_jump() -> None:
    table = installed()
    del table.chains["aad-metadata"]
    table.chains["PREROUTING"].rules.remove("-j aad-metadata")
    assert detect(table, SPEC).problems == {Problem.CHAIN_MISSING, Problem.JUMP_MISSING}
    assert_fixes(table)


def test_missing_jump_is_inserted_first() -> None:
    table = installed()
    table.chains["PREROUTING"].rules.remove("-j aad-metadata")
    drift = detect(table, SPEC)
    assert drift.problems == {Problem.JUMP_MISSING}
    assert drift.payload == "*nat\n-I PREROUTING 1 -j aad-metadata\nCOMMIT\n"
    assert assert_fixes(table).rules("PREROUTING")[0] == "-j aad-metadata"


def test_jump_moved_below_another_rule_is_moved_back_atomically() -> None:
    table = installed()
    table.chains["PREROUTING"].rules.insert(0, "-s 10.9.9.9/32 -j RETURN")
    drift = detect(table, SPEC)
    assert drift.problems == {Problem.JUMP_NOT_FIRST}
    assert drift.findings[0].detail == "at position 2 of PREROUTING"
    assert drift.payload == ("*nat\n-D PREROUTING -j aad-metadata\n-I PREROUTING 1 -j aad-metadata\nCOMMIT\n")
    fixed = assert_fixes(table)
    assert fixed.rules("PREROUTING")[:2] == ["-j aad-metadata", "-s 10.9.9.9/32 -j RETURN"]


def test_duplicate_jumps_are_collapsed_to_one() -> None:
    table = installed()
    table.chains["PREROUTING"].rules.append("-j aad-metadata")
    table.chains["PREROUTING"].rules.append("-i eth0 -j aad-metadata")
    table.chains["OUTPUT"].rules.append("-g aad-metadata")
    drift = detect(table, SPEC)
    assert drift.problems == {Problem.DUPLICATE_JUMPS}
    fixed = assert_fixes(table)
    jumps = [r for c in fixed.chains.values() for r in c.rules if "aad-metadata" in r.split()]
    assert jumps == ["-j aad-metadata"]


def test_only_a_conditional_jump_counts_as_missing_and_is_replaced() -> None:
    table = installed()
    table.chains["PREROUTING"].rules[0] = "-i eth0 -j aad-metadata"
    assert detect(table, SPEC).problems == {Problem.JUMP_MISSING, Problem.DUPLICATE_JUMPS}
    assert assert_fixes(table).rules("PREROUTING")[0] == "-j aad-metadata"


def test_comment_mentioning_the_chain_is_not_a_jump() -> None:
    table = installed()
    table.chains["PREROUTING"].rules.append('-m comment --comment "-j aad-metadata" -j RETURN')
    assert detect(table, SPEC).ok


def test_rule_appended_after_return_is_drift() -> None:
    """Unlike the original, which tolerated it: the chain is ours and must match exactly."""
    table = installed()
    table.chains["aad-metadata"].rules.append("-s 10.0.0.1/32 -j ACCEPT")
    drift = detect(table, SPEC)
    assert drift.problems == {Problem.CHAIN_CONTENT}
    assert drift.findings[0].detail == "3 rules, expected 2"
    assert assert_fixes(table).rules("aad-metadata") == [DNAT, "-j RETURN"]


def test_jump_inside_our_own_chain_is_removed_by_the_flush_alone() -> None:
    table = installed()
    table.chains["aad-metadata"].rules.insert(0, "-j aad-metadata")
    drift = detect(table, SPEC)
    assert drift.problems == {Problem.CHAIN_CONTENT, Problem.DUPLICATE_JUMPS}
    assert drift.payload is not None and "-D aad-metadata" not in drift.payload
    assert_fixes(table)


def test_fixing_is_idempotent() -> None:
    table = installed()
    table.chains["PREROUTING"].rules.reverse()
    table.chains["aad-metadata"].rules.clear()
    fixed = assert_fixes(table)
    assert detect(fixed, SPEC).payload is None
    assert apply_restore(fixed, render_install(SPEC)).rules("PREROUTING").count("-j aad-metadata") == 2, (
        "render_install is only for empty tables; detect() is what keeps installs idempotent"
    )


def test_host_network_chain_is_installed_and_checked_like_the_main_one() -> None:
    fixed = assert_fixes(installed(), HOST_SPEC)
    assert fixed.rules("OUTPUT")[0] == "-j aad-metadata-output"
    fixed.chains["OUTPUT"].rules.insert(0, "-j RETURN")
    fixed.chains["aad-metadata-output"].rules.pop(0)
    assert detect(fixed, HOST_SPEC).problems == {Problem.CHAIN_CONTENT, Problem.JUMP_NOT_FIRST}
    assert_fixes(fixed, HOST_SPEC)


def test_opting_out_of_host_network_removes_the_stale_chain() -> None:
    with_output = assert_fixes(installed(), HOST_SPEC)
    drift = detect(with_output, SPEC)
    assert drift.problems == {Problem.STALE_CHAIN}
    assert drift.payload == (
        "*nat\n-D OUTPUT -j aad-metadata-output\n-F aad-metadata-output\n-X aad-metadata-output\nCOMMIT\n"
    )
    fixed = assert_fixes(with_output)
    assert "aad-metadata-output" not in fixed.chains


def test_removal_deletes_exactly_our_jumps_and_chains() -> None:
    table = assert_fixes(installed(), HOST_SPEC)
    table.chains["PREROUTING"].rules.append("-j aad-metadata")
    payload = removal(table, HOST_SPEC)
    assert payload is not None
    removed = apply_restore(table, payload)
    assert "aad-metadata" not in removed.chains and "aad-metadata-output" not in removed.chains
    original = installed()
    for name, chain in removed.chains.items():
        assert chain.rules == [r for r in original.rules(name) if r != "-j aad-metadata"]
    assert removal(removed, HOST_SPEC) is None


@pytest.mark.parametrize("spec", [SPEC, HOST_SPEC])
def test_removal_from_an_empty_table_is_nothing(spec: RuleSpec) -> None:
    assert removal(Table("nat"), spec) is None


ANTI = RuleSpec(anti_spoofing=True)
RAW_SAVE = """\
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:aad-metadata-spoof - [0:0]
-A PREROUTING -j aad-metadata-spoof
-A PREROUTING -j CT --notrack
-A aad-metadata-spoof -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m rpfilter --invert -j DROP
COMMIT
"""


def test_anti_spoofing_installs_nat_and_raw_sections_in_one_restore() -> None:
    payload = render_install(ANTI)
    assert payload.count("COMMIT") == 2 and payload.index("*nat") < payload.index("*raw")
    assert "-I PREROUTING 1 -j aad-metadata-spoof" in payload
    assert render_install(SPEC).count("COMMIT") == 1, "without anti-spoofing the raw table is untouched"


def test_raw_table_in_sync_and_each_drift_is_found_and_fixed() -> None:
    tables = {"nat": installed(), "raw": parse_table(RAW_SAVE, "raw")}
    assert detect(tables, ANTI).ok
    flushed = parse_table(RAW_SAVE.replace("-A aad-metadata-spoof -d", "# gone -d"), "raw")
    drift = detect({"nat": installed(), "raw": flushed}, ANTI)
    assert drift.problems == {Problem.CHAIN_CONTENT}
    assert drift.payload is not None and drift.payload.startswith("*raw\n")
    fixed = apply_restore(flushed, drift.payload)
    assert detect({"nat": installed(), "raw": fixed}, ANTI).ok
    assert "-j CT --notrack" in fixed.rules("PREROUTING"), "foreign raw rules are kept"


def test_switching_anti_spoofing_off_removes_the_raw_chain_as_stale() -> None:
    tables = {"nat": installed(), "raw": parse_table(RAW_SAVE, "raw")}
    drift = detect(tables, SPEC)
    assert drift.problems == {Problem.STALE_CHAIN}
    assert drift.payload is not None
    fixed = apply_restore(tables["raw"], drift.payload)
    assert fixed.rules("PREROUTING") == ["-j CT --notrack"] and "aad-metadata-spoof" not in fixed.chains
    assert detect({"nat": installed()}, SPEC).ok, "an unreadable raw table is nothing to clean"


def test_removal_covers_both_tables() -> None:
    payload = removal({"nat": installed(), "raw": parse_table(RAW_SAVE, "raw")}, ANTI)
    assert payload is not None and "*nat" in payload and "-X aad-metadata-spoof" in payload
