"""Cached-token load: NMI against the minimal uvloop + httptools baseline, side by side, in one run.

One run starts the IMDS stand-in, NMI (``--cluster-state``, no iptables) and the baseline server
as subprocesses on loopback, warms NMI's token cache with one request, then alternates wrk runs
(baseline, nmi, baseline, nmi, ...) so that drift in the machine (thermal, noisy neighbours) hits
both sides alike. It reports requests/s and p50/p99 latency for each, the median ratio NMI/baseline,
NMI's resident memory afterwards, and how many token requests reached the IMDS stand-in (it must
stay at the one from warming: otherwise the load did not measure the cache).

    .venv/bin/python -m benchmarks.token_load [--duration 8] [--connections 50] [--rounds 2]

Writes ``benchmarks/results/token_load.json`` and ``token_load.md``. Every subprocess is killed on
the way out, and every wrk run is bounded by its duration plus a margin.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HOST = "127.0.0.1"
NODE = "demo-node"
CLIENT_ID = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4fb0"
TOKEN_PATH = "/metadata/identity/oauth2/token?resource=https://vault.azure.net&api-version=2018-02-01"
HEADERS = {"Metadata": "true"}

TARGET_RATIO = 0.70
"""NMI should keep at least this share of the baseline's throughput."""
TARGET_P99_MS = 2.0
"""NMI's p99 at the full connection count, in milliseconds."""

START_TIMEOUT_S = 20.0
WRK_MARGIN_S = 30.0
"""Added to a wrk run's duration for its hard timeout (connect, warm-up, report)."""
STOP_TIMEOUT_S = 5.0


def bound_pod_state(pod: str, uid: str, ip: str) -> str:
    """One running pod at ``ip`` on ``NODE``, bound to one user-assigned identity and assigned it."""
    return f"""\
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: default, uid: {uid},
  labels: {{aadpodidbinding: bench}}}}
spec: {{nodeName: {NODE}}}
status: {{phase: Running, podIP: {ip}}}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {{name: bench-identity, namespace: default}}
spec:
  type: 0
  clientID: {CLIENT_ID}
  resourceID: /subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/bench-identity
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {{name: bench-binding, namespace: default}}
spec: {{azureIdentity: bench-identity, selector: bench}}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureAssignedIdentity
metadata: {{name: {pod}-bench-identity, namespace: default, labels: {{nodename: {NODE}}}}}
spec:
  pod: {pod}
  podNamespace: default
  nodename: {NODE}
  azureIdentityRef:
    metadata: {{name: bench-identity, namespace: default}}
    spec:
      type: 0
      clientID: {CLIENT_ID}
      resourceID: /subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/bench-identity
status: {{status: Assigned}}
"""  # noqa: E501


# wrk connects from 127.0.0.1, and NMI names the caller by source address: the benchmark's pod is
# at 127.0.0.1 on this node, bound to one user-assigned identity (shapes from examples/).
CLUSTER_STATE = bound_pod_state("bench", "5d4c0a52-00b0-4c1e-9d1e-0000000000b0", HOST)


class BenchmarkError(Exception):
    """A run that cannot produce figures: reported as one line, exit status 1."""


