# ruff: noqa: E501  (verbatim iptables-save lines)
"""Shared helpers for the namespace tests: foreign (kube-proxy-like) rules, runners, saves."""

from __future__ import annotations

import re

from iptables.rules import RuleSpec
from iptables.runner import Binaries, IptablesRunner
from tests.netns.harness import Node

METADATA_IP = "169.254.169.254"

# What kube-proxy and a kubenet-like CNI leave on a node. The DNAT also switches conntrack on in
# the namespace, as on every real node; the filter rule is kube-proxy's CVE-2020-8558 guard,
# which must not break the DNAT to 127.0.0.1.
FOREIGN_RULES = """\
*nat
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -s 10.244.0.0/24 ! -d 10.244.0.0/16 -j MASQUERADE
-A KUBE-SERVICES -d 10.0.0.10/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 10.244.0.99:53
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
"""


def binaries(variant: str) -> Binaries:
    return Binaries.variant(variant)


def add_foreign_rules(node: Node, variant: str = "") -> None:
    node.run_in(node.ns, [binaries(variant).restore, "--noflush", "-w", "5"], input=FOREIGN_RULES)


def runner_for(node: Node, spec: RuleSpec, variant: str = "") -> IptablesRunner:
    return IptablesRunner(spec, prefix=node.wrap(node.ns, []), binaries=binaries(variant))


def save(node: Node, variant: str = "", *tables: str) -> str:
    """``iptables-save`` without comments and counters, so two saves compare equal when the rules do."""
    argv = [binaries(variant).save]
    for table in tables:
        argv += ["-t", table]
    text = node.run_in(node.ns, argv).stdout
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in lines)


def iptables(node: Node, *args: str, variant: str = "") -> None:
    node.run_in(node.ns, [binaries(variant).iptables, "-w", "5", "-t", "nat", *args])
