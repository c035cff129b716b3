"""Upstream outages end to end (the scenario of benchmarks/upstream_outage.py, at a smaller scale):
every waiting key is tried within the budget, every 503 says when to come back, and once IMDS
answers again every pod has its token within one backoff step."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.upstream_outage import run_episode

pytestmark = pytest.mark.timeout(120)

PODS = 20
IMDS_LIMIT_PER_S = 20  # the budget is 15/s plus a burst of 5: never above what IMDS allows


def scenario(**overrides: float) -> argparse.Namespace:
    values = {
        "pods": PODS,
        "outage_s": 4.0,
        "after_s": 6.0,
        "client_retry_s": 0.5,
        "client_timeout_s": 2.0,
        "upstream_timeout_s": 10.0,
        "identity_wait_s": 15.0,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize(("status", "name"), [(500, "5xx"), (0, "connection resets")])
async def test_every_key_is_tried_during_the_outage_and_recovers_within_a_backoff_step(
    status: int, name: str
) -> None:
    result = await run_episode(status, scenario())
    assert result["keys_tried_during_outage"] == PODS, (name, result)
    assert result["peak_upstream_per_s"] <= IMDS_LIMIT_PER_S, (name, result)
    assert result["still_failing"] == 0 and result["recovery_max_s"] <= 4.0, (name, result)


async def test_throttling_tries_keys_in_turn_and_every_503_carries_retry_after() -> None:
    # Clients patient enough to see NMI's own answer during the outage: NMI holds a request until its
    # deadline (here 1 s + 1 s), then says 503 and when to come back.
    result = await run_episode(
        429, scenario(outage_s=6.0, client_timeout_s=30.0, upstream_timeout_s=1.0, identity_wait_s=1.0)
    )
    assert result["answers_503"] > 0 and result["answers_503_without_retry_after"] == 0, result
    calls, tried = result["upstream_calls_during_outage"], result["keys_tried_during_outage"]
    assert tried == min(calls, PODS), result  # no key tried twice while another waited untried
    assert result["peak_upstream_per_s"] <= IMDS_LIMIT_PER_S, result
    # IMDS's Retry-After (2 s) is honoured, then the queue drains at the budget's rate.
    assert result["still_failing"] == 0 and result["recovery_max_s"] <= 2.0 + PODS / 15 + 1.0, result
