import pytest

from nmi.cli import parse


def test_defaults_and_compat_flags() -> None:
    s = parse(["--node", "n1"])
    assert s.server.port == 2579 and s.upstream.metadata_ip == "169.254.169.254"
    assert s.identity.metadata_header_required and s.cluster.enable_scale_features
    assert s.observability.probe_port == 8080 and s.observability.prometheus_port == 9090


def test_pflag_style_booleans() -> None:
    s = parse(
        ["--node=n1", "--metadata-header-required=false", "--forceNamespaced", "--manage-iptables=false"]
    )
    assert not s.identity.metadata_header_required and s.identity.force_namespaced and not s.iptables.manage


def test_workload_identity_is_on_unless_turned_off() -> None:
    assert parse(["--node", "n1"]).identity.workload_identity
    assert not parse(["--node", "n1", "--enable-workload-identity=false"]).identity.workload_identity


def test_managed_mode_is_namespaced_and_case_insensitive() -> None:
    s = parse(["--node=n1", "--operation-mode=MANAGED"])
    assert s.identity.operation_mode == "managed" and s.identity.force_namespaced


def test_legacy_retry_flags_map_to_wait_budget() -> None:
    s = parse(
        [
            "--node=n1",
            "--retry-attempts-for-created=1",
            "--retry-attempts-for-assigned=1",
            "--find-identity-retry-interval=1",
        ]
    )
    assert s.identity.identity_wait_timeout_s == 2.0
    assert parse(["--node=n1", "--identity-wait-timeout=3"]).identity.identity_wait_timeout_s == 3.0


def test_empty_node_is_refused_without_cluster_state(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse([])
    assert exc.value.code == 2 and "--node" in capsys.readouterr().err
    assert parse(["--cluster-state=x.yaml"]).cluster.cluster_state_path == "x.yaml"


def test_bad_values_are_rejected() -> None:
    for argv in (
        ["--node=n", "--nmi-port=99999"],
        ["--node=n", "--operation-mode=weird"],
        ["--node=n", "--log-format=xml"],
        ["--node=n", "--block-instance-metadata=maybe"],
    ):
        with pytest.raises(SystemExit):
            parse(argv)


def test_host_network_interception_needs_an_exemption() -> None:
    from nmi.interception import host_network
    from podidentity.errors import ConfigError

    assert host_network(parse(["--node=n"])) is None
    with pytest.raises(ConfigError, match="needs NMI exempted"):
        host_network(parse(["--node=n", "--intercept-host-network"]))
    rule = host_network(
        parse(
            [
                "--node=n",
                "--intercept-host-network",
                "--host-network-exempt-uid=1234",
                "--host-network-exempt-cgroup=/system.slice/nmi.service",
            ]
        )
    )
    assert rule is not None and rule.exempt_uids == (1234,)
    assert rule.exempt_cgroups == ("/system.slice/nmi.service",)
    with pytest.raises(ConfigError):
        host_network(parse(["--node=n", "--intercept-host-network", "--host-network-exempt-cgroup=relative"]))
