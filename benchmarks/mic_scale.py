"""MIC under a burst of pods: the original's nightly load test, against the stand-ins.

One run per ``--qps`` value, each from scratch:

1. Starts the API server stand-in (``standins.apiserver.FakeApiServer``, plain HTTP) and the ARM
   stand-in (``standins.arm.ArmStandIn``, fixed bearer token, every operation ``--lro-s`` long) in
   this process, with ``--nodes`` nodes spread evenly over 3 VM scale sets (Azure providerIDs), and
   ``--namespaces`` namespaces, each with one user-assigned ``AzureIdentity`` ``id-<k>`` and one
   ``AzureIdentityBinding`` (selector ``sel-<k>``) in it.
2. Starts MIC as a real process (``python -m mic`` with a kubeconfig, an azure.json, the ARM
   stand-in's URL and a token file, leader election, free probe and Prometheus ports,
   ``--clientQps``) and waits until it holds the Lease and ``/healthz`` answers 200.
3. Creates ``--pods`` Running pods at once (one loop iteration: MIC sees one burst): pod ``i`` in
   namespace ``ns-<i mod namespaces>`` labelled ``aadpodidbinding: sel-<same>``, on node
   ``i mod nodes``. With the defaults every scale set needs every one of the 100 identities.
4. Waits (``--timeout`` per run) until every expected ``AzureAssignedIdentity`` in the stand-in's
   store is ``Assigned``, then 3 s more to see whether MIC keeps writing.

Measured: time to all ``Assigned`` (and to first/half), the API server's request log (writes of
AAIs by action, all requests by verb), ARM's call log per scale set (GETs, PATCHes, operation
polls), MIC's RSS (``VmRSS`` before and after, ``VmHWM`` peak) and CPU time from ``/proc``, and the
safety check: each time an AAI turns ``Assigned`` in the store, its identity must already be in
effect on the node's scale set (``ArmStandIn.identities``), not only in the model.

    .venv/bin/python -m benchmarks.mic_scale                       # 2,000 pods, --qps 20 5
    .venv/bin/python -m benchmarks.mic_scale --pods 200 --qps 20 --out /tmp/mic_small

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/mic_scale``) and prints the
table. Exit status 1 if a run did not complete in time, MIC exited, or an AAI was marked ``Assigned``
before its identity was in effect.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from standins import apiserver as k8s
from standins.apiserver import FakeApiServer
from standins.arm import VMSS, ArmStandIn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mic_scale"
SUB = "11111111-1111-1111-1111-111111111111"
RG = "mc_bench_rg"
ID_RG = "bench-identities"
TOKEN = "mic-scale-arm-token"
AAI = "azureassignedidentities"
SCALE_SETS = 3
SETTLE_S = 3.0
WRITE_ACTIONS = ("create", "update", "patch", "delete")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB; empty once the process is gone."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = float(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def uami(k: int) -> str:
    return (
        f"/subscriptions/{SUB}/resourcegroups/{ID_RG}/providers/Microsoft.ManagedIdentity/"
        f"userAssignedIdentities/id-{k}"
    )


def client_id(k: int) -> str:
    return f"{k:08x}-0000-4000-8000-00000000c11d"


@dataclass
class Topology:
    nodes: int
    namespaces: int
    pods: int

    def scale_set(self, node: int) -> str:
        return f"aks-pool{node * SCALE_SETS // self.nodes}-vmss"

    def node_name(self, node: int) -> str:
        return f"aks-node-{node:03d}"

    def provider_id(self, node: int) -> str:
        instance = node - (node * SCALE_SETS // self.nodes) * self.nodes // SCALE_SETS
        return (
            f"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
            f"virtualMachineScaleSets/{self.scale_set(node)}/virtualMachines/{instance}"
        )

    def scale_sets(self) -> list[str]:
        return sorted({self.scale_set(n) for n in range(self.nodes)})

    def pod(self, i: int) -> dict[str, Any]:
        ns = i % self.namespaces
        node = i % self.nodes
        return k8s.pod(
            f"app-{i}",
            namespace=f"ns-{ns}",
            node=self.node_name(node),
            ip=f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}",
            labels={"aadpodidbinding": f"sel-{ns}", "app": "load"},
        )

    def aai_name(self, i: int) -> str:
        ns = i % self.namespaces
        return f"app-{i}-ns-{ns}-id-{ns}"


class ObservedApiServer(FakeApiServer):
    """The stand-in, with every AAI write it stores checked as it happens: a transition to
    ``Assigned`` must find the identity in effect on the scale set under the AAI's node."""

    def __init__(self, *, arm: ArmStandIn, vmss_of_node: dict[str, str], **kw: Any) -> None:
        super().__init__(**kw)
        self.arm = arm
        self.vmss_of_node = vmss_of_node
        self.aai_status: dict[str, str] = {}
        self.first_seen: dict[str, float] = {}
        self.assigned_at: dict[str, float] = {}
        self.violations: list[dict[str, Any]] = []
        self.transitions: collections.Counter[str] = collections.Counter()

    def create(self, obj: Any) -> dict[str, Any]:
        result = super().create(obj)
        self._observe(result)
        return result

    def update(self, obj: Any) -> dict[str, Any]:
        result = super().update(obj)
        self._observe(result)
        return result

    def _observe(self, obj: dict[str, Any]) -> None:
        if obj.get("kind") != "AzureAssignedIdentity":
            return
        name = obj["metadata"]["name"]
        status = (obj.get("status") or {}).get("status", "")
        previous = self.aai_status.get(name)
        now = time.monotonic()
        self.first_seen.setdefault(name, now)
        if status == previous:
            return
        self.aai_status[name] = status
        self.transitions[f"{previous or '-'}->{status}"] += 1
        if status != "Assigned":
            return
        self.assigned_at.setdefault(name, now)
        spec = obj.get("spec") or {}
        node = spec.get("nodename") or (obj["metadata"].get("labels") or {}).get("nodename", "")
        rid = str(((spec.get("azureIdentityRef") or {}).get("spec") or {}).get("resourceID", ""))
        vmss = self.vmss_of_node.get(node)
        in_effect = vmss is not None and rid.casefold() in self.arm.identities(VMSS, SUB, RG, vmss)
        if not in_effect:
            self.violations.append(
                {
                    "aai": name,
                    "node": node,
                    "vmss": vmss,
                    "identity": rid,
                    "in_model": vmss is not None
                    and rid.casefold() in self.arm.model_identities(VMSS, SUB, RG, vmss),
                }
            )


