"""Command line: the original MIC's flags (mic-spec §2) and ours, into one ``MicSettings``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence

from mic.app import App
from mic.settings import (
    CLIENT_QPS,
    IMDS_DEFAULT,
    ArmSettings,
    LeaderSettings,
    MicSettings,
    ReconcileSettings,
    azure_config_from_env,
    kube_settings,
    read_azure_config,
)
from podidentity import __version__
from podidentity.cliargs import flag, port, positive
from podidentity.clouds import cloud_environment
from podidentity.errors import ConfigError

log = logging.getLogger("mic")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` (``3m``, ``1h30m``, ``500ms``), or plain seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mic", description="Managed Identity Controller", allow_abbrev=False)
    p.add_argument("--version", action="store_true")
    p.add_argument("--kubeconfig", default="")
    p.add_argument("--cloudconfig", default="", help="azure.json; empty: environment variables")
    flag(p, "--forceNamespaced", False, "pod, binding and identity in one namespace; AAIs there too")
    p.add_argument("--immutable-user-msis", default="", help="client IDs never removed from VMs/VMSSs")
    p.add_argument("--http-probe-port", type=port, default=8080)
    p.add_argument("--prometheus-port", type=port, default=8888)
    p.add_argument("--identity-assignment-reconcile-interval", type=go_duration, default=180.0)
    p.add_argument("--syncRetryDuration", type=go_duration, default=3600.0)
    p.add_argument("--update-user-msi-max-retry", type=int, default=2)
    p.add_argument("--update-user-msi-retry-interval", type=go_duration, default=1.0)
    p.add_argument("--createDeleteBatch", type=int, default=20)
    p.add_argument(
        "--clientQps", type=positive, default=CLIENT_QPS, help="API server requests/s, burst equal"
    )
    p.add_argument("--max-concurrent-vm-updates", type=int, default=10, help="VMs/VMSSs worked on at once")
    p.add_argument("--arm-endpoint", default="", help="Resource Manager URL (default: the cloud's)")
    p.add_argument("--imds-endpoint", default=IMDS_DEFAULT, help="IMDS URL for MIC's own managed identity")
    p.add_argument("--arm-token-file", default="", help="ARM bearer token file (tests, break-glass)")
    p.add_argument(
        "--arm-audience", default="", help="token audience for Resource Manager (default: the cloud's)"
    )
    g = p.add_argument_group("leader election")
    g.add_argument("--leader-election-instance", default="", help="holder identity (default: hostname)")
    g.add_argument("--leader-election-namespace", default="default")
    g.add_argument("--leader-election-name", default="aad-pod-identity-mic")
    g.add_argument("--leader-election-duration", type=go_duration, default=15.0)
    flag(
        g,
        "--leader-election-endpoints-lock",
        True,
        "also hold the Go MIC's Endpoints lock (turn off once no Go MIC runs)",
    )
    # Accepted for compatibility with the chart.
    for name in (
        "--config-map-name",
        "--type-upgrade-status-key",
        "--custom-user-agent",
        "--log-format",
    ):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--v", type=int, default=0, help="klog verbosity; >= 4 means debug logs")
    for name in ("--enableScaleFeatures", "--enableProfile", "--enable-type-upgrade", "--logtostderr"):
        flag(p, name, False, argparse.SUPPRESS)
    return p


def _go_style(argv: Sequence[str]) -> list[str]:
    """Go's flag package takes ``-name`` (klog's ``-v=4`` too); argparse wants ``--name``."""
    return [f"-{a}" if re.match(r"^-([A-Za-z][\w-]+|v=)", a) else a for a in argv]


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> MicSettings:
    azure = read_azure_config(args.cloudconfig) if args.cloudconfig else azure_config_from_env(environ)
    cloud = cloud_environment(azure.cloud, environ)
    immutable = {c.strip().casefold() for c in args.immutable_user_msis.split(",") if c.strip()}
    if azure.user_assigned_identity_id:
        immutable.add(azure.user_assigned_identity_id.casefold())  # the cluster identity (mic-spec §3.9)
    force = bool(args.forceNamespaced) or environ.get("FORCENAMESPACED", "").casefold() == "true"
    # The cloud decides where Resource Manager is; the flags only override it (for tests and odd set-ups).
    arm = ArmSettings(
        endpoint=args.arm_endpoint or cloud.resource_manager_endpoint,
        audience=args.arm_audience or cloud.token_audience,
    )
    return MicSettings(
        kubeconfig=args.kubeconfig,
        cloudconfig=args.cloudconfig,
        azure=azure,
        cloud=cloud,
        arm=arm,
        reconcile=ReconcileSettings(
            force_namespaced=force,
            immutable_client_ids=frozenset(immutable),
            drift_interval_s=args.identity_assignment_reconcile_interval,
            full_resync_s=args.syncRetryDuration,
            update_max_retry=args.update_user_msi_max_retry,
            update_retry_interval_s=args.update_user_msi_retry_interval,
            kube_write_concurrency=max(1, args.createDeleteBatch),
            max_concurrent_targets=max(1, args.max_concurrent_vm_updates),
        ),
        kube=kube_settings(args.clientQps),
        leader=LeaderSettings(
            instance=args.leader_election_instance or socket.gethostname(),
            namespace=args.leader_election_namespace,
            name=args.leader_election_name,
            duration_s=args.leader_election_duration,
            endpoints_lock=args.leader_election_endpoints_lock,
        ),
        imds_endpoint=args.imds_endpoint,
        arm_token_file=args.arm_token_file,
        log_level="DEBUG" if args.v >= 4 else "INFO",
        http_probe_port=args.http_probe_port,
        prometheus_port=args.prometheus_port,
    )


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> MicSettings:
    parser = build_parser()
    args = parser.parse_args(_go_style(sys.argv[1:] if argv is None else argv))
    if args.version:
        print(f"MIC Version: {__version__}")
        raise SystemExit(0)
    return settings_from(args, os.environ if environ is None else environ)


async def _run(settings: MicSettings) -> int:
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except ConfigError as exc:
        log.error("%s", exc)
        await app.stop()
        return 2
    await stop.wait()
    log.info("MIC stopping")
    await app.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = parse(argv)
    except ConfigError as exc:
        print(f"mic: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(_run(settings)))
