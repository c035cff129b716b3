from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nmi.netsetup import NetSetupError, ensure_route_localnet, is_kubenet, node_ipv4
from tests.netns.harness import Node


def test_node_address_is_the_first_global_ipv4_on_the_default_route_interface(node: Node) -> None:
    assert node_ipv4(netns=node.ns) == node.node_ip == "10.240.0.4"
    assert node_ipv4(netns=node.pods[0].ns) == node.pods[0].ip


def test_no_default_route_means_no_node_address(node: Node) -> None:
    node.run_in(node.ns, ["ip", "route", "del", "default"])
    assert node_ipv4(netns=node.ns) is None


def fake_proc(tmp_path: Path, **values: str) -> Path:
    for name, value in values.items():
        conf = tmp_path / "net" / "ipv4" / "conf" / name
        conf.mkdir(parents=True)
        (conf / "route_localnet").write_text(value)
    return tmp_path


def test_route_localnet_is_set_verified_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = fake_proc(tmp_path, all="0\n", cbr0="1\n", eth0="0\n")
    with caplog.at_level(logging.INFO, logger="nmi.netsetup"):
        assert ensure_route_localnet(["cbr0", "eth0"], proc_sys=proc) == ["eth0"]
    assert "martian" in caplog.text
    assert ensure_route_localnet(proc_sys=proc) == ["all"]
    assert (proc / "net/ipv4/conf/all/route_localnet").read_text() == "1\n"
    assert ensure_route_localnet(proc_sys=proc) == []


@pytest.mark.parametrize("name", ["../all", "", ".."])
def test_route_localnet_refuses_path_tricks(tmp_path: Path, name: str) -> None:
    with pytest.raises(NetSetupError, match="invalid interface"):
        ensure_route_localnet([name], proc_sys=tmp_path)


def test_route_localnet_on_a_missing_interface_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NetSetupError, match="will be dropped"):
        ensure_route_localnet(["nope0"], proc_sys=fake_proc(tmp_path, all="0"))


@pytest.mark.parametrize(
    ("text", "kubenet"),
    [
        ("KUBELET_FLAGS=--address=0.0.0.0 --network-plugin=kubenet --max-pods=110\n", True),
        ("KUBELET_FLAGS=--network-plugin kubenet\n", True),
        ("KUBELET_FLAGS='--network-plugin=\"kubenet\"'\n", True),
        ("KUBELET_FLAGS=--network-plugin=cni\n", False),
        ("# --network-plugin=kubenet was the old default\nKUBELET_FLAGS=--network-plugin=cni\n", False),
        ("--network-plugin=kubenetx\n", False),
        ("", False),
    ],
)
def test_kubenet_is_detected_from_the_kubelet_flags(tmp_path: Path, text: str, kubenet: bool) -> None:
    config = tmp_path / "kubelet"
    config.write_text(text)
    assert is_kubenet(config) is kubenet


def test_missing_or_directory_kubelet_config_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="nmi.netsetup"):
        assert is_kubenet(tmp_path / "missing") is False
        assert is_kubenet(tmp_path) is False
    assert "not found" in caplog.text and "is a directory" in caplog.text
