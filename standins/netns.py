"""A kubenet-like node built from network namespaces, for tests, the sandbox and the demo.

Needs root and iproute2. Layout (defaults)::

    <prefix>-node   lo 127.0.0.1/8 and 169.254.169.254/32
                    eth0 10.240.0.4/16, default via 10.240.0.1 (a veth; its peer uplink0 goes nowhere)
                    cbr0 (bridge) 10.244.0.1/24
                    vethN: bridge ports, peers of the pods' eth0
    <prefix>-podN   lo; eth0 10.244.0.(N+2)/24, default via 10.244.0.1

``topology="routed"`` builds the other common layout instead (Azure CNI transparent mode,
Calico, Cilium with legacy routing): no bridge; each pod's host veth carries a /32 route to the
pod and answers ARP for the pod's gateway (proxy ARP without delay, forwarding on)::

    <prefix>-node   vethN: no address, proxy_arp=1, route <pod ip>/32 dev vethN
    <prefix>-podN   eth0 <pod ip>/32; 169.254.1.1 dev eth0 scope link; default via 169.254.1.1

In both, ``rp_filter`` is 0 in the node (the kernel's own reverse-path check is off), so what
stops a forged source address is only what a test installs.

Pods can also be given their addresses (``Node(pods=["10.244.1.10", "10.244.1.11"])``): the
bridge subnet is then the /24 of the first one, and the bridge takes the first free address.

A "real IMDS" stand-in can listen on 169.254.169.254 in the node namespace; pod traffic to it is
routed through the bridge into the node namespace, where PREROUTING sees it as on a real node.

Names carry a per-process prefix (``nmit<pid>x<n>``), so concurrent runs never collide and
``cleanup_stale()`` can delete what a crashed run (whose pid is gone) left behind.

Usable outside pytest (also ``python -m standins.netns up|cleanup``)::

    with Node(pods=2) as node:
        imds = node.start_recorder(node.ns, "169.254.169.254", 80, name="imds")
        print(node.run_in(node.pods[0].ns, ["python3", "-c", "..."]).stdout)

The small programs run inside the namespaces (a recording HTTP server, an HTTP client, a
readiness waiter) are this module's ``record``, ``client`` and ``wait-http`` commands.
Only the standard library is used (no pyroute2 needed here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import encodings.idna  # noqa: F401 - imported lazily by getaddrinfo, unreadable after client --uid
import http.client
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "BASE_PREFIX",
    "HELPER",
    "HarnessError",
    "Node",
    "Pod",
    "Recorder",
    "cleanup_prefix",
    "cleanup_stale",
    "delete_namespace",
    "list_namespaces",
    "main",
    "pod_network",
    "require_netns",
    "unique_prefix",
]

BASE_PREFIX = "nmit"
HELPER = [sys.executable, "-m", "standins.netns"]
"""argv prefix of this module's helper commands (``record``, ``client``, ``wait-http``)."""
_counter = itertools.count()
_STALE = re.compile(rf"^{BASE_PREFIX}(\d+)x")
DEFAULT_POD_CIDR = "10.244.0.0/24"
ROUTED_GATEWAY = "169.254.1.1"
TOPOLOGIES = ("bridge", "routed")


class HarnessError(RuntimeError):
    pass


