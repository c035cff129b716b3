"""Connection flood: does a pod that holds no connection still get a token, and does memory come back?

Two scenarios against NMI started as token_load starts it (``--cluster-state``, no iptables, the
IMDS stand-in), with callers at 127.0.0.x source addresses: on loopback with iptables off NMI names
the caller by its source address, and any 127.0.0.0/8 address can be a source (``local_addr``).

1. **fair share**: 21 addresses open 200 silent connections each (4,200, above ``max_connections``
   4,096 and under the per-address 256). Then a bound pod that holds no connection asks for a token
   every 0.5 s: the first status it got, and the time until its first 200.
2. **memory**: ``--memory-addresses`` x 250 silent connections, ``--max-connections`` raised to fit.
   NMI's RSS before, at the peak, and after every connection is closed; bytes per connection.

    .venv/bin/python -m benchmarks.connection_flood [--label after] [--memory-addresses 76]

The file-descriptor limit of this process and of NMI is raised to the hard limit (``ulimit -Hn``);
the scale is bounded by it. Writes ``benchmarks/results/connection_flood.json`` (one entry per
``--label``, earlier labels kept) and ``connection_flood.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.token_load import (
    HEADERS,
    NODE,
    TOKEN_PATH,
    BenchmarkError,
    Processes,
    bound_pod_state,
    machine_info,
    proc_memory_kib,
    wait_ready,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HOST = "127.0.0.1"
NEWCOMER = "127.0.0.2"
"""The bound pod that holds no connection."""
FLOOD_ADDRESSES = 21
FLOOD_PER_ADDRESS = 200
MEMORY_PER_ADDRESS = 250
NEWCOMER_DEADLINE_S = 45.0
"""Longer than NMI's idle timeout (30 s): without shedding, a slot frees only when that passes."""
SETTLE_S = 3.0
"""After the last connection closes: lingering closes end and the once-a-second tick runs."""


