"""From a caller address and a token request to a token: pod lookup, identity decision, token.

The service owns the whole step: ``pod_now`` + ``try_now`` answer from memory without awaiting;
only a miss (unknown caller, identity not yet assigned, object id not yet learned, token not
cached) goes to ``pod`` + ``answer``, which await. The HTTP layer tries the synchronous pair first
so a cached answer costs no task at all.

The pod-start race: an address not yet in the pod cache, or an identity that MIC has not yet
assigned, makes the request wait, woken by every cache update (``ClusterState.wait_for_change``)
and bounded by the settings. A client that disconnects cancels the wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nmi.metrics import Metrics
from nmi.resolver import (
    Decision,
    Deny,
    Grant,
    Learn,
    PassThrough,
    Pending,
    Refusal,
    object_id_key,
    resolve,
)
from nmi.selectors import IdentityQuery
from nmi.settings import Settings
from nmi.tokens.cache import TokenCache
from nmi.tokens.claims import object_id
from nmi.tokens.fairness import CallerSlots
from podidentity.errors import (
    AmbiguousPod,
    BadRequest,
    IdentityNotFound,
    NoSuchIdentity,
    PodNotFound,
    ServiceError,
    UpstreamUnavailable,
)
from podidentity.model import SERVICE_PRINCIPAL_TYPES, AzureIdentity, IdentityType, ObjectKey, Pod
from podidentity.state import ClusterState
from podidentity.tokens import Token, TokenRequest, TokenSource

# IMDS's own texts (nmi-spec §2.3): SDKs and people search for them.
IDENTITY_NOT_FOUND = "Identity not found"
MULTIPLE_IDENTITIES = (
    "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity "
    "in the token request"
)
MAX_OBJECT_IDS = 100_000
DEFAULT_RETRY_AFTER_S = 2.0


@dataclass(frozen=True, slots=True)
class Granted:
    identity: AzureIdentity
    request: TokenRequest
    token: Token


@dataclass(frozen=True, slots=True)
class Excepted:
    """The pod is excepted: its request goes to IMDS as it is."""

    exception: ObjectKey


class TokenService:
    def __init__(
        self,
        settings: Settings,
        state: ClusterState,
        cache: TokenCache,
        sources: Mapping[IdentityType, TokenSource],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        loop: asyncio.AbstractEventLoop | None = None,
        retry_hint: Callable[[], float] = lambda: DEFAULT_RETRY_AFTER_S,
    ) -> None:
        self._settings = settings
        self._retry_hint = retry_hint
        self._identity = settings.identity
        self.state = state
        self.cache = cache
        self._sources = sources
        self._metrics = metrics
        self._clock = clock
        self._loop = loop
        self._callers = CallerSlots(settings.upstream.max_concurrent_per_pod)
        self.object_ids: dict[str, str] = {}
        """Folded client id -> folded object id (``""``: none in its tokens), learned from tokens."""
        self._denied = metrics.decisions.labels("denied")
        self._wait_pod = metrics.waits.labels("pod", "found"), metrics.waits.labels("pod", "timeout")
        self._wait_identity = (
            metrics.waits.labels("identity", "assigned"),
            metrics.waits.labels("identity", "timeout"),
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def deadline(self) -> float:
        return (
            self.loop.time()
            + self._settings.upstream.request_timeout_s
            + self._identity.identity_wait_timeout_s
        )

    # --- caller -------------------------------------------------------------------------

    def pod_now(self, ip: str) -> Pod | None:
        pods = self.state.pods_at(ip)
        if len(pods) == 1:
            return pods[0]
        if pods:
            self._metrics.ambiguous_callers.inc()
            names = ", ".join(sorted(str(p.key) for p in pods))
            raise AmbiguousPod(f"several running pods on this node have the address {ip}: {names}")
        return None

    async def pod(self, ip: str) -> Pod:
        pod = self.pod_now(ip)
        if pod is not None:
            return pod
        loop = self.loop
        start = loop.time()
        until = start + self._identity.pod_wait_timeout_s
        while (remaining := until - loop.time()) > 0:
            await self.state.wait_for_change(remaining)
            pod = self.pod_now(ip)
            if pod is not None:
                self._wait_pod[0].observe(loop.time() - start)
                return pod
        self._wait_pod[1].observe(loop.time() - start)
        self._metrics.kube_errors.labels("get_pod_list").inc()
        raise self._not_found(PodNotFound(f"no running pod on this node has the address {ip}"))

    def pod_by_name(self, namespace: str, name: str) -> Pod | None:
        return self.state.get(Pod, ObjectKey(namespace, name))

    # --- the token step ---------------------------------------------------------------------

    def try_now(
        self, pod: Pod, query: IdentityQuery, resource: str, api_version: str, tenant_id: str = ""
    ) -> Granted | None:
        """The answer from memory without awaiting: granted with a cached token, or ``None`` for a
        miss (call ``answer``). A final refusal raises, as ``answer`` would."""
        decision = self.decide_now(pod, query)
        if isinstance(decision, Grant):
            request = self.request_for(decision.identity, resource, api_version, tenant_id, pod=pod)
            token = self.cache.peek(request)
            return Granted(decision.identity, request, token) if token is not None else None
        if isinstance(decision, Deny):
            raise self.denied(pod, decision)
        return None

    async def answer(
        self, pod: Pod, query: IdentityQuery, resource: str, api_version: str, tenant_id: str = ""
    ) -> Granted | Excepted:
        """Decide (waiting where MIC may still assign, learning object ids), then get the token."""
        deadline = self.deadline()
        decision = await self.decide(
            pod, query, resource=resource, api_version=api_version, deadline=deadline
        )
        if isinstance(decision, PassThrough):
            return Excepted(decision.exception)
        request = self.request_for(decision.identity, resource, api_version, tenant_id, pod=pod)
        return Granted(
            decision.identity, request, await self.token(request, deadline=deadline, caller=pod.key)
        )

    # --- identity -----------------------------------------------------------------------

    def decide_now(self, pod: Pod, query: IdentityQuery) -> Decision:
        return resolve(self.state, pod, query, self._identity, self.object_ids)

    async def decide(
        self, pod: Pod, query: IdentityQuery, *, resource: str, api_version: str, deadline: float
    ) -> Grant | PassThrough:
        decision = self.decide_now(pod, query)
        if isinstance(decision, Pending):
            decision = await self._wait_for_identity(pod, query, decision)
        assert not isinstance(decision, Pending)  # the wait ends in a decision or a timeout Deny
        if isinstance(decision, Learn):
            await self._learn(pod, decision, resource, api_version, deadline)
            decision = self.decide_now(pod, query)
            # Every object id is known now: a Learn again could only come from a state change.
            if isinstance(decision, Learn | Pending):
                decision = Deny("the requested identity is not bound to this pod")
        if isinstance(decision, Grant | PassThrough):
            return decision
        raise self.denied(pod, decision)

    async def _learn(self, pod: Pod, learn: Learn, resource: str, api_version: str, deadline: float) -> None:
        """Object ids of ``learn.identities`` from their tokens for this resource (cached anyway)."""
        for identity in learn.identities:
            request = self.request_for(identity, resource, api_version, pod=pod)
            await self.token(request, deadline=deadline, caller=pod.key)

    def denied(self, pod: Pod, decision: Deny) -> ServiceError:
        self._denied.inc()
        where = f"{pod.namespace}/{pod.name}"
        refusal = decision.refusal
        if refusal is Refusal.NOT_FOUND:
            return NoSuchIdentity(f"{IDENTITY_NOT_FOUND} ({decision.reason}; pod {where})")
        if refusal is Refusal.AMBIGUOUS:
            return BadRequest(MULTIPLE_IDENTITIES)
        if refusal is Refusal.CONFLICT:
            return BadRequest(f"{decision.reason} ({where})")
        return self._not_found(IdentityNotFound(f"{decision.reason} ({where})"))

    async def _wait_for_identity(self, pod: Pod, query: IdentityQuery, pending: Pending) -> Decision:
        loop = self.loop
        start = loop.time()
        until = start + self._identity.identity_wait_timeout_s
        decision: Decision = pending
        while (remaining := until - loop.time()) > 0:
            await self.state.wait_for_change(remaining)
            current = self.state.get(Pod, pod.key)
            if current is None or current.uid != pod.uid:
                return Deny("the pod was deleted while waiting for its identity")
            decision = self.decide_now(current, query)
            if not isinstance(decision, Pending):
                self._wait_identity[0].observe(loop.time() - start)
                return decision
        self._wait_identity[1].observe(loop.time() - start)
        return Deny(
            f"{pending.reason}: still not assigned after {self._identity.identity_wait_timeout_s:g}s",
            Refusal.TIMED_OUT,
        )

    def _not_found(self, error: ServiceError) -> ServiceError:
        if self._identity.set_retry_after_header:
            # The documented way to let SDKs retry while MIC assigns (nmi-spec §2.6).
            return UpstreamUnavailable(error.description, retry_after=self._identity.retry_after_s)
        return error

    # --- token --------------------------------------------------------------------------

    def request_for(
        self,
        identity: AzureIdentity,
        resource: str,
        api_version: str,
        tenant_id: str = "",
        *,
        pod: Pod | None = None,
    ) -> TokenRequest:
        if tenant_id:
            # IMDS has one token per request; a service principal's auxiliary tenants are asked for
            # one at a time with ?tenant_id=, instead of the original's JSON array (nmi-spec §9.14).
            if identity.type not in SERVICE_PRINCIPAL_TYPES:
                raise BadRequest("tenant_id applies only to service-principal identities")
            if tenant_id.casefold() not in {t.casefold() for t in identity.auxiliary_tenant_ids}:
                raise BadRequest("tenant_id is not one of the identity's auxiliaryTenantIDs")
        if identity.type is IdentityType.FEDERATED:
            if pod is None:
                raise BadRequest("a federated identity is used on behalf of a pod")
            # Exchanged with the pod's own service account's token: its tokens are that account's.
            return TokenRequest(
                identity=identity,
                resource=resource,
                api_version=api_version,
                service_account=f"{pod.namespace}/{pod.service_account}",
                pod=pod,
            )
        return TokenRequest(
            identity=identity, resource=resource, api_version=api_version, tenant_id=tenant_id
        )

    async def token(self, request: TokenRequest, *, deadline: float, caller: ObjectKey) -> Token:
        identity = request.identity
        source = self._sources.get(identity.type) if identity is not None else None
        if source is None:
            if identity is not None and identity.type is IdentityType.FEDERATED:
                # Final, not 503: no retry makes it work until the operator turns it on.
                raise BadRequest("workload identity is off on this node (--enable-workload-identity=false)")
            kind = identity.type if identity is not None else "node"
            raise UpstreamUnavailable(f"identity type {kind} is not supported on this node")
        try:
            token = await self.cache.get(
                request,
                source,
                deadline=deadline,
                # A pod's share of the node's upstream budget is taken only by its misses.
                admit=lambda: self._callers.hold(caller, deadline=deadline),
            )
        except UpstreamUnavailable as exc:
            if exc.retry_after is None:
                # Every 503 says when to come back: the upstream's pause, or the queue's turn.
                exc.retry_after = max(1.0, self._retry_hint())
            raise
        if identity is not None and not request.tenant_id:
            self._remember_object_id(identity, token)
        return token

    def _remember_object_id(self, identity: AzureIdentity, token: Token) -> None:
        # An identity's object id never changes, so one token tells it for good; a token without an
        # oid claim is remembered as "" so that it is not asked again.
        key = object_id_key(identity)
        if key not in self.object_ids:
            if len(self.object_ids) >= MAX_OBJECT_IDS:
                self.object_ids.clear()  # far above any cluster's identity count: a bound, not a policy
            self.object_ids[key] = object_id(token.access_token)