# --- wrk ----------------------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_UNITS_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_PERCENTILE = re.compile(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)(B|KB|MB|GB|TB) read", re.M)
_NON_2XX = re.compile(r"^\s+Non-2xx or 3xx responses: (\d+)", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass
class WrkResult:
    side: str
    connections: int
    threads: int
    round: int
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    bytes_per_request: float
    non_2xx: int
    socket_errors: int
    server_cpu_pct: float
    """CPU the server process used during the run, in % of one core."""
    raw: str = field(repr=False)


def parse_wrk(text: str) -> dict[str, Any]:
    """The figures of one ``wrk --latency`` report."""
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    if rps is None or total is None:
        raise BenchmarkError(f"unexpected wrk output:\n{text}")
    percentiles = {int(p): float(v) * _UNITS_MS[unit] for p, v, unit in _PERCENTILE.findall(text)}
    missing = {50, 75, 90, 99} - percentiles.keys()
    if missing:
        raise BenchmarkError(f"wrk output lacks percentiles {sorted(missing)} (was --latency given?)")
    requests = int(total.group(1))
    read = float(total.group(4)) * _UNITS_BYTES[total.group(5)]
    non_2xx = _NON_2XX.search(text)
    errors = _SOCKET_ERRORS.search(text)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": percentiles[50],
        "p75_ms": percentiles[75],
        "p90_ms": percentiles[90],
        "p99_ms": percentiles[99],
        "requests": requests,
        "bytes_per_request": read / requests if requests else 0.0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat`` fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(side: str, url: str, pid: int, *, connections: int, duration_s: int, round_no: int) -> WrkResult:
    threads = min(2, connections)  # wrk refuses fewer connections than threads
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "2s"]
    for name, value in HEADERS.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + WRK_MARGIN_S)
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(
            f"wrk against {side} did not finish within {duration_s + WRK_MARGIN_S:.0f}s"
        ) from exc
    cpu_pct = 100.0 * (cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before)
    if done.returncode != 0:
        raise BenchmarkError(f"wrk against {side} failed ({done.returncode}): {done.stderr.strip()}")
    figures = parse_wrk(done.stdout)
    return WrkResult(
        side, connections, threads, round_no, server_cpu_pct=round(cpu_pct, 1), raw=done.stdout, **figures
    )


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """The servers of one run; ``stop_all`` terminates, then kills, each one it started."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self._logs / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child from here on
        try:
            proc = subprocess.Popen(
                argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        self._procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self._logs / f"{name}.log").read_text(errors="replace")

    def check_alive(self, name: str) -> None:
        code = self._procs[name].poll()
        if code is not None:
            raise BenchmarkError(f"{name} exited with status {code}:\n{self.log(name)[-2000:]}")

    def wait_for_line(self, name: str, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log(name))
            if found:
                return found
            self.check_alive(name)
            time.sleep(0.05)
        raise BenchmarkError(f"{name} did not start within {START_TIMEOUT_S:.0f}s:\n{self.log(name)[-2000:]}")

    def stop_all(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in self._procs.items():
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{name} ignored SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def wait_ready(procs: Processes, name: str, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        procs.check_alive(name)
        with contextlib.suppress(OSError):
            if http_get(url, timeout=1.0)[0] == 200:
                return
        time.sleep(0.1)
    raise BenchmarkError(
        f"{name} not ready at {url} within {START_TIMEOUT_S:.0f}s:\n{procs.log(name)[-2000:]}"
    )


def proc_memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (now) and ``VmHWM`` (peak) of a process, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def imds_token_requests(imds_url: str) -> int:
    status, _, body = http_get(f"{imds_url}/__standin/requests")
    if status != 200:
        raise BenchmarkError(f"IMDS stand-in /__standin/requests answered {status}")
    return len(json.loads(body)["requests"])


def nmi_cache_counts(metrics_url: str) -> dict[str, float]:
    _, _, body = http_get(metrics_url)
    pattern = re.compile(r'^nmi_token_cache_requests_total\{result="(\w+)"\} ([\d.e+]+)$', re.M)
    return {result: float(value) for result, value in pattern.findall(body.decode())}


def header_names(headers: Any) -> list[str]:
    return sorted(name.lower() for name in headers)


# --- the run --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    versions: dict[str, str] = {}
    for package in ("uvloop", "httptools", "aiohttp", "prometheus_client"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "wrk": (wrk.stdout + wrk.stderr).splitlines()[0].split(" Copyright")[0]
        if wrk.stdout + wrk.stderr
        else "",
        "packages": versions,
    }


@dataclass
class Summary:
    rps_baseline_median: float
    rps_nmi_median: float
    ratio: float
    p50_ms_baseline: float
    p50_ms_nmi: float
    p99_ms_baseline: float
    p99_ms_nmi: float
    c1_p50_ms_baseline: float
    c1_p50_ms_nmi: float
    c1_p99_ms_baseline: float
    c1_p99_ms_nmi: float
    ratio_met: bool
    p99_met: bool


def summarise(results: list[WrkResult], connections: int) -> Summary:
    def median(side: str, conns: int, attr: str) -> float:
        values: list[float] = [getattr(r, attr) for r in results if r.side == side and r.connections == conns]
        return statistics.median(values)

    base, nmi = median("baseline", connections, "rps"), median("nmi", connections, "rps")
    ratio = nmi / base if base else 0.0
    p99_nmi = median("nmi", connections, "p99_ms")
    return Summary(
        rps_baseline_median=round(base, 1),
        rps_nmi_median=round(nmi, 1),
        ratio=round(ratio, 3),
        p50_ms_baseline=median("baseline", connections, "p50_ms"),
        p50_ms_nmi=median("nmi", connections, "p50_ms"),
        p99_ms_baseline=median("baseline", connections, "p99_ms"),
        p99_ms_nmi=p99_nmi,
        c1_p50_ms_baseline=median("baseline", 1, "p50_ms"),
        c1_p50_ms_nmi=median("nmi", 1, "p50_ms"),
        c1_p99_ms_baseline=median("baseline", 1, "p99_ms"),
        c1_p99_ms_nmi=median("nmi", 1, "p99_ms"),
        ratio_met=ratio >= TARGET_RATIO,
        p99_met=p99_nmi < TARGET_P99_MS,
    )


def table(results: list[WrkResult]) -> list[str]:
    lines = [
        "| side | conns | round | req/s | p50 ms | p99 ms | bytes/req | non-2xx | server CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.side} | {r.connections} | {r.round} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} "
            f"| {r.bytes_per_request:.0f} | {r.non_2xx} | {r.server_cpu_pct:.0f}% |"
        )
    return lines


def report_markdown(doc: dict[str, Any], results: list[WrkResult], summary: Summary) -> str:
    m = doc["machine"]
    p = doc["parameters"]
    checks = doc["checks"]
    mem = doc["memory_kib"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        "# Cached-token load: NMI vs the uvloop + httptools baseline",
        "",
        f"- date: {m['date']}; {m['nproc']} CPUs ({m['cpu_model'] or 'unknown model'}); "
        f"Python {m['python']}; {m['wrk']}; {m['platform']}",
        f"- wrk runs on the same {m['nproc']} cores as the server under test (and the idle other server "
        "and IMDS stand-in): figures are for this shared machine, comparable only within one run.",
        f"- each run: `wrk -t2 -c{p['connections']} -d{p['duration_s']}s --latency` "
        f"(and `-t1 -c1`), alternating baseline / nmi, {p['rounds']} rounds; "
        f"path `{TOKEN_PATH}` with `Metadata: true`.",
        "",
        "## Summary",
        "",
        "| | baseline | nmi |",
        "|---|---:|---:|",
        f"| req/s at {p['connections']} conns (median) | {summary.rps_baseline_median:,.0f} "
        f"| {summary.rps_nmi_median:,.0f} |",
        f"| p50 / p99 ms at {p['connections']} conns | {summary.p50_ms_baseline:.3f} / "
        f"{summary.p99_ms_baseline:.3f} | {summary.p50_ms_nmi:.3f} / {summary.p99_ms_nmi:.3f} |",
        f"| p50 / p99 ms at 1 conn | {summary.c1_p50_ms_baseline:.3f} / {summary.c1_p99_ms_baseline:.3f} "
        f"| {summary.c1_p50_ms_nmi:.3f} / {summary.c1_p99_ms_nmi:.3f} |",
        f"| RSS after the run (peak) MiB | {mem['baseline']['VmRSS'] / 1024:.1f} "
        f"({mem['baseline']['VmHWM'] / 1024:.1f}) | {mem['nmi']['VmRSS'] / 1024:.1f} "
        f"({mem['nmi']['VmHWM'] / 1024:.1f}) |",
        "",
        f"- **ratio NMI / baseline throughput: {summary.ratio:.1%}** "
        f"(target ≥ {TARGET_RATIO:.0%}: {verdict(summary.ratio_met)})",
        f"- **NMI p99 at {p['connections']} connections: {summary.p99_ms_nmi:.3f} ms** "
        f"(target < {TARGET_P99_MS:g} ms: {verdict(summary.p99_met)})",
        f"- served from cache: IMDS stand-in saw {checks['imds_token_requests_after']} token request(s) "
        f"in all (the warm-up's); NMI cache misses {checks['nmi_cache']['miss']:.0f}, hits "
        f"{checks['nmi_cache']['hit']:.0f}; non-2xx answers during load: {checks['non_2xx_total']}",
        f"- same wire answer: body identical {checks['same_body']}, header names identical "
        f"{checks['same_header_names']} ({', '.join(checks['header_names'])}), "
        f"{checks['body_bytes']} body bytes",
        "",
        "## Every run",
        "",
        *table(results),
        "",
        "Server CPU is the server process's user + system time over the run's wall time (100% = one core).",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nmi-token-load-") as tmp:
        yield Path(tmp)


def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print(
            "token_load: wrk is not installed (apt-get install wrk, or NMI_WITH_WRK=1 scripts/setup-env)",
            file=sys.stderr,
        )
        return 2
    python = sys.executable
    out = Path(args.out)
    with workdir() as tmp:
        state = tmp / "cluster-state.yaml"
        state.write_text(CLUSTER_STATE)
        procs = Processes(tmp)
        try:
            procs.start(
                "imds",
                [
                    python,
                    "-m",
                    "standins.imds",
                    "--host",
                    HOST,
                    "--port",
                    "0",
                    "--identities-from",
                    str(state),
                ],
            )
            imds_port = int(procs.wait_for_line("imds", r"listening on [\d.]+:(\d+)").group(1))
            imds_url = f"http://{HOST}:{imds_port}"
            nmi_port, probe_port, metrics_port = free_port(), free_port(), free_port()
            nmi = procs.start(
                "nmi",
                [
                    python, "-m", "nmi", "--cluster-state", str(state), "--node", NODE,
                    "--manage-iptables=false", "--metadata-ip", HOST, "--metadata-port", str(imds_port),
                    "--nmi-port", str(nmi_port), "--http-probe-port", str(probe_port),
                    # Default log level: the audit trail (50 lines/s at most) is part of the cost.
                    "--prometheus-port", str(metrics_port),
                ],
            )  # fmt: skip
            wait_ready(procs, "nmi", f"http://{HOST}:{probe_port}/readyz")
            nmi_url = f"http://{HOST}:{nmi_port}{TOKEN_PATH}"

            # Warm the cache; the second answer is a cached one, the bytes the baseline will send.
            for _ in range(2):
                status, nmi_headers, body = http_get(nmi_url, HEADERS)
                if status != 200:
                    raise BenchmarkError(f"NMI answered the warm-up with {status}: {body[:300]!r}")
            upstream_before = imds_token_requests(imds_url)
            body_file = tmp / "token.json"
            body_file.write_bytes(body)

            baseline_port = free_port()
            baseline = procs.start(
                "baseline",
                [python, "-m", "benchmarks.baseline_server", "--port", str(baseline_port), "--body-file",
                 str(body_file)],
            )  # fmt: skip
            procs.wait_for_line("baseline", r"baseline listening")
            baseline_url = f"http://{HOST}:{baseline_port}{TOKEN_PATH}"
            status, base_headers, base_body = http_get(baseline_url, HEADERS)
            if status != 200:
                raise BenchmarkError(f"baseline answered {status}")

            sides = {"baseline": (baseline_url, baseline.pid), "nmi": (nmi_url, nmi.pid)}
            plan = [(side, args.connections, n) for n in range(1, args.rounds + 1) for side in sides]
            plan += [(side, 1, 1) for side in sides]
            results: list[WrkResult] = []
            for side, conns, round_no in plan:
                url, pid = sides[side]
                print(f"  wrk {side:8} -c{conns:<3} round {round_no} ({args.duration}s) ...", flush=True)
                results.append(
                    run_wrk(side, url, pid, connections=conns, duration_s=args.duration, round_no=round_no)
                )
                procs.check_alive(side)

            memory = {"nmi": proc_memory_kib(nmi.pid), "baseline": proc_memory_kib(baseline.pid)}
            upstream_after = imds_token_requests(imds_url)
            cache = nmi_cache_counts(f"http://{HOST}:{metrics_port}/metrics")
        finally:
            procs.stop_all()

    summary = summarise(results, args.connections)
    non_2xx = sum(r.non_2xx for r in results)
    checks = {
        "imds_token_requests_before": upstream_before,
        "imds_token_requests_after": upstream_after,
        "nmi_cache": cache,
        "non_2xx_total": non_2xx,
        "socket_errors_total": sum(r.socket_errors for r in results),
        "same_body": base_body == body,
        "same_header_names": header_names(base_headers) == header_names(nmi_headers),
        "header_names": header_names(nmi_headers),
        "body_bytes": len(body),
    }
    doc = {
        "benchmark": "token_load",
        "machine": machine_info(),
        "parameters": {
            "duration_s": args.duration,
            "connections": args.connections,
            "rounds": args.rounds,
            "path": TOKEN_PATH,
        },
        "targets": {"ratio_min": TARGET_RATIO, "nmi_p99_ms_max": TARGET_P99_MS},
        "summary": asdict(summary),
        "memory_kib": memory,
        "checks": checks,
        "runs": [asdict(r) for r in results],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_load.json").write_text(json.dumps(doc, indent=2) + "\n")
    markdown = report_markdown(doc, results, summary)
    (out / "token_load.md").write_text(markdown)

    print()
    print("\n".join(table(results)))
    print()
    print(
        f"NMI/baseline throughput (median of {args.rounds}): {summary.ratio:.1%} "
        f"[{summary.rps_nmi_median:,.0f} / {summary.rps_baseline_median:,.0f} req/s], "
        f"target >= {TARGET_RATIO:.0%}: {'met' if summary.ratio_met else 'NOT met'}"
    )
    print(
        f"p99 at {args.connections} conns: nmi {summary.p99_ms_nmi:.3f} ms, baseline "
        f"{summary.p99_ms_baseline:.3f} ms; target < {TARGET_P99_MS:g} ms: "
        f"{'met' if summary.p99_met else 'NOT met'}"
    )
    print(
        f"NMI RSS after the run: {memory['nmi']['VmRSS'] / 1024:.1f} MiB "
        f"(peak {memory['nmi']['VmHWM'] / 1024:.1f})"
    )
    print(f"IMDS token requests: {upstream_after} in all; NMI cache {cache}")
    print(f"wrote {out / 'token_load.json'} and {out / 'token_load.md'}")

    # Figures from a run that did not exercise the cache, or that got errors, measure something else.
    if upstream_after != 1 or non_2xx or not checks["same_body"]:
        print(
            "token_load: the load was not served purely from NMI's cache with 200s "
            f"(IMDS token requests {upstream_after}, non-2xx {non_2xx}, same body {checks['same_body']})",
            file=sys.stderr,
        )
        return 1
    if args.enforce and not (summary.ratio_met and summary.p99_met):
        print("token_load: targets not met (--enforce)", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.token_load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run (default 8)")
    parser.add_argument(
        "--connections", type=int, default=50, help="connections of the main runs (default 50)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds at --connections (default 2)"
    )
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON and Markdown reports go")
    parser.add_argument("--enforce", action="store_true", help="exit 3 when a target is not met")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.connections < 2 or args.rounds < 1:
        parser.error("--duration >= 1, --connections >= 2 and --rounds >= 1 are required")
    try:
        return run(args)
    except BenchmarkError as exc:
        print(f"token_load: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
