"""A large ``--cluster-state``: time to ready, memory, and requests answered while it reloads.

The state holds ``--pods`` pods spread over ``--nodes`` nodes (one of them NMI's), and per pod one
AzureIdentity, one AzureIdentityBinding and one AzureAssignedIdentity: 20,000 pods are 80,000
objects, about 28 MB of YAML. NMI keeps only its own node's pods (as a field selector would), but
every identity, binding and assigned identity of the file.

One run:

1. writes the file, starts the IMDS stand-in (knowing only the identities of NMI's node) and NMI
   (``--cluster-state``, no iptables, on 127.0.0.1) and times process start → ``/readyz`` 200;
2. reads NMI's ``VmRSS`` / ``VmHWM``;
3. **hot**: one keep-alive connection from a bound pod's address (127.0.1.x, as NMI names the caller
   by source address) sends cached token requests back to back while the file is rewritten
   (``--reloads`` times, each changing a tenth of the objects, atomically by rename): the longest
   answer during a reload is how long a reload stalled a request;
4. **cold**: 300 first requests (distinct pod and resource, each an IMDS fetch) paced at
   ``--cold-rate`` per second while the file keeps being rewritten; each has 10 s to be answered;
5. in this process, bytes per object as the watch path holds them (``tracemalloc``: parsed from the
   API's JSON shape into a ``ClusterState``, the raw dicts dropped).

    .venv/bin/python -m benchmarks.large_state [--pods 20000] [--nodes 80] [--repo DIR] [--label after]

``--repo`` runs NMI from another checkout (e.g. ``git archive HEAD`` of the code before a change).
Writes ``benchmarks/results/large_state.json`` (every run, keyed by ``--label``) and ``large_state.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HOST = "127.0.0.1"
NODE = "node-00"
READY_TIMEOUT_S = 600.0
RELOAD_TIMEOUT_S = 600.0
COLD_DEADLINE_S = 10.0
COLD_REWRITES = 4
"""At most this many rewrites of the file during the cold phase (one after another)."""
HEADERS = "Metadata: true\r\nHost: 169.254.169.254\r\n"


def _client_id(i: int) -> str:
    return f"{i:08x}-52b4-4d0e-9a57-2b7c0d1e4f10"


def _pod_ip(i: int, nodes: int) -> str:
    if i % nodes == 0:  # NMI's node: loopback addresses the benchmark can bind as a source
        k = i // nodes
        return f"127.0.{1 + k // 250}.{1 + k % 250}"
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _rid(name: str) -> str:
    return (
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/bench/providers/"
        f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )


def generate(pods: int, nodes: int, generation: int = 0) -> str:
    """The state file's text; ``generation`` changes a tenth of the objects (labels, versions)."""
    out: list[str] = []
    for i in range(pods):
        ns = f"team-{i % 100:02d}"
        node = f"node-{i % nodes:02d}"
        ident = f"id-{i}"
        rv = str(generation if i % 10 == generation % 10 else 0)
        out.append(
            f"""apiVersion: v1
kind: Pod
metadata:
  name: pod-{i}
  namespace: {ns}
  uid: 5d4c0a52-0001-4c1e-9d1e-{i:012d}
  resourceVersion: "{rv}"
  creationTimestamp: "2026-01-01T00:00:00Z"
  labels: {{aadpodidbinding: sel-{i}, app: app-{i % 50}, tier: backend}}
spec: {{nodeName: {node}}}
status: {{phase: Running, podIP: {_pod_ip(i, nodes)}}}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {{name: {ident}, namespace: {ns}, resourceVersion: "{rv}"}}
spec:
  type: 0
  clientID: {_client_id(i)}
  resourceID: {_rid(ident)}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {{name: binding-{i}, namespace: {ns}, resourceVersion: "{rv}"}}
spec: {{azureIdentity: {ident}, selector: sel-{i}}}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureAssignedIdentity
metadata:
  name: pod-{i}-{ns}-{ident}
  namespace: {ns}
  resourceVersion: "{rv}"
  labels: {{nodename: {node}}}
spec:
  pod: pod-{i}
  podNamespace: {ns}
  nodename: {node}
  azureIdentityRef:
    metadata: {{name: {ident}, namespace: {ns}}}
    spec:
      type: 0
      clientID: {_client_id(i)}
      resourceID: {_rid(ident)}
status: {{status: Assigned}}
---
"""
        )
    return "".join(out)