def require_netns() -> None:
    """Raise ``HarnessError`` saying what is missing when namespaces cannot be created here."""
    if os.geteuid() != 0:
        raise HarnessError("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
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


def pod_network(
    pod_ips: Sequence[str] | None, pod_cidr: str | None = None
) -> tuple[ipaddress.IPv4Network, str]:
    """The bridge subnet and the bridge (node) address for pods with these addresses.

    Without ``pod_cidr`` the subnet is the /24 of the first pod; every pod must be in it. The
    bridge takes the first host address that no pod has (``.1`` unless a pod holds it).
    """
    try:
        ips = [ipaddress.IPv4Address(ip) for ip in pod_ips or ()]
        if pod_cidr is not None:
            network = ipaddress.IPv4Network(pod_cidr, strict=False)
        elif ips:
            network = ipaddress.IPv4Network(f"{ips[0]}/24", strict=False)
        else:
            network = ipaddress.IPv4Network(DEFAULT_POD_CIDR)
    except ValueError as exc:
        raise HarnessError(f"bad pod address or subnet: {exc}") from None
    if len(set(ips)) != len(ips):
        raise HarnessError(f"pod addresses repeat: {', '.join(map(str, ips))}")
    usable = set(network.hosts())
    outside = [str(ip) for ip in ips if ip not in usable]
    if outside:
        raise HarnessError(
            f"pods must share one subnet with the node: {', '.join(outside)} not a host address of {network}"
        )
    free = (host for host in network.hosts() if host not in set(ips))
    bridge = next(free, None)
    if bridge is None:
        raise HarnessError(f"no address left in {network} for the node's bridge")
    return network, str(bridge)


@dataclass(frozen=True)
class Pod:
    ns: str
    ip: str
    host_veth: str


class Recorder:
    """A running ``record`` helper: answers fixed JSON and logs each hit's source address."""

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
    """The node namespace and its pods. ``pods`` is a count, or the pods' addresses in order."""

    def __init__(
        self,
        pods: int | Sequence[str] = 2,
        *,
        prefix: str | None = None,
        route_localnet: bool = True,
        bridge: str = "cbr0",
        pod_cidr: str | None = None,
        node_address: str = "10.240.0.4/16",
        metadata_ip: str = "169.254.169.254",
        topology: str = "bridge",
        cni_cache: bool = True,
        cni_cache_dir: str | os.PathLike[str] | None = None,
        cni_network: str = "kubenet",
    ) -> None:
        if topology not in TOPOLOGIES:
            raise HarnessError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
        self.topology = topology
        self.prefix = prefix or unique_prefix()
        self.ns = f"{self.prefix}-node"
        self.bridge = bridge
        self.route_localnet = route_localnet
        self.metadata_ip = metadata_ip
        if isinstance(pods, int):
            network = ipaddress.IPv4Network(pod_cidr or DEFAULT_POD_CIDR)
            hosts = network.hosts()
            self.bridge_ip = str(next(hosts))
            ips = [str(next(hosts)) for _ in range(pods)]
        else:
            ips = [str(ipaddress.IPv4Address(ip)) for ip in pods]
            network, self.bridge_ip = pod_network(ips, pod_cidr)
        self.pod_network = network
        self._pod_prefixlen = network.prefixlen
        self.node_interface = ipaddress.IPv4Interface(node_address)
        if self.node_interface.network.overlaps(network):
            raise HarnessError(f"pod subnet {network} overlaps the node's uplink {self.node_interface}")
        self.node_ip = str(self.node_interface.ip)
        self.pods = [Pod(f"{self.prefix}-pod{i}", ip, f"veth{i}") for i, ip in enumerate(ips)]
        self._procs: list[subprocess.Popen[Any]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.cni_cache = cni_cache and topology == "bridge"
        """Write a runtime's CNI result cache file for each bridged pod when the node is built."""
        self._cni_cache_dir = Path(cni_cache_dir) if cni_cache_dir is not None else None
        self.cni_network = cni_network

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
        if self.topology == "routed":
            self._build_routed()
        else:
            self._build_bridge()
        # Off, as the default of a new namespace and of many CNIs: only explicit rules stop spoofing.
        rp_filter = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        self.run_in(self.ns, ["sysctl", "-qw", *rp_filter])
        if self.route_localnet:
            self.set_route_localnet(True)
        if self.cni_cache:
            for pod in self.pods:
                self.write_cni_cache(pod)

    def _uplink(self) -> list[str]:
        gateway = self.node_interface.network.network_address + 1
        return [
            # On lo rather than a dummy link: some kernels (Firecracker CI VMs) lack the dummy driver.
            f"addr add {self.metadata_ip}/32 dev lo",
            # The uplink is a veth whose peer stays in the node namespace, for the same reason.
            "link add eth0 type veth peer name uplink0",
            f"addr add {self.node_interface} dev eth0",
            "link set uplink0 up",
            "link set eth0 up",
            f"route add default via {gateway} dev eth0",
        ]

    def _build_routed(self) -> None:
        self.run_in(self.ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        node = ["link set lo up", *self._uplink()]
        for pod in self.pods:
            node += [
                f"link add {pod.host_veth} type veth peer name eth0 netns {pod.ns}",
                f"link set {pod.host_veth} up",
                f"route add {pod.ip}/32 dev {pod.host_veth}",
            ]
        _ip_batch(node, self.ns)
        keys = [f"net.ipv4.conf.{pod.host_veth}.proxy_arp=1" for pod in self.pods]
        keys += [f"net.ipv4.conf.{pod.host_veth}.rp_filter=0" for pod in self.pods]
        # As Calico does: answer proxy ARP at once (the default delays it up to 0.8 s).
        keys += [f"net.ipv4.neigh.{pod.host_veth}.proxy_delay=0" for pod in self.pods]
        if keys:
            self.run_in(self.ns, ["sysctl", "-qw", *keys])
        for pod in self.pods:
            _ip_batch(
                [
                    "link set lo up",
                    f"addr add {pod.ip}/32 dev eth0",
                    "link set eth0 up",
                    f"route add {ROUTED_GATEWAY} dev eth0 scope link",
                    f"route add default via {ROUTED_GATEWAY} dev eth0",
                ],
                pod.ns,
            )

    def _build_bridge(self) -> None:
        node = [
            "link set lo up",
            f"link add {self.bridge} type bridge",
            f"addr add {self.bridge_ip}/{self._pod_prefixlen} dev {self.bridge}",
            f"link set {self.bridge} up",
            *self._uplink(),
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

    # -- the container runtime's CNI result cache (libcni cniCacheV1), bridged pods only ---------

    @property
    def cni_cache_dir(self) -> Path:
        """Where this node's runtime keeps CNI results (``/var/lib/cni/results`` on a real node)."""
        return self._cni_cache_dir if self._cni_cache_dir is not None else self.tmpdir / "cni-results"

    @staticmethod
    def container_id(pod: Pod) -> str:
        return pod.ns.encode().hex().ljust(64, "0")[:64]

    def cni_cache_path(self, pod: Pod) -> Path:
        return self.cni_cache_dir / f"{self.cni_network}-{self.container_id(pod)}-eth0"

    def mac_of(self, ns: str, device: str) -> str:
        links = json.loads(self.run_in(ns, ["ip", "-j", "link", "show", "dev", device]).stdout)
        return str(links[0]["address"])

    def cni_result(self, pod: Pod) -> dict[str, Any]:
        """The cache document libcni writes after the bridge plugin's ADD for ``pod``: interfaces
        bridge, host veth, container eth0 (the only one with a sandbox), and the pod's address."""
        if self.topology != "bridge":
            raise HarnessError("CNI cache files are written for bridged pods only")
        sandbox = {"name": "eth0", "mac": self.mac_of(pod.ns, "eth0"), "sandbox": f"/var/run/netns/{pod.ns}"}
        address = {"address": f"{pod.ip}/{self._pod_prefixlen}", "gateway": self.bridge_ip, "interface": 2}
        return {
            "kind": "cniCacheV1",
            "containerId": self.container_id(pod),
            "config": "",
            "ifName": "eth0",
            "networkName": self.cni_network,
            "cniArgs": [["K8S_POD_NAMESPACE", "default"], ["K8S_POD_NAME", pod.ns]],
            "result": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": self.bridge, "mac": self.mac_of(self.ns, self.bridge)},
                    {"name": pod.host_veth, "mac": self.mac_of(self.ns, pod.host_veth)},
                    sandbox,
                ],
                "ips": [address],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {},
            },
        }

    def write_cni_cache(self, pod: Pod) -> Path:
        """Write ``pod``'s cache file as a runtime does after a successful ADD (atomically)."""
        path = self.cni_cache_path(pod)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.cni_result(pod)))
        tmp.rename(path)
        return path

    def remove_cni_cache(self, pod: Pod) -> None:
        """What a runtime does on DEL."""
        self.cni_cache_path(pod).unlink(missing_ok=True)

    def set_route_localnet(self, enabled: bool) -> None:
        value = int(enabled)
        names = ("all", self.bridge) if self.topology == "bridge" else ("all",)
        keys = [f"net.ipv4.conf.{name}.route_localnet={value}" for name in names]
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

    def detach(self) -> None:
        """Forget the namespaces' owner: processes and namespaces outlive this object (the sandbox)."""
        self._procs.clear()
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
        argv = [*HELPER, "record", "--host", host, "--port", str(port), "--name", name, "--hits", str(hits)]
        proc = self.spawn_in(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            proc.kill()
            _, err = proc.communicate()
            raise HarnessError(f"recorder {name} did not start on {host}:{port}: {line!r} {err.strip()}")
        return Recorder(proc, int(line.split()[1]), hits)

    @staticmethod
    def client_argv(host: str, port: int, **options: Any) -> list[str]:
        """argv for the ``client`` helper; options become ``--key value`` flags (``True``: ``--key``)."""
        argv = [*HELPER, "client", host, str(port)]
        for key, value in options.items():
            flag = f"--{key.replace('_', '-')}"
            if value is True:
                argv.append(flag)
            elif value is not False and value is not None:
                argv += [flag, str(value)]
        return argv

    async def http_get(self, ns: str, host: str, port: int, **options: Any) -> dict[str, Any]:
        """One GET from inside ``ns``: ``{"ok", "status", "body", "error"}`` (and ``headers``)."""
        result = await self.arun_in(ns, self.client_argv(host, port, **options), timeout=15.0)
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed

    def http_get_sync(self, ns: str, host: str, port: int, **options: Any) -> dict[str, Any]:
        result = self.run_in(ns, self.client_argv(host, port, **options), timeout=15.0)
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed

    def rule_packets(self, table: str, rule: str) -> int | None:
        """Packet counter of the rule whose ``iptables-save`` text (after ``-A``) contains ``rule``."""
        text = self.run_in(self.ns, ["iptables-save", "-c", "-t", table]).stdout
        for line in text.splitlines():
            match = re.match(r"^\[(\d+):\d+\] -A (.*)$", line)
            if match and rule in match[2]:
                return int(match[1])
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "node": {
                "ns": self.ns,
                "ip": self.node_ip,
                "bridge_ip": self.bridge_ip,
                "topology": self.topology,
            },
            "metadata_ip": self.metadata_ip,
            "pods": [{"ns": pod.ns, "ip": pod.ip} for pod in self.pods],
        }


