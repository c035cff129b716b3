"""Kubernetes Events: what users see with ``kubectl describe`` when an assignment is applied, removed
or fails (mic-spec §3.12), with ARM's error code in the message.

Recording never blocks or fails the reconciler: events go into a bounded queue that a task of its
own drains with its own client budget (a burst of AAI writes does not delay events, events do not
delay writes or the leader lock). A repeat of the same event (object, type, reason, message) within
``AGGREGATE_S`` is one Event whose ``count`` and ``lastTimestamp`` are patched, as client-go's
correlator does, so a failing identity retried every minute does not flood etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from podidentity.kube.client import KubeClient
from podidentity.kube.errors import KubeApiError, KubeError
from podidentity.model import GROUP_VERSION

log = logging.getLogger("mic.events")

COMPONENT = "aadpodidentity.k8s.io"
"""The original's event source component."""
NORMAL = "Normal"
WARNING = "Warning"
# The original's reasons (mic-spec §3.12), and ours for what it did not report.
BINDING_APPLIED = "binding applied"
BINDING_APPLY_ERROR = "binding apply error"
BINDING_REMOVED = "binding removed"
BINDING_REMOVE_ERROR = "binding remove error"
STATUS_UPDATE_ERROR = "status update error"
INVALID_IDENTITY = "invalid identity"
AGGREGATE_S = 600.0
QUEUE_SIZE = 4096
SPAM_BURST = 25
SPAM_REFILL_S = 300.0
"""client-go's spam filter: per object, 25 events at once, then one every 5 minutes."""
REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class Subject:
    """The object an event is about."""

    kind: str
    namespace: str
    name: str
    uid: str = ""
    api_version: str = GROUP_VERSION

    def reference(self) -> dict[str, Any]:
        ref = {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
        }
        if self.uid:
            ref["uid"] = self.uid
        return ref


@dataclass(frozen=True, slots=True)
class _Pending:
    subject: Subject
    type: str
    reason: str
    message: str
    at: float


@dataclass(slots=True)
class _Sent:
    name: str
    count: int
    first: str
    last_sent: float


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    def __init__(
        self,
        client: KubeClient,
        *,
        instance: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._instance = instance
        self._clock = clock
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(QUEUE_SIZE)
        self._sent: OrderedDict[tuple[str, ...], _Sent] = OrderedDict()
        self._budgets: dict[tuple[str, str, str], tuple[float, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.failed = 0

    def record(self, subject: Subject, type_: str, reason: str, message: str) -> None:
        """Queue an event; never blocks. A full queue drops it (counted and logged once in a while),
        and so does an object over its budget (client-go's spam filter)."""
        if not self._admit(subject):
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(_Pending(subject, type_, reason, message[:1024], self._clock()))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % 100 == 1:
                log.warning("event queue full: %d events dropped so far", self.dropped)

    def _admit(self, subject: Subject) -> bool:
        now = self._clock()
        key = (subject.kind, subject.namespace, subject.name)
        tokens, at = self._budgets.get(key, (float(SPAM_BURST), now))
        tokens = min(float(SPAM_BURST), tokens + (now - at) / SPAM_REFILL_S)
        if tokens < 1.0:
            self._budgets[key] = (tokens, now)
            return False
        self._budgets[key] = (tokens - 1.0, now)
        if len(self._budgets) > REMEMBERED:
            self._budgets.pop(next(iter(self._budgets)))
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="mic-events")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every queued event was sent (tests, and a clean stop)."""
        async with asyncio.timeout(timeout):
            await self._queue.join()

    async def _drain(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                await self._send(pending)
            except (KubeError, ValueError) as exc:
                self.failed += 1
                log.warning("event %r on %s not recorded: %s", pending.reason, pending.subject.name, exc)
            finally:
                self._queue.task_done()

    async def _send(self, e: _Pending) -> None:
        s = e.subject
        key = (s.kind, s.namespace, s.name, s.uid, e.type, e.reason, e.message)
        sent = self._sent.get(key)
        path = f"/api/v1/namespaces/{s.namespace}/events"
        if sent is not None and e.at - sent.last_sent < AGGREGATE_S:
            sent.count += 1
            sent.last_sent = e.at
            self._sent.move_to_end(key)
            try:
                await self._client.write(
                    "PATCH",
                    f"{path}/{sent.name}",
                    {"count": sent.count, "lastTimestamp": _time(e.at)},
                    content_type="application/merge-patch+json",
                )
                return
            except KubeApiError as exc:
                if exc.status != 404:  # gone (events expire after an hour): record it anew
                    raise
        name = f"{s.name}.{secrets.token_hex(8)}"
        stamp = _time(e.at)
        await self._client.write(
            "POST",
            path,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": s.namespace},
                "involvedObject": s.reference(),
                "type": e.type,
                "reason": e.reason,
                "message": e.message,
                "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT,
                "reportingInstance": self._instance,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
            },
        )
        self._sent[key] = _Sent(name, 1, stamp, e.at)
        if len(self._sent) > REMEMBERED:
            self._sent.popitem(last=False)
