"""``nmi-sandbox``: a node with its pods on this machine, from a ``--cluster-state`` file.

``up FILE`` builds a node network namespace and one namespace per pod (each with its
``status.podIP``, on a bridge with the node, or with ``--topology routed`` each behind its own
host veth with a /32 route, no bridge), starts the IMDS stand-in on 169.254.169.254:80 and
the real NMI (iptables management on) inside the node, waits for NMI's ``/readyz`` and returns,
leaving both running in the background. ``exec POD -- CMD`` runs a command in a pod's namespace;
``status`` says what is up; ``down`` removes everything ``up`` made.

Workload identity (``--kube``, automatic when the file has a ServiceAccount annotated
``azure.workload.identity/client-id`` or a bound ``AzureIdentity`` of ``type: 3``): NMI then reads
the cluster from the API server stand-in (TLS, on 127.0.0.1:6443 in the node, loaded with the
file's objects, the ServiceAccounts its pods run as and the node) instead of the file, and
exchanges service-account tokens at the Azure AD stand-in (TLS, 127.0.0.1:8443, its CA given to
NMI with ``--aad-ca-bundle``), which trusts the API server's CA to fetch the issuer's keys. For
every federated client, the Azure AD stand-in holds what an operator would create in Azure: the
app and a federated credential for the API server's issuer and ``system:serviceaccount:NS:SA``.
Both stand-ins run in one process, ``kube-aad``, with a plain-HTTP control port (127.0.0.1:8089:
``/readyz``, ``/exchanges``: the TokenRequests and token exchanges seen, tokens left out).

What ``up`` made is written to ``<state dir>/<prefix>.json`` (default ``/run/nmi-sandbox``), with
the processes' logs in ``<state dir>/<prefix>/``. The ``Sandbox`` class is the same machinery for
Python callers (the demo and the end-to-end tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standins.netns import HELPER, HarnessError, Node, delete_namespace, list_namespaces, pod_network

if TYPE_CHECKING:
    from standins.aad import AadStandin
    from standins.apiserver import FakeApiServer, IssuedToken

STATE_DIR = Path(os.environ.get("NMI_SANDBOX_DIR", "/run/nmi-sandbox"))
DEFAULT_PREFIX = "nmisb"
METADATA_IP = "169.254.169.254"
METADATA_PORT = 80
NMI_PORT = 2579
PROBE_PORT = 8085
METRICS_PORT = 9090
TOKEN_PATH = "/metadata/identity/oauth2/token"
API_PORT = 6443
AAD_PORT = 8443
CONTROL_PORT = 8089
FEDERATION_TENANT = "8d4f5a1e-7a3b-4c2d-9e10-5b6c7d8e9f00"
"""The tenant of federated clients whose service account names none (NMI's --federation-tenant-id)."""
KUBE_AAD = "kube-aad"
"""The process running the API server and Azure AD stand-ins."""
UPLINKS = ("10.240.0.4/16", "172.31.0.4/16", "192.168.254.4/24")
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class SandboxError(RuntimeError):
    """A clear, user-facing failure; ``code`` is the exit status of the command line."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PodEntry:
    namespace: str
    name: str
    ip: str
    netns: str | None
    """The pod's network namespace; ``None`` for a pod without an address (it cannot run)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def clean_env() -> dict[str, str]:
    """The environment without proxy settings: metadata traffic must never go to a proxy."""
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}


