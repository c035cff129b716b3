"""The level-triggered reconciler: events mark dirty, one cycle plans, per-VM/VMSS workers act.

* **Coalesced.** Watch events only set a flag; a cycle starts ``debounce_s`` after the first one and
  reads whatever the caches hold then, so a burst of N events costs one cycle (mic-spec §6.2).
* **A cycle is pure and quick**: desired set, diff, grouping by VM/VMSS (``mic.desired``,
  ``mic.diff``). It never waits for Azure: it starts one worker per VM/VMSS that has work, at most
  ``max_concurrent_targets`` at once, and skips a VM/VMSS whose worker is still running (that worker
  marks dirty when it ends) or that is backing off. One slow scale set no longer holds up every other
  node (mic-spec §6.4).
* **A worker** (mic-spec §3.5): writes the AAIs (POST/PUT with ``Created``), GETs the VM/VMSS,
  PATCHes only the delta (``mic.armbody``), retries once per round without identities ARM refused
  (``LinkedAuthorizationFailed``), and then resolves **per identity by reading Azure back**: an AAI
  becomes ``Assigned`` only when its identity is on the VM/VMSS; an identity meant to leave is gone
  before its AAI goes ``Unassigned`` and is deleted. Whatever is left undone makes the worker fail,
  and the VM/VMSS is retried after a doubling delay (or when its 429 gate opens), not only on the
  next event (mic-spec §6.10).
* **Drift repair** every ``drift_interval_s``: each VM/VMSS with ``Assigned`` AAIs is read, and
  missing identities are attached again (mic-spec §3.8); it never detaches anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from mic.arm import (
    FAILED_IDENTITY_OPERATION,
    LINKED_AUTHORIZATION_FAILED,
    ArmError,
    ArmThrottled,
    identities_named,
)
from mic.armbody import identity_patches, user_identities
from mic.desired import Assignment, desired_assignments, render, usable
from mic.diff import TargetWork, diff, plan_work
from mic.events import (
    BINDING_APPLIED,
    BINDING_APPLY_ERROR,
    BINDING_REMOVE_ERROR,
    BINDING_REMOVED,
    INVALID_IDENTITY,
    NORMAL,
    STATUS_UPDATE_ERROR,
    WARNING,
    Subject,
)
from mic.metrics import MicMetrics
from mic.model import ArmTarget, target_of
from mic.settings import AzureConfig, ReconcileSettings
from podidentity.model import (
    ASSIGNED,
    CREATED,
    UNASSIGNED,
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    Node,
    Pod,
)
from podidentity.state import ClusterState

log = logging.getLogger("mic.reconcile")

TargetKey = tuple[str, str, str, str]


class EventSink(Protocol):
    def record(self, subject: Subject, type_: str, reason: str, message: str) -> None: ...


class _NoEvents:
    def record(self, subject: Subject, type_: str, reason: str, message: str) -> None:
        return None


def _aai_subject(aai: AzureAssignedIdentity) -> Subject:
    return Subject("AzureAssignedIdentity", aai.namespace, aai.name)


def _binding_subject(binding: AzureIdentityBinding) -> Subject:
    return Subject("AzureIdentityBinding", binding.namespace, binding.name)


def _arm(error: ArmError) -> str:
    """ARM's answer as users search for it: the code first (LinkedAuthorizationFailed, 429, ...)."""
    status = f" (HTTP {error.status})" if error.status >= 400 else ""
    return f"{error.code}{status}: {error.message}"


def _work_of(tw: TargetWork) -> frozenset[str]:
    """What a VM/VMSS worker is asked to do, to tell new work from a retry of failed work."""
    return frozenset(
        [
            *(f"create {a.key}" for a in tw.create),
            *(f"update {a.key}" for _, a in tw.update),
            *(f"confirm {aai.key}" for aai, _ in tw.confirm),
            *(f"delete {aai.key}" for aai in tw.delete),
            *(f"remove {rid}" for rid in tw.remove_ids),
        ]
    )


NODE_GONE: TargetKey = ("", "", "node-gone", "")
T = TypeVar("T")


class Arm(Protocol):
    def gate(self, target: ArmTarget) -> float: ...

    async def get(self, target: ArmTarget) -> dict[str, Any]: ...

    async def patch(self, target: ArmTarget, body: Mapping[str, Any]) -> None: ...


class Writer(Protocol):
    async def create(self, body: dict[str, Any]) -> AzureAssignedIdentity | None: ...

    async def replace(self, body: dict[str, Any]) -> AzureAssignedIdentity | None: ...

    async def set_status(self, aai: AzureAssignedIdentity, status: str) -> AzureAssignedIdentity: ...

    async def delete(self, aai: AzureAssignedIdentity) -> None: ...


