"""Command line: aad-pod-identity NMI's flags (nmi-spec §1), plus ours, into one ``Settings``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from nmi.settings import (
    ClusterSettings,
    IdentitySettings,
    IptablesSettings,
    ObservabilitySettings,
    Settings,
)
from podidentity import __version__
from podidentity.cliargs import flag, port, positive
from podidentity.http.settings import ServerSettings
from podidentity.imds.settings import UpstreamSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmi",
        description="Node Managed Identity: Azure AD tokens for the pods of this node.",
        allow_abbrev=False,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    g = p.add_argument_group("listener")
    g.add_argument("--nmi-listen-address", default="127.0.0.1")
    g.add_argument("--nmi-port", type=port, default=2579)
    g.add_argument("--graceful-timeout", type=positive, default=10.0, help="seconds to drain on SIGTERM")
    g.add_argument("--max-connections", type=int, default=4096)
    g = p.add_argument_group("upstream")
    g.add_argument("--metadata-ip", default="169.254.169.254")
    g.add_argument("--metadata-port", type=port, default=80)
    g.add_argument("--upstream-max-concurrent", type=int, default=5)
    g.add_argument("--upstream-rate", type=positive, default=15.0, help="token requests per second")
    g.add_argument("--upstream-timeout", type=positive, default=10.0)
    g.add_argument("--custom-user-agent", default="")
    g.add_argument("--aad-ca-bundle", default=os.environ.get("REQUESTS_CA_BUNDLE"))
    g = p.add_argument_group("identities")
    g.add_argument("--node", default=os.environ.get("NODE_NAME", ""))
    g.add_argument("--operation-mode", default="standard", type=str.lower, choices=["standard", "managed"])
    flag(
        g,
        "--forceNamespaced",
        os.environ.get("FORCENAMESPACED") == "true",
        "identities only in own namespace",
    )
    g.add_argument("--MICNamespace", default="default", help="accepted for compatibility; has no effect")
    flag(g, "--metadata-header-required", True, "require 'Metadata: true'")
    flag(g, "--set-retry-after-header", False, "answer lookup failures with 503 and Retry-After")
    flag(g, "--block-instance-metadata", False, "403 for /metadata/instance")
    flag(g, "--enable-host-token", False, "serve legacy /host/token to 127.0.0.1")
    flag(
        g,
        "--reject-ambiguous-identity",
        False,
        "a pod with several identities that names none gets IMDS's 400 instead of the default one",
    )
    flag(
        g,
        "--enable-workload-identity",
        True,
        "serve federated identities: watch ServiceAccounts and request their tokens (needs that RBAC)",
    )
    g.add_argument(
        "--federation-authority-host",
        default=os.environ.get("AZURE_AUTHORITY_HOST") or IdentitySettings().federation_authority_host,
        help="Azure AD for workload (federated) identities",
    )
    g.add_argument(
        "--federation-tenant-id",
        default=os.environ.get("AZURE_TENANT_ID", ""),
        help="tenant of federated identities that name none",
    )
    g.add_argument("--pod-wait-timeout", type=positive, default=5.0)
    g.add_argument("--identity-wait-timeout", type=positive, default=None)
    g.add_argument("--retry-attempts-for-created", type=int, default=None)
    g.add_argument("--retry-attempts-for-assigned", type=int, default=None)
    g.add_argument("--find-identity-retry-interval", type=int, default=None)
    flag(g, "--allow-cross-namespace-secrets", False, "let clientPassword name another namespace")
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster-state", default=None, help="YAML file of objects instead of the Kubernetes API")
    g.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    g.add_argument(
        "--startup-taint",
        default=ClusterSettings().startup_taint,
        help="taint key removed from this node once NMI is ready (empty: none)",
    )
    flag(g, "--enableScaleFeatures", True, "watch only this node's AzureAssignedIdentities")
    g = p.add_argument_group("iptables")
    flag(g, "--manage-iptables", True, "install and reconcile the interception rules")
    g.add_argument("--ipt-update-interval-sec", type=positive, default=60.0)
    flag(g, "--cleanup-iptables-on-exit", False, "remove the rules on exit (uninstall only: fails open)")
    flag(g, "--enable-conntrack-deletion", False, "purge conntrack entries to the metadata address")
    flag(g, "--allow-network-plugin-kubenet", False, "run on kubenet nodes")
    g.add_argument("--kubelet-config", default="/etc/default/kubelet")
    flag(g, "--intercept-host-network", False, "also intercept host processes' metadata traffic (OUTPUT)")
    g.add_argument(
        "--host-network-exempt-uid",
        type=int,
        action="append",
        default=[],
        help="uid that keeps direct IMDS access (repeatable); NMI's own uid must be exempt",
    )
    g.add_argument(
        "--host-network-exempt-cgroup",
        action="append",
        default=[],
        help="cgroup v2 path that keeps direct IMDS access (repeatable), e.g. NMI's own",
    )
    g.add_argument(
        "--anti-spoofing",
        choices=["auto", "routed", "bridge", "off"],
        default="auto",
        help="stop pods forging another pod's address toward the metadata endpoint: auto (routed rule "
        "on routed nodes, a warning on bridged ones), routed, bridge (pin each bridge port to its pod's "
        "MAC and IP, from the CNI result cache; opt-in), off",
    )
    g.add_argument(
        "--anti-spoofing-opt-out-namespaces",
        default="",
        metavar="NS[,NS...]",
        help="namespaces whose pods may opt out of the bridge pins with the label "
        "nmi.aadpodidentity.k8s.io/allow-extra-addresses=true (default: none)",
    )
    g.add_argument(
        "--cni-cache-dir",
        default="/var/lib/cni/results",
        help="the container runtime's CNI result cache (libcni cniCacheV1 files), read by "
        "--anti-spoofing=bridge",
    )
    g = p.add_argument_group("observability")
    g.add_argument("--prometheus-port", type=port, default=9090)
    g.add_argument("--http-probe-port", type=port, default=8080)
    g.add_argument("--log-format", choices=["text", "json"], default="text")
    g.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    flag(g, "--enableProfile", False, "accepted for compatibility; profiling is never exposed")
    g.add_argument("-v", "--v", type=int, default=0, help="klog verbosity; >= 4 means debug logs")
    for name in (
        "--logtostderr",
        "--alsologtostderr",
        "--skip_headers",
        "--skip_log_headers",
        "--one_output",
    ):
        flag(g, name, False, "accepted for compatibility")
    return p


def identity_wait(args: argparse.Namespace) -> float:
    """The identity wait budget; the legacy retry flags, when given, keep their meaning.

    ``--retry-attempts-for-created=1 --retry-attempts-for-assigned=1
    --find-identity-retry-interval=1`` (the documented Retry-After recipe) gives 2 s.
    """
    if args.identity_wait_timeout is not None:
        return float(args.identity_wait_timeout)
    legacy = (
        args.retry_attempts_for_created,
        args.retry_attempts_for_assigned,
        args.find_identity_retry_interval,
    )
    if any(v is not None for v in legacy):
        created = legacy[0] if legacy[0] is not None else 16
        assigned = legacy[1] if legacy[1] is not None else 4
        interval = legacy[2] if legacy[2] is not None else 5
        return float(max(1, (created + assigned) * interval))
    return IdentitySettings().identity_wait_timeout_s


def settings_from(args: argparse.Namespace) -> Settings:
    managed = args.operation_mode == "managed"
    return Settings(
        server=ServerSettings(
            listen_address=args.nmi_listen_address,
            port=args.nmi_port,
            graceful_timeout_s=args.graceful_timeout,
            max_connections=args.max_connections,
        ),
        upstream=UpstreamSettings(
            metadata_ip=args.metadata_ip,
            metadata_port=args.metadata_port,
            max_concurrent=args.upstream_max_concurrent,
            rate_per_s=args.upstream_rate,
            request_timeout_s=args.upstream_timeout,
            custom_user_agent=args.custom_user_agent,
            aad_ca_bundle=args.aad_ca_bundle,
        ),
        identity=IdentitySettings(
            operation_mode=args.operation_mode,
            # Managed mode is namespaced by construction (nmi-spec §1 "Mode constraints").
            force_namespaced=bool(args.forceNamespaced) or managed,
            metadata_header_required=args.metadata_header_required,
            set_retry_after_header=args.set_retry_after_header,
            block_instance_metadata=args.block_instance_metadata,
            enable_host_token=args.enable_host_token,
            pod_wait_timeout_s=args.pod_wait_timeout,
            identity_wait_timeout_s=identity_wait(args),
            reject_ambiguous_identity=args.reject_ambiguous_identity,
            workload_identity=args.enable_workload_identity,
            federation_authority_host=args.federation_authority_host,
            federation_tenant_id=args.federation_tenant_id,
            mic_namespace=args.MICNamespace,
            allow_cross_namespace_secrets=args.allow_cross_namespace_secrets,
        ),
        observability=ObservabilitySettings(
            prometheus_port=args.prometheus_port,
            probe_port=args.http_probe_port,
            log_format=args.log_format,
            log_level="DEBUG" if args.v >= 4 else args.log_level,
        ),
        cluster=ClusterSettings(
            node_name=args.node,
            cluster_state_path=args.cluster_state,
            kubeconfig=args.kubeconfig,
            startup_taint=args.startup_taint,
            enable_scale_features=args.enableScaleFeatures,
        ),
        iptables=IptablesSettings(
            manage=args.manage_iptables,
            update_interval_s=args.ipt_update_interval_sec,
            cleanup_on_exit=args.cleanup_iptables_on_exit,
            enable_conntrack_deletion=args.enable_conntrack_deletion,
            allow_network_plugin_kubenet=args.allow_network_plugin_kubenet,
            kubelet_config=args.kubelet_config,
            intercept_host_network=args.intercept_host_network,
            host_network_exempt_uids=tuple(args.host_network_exempt_uid),
            host_network_exempt_cgroups=tuple(args.host_network_exempt_cgroup),
            anti_spoofing=args.anti_spoofing,
            cni_cache_dir=args.cni_cache_dir,
            anti_spoofing_opt_out_namespaces=frozenset(
                ns.strip() for ns in args.anti_spoofing_opt_out_namespaces.split(",") if ns.strip()
            ),
        ),
    )


def parse(argv: Sequence[str] | None = None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"NMI Version: {__version__}")
        raise SystemExit(0)
    if not args.node and args.cluster_state is None:
        # The original accepted an empty node and then matched nothing (nmi-spec §9.20).
        parser.error("--node (or NODE_NAME) is required when reading the Kubernetes API")
    return settings_from(args)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse(argv)
    from nmi.app import run  # Imported late so --help and --version stay instant.

    sys.exit(run(settings))
