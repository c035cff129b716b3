"""Compare the nat (and raw) tables with a ``RuleSpec``; say what is wrong and which restore input fixes it.

Policy, stricter than the original NMI (which only checked the chain's first rules and the
jump's existence, nmi-spec §4.1 and §4.2):

* A managed chain must contain exactly the expected rules. Anything else in it, including
  rules appended after the final RETURN, is drift and is removed: the chain is ours, and an
  exact match keeps what is installed auditable.
* The only rule anywhere in the table that jumps to a managed chain is the plain ``-j <chain>``
  at position 1 of its built-in chain. Being first means no other nat rule can rewrite
  metadata traffic before we see it. A misplaced, conditional or duplicate jump is removed
  and one plain jump is inserted at the top, in the same atomic restore.
* A managed chain the spec no longer asks for (the host-network chain after opting out) is
  stale and is removed.

The payload is for ``iptables-restore --noflush``: other chains are untouched, declaring a
chain flushes it, and the whole table commits atomically so the jump never goes missing while
it is being moved. Deletions name rules by their text, so a concurrent edit makes the restore
fail (and the caller retry from a fresh read) rather than delete the wrong rule.

Each table is planned on its own and gets its own ``*table ... COMMIT`` section; one restore
input carries them all (nat first). A table not given is treated as empty.
"""

from __future__ import annotations

import enum
import itertools
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from iptables.rules import TABLES, Hook, RuleSpec
from iptables.savefile import Table

Tables = Table | Mapping[str, Table]
"""One parsed table, or parsed tables by name."""

_JUMP_FLAGS = frozenset({"-j", "--jump", "-g", "--goto"})


class Problem(enum.StrEnum):
    CHAIN_MISSING = "chain missing"
    CHAIN_CONTENT = "chain content differs"
    JUMP_MISSING = "jump missing"
    JUMP_NOT_FIRST = "jump not first"
    DUPLICATE_JUMPS = "duplicate jumps"
    STALE_CHAIN = "stale chain"


@dataclass(frozen=True, slots=True)
class Finding:
    problem: Problem
    chain: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.chain}: {self.problem}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True, slots=True)
class Drift:
    findings: tuple[Finding, ...] = ()
    payload: str | None = None
    """Restore input that fixes every finding; ``None`` when there is nothing to fix."""

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def problems(self) -> frozenset[Problem]:
        return frozenset(f.problem for f in self.findings)

    def describe(self) -> str:
        return "; ".join(map(str, self.findings)) or "in sync"


def _jumps_to(rule: str, chain: str) -> bool:
    try:
        tokens = shlex.split(rule)
    except ValueError:
        tokens = rule.split()
    return any(tok in _JUMP_FLAGS and nxt == chain for tok, nxt in itertools.pairwise(tokens))


def _jumps(table: Table, target: str) -> list[tuple[str, int, str]]:
    """(chain, index, rule) of every rule in the table that jumps or goes to ``target``."""
    return [
        (chain.name, index, rule)
        for chain in table.chains.values()
        for index, rule in enumerate(chain.rules)
        if _jumps_to(rule, target)
    ]