def _provisioning(resource: Mapping[str, Any]) -> str:
    return str((resource.get("properties") or {}).get("provisioningState") or "").casefold()


def _settled(target: ArmTarget, resource: Mapping[str, Any]) -> set[str]:
    """The folded IDs on the VM/VMSS, once no operation is running: while one is (``Updating``...),
    Compute already shows its identities though they are not in effect, so none can be confirmed."""
    state = _provisioning(resource)
    if state not in ("", "succeeded", "failed", "canceled"):
        raise ArmError(
            409, "OperationInProgress", f"{target} is {state}: its identities are not in effect yet"
        )
    return set(user_identities(resource))


class Reconciler:
    def __init__(
        self,
        *,
        state: ClusterState,
        nodes: Callable[[], Mapping[str, Node]],
        ready: Callable[[], bool],
        writer: Writer,
        arm: Arm,
        azure: AzureConfig,
        settings: ReconcileSettings,
        metrics: MicMetrics,
        events: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._nodes = nodes
        self._ready = ready
        self._writer = writer
        self._arm = arm
        self._azure = azure
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._events: EventSink = events if events is not None else _NoEvents()
        self._dirty = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_concurrent_targets)
        self._workers: dict[TargetKey, asyncio.Task[None]] = {}
        self._retry_at: dict[TargetKey, float] = {}
        self._attempts: dict[TargetKey, int] = {}
        self._failed_work: dict[TargetKey, frozenset[str]] = {}
        """What a VM/VMSS worker failed to do: only that waits out the backoff; new work does not."""
        self._invalid_seen: set[tuple[str, str, str]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._drift_all = False
        self._drift_pending: set[TargetKey] = set()
        self._clashes_seen: set[str] = set()
        self.cycles = 0
        self.last_cycle_at: float | None = None
        self.last_error = ""
        self.pending_targets = 0
        self.last_done_at: float | None = None
        """When the last cycle found nothing left to do (or a worker finished everything)."""

    # --- triggers -------------------------------------------------------------------------------

    def mark_dirty(self) -> None:
        self._dirty.set()

    def request_drift_repair(self) -> None:
        self._drift_all = True
        self.mark_dirty()

    def _mark_dirty_in(self, delay: float) -> None:
        handle = asyncio.get_running_loop().call_later(max(0.0, delay), self._timer_fired)
        self._timers.add(handle)

    def _timer_fired(self) -> None:
        self._timers = {
            t for t in self._timers if not t.cancelled() and t.when() > asyncio.get_running_loop().time()
        }
        self.mark_dirty()

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: wait for a mark, let the burst settle, run one cycle."""
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self._settings.debounce_s)
                self._dirty.clear()
                try:
                    self.cycle()
                    self.last_error = ""
                except Exception as exc:
                    # A bug or a malformed object must not end reconciliation: log, retry later.
                    self.last_error = repr(exc)
                    log.exception("reconcile cycle failed; retrying in %.1fs", self._settings.retry_max_s)
                    self._mark_dirty_in(self._settings.retry_max_s)
        finally:
            for handle in self._timers:
                handle.cancel()
            workers = list(self._workers.values())
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def run_every(self, interval_s: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            action()

    @property
    def busy(self) -> bool:
        return bool(self._workers) or self._dirty.is_set()

    def cycle(self) -> None:
        """Plan from the caches and start the workers; never waits on I/O."""
        if not self._ready():
            return
        started = self._clock()
        self.cycles += 1
        self.last_cycle_at = started
        clashes: list[str] = []
        desired = desired_assignments(
            self._state.all(Pod),
            self._state.all(AzureIdentity),
            self._state.all(AzureIdentityBinding),
            force_namespaced=self._settings.force_namespaced,
            clashes=clashes,
        )
        self._report_invalid_identities()
        for clash in clashes:
            if clash not in self._clashes_seen:
                self._clashes_seen.add(clash)
                log.warning("two bindings give one AAI name; the first wins: %s", clash)
        plan = diff(desired, self._state.all(AzureAssignedIdentity))
        node_targets = {
            name: target_of(
                node, subscription=self._azure.subscription_id, resource_group=self._azure.resource_group
            )
            for name, node in self._nodes().items()
        }
        work = plan_work(plan, desired, node_targets, immutable=self._settings.immutable_client_ids)
        if self._drift_all:
            self._drift_all = False
            self._drift_pending |= {k for k, tw in work.targets.items() if tw.expected_ids}
        now = self._clock()
        pending = 0
        spawned = 0
        if work.node_gone:
            pending += 1
            if NODE_GONE not in self._workers and self._retry_at.get(NODE_GONE, 0.0) <= now:
                self._spawn(NODE_GONE, self._delete_node_gone(work.node_gone), None)
                spawned += 1
        for key, tw in work.targets.items():
            verify = key in self._drift_pending
            if not (tw.has_changes or (verify and tw.expected_ids)):
                continue
            pending += 1
            if key in self._workers:
                continue  # its end marks dirty again
            todo = _work_of(tw)
            if self._retry_at.get(key, 0.0) > now and (
                todo <= self._failed_work.get(key, frozenset()) or self._arm.gate(tw.target)
            ):
                # Backing off what failed (a refused identity, say); anything new for this VM/VMSS
                # goes at once, unless ARM itself asked us to wait (429).
                continue
            self._drift_pending.discard(key)
            self._spawn(key, self._apply(tw, verify=verify), tw.target, todo)
            spawned += 1
        self._drift_pending &= set(work.targets)
        self.pending_targets = pending + work.waiting_for_node
        self._metrics.pending.set(self.pending_targets)
        if pending == 0:
            self.last_done_at = now
        if spawned:
            self._metrics.cycle_count.inc()
            self._metrics.cycle_duration.observe(self._clock() - started)
            log.info(
                "reconcile: %d desired, %d AAIs; started %d VM/VMSS worker(s), %d pending",
                len(desired),
                self._state.count(AzureAssignedIdentity),
                spawned,
                pending,
            )

    def _report_invalid_identities(self) -> None:
        """An AzureIdentity MIC cannot assign is said once per version, in a log line and an Event."""
        for identity in self._state.all(AzureIdentity):
            if usable(identity):
                continue
            seen = (identity.namespace, identity.name, identity.resource_version)
            if seen in self._invalid_seen:
                continue
            self._invalid_seen.add(seen)
            message = (
                f"resourceID {identity.resource_id!r} is not a user-assigned identity ID "
                "(/subscriptions/<id>/resourcegroups/<group>/providers/Microsoft.ManagedIdentity/"
                "userAssignedIdentities/<name>): no pod gets this identity"
            )
            log.warning("AzureIdentity %s/%s: %s", identity.namespace, identity.name, message)
            self._events.record(
                Subject("AzureIdentity", identity.namespace, identity.name),
                WARNING,
                INVALID_IDENTITY,
                message,
            )

    def _spawn(
        self,
        key: TargetKey,
        job: Awaitable[bool],
        target: ArmTarget | None,
        todo: frozenset[str] = frozenset(),
    ) -> None:
        name = str(target) if target is not None else "node-gone"
        self._workers[key] = asyncio.create_task(
            self._worker(key, job, target, todo), name=f"mic-worker-{name}"
        )

    async def _worker(
        self, key: TargetKey, job: Awaitable[bool], target: ArmTarget | None, todo: frozenset[str]
    ) -> None:
        ok = False
        try:
            async with self._slots:
                ok = await job
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker for %s failed", target or "deleted nodes")
        finally:
            self._workers.pop(key, None)
        now = self._clock()
        if ok:
            self._attempts.pop(key, None)
            self._retry_at.pop(key, None)
            self._failed_work.pop(key, None)
        else:
            self._failed_work[key] = todo
            attempt = self._attempts.get(key, 0) + 1
            self._attempts[key] = attempt
            delay = min(
                self._settings.retry_max_s, self._settings.retry_initial_s * 2 ** min(attempt - 1, 20)
            )
            if target is not None:
                gate = self._arm.gate(target)
                if gate:
                    delay = max(delay, gate - now)
            self._retry_at[key] = now + delay
            log.info(
                "%s: work left; retrying in %.1fs (attempt #%d)", target or "deleted nodes", delay, attempt
            )
            self._mark_dirty_in(delay)
        self.mark_dirty()

    # --- one VM/VMSS ----------------------------------------------------------------------------

    async def _bounded(self, jobs: list[Awaitable[T]]) -> list[T | BaseException]:
        gate = asyncio.Semaphore(self._settings.kube_write_concurrency)

        async def one(job: Awaitable[T]) -> T:
            async with gate:
                return await job

        return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)

    async def _apply(self, tw: TargetWork, *, verify: bool) -> bool:
        """One VM/VMSS. What ARM must hold is known before any AAI is written, so the ARM update
        starts at once, beside the AAI writes; an AAI written after it succeeded is written
        ``Assigned`` directly (one write), one written before is ``Created`` and then marked."""
        target = tw.target
        wanted = [*tw.create, *(a for _, a in tw.update), *(a for _, a in tw.confirm)]
        want = {a.identity.resource_id_folded: a.identity.resource_id for a in wanted if a.needs_arm}
        if verify:
            want.update(tw.expected_ids)
        remove = dict(tw.remove_ids)
        errors: dict[str, ArmError] = {}
        arm: asyncio.Task[set[str] | None] | None = None
        if want or remove:
            arm = asyncio.create_task(self._arm_outcome(target, want, remove, errors))
        gate = asyncio.Semaphore(self._settings.kube_write_concurrency)

        async def outcome() -> set[str] | None:
            return await asyncio.shield(arm) if arm is not None else set()

        def in_effect(a: Assignment) -> bool:
            if not a.needs_arm:
                return True  # a service principal: nothing to put on the VM/VMSS
            if arm is None or not arm.done() or arm.cancelled():
                return False
            present = arm.result()
            return present is not None and a.identity.resource_id_folded in present

        async def place(a: Assignment, old: AzureAssignedIdentity | None) -> bool:
            version = old.resource_version if old is not None else ""
            try:
                async with gate:
                    # Decided once a write slot is ours, not when queued: a queued write learns
                    # that ARM finished meanwhile and then needs no second write.
                    status = ASSIGNED if in_effect(a) else CREATED
                    body = render(a, status=status, resource_version=version)
                    written = await (self._writer.create(body) if old is None else self._writer.replace(body))
            except Exception as exc:
                log.warning("%s: cannot write AAI %s/%s: %s", target, a.namespace, a.name, exc)
                return False
            if written is None:
                return False  # a conflict: the server's copy is cached, the next round plans from it
            if status == ASSIGNED:
                self._assigned(a, target)
                return True
            return await confirm(written, a)

        async def confirm(aai: AzureAssignedIdentity, a: Assignment) -> bool:
            present = await outcome()
            rid = a.identity.resource_id_folded
            if a.needs_arm and (present is None or rid not in present):
                failure = errors.get(rid)
                if failure is not None:
                    message = f"binding {a.binding.name} on node {a.node_name} failed: {_arm(failure)}"
                    self._tell(aai, _binding_subject(a.binding), WARNING, BINDING_APPLY_ERROR, message)
                return False  # stays Created; retried
            if aai.state == ASSIGNED:
                return True
            try:
                async with gate:
                    await self._writer.set_status(aai, ASSIGNED)
            except Exception as exc:
                log.warning("%s: cannot mark %s Assigned: %s", target, aai.key, exc)
                self._events.record(_aai_subject(aai), WARNING, STATUS_UPDATE_ERROR, str(exc))
                return False
            self._assigned(a, target)
            return True

        try:
            results = await asyncio.gather(
                *(place(a, None) for a in tw.create),
                *(place(a, old) for old, a in tw.update),
                *(confirm(aai, a) for aai, a in tw.confirm),
            )
            present = await outcome()
        finally:
            if arm is not None and not arm.done():
                arm.cancel()  # leadership lost (or shutdown): no ARM call outlives the worker
        ok = all(results)
        for aai in tw.delete:
            rid = aai.identity.resource_id_folded
            detached = rid in remove
            # A binding lives beside the identity it names.
            binding = Subject("AzureIdentityBinding", aai.identity.namespace, aai.binding_name)
            if detached and (present is None or rid in present):
                ok = False  # still on the VM/VMSS: keep the AAI so the removal is retried
                failure = errors.get(rid)
                if failure is not None:
                    message = (
                        f"binding {binding.name} removal from node {aai.node_name} failed: {_arm(failure)}"
                    )
                    self._tell(aai, binding, WARNING, BINDING_REMOVE_ERROR, message)
                continue
            try:
                if detached:
                    aai = await self._writer.set_status(aai, UNASSIGNED)
                await self._writer.delete(aai)
            except Exception as exc:
                log.warning("%s: cannot delete AAI %s: %s", target, aai.key, exc)
                ok = False
                continue
            if detached:
                message = f"binding {binding.name} removed from node {aai.node_name} for pod {aai.pod_name}"
                self._tell(aai, binding, NORMAL, BINDING_REMOVED, message)
        return ok

    async def _arm_outcome(
        self, target: ArmTarget, want: dict[str, str], remove: dict[str, str], errors: dict[str, ArmError]
    ) -> set[str] | None:
        """The folded IDs on the VM/VMSS once ``want`` and ``remove`` are applied; ``None`` when
        Azure's state is unknown (then no AAI that depends on it changes)."""
        try:
            return await self._sync_arm(target, want, remove, errors)
        except ArmError as exc:
            log.warning("%s: %s", target, exc)
            for rid in [*want, *remove]:
                errors.setdefault(rid, exc)
            return None

    def _tell(
        self, aai: AzureAssignedIdentity, binding: Subject, type_: str, reason: str, message: str
    ) -> None:
        """The same event on the AAI and on its binding, where ``kubectl describe`` shows them."""
        self._events.record(_aai_subject(aai), type_, reason, message)
        if binding.name:
            self._events.record(binding, type_, reason, message)

    def _assigned(self, a: Assignment, target: ArmTarget) -> None:
        message = f"binding {a.binding.name} applied on node {a.node_name} for pod {a.pod_name}"
        # On the AAI only: a binding selecting thousands of pods would get thousands of these, where
        # its failures (on both) are what an operator looks for.
        self._events.record(
            Subject("AzureAssignedIdentity", a.namespace, a.name), NORMAL, BINDING_APPLIED, message
        )
        pod = self._state.get(Pod, a.pod_key)
        if pod is not None and pod.created_at > 0:
            latency = self._wall_clock() - pod.created_at
            if 0 <= latency < 86_400:  # a pod older than a day was re-assigned, not started
                self._metrics.assignment_latency.observe(latency)

    async def _sync_arm(
        self,
        target: ArmTarget,
        want: dict[str, str],
        remove: dict[str, str],
        errors: dict[str, ArmError],
    ) -> set[str]:
        """Make ``want`` present and ``remove`` absent; returns the folded IDs now on the VM/VMSS.

        ``errors`` learns, per folded ID, the ARM error that kept it from being applied."""
        resource = await self._arm.get(target)
        if _provisioning(resource) == "deleting":
            raise ArmError(409, "Deleting", f"{target} is being deleted")
        present = set(user_identities(resource))
        to_add = {f: r for f, r in want.items() if f not in present}
        to_remove = {f: r for f, r in remove.items() if f in present and f not in want}
        if not to_add and not to_remove:
            return _settled(target, resource)
        failed: ArmError | None = None
        for attempt in range(self._settings.update_max_retry + 1):
            try:
                for body in identity_patches(resource, to_add.values(), to_remove.values()):
                    await self._arm.patch(target, body)
                break
            except ArmThrottled:
                raise
            except ArmError as exc:
                failed = exc
                named = (
                    identities_named(exc)
                    if exc.code in (LINKED_AUTHORIZATION_FAILED, FAILED_IDENTITY_OPERATION)
                    else set()
                )
                for f in named:
                    errors[f] = exc
                kept_add = {f: r for f, r in to_add.items() if f not in named}
                kept_remove = {f: r for f, r in to_remove.items() if f not in named}
                if not named or (len(kept_add), len(kept_remove)) == (len(to_add), len(to_remove)):
                    break
                log.warning(
                    "%s: ARM refused %d identit(ies) (%s); retrying without them (#%d)",
                    target,
                    len(to_add) + len(to_remove) - len(kept_add) - len(kept_remove),
                    exc.code,
                    attempt + 1,
                )
                to_add, to_remove = kept_add, kept_remove
                if not to_add and not to_remove:
                    break
                await asyncio.sleep(self._settings.update_retry_interval_s)
                resource = await self._arm.get(target)
        if failed is None:
            return (present | set(to_add)) - set(to_remove)
        for f in [*to_add, *to_remove]:
            errors.setdefault(f, failed)
        # Resolve per identity from what Azure now holds (mic-spec §3.5 step 4).
        return _settled(target, await self._arm.get(target))

    async def _delete_node_gone(self, aais: list[AzureAssignedIdentity]) -> bool:
        results = await self._bounded([self._writer.delete(aai) for aai in aais])
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            log.warning("cannot delete an AAI of a deleted node: %s", failure)
        return not failures

    # --- health ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "cycles": self.cycles,
            "last_cycle_age_s": None if self.last_cycle_at is None else round(now - self.last_cycle_at, 3),
            "last_done_age_s": None if self.last_done_at is None else round(now - self.last_done_at, 3),
            "pending_targets": self.pending_targets,
            "workers": len(self._workers),
            "last_error": self.last_error,
        }

    def healthy(self) -> bool:
        """Caches listed, and either nothing is pending or the work completed recently enough."""
        if not self._ready() or self.last_cycle_at is None or self.last_error:
            return False
        if self.pending_targets == 0:
            return True
        reference = self.last_done_at if self.last_done_at is not None else self.last_cycle_at
        return self._clock() - reference < self._settings.stale_after_s