def local_identities(pods: int, nodes: int) -> str:
    """The identities of NMI's node's pods only: what the IMDS stand-in assigns to the VM."""
    docs = [
        f"apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {{name: id-{i}}}\n"
        f"spec: {{type: 0, clientID: {_client_id(i)}, resourceID: {_rid(f'id-{i}')}}}\n"
        for i in range(0, pods, nodes)
    ]
    return "---\n".join(docs)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- processes ----------------------------------------------------------------------------------


class Procs:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str) -> None:
        code = self.procs[name].poll()
        if code is not None:
            raise SystemExit(f"{name} exited with {code}:\n{self.log(name)[-3000:]}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def memory_kib(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


# --- HTTP client ----------------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match:
        await reader.readexactly(int(match.group(1)))
    return status


def token_request(resource: str) -> bytes:
    return (
        f"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource} HTTP/1.1\r\n"
        f"{HEADERS}\r\n"
    ).encode()


async def one_request(port: int, src: str, resource: str, timeout: float) -> tuple[int, float]:
    """(status, seconds) of one request on a fresh connection; status 0 when not answered in time."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(src, 0))
            try:
                writer.write(token_request(resource))
                status = await _read_response(reader)
            finally:
                writer.close()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return 0, time.perf_counter() - started
    return status, time.perf_counter() - started


class HotLoop:
    """Back-to-back cached requests on one keep-alive connection; every latency with its start time."""

    def __init__(self, port: int, src: str) -> None:
        self.port, self.src = port, src
        self.samples: list[tuple[float, float, int]] = []
        self._stop = False

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection(HOST, self.port, local_addr=(self.src, 0))
        request = token_request("https://vault.azure.net")
        try:
            while not self._stop:
                started = time.perf_counter()
                writer.write(request)
                status = await _read_response(reader)
                self.samples.append((started, time.perf_counter() - started, status))
                await asyncio.sleep(0.002)  # ~400/s: fine-grained enough, leaves the cores to NMI
        finally:
            writer.close()

    def stop(self) -> None:
        self._stop = True

    def max_between(self, start: float, end: float) -> float:
        return max((lat for t, lat, _ in self.samples if start <= t + lat and t <= end), default=0.0)


async def wait_reloads(procs: Procs, count: int) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        procs.alive("nmi")
        if procs.log("nmi").count("reloaded cluster state") >= count:
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"NMI did not reload within {RELOAD_TIMEOUT_S:.0f}s")


# --- bytes per object (in this process) ----------------------------------------------------------


def bytes_per_object(sample: int = 2000) -> dict[str, float]:
    """Memory one object costs in ``ClusterState`` when it comes from the watch (JSON) path."""
    import yaml

    from podidentity.model import parse_object
    from podidentity.state import ClusterState

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = [d for d in yaml.load_all(generate(sample, 1), Loader=loader) if d]
    result: dict[str, float] = {}
    for kind in ("Pod", "AzureIdentity", "AzureIdentityBinding", "AzureAssignedIdentity"):
        # As the watch hands them over: each object decoded from its own JSON text.
        raws = [json.dumps(d) for d in docs if d["kind"] == kind]
        state = ClusterState()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for text in raws:
            state.apply(parse_object(json.loads(text)))
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        result[kind] = round((after - before) / len(raws), 1)
        del state
    return result


# --- the run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="large_state-") as tmp:
        yield Path(tmp)


async def measure(args: argparse.Namespace, tmp: Path, procs: Procs) -> dict[str, Any]:
    repo = Path(args.repo)
    python = sys.executable
    state = tmp / "cluster-state.yaml"
    text = generate(args.pods, args.nodes)
    write_atomically(state, text)
    (tmp / "imds-identities.yaml").write_text(local_identities(args.pods, args.nodes))
    procs.start(
        "imds",
        [python, "-m", "standins.imds", "--host", HOST, "--port", "0", "--rate", "1000",
         "--max-concurrent", "50", "--identities-from", str(tmp / "imds-identities.yaml")],
        REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not (found := re.search(r"listening on [\d.]+:(\d+)", procs.log("imds"))):
        procs.alive("imds")
        if time.monotonic() > deadline:
            raise SystemExit("IMDS stand-in did not start")
        await asyncio.sleep(0.05)
    imds_port = int(found.group(1))
    nmi_port, probe_port, metrics_port = free_port(), free_port(), free_port()
    started = time.perf_counter()
    nmi = procs.start(
        "nmi",
        [python, "-m", "nmi", "--cluster-state", str(state), "--node", NODE, "--manage-iptables=false",
         "--metadata-ip", HOST, "--metadata-port", str(imds_port), "--nmi-port", str(nmi_port),
         "--http-probe-port", str(probe_port), "--prometheus-port", str(metrics_port),
         "--upstream-rate", "100", "--upstream-max-concurrent", "20"],
        repo,
    )  # fmt: skip
    import urllib.request

    while True:
        procs.alive("nmi")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://{HOST}:{probe_port}/readyz", timeout=1) as r,  # noqa: ASYNC210
        ):
            if r.status == 200:
                break
        if time.perf_counter() - started > READY_TIMEOUT_S:
            raise SystemExit("NMI not ready in time")
        await asyncio.sleep(0.05)
    ready_s = time.perf_counter() - started
    await asyncio.sleep(1.0)  # let start-up garbage settle
    mem_ready = memory_kib(nmi.pid)
    print(f"ready in {ready_s:.2f}s, RSS {mem_ready['VmRSS'] / 1024:.0f} MB", flush=True)

    # Warm the hot pod's token.
    hot_src = _pod_ip(0, args.nodes)
    status, _ = await one_request(nmi_port, hot_src, "https://vault.azure.net", 30)
    if status != 200:
        raise SystemExit(f"warm-up answered {status}:\n{procs.log('nmi')[-2000:]}")

    # Every rewrite's text is made now: generating it later would stall this process's client.
    texts = {g: generate(args.pods, args.nodes, g) for g in range(1, args.reloads + COLD_REWRITES + 1)}

    # Hot phase: reloads while cached requests run.
    hot = HotLoop(nmi_port, hot_src)
    hot_task = asyncio.create_task(hot.run())
    await asyncio.sleep(0.5)
    baseline_max = hot.max_between(0, time.perf_counter())
    reloads: list[dict[str, float]] = []
    generation = 0
    for _ in range(args.reloads):
        generation += 1
        t0 = time.perf_counter()
        await asyncio.to_thread(write_atomically, state, texts[generation])
        written = time.perf_counter()
        await wait_reloads(procs, generation)
        done = time.perf_counter()
        await asyncio.sleep(0.3)
        reloads.append(
            {
                "seconds": round(done - written, 3),
                "max_request_ms": round(1000 * hot.max_between(t0, done), 2),
            }
        )
        print(f"reload {generation}: {reloads[-1]}", flush=True)
    mem_after_reloads = memory_kib(nmi.pid)
    hot.stop()
    await hot_task
    hot_errors = sum(1 for *_, s in hot.samples if s != 200)

    # Cold phase: 300 first requests, paced, while the file keeps being rewritten.
    local = list(range(0, args.pods, args.nodes))
    results: list[tuple[int, float]] = []
    stop_rewrites = asyncio.Event()

    async def rewriter() -> None:
        nonlocal generation
        while not stop_rewrites.is_set() and generation + 1 in texts:
            generation += 1
            await asyncio.to_thread(write_atomically, state, texts[generation])
            with contextlib.suppress(SystemExit):
                await wait_reloads(procs, generation)

    rewrites = asyncio.create_task(rewriter())
    tasks = []
    for k in range(args.cold):
        pod = local[k % len(local)]
        resource = f"https://cold-{k}.example"
        tasks.append(
            asyncio.create_task(one_request(nmi_port, _pod_ip(pod, args.nodes), resource, COLD_DEADLINE_S))
        )
        await asyncio.sleep(1.0 / args.cold_rate)
    results = await asyncio.gather(*tasks)
    stop_rewrites.set()
    await rewrites
    answered = sorted(lat for status, lat in results if status == 200)
    unanswered = sum(1 for status, _ in results if status == 0)
    not_ok = sum(1 for status, _ in results if status not in (0, 200))
    qs = statistics.quantiles(answered, n=100) if len(answered) >= 2 else [0.0] * 99
    return {
        "ready_s": round(ready_s, 2),
        "rss_ready_mb": round(mem_ready["VmRSS"] / 1024, 1),
        "hwm_ready_mb": round(mem_ready["VmHWM"] / 1024, 1),
        "rss_after_reloads_mb": round(mem_after_reloads["VmRSS"] / 1024, 1),
        "hwm_after_reloads_mb": round(mem_after_reloads["VmHWM"] / 1024, 1),
        "hot_max_ms_without_reload": round(1000 * baseline_max, 2),
        "reloads": reloads,
        "reload_s_max": max(r["seconds"] for r in reloads),
        "stall_ms_max": max(r["max_request_ms"] for r in reloads),
        "hot_requests": len(hot.samples),
        "hot_non_200": hot_errors,
        "cold": {
            "requests": len(results),
            "rate_per_s": args.cold_rate,
            "reloads_during": generation - args.reloads,
            "answered_200": len(answered),
            "unanswered_in_10s": unanswered,
            "other_status": not_ok,
            "p50_ms": round(1000 * qs[49], 1),
            "p99_ms": round(1000 * qs[98], 1),
            "max_ms": round(1000 * max(answered, default=0.0), 1),
        },
        "state_file_mb": round(len(text) / 1e6, 1),
    }


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg()[0],
        "python": platform.python_version(),
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Large `--cluster-state`",
        "",
        "`python -m benchmarks.large_state`; see benchmarks/README.md. Shared 2-core machine.",
        "",
        "| run | pods (objects) | file MB | ready s | RSS MB (peak) | reload s | max stall ms | "
        "cold 200 / unanswered | cold p50 / p99 / max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in doc["runs"].items():
        c = run["cold"]
        lines.append(
            f"| {label} | {run['pods']:,} ({4 * run['pods']:,}) | {run['state_file_mb']} | {run['ready_s']} "
            f"| {run['rss_after_reloads_mb']} ({run['hwm_after_reloads_mb']}) | {run['reload_s_max']} "
            f"| {run['stall_ms_max']} | {c['answered_200']} / {c['unanswered_in_10s']} "
            f"| {c['p50_ms']} / {c['p99_ms']} / {c['max_ms']} |"
        )
    lines += ["", "Bytes per object held in `ClusterState` from the watch path (tracemalloc):", ""]
    for label, run in doc["runs"].items():
        if "bytes_per_object" in run:
            per = ", ".join(f"{k} {v:.0f}" for k, v in run["bytes_per_object"].items())
            lines.append(f"- {label}: {per}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pods", type=int, default=20000)
    parser.add_argument("--nodes", type=int, default=80)
    parser.add_argument("--reloads", type=int, default=2)
    parser.add_argument("--cold", type=int, default=300)
    parser.add_argument("--cold-rate", type=float, default=20.0, help="cold requests started per second")
    parser.add_argument("--repo", default=str(REPO), help="checkout whose NMI to run")
    parser.add_argument("--label", default="after")
    parser.add_argument("--no-bytes", action="store_true", help="skip the in-process bytes-per-object figure")
    parser.add_argument("--bytes-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repo = str(Path(args.repo).resolve())
    if args.bytes_only:
        print(json.dumps(bytes_per_object()))
        return
    with workdir() as tmp:
        procs = Procs(tmp)
        try:
            run = asyncio.run(measure(args, tmp, procs))
        finally:
            procs.stop()
    run["pods"] = args.pods
    run["nodes"] = args.nodes
    run["repo"] = str(Path(args.repo).resolve())
    run["machine"] = machine()
    if not args.no_bytes:
        # In a child that imports the measured checkout's ``podidentity``.
        child = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--bytes-only"],
            cwd=args.repo,
            env={**os.environ, "PYTHONPATH": str(Path(args.repo).resolve())},
            capture_output=True,
            text=True,
            check=True,
        )
        run["bytes_per_object"] = json.loads(child.stdout)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "large_state.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    doc["runs"][args.label] = run
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "large_state.md").write_text(markdown(doc))
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
