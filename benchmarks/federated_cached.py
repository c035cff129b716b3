"""The cached path of a federated (workload) identity against a user-assigned identity's, in one run.

One NMI in process, fed by the API server stand-in (TLS) and exchanging service-account tokens at the
Azure AD stand-in (TLS); two pods on its node: one bound to a user-assigned identity (IMDS stand-in),
one following workload identity's conventions. Both tokens are fetched once, then ``--requests``
cached answers are asked for on one keep-alive connection per pod, alternating rounds, and the
throughputs are compared. The client is Python and the same for both, so the ratio is what counts
(it should be ~1.0: a cached federated token takes the same path as any other).

    .venv/bin/python -m benchmarks.federated_cached --requests 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
from podidentity.kube.settings import KubeSettings
from standins import apiserver as k8s
from standins.aad import AadStandin
from standins.apiserver import FakeApiServer
from standins.imds import ImdsStandIn

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "bench-node"
TENANT = "7a7a0000-0000-4000-8000-0000000000aa"
FEDERATED_CLIENT = "5c5c0000-0000-4000-8000-0000000000c1"
UAMI_CLIENT = "6d6d0000-0000-4000-8000-0000000000d1"
UAMI_RID = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u"
UAMI_IP, FEDERATED_IP = "127.0.0.71", "127.0.0.72"
REQUEST = (
    b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
    b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
)


def objects() -> list[dict[str, Any]]:
    uami = k8s.azure_identity("u", client_id=UAMI_CLIENT, resource_id=UAMI_RID)
    aai = {
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureAssignedIdentity",
        "metadata": {"name": "uami-pod-default-u", "namespace": "default", "labels": {"nodename": NODE}},
        "spec": {
            "pod": "uami-pod",
            "podNamespace": "default",
            "nodename": NODE,
            "azureIdentityRef": {k: v for k, v in uami.items() if k != "kind"},
        },
        "status": {"status": "Assigned"},
    }
    annotations = {"azure.workload.identity/client-id": FEDERATED_CLIENT}
    return [
        k8s.node(NODE),
        uami,
        k8s.binding("u", "u", "uami"),
        k8s.pod("uami-pod", node=NODE, ip=UAMI_IP, labels={"aadpodidbinding": "uami"}),
        aai,
        k8s.service_account("app", annotations=annotations),
        k8s.pod(
            "wi-pod",
            node=NODE,
            ip=FEDERATED_IP,
            labels={"azure.workload.identity/use": "true"},
            service_account="app",
        ),
    ]


async def rate(port: int, source: str, count: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    started = time.perf_counter()
    try:
        for _ in range(count):
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{source}: {head[:60]!r}")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()
    return count / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        api = FakeApiServer(tls=True, token="t0ken")
        await api.start()
        assert api.ca_pem is not None
        (Path(tmp) / "ca.pem").write_bytes(api.ca_pem)
        aad = AadStandin(trust=str(Path(tmp) / "ca.pem"))
        await aad.start()
        aad.add_tenant(TENANT)
        aad.register_app(TENANT, FEDERATED_CLIENT)
        aad.add_federated_credential(
            TENANT, FEDERATED_CLIENT, issuer=api.issuer, subject="system:serviceaccount:default:app"
        )
        imds = ImdsStandIn()
        imds.add_identity(UAMI_CLIENT, resource_id=UAMI_RID)
        await imds.start("127.0.0.1", 0)
        api.load(objects())
        settings = Settings(
            server=ServerSettings(port=0),
            upstream=UpstreamSettings(
                metadata_ip="127.0.0.1",
                metadata_port=imds.port,
                aad_ca_bundle=aad.write_ca_bundle(Path(tmp) / "aad.pem"),
            ),
            identity=IdentitySettings(federation_authority_host=aad.url, federation_tenant_id=TENANT),
            observability=ObservabilitySettings(
                prometheus_port=0, probe_port=0, probe_address="127.0.0.1", metrics_address="127.0.0.1"
            ),
            cluster=ClusterSettings(node_name=NODE, kubeconfig=str(api.write_kubeconfig(Path(tmp) / "kc"))),
            iptables=IptablesSettings(manage=False),
            kube=KubeSettings(qps=0),
        )
        app = App(settings)
        await app.start()
        try:
            while not app.state.synced or not app.state.pods_at(FEDERATED_IP):
                await app.state.wait_for_change(1.0)
            assert app.server is not None
            port = app.server.port
            await rate(port, UAMI_IP, 10)
            await rate(port, FEDERATED_IP, 10)
            uami: list[float] = []
            federated: list[float] = []
            for _ in range(args.rounds):
                uami.append(await rate(port, UAMI_IP, args.requests))
                federated.append(await rate(port, FEDERATED_IP, args.requests))
            exchanges = (len(api.issued_tokens), len(aad.calls))
        finally:
            await app.stop()
            await imds.stop()
            await aad.close()
            await api.stop()
    return {
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "user_assigned_req_s": round(statistics.median(uami)),
        "federated_req_s": round(statistics.median(federated)),
        "ratio_federated_to_user_assigned": round(statistics.median(federated) / statistics.median(uami), 3),
        "token_requests": exchanges[0],
        "azure_ad_calls": exchanges[1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "federated_cached.json"))
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
