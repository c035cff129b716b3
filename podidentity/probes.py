"""The probe listener (``/healthz``, ``/readyz``) and the metrics listener (``/metrics``).

Health reflects real state (nmi-spec §9.8): the token listener is up, the cluster state has been
synced, and the interception rules are in place. Nothing else is served here: no profiling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from podidentity.exposition import render
from podidentity.http.request import Request
from podidentity.http.response import Response

JSON = ((b"content-type", b"application/json; charset=utf-8"),)
NOT_FOUND = Response(404, b'{"error":"not_found","error_description":"not found"}', JSON)


@dataclass(slots=True)
class Check:
    name: str
    ok: Callable[[], bool]
    detail: Callable[[], object] = field(default=lambda: None)
    readiness_only: bool = False
    """Failing it makes the node not ready, but not unhealthy (no restart by the liveness probe)."""


class Probes:
    """``checks`` is asked on every probe, so pieces that start later join the report."""

    def __init__(self, checks: Callable[[], list[Check]]) -> None:
        self._checks = checks

    def report(self, *, readiness: bool) -> tuple[bool, dict[str, object]]:
        results: dict[str, object] = {}
        healthy = True
        for check in self._checks():
            if check.readiness_only and not readiness:
                continue
            ok = check.ok()
            healthy = healthy and ok
            detail = check.detail()
            results[check.name] = {"ok": ok, **({"detail": detail} if detail is not None else {})}
        return healthy, results

    def __call__(self, request: Request) -> Response:
        path = request.raw_path
        if path in ("/healthz", "/readyz"):
            ok, results = self.report(readiness=path == "/readyz")
            body = json.dumps({"status": "ok" if ok else "unavailable", "checks": results}).encode()
            return Response(200 if ok else 503, body, JSON)
        return NOT_FOUND


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._headers = ((b"content-type", CONTENT_TYPE_LATEST.encode()),)

    def __call__(self, request: Request) -> Response:
        if request.raw_path == "/metrics":
            return Response(200, render(self._registry), self._headers)
        return NOT_FOUND
