from __future__ import annotations

import pytest

from iptables.drift import render_install
from iptables.rules import HostNetworkInterception, RuleSpec


def test_default_rendering_matches_the_original_rules_exactly() -> None:
    assert render_install(RuleSpec()) == (
        "*nat\n"
        ":aad-metadata - [0:0]\n"
        "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80"
        " -j DNAT --to-destination 127.0.0.1:2579\n"
        "-A aad-metadata -j RETURN\n"
        "-I PREROUTING 1 -j aad-metadata\n"
        "COMMIT\n"
    )


def test_rendering_uses_the_configured_addresses_ports_and_chain() -> None:
    spec = RuleSpec(
        metadata_ip="169.254.169.254",
        metadata_port=8080,
        target_ip="10.240.0.4",
        target_port=2580,
        chain="nmi-imds",
        exempt_source="10.240.0.4",
    )
    assert render_install(spec) == (
        "*nat\n"
        ":nmi-imds - [0:0]\n"
        "-A nmi-imds ! -s 10.240.0.4/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 8080"
        " -j DNAT --to-destination 10.240.0.4:2580\n"
        "-A nmi-imds -j RETURN\n"
        "-I PREROUTING 1 -j nmi-imds\n"
        "COMMIT\n"
    )


def test_host_network_opt_in_adds_an_output_chain_with_exemptions_first() -> None:
    spec = RuleSpec(
        host_network=HostNetworkInterception(exempt_uids=(4242, 0), exempt_cgroups=("/nmi.slice",))
    )
    assert render_install(spec) == (
        "*nat\n"
        ":aad-metadata - [0:0]\n"
        "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80"
        " -j DNAT --to-destination 127.0.0.1:2579\n"
        "-A aad-metadata -j RETURN\n"
        ":aad-metadata-output - [0:0]\n"
        "-A aad-metadata-output -m owner --uid-owner 4242 -j RETURN\n"
        "-A aad-metadata-output -m owner --uid-owner 0 -j RETURN\n"
        '-A aad-metadata-output -m cgroup --path "/nmi.slice" -j RETURN\n'
        "-A aad-metadata-output -d 169.254.169.254/32 -p tcp -m tcp --dport 80"
        " -j DNAT --to-destination 127.0.0.1:2579\n"
        "-A aad-metadata-output -j RETURN\n"
        "-I PREROUTING 1 -j aad-metadata\n"
        "-I OUTPUT 1 -j aad-metadata-output\n"
        "COMMIT\n"
    )


def test_for_listener_maps_the_wildcard_address_to_loopback_like_the_original() -> None:
    assert RuleSpec.for_listener("0.0.0.0", 2579).target_ip == "127.0.0.1"
    assert RuleSpec.for_listener("10.240.0.4", 2579).target_ip == "10.240.0.4"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metadata_ip": "fd00::1"},
        {"metadata_ip": "169.254.169.254/32"},
        {"target_ip": "0.0.0.0"},
        {"target_ip": "localhost"},
        {"target_port": 0},
        {"metadata_port": 65536},
        {"chain": "bad chain"},
        {"chain": "x" * 22},
        {"exempt_source": "127.0.0.1/8"},
    ],
)
def test_invalid_specs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RuleSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"exempt_cgroups": ("relative",)}, {"exempt_cgroups": ('/a "b"',)}, {"exempt_uids": (-1,)}],
)
def test_host_network_interception_requires_a_plain_exemption(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        HostNetworkInterception(**kwargs)  # type: ignore[arg-type]


def test_anti_spoofing_is_one_strict_rpfilter_rule_in_its_own_raw_chain() -> None:
    spec = RuleSpec(anti_spoofing=True)
    hook = spec.antispoof_hook()
    assert hook is not None
    assert (hook.table, hook.parent, hook.chain) == ("raw", "PREROUTING", "aad-metadata-spoof")
    assert hook.rules == ("-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m rpfilter --invert -j DROP",)
    assert "--loose" not in hook.rules[0]
    assert spec.hooks("raw") == (hook,) and hook not in spec.hooks("nat")
    assert spec.required_tables() == ("nat", "raw")
    assert RuleSpec().antispoof_hook() is None and RuleSpec().required_tables() == ("nat",)
    assert RuleSpec().managed_chains("raw") == ("aad-metadata-spoof",)


def test_the_longest_chain_name_still_fits_iptables_limit_with_the_spoof_suffix() -> None:
    assert len(RuleSpec(chain="a" * 21, anti_spoofing=True).spoof_chain) <= 28
