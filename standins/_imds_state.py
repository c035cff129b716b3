"""What the IMDS stand-in knows and remembers: identities, injected faults, requests received."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict


@dataclass(frozen=True, slots=True)
class VmIdentity:
    """A managed identity assigned to the stand-in's VM."""

    client_id: str
    resource_id: str = ""
    object_id: str = ""
    system_assigned: bool = False

    def matches(self, selector: str, value: str) -> bool:
        wanted = value.casefold()
        if selector == "client_id":
            return self.client_id.casefold() == wanted
        if selector == "msi_res_id":
            return bool(self.resource_id) and self.resource_id.casefold() == wanted
        return self.object_id.casefold() == wanted


def new_identity(
    client_id: str, *, resource_id: str = "", object_id: str = "", system_assigned: bool = False
) -> VmIdentity:
    # A stable object ID per client ID keeps tokens and records comparable across restarts.
    oid = object_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"standin-oid:{client_id.casefold()}"))
    return VmIdentity(client_id, resource_id, oid, system_assigned)


@dataclass(slots=True)
class Failure:
    status: int
    retry_after: float | None = None
    error: str = ""
    description: str = ""


@dataclass(slots=True)
class Faults:
    """Misbehaviour applied to token requests, in this order: drop, delay, fail."""

    delay_s: float = 0.0
    """Every token request waits this long before it is answered (slowness)."""
    drop: int = 0
    """The next N token requests get their connection closed without an answer."""
    failures: deque[Failure] = field(default_factory=deque)
    """One queued failure per upcoming token request."""
    outage: Failure | None = None
    """While set, every token request gets this answer (an episode, rather than N failures); a
    negative status resets every connection instead."""

    def clear(self) -> None:
        self.delay_s = 0.0
        self.drop = 0
        self.failures.clear()
        self.outage = None

    def to_json(self) -> dict[str, Any]:
        return {
            "delay_s": self.delay_s,
            "drop": self.drop,
            "fail": [
                {
                    "status": f.status,
                    "retry_after": f.retry_after,
                    "error": f.error,
                    "description": f.description,
                }
                for f in self.failures
            ],
        }


@dataclass(slots=True)
class TokenRequestRecord:
    """One token request as received; ``status`` is 0 until it has been answered (or dropped: -1)."""

    at: float
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    peer: str | None
    client_id: str = ""
    """The identity it resolved to, empty when it resolved to none."""
    resource: str = ""
    status: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "path": self.path,
            "query": self.query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "peer": self.peer,
            "client_id": self.client_id,
            "resource": self.resource,
            "status": self.status,
        }


class RateWindow:
    """Admissions over a sliding window, as IMDS counts its per-second identity budget."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()

    def admit(self) -> bool:
        now = self._clock()
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


def instance_document(vm_name: str) -> dict[str, Any]:
    """A trimmed ``/metadata/instance`` document in IMDS's shape."""
    return {
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "location": "westeurope",
            "name": vm_name,
            "offer": "aks",
            "osType": "Linux",
            "provider": "Microsoft.Compute",
            "resourceGroupName": "MC_standin_standin_westeurope",
            "resourceId": (
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/"
                f"MC_standin_standin_westeurope/providers/Microsoft.Compute/virtualMachines/{vm_name}"
            ),
            "subscriptionId": "00000000-0000-0000-0000-000000000000",
            "tags": "",
            "vmId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"standin-vm:{vm_name}")),
            "vmSize": "Standard_D2s_v3",
            "zone": "",
        },
        "network": {
            "interface": [
                {
                    "ipv4": {
                        "ipAddress": [{"privateIpAddress": "10.240.0.4", "publicIpAddress": ""}],
                        "subnet": [{"address": "10.240.0.0", "prefix": "16"}],
                    },
                    "ipv6": {"ipAddress": []},
                    "macAddress": "000D3A000001",
                }
            ]
        },
    }