@dataclass
class Mic:
    proc: asyncio.subprocess.Process
    probe_port: int
    log: Path
    rss: list[tuple[float, float]] = field(default_factory=list)

    async def healthz(self) -> int:
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"http://127.0.0.1:{self.probe_port}/healthz", timeout=aiohttp.ClientTimeout(total=2)
                ) as resp,
            ):
                return resp.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0

    async def verbose_health(self) -> Any:
        """``/healthz?verbose`` as JSON (the reconciler's cycle count...), or None."""
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"http://127.0.0.1:{self.probe_port}/healthz?verbose",
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as resp,
            ):
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


async def _start_mic(
    tmp: Path, api: FakeApiServer, arm: ArmStandIn, kubeconfig: Path, qps: float, extra: list[str]
) -> Mic:
    azure = tmp / "azure.json"
    azure.write_text(json.dumps({"subscriptionId": SUB, "resourceGroup": RG, "cloud": "AzurePublicCloud"}))
    token = tmp / "arm-token"
    token.write_text(TOKEN)
    probe = _free_port()
    log = tmp / "mic.log"
    argv = [
        sys.executable,
        "-m",
        "mic",
        f"--kubeconfig={kubeconfig}",
        f"--cloudconfig={azure}",
        f"--arm-endpoint={arm.url}",
        f"--arm-token-file={token}",
        "--leader-election-instance=mic-bench",
        "--leader-election-namespace=kube-system",
        f"--http-probe-port={probe}",
        f"--prometheus-port={_free_port()}",
        f"--clientQps={qps:g}",
        *extra,
    ]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only this process; teardown stops MIC
        )
    return Mic(proc, probe, log)


