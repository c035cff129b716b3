from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns.harness import HarnessError, Node, cleanup_stale, require_netns


@pytest.fixture(scope="session", autouse=True)
def _namespaces_available() -> None:
    # Fail, never skip: these tests are the only proof that interception works on a real kernel.
    try:
        require_netns()
    except HarnessError as exc:
        pytest.fail(f"network-namespace tests cannot run here: {exc}", pytrace=False)
    cleanup_stale()


@pytest.fixture
def node() -> Iterator[Node]:
    with Node(pods=2) as built:
        yield built
