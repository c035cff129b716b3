"""Service-account tokens for federated identities: bound to a live pod of this node, reused, and
taken from another pod of the same account when the one that first asked has gone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nmi.service_accounts import ServiceAccountTokens
from podidentity.errors import UpstreamRefused
from podidentity.kube.errors import KubeApiError
from podidentity.model import AzureIdentity, IdentityType, Pod
from podidentity.tokens import TokenRequest

pytestmark = pytest.mark.timeout(10)


def pod(name: str, uid: str, account: str = "app") -> Pod:
    return Pod("apps", name, uid, "10.0.0.1", "Running", {}, "node-a", service_account=account)


class FakeClient:
    def __init__(self, refuse: int | None = None) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.refuse = refuse

    async def write(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        if self.refuse is not None:
            raise KubeApiError(self.refuse, "Forbidden", "cannot create resource serviceaccounts/token")
        self.bodies.append((path, body))
        return {
            "status": {"token": f"token-{len(self.bodies)}", "expirationTimestamp": "2099-01-01T00:00:00Z"}
        }


FED = AzureIdentity("apps", "serviceaccount:app", IdentityType.FEDERATED, "c1")


def request(for_pod: Pod) -> TokenRequest:
    return TokenRequest(FED, "https://vault.azure.net", "2018-02-01", service_account="apps/app", pod=for_pod)


async def test_one_token_request_per_pod_then_reused_and_bound_to_the_pod() -> None:
    client = FakeClient()
    web = pod("web", "u-1")
    tokens = ServiceAccountTokens(lambda: client, live=lambda p: True)  # type: ignore[arg-type, return-value]
    deadline = asyncio.get_running_loop().time() + 5
    assert await tokens.for_request(request(web), deadline) == "token-1"
    assert await tokens.for_request(request(web), deadline) == "token-1"
    [(path, body)] = client.bodies
    assert path == "/api/v1/namespaces/apps/serviceaccounts/app/token"
    assert body["spec"]["boundObjectRef"] == {"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "u-1"}
    assert body["spec"]["audiences"] == ["api://AzureADTokenExchange"]


async def test_a_refresh_after_the_first_pod_went_uses_another_pod_of_the_account() -> None:
    client = FakeClient()
    gone, other = pod("web", "u-1"), pod("web-2", "u-2")
    tokens = ServiceAccountTokens(
        lambda: client,  # type: ignore[arg-type, return-value]
        live=lambda p: p.uid != "u-1",
        pod_of=lambda namespace, account: other if (namespace, account) == ("apps", "app") else None,
    )
    deadline = asyncio.get_running_loop().time() + 5
    assert await tokens.for_request(request(gone), deadline) == "token-1"
    assert client.bodies[0][1]["spec"]["boundObjectRef"]["name"] == "web-2"


async def test_a_pod_that_is_not_live_never_gets_a_token_and_refusals_are_final() -> None:
    tokens = ServiceAccountTokens(lambda: FakeClient(), live=lambda p: False)  # type: ignore[arg-type, return-value]
    with pytest.raises(UpstreamRefused):
        await tokens.token(pod("web", "u-1"), deadline=asyncio.get_running_loop().time() + 5)
    refused = ServiceAccountTokens(lambda: FakeClient(refuse=403), live=lambda p: True)  # type: ignore[arg-type, return-value]
    with pytest.raises(UpstreamRefused) as caught:
        await refused.token(pod("web", "u-1"), deadline=asyncio.get_running_loop().time() + 5)
    assert caught.value.status == 403 and caught.value.error == "service_account_token_refused"
