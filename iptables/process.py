"""Run one iptables binary without blocking the event loop, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

# Exit status iptables uses for "resource problem", e.g. the xtables lock is held (xtables.h).
RESOURCE_PROBLEM = 4
_TRANSIENT_MARKERS = ("resource temporarily unavailable", "xtables lock", "device or resource busy")


class IptablesError(Exception):
    def __init__(self, message: str, *, argv: Sequence[str] = (), stderr: str = "", transient: bool = False):
        super().__init__(message)
        self.argv = tuple(argv)
        self.stderr = stderr
        self.transient = transient
        """Another writer held the lock or changed the ruleset: the same call may succeed later."""


@dataclass(frozen=True, slots=True)
class Completed:
    stdout: str
    stderr: str


async def run_command(argv: Sequence[str], *, stdin: str | None = None, timeout_s: float) -> Completed:
    """Run ``argv``; a non-zero exit, a missing binary or the deadline raise ``IptablesError``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise IptablesError(f"cannot run {argv[0]}: {exc}", argv=argv) from exc
    try:
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that arrives as
        # the command ends, and a caller's loop (the bridge pinner's) then never stops.
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(None if stdin is None else stdin.encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise IptablesError(f"{argv[0]} did not finish within {timeout_s:g} s", argv=argv) from None
    except asyncio.CancelledError:
        # Never leave a half-run iptables behind a cancelled task.
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    stderr = err.decode(errors="replace").strip()
    if proc.returncode != 0:
        transient = proc.returncode == RESOURCE_PROBLEM or any(
            marker in stderr.lower() for marker in _TRANSIENT_MARKERS
        )
        message = f"{' '.join(argv)} exited with {proc.returncode}: {stderr or 'no message'}"
        raise IptablesError(message, argv=argv, stderr=stderr, transient=transient)
    return Completed(out.decode(errors="replace"), stderr)
