"""A kubenet-like node built from network namespaces, for tests and demos (root, iproute2 needed).

Layout (defaults)::

    <prefix>-node   lo 127.0.0.1/8 and 169.254.169.254/32
                    eth0 10.240.0.4/16, default via 10.240.0.1 (a veth; its peer uplink0 goes nowhere)
                    cbr0 (bridge) 10.244.0.1/24
                    vethN: bridge ports, peers of the pods' eth0
    <prefix>-podN   lo; eth0 10.244.0.(N+2)/24, default via 10.244.0.1

A "real IMDS" stand-in can listen on 169.254.169.254 in the node namespace; pod traffic to it is
routed through the bridge into the node namespace, where PREROUTING sees it as on a real node.

Names carry a per-process prefix (``nmit<pid>x<n>``), so concurrent runs never collide and
``cleanup_stale()`` can delete what a crashed run (whose pid is gone) left behind.

Usable outside pytest (also ``python -m tests.netns.harness up|cleanup``)::

    with Node(pods=2) as node:
        imds = node.start_recorder(node.ns, "169.254.169.254", 80, name="imds")
        print(node.run_in(node.pods[0].ns, ["python3", "-c", "..."]).stdout)

Only the standard library is used (no pyroute2 needed here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

BASE_PREFIX = "nmit"
HERE = Path(__file__).resolve().parent
RECORDING_SERVER = HERE / "recording_server.py"
HTTP_CLIENT = HERE / "http_client.py"
_counter = itertools.count()
_STALE = re.compile(rf"^{BASE_PREFIX}(\d+)x")


class HarnessError(RuntimeError):
    pass


def require_netns() -> None:
    """Raise ``HarnessError`` saying what is missing when namespaces cannot be created here."""
    if os.geteuid() != 0:
        raise HarnessError("network-namespace tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore"):
        if shutil.which(tool) is None:
            raise HarnessError(f"{tool!r} not found on PATH; install iproute2 and iptables")
    probe = f"{BASE_PREFIX}{os.getpid()}xprobe"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HarnessError(f"'ip netns add' failed: {result.stderr.strip()}")
    delete_namespace(probe)


def unique_prefix() -> str:
    return f"{BASE_PREFIX}{os.getpid()}x{next(_counter)}"


def list_namespaces() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def delete_namespace(name: str) -> None:
    """Kill whatever still runs in ``name`` (only our own processes live there), then delete it."""
    if name not in list_namespaces():
        return
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    for pid in pids.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix``; returns their names."""
    names = [name for name in list_namespaces() if name.startswith(prefix)]
    for name in names:
        delete_namespace(name)
    return names


