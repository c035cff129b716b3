"""Apply a ``RuleSpec`` to the nat (and raw) tables with ``iptables-save`` / ``iptables-restore --noflush``.

Only whole-table restores are used (kube-proxy's approach): each change is one atomic commit that
leaves every chain we do not own untouched, and the xtables lock is taken with ``-w``, so NMI
cooperates with kube-proxy and CNI plugins writing the same table.

The raw table is read only when the spec asks for anti-spoofing, or else best-effort (to remove
a chain a previous run left): a legacy kernel without ``iptable_raw`` must not break the nat rules.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from iptables.drift import Drift, detect, removal
from iptables.process import Completed, IptablesError, run_command
from iptables.rules import TABLES, RuleSpec
from iptables.savefile import Table, parse_table

_VERSION = re.compile(r"v(?P<version>[\d.]+)(?:\s+\((?P<backend>[\w-]+)\))?")
_OTHER_BACKEND_WARNING = "tables present"


class DriftPersists(IptablesError):
    """A restore succeeded but the table still differs: a concurrent writer, or a spelling mismatch."""


@dataclass(frozen=True, slots=True)
class Binaries:
    iptables: str = "iptables"
    save: str = "iptables-save"
    restore: str = "iptables-restore"

    @classmethod
    def variant(cls, name: str) -> Binaries:
        """``"legacy"`` or ``"nft"`` for the explicitly named binaries; ``""`` for the alternatives link."""
        suffix = f"-{name}" if name else ""
        return cls(f"iptables{suffix}", f"iptables{suffix}-save", f"iptables{suffix}-restore")


class IptablesRunner:
    """Install, check, repair and remove NMI's rules.

    ``prefix`` is prepended to every command (tests use ``("ip", "netns", "exec", NAME)``).
    Transient failures (lock contention, a concurrent ruleset change) are retried over
    ``retry_backoff_s``; other failures raise ``IptablesError`` at once.
    """

    def __init__(
        self,
        spec: RuleSpec,
        *,
        prefix: Sequence[str] = (),
        binaries: Binaries = Binaries(),
        lock_wait_s: int = 5,
        timeout_s: float = 30.0,
        retry_backoff_s: Sequence[float] = (0.1, 0.25, 0.5, 1.0, 2.0),
        logger: logging.Logger | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,  # fake for tests
    ) -> None:
        self.spec = spec
        self._prefix = tuple(prefix)
        self._binaries = binaries
        self._lock_wait_s = lock_wait_s
        self._timeout_s = timeout_s
        self._backoff = tuple(retry_backoff_s)
        self._log = logger or logging.getLogger("nmi.iptables")
        self._sleep = sleep
        # One operation at a time: a shutdown ``remove()`` must not interleave with a repair.
        self._lock = asyncio.Lock()
        self.backend: str | None = None
        """``nf_tables`` or ``legacy`` once detected."""
        self._warned_other_backend = False

    async def check(self) -> Drift:
        async with self._lock:
            return await self._check()

    async def repair(self) -> Drift:
        """Fix whatever differs from the spec; returns what was wrong (``ok`` if nothing was)."""
        async with self._lock:
            drift = await self._check()
            if drift.payload is None:
                return drift
            await self._restore(drift.payload)
            after = await self._check()
            if not after.ok:
                raise DriftPersists(f"rules still differ after restore: {after.describe()}")
            return drift

    install = repair
    """Installing is repairing a table that may hold none, some or all of the rules: idempotent."""

    async def remove(self) -> bool:
        """Delete every jump to the managed chains and the chains; ``False`` if there was nothing."""
        async with self._lock:
            payload = removal(await self._save_all(), self.spec)
            if payload is None:
                return False
            await self._restore(payload)
            chains = [chain for table in TABLES for chain in self.spec.managed_chains(table)]
            self._log.info("removed iptables chains %s", ", ".join(chains))
            return True

    async def detect_backend(self) -> str:
        if self.backend is None:
            result = await self._run((self._binaries.iptables, "--version"))
            match = _VERSION.search(result.stdout)
            # iptables before 1.8 printed no backend and only had the legacy one.
            self.backend = (match and match["backend"]) or "legacy"
            self._log.info("iptables backend %s (%s)", self.backend, result.stdout.strip())
        return self.backend

    async def _check(self) -> Drift:
        return detect(await self._save_all(), self.spec)

    async def _save_all(self) -> dict[str, Table]:
        required = self.spec.required_tables()
        tables: dict[str, Table] = {}
        for name in TABLES:
            if name in required:
                tables[name] = await self._save(name)
                continue
            try:
                if await self._table_exists(name):
                    tables[name] = await self._save(name)
            except IptablesError as exc:
                self._log.debug("cannot read the %s table (not needed now): %s", name, exc)
        return tables

    async def _table_exists(self, name: str) -> bool:
        """Whether reading ``name`` is side-effect free: the legacy backend instantiates a table
        (and loads its module) on first read, which costs every packet a hook; nft does not."""
        await self._ensure_backend()
        if self.backend != "legacy":
            return True
        names = await self._run(("cat", "/proc/net/ip_tables_names"))
        return name in names.stdout.split()

    async def _save(self, table: str) -> Table:
        await self._ensure_backend()
        result = await self._run((self._binaries.save, "-t", table))
        if _OTHER_BACKEND_WARNING in result.stderr and not self._warned_other_backend:
            self._warned_other_backend = True
            self._log.warning(
                "rules from the other iptables backend exist on this node (%s); if kube-proxy and the "
                "CNI use that backend, run NMI with its binaries or pod traffic may bypass NMI",
                result.stderr,
            )
        return parse_table(result.stdout, table)

    async def _restore(self, payload: str) -> None:
        self._log.debug("iptables-restore input:\n%s", payload)
        argv = (self._binaries.restore, "--noflush", "-w", str(self._lock_wait_s))
        await self._run(argv, stdin=payload)

    async def _ensure_backend(self) -> None:
        if self.backend is not None:
            return
        try:
            await self.detect_backend()
        except IptablesError as exc:
            # Informational only; the save that follows reports a real failure.
            self._log.warning("cannot detect the iptables backend: %s", exc)
            self.backend = "unknown"

    async def _run(self, argv: Sequence[str], *, stdin: str | None = None) -> Completed:
        full = (*self._prefix, *argv)
        attempts = len(self._backoff) + 1
        for attempt in range(1, attempts + 1):
            try:
                return await run_command(full, stdin=stdin, timeout_s=self._timeout_s)
            except IptablesError as exc:
                if not exc.transient or attempt == attempts:
                    raise
                delay = self._backoff[attempt - 1]
                self._log.info(
                    "%s attempt #%d/%d failed (%s); will retry in %g s",
                    argv[0],
                    attempt,
                    attempts,
                    exc,
                    delay,
                )
                await self._sleep(delay)
        raise AssertionError("unreachable")
