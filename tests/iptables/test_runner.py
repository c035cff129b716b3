"""The apply layer against a scripted fake iptables (no root needed); the real one is in tests/netns."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from iptables.drift import Problem
from iptables.process import IptablesError
from iptables.rules import HostNetworkInterception, RuleSpec
from iptables.runner import Binaries, DriftPersists, IptablesRunner

FAKE = Path(__file__).with_name("fake_iptables.py")


class Sleeps(list[float]):
    async def __call__(self, delay: float) -> None:
        self.append(delay)


def calls(state: Path, binary: str) -> list[str]:
    lines = (state / "calls").read_text().splitlines() if (state / "calls").exists() else []
    return [line for line in lines if line.split()[0] == binary]


def runner(state: Path, spec: RuleSpec | None = None, **kwargs: object) -> tuple[IptablesRunner, Sleeps]:
    sleeps = Sleeps()
    options: dict[str, object] = {"prefix": (sys.executable, str(FAKE), str(state)), "sleep": sleeps}
    options.update(kwargs)
    return IptablesRunner(spec or RuleSpec(), **options), sleeps  # type: ignore[arg-type]


async def test_install_then_install_again_changes_nothing(tmp_path: Path) -> None:
    rules, _ = runner(tmp_path)
    first = await rules.install()
    assert first.problems == {Problem.CHAIN_MISSING, Problem.JUMP_MISSING}
    assert (await rules.check()).ok
    table = (tmp_path / "table").read_text()
    second = await rules.install()
    assert second.ok
    assert (tmp_path / "table").read_text() == table
    assert len(calls(tmp_path, "iptables-restore")) == 1
    assert calls(tmp_path, "iptables-restore")[0] == "iptables-restore --noflush -w 5"
    assert calls(tmp_path, "iptables-save")[0] == "iptables-save -t nat"


async def test_lock_contention_is_retried_with_backoff(tmp_path: Path) -> None:
    (tmp_path / "fail").write_text("2")
    rules, sleeps = runner(tmp_path, retry_backoff_s=(0.1, 0.25, 0.5))
    await rules.install()
    assert sleeps == [0.1, 0.25]
    assert len(calls(tmp_path, "iptables-restore")) == 3
    assert (await rules.check()).ok


async def test_lock_contention_beyond_the_backoff_raises_a_transient_error(tmp_path: Path) -> None:
    (tmp_path / "fail").write_text("9")
    rules, sleeps = runner(tmp_path, retry_backoff_s=(0.1, 0.2))
    with pytest.raises(IptablesError) as raised:
        await rules.install()
    assert raised.value.transient and "Resource temporarily unavailable" in str(raised.value)
    assert sleeps == [0.1, 0.2]


async def test_other_errors_are_not_retried(tmp_path: Path) -> None:
    (tmp_path / "error").write_text("iptables-restore: line 3 failed")
    rules, sleeps = runner(tmp_path)
    with pytest.raises(IptablesError, match="line 3 failed") as raised:
        await rules.install()
    assert not raised.value.transient and sleeps == []
    assert len(calls(tmp_path, "iptables-restore")) == 1


async def test_a_restore_that_changes_nothing_is_reported(tmp_path: Path) -> None:
    (tmp_path / "ignore").touch()
    rules, _ = runner(tmp_path)
    with pytest.raises(DriftPersists, match="chain missing"):
        await rules.install()


async def test_hung_command_is_killed_at_the_deadline(tmp_path: Path) -> None:
    (tmp_path / "hang").touch()
    rules, _ = runner(tmp_path, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(IptablesError, match="did not finish"):
        await rules.check()
    assert time.monotonic() - started < 5


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    rules, _ = runner(tmp_path, prefix=(), binaries=Binaries.variant("does-not-exist"))
    with pytest.raises(IptablesError, match="cannot run iptables-does-not-exist-save"):
        await rules.check()


@pytest.mark.parametrize(
    ("version", "backend"),
    [
        ("iptables v1.8.9 (nf_tables)", "nf_tables"),
        ("iptables v1.8.7 (legacy)", "legacy"),
        ("iptables v1.6.1", "legacy"),
    ],
)
async def test_backend_is_detected_and_logged(
    tmp_path: Path, version: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "version").write_text(version)
    rules, _ = runner(tmp_path)
    with caplog.at_level(logging.INFO, logger="nmi.iptables"):
        await rules.check()
        await rules.check()
    assert rules.backend == backend
    assert caplog.text.count(f"iptables backend {backend}") == 1
    assert len(calls(tmp_path, "iptables")) == 1


async def test_rules_of_the_other_backend_are_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "stderr").write_text("# Warning: iptables-legacy tables present, use iptables-legacy-save")
    rules, _ = runner(tmp_path)
    with caplog.at_level(logging.WARNING, logger="nmi.iptables"):
        await rules.install()
        await rules.check()
    assert caplog.text.count("other iptables backend") == 1


async def test_remove_deletes_everything_once(tmp_path: Path) -> None:
    spec = RuleSpec(host_network=HostNetworkInterception(exempt_uids=(4242,)))
    rules, _ = runner(tmp_path, spec)
    assert await rules.remove() is False
    assert calls(tmp_path, "iptables-restore") == []
    await rules.install()
    assert await rules.remove() is True
    assert "aad-metadata" not in (tmp_path / "table").read_text()
    assert await rules.remove() is False


def test_binaries_variants() -> None:
    assert Binaries.variant("legacy") == Binaries(
        "iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"
    )
    assert Binaries.variant("") == Binaries()


async def test_anti_spoofing_reads_and_writes_the_raw_table(tmp_path: Path) -> None:
    rules, _ = runner(tmp_path, RuleSpec(anti_spoofing=True))
    first = await rules.install()
    assert Problem.CHAIN_MISSING in first.problems
    assert "aad-metadata-spoof" in (tmp_path / "table-raw").read_text()
    assert (await rules.check()).ok
    assert "iptables-save -t raw" in calls(tmp_path, "iptables-save")
    assert await rules.remove() is True
    assert "aad-metadata-spoof" not in (tmp_path / "table-raw").read_text()


async def test_an_unreadable_raw_table_only_matters_when_anti_spoofing_is_on(tmp_path: Path) -> None:
    (tmp_path / "no-raw").touch()
    plain, _ = runner(tmp_path)
    assert Problem.CHAIN_MISSING in (await plain.install()).problems
    assert (await plain.check()).ok
    anti, _ = runner(tmp_path, RuleSpec(anti_spoofing=True))
    with pytest.raises(IptablesError, match="Table does not exist"):
        await anti.install()