def cleanup_stale() -> list[str]:
    """Delete namespaces left by harness runs whose process no longer exists."""
    stale = []
    for name in list_namespaces():
        match = _STALE.match(name)
        if match and not _alive(int(match[1])):
            delete_namespace(name)
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip_batch(lines: Sequence[str], netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    result = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed: {result.stderr.strip()}\n" + "\n".join(lines))


@dataclass(frozen=True)
class Pod:
    ns: str
    ip: str
    host_veth: str


class Recorder:
    """A running ``recording_server.py``: answers fixed JSON and logs each hit's source address."""

    def __init__(self, proc: subprocess.Popen[str], port: int, hits_file: Path) -> None:
        self.proc = proc
        self.port = port
        self.hits_file = hits_file

    def hits(self) -> list[dict[str, Any]]:
        # The server appends the line before it answers, so a finished request is always visible.
        if not self.hits_file.exists():
            return []
        return [json.loads(line) for line in self.hits_file.read_text().splitlines() if line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Node:
    def __init__(
        self,
        pods: int = 2,
        *,
        prefix: str | None = None,
        route_localnet: bool = True,
        bridge: str = "cbr0",
        pod_cidr: str = "10.244.0.0/24",
        node_address: str = "10.240.0.4/16",
        metadata_ip: str = "169.254.169.254",
    ) -> None:
        self.prefix = prefix or unique_prefix()
        self.ns = f"{self.prefix}-node"
        self.bridge = bridge
        self.route_localnet = route_localnet
        self.metadata_ip = metadata_ip
        network = ipaddress.IPv4Network(pod_cidr)
        hosts = network.hosts()
        self.bridge_ip = str(next(hosts))
        self._pod_prefixlen = network.prefixlen
        self.node_interface = ipaddress.IPv4Interface(node_address)
        self.node_ip = str(self.node_interface.ip)
        self.pods = [Pod(f"{self.prefix}-pod{i}", str(next(hosts)), f"veth{i}") for i in range(pods)]
        self._procs: list[subprocess.Popen[Any]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def namespaces(self) -> list[str]:
        return [self.ns, *(pod.ns for pod in self.pods)]

    @property
    def tmpdir(self) -> Path:
        if self._tmp is None:
            raise HarnessError("node not created")
        return Path(self._tmp.name)

    def __enter__(self) -> Node:
        return self.create()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    def create(self) -> Node:
        self.destroy()  # leftovers of a crashed run with the same prefix
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.prefix}-")
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build(self) -> None:
        _ip_batch([f"netns add {name}" for name in self.namespaces])
        gateway = self.node_interface.network.network_address + 1
        node = [
            "link set lo up",
            f"link add {self.bridge} type bridge",
            f"addr add {self.bridge_ip}/{self._pod_prefixlen} dev {self.bridge}",
            f"link set {self.bridge} up",
            # On lo rather than a dummy link: some kernels (Firecracker CI VMs) lack the dummy driver.
            f"addr add {self.metadata_ip}/32 dev lo",
            # The uplink is a veth whose peer stays in the node namespace, for the same reason.
            "link add eth0 type veth peer name uplink0",
            f"addr add {self.node_interface} dev eth0",
            "link set uplink0 up",
            "link set eth0 up",
            f"route add default via {gateway} dev eth0",
        ]
        for pod in self.pods:
            node += [
                f"link add {pod.host_veth} type veth peer name eth0 netns {pod.ns}",
                f"link set {pod.host_veth} master {self.bridge} up",
            ]
        _ip_batch(node, self.ns)
        for pod in self.pods:
            _ip_batch(
                [
                    "link set lo up",
                    f"addr add {pod.ip}/{self._pod_prefixlen} dev eth0",
                    "link set eth0 up",
                    f"route add default via {self.bridge_ip}",
                ],
                pod.ns,
            )
        if self.route_localnet:
            self.set_route_localnet(True)

    def set_route_localnet(self, enabled: bool) -> None:
        value = int(enabled)
        keys = [f"net.ipv4.conf.{name}.route_localnet={value}" for name in ("all", self.bridge)]
        self.run_in(self.ns, ["sysctl", "-qw", *keys])

    def destroy(self) -> None:
        """Idempotent; safe on a half-built node."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        for name in self.namespaces:
            delete_namespace(name)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- running things inside namespaces -------------------------------------------------------

    @staticmethod
    def wrap(ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run_in(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.wrap(ns, argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} in {ns} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    async def arun_in(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full = self.wrap(ns, argv)
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(None if input is None else input.encode()), timeout
            )
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        result = subprocess.CompletedProcess(full, proc.returncode or 0, out.decode(), err.decode())
        if check and result.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} in {ns} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def spawn_in(self, ns: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in ``ns``; it is killed by ``destroy()``."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.wrap(ns, argv), **popen)
        self._procs.append(proc)
        return proc

    def start_recorder(
        self, ns: str, host: str, port: int = 0, *, name: str, ready_timeout: float = 10.0
    ) -> Recorder:
        hits = self.tmpdir / f"{name}-{next(_counter)}.hits"
        argv = [sys.executable, str(RECORDING_SERVER), "--host", host, "--port", str(port)]
        argv += ["--name", name, "--hits", str(hits)]
        proc = self.spawn_in(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            proc.kill()
            _, err = proc.communicate()
            raise HarnessError(f"recorder {name} did not start on {host}:{port}: {line!r} {err.strip()}")
        return Recorder(proc, int(line.split()[1]), hits)

    def client_argv(self, host: str, port: int, **options: Any) -> list[str]:
        """argv for ``http_client.py``; options become ``--key value`` flags."""
        argv = [sys.executable, str(HTTP_CLIENT), host, str(port)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv

    async def http_get(self, ns: str, host: str, port: int, **options: Any) -> dict[str, Any]:
        """One GET from inside ``ns``: ``{"ok", "status", "body", "error"}``."""
        result = await self.arun_in(ns, self.client_argv(host, port, **options), timeout=15.0)
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed

    def describe(self) -> dict[str, Any]:
        return {
            "node": {"ns": self.ns, "ip": self.node_ip, "bridge_ip": self.bridge_ip},
            "metadata_ip": self.metadata_ip,
            "pods": [{"ns": pod.ns, "ip": pod.ip} for pod in self.pods],
        }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.netns.harness up [--pods N]`` builds a node and keeps it until SIGINT/SIGTERM;
    ``cleanup`` deletes namespaces left by dead runs."""
    parser = argparse.ArgumentParser(prog="harness")
    parser.add_argument("command", choices=["up", "cleanup"])
    parser.add_argument("--pods", type=int, default=2)
    args = parser.parse_args(argv)
    require_netns()
    if args.command == "cleanup":
        print(json.dumps({"deleted": cleanup_stale()}))
        return
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    with Node(pods=args.pods) as node:
        print(json.dumps(node.describe()), flush=True)
        signal.sigwait(stop)


if __name__ == "__main__":
    main()