# --- helper programs, run inside the namespaces ---------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which waits for DNS timeouts
        # inside an isolated namespace.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def _record_main(argv: Sequence[str]) -> None:
    """HTTP server for IMDS or NMI: fixed JSON answers, one JSON line per hit in ``--hits``.

    Prints ``READY <port>`` once listening so callers wait for an event instead of sleeping.
    Keep-alive (HTTP/1.1) is supported so tests can hold a connection open across rule changes.
    """
    parser = argparse.ArgumentParser(prog="standins.netns record")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", required=True)
    parser.add_argument("--hits", required=True)
    args = parser.parse_args(argv)
    hits = open(args.hits, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            client, client_port = self.client_address[:2]
            record = {"server": args.name, "client": client, "client_port": client_port, "path": self.path}
            # Recorded before answering: once the client has its answer, the hit is on disk.
            hits.write(json.dumps(record) + "\n")
            hits.flush()
            body = json.dumps({"server": args.name, "client": client}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *items: object) -> None:
            pass

    server = _Server((args.host, args.port), Handler)
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


def _request(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> dict[str, Any]:
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        raw = response.read().decode(errors="replace")
        try:
            body: object = json.loads(raw)
        except ValueError:
            body = raw
        return {
            "ok": True,
            "status": response.status,
            "body": body,
            "error": None,
            "headers": {k.lower(): v for k, v in response.getheaders()},
        }
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return {"ok": False, "status": None, "body": None, "error": f"{type(exc).__name__}: {exc}"}


def _client_main(argv: Sequence[str]) -> None:
    """Minimal HTTP client run inside a namespace; prints one JSON result line per request.

    One-shot by default, with ``Metadata: true`` as an Azure SDK sends it (``--no-metadata``
    leaves it out). With ``--interactive`` it keeps one connection and sends a request for every
    line read on stdin, so a test can change rules between requests on the same flow. ``--uid``
    drops to that uid before connecting (owner-match tests).
    """
    parser = argparse.ArgumentParser(prog="standins.netns client")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--path", default="/metadata/identity/oauth2/token")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--uid", type=int)
    parser.add_argument("--no-metadata", action="store_true")
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--interactive", action="store_true")
    args = parser.parse_args(argv)
    headers = {} if args.no_metadata else {"Metadata": "true"}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    if args.uid is not None:
        os.setuid(args.uid)
    conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
    if not args.interactive:
        print(json.dumps(_request(conn, args.path, headers)), flush=True)
        return
    conn.connect()
    assert conn.sock is not None
    print(json.dumps({"connected": conn.sock.getsockname()[1]}), flush=True)
    for _ in sys.stdin:
        # A closed connection must not silently reconnect: the test is about one flow.
        if conn.sock is None:
            result: dict[str, Any] = {"ok": False, "status": None, "body": None, "error": "closed"}
        else:
            result = _request(conn, args.path, headers)
        print(json.dumps(result), flush=True)


def _wait_http_main(argv: Sequence[str]) -> int:
    """Exit 0 as soon as ``GET http://HOST:PORT/PATH`` answers 200; 1 after ``--timeout`` seconds."""
    parser = argparse.ArgumentParser(prog="standins.netns wait-http")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--path", default="/readyz")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while True:
        conn = http.client.HTTPConnection(args.host, args.port, timeout=1.0)
        answer = _request(conn, args.path, {})
        conn.close()
        if answer["status"] == 200:
            return 0
        last = f"{answer['status']} {answer['body']}" if answer["ok"] else str(answer["error"])
        if time.monotonic() >= deadline:
            print(f"http://{args.host}:{args.port}{args.path}: {last}", file=sys.stderr)
            return 1
        time.sleep(0.05)


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn(src: str, dst: str, sport: int, dport: int, *, seq: int = 1, ident: int = 1) -> bytes:
    """An IPv4 packet carrying a TCP SYN from ``src:sport`` to ``dst:dport``, checksums computed."""
    import struct

    saddr, daddr = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    # data offset 5 words, flags SYN; window 64240; checksum 0 while computing it.
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    # version 4, IHL 5; total length; DF; TTL 64; protocol TCP; checksum 0 while computing it.
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, 0x4000, 64, 6, 0, saddr, daddr)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + tcp