def _tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _netns_of(pid: int) -> str | None:
    result = subprocess.run(
        ["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None if result.returncode == 0 else None


def plan_pods(objects: Sequence[Any]) -> tuple[str, list[Any]]:
    """The node the file's pods run on, and its pods. Errors when the file names no or several nodes."""
    from podidentity.model import Pod

    pods = [obj for obj in objects if isinstance(obj, Pod)]
    nodes = sorted({pod.node_name for pod in pods if pod.node_name})
    if not nodes:
        raise SandboxError("the cluster state names no node: no pod has spec.nodeName")
    if len(nodes) > 1:
        raise SandboxError(f"the cluster state's pods run on several nodes ({', '.join(nodes)}); keep one")
    return nodes[0], [pod for pod in pods if pod.node_name == nodes[0]]


@dataclass(frozen=True, order=True)
class Federation:
    """One federated identity credential an operator would create in Azure: ``client_id``'s app (in
    ``tenant``) trusts the cluster's service-account tokens about ``subject``."""

    tenant: str
    client_id: str
    subject: str


def plan_federation(objects: Sequence[Any], tenant: str = FEDERATION_TENANT) -> list[Federation]:
    """The federated credentials the file's workload identities need: one per ServiceAccount annotated
    with a client ID, and one per (type-3 AzureIdentity, service account of a pod its bindings select).
    A tenant named by the annotation or the identity wins over ``tenant``."""
    from podidentity.model import AzureIdentity, AzureIdentityBinding, IdentityType, Pod, ServiceAccount

    planned: set[Federation] = set()
    for obj in objects:
        if isinstance(obj, ServiceAccount) and obj.client_id:
            subject = f"system:serviceaccount:{obj.namespace}:{obj.name}"
            planned.add(Federation(obj.tenant_id or tenant, obj.client_id, subject))
    identities = {
        (obj.namespace, obj.name): obj
        for obj in objects
        if isinstance(obj, AzureIdentity) and obj.type == IdentityType.FEDERATED
    }
    pods = [obj for obj in objects if isinstance(obj, Pod)]
    for obj in objects:
        if not isinstance(obj, AzureIdentityBinding):
            continue
        identity = identities.get((obj.namespace, obj.identity_name))
        if identity is None:
            continue
        for pod in pods:
            if pod.labels.get("aadpodidbinding") == obj.selector:
                subject = f"system:serviceaccount:{pod.namespace}:{pod.service_account}"
                planned.add(Federation(identity.tenant_id or tenant, identity.client_id, subject))
    return sorted(planned)


class Sandbox:
    """One sandbox, as described by its state; ``Sandbox.up`` makes one, ``Sandbox.load`` finds one."""

    def __init__(self, state: dict[str, Any], state_path: Path) -> None:
        self.state = state
        self.state_path = state_path
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # --- finding -------------------------------------------------------------------------

    @staticmethod
    def path_for(prefix: str, state_dir: Path = STATE_DIR) -> Path:
        return state_dir / f"{prefix}.json"

    @classmethod
    def load(cls, prefix: str, state_dir: Path = STATE_DIR) -> Sandbox | None:
        path = cls.path_for(prefix, state_dir)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SandboxError(f"unreadable sandbox state {path}: {exc}") from None
        return cls(state, path)

    @staticmethod
    def prefixes(state_dir: Path = STATE_DIR) -> list[str]:
        if not state_dir.is_dir():
            return []
        return sorted(path.stem for path in state_dir.glob("*.json"))

    # --- properties ----------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return str(self.state["prefix"])

    @property
    def node_ns(self) -> str:
        return str(self.state["node_ns"])

    @property
    def log_dir(self) -> Path:
        return Path(self.state["log_dir"])

    def pods(self) -> list[PodEntry]:
        return [PodEntry(**entry) for entry in self.state.get("pods", [])]

    def pod(self, ref: str) -> PodEntry:
        """A pod by ``name`` or ``namespace/name``; ``SandboxError`` (code 2) when unknown or ambiguous."""
        pods = self.pods()
        if "/" in ref:
            found = [pod for pod in pods if pod.key == ref]
        else:
            found = [pod for pod in pods if pod.name == ref]
        known = ", ".join(pod.key for pod in pods) or "none"
        if not found:
            raise SandboxError(f"no pod {ref!r} in sandbox {self.prefix} (pods: {known})", code=2)
        if len(found) > 1:
            names = ", ".join(pod.key for pod in found)
            raise SandboxError(f"pod name {ref!r} is ambiguous ({names}): use namespace/name", code=2)
        if found[0].netns is None:
            raise SandboxError(f"pod {found[0].key} has no status.podIP, so no network namespace", code=2)
        return found[0]

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_path)

    # --- up ------------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        cluster_state: str | os.PathLike[str],
        *,
        mode: str = "standard",
        prefix: str = DEFAULT_PREFIX,
        state_dir: Path = STATE_DIR,
        nmi_args: Sequence[str] = (),
        ready_timeout: float = 20.0,
        topology: str = "bridge",
        kube: bool | None = None,
    ) -> Sandbox:
        """``kube``: NMI against the API server and Azure AD stand-ins (workload identity) instead of
        the file; ``None`` decides from the file (any federated credential needed means yes)."""
        from nmi.cluster_file import load
        from podidentity.errors import ConfigError

        if not _PREFIX_RE.match(prefix):
            raise SandboxError(f"bad prefix {prefix!r}: lower-case letters, digits and '-', at most 40")
        if mode not in ("standard", "managed"):
            raise SandboxError(f"bad mode {mode!r}: standard or managed")
        path = Path(cluster_state).resolve()
        try:
            objects = load(path)
        except ConfigError as exc:
            raise SandboxError(str(exc)) from None
        node_name, pods = plan_pods(objects)
        federation = plan_federation(objects)
        if kube is None:
            kube = bool(federation)
        addressed = [pod for pod in pods if pod.ip and not pod.host_network]
        ips = list(dict.fromkeys(pod.ip for pod in addressed))
        if not ips:
            raise SandboxError(f"no pod on node {node_name} has a status.podIP")
        try:
            network, _ = pod_network(ips)
            # The node's uplink (which goes nowhere) must not overlap the pods' subnet.
            uplink = next(u for u in UPLINKS if not ipaddress.IPv4Interface(u).network.overlaps(network))
            node = Node(ips, prefix=prefix, node_address=uplink, topology=topology)
        except HarnessError as exc:
            raise SandboxError(str(exc)) from None

        state_dir.mkdir(parents=True, exist_ok=True)
        state_path = cls.path_for(prefix, state_dir)
        try:
            fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise SandboxError(
                f"sandbox {prefix!r} is already up (state in {state_path}); run 'nmi-sandbox down"
                + ("" if prefix == DEFAULT_PREFIX else f" --prefix {prefix}")
                + "' first"
            ) from None
        os.close(fd)
        netns_by_ip = {pod.ip: pod.ns for pod in node.pods}
        entries = []
        for pod in pods:
            netns = node.ns if pod.host_network else netns_by_ip.get(pod.ip)
            entries.append(PodEntry(pod.namespace, pod.name, pod.ip, netns).__dict__)
        log_dir = state_dir / prefix
        sandbox = cls(
            {
                "prefix": prefix,
                "status": "starting",
                "owner_pid": os.getpid(),
                "cluster_state": str(path),
                "node_name": node_name,
                "mode": mode,
                "node_ns": node.ns,
                "namespaces": node.namespaces,
                "subnet": str(node.pod_network),
                "bridge_ip": node.bridge_ip,
                "topology": topology,
                "metadata": f"{METADATA_IP}:{METADATA_PORT}",
                "ports": {"nmi": NMI_PORT, "probe": PROBE_PORT, "metrics": METRICS_PORT},
                "pods": entries,
                "processes": {},
                "log_dir": str(log_dir),
                "nmi_args": list(nmi_args),
                "kube": None,
            },
            state_path,
        )
        if kube:
            sandbox.state["kube"] = {
                "api": f"https://127.0.0.1:{API_PORT}",
                "issuer": f"https://127.0.0.1:{API_PORT}",
                "authority": f"https://127.0.0.1:{AAD_PORT}/",
                "tenant": FEDERATION_TENANT,
                "control": CONTROL_PORT,
                "kubeconfig": str(log_dir / "kubeconfig"),
                "aad_ca": str(log_dir / "aad-ca.pem"),
                "federation": [f.__dict__ for f in federation],
            }
        try:
            sandbox._save()
            log_dir.mkdir(parents=True, exist_ok=True)
            node.create()
            node.detach()  # the namespaces outlive this process; down() deletes them
            imds = [*_python(), "-m", "standins.imds", "--host", METADATA_IP, "--port", str(METADATA_PORT)]
            # A system-assigned identity too, so excepted pods get the node's own identity, as on a VM.
            imds += ["--identities-from", str(path), "--system-assigned"]
            sandbox._spawn("imds", imds)
            if kube:
                # Started together: each takes a few hundred milliseconds of imports.
                sandbox._spawn(KUBE_AAD, sandbox.kube_aad_argv())
            sandbox._wait_http("imds", METADATA_IP, METADATA_PORT, "/__standin/identities", 10.0)
            if kube:
                sandbox._wait_http(KUBE_AAD, "127.0.0.1", CONTROL_PORT, "/readyz", 15.0)
            sandbox.start_nmi(nmi_args, ready_timeout=ready_timeout)
            sandbox.state["status"] = "up"
            sandbox._save()
        except BaseException:
            sandbox.down()
            raise
        return sandbox

    @property
    def kube(self) -> dict[str, Any] | None:
        """Where the API server and Azure AD stand-ins are (``--kube``), else ``None``."""
        kube: dict[str, Any] | None = self.state.get("kube")
        return kube

    def kube_aad_argv(self) -> list[str]:
        kube = self.kube
        assert kube is not None
        return [
            *_python(),
            "-m",
            "standins.sandbox",
            KUBE_AAD,
            "--cluster-state",
            self.state["cluster_state"],
            "--dir",
            str(self.log_dir),
            "--tenant",
            kube["tenant"],
        ]

    def _source_args(self) -> list[str]:
        """Where NMI reads the cluster from: the file, or the API server stand-in (and Azure AD's)."""
        kube = self.kube
        if kube is None:
            return ["--cluster-state", self.state["cluster_state"]]
        return [
            "--kubeconfig",
            kube["kubeconfig"],
            "--aad-ca-bundle",
            kube["aad_ca"],
            "--federation-authority-host",
            kube["authority"],
            "--federation-tenant-id",
            kube["tenant"],
        ]

    def nmi_argv(self, extra: Sequence[str] = ()) -> list[str]:
        return [
            *_python(),
            "-m",
            "nmi",
            *self._source_args(),
            "--node",
            self.state["node_name"],
            "--operation-mode",
            self.state["mode"],
            "--nmi-listen-address",
            "127.0.0.1",
            "--nmi-port",
            str(NMI_PORT),
            "--metadata-ip",
            METADATA_IP,
            "--metadata-port",
            str(METADATA_PORT),
            "--http-probe-port",
            str(PROBE_PORT),
            "--prometheus-port",
            str(METRICS_PORT),
            "--manage-iptables=true",
            *extra,
        ]

    def start_nmi(self, extra: Sequence[str] | None = None, *, ready_timeout: float = 20.0) -> int:
        """Start NMI (again) in the node and wait until it is ready; returns its pid."""
        if self.nmi_running():
            raise SandboxError(f"NMI is already running (pid {self.state['processes']['nmi']['pid']})")
        args = list(self.state.get("nmi_args", []) if extra is None else extra)
        self.state["nmi_args"] = args
        pid = self._spawn("nmi", self.nmi_argv(args))
        self._wait_http("nmi", "127.0.0.1", PROBE_PORT, "/readyz", ready_timeout)
        return pid

    def _spawn(self, name: str, argv: list[str]) -> int:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            # A session of its own: Ctrl-C in the terminal that ran 'up' must not reach it.
            proc = subprocess.Popen(
                Node.wrap(self.node_ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=clean_env(),
            )
        self._children[name] = proc
        # 'ip netns exec' execs the command, so this pid is the process itself.
        self.state["processes"][name] = {"pid": proc.pid, "argv": argv, "log": str(log_path)}
        self._save()
        return proc.pid

    def _wait_http(self, name: str, host: str, port: int, path: str, timeout: float) -> None:
        argv = Node.wrap(self.node_ns, [*HELPER, "wait-http", host, str(port), "--path", path])
        waiter = subprocess.Popen(
            [*argv, "--timeout", str(timeout)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            while waiter.poll() is None:
                if not self.process_running(name):
                    raise SandboxError(
                        f"{name} exited during start-up; the end of its log "
                        f"({self.state['processes'][name]['log']}):\n{_tail(self.state['processes'][name]['log'])}"
                    )
                time.sleep(0.05)
        finally:
            if waiter.poll() is None:
                waiter.kill()
            _, err = waiter.communicate()
        if waiter.returncode != 0:
            log = self.state["processes"][name]["log"]
            raise SandboxError(
                f"{name} not ready after {timeout:g}s ({err.strip()}); "
                f"the end of its log ({log}):\n{_tail(log)}"
            )

    # --- processes -----------------------------------------------------------------------

    def _pid(self, name: str) -> int | None:
        entry = self.state.get("processes", {}).get(name)
        return int(entry["pid"]) if entry else None

    def process_running(self, name: str) -> bool:
        child = self._children.get(name)
        if child is not None:
            return child.poll() is None
        pid = self._pid(name)
        # A pid alone could have been reused: it must still live in our node namespace.
        return pid is not None and _running(pid) and _netns_of(pid) == self.node_ns

    def nmi_running(self) -> bool:
        return self.process_running("nmi")

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal ``name`` and wait for it to end (SIGKILL after ``timeout``); its exit status if known."""
        if not self.process_running(name):
            self._reap(name)
            return None
        pid = self._pid(name)
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while self.process_running(name):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.02)
        return self._reap(name)

    def stop_nmi(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        return self.stop_process("nmi", sig, timeout)

    def _reap(self, name: str) -> int | None:
        child = self._children.pop(name, None)
        return child.wait() if child is not None else None

    # --- inside the namespaces -----------------------------------------------------------

    def pod_argv(self, ref: str, argv: Sequence[str]) -> list[str]:
        netns = self.pod(ref).netns
        assert netns is not None
        return Node.wrap(netns, argv)

    def run(
        self, netns: str, argv: Sequence[str], *, timeout: float = 15.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            Node.wrap(netns, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
            check=False,
        )
        if check and result.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv)} in {netns} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def http(
        self, netns: str, host: str, port: int, path: str, *, timeout: float = 5.0, **options: Any
    ) -> dict[str, Any]:
        """One GET from inside ``netns`` (``Metadata: true`` unless ``no_metadata=True``):
        ``{"ok", "status", "body", "headers", "error"}``."""
        argv = Node.client_argv(host, port, path=path, timeout=timeout, **options)
        result = self.run(netns, argv, timeout=timeout + 10, check=True)
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed

    def token_from(self, pod: str, resource: str = "https://vault.azure.net", **query: str) -> dict[str, Any]:
        """What an Azure SDK in ``pod`` gets from the metadata address for ``resource``."""
        from urllib.parse import urlencode

        params = urlencode({"api-version": "2018-02-01", "resource": resource, **query})
        netns = self.pod(pod).netns
        assert netns is not None
        return self.http(netns, METADATA_IP, METADATA_PORT, f"{TOKEN_PATH}?{params}")

    def imds_requests(self) -> list[dict[str, Any]]:
        """The token requests the IMDS stand-in received (its control endpoint, from the node)."""
        answer = self.http(self.node_ns, METADATA_IP, METADATA_PORT, "/__standin/requests", no_metadata=True)
        if answer["status"] != 200:
            raise SandboxError(f"IMDS stand-in counters unavailable: {answer}")
        requests: list[dict[str, Any]] = answer["body"]["requests"]
        return requests

    def exchanges(self) -> dict[str, Any]:
        """What the API server and Azure AD stand-ins saw (``--kube``): ``{"issuer", "token_requests":
        [{"namespace", "service_account", "pod", "iss", "sub", "aud"}], "aad_calls": [{"tenant",
        "client_id", "scope", "method", "status", "error", "federated_subject"}], "federation"}``."""
        if self.kube is None:
            raise SandboxError(f"sandbox {self.prefix} runs NMI from its file: no API server, no Azure AD")
        answer = self.http(self.node_ns, "127.0.0.1", CONTROL_PORT, "/exchanges", no_metadata=True)
        if answer["status"] != 200:
            raise SandboxError(f"the API server and Azure AD stand-ins did not answer: {answer}")
        body: dict[str, Any] = answer["body"]
        return body

    def metrics(self) -> str:
        answer = self.http(self.node_ns, "127.0.0.1", METRICS_PORT, "/metrics", no_metadata=True)
        if answer["status"] != 200:
            raise SandboxError(f"NMI metrics unavailable: {answer}")
        return str(answer["body"])

    def readiness(self) -> dict[str, Any]:
        return self.http(self.node_ns, "127.0.0.1", PROBE_PORT, "/readyz", no_metadata=True)

    def raw_rules(self) -> str:
        """``iptables-save -t raw`` in the node, without comments and counters."""
        text = self.run(self.node_ns, ["iptables-save", "-t", "raw"], check=True).stdout
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in lines)

    def nat_rules(self) -> str:
        """``iptables-save -t nat`` in the node, without comments and counters."""
        text = self.run(self.node_ns, ["iptables-save", "-t", "nat"], check=True).stdout
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in lines)

    # --- down ----------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop NMI (SIGTERM) and the stand-in, delete the namespaces, logs and state; what was done."""
        done = []
        for name in ("nmi", KUBE_AAD, "imds"):
            if self.process_running(name):
                self.stop_process(name)
                done.append(f"stopped {name}")
            else:
                self._reap(name)
        existing = set(list_namespaces())
        for netns in self.state.get("namespaces", []):
            if netns in existing:
                delete_namespace(netns)  # the rules live in the node namespace and go with it
                done.append(f"deleted netns {netns}")
        for pattern in ("*.log", "*.pem", "kubeconfig"):
            for path in self.log_dir.glob(pattern) if self.log_dir.is_dir() else ():
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.log_dir.rmdir()
        self.state_path.unlink(missing_ok=True)
        self.state_path.with_suffix(".tmp").unlink(missing_ok=True)
        return done

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        namespaces = set(list_namespaces())
        processes = {}
        for name, entry in self.state.get("processes", {}).items():
            processes[name] = {**entry, "running": self.process_running(name)}
        ready = None
        if processes.get("nmi", {}).get("running"):
            with contextlib.suppress(SandboxError, subprocess.TimeoutExpired, ValueError):
                ready = self.readiness().get("status") == 200
        return {
            **{k: v for k, v in self.state.items() if k not in ("processes",)},
            "namespaces_present": [ns for ns in self.state.get("namespaces", []) if ns in namespaces],
            "processes": processes,
            "nmi_ready": ready,
        }


def _python() -> list[str]:
    return [sys.executable]


# --- command line ---------------------------------------------------------------------------------


def _resolve_prefix(given: str | None, state_dir: Path) -> str:
    if given:
        return given
    up = Sandbox.prefixes(state_dir)
    if len(up) > 1:
        raise SandboxError(f"several sandboxes are up ({', '.join(up)}): pass --prefix")
    return up[0] if up else DEFAULT_PREFIX


def _require(prefix: str, state_dir: Path) -> Sandbox:
    sandbox = Sandbox.load(prefix, state_dir)
    if sandbox is None:
        raise SandboxError(f"sandbox {prefix!r} is not up (no {Sandbox.path_for(prefix, state_dir)})")
    return sandbox


def _print_status(info: dict[str, Any]) -> None:
    print(f"sandbox {info['prefix']}: {info['status']}, node {info['node_name']} ({info['mode']} mode)")
    print(f"  cluster state  {info['cluster_state']}")
    if info.get("topology", "bridge") == "routed":
        print(f"  node netns     {info['node_ns']}  routed pods, a /32 route each ({info['subnet']})")
    else:
        print(f"  node netns     {info['node_ns']}  bridge {info['bridge_ip']} ({info['subnet']})")
    ports = info["ports"]
    print(
        f"  endpoints      NMI 127.0.0.1:{ports['nmi']}, /readyz :{ports['probe']}, "
        f"/metrics :{ports['metrics']}, IMDS stand-in {info['metadata']}"
    )
    kube = info.get("kube")
    if kube:
        print(
            f"  workload id.   API server stand-in {kube['api']} (issuer {kube['issuer']}), "
            f"Azure AD stand-in {kube['authority']} (tenant {kube['tenant']}); "
            f"{len(kube['federation'])} federated credential(s)"
        )
    for name, proc in info["processes"].items():
        state = "running" if proc["running"] else "NOT running"
        extra = ""
        if name == "nmi" and proc["running"]:
            extra = ", ready" if info["nmi_ready"] else ", NOT ready"
        print(f"  {name:<14} pid {proc['pid']} {state}{extra}; log {proc['log']}")
    for pod in info["pods"]:
        where = pod["netns"] or "(no podIP: not started)"
        print(f"  pod {pod['namespace'] + '/' + pod['name']:<28} {pod['ip'] or '-':<15} netns {where}")
    missing = sorted(set(info["namespaces"]) - set(info["namespaces_present"]))
    if missing:
        print(f"  missing netns: {', '.join(missing)}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", help=f"names of the namespaces and state (default {DEFAULT_PREFIX})")
    common.add_argument("--state-dir", type=Path, default=STATE_DIR, help=f"default {STATE_DIR}")
    p = argparse.ArgumentParser(prog="nmi-sandbox", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up",
        parents=[common],
        help="build the node and pods, start IMDS stand-in and NMI",
        usage="nmi-sandbox up FILE [--mode standard|managed] [--topology bridge|routed] [--kube|--no-kube] "
        "[--prefix NAME] [-- MORE NMI FLAGS...]",
    )
    up.add_argument("file", help="a --cluster-state YAML file")
    up.add_argument("--mode", choices=["standard", "managed"], default="standard")
    up.add_argument("--ready-timeout", type=float, default=20.0)
    up.add_argument(
        "--topology",
        choices=["bridge", "routed"],
        default="bridge",
        help="pods on a bridge (kubenet-like) or each behind its own routed veth (Calico-like)",
    )
    up.add_argument(
        "--kube",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NMI against API server and Azure AD stand-ins (workload identity) instead of the file; "
        "default: when the file has a federated service account or type-3 identity",
    )
    ex = sub.add_parser("exec", parents=[common], help="run a command inside a pod's network namespace")
    ex.add_argument("pod", help="name or namespace/name")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    ex.usage = "nmi-sandbox exec [--prefix NAME] POD -- CMD [ARGS...]"
    sub.add_parser("down", parents=[common], help="stop everything and delete the namespaces")
    st = sub.add_parser("status", parents=[common], help="what is up")
    st.add_argument("--json", action="store_true")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    after: list[str] | None = None
    if words[:1] in (["up"], ["exec"]) and "--" in words:
        # Everything after the first '--' is NMI's flags (up) or the command (exec), verbatim.
        at = words.index("--")
        words, after = words[:at], words[at + 1 :]
    args = _parser().parse_args(words)
    if args.command == "up":
        args.nmi_args = after or []
    elif args.command == "exec" and after is not None:
        if args.cmd:
            raise SandboxError(f"unexpected {' '.join(args.cmd)!r} before '--'", code=2)
        args.cmd = after
    state_dir: Path = args.state_dir
    if args.command == "up":
        if os.geteuid() != 0:
            raise SandboxError("nmi-sandbox up needs root (network namespaces and iptables)")
        prefix = args.prefix or DEFAULT_PREFIX
        started = time.monotonic()
        sandbox = Sandbox.up(
            args.file,
            mode=args.mode,
            prefix=prefix,
            state_dir=state_dir,
            nmi_args=args.nmi_args,
            ready_timeout=args.ready_timeout,
            topology=args.topology,
            kube=args.kube,
        )
        pods = ", ".join(f"{p.name} {p.ip}" for p in sandbox.pods() if p.netns)
        print(
            f"sandbox {prefix} up in {time.monotonic() - started:.1f}s: node {sandbox.state['node_name']} "
            f"(netns {sandbox.node_ns}), pods {pods}; NMI ready ({args.mode} mode"
            + (", workload identity: API server and Azure AD stand-ins" if sandbox.kube else "")
            + ")"
        )
        return 0
    prefix = _resolve_prefix(args.prefix, state_dir)
    if args.command == "exec":
        cmd = list(args.cmd)
        if not cmd:
            raise SandboxError("nothing to run: nmi-sandbox exec POD -- CMD [ARGS...]", code=2)
        sandbox = _require(prefix, state_dir)
        argv_in = sandbox.pod_argv(args.pod, cmd)
        sys.stdout.flush()
        try:
            os.execvp(argv_in[0], argv_in)
        except OSError as exc:
            raise SandboxError(f"cannot run {cmd[0]}: {exc}", code=127) from None
    if args.command == "down":
        loaded = Sandbox.load(prefix, state_dir)
        if loaded is None:
            print(f"sandbox {prefix}: nothing to tear down")
            return 0
        done = loaded.down()
        print(f"sandbox {prefix} down" + (f": {'; '.join(done)}" if done else ""))
        return 0
    # status
    up = Sandbox.prefixes(state_dir) if args.prefix is None else [prefix]
    infos = [s.status() for s in (Sandbox.load(name, state_dir) for name in up) if s is not None]
    if args.json:
        print(json.dumps(infos, indent=2))
    elif not infos:
        print("no sandbox is up")
    for info in infos if not args.json else ():
        _print_status(info)
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM during 'up' unwinds like Ctrl-C, so a half-built sandbox is removed."""

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the API server and Azure AD stand-ins, one process in the node (--kube) --------------------------


def cluster_documents(text: str) -> list[dict[str, Any]]:
    """The objects the API server stand-in serves for a ``--cluster-state`` file: the file's own, plus
    the ServiceAccounts its pods run as and the nodes they name, when the file has none of them (a
    real cluster always has them; TokenRequest needs the service account)."""
    import yaml

    from nmi.cluster_file import parse_documents
    from podidentity.model import Pod, ServiceAccount

    docs = [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]
    objects = parse_documents(text, origin="cluster state")
    have_sa = {(o.namespace, o.name) for o in objects if isinstance(o, ServiceAccount)}
    have_nodes = {str(d.get("metadata", {}).get("name")) for d in docs if d.get("kind") == "Node"}
    extra: list[dict[str, Any]] = []
    for obj in objects:
        if not isinstance(obj, Pod):
            continue
        if (obj.namespace, obj.service_account) not in have_sa:
            have_sa.add((obj.namespace, obj.service_account))
            meta = {"name": obj.service_account, "namespace": obj.namespace}
            extra.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
        if obj.node_name and obj.node_name not in have_nodes:
            have_nodes.add(obj.node_name)
            extra.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": obj.node_name}})
    return docs + extra


def _prepare_kube_aad(
    args: argparse.Namespace,
) -> tuple[FakeApiServer, AadStandin, list[Federation], int]:
    """The two stand-ins, loaded, their CA bundles and NMI's kubeconfig written (before they listen:
    the API server's address, hence its issuer, is fixed by ``--api-port``)."""
    import secrets as _secrets

    from nmi.cluster_file import load
    from standins.aad import AadStandin
    from standins.apiserver import FakeApiServer

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(args.cluster_state)
    api = FakeApiServer(host="127.0.0.1", port=args.api_port, tls=True, token=_secrets.token_urlsafe(24))
    count = api.load(cluster_documents(path.read_text()))
    assert api.ca_pem is not None
    cluster_ca = folder / "cluster-ca.pem"
    cluster_ca.write_bytes(api.ca_pem)
    api.write_kubeconfig(folder / "kubeconfig").chmod(0o600)
    aad = AadStandin(host="127.0.0.1", port=args.aad_port, trust=str(cluster_ca))
    aad.add_tenant(args.tenant)
    federation = plan_federation(load(path), args.tenant)
    for entry in federation:
        try:
            aad.app(entry.tenant, entry.client_id)
        except KeyError:
            aad.register_app(entry.tenant, entry.client_id, display_name=f"sandbox {entry.subject}")
        aad.add_federated_credential(entry.tenant, entry.client_id, issuer=api.issuer, subject=entry.subject)
    aad.write_ca_bundle(folder / "aad-ca.pem")
    return api, aad, federation, count


async def _serve_kube_aad(
    api: FakeApiServer, aad: AadStandin, federation: list[Federation], count: int, control_port: int
) -> None:
    from aiohttp import web

    from standins._jwt import claims_of

    await api.start()
    await aad.start()

    def token_request(issued: IssuedToken) -> dict[str, Any]:
        claims = claims_of(issued.token)
        return {
            "namespace": issued.namespace,
            "service_account": issued.service_account,
            "pod": issued.pod,
            "iss": claims.get("iss"),
            "sub": claims.get("sub"),
            "aud": claims.get("aud"),
            "expiration_seconds": issued.expiration_seconds,
        }

    async def exchanges(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": api.issuer,
                "authority": aad.url,
                "token_requests": [token_request(issued) for issued in api.issued_tokens],
                "aad_calls": [call.__dict__ for call in aad.calls],
                "federation": [entry.__dict__ for entry in federation],
            }
        )

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"api": api.url, "aad": aad.url})

    control = web.Application()
    control.router.add_get("/readyz", readyz)
    control.router.add_get("/exchanges", exchanges)
    runner = web.AppRunner(control, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", control_port, reuse_address=True)
    await site.start()  # last: /readyz answering means both stand-ins are up
    print(
        f"API server stand-in on {api.url} ({count} objects, issuer {api.issuer}); Azure AD stand-in "
        f"on {aad.url}, {len(federation)} federated credential(s): "
        + ", ".join(f"{f.client_id} <- {f.subject}" for f in federation),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await aad.close()
        await api.stop()


def kube_aad_main(argv: Sequence[str]) -> int:
    """``python -m standins.sandbox kube-aad --cluster-state FILE --dir DIR``: the API server stand-in
    (TLS, loaded from FILE) and the Azure AD stand-in (TLS, trusting the first's CA, holding FILE's
    federated credentials) until SIGTERM; writes ``kubeconfig``, ``cluster-ca.pem`` and ``aad-ca.pem``
    into DIR."""
    parser = argparse.ArgumentParser(prog=f"python -m standins.sandbox {KUBE_AAD}")
    parser.add_argument("--cluster-state", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--tenant", default=FEDERATION_TENANT)
    parser.add_argument("--api-port", type=int, default=API_PORT)
    parser.add_argument("--aad-port", type=int, default=AAD_PORT)
    parser.add_argument("--control-port", type=int, default=CONTROL_PORT)
    args = parser.parse_args(list(argv))
    api, aad, federation, count = _prepare_kube_aad(args)
    asyncio.run(_serve_kube_aad(api, aad, federation, count, args.control_port))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [KUBE_AAD]:  # the stand-ins' process, not a command for users
        sys.exit(kube_aad_main(words[1:]))
    try:
        with _terminate_as_interrupt():
            code = run(argv)
    except SandboxError as exc:
        print(f"nmi-sandbox: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        print("nmi-sandbox: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
