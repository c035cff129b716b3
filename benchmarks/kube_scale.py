"""How fast NMI's watch caches get ready, how much memory they take, and how many events they absorb.

The API server stand-in (HTTPS, bearer token) runs in this process; each measurement starts a fresh
child process that runs only ``KubeSource`` against it through a kubeconfig, as the daemon would.

Scenarios (110 pods on the measured node in each):
  pods-only        no AzureAssignedIdentities at all
  aai-5000-local   5,000 AAIs in the cluster, 110 of them on this node (scale features on)
  aai-5000-remote  5,000 AAIs, all on other nodes: RSS should match pods-only
  aai-5000-noscale as aai-5000-local with --enableScaleFeatures=false (every AAI cached)

Then, in aai-5000-local, N pod updates are queued while the streams are paused and released at
once: events/s is N over the time the child takes to apply all of them.

    .venv/bin/python benchmarks/kube_scale.py [--runs 3] [--events 20000]

Writes benchmarks/results/kube_scale.json and prints a table.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402  (the child times its own imports from _T0)
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kube_scale.json"
NODE = "node-a"
PODS_ON_NODE = 110
AAIS = 5000
NODES = 50


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return 0.0


# --- child -------------------------------------------------------------------------------------


async def _child(args: argparse.Namespace) -> None:
    import gc

    from prometheus_client import CollectorRegistry

    from nmi.metrics import Metrics
    from nmi.settings import ClusterSettings, Settings
    from nmi.watches import KubeSource
    from podidentity.model import AzureAssignedIdentity, Pod
    from podidentity.state import ClusterState

    imported = time.perf_counter()
    rss_import = _status_kb("VmRSS") / 1024
    settings = Settings(
        cluster=ClusterSettings(
            node_name=NODE, kubeconfig=args.kubeconfig, enable_scale_features=not args.no_scale
        )
    )
    state = ClusterState()
    source = KubeSource(settings, state, Metrics(CollectorRegistry()))
    start = time.perf_counter()
    await source.start()
    ready = await source.wait_ready(60)
    ready_s = time.perf_counter() - start
    gc.collect()
    report: dict[str, Any] = {
        "ready": ready,
        "ready_s": ready_s,
        "process_to_ready_s": time.perf_counter() - _T0,
        "import_s": imported - _T0,
        "rss_after_import_mb": rss_import,
        "rss_ready_mb": _status_kb("VmRSS") / 1024,
        "pods": state.count(Pod),
        "aais": state.count(AzureAssignedIdentity),
        "kubernetes_asyncio_loaded": "kubernetes_asyncio" in sys.modules,
    }
    print(json.dumps(report), flush=True)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = (await reader.readline()).decode().split()
    if line and line[0] == "events":
        count = int(line[1])
        target = state.version + count
        print(json.dumps({"armed": True}), flush=True)
        t0 = time.perf_counter()
        while state.version < target:
            await state.wait_for_change(30)
        elapsed = time.perf_counter() - t0
        gc.collect()
        print(
            json.dumps(
                {
                    "events": count,
                    "events_s": elapsed,
                    "events_per_s": count / elapsed,
                    "rss_after_events_mb": _status_kb("VmRSS") / 1024,
                    "hwm_mb": _status_kb("VmHWM") / 1024,
                }
            ),
            flush=True,
        )
    await source.stop()


# --- parent ------------------------------------------------------------------------------------


def _cluster(server: Any, *, aais: int, local_aais: int) -> None:
    from standins.apiserver import assigned_identity, azure_identity, pod

    for i in range(PODS_ON_NODE):
        server.create(
            pod(
                f"app-{i}",
                namespace=f"ns-{i % 10}",
                node=NODE,
                ip=f"10.244.0.{i + 2}",
                labels={"app": f"a{i}"},
            )
        )
    identities = [azure_identity(f"id-{k}", namespace="default") for k in range(20)]
    for k in range(aais):
        local = k < local_aais
        node = NODE if local else f"node-{1 + k % (NODES - 1)}"
        server.create(
            assigned_identity(
                f"app-{k}" if local else f"remote-{k}",
                identities[k % len(identities)],
                pod_namespace=f"ns-{k % 10}",
                node=node,
            )
        )


async def _run_child(kubeconfig: Path, *, no_scale: bool, server: Any, events: int) -> dict[str, Any]:
    cmd = [sys.executable, str(SCRIPT), "--child", "--kubeconfig", str(kubeconfig)]
    if no_scale:
        cmd.append("--no-scale")
    spawned = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    result: dict[str, Any] = json.loads(await proc.stdout.readline())
    result["spawn_to_ready_s"] = time.perf_counter() - spawned
    if events:
        server.pause_watches()
        for n in range(events):
            i = n % PODS_ON_NODE
            server.patch("pods", f"ns-{i % 10}", f"app-{i}", {"metadata": {"labels": {"rev": str(n)}}})
        proc.stdin.write(f"events {events}\n".encode())
        await proc.stdin.drain()
        json.loads(await proc.stdout.readline())  # armed
        server.resume_watches()
        result.update(json.loads(await proc.stdout.readline()))
    else:
        proc.stdin.write(b"done\n")
        await proc.stdin.drain()
    await proc.wait()
    return result


SCENARIOS = [
    # name, AAIs in the cluster, of which on this node, scale features off, measure events/s
    ("pods-only", 0, 0, False, False),
    ("aai-5000-local", AAIS, PODS_ON_NODE, False, True),
    ("aai-5000-remote", AAIS, 0, False, False),
    ("aai-5000-noscale", AAIS, PODS_ON_NODE, True, False),
]


async def _parent(args: argparse.Namespace) -> None:
    from standins.apiserver import FakeApiServer

    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "pods_on_node": PODS_ON_NODE,
        "aais_in_cluster": AAIS,
        "runs": args.runs,
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, aais, local, no_scale, with_events in SCENARIOS:
            async with FakeApiServer(tls=True, token="bench") as server:
                _cluster(server, aais=aais, local_aais=local)
                kubeconfig = server.write_kubeconfig(Path(tmp) / f"{name}.kubeconfig")
                runs = [
                    await _run_child(kubeconfig, no_scale=no_scale, server=server, events=0)
                    for _ in range(args.runs)
                ]
                summary = {
                    key: round(statistics.median(r[key] for r in runs), 3)
                    for key in (
                        "ready_s",
                        "spawn_to_ready_s",
                        "import_s",
                        "rss_after_import_mb",
                        "rss_ready_mb",
                    )
                }
                summary["ready_s_max"] = round(max(r["ready_s"] for r in runs), 3)
                summary["pods"] = runs[0]["pods"]
                summary["aais"] = runs[0]["aais"]
                summary["kubernetes_asyncio_loaded"] = runs[0]["kubernetes_asyncio_loaded"]
                if with_events:
                    ev = await _run_child(kubeconfig, no_scale=no_scale, server=server, events=args.events)
                    summary.update(
                        events=ev["events"],
                        events_per_s=round(ev["events_per_s"]),
                        rss_after_events_mb=round(ev["rss_after_events_mb"], 1),
                    )
                results["scenarios"][name] = summary
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    _table(results)


def _table(results: dict[str, Any]) -> None:
    head = (
        f"{'scenario':<18} {'pods':>5} {'aais':>5} {'ready s':>8} {'spawn→ready s':>14}"
        f" {'RSS MB':>7} {'RSS import MB':>14}"
    )
    print(head)
    print("-" * len(head))
    for name, s in results["scenarios"].items():
        print(
            f"{name:<18} {s['pods']:>5} {s['aais']:>5} {s['ready_s']:>8.3f} {s['spawn_to_ready_s']:>14.3f}"
            f" {s['rss_ready_mb']:>7.1f} {s['rss_after_import_mb']:>14.1f}"
        )
    for name, s in results["scenarios"].items():
        if "events_per_s" in s:
            print(
                f"\n{name}: {s['events']} pod events absorbed at {s['events_per_s']:,} events/s "
                f"(RSS after: {s['rss_after_events_mb']} MB)"
            )
    print(f"\nresults: {RESULTS.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    parser.add_argument("--no-scale", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(_child(args) if args.child else _parent(args))


if __name__ == "__main__":
    main()
