"""A service-principal MIC in a custom cloud, as users run one in a sovereign or private cloud: the
cloud is an AzureStackCloud environment file whose Resource Manager and Azure AD are the stand-ins
over TLS, trusted through SSL_CERT_FILE / REQUESTS_CA_BUNDLE, with no test-only switch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import trustme

from standins import apiserver as k8s
from standins.aad import AadStandin
from standins.arm import VMSS, ArmStandIn

from .conftest import POOL, RG, SUB, Env, identity, uami, until

TENANT = "7f1e0000-0000-4000-8000-0000000000aa"
MIC_APP = "3c4d0000-0000-4000-8000-0000000000bb"
AUDIENCE = "https://management.contoso-stack.example/4de154de-f8a8-4017-af41-df619da68155"
CLIENT = "aaaaaaaa-0000-0000-0000-0000000000dd"


async def test_a_service_principal_mic_talks_only_to_its_clouds_endpoints(env: Env, tmp_path: Path) -> None:
    ca = trustme.CA()
    async with AadStandin(ca=ca) as aad, ArmStandIn(ca=ca, expect_audience=AUDIENCE, lro_delay_s=0.1) as arm:
        aad.add_tenant(TENANT)
        aad.register_app(TENANT, MIC_APP, secret="s3cr3t")
        arm.add_vmss(SUB, RG, POOL, system_assigned=True)
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        environment = tmp_path / "akscustom.json"
        environment.write_text(
            json.dumps(
                {
                    "name": "AzureStackCloud",
                    "resourceManagerEndpoint": arm.url + "/",
                    "activeDirectoryEndpoint": aad.url,
                    "tokenAudience": AUDIENCE,
                }
            )
        )
        azure_json = tmp_path / "azure.json"
        azure_json.write_text(
            json.dumps(
                {
                    "cloud": "AzureStackCloud",
                    "tenantId": TENANT,
                    "aadClientId": MIC_APP,
                    "aadClientSecret": "s3cr3t",
                    "subscriptionId": SUB,
                    "resourceGroup": RG,
                }
            )
        )
        env.api.create(identity("id-a", CLIENT))
        env.api.create(k8s.binding("bind-a", "id-a", "sel-a"))
        env.api.create(k8s.pod("p1", node="aks-pool-0", labels={"aadpodidbinding": "sel-a"}))
        process_env = {
            **os.environ,
            "AZURE_ENVIRONMENT_FILEPATH": str(environment),
            "SSL_CERT_FILE": str(bundle),
            "REQUESTS_CA_BUNDLE": str(bundle),
        }
        log = tmp_path / "mic.log"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mic",
            f"--kubeconfig={env.kubeconfig}",
            f"--cloudconfig={azure_json}",
            # Anything MIC asks IMDS would fail loudly here: it must not ask.
            "--imds-endpoint=http://127.0.0.1:9",
            # Ports the kernel picks: nothing here needs to know them.
            "--http-probe-port=0",
            "--prometheus-port=0",
            env=process_env,
            stdout=log.open("wb"),
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await until(lambda: env.status("p1-default-id-a") == "Assigned", 20.0, "Assigned")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 10)
            print(log.read_text()[-4000:])
        assert uami("id-a").casefold() in arm.identities(VMSS, SUB, RG, POOL)
        # Azure AD: the service principal, in its tenant, for the cloud's token audience.
        assert [(c.tenant, c.client_id, c.scope, c.status) for c in aad.calls] == [
            (TENANT, MIC_APP, AUDIENCE + "/.default", 200)
        ]
        # Resource Manager saw only bearer tokens with that audience (checked by the stand-in).
        assert arm.calls and all(call.status < 400 for call in arm.calls if call.method == "PATCH")
        assert not env.imds.requests
