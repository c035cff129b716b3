"""MIC's own Azure credentials and clouds (mic-spec §4): service principal through MSAL against a
custom cloud's Azure AD over TLS, trusted the way users trust a private cloud (REQUESTS_CA_BUNDLE),
azure.json rotation without a restart, and clear errors naming the key."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from mic.cli import parse
from mic.credentials import CredentialError, ReloadingCredential, ServicePrincipalArmCredential
from mic.settings import AzureConfig
from podidentity.clouds import KNOWN, cloud_environment, parse_environment_file
from podidentity.errors import ConfigError
from standins.aad import AadStandin

TENANT = "72f988bf-0000-4000-8000-00000000abcd"
CLIENT = "0c1d2e3f-0000-4000-8000-000000000001"


def test_known_clouds_by_name_any_case() -> None:
    assert (
        cloud_environment("azurechinacloud", {}).resource_manager_endpoint
        == "https://management.chinacloudapi.cn/"
    )
    gov = cloud_environment("AzureUSGovernmentCloud", {})
    assert gov.active_directory_endpoint == "https://login.microsoftonline.us/" and gov.microsoft_authority
    assert cloud_environment("", {}) is KNOWN["azurepubliccloud"]
    with pytest.raises(ConfigError, match="cloud: unknown cloud 'AzureMoonCloud'"):
        cloud_environment("AzureMoonCloud", {})


def test_azure_stack_cloud_from_its_environment_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AZURE_ENVIRONMENT_FILEPATH"):
        cloud_environment("AzureStackCloud", {})
    path = tmp_path / "akscustom.json"
    path.write_text(
        json.dumps(
            {
                "name": "AzureStackCloud",
                "resourceManagerEndpoint": "https://management.local.azurestack.external",
                "activeDirectoryEndpoint": "https://adfs.local.azurestack.external/",
                "tokenAudience": "https://management.adfs.azurestack.local/4de154de-0000",
                "serviceManagementEndpoint": "https://management.adfs.azurestack.local/4de154de-0000",
            }
        )
    )
    cloud = cloud_environment("azurestackcloud", {"AZURE_ENVIRONMENT_FILEPATH": str(path)})
    assert cloud.resource_manager_endpoint == "https://management.local.azurestack.external/"
    assert cloud.token_audience == "https://management.adfs.azurestack.local/4de154de-0000"
    assert not cloud.microsoft_authority
    for broken, key in (
        ({"activeDirectoryEndpoint": "https://a/"}, "resourceManagerEndpoint"),
        (
            {"resourceManagerEndpoint": "https://m/", "activeDirectoryEndpoint": "http://a/"},
            "activeDirectoryEndpoint",
        ),
    ):
        with pytest.raises(ConfigError, match=key):
            parse_environment_file(json.dumps(broken), source="env.json")


def test_the_cloud_decides_where_arm_is_and_flags_override(tmp_path: Path) -> None:
    config = tmp_path / "azure.json"
    config.write_text(json.dumps({"cloud": "AzureChinaCloud", "subscriptionId": "s", "tenantId": TENANT}))
    settings = parse(["--cloudconfig", str(config)], environ={})
    assert settings.arm.endpoint == "https://management.chinacloudapi.cn/"
    assert settings.arm.audience == "https://management.chinacloudapi.cn/"
    assert settings.cloudconfig == str(config)
    settings = parse(["--cloudconfig", str(config), "--arm-endpoint", "https://127.0.0.1:1/"], environ={})
    assert settings.arm.endpoint == "https://127.0.0.1:1/"


def test_klog_verbosity_and_go_style_flags_as_the_chart_passes_them() -> None:
    settings = parse(["-v=4", "-clientQps=50", "--leader-election-duration=30s"], environ={})
    assert settings.log_level == "DEBUG"
    assert settings.kube.qps == 50 and settings.kube.burst == 50
    assert settings.leader.duration_s == 30.0 and settings.leader.endpoints_lock
    default = parse([], environ={})
    assert default.kube.qps == 20 and default.kube.burst == 20
    assert default.leader.name == "aad-pod-identity-mic" and default.leader.namespace == "default"
    assert default.leader.instance  # the hostname
    assert not parse(["--leader-election-endpoints-lock=false"], environ={}).leader.endpoints_lock


@pytest.fixture
async def aad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    async with AadStandin() as standin:
        standin.add_tenant(TENANT)
        standin.register_app(TENANT, CLIENT, secret="first-secret")
        # As users trust a private cloud's Azure AD: the CA bundle requests reads.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", standin.write_ca_bundle(tmp_path / "ca.pem"))
        yield standin


def _cloud_file(tmp_path: Path, aad_url: str) -> dict[str, str]:
    path = tmp_path / "cloud.json"
    path.write_text(
        json.dumps(
            {"resourceManagerEndpoint": "https://arm.example.test/", "activeDirectoryEndpoint": aad_url}
        )
    )
    return {"AZURE_ENVIRONMENT_FILEPATH": str(path)}


async def test_service_principal_token_from_a_custom_clouds_azure_ad(aad: AadStandin, tmp_path: Path) -> None:
    cloud = cloud_environment("AzureStackCloud", _cloud_file(tmp_path, aad.url))
    credential = ServicePrincipalArmCredential(cloud, TENANT, CLIENT, "first-secret", cloud.token_audience)
    token = await credential.token()
    assert token and await credential.token() == token  # reused until near expiry
    assert aad.token_calls[CLIENT] == 1
    call = aad.calls[-1]
    assert call.tenant == TENANT and call.scope == "https://arm.example.test/.default"

    wrong = ServicePrincipalArmCredential(cloud, TENANT, CLIENT, "not-the-secret", cloud.token_audience)
    with pytest.raises(CredentialError, match="7000215"):  # AADSTS7000215: invalid client secret
        await wrong.token()


async def test_azure_json_rotation_takes_effect_without_a_restart(aad: AadStandin, tmp_path: Path) -> None:
    cloud = cloud_environment("AzureStackCloud", _cloud_file(tmp_path, aad.url))
    config = tmp_path / "azure.json"

    def write(secret: str) -> None:
        body = {
            "cloud": "AzureStackCloud",
            "tenantId": TENANT,
            "aadClientId": CLIENT,
            "aadClientSecret": secret,
        }
        tmp = tmp_path / "azure.json.tmp"
        tmp.write_text(json.dumps(body))
        os.replace(tmp, config)

    def build(azure: AzureConfig) -> ServicePrincipalArmCredential:
        if not azure.aad_client_secret:
            raise ConfigError("aadClientSecret missing")
        return ServicePrincipalArmCredential(
            cloud, azure.tenant_id, azure.aad_client_id, azure.aad_client_secret, cloud.token_audience
        )

    write("first-secret")
    credential = ReloadingCredential(str(config), build, check_s=0.0)
    await credential.token()
    aad.rotate_secret(TENANT, CLIENT, "second-secret")
    write("second-secret")
    credential.invalidate()  # as after ARM's 401
    await credential.token()
    assert [c.status for c in aad.calls] == [200, 200]
    # A broken edit keeps the last good credential.
    config.write_text("{not json")
    credential.invalidate()
    assert await credential.token()
    assert credential.config.aad_client_secret == "second-secret"