def _spoof_syn_main(argv: Sequence[str]) -> None:
    """Send TCP SYNs with a forged source address from a raw socket (needs only CAP_NET_RAW).

    ``IPPROTO_RAW`` implies ``IP_HDRINCL``: the kernel routes by the destination and sends the
    header as written, source included. Prints ``{"sent": N}``.
    """
    import socket

    parser = argparse.ArgumentParser(prog="standins.netns spoof-syn")
    parser.add_argument("--src", required=True, help="the forged source address (the victim's)")
    parser.add_argument("--dst", default="169.254.169.254")
    parser.add_argument("--dport", type=int, default=80)
    parser.add_argument("--sport", type=int, default=40000)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        for n in range(args.count):
            packet = tcp_syn(args.src, args.dst, args.sport + n, args.dport, seq=1000 + n, ident=n + 1)
            raw.sendto(packet, (args.dst, 0))
    print(json.dumps({"sent": args.count}), flush=True)


def arp_frame(
    sender_mac: str, sender_ip: str, target_ip: str, *, op: int = 2, vlan: int | None = None
) -> bytes:
    """A broadcast (gratuitous) ARP frame: ``sender_ip is-at sender_mac``, to ``target_ip``;
    with ``vlan``, 802.1Q-tagged (ID 0 is a priority tag: the receiver strips it, keeps the ARP)."""
    import struct

    mac = bytes.fromhex(sender_mac.replace(":", ""))
    sip, tip = ipaddress.IPv4Address(sender_ip).packed, ipaddress.IPv4Address(target_ip).packed
    broadcast = b"\xff" * 6
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan & 0x0FFF)
    ethernet = broadcast + mac + tag + struct.pack("!H", 0x0806)
    target_mac = broadcast if op == 2 else b"\0" * 6
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + sip + target_mac + tip
    return ethernet + arp


