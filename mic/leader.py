"""Leader election: one MIC acts, the others stand by with warm caches and take over when it dies.

The lock is a ``coordination.k8s.io/v1`` Lease and, by default, also the Go MIC's lock: the
``control-plane.alpha.kubernetes.io/leader`` annotation of a ``v1/Endpoints`` object of the same
name. Holding both means that during a rolling upgrade from the Go MIC (which knows only the
Endpoints lock) the two never act at once; once no Go MIC runs, ``--leader-election-endpoints-lock
=false`` drops it (mic-spec §3.2).

Timing is client-go's, from the lease duration D (``--leader-election-duration``, 15 s): every
attempt is D/4 apart (the retry period); a leader that has not renewed for D/2 (the renew deadline)
steps down; a standby takes over when the record has not changed for D **as it observed it**, on its
own clock, so clock skew between nodes does not matter. The leader steps down well before anyone
can take over: D/2 after its last renewal against at least D after anyone saw that renewal.

Stepping down never exits the process: the caller stops writing at once and goes back to standby,
its watch caches warm. On a clean stop a leader releases the lock, so a standby takes over within
one retry period instead of one lease duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from podidentity.kube.client import KubeClient
from podidentity.kube.errors import KubeApiError, KubeError

log = logging.getLogger("mic.leader")

ENDPOINTS_ANNOTATION = "control-plane.alpha.kubernetes.io/leader"
JITTER = 1.2
"""client-go's JitterFactor: standbys spread their attempts over [retry, retry * (1 + 1.2))."""


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """client-go's ``LeaderElectionRecord``: the same fields in the Lease spec and the annotation."""

    holder: str
    lease_duration_s: int
    acquire_time: float
    renew_time: float
    transitions: int


def _parse_time(value: Any) -> float:
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _micro_time(epoch: float) -> str:
    """metav1.MicroTime, as a Lease's acquireTime and renewTime are written."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(epoch: float) -> str:
    """metav1.Time (whole seconds), as the annotation record is written."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _read(fields: dict[str, Any], transitions: str) -> LeaderRecord:
    """client-go's record, as the Lease spec and the annotation both spell it (but for one key)."""
    holder = fields.get("holderIdentity")
    return LeaderRecord(
        holder=holder if isinstance(holder, str) else "",
        lease_duration_s=_int(fields.get("leaseDurationSeconds")),
        acquire_time=_parse_time(fields.get("acquireTime")),
        renew_time=_parse_time(fields.get("renewTime")),
        transitions=_int(fields.get(transitions)),
    )


def _written(record: LeaderRecord, time_format: Callable[[float], str], transitions: str) -> dict[str, Any]:
    return {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.lease_duration_s,
        "acquireTime": time_format(record.acquire_time),
        "renewTime": time_format(record.renew_time),
        transitions: record.transitions,
    }


class Lock(Protocol):
    """One lock object; ``read`` gives its record and the object to update it from."""

    description: str

    async def read(self) -> tuple[LeaderRecord | None, dict[str, Any] | None]: ...

    async def create(self, record: LeaderRecord) -> None: ...

    async def update(self, current: dict[str, Any], record: LeaderRecord) -> None: ...


class _ObjectLock(ABC):
    """What both locks share: GET, POST, PUT with the resourceVersion read (optimistic concurrency)."""

    kind = ""
    collection = ""

    def __init__(self, client: KubeClient, namespace: str, name: str) -> None:
        self._client = client
        self._namespace = namespace
        self._name = name
        self._path = self.collection.format(ns=namespace)
        self.description = f"{self.kind} {namespace}/{name}"

    async def read(self) -> tuple[LeaderRecord | None, dict[str, Any] | None]:
        try:
            obj = await self._client.get(f"{self._path}/{self._name}")
        except KubeApiError as exc:
            if exc.status == 404:
                return None, None
            raise
        return self.record_of(obj), obj

    async def create(self, record: LeaderRecord) -> None:
        body = self.with_record({"metadata": {"name": self._name, "namespace": self._namespace}}, record)
        await self._client.write("POST", self._path, body)

    async def update(self, current: dict[str, Any], record: LeaderRecord) -> None:
        await self._client.write("PUT", f"{self._path}/{self._name}", self.with_record(current, record))

    @abstractmethod
    def record_of(self, obj: dict[str, Any]) -> LeaderRecord | None: ...

    @abstractmethod
    def with_record(self, obj: dict[str, Any], record: LeaderRecord) -> dict[str, Any]: ...