def flood_address(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def cluster_state(flood_addresses: int) -> str:
    docs = [bound_pod_state("newcomer", "5d4c0a52-00b0-4c1e-9d1e-0000000000c0", NEWCOMER)]
    for i in range(flood_addresses):
        docs.append(
            f"""\
apiVersion: v1
kind: Pod
metadata: {{name: flood-{i}, namespace: default, uid: 5d4c0a52-00b0-4c1e-9d1e-{i:012d}}}
spec: {{nodeName: {NODE}}}
status: {{phase: Running, podIP: {flood_address(i)}}}
"""
        )
    return "---\n".join(docs)


def free_port() -> int:
    """A port free on every address: NMI's probe and metrics listeners bind 0.0.0.0, and a flood
    leaves thousands of 127.0.x.y sockets (closing, TIME_WAIT) whose ports a 127.0.0.1 probe misses."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    return proc_memory_kib(pid)["VmRSS"]


async def open_idle(port: int, sources: list[str], per_source: int) -> list[asyncio.StreamWriter]:
    """Silent connections; those NMI refuses or sheds are simply held until the end."""
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(256)
    failed = 0

    async def one(source: str) -> None:
        nonlocal failed
        async with gate:
            try:
                _, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
            except OSError:
                failed += 1
                return
            writers.append(writer)

    await asyncio.gather(*(one(s) for s in sources for _ in range(per_source)))
    if failed:
        print(f"  {failed} connection(s) could not be opened", flush=True)
    return writers


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()
    await asyncio.sleep(0)


def token_from(port: int, source: str) -> tuple[int, float]:
    started = time.monotonic()
    connection = http.client.HTTPConnection(HOST, port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", TOKEN_PATH, headers=HEADERS)
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    except (OSError, http.client.HTTPException):
        return 0, time.monotonic() - started  # Reset or closed before an answer.
    finally:
        connection.close()


async def newcomer_until_200(port: int) -> dict[str, Any]:
    started = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - started < NEWCOMER_DEADLINE_S:
        status, took = await asyncio.to_thread(token_from, port, NEWCOMER)
        statuses.append(status)
        if status == 200:
            return {
                "first_status": statuses[0],
                "got_200": True,
                "seconds_to_200": round(time.monotonic() - started, 3),
                "last_request_s": round(took, 4),
                "attempts": len(statuses),
            }
        await asyncio.sleep(0.5)
    return {"first_status": statuses[0], "got_200": False, "attempts": len(statuses), "last": statuses[-5:]}


def start_nmi(procs: Processes, state: Path, imds_port: int, max_connections: int) -> tuple[Any, int]:
    nmi_port, probe_port, metrics_port = free_port(), free_port(), free_port()
    nmi = procs.start(
        "nmi",
        [
            sys.executable, "-m", "nmi", "--cluster-state", str(state), "--node", NODE,
            "--manage-iptables=false", "--metadata-ip", HOST, "--metadata-port", str(imds_port),
            "--nmi-port", str(nmi_port), "--http-probe-port", str(probe_port),
            "--prometheus-port", str(metrics_port), "--max-connections", str(max_connections),
        ],
    )  # fmt: skip
    wait_ready(procs, "nmi", f"http://{HOST}:{probe_port}/readyz")
    return nmi, nmi_port


async def scenario(
    tmp: Path, name: str, addresses: int, per_address: int, max_connections: int
) -> dict[str, Any]:
    state = tmp / f"{name}.yaml"
    state.write_text(cluster_state(addresses))
    procs = Processes(tmp)
    try:
        procs.start(
            "imds",
            [sys.executable, "-m", "standins.imds", "--host", HOST, "--port", "0",
             "--identities-from", str(state)],
        )  # fmt: skip
        imds_port = int(procs.wait_for_line("imds", r"listening on [\d.]+:(\d+)").group(1))
        nmi, port = start_nmi(procs, state, imds_port, max_connections)
        await asyncio.sleep(1.0)
        before = rss_kib(nmi.pid)
        opened_at = time.monotonic()
        writers = await open_idle(port, [flood_address(i) for i in range(addresses)], per_address)
        open_s = time.monotonic() - opened_at
        await asyncio.sleep(1.0)  # Accepts drain; refusals are written.
        peak = rss_kib(nmi.pid)
        newcomer = await newcomer_until_200(port)
        peak = max(peak, rss_kib(nmi.pid))
        held = proc_memory_kib(nmi.pid)
        await close_all(writers)
        await asyncio.sleep(SETTLE_S)
        after = rss_kib(nmi.pid)
        procs.check_alive("nmi")
        log = procs.log("nmi")
    finally:
        procs.stop_all()
    connections = addresses * per_address
    trimmed = [line for line in log.splitlines() if "returned freed memory" in line]
    return {
        "addresses": addresses,
        "per_address": per_address,
        "connections_opened": len(writers),
        "max_connections": max_connections,
        "seconds_to_open": round(open_s, 2),
        "newcomer": newcomer,
        "rss_kib": {"before": before, "peak": peak, "after": after, "hwm": held["VmHWM"]},
        "bytes_per_connection": round((peak - before) * 1024 / connections),
        "after_minus_before_kib": after - before,
        "nmi_log_memory_release": trimmed[-1:] if trimmed else [],
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Connection flood: fair share at the cap, memory per connection",
        "",
        "`python -m benchmarks.connection_flood` (see benchmarks/README.md). Silent connections from",
        "127.0.x.y source addresses; the newcomer is a bound pod at 127.0.0.2 that holds none.",
        "",
        "| label | scenario | connections (addresses x each) | cap | newcomer first status "
        "| newcomer 200 after | RSS before / peak / after MiB | bytes per connection |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in doc["runs"].items():
        for name in ("fair_share", "memory"):
            r = run.get(name)
            if r is None:
                continue
            n = r["newcomer"]
            got = f"{n['seconds_to_200']:.2f} s" if n["got_200"] else f"none in {NEWCOMER_DEADLINE_S:.0f} s"
            rss = r["rss_kib"]
            lines.append(
                f"| {label} | {name} | {r['addresses'] * r['per_address']:,} ({r['addresses']} x "
                f"{r['per_address']}) | {r['max_connections']:,} | {n['first_status']} | {got} | "
                f"{rss['before'] / 1024:.1f} / {rss['peak'] / 1024:.1f} / {rss['after'] / 1024:.1f} | "
                f"{r['bytes_per_connection']:,} |"
            )
    m = next(iter(doc["runs"].values()))["machine"]
    lines += [
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}; file-descriptor limit "
        f"{next(iter(doc['runs'].values()))['fd_limit']}. First status 0 = the connection was closed "
        "before an answer.",
        "",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    memory_connections = args.memory_addresses * MEMORY_PER_ADDRESS
    if memory_connections + 500 > fd_limit:
        raise BenchmarkError(
            f"--memory-addresses {args.memory_addresses} needs {memory_connections + 500} file descriptors; "
            f"the hard limit is {fd_limit}"
        )
    result: dict[str, Any] = {"machine": machine_info(), "fd_limit": fd_limit}
    with tempfile.TemporaryDirectory(prefix="nmi-connection-flood-") as tmp:
        print(f"fair share: {FLOOD_ADDRESSES} x {FLOOD_PER_ADDRESS} connections, cap 4096 ...", flush=True)
        result["fair_share"] = await scenario(Path(tmp), "fair", FLOOD_ADDRESSES, FLOOD_PER_ADDRESS, 4096)
        print(f"  {json.dumps(result['fair_share'])}", flush=True)
        print(f"memory: {args.memory_addresses} x {MEMORY_PER_ADDRESS} connections ...", flush=True)
        result["memory"] = await scenario(
            Path(tmp), "memory", args.memory_addresses, MEMORY_PER_ADDRESS, memory_connections + 100
        )
        print(f"  {json.dumps(result['memory'])}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.connection_flood", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--label", default="after", help="key of this run in the JSON (default: after)")
    parser.add_argument(
        "--memory-addresses", type=int, default=76, help="x 250 connections in the memory scenario"
    )
    parser.add_argument("--out", default=str(RESULTS), help="where the JSON and Markdown reports go")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except BenchmarkError as exc:
        print(f"connection_flood: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "connection_flood.json"
    doc: dict[str, Any] = {"benchmark": "connection_flood", "runs": {}}
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(path.read_text())
    doc["runs"][args.label] = result
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (out / "connection_flood.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