def _garp_main(argv: Sequence[str]) -> None:
    """Send gratuitous ARP claiming ``--ip`` for this namespace's ``--dev`` MAC (AF_PACKET: NET_RAW)."""
    import socket

    parser = argparse.ArgumentParser(prog="standins.netns garp")
    parser.add_argument("--ip", required=True, help="the claimed address (the victim's)")
    parser.add_argument("--target", help="the target address (default: the claimed one)")
    parser.add_argument("--dev", default="eth0")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--vlan", type=int, default=None, help="802.1Q-tag the frame with this ID")
    args = parser.parse_args(argv)
    mac = Path(f"/sys/class/net/{args.dev}/address").read_text().strip()
    frame = arp_frame(mac, args.ip, args.target or args.ip, vlan=args.vlan)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((args.dev, 0))
        for _ in range(args.count):
            raw.send(frame)
    print(json.dumps({"sent": args.count, "mac": mac}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m standins.netns up [--pods N]`` builds a node and keeps it until SIGINT/SIGTERM;
    ``cleanup`` deletes namespaces left by dead runs; ``record``, ``client`` and ``wait-http`` are
    the helpers run inside namespaces."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    helpers: dict[str, Callable[[Sequence[str]], int | None]] = {
        "record": _record_main,
        "client": _client_main,
        "wait-http": _wait_http_main,
        "spoof-syn": _spoof_syn_main,
        "garp": _garp_main,
    }
    if args_list and args_list[0] in helpers:
        sys.exit(helpers[args_list[0]](args_list[1:]))
    parser = argparse.ArgumentParser(prog="standins.netns")
    parser.add_argument("command", choices=["up", "cleanup", *helpers])
    parser.add_argument("--pods", type=int, default=2)
    parser.add_argument("--topology", choices=TOPOLOGIES, default="bridge")
    args = parser.parse_args(args_list)
    require_netns()
    if args.command == "cleanup":
        print(json.dumps({"deleted": cleanup_stale()}))
        return
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    with Node(pods=args.pods, topology=args.topology) as node:
        print(json.dumps(node.describe()), flush=True)
        signal.sigwait(stop)


if __name__ == "__main__":
    main()