class _Plan:
    """Collects findings and restore lines in the order the restore needs them."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.findings: list[Finding] = []
        self.rewrites: list[str] = []
        self.jump_fixes: list[str] = []
        self.removals: list[str] = []
        self.flushed: set[str] = set()

    def delete_jumps(self, jumps: list[tuple[str, int, str]], into: list[str]) -> None:
        # A jump inside a chain this restore flushes disappears with the flush; deleting it as
        # well would make the restore fail.
        into.extend(f"-D {chain} {rule}" for chain, _, rule in jumps if chain not in self.flushed)

    def lines(self) -> list[str]:
        return self.rewrites + self.jump_fixes + self.removals

    def section(self) -> str | None:
        lines = self.lines()
        return "\n".join([f"*{self.table.name}", *lines, "COMMIT"]) + "\n" if lines else None


def _by_name(tables: Tables) -> dict[str, Table]:
    if isinstance(tables, Table):
        return {tables.name: tables}
    return dict(tables)


def _combine(plans: list[_Plan]) -> Drift:
    findings = tuple(finding for plan in plans for finding in plan.findings)
    sections = [section for plan in plans if (section := plan.section()) is not None]
    return Drift(findings, "".join(sections) or None)


def _check_chain(plan: _Plan, hook: Hook) -> None:
    found = plan.table.chains.get(hook.chain)
    if found is not None and found.rules == list(hook.rules):
        return
    if found is None:
        plan.findings.append(Finding(Problem.CHAIN_MISSING, hook.chain))
    else:
        detail = f"{len(found.rules)} rules, expected {len(hook.rules)}"
        plan.findings.append(Finding(Problem.CHAIN_CONTENT, hook.chain, detail))
    plan.flushed.add(hook.chain)
    plan.rewrites.append(f":{hook.chain} - [0:0]")
    plan.rewrites.extend(f"-A {hook.chain} {rule}" for rule in hook.rules)


def _check_jump(plan: _Plan, hook: Hook) -> None:
    jumps = _jumps(plan.table, hook.chain)
    exact = [index for chain, index, rule in jumps if chain == hook.parent and rule == hook.jump]
    if not exact:
        plan.findings.append(Finding(Problem.JUMP_MISSING, hook.chain, f"from {hook.parent}"))
    elif exact[0] != 0:
        detail = f"at position {exact[0] + 1} of {hook.parent}"
        plan.findings.append(Finding(Problem.JUMP_NOT_FIRST, hook.chain, detail))
    extra = len(jumps) - (1 if exact else 0)
    if extra > 0:
        where = ", ".join(f"{chain} #{index + 1}" for chain, index, _ in jumps)
        plan.findings.append(Finding(Problem.DUPLICATE_JUMPS, hook.chain, f"{extra} extra; jumps at {where}"))
    if exact[:1] == [0] and extra == 0:
        return
    plan.delete_jumps(jumps, plan.jump_fixes)
    plan.jump_fixes.append(f"-I {hook.parent} 1 {hook.jump}")


def _remove_chain(plan: _Plan, chain: str, finding: Problem | None) -> None:
    jumps = _jumps(plan.table, chain)
    present = chain in plan.table.chains
    if not present and not jumps:
        return
    if finding is not None:
        plan.findings.append(Finding(finding, chain))
    plan.delete_jumps(jumps, plan.removals)
    if present:
        plan.flushed.add(chain)
        plan.removals.extend((f"-F {chain}", f"-X {chain}"))


def _detect_table(table: Table, spec: RuleSpec) -> _Plan:
    plan = _Plan(table)
    hooks = spec.hooks(table.name)
    wanted = {hook.chain for hook in hooks}
    stale = [chain for chain in spec.managed_chains(table.name) if chain not in wanted]
    # Stale chains first: they are flushed, which decides which jump deletions are still needed.
    plan.flushed.update(chain for chain in stale if chain in table.chains)
    for hook in hooks:
        _check_chain(plan, hook)
    for hook in hooks:
        _check_jump(plan, hook)
    for chain in stale:
        _remove_chain(plan, chain, Problem.STALE_CHAIN)
    return plan


def detect(tables: Tables, spec: RuleSpec) -> Drift:
    """What differs between the parsed tables and ``spec``, and the fix.

    With a single ``Table`` only that table is compared; with a mapping, every table NMI may
    own is (a missing one counts as empty).
    """
    given = _by_name(tables)
    names = [tables.name] if isinstance(tables, Table) else list(TABLES)
    return _combine([_detect_table(given.get(name) or Table(name), spec) for name in names])


def removal(tables: Tables, spec: RuleSpec) -> str | None:
    """Restore input deleting every jump to the managed chains and the chains themselves."""
    plans = []
    for name, table in _by_name(tables).items():
        plan = _Plan(table)
        managed = spec.managed_chains(name)
        plan.flushed.update(chain for chain in managed if chain in table.chains)
        for chain in managed:
            _remove_chain(plan, chain, None)
        plans.append(plan)
    return _combine(plans).payload


def render_install(spec: RuleSpec) -> str:
    """The restore input that installs ``spec`` into tables holding none of its rules."""
    payload = detect({name: Table(name) for name in TABLES}, spec).payload
    assert payload is not None  # an empty table always lacks the chains
    return payload
