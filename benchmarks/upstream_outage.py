"""Upstream outages: how fast every pod gets its token once IMDS recovers, and how NMI spends its
upstream budget meanwhile (issue: "recover at once when IMDS does").

50 cold pods with distinct identities ask for tokens, as SDKs do, every ``--client-retry-s`` until
they get one, while IMDS answers 500 (or 429 with ``Retry-After``) for ``--outage-s``; then IMDS is
healthy again. Reported: upstream calls during the outage, how many distinct keys were tried,
503s with and without ``Retry-After``, the peak upstream rate in any 1 s window (the budget is
15/s), and per key the time from IMDS's recovery to its first 200 (p50, p100, keys still failing).

Everything runs in one process on loopback: NMI (its real HTTP server and token path, no iptables)
in front of the IMDS stand-in; pods are source addresses 127.0.0.10+. No root needed.

    .venv/bin/python -m benchmarks.upstream_outage                # 500 and 429 episodes
    .venv/bin/python -m benchmarks.upstream_outage --status 429 --outage-s 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmi.app import App
from nmi.settings import (
    ClusterSettings,
    IdentitySettings,
    IptablesSettings,
    ObservabilitySettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
)
from standins._imds_state import Failure
from standins.imds import ImdsStandIn

RESULTS = Path(__file__).resolve().parent / "results"
SUB = "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/bench/providers"


def _client(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def _resource_id(i: int) -> str:
    return f"{SUB}/Microsoft.ManagedIdentity/userAssignedIdentities/id-{i}"


def cluster_state(pods: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i in range(pods):
        name = f"pod-{i}"
        ident = {
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzureIdentity",
            "metadata": {"name": f"id-{i}", "namespace": "default"},
            "spec": {
                "type": 0,
                "clientID": _client(i),
                "resourceID": _resource_id(i),
            },
        }
        docs.append(ident)
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "default", "uid": f"uid-{i}", "labels": {}},
                "spec": {"nodeName": "bench-node"},
                "status": {"phase": "Running", "podIP": f"127.0.{1 + i // 200}.{10 + i % 200}"},
            }
        )
        docs.append(
            {
                "apiVersion": "aadpodidentity.k8s.io/v1",
                "kind": "AzureAssignedIdentity",
                "metadata": {"name": f"{name}-default-id-{i}", "namespace": "default"},
                "spec": {
                    "pod": name,
                    "podNamespace": "default",
                    "nodename": "bench-node",
                    "azureIdentityRef": {k: v for k, v in ident.items() if k != "kind"},
                },
                "status": {"status": "Assigned"},
            }
        )
    return docs


@dataclass
class PodClient:
    index: int
    ip: str
    answers: list[tuple[float, int, bool]] = field(default_factory=list)
    """(loop time, status, had Retry-After)."""
    first_ok: float | None = None


async def ask(port: int, pod: PodClient) -> tuple[int, bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(pod.ip, 0))
    try:
        writer.write(
            b"GET /metadata/identity/oauth2/token?api-version=2018-02-01"
            b"&resource=https%3A%2F%2Fvault.azure.net HTTP/1.1\r\n"
            b"Host: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
        )
        raw = await reader.read()
    finally:
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return int(head.split()[1]), "\nretry-after:" in head


async def run_episode(status: int, args: argparse.Namespace) -> dict[str, Any]:
    imds = ImdsStandIn()
    for i in range(args.pods):
        imds.add_identity(
            _client(i), resource_id=f"{SUB}/Microsoft.ManagedIdentity/userAssignedIdentities/id-{i}"
        )
    await imds.start("127.0.0.1", 0)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.yaml"
        state.write_text(yaml.safe_dump_all(cluster_state(args.pods)))
        settings = Settings(
            server=ServerSettings(port=0),
            upstream=UpstreamSettings(
                metadata_ip="127.0.0.1", metadata_port=imds.port, request_timeout_s=args.upstream_timeout_s
            ),
            identity=IdentitySettings(pod_wait_timeout_s=2.0, identity_wait_timeout_s=args.identity_wait_s),
            observability=ObservabilitySettings(
                prometheus_port=0, probe_port=0, probe_address="127.0.0.1", metrics_address="127.0.0.1"
            ),
            cluster=ClusterSettings(node_name="bench-node", cluster_state_path=str(state)),
            iptables=IptablesSettings(manage=False),
        )
        app = App(settings)
        await app.start()
        try:
            assert app.server is not None
            port = app.server.port
            loop = asyncio.get_running_loop()
            retry_after = 2.0 if status == 429 else None
            imds.faults.outage = Failure(status if status else -1, retry_after)
            outage_start = loop.time()
            pods = [PodClient(i, f"127.0.{1 + i // 200}.{10 + i % 200}") for i in range(args.pods)]
            recovered_at: list[float] = []

            async def client(pod: PodClient) -> None:
                while loop.time() - outage_start < args.outage_s + args.after_s:
                    try:
                        code, has_retry_after = await asyncio.wait_for(ask(port, pod), args.client_timeout_s)
                    except (TimeoutError, OSError):
                        code, has_retry_after = 0, False
                    pod.answers.append((loop.time(), code, has_retry_after))
                    if code == 200:
                        pod.first_ok = loop.time()
                        return
                    await asyncio.sleep(args.client_retry_s)

            async def recover() -> None:
                await asyncio.sleep(args.outage_s)
                imds.faults.outage = None
                recovered_at.append(loop.time())

            await asyncio.gather(recover(), *(client(p) for p in pods))
        finally:
            await app.stop()
            await imds.stop()
    recovery = recovered_at[0]
    calls = [r for r in imds.requests if r.at >= 0]
    during = [r for r in calls if r.status != 200]
    starts = sorted(r.at for r in calls)
    peak = max((sum(1 for t in starts if s <= t < s + 1.0) for s in starts), default=0)
    tried = {r.query.get("client_id", "") for r in during}
    after = [p.first_ok - recovery for p in pods if p.first_ok is not None and p.first_ok >= recovery]
    early = sum(1 for p in pods if p.first_ok is not None and p.first_ok < recovery)
    failing = sum(1 for p in pods if p.first_ok is None)
    unavailable = [(s, ra) for p in pods for _, s, ra in p.answers if s == 503]
    return {
        "status": status,
        "pods": args.pods,
        "outage_s": args.outage_s,
        "upstream_calls_during_outage": len(during),
        "keys_tried_during_outage": len(tried),
        "peak_upstream_per_s": peak,
        "answers_503": len(unavailable),
        "answers_503_without_retry_after": sum(1 for _, ra in unavailable if not ra),
        "recovery_p50_s": round(statistics.median(after), 3) if after else None,
        "recovery_max_s": round(max(after), 3) if after else None,
        "ok_before_recovery": early,
        "still_failing": failing,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--outage-s", type=float, default=25.0)
    parser.add_argument("--after-s", type=float, default=30.0, help="how long clients go on after recovery")
    parser.add_argument("--client-retry-s", type=float, default=1.0)
    parser.add_argument(
        "--client-timeout-s", type=float, default=5.0, help="an SDK's per-request timeout (it then retries)"
    )
    parser.add_argument(
        "--status",
        type=int,
        action="append",
        help="500, 429, or 0 for connection resets (default: all three)",
    )
    parser.add_argument("--upstream-timeout-s", type=float, default=10.0, help="NMI's --upstream-timeout")
    parser.add_argument("--identity-wait-s", type=float, default=15.0, help="NMI's --identity-wait-timeout")
    parser.add_argument("--out", default=str(RESULTS / "upstream_outage.json"))
    args = parser.parse_args(argv)
    results = [asyncio.run(run_episode(status, args)) for status in (args.status or [500, 429, 0])]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
