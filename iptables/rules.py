"""What NMI's nat rules must look like, as the exact text ``iptables-save`` prints.

Pod traffic (PREROUTING)
    Chain ``aad-metadata``, jumped to from the first rule of ``nat PREROUTING``, DNATs every pod's
    TCP to ``metadata_ip:metadata_port`` to the NMI listener, then RETURNs. Identical to the
    original NMI so that an upgrade adopts its chain instead of fighting it.

Host-network traffic (OUTPUT, opt-in)
    PREROUTING never sees locally generated packets, so host-network pods reach the real IMDS
    with the node's authority (nmi-spec §9.17). With ``HostNetworkInterception`` a second chain,
    ``aad-metadata-output``, is jumped to from the first rule of ``nat OUTPUT`` and DNATs local TCP
    to the metadata endpoint to NMI, except for the exempted uids and cgroups. NMI itself must be
    exempt or its own upstream calls would loop back to itself.

    Trade-off: ``--uid-owner`` matches a uid, not a program. If NMI runs as uid 0, exempting
    uid 0 exempts every root process on the node, including root host-network pods, which
    defeats the purpose. Run NMI under a dedicated uid and exempt that, or exempt NMI's cgroup
    (``-m cgroup --path``, cgroup v2 paths relative to the unified hierarchy's root), which a
    pod cannot enter.

Anti-spoofing (raw PREROUTING, opt-in per node topology)
    NMI names the caller by its source address, so a pod that forges another pod's source
    could be served that pod's token. On a routed node (each pod behind its own host veth with
    a /32 route) strict reverse-path filtering stops it: ``aad-metadata-spoof``, jumped to from
    the first rule of ``raw PREROUTING``, DROPs metadata traffic whose source would not be
    routed back out of the interface it came in on (``-m rpfilter --invert``, never
    ``--loose``: any route back would pass a loose check). In raw, before conntrack and DNAT,
    so a dropped SYN never creates a flow. See docs/security.md.

Every string here is in ``iptables-save``'s canonical spelling (``/32`` suffixes, ``-m tcp``,
double-quoted cgroup paths), so drift detection can compare text for equality and the same
lines are valid ``iptables-restore`` input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

NAT = "nat"
RAW = "raw"
TABLE = NAT
"""The table of the interception rules (kept for callers that only know the nat table)."""
TABLES = (NAT, RAW)
DEFAULT_CHAIN = "aad-metadata"
PREROUTING = "PREROUTING"
OUTPUT = "OUTPUT"

# iptables limits chain names to 28 characters; the output chain adds "-output", the raw one "-spoof".
_CHAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,21}")
# Quoting and escaping in iptables-restore input are limited; refuse anything that needs either.
_CGROUP_PATH = re.compile(r"/[A-Za-z0-9_.:@/+-]*")


def _ipv4(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{what} must be an IPv4 address, got {value!r}") from None


def _port(value: int, what: str) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"{what} must be in 1..65535, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class HostNetworkInterception:
    """Opt-in DNAT of locally generated traffic; see the module docstring for the trade-off."""

    exempt_uids: tuple[int, ...] = ()
    exempt_cgroups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.exempt_uids and not self.exempt_cgroups:
            raise ValueError("host-network interception needs NMI exempted by uid or cgroup path")
        for uid in self.exempt_uids:
            if not 0 <= uid < 2**32 - 1:
                raise ValueError(f"invalid uid {uid}")
        for path in self.exempt_cgroups:
            if not _CGROUP_PATH.fullmatch(path):
                raise ValueError(f"cgroup path must be absolute and plain, got {path!r}")


@dataclass(frozen=True, slots=True)
class Hook:
    """One managed chain and the built-in chain whose first rule must jump to it."""

    parent: str
    chain: str
    rules: tuple[str, ...]
    table: str = NAT

    @property
    def jump(self) -> str:
        return f"-j {self.chain}"


@dataclass(frozen=True, slots=True)
class RuleSpec:
    metadata_ip: str = "169.254.169.254"
    metadata_port: int = 80
    target_ip: str = "127.0.0.1"
    target_port: int = 2579
    chain: str = DEFAULT_CHAIN
    exempt_source: str = "127.0.0.1/32"
    """Never DNATed in PREROUTING (as in the original)."""
    host_network: HostNetworkInterception | None = None
    anti_spoofing: bool = False
    """Strict reverse-path DROP of metadata traffic in raw PREROUTING (routed nodes)."""

    def __post_init__(self) -> None:
        # Normalise to iptables-save's spelling so comparisons with its output are exact.
        object.__setattr__(self, "metadata_ip", _ipv4(self.metadata_ip, "metadata_ip"))
        object.__setattr__(self, "target_ip", _ipv4(self.target_ip, "target_ip"))
        _port(self.metadata_port, "metadata_port")
        _port(self.target_port, "target_port")
        if self.target_ip == "0.0.0.0":
            raise ValueError("target_ip 0.0.0.0 is not a destination; use RuleSpec.for_listener")
        try:
            exempt = ipaddress.IPv4Network(self.exempt_source)
        except ValueError:
            raise ValueError(f"exempt_source must be an IPv4 network, got {self.exempt_source!r}") from None
        object.__setattr__(self, "exempt_source", str(exempt))
        if not _CHAIN_NAME.fullmatch(self.chain):
            raise ValueError(f"chain name must match {_CHAIN_NAME.pattern}, got {self.chain!r}")

    @classmethod
    def for_listener(
        cls,
        listen_address: str,
        port: int,
        *,
        metadata_ip: str = "169.254.169.254",
        metadata_port: int = 80,
        host_network: HostNetworkInterception | None = None,
        anti_spoofing: bool = False,
    ) -> RuleSpec:
        """The original's target rule: the listen address, or 127.0.0.1 when it listens everywhere."""
        target = "127.0.0.1" if listen_address == "0.0.0.0" else listen_address
        return cls(
            metadata_ip=metadata_ip,
            metadata_port=metadata_port,
            target_ip=target,
            target_port=port,
            host_network=host_network,
            anti_spoofing=anti_spoofing,
        )

    @property
    def output_chain(self) -> str:
        return f"{self.chain}-output"

    @property
    def _dnat(self) -> str:
        return (
            f"-d {self.metadata_ip}/32 -p tcp -m tcp --dport {self.metadata_port}"
            f" -j DNAT --to-destination {self.target_ip}:{self.target_port}"
        )

    def prerouting_hook(self) -> Hook:
        return Hook(PREROUTING, self.chain, (f"! -s {self.exempt_source} {self._dnat}", "-j RETURN"))

    def output_hook(self) -> Hook | None:
        hn = self.host_network
        if hn is None:
            return None
        exemptions = [f"-m owner --uid-owner {uid} -j RETURN" for uid in hn.exempt_uids]
        exemptions += [f'-m cgroup --path "{path}" -j RETURN' for path in hn.exempt_cgroups]
        return Hook(OUTPUT, self.output_chain, (*exemptions, self._dnat, "-j RETURN"))

    @property
    def spoof_chain(self) -> str:
        return f"{self.chain}-spoof"

    def antispoof_hook(self) -> Hook | None:
        if not self.anti_spoofing:
            return None
        rule = (
            f"-d {self.metadata_ip}/32 -p tcp -m tcp --dport {self.metadata_port}"
            " -m rpfilter --invert -j DROP"
        )
        return Hook(PREROUTING, self.spoof_chain, (rule,), table=RAW)

    def hooks(self, table: str | None = None) -> tuple[Hook, ...]:
        """The wanted hooks, of every table or of ``table`` only."""
        every = (self.prerouting_hook(), self.output_hook(), self.antispoof_hook())
        return tuple(hook for hook in every if hook is not None and table in (None, hook.table))

    def managed_chains(self, table: str = NAT) -> tuple[str, ...]:
        """Every chain of ``table`` this spec may own, wanted or not (so opting out cleans up)."""
        return (self.chain, self.output_chain) if table == NAT else (self.spoof_chain,)

    def required_tables(self) -> tuple[str, ...]:
        """Tables that must be read; the others are read only to clean up, and may be absent."""
        return TABLES if self.anti_spoofing else (NAT,)
