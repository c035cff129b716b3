"""Service-account tokens for workload identity, from the Kubernetes TokenRequest API.

A token is asked for one pod of this node that NMI knows, bound to it by name and uid (as the
kubelet's projected tokens are), for the audience Azure AD's federation expects, with about an
hour of life. It is reused until most of that life is spent (and never for a pod that went), so a
pod's first federated token costs one TokenRequest and its later ones none. Neither the token nor
any part of it is ever logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from podidentity.errors import UpstreamRefused, UpstreamUnavailable
from podidentity.kube.client import KubeClient
from podidentity.kube.errors import KubeApiError, KubeError
from podidentity.model import Pod
from podidentity.tokens import TokenRequest

log = logging.getLogger("nmi.tokens.sa")

AUDIENCE = "api://AzureADTokenExchange"
LIFETIME_S = 3600
REUSE_FRACTION = 0.8
"""A token is used until this share of its lifetime is spent, then a new one is asked for."""
MAX_TOKENS = 1024


@dataclass(slots=True)
class _Held:
    token: str
    uid: str
    reuse_until: float


class ServiceAccountTokens:
    def __init__(
        self,
        client: Callable[[], KubeClient | None],
        *,
        live: Callable[[Pod], bool],
        pod_of: Callable[[str, str], Pod | None] = lambda namespace, account: None,
        errors: Callable[[], None] | None = None,  # counts a failed TokenRequest
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._live = live
        self._pod_of = pod_of
        self._clock = clock
        self._errors = errors
        self._held: dict[tuple[str, str], _Held] = {}
        self._flights: dict[tuple[str, str, str], asyncio.Task[_Held]] = {}

    async def for_request(self, request: TokenRequest, deadline: float) -> str:
        """The ``AssertionProvider`` of the MSAL source: a token of the request's service account,
        for the request's pod, or (a background refresh after that pod went) another live pod of the
        same account on this node."""
        pod = request.pod
        if pod is not None and not self._live(pod):
            namespace, _, account = request.service_account.partition("/")
            pod = self._pod_of(namespace, account)
        if pod is None:
            raise UpstreamUnavailable("no pod of this service account runs on this node any more")
        return await self.token(pod, deadline=deadline)

    async def token(self, pod: Pod, *, deadline: float) -> str:
        if not self._live(pod):
            # Only pods of this node that NMI knows right now, with the uid it knows.
            raise UpstreamRefused(
                "invalid_request",
                f"pod {pod.namespace}/{pod.name} is not running on this node",
                upstream_status=0,
            )
        key = (pod.namespace, pod.name)
        held = self._held.get(key)
        if held is not None and held.uid == pod.uid and self._clock() < held.reuse_until:
            return held.token
        flight_key = (pod.namespace, pod.name, pod.uid)
        flight = self._flights.get(flight_key)
        if flight is None:
            flight = asyncio.create_task(self._request(pod))
            self._flights[flight_key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(flight_key, None))
        try:
            async with asyncio.timeout_at(deadline):
                held = await asyncio.shield(flight)
        except TimeoutError:
            raise UpstreamUnavailable(
                "the Kubernetes API did not issue a service-account token in time"
            ) from None
        if len(self._held) >= MAX_TOKENS:
            self._prune()
        self._held[key] = held
        return held.token

    def _prune(self) -> None:
        """Tokens no longer worth reusing; a gone pod's token is never handed out again anyway (its
        uid no longer matches any live pod), and leaves here once it is stale."""
        self._held = {k: h for k, h in self._held.items() if self._clock() < h.reuse_until}

    async def _request(self, pod: Pod) -> _Held:
        client = self._client()
        if client is None:
            raise UpstreamUnavailable("the Kubernetes API is not connected yet")
        path = f"/api/v1/namespaces/{pod.namespace}/serviceaccounts/{pod.service_account}/token"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [AUDIENCE],
                "expirationSeconds": LIFETIME_S,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid},
            },
        }
        asked = self._clock()
        try:
            answer = await client.write("POST", path, body)
        except KubeApiError as exc:
            self._count_error()
            where = f"{pod.namespace}/{pod.service_account}"
            if exc.status in (401, 403, 404, 409, 422, 400):
                # RBAC (serviceaccounts/token create), a pod or service account gone, a uid mismatch:
                # final for the caller; retrying for minutes would not change it.
                raise UpstreamRefused(
                    "service_account_token_refused",
                    f"TokenRequest for service account {where} refused: {exc.status} {exc.reason}: "
                    f"{exc.message}"[:300],
                    upstream_status=exc.status,
                ) from None
            raise UpstreamUnavailable(
                f"TokenRequest for service account {where} failed: {exc.status}"
            ) from None
        except KubeError as exc:
            self._count_error()
            raise UpstreamUnavailable(f"TokenRequest failed: {exc}") from None
        status = answer.get("status") if isinstance(answer.get("status"), dict) else {}
        token = status.get("token") if isinstance(status, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable("TokenRequest answered without a token")
        expires = _epoch(status.get("expirationTimestamp") if isinstance(status, dict) else None)
        lifetime = (expires - asked) if expires else LIFETIME_S
        return _Held(token, pod.uid, asked + REUSE_FRACTION * max(0.0, lifetime))

    def _count_error(self) -> None:
        if self._errors is not None:
            self._errors()


def _epoch(value: object) -> float:
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
