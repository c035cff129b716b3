from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import uvloop

from podidentity.http import Handler, HttpServer
from tests.http.helpers import Recorder, ServerFactory, settings


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Every async test here runs under the default asyncio loop and under uvloop."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def make_server(recorder: Recorder) -> AsyncIterator[ServerFactory]:
    """Servers on 127.0.0.1:0, shut down after the test; loop errors and leftover tasks fail it."""
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    servers: list[HttpServer] = []

    async def factory(handler: Handler, **overrides: Any) -> HttpServer:
        server = HttpServer(
            settings(**overrides),
            handler,
            name="nmi-test",
            on_response=recorder.on_response,
            on_reject=recorder.on_reject,
        )
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.shutdown(grace_s=0.5)
        assert server.connections == 0
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert loop_errors == []
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