class LeaseLock(_ObjectLock):
    kind = "Lease"
    collection = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"

    def record_of(self, obj: dict[str, Any]) -> LeaderRecord | None:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return None
        return _read(spec, "leaseTransitions")

    def with_record(self, obj: dict[str, Any], record: LeaderRecord) -> dict[str, Any]:
        spec = _written(record, _micro_time, "leaseTransitions")
        return {**obj, "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": spec}


class EndpointsLock(_ObjectLock):
    """The Go MIC's lock (client-go's ``EndpointsResourceLock``)."""

    kind = "Endpoints"
    collection = "/api/v1/namespaces/{ns}/endpoints"

    def record_of(self, obj: dict[str, Any]) -> LeaderRecord | None:
        meta = obj.get("metadata")
        annotations = meta.get("annotations") if isinstance(meta, dict) else None
        raw = annotations.get(ENDPOINTS_ANNOTATION) if isinstance(annotations, dict) else None
        if not isinstance(raw, str) or not raw:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        return _read(doc, "leaderTransitions")

    def with_record(self, obj: dict[str, Any], record: LeaderRecord) -> dict[str, Any]:
        meta = dict(obj.get("metadata") or {})
        annotations = dict(meta.get("annotations") or {})
        annotations[ENDPOINTS_ANNOTATION] = json.dumps(
            _written(record, _time, "leaderTransitions"), separators=(",", ":")
        )
        meta["annotations"] = annotations
        return {**obj, "apiVersion": "v1", "kind": "Endpoints", "metadata": meta}


@dataclass(frozen=True, slots=True)
class Observation:
    """What every lock said at one attempt: the holders, and everything to compare for change."""

    records: tuple[LeaderRecord | None, ...]
    objects: tuple[dict[str, Any] | None, ...]

    @property
    def holder(self) -> str:
        """The one holder all locks agree on; ``"?"`` when they disagree (someone holds part of it)."""
        holders = {r.holder for r in self.records if r is not None and r.holder}
        if not holders:
            return ""
        return holders.pop() if len(holders) == 1 else "?"

    @property
    def base(self) -> LeaderRecord | None:
        return next((r for r in self.records if r is not None), None)


