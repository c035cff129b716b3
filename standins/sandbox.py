"""``nmi-sandbox``: a node with its pods on this machine, from a ``--cluster-state`` file.

``up FILE`` builds a node network namespace and one namespace per pod (each with its
``status.podIP``, on a bridge with the node, or with ``--topology routed`` each behind its own
host veth with a /32 route, no bridge), starts the IMDS stand-in on 169.254.169.254:80 and
the real NMI (iptables management on) inside the node, waits for NMI's ``/readyz`` and returns,
leaving both running in the background. ``exec POD -- CMD`` runs a command in a pod's namespace;
``status`` says what is up; ``down`` removes everything ``up`` made.

What ``up`` made is written to ``<state dir>/<prefix>.json`` (default ``/run/nmi-sandbox``), with
the processes' logs in ``<state dir>/<prefix>/``. The ``Sandbox`` class is the same machinery for
Python callers (the demo and the end-to-end tests).
"""

from __future__ import annotations

import argparse
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
from typing import Any

from standins.netns import HELPER, HarnessError, Node, delete_namespace, list_namespaces, pod_network

STATE_DIR = Path(os.environ.get("NMI_SANDBOX_DIR", "/run/nmi-sandbox"))
DEFAULT_PREFIX = "nmisb"
METADATA_IP = "169.254.169.254"
METADATA_PORT = 80
NMI_PORT = 2579
PROBE_PORT = 8085
METRICS_PORT = 9090
TOKEN_PATH = "/metadata/identity/oauth2/token"
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
    ) -> Sandbox:
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
            },
            state_path,
        )
        try:
            sandbox._save()
            log_dir.mkdir(parents=True, exist_ok=True)
            node.create()
            node.detach()  # the namespaces outlive this process; down() deletes them
            imds = [*_python(), "-m", "standins.imds", "--host", METADATA_IP, "--port", str(METADATA_PORT)]
            # A system-assigned identity too, so excepted pods get the node's own identity, as on a VM.
            imds += ["--identities-from", str(path), "--system-assigned"]
            sandbox._spawn("imds", imds)
            sandbox._wait_http("imds", METADATA_IP, METADATA_PORT, "/__standin/identities", 10.0)
            sandbox.start_nmi(nmi_args, ready_timeout=ready_timeout)
            sandbox.state["status"] = "up"
            sandbox._save()
        except BaseException:
            sandbox.down()
            raise
        return sandbox

    def nmi_argv(self, extra: Sequence[str] = ()) -> list[str]:
        return [
            *_python(),
            "-m",
            "nmi",
            "--cluster-state",
            self.state["cluster_state"],
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
        for name in ("nmi", "imds"):
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
        for path in self.log_dir.glob("*.log") if self.log_dir.is_dir() else ():
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
        usage="nmi-sandbox up FILE [--mode standard|managed] [--topology bridge|routed] [--prefix NAME] "
        "[-- MORE NMI FLAGS...]",
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
        )
        pods = ", ".join(f"{p.name} {p.ip}" for p in sandbox.pods() if p.netns)
        print(
            f"sandbox {prefix} up in {time.monotonic() - started:.1f}s: node {sandbox.state['node_name']} "
            f"(netns {sandbox.node_ns}), pods {pods}; NMI ready ({args.mode} mode)"
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


def main(argv: Sequence[str] | None = None) -> None:
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
