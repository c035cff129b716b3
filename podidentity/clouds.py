"""Azure clouds: where Resource Manager and Azure AD are, by the names azure.json uses.

``AzureStackCloud`` (any private cloud) is read from the JSON file ``AZURE_ENVIRONMENT_FILEPATH``
names, in go-autorest's ``Environment`` format, as the original MIC and the cloud provider read it
(e.g. ``/etc/kubernetes/akscustom.json``). Pointing the daemons at stand-ins is done the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from podidentity.errors import ConfigError

ENVIRONMENT_FILE_VARIABLE = "AZURE_ENVIRONMENT_FILEPATH"
STACK = "azurestackcloud"

MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login-us.microsoftonline.com",
        "login.usgovcloudapi.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.de",
    }
)
"""Azure AD hosts MSAL may validate and discover against; any other is a private cloud's."""


@dataclass(frozen=True, slots=True)
class CloudEnvironment:
    name: str
    resource_manager_endpoint: str
    active_directory_endpoint: str
    token_audience: str
    """The resource MIC asks Azure AD for to call Resource Manager."""

    @property
    def microsoft_authority(self) -> bool:
        return (
            urlsplit(self.active_directory_endpoint).hostname or ""
        ).casefold() in MICROSOFT_AUTHORITY_HOSTS


def _known(name: str, arm: str, aad: str) -> CloudEnvironment:
    return CloudEnvironment(name, arm, aad, arm)


KNOWN = {
    c.name.casefold(): c
    for c in (
        _known("AzurePublicCloud", "https://management.azure.com/", "https://login.microsoftonline.com/"),
        _known(
            "AzureUSGovernmentCloud",
            "https://management.usgovcloudapi.net/",
            "https://login.microsoftonline.us/",
        ),
        _known("AzureChinaCloud", "https://management.chinacloudapi.cn/", "https://login.chinacloudapi.cn/"),
        _known(
            "AzureGermanCloud", "https://management.microsoftazure.de/", "https://login.microsoftonline.de/"
        ),
    )
}


def _https_url(doc: Mapping[str, object], key: str, source: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: {key} is required")
    parts = urlsplit(value.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"{source}: {key} must be an https:// URL, got {value!r}")
    text = value.strip()
    return text if text.endswith("/") else text + "/"


def parse_environment_file(text: str, *, source: str) -> CloudEnvironment:
    """go-autorest's ``Environment`` JSON: the keys MIC needs, each named in the error if missing."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    arm = _https_url(doc, "resourceManagerEndpoint", source)
    aad = _https_url(doc, "activeDirectoryEndpoint", source)
    audience = doc.get("tokenAudience")
    if audience is not None and (not isinstance(audience, str) or not audience.strip()):
        raise ConfigError(f"{source}: tokenAudience must be a non-empty string")
    name = doc.get("name")
    return CloudEnvironment(
        name=name if isinstance(name, str) and name else "AzureStackCloud",
        resource_manager_endpoint=arm,
        active_directory_endpoint=aad,
        token_audience=audience.strip() if isinstance(audience, str) else arm,
    )


def cloud_environment(name: str, environ: Mapping[str, str]) -> CloudEnvironment:
    """The cloud azure.json's ``cloud`` names (case-insensitive; empty is the public cloud)."""
    folded = (name or "AzurePublicCloud").strip().casefold()
    if folded in KNOWN:
        return KNOWN[folded]
    if folded != STACK:
        known = ", ".join(sorted(c.name for c in KNOWN.values()))
        raise ConfigError(f"cloud: unknown cloud {name!r} (known: {known}, AzureStackCloud)")
    path = environ.get(ENVIRONMENT_FILE_VARIABLE, "")
    if not path:
        raise ConfigError(
            f"cloud: AzureStackCloud needs {ENVIRONMENT_FILE_VARIABLE} to name its environment file"
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{ENVIRONMENT_FILE_VARIABLE}={path}: cannot read: {exc.strerror}") from None
    return parse_environment_file(text, source=path)