class LeaderElector:
    """Runs forever: standby → leader → standby …; ``leading`` is true only while the lock is held."""

    def __init__(
        self,
        locks: Sequence[Lock],
        identity: str,
        *,
        lease_duration_s: float = 15.0,
        on_started_leading: Callable[[], Awaitable[None] | None],
        on_stopped_leading: Callable[[], Awaitable[None] | None],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not locks:
            raise ValueError("at least one lock")
        self._locks = tuple(locks)
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = lease_duration_s / 2
        self.retry_period_s = lease_duration_s / 4
        self._started = on_started_leading
        self._stopped = on_stopped_leading
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.leading = False
        self.holder = ""
        """The holder last observed (ourselves while leading)."""
        self.last_error = ""
        self.transitions_seen = 0

    # --- one attempt ----------------------------------------------------------------------

    async def _observe(self) -> Observation:
        read = [await lock.read() for lock in self._locks]
        return Observation(tuple(r for r, _ in read), tuple(o for _, o in read))

    async def try_acquire_or_renew(self) -> bool:
        """One client-go ``tryAcquireOrRenew`` over every lock; True when we hold them all now."""
        seen = await self._observe()
        now_mono = self._monotonic()
        fingerprint = tuple(json.dumps(o, sort_keys=True) if o is not None else None for o in seen.objects)
        if fingerprint != self._observed:
            self._observed = fingerprint
            self._observed_at = now_mono
        holder = seen.holder
        self.holder = holder
        held_by_other = holder not in ("", self.identity)
        if held_by_other and now_mono < self._observed_at + self.lease_duration_s:
            return False
        now = self._clock()
        base = seen.base
        ours = base is not None and base.holder == self.identity and holder == self.identity
        record = LeaderRecord(
            holder=self.identity,
            lease_duration_s=max(1, int(self.lease_duration_s)),
            acquire_time=base.acquire_time if ours and base is not None else now,
            renew_time=now,
            transitions=(base.transitions if base is not None else 0) + (0 if ours else 1),
        )
        if base is None:
            record = replace(record, transitions=0)
        for lock, obj in zip(self._locks, seen.objects, strict=True):
            if obj is None:
                await lock.create(record)
            else:
                await lock.update(obj, record)
        self.holder = self.identity
        return True

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._acquire()
            self.leading = True
            self.transitions_seen += 1
            log.info("became the leader (%s)", ", ".join(lock.description for lock in self._locks))
            await _call(self._started)
            try:
                await self._renew()
                log.warning("stepped down: the lease was not renewed; back to standby with warm caches")
            finally:
                self.leading = False
                await _call(self._stopped)

    async def _attempt(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(max(0.001, timeout)):
                ok = await self.try_acquire_or_renew()
        except TimeoutError:
            self.last_error = f"no answer within {timeout:.1f}s"
            return False
        except KubeApiError as exc:
            # 409: someone else wrote between our read and write. Lost this round, nothing more.
            self.last_error = f"{exc.status} {exc.reason}"
            return False
        except (KubeError, ValueError) as exc:
            self.last_error = str(exc)
            return False
        if ok:
            self.last_error = ""
        return ok

    async def _acquire(self) -> None:
        # Polling is the protocol here: nothing tells a standby that a lease expired.
        while True:
            if await self._attempt(self.retry_period_s):
                return
            await asyncio.sleep(self.retry_period_s * (1 + JITTER * self._rng()))

    async def _renew(self) -> None:
        renewed = self._monotonic()
        while True:
            await asyncio.sleep(self.retry_period_s)
            # Each attempt may take only what is left before the deadline: a hung API server must
            # not keep a leader that can no longer prove it holds the lock.
            left = renewed + self.renew_deadline_s - self._monotonic()
            if left <= 0:
                return
            started = self._monotonic()
            if await self._attempt(left):
                # The lease counts from when the renewal was sent, not when its answer came back:
                # a slow answer must not stretch how long this replica believes it leads.
                renewed = started
            elif self.holder not in ("", self.identity):
                return  # someone else holds it now: step down at once

    async def release(self) -> None:
        """After a leader's clean stop (its ``run`` cancelled): hand the lock back, so a standby takes
        over within one retry period instead of one lease duration."""
        try:
            async with asyncio.timeout(self.renew_deadline_s):
                seen = await self._observe()
                base = seen.base
                if base is None or seen.holder != self.identity:
                    return
                now = self._clock()
                released = LeaderRecord("", 1, now, now, base.transitions)
                for lock, obj in zip(self._locks, seen.objects, strict=True):
                    if obj is not None:
                        await lock.update(obj, released)
        except (TimeoutError, KubeError, ValueError) as exc:
            log.warning("could not release the leader lock: %r", exc)

    def status(self) -> dict[str, Any]:
        return {
            "role": "leader" if self.leading else "standby",
            "identity": self.identity,
            "holder": self.holder,
            "locks": [lock.description for lock in self._locks],
            "last_error": self.last_error,
        }


async def _call(callback: Callable[[], Awaitable[None] | None]) -> None:
    result = callback()
    if result is not None:
        await result
