"""The plugin as users run it: its console script in a subprocess, against the API server stand-in
over HTTPS with a bearer token, reached through a kubeconfig (``--kubeconfig``)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from standins import apiserver as k8s
from standins.apiserver import FakeApiServer

SCRIPT = Path(sys.executable).parent / "kubectl-pod_identity"
TOKEN = "plugin-token"
SUB = "11111111-1111-1111-1111-111111111111"
CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def uami(name: str, rg: str = "myIdentityResourceGroup") -> str:
    return (
        f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/"
        f"userAssignedIdentities/{name}"
    )


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str


@dataclass
class Plugin:
    api: FakeApiServer
    kubeconfig: Path
    home: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        # No ~/.kube/config and no KUBECONFIG of the machine running the tests.
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        env["HOME"] = str(self.home)
        env.update(extra or {})
        return env

    async def run(
        self, *args: str, kubeconfig: bool = True, env: Mapping[str, str] | None = None, program: Any = None
    ) -> Result:
        argv = [*(program or [str(SCRIPT)]), *args]
        if kubeconfig:
            argv += ["--kubeconfig", str(self.kubeconfig)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(env),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())

    def objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.api.objects(kind, namespace)

    def names(self, kind: str, namespace: str | None = None) -> list[str]:
        return [
            f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in self.objects(kind, namespace)
        ]

    def writes(self) -> int:
        return sum(1 for r in self.api.requests if r.verb == "write")


@pytest.fixture
async def plugin(tmp_path: Path) -> AsyncIterator[Plugin]:
    api = FakeApiServer(tls=True, token=TOKEN)
    await api.start()
    home = tmp_path / "home"
    home.mkdir()
    try:
        yield Plugin(api, api.write_kubeconfig(tmp_path / "kubeconfig"), home)
    finally:
        await api.stop()


def seed_identities(api: FakeApiServer, n: int) -> None:
    """``n`` pod identities over a few namespaces, through the stand-in's Python API."""
    for i in range(n):
        ns = f"team-{i % 4}"
        api.create(k8s.azure_identity(f"seed-{i}", namespace=ns, resource_id=uami(f"seed-{i}")))
        api.create(k8s.binding(f"seed-{i}-binding", f"seed-{i}", f"seed-{i}", namespace=ns))


def seed_exceptions(api: FakeApiServer, n: int) -> None:
    for i in range(n):
        api.create(k8s.exception(f"exc-{i}", {"app": f"agent-{i}"}, namespace=f"team-{i % 4}"))