def _lease_holder(api: FakeApiServer) -> str:
    lease = api.get("Lease", "kube-system", "aad-pod-identity-mic") or {}
    return str((lease.get("spec") or {}).get("holderIdentity", ""))


async def _wait_leading(mic: Mic, api: FakeApiServer, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if mic.proc.returncode is not None:
            raise RuntimeError(f"MIC exited with {mic.proc.returncode} before leading")
        if _lease_holder(api) == "mic-bench" and await mic.healthz() == 200:
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise RuntimeError("MIC did not lead and report healthy within 60 s")


def _keep_log(log: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(log, dest)


def _log_summary(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace").splitlines()
    levels: collections.Counter[str] = collections.Counter()
    cycles = retries = 0
    samples: list[str] = []
    for line in text:
        parts = line.split()
        if len(parts) > 2 and parts[2] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            levels[parts[2]] += 1
            if parts[2] in ("WARNING", "ERROR", "CRITICAL") and len(samples) < 8:
                samples.append(line[:300])
        if "reconcile:" in line and "worker" in line:
            cycles += 1
        if "retrying in" in line:
            retries += 1
        if "Traceback" in line and len(samples) < 8:
            samples.append(line[:300])
    return {
        "lines": len(text),
        "levels": dict(levels),
        "cycles_starting_workers": cycles,
        "worker_retries": retries,
        "warnings_sample": samples,
    }


def _arm_summary(arm: ArmStandIn, since: float, until: float, scale_sets: list[str]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {
        s: {"GET": 0, "PATCH": 0, "polls": 0, "patch_entries": [], "patch_at_s": [], "get_at_s": []}
        for s in scale_sets
    }
    other = 0
    for call in arm.calls:
        if not since <= call.at <= until:
            continue
        name = call.path.rstrip("/").rsplit("/", 1)[-1]
        if call.path.startswith(("/operations/", "/locations/")):
            op = arm.operations.get(name)
            if op is not None and op.resource in per:
                per[op.resource]["polls"] += 1
                continue
        elif name in per and call.method in ("GET", "PATCH"):
            per[name][call.method] += 1
            if call.method == "GET":
                per[name]["get_at_s"].append(round(call.at - since, 1))
            if call.method == "PATCH":
                body = call.body if isinstance(call.body, dict) else {}
                entries = (body.get("identity") or {}).get("userAssignedIdentities") or {}
                per[name]["patch_entries"].append(len(entries))
                per[name]["patch_at_s"].append(round(call.at - since, 1))
            continue
        other += 1
    return {"per_scale_set": per, "other_calls": other}


def _kube_summary(api: FakeApiServer, since: float, until: float, pods: int) -> dict[str, Any]:
    by_verb: collections.Counter[str] = collections.Counter()
    by_resource: collections.Counter[str] = collections.Counter()
    aai_writes: collections.Counter[str] = collections.Counter()
    aai_status: collections.Counter[str] = collections.Counter()
    after: collections.Counter[str] = collections.Counter()
    for r in api.requests:
        if r.at < since:
            continue
        if r.at > until:
            if r.resource == AAI and r.action in WRITE_ACTIONS:
                after[r.action] += 1
            continue
        by_verb[r.action or r.verb] += 1
        by_resource[f"{r.resource or '-'} {r.action or r.verb}"] += 1
        if r.resource == AAI and r.action in WRITE_ACTIONS:
            aai_writes[r.action] += 1
            aai_status[str(r.status)] += 1
    total_aai = sum(aai_writes.values())
    return {
        "requests_by_verb": dict(sorted(by_verb.items())),
        "requests_by_resource": dict(sorted(by_resource.items())),
        "aai_writes": dict(sorted(aai_writes.items())),
        "aai_write_statuses": dict(sorted(aai_status.items())),
        "aai_writes_total": total_aai,
        "aai_writes_per_pod": round(total_aai / pods, 3) if pods else 0.0,
        "aai_writes_after_done": dict(after),
        "requests_logged_dropped": len(api.requests) == api.requests.maxlen,
    }


async def run_one(args: argparse.Namespace, qps: float, workdir: Path) -> dict[str, Any]:
    topo = Topology(args.nodes, args.namespaces, args.pods)
    scale_sets = topo.scale_sets()
    vmss_of_node = {topo.node_name(n): topo.scale_set(n) for n in range(topo.nodes)}
    arm = ArmStandIn(token=TOKEN, expect_audience=None, lro_delay_s=args.lro_s, poll_retry_after="1")
    api = ObservedApiServer(
        arm=arm,
        vmss_of_node=vmss_of_node,
        history_limit=50 * args.pods + 10_000,
        max_requests_logged=200 * args.pods + 100_000,
        bookmark_interval_s=5.0,
    )
    mic: Mic | None = None
    result: dict[str, Any] = {"qps": qps, "completed": False}
    tmp = workdir / f"qps-{qps:g}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        await arm.start()
        await api.start()
        for s in scale_sets:
            arm.add_vmss(SUB, RG, s)
        for n in range(topo.nodes):
            api.create(k8s.node(topo.node_name(n), provider_id=topo.provider_id(n)))
        for k in range(topo.namespaces):
            api.create(
                k8s.azure_identity(
                    f"id-{k}", namespace=f"ns-{k}", client_id=client_id(k), resource_id=uami(k)
                )
            )
            api.create(k8s.binding(f"bind-{k}", f"id-{k}", f"sel-{k}", namespace=f"ns-{k}"))
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        mic = await _start_mic(tmp, api, arm, kubeconfig, qps, args.mic_arg)
        result["mic_lead_s"] = round(await _wait_leading(mic, api), 2)
        await asyncio.sleep(1.0)  # let the start-up settle before measuring
        before = _proc_status(mic.proc.pid)
        cpu_before = _cpu_s(mic.proc.pid)
        result["rss_before_mb"] = round(before.get("VmRSS", 0.0), 1)

        expected = [topo.aai_name(i) for i in range(topo.pods)]
        docs = [topo.pod(i) for i in range(topo.pods)]
        burst = time.monotonic()
        for doc in docs:  # one loop iteration: the watch delivers them as one burst
            api.create(doc)
        result["burst_create_s"] = round(time.monotonic() - burst, 3)
        print(
            f"  qps {qps:g}: {topo.pods} pods created; waiting for {len(expected)} AAIs Assigned", flush=True
        )

        deadline = burst + args.timeout
        peak_sampled = 0.0
        last_report = burst
        done_at: float | None = None
        while True:
            now = time.monotonic()
            peak_sampled = max(peak_sampled, _proc_status(mic.proc.pid).get("VmRSS", 0.0))
            # Cheap check from the writes the store saw; when it says done, confirm from the store.
            assigned = sum(1 for n in expected if api.aai_status.get(n) == "Assigned")
            if assigned == len(expected):
                stored = {o["metadata"]["name"]: o for o in api.objects(AAI, "default")}
                confirmed = sum(
                    1 for n in expected if (stored.get(n, {}).get("status") or {}).get("status") == "Assigned"
                )
                if confirmed == len(expected):
                    done_at = max(api.assigned_at.get(n, now) for n in expected)
                    break
            if mic.proc.returncode is not None:
                result["error"] = f"MIC exited with {mic.proc.returncode}"
                break
            if now > deadline:
                result["error"] = f"timed out after {args.timeout:.0f} s: {assigned}/{len(expected)} Assigned"
                break
            if now - last_report >= 30:
                last_report = now
                print(
                    f"  qps {qps:g}: {now - burst:5.0f} s: {len(api.aai_status)} AAIs written,"
                    f" {assigned} Assigned, RSS {_proc_status(mic.proc.pid).get('VmRSS', 0):.0f} MB",
                    flush=True,
                )
            await asyncio.sleep(0.5)
        end = done_at if done_at is not None else time.monotonic()
        if done_at is not None:
            result["completed"] = True
            await asyncio.sleep(SETTLE_S)  # does MIC keep writing once everything is Assigned?
        after = _proc_status(mic.proc.pid)
        cpu_after = _cpu_s(mic.proc.pid)
        result["mic_health_after"] = await mic.verbose_health()

        firsts = sorted(api.first_seen[n] - burst for n in expected if n in api.first_seen)
        assigned_times = sorted(api.assigned_at[n] - burst for n in expected if n in api.assigned_at)
        result.update(
            {
                "pods": topo.pods,
                "nodes": topo.nodes,
                "namespaces": topo.namespaces,
                "identities": topo.namespaces,
                "scale_sets": len(scale_sets),
                "lro_s": args.lro_s,
                "all_assigned_s": round(end - burst, 2) if done_at is not None else None,
                "first_aai_written_s": round(firsts[0], 2) if firsts else None,
                "all_aais_written_s": round(firsts[-1], 2) if len(firsts) == len(expected) else None,
                "first_assigned_s": round(assigned_times[0], 2) if assigned_times else None,
                "half_assigned_s": round(assigned_times[len(expected) // 2 - 1], 2)
                if len(assigned_times) >= len(expected) // 2 > 0
                else None,
                "assigned": len(assigned_times),
                "aai_transitions": dict(api.transitions),
                "kube": _kube_summary(api, burst, end, topo.pods),
                "arm": _arm_summary(arm, burst, end, scale_sets),
                "arm_after_done_calls": sum(1 for c in arm.calls if c.at > end),
                "in_effect_per_scale_set": {s: len(arm.identities(VMSS, SUB, RG, s)) for s in scale_sets},
                "assigned_before_in_effect": len(api.violations),
                "violations_sample": api.violations[:5],
                "rss_after_mb": round(after.get("VmRSS", 0.0), 1),
                "rss_peak_sampled_mb": round(peak_sampled, 1),
                "hwm_mb": round(after.get("VmHWM", 0.0), 1),
                "mic_cpu_s": round(cpu_after - cpu_before, 1),
            }
        )
    finally:
        if mic is not None:
            await mic.stop()
            result["mic_exit"] = mic.proc.returncode
            result["log"] = _log_summary(mic.log)
            if args.keep_logs:
                await asyncio.to_thread(_keep_log, mic.log, Path(args.keep_logs) / f"mic-qps-{qps:g}.log")
        await api.stop()
        await arm.stop()
    return result


def _mic_source() -> dict[str, Any]:
    """Which MIC was measured: the commit, and a digest of mic/*.py as run (the tree may be dirty)."""
    import hashlib
    import subprocess

    digest = hashlib.sha256()
    for path in sorted((ROOT / "mic").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "mic"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        head, dirty = "", ""
    return {"commit": head, "mic_dirty": bool(dirty), "mic_py_sha256": digest.hexdigest()[:16]}


def _fmt(v: Any, unit: str = "") -> str:
    return "—" if v is None else f"{v}{unit}"


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    head = ["", *[f"`--clientQps {r['qps']:g}`" for r in runs]]
    rows: list[list[str]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append([label, *values])

    row("burst → every AAI `Assigned`", [_fmt(r.get("all_assigned_s"), " s") for r in runs])
    row(
        "burst → first AAI written / all written",
        [
            f"{_fmt(r.get('first_aai_written_s'), ' s')} / {_fmt(r.get('all_aais_written_s'), ' s')}"
            for r in runs
        ],
    )
    row(
        "burst → first / half `Assigned`",
        [f"{_fmt(r.get('first_assigned_s'), ' s')} / {_fmt(r.get('half_assigned_s'), ' s')}" for r in runs],
    )
    row("AAI writes per pod", [str(r.get("kube", {}).get("aai_writes_per_pod", "—")) for r in runs])
    row(
        "AAI writes (create/update/patch/delete)",
        [
            "/".join(str(r.get("kube", {}).get("aai_writes", {}).get(a, 0)) for a in WRITE_ACTIONS)
            for r in runs
        ],
    )
    row(
        "API requests by verb",
        [
            ", ".join(f"{k} {v}" for k, v in r.get("kube", {}).get("requests_by_verb", {}).items())
            for r in runs
        ],
    )
    for s in sorted({s for r in runs for s in r.get("arm", {}).get("per_scale_set", {})}):
        row(
            f"ARM `{s}`: GET / PATCH / polls",
            [
                (lambda p: f"{p['GET']} / {p['PATCH']} / {p['polls']}" if p else "—")(
                    r.get("arm", {}).get("per_scale_set", {}).get(s)
                )
                for r in runs
            ],
        )
    row(
        "identities in effect per scale set",
        [", ".join(str(v) for v in r.get("in_effect_per_scale_set", {}).values()) or "—" for r in runs],
    )
    row("`Assigned` before in effect", [str(r.get("assigned_before_in_effect", "—")) for r in runs])
    row(
        "MIC RSS before → after (VmHWM)",
        [
            f"{_fmt(r.get('rss_before_mb'))} → {_fmt(r.get('rss_after_mb'))} MB ({_fmt(r.get('hwm_mb'))} MB)"
            for r in runs
        ],
    )
    row("MIC CPU during the burst", [_fmt(r.get("mic_cpu_s"), " s") for r in runs])
    logs = [r.get("log", {}) for r in runs]
    row(
        "MIC log: warnings / worker retries",
        [f"{g.get('levels', {}).get('WARNING', 0)} / {g.get('worker_retries', 0)}" for g in logs],
    )
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(runs) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    first = runs[0] if runs else {}
    caption = (
        f"{first.get('pods', '?')} pods, {first.get('nodes', '?')} nodes on {first.get('scale_sets', '?')} "
        f"scale sets, {first.get('namespaces', '?')} namespaces (one identity + binding each), "
        f"ARM operations {first.get('lro_s', '?')} s"
    )
    return caption + "\n\n" + "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "pods": args.pods,
        "nodes": args.nodes,
        "namespaces": args.namespaces,
        "lro_s": args.lro_s,
        "timeout_s": args.timeout,
        "mic_source": _mic_source(),
        "runs": [],
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="mic-scale-") as tmp:
        for qps in args.qps:
            print(f"run: --clientQps {qps:g}, {args.pods} pods", flush=True)
            try:
                r = await run_one(args, qps, Path(tmp))
            except RuntimeError as exc:
                r = {"qps": qps, "completed": False, "error": str(exc)}
            results["runs"].append(r)
            if not r.get("completed") or r.get("assigned_before_in_effect"):
                failed = True
                print(f"  qps {qps:g}: FAILED: {r.get('error') or 'Assigned before in effect'}", flush=True)
            else:
                print(f"  qps {qps:g}: all Assigned in {r['all_assigned_s']} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    out.with_suffix(".md").write_text("# MIC under a burst of pods (`benchmarks/mic_scale.py`)\n\n" + md)
    print()
    print(md)
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=2000)
    p.add_argument("--nodes", type=int, default=30, help="spread evenly over 3 VM scale sets")
    p.add_argument("--namespaces", type=int, default=100, help="one identity and binding in each")
    p.add_argument("--qps", type=float, nargs="+", default=[20.0, 5.0], help="MIC --clientQps, one run each")
    p.add_argument("--lro-s", type=float, default=3.0, help="duration of every ARM operation")
    p.add_argument("--timeout", type=float, default=1200.0, help="per run, from the burst to all Assigned")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT.json and OUT.md")
    p.add_argument("--keep-logs", default="", help="copy MIC's log of each run into this directory")
    p.add_argument("--mic-arg", action="append", default=[], help="extra MIC flag (repeatable)")
    args = p.parse_args(argv)
    if args.nodes < SCALE_SETS or args.pods < 1 or args.namespaces < 1:
        p.error("need at least 3 nodes, 1 pod and 1 namespace")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
