"""Real Python Azure SDK clients asking for a token, run inside a sandbox pod by test_real_sdks.py.

Run with the SDKs' own interpreter (``.sdk/venv/bin/python``, made by scripts/setup-sdks), never the
project's: ``py_client.py CASES_JSON [--timeout S] [--parallel N]``. ``CASES_JSON`` is a list of
``{"id", "sdk", "by", "value"}``; every case runs in a forked child of its own (fresh SDK objects and
caches, and killable: one stuck in an SDK's retries is stopped after ``--timeout`` seconds), and prints
one JSON line: ``{"id", "ok": true, "appid", "oid", "mirid", "elapsed"}`` (the access token's claims,
decoded without verification) or ``{"id", "ok": false, "error_type", "message", "status", "elapsed"}``.

``sdk`` and what each one puts on the wire to 169.254.169.254 (read from the pinned releases' source):

- ``azure-identity``: ``azure.identity.ManagedIdentityCredential`` (sync). Since 1.2x it hands IMDS to
  ``msal.ManagedIdentityClient`` (``_internal/msal_managed_identity_client.py``), over an azure-core
  pipeline retrying 404/410/429/5xx 5 times (waits 0+1.6+3.2+6.4+12.8 s: 24 s; ``_credentials/imds.py``),
  then CredentialUnavailableError.
  ``client_id=`` -> ``client_id=``; ``identity_config={"resource_id": R}`` -> ``msi_res_id=R``;
  ``{"object_id": O}`` -> ``object_id=O``. Any other identity_config key (``msi_res_id`` included) is
  silently dropped and the request names no identity. A 400 raises CredentialUnavailableError at once.
- ``azure-identity-aio``: ``azure.identity.aio.ManagedIdentityCredential``. Its own request factory
  (``_credentials/imds.py::_get_request``) copies identity_config's keys into the query verbatim:
  ``{"resource_id": R}`` -> ``resource_id=R``, ``{"msi_res_id": R}`` -> ``msi_res_id=R``,
  ``{"object_id": O}`` -> ``object_id=O``, ``client_id=`` -> ``client_id=``. Same retries, after which
  a 404 is a ClientAuthenticationError (which stops a chain); a 400 is CredentialUnavailableError.
- ``msal``: ``msal.ManagedIdentityClient`` with ``requests.Session()`` (no retries of its own):
  ``UserAssignedManagedIdentity(client_id=)`` -> ``client_id=``, ``(resource_id=)`` -> ``msi_res_id=``,
  ``(object_id=)`` -> ``object_id=``; ``SystemAssignedManagedIdentity()`` names none. Errors come back
  as a result dict (``{"error", "error_description"}``), never as an exception.
- ``msrestazure``: ``MSIAuthentication(client_id= | object_id= | msi_res_id=)``, sent under those names;
  retries 404/410/429/5xx up to 12 times with random exponential waits (65 s measured), then
  MSIAuthenticationTimeoutError; another error status raises ``requests.HTTPError`` at once.
- ``dac``: ``azure.identity.DefaultAzureCredential`` with every credential but the environment, workload
  identity and managed identity ones excluded (those are unconfigured here: no AZURE_* variables). In a
  chain, ManagedIdentityCredential first probes IMDS: api-version and resource only, no Metadata header,
  1 s timeout, no retry; any HTTP answer counts as "IMDS is there".
- ``chain``: ``ChainedTokenCredential(ManagedIdentityCredential(...), <a credential returning
  "sentinel">)``: the token is "sentinel" only if the managed identity credential let the chain move on.

Keys are sent in lower case, exactly as above; no SDK changes the case of the values.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import select
import signal
import sys
import time
from typing import Any

# No SDK in a pod may find another way to authenticate, nor another endpoint, than IMDS's address.
for _name in list(os.environ):
    if _name.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")):
        del os.environ[_name]

import msal  # noqa: E402
import requests  # noqa: E402
from azure.core.credentials import AccessToken  # noqa: E402
from azure.identity import (  # noqa: E402
    ChainedTokenCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
)
from azure.identity.aio import ManagedIdentityCredential as AioManagedIdentityCredential  # noqa: E402
from msrestazure.azure_active_directory import MSIAuthentication  # noqa: E402

RESOURCE = "https://vault.azure.net"
SCOPE = RESOURCE + "/.default"


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def _identity_kwargs(by: str | None, value: str | None) -> dict[str, Any]:
    if by is None:
        return {}
    if by == "client_id":
        return {"client_id": value}
    return {"identity_config": {by: value}}


class _Sentinel:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("sentinel", int(time.time()) + 3600)


async def _aio_token(by: str | None, value: str | None) -> str:
    async with AioManagedIdentityCredential(**_identity_kwargs(by, value)) as credential:
        return (await credential.get_token(SCOPE)).token


def token_for(sdk: str, by: str | None, value: str | None) -> str:
    """The access token the SDK obtains, or the SDK's exception; msal's error dict becomes one."""
    if sdk == "azure-identity":
        return ManagedIdentityCredential(**_identity_kwargs(by, value)).get_token(SCOPE).token
    if sdk == "azure-identity-aio":
        return asyncio.run(_aio_token(by, value))
    if sdk == "msal":
        identity: Any = (
            msal.SystemAssignedManagedIdentity()
            if by is None
            else msal.UserAssignedManagedIdentity(**{by: value})
        )
        client = msal.ManagedIdentityClient(identity, http_client=requests.Session())
        result = client.acquire_token_for_client(resource=RESOURCE)
        if "access_token" not in result:
            raise MsalError(result)
        return str(result["access_token"])
    if sdk == "msrestazure":
        credential = MSIAuthentication(resource=RESOURCE, **({by: value} if by else {}))
        return str(credential.token["access_token"])
    if sdk == "dac":
        return (
            DefaultAzureCredential(
                exclude_shared_token_cache_credential=True,
                exclude_visual_studio_code_credential=True,
                exclude_cli_credential=True,
                exclude_developer_cli_credential=True,
                exclude_powershell_credential=True,
                exclude_interactive_browser_credential=True,
                exclude_broker_credential=True,
            )
            .get_token(SCOPE)
            .token
        )
    if sdk == "chain":
        chain = ChainedTokenCredential(ManagedIdentityCredential(**_identity_kwargs(by, value)), _Sentinel())
        return chain.get_token(SCOPE).token
    raise ValueError(f"unknown sdk {sdk!r}")


class MsalError(Exception):
    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(f"{result.get('error')}: {result.get('error_description')}")
        self.result = result


def _status(exc: BaseException) -> int | None:
    for source in (exc, getattr(exc, "response", None), exc.__cause__):
        for attribute in ("status_code", "status"):
            value = getattr(source, attribute, None)
            if isinstance(value, int):
                return value
    return None


def failure(case_id: str, error_type: str, message: str, status: int | None, elapsed: float | None) -> str:
    line = {"id": case_id, "ok": False, "error_type": error_type, "message": message[:600], "status": status}
    return json.dumps({**line, "elapsed": None if elapsed is None else round(elapsed, 3)})


def run_case(case: dict[str, Any]) -> str:
    started = time.monotonic()
    try:
        token = token_for(case["sdk"], case.get("by"), case.get("value"))
    except Exception as exc:
        return failure(case["id"], type(exc).__name__, str(exc), _status(exc), time.monotonic() - started)
    elapsed = round(time.monotonic() - started, 3)
    if token == "sentinel":
        return json.dumps({"id": case["id"], "ok": True, "sentinel": True, "elapsed": elapsed})
    payload = claims(token)
    answer = {"id": case["id"], "ok": True, "appid": payload.get("appid"), "oid": payload.get("oid")}
    return json.dumps({**answer, "mirid": payload.get("xms_mirid"), "elapsed": elapsed})


def _fork(case: dict[str, Any]) -> tuple[int, int, float]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one case, one line into the pipe, and gone without cleanup handlers
        os.close(read)
        try:
            line = run_case(case)
        except BaseException as exc:  # the parent must get a line whatever happens
            line = failure(case["id"], type(exc).__name__, str(exc), None, None)
        os.write(write, line.encode() + b"\n")
        os._exit(0)
    os.close(write)
    return pid, read, time.monotonic()


def preload() -> None:
    """What the SDKs import on first use, loaded once before the cases fork: a case's time is then the
    SDK's own work, not the interpreter's (aiohttp alone takes a good part of a second to import)."""
    from azure.core.pipeline.transport import AioHttpTransport, RequestsTransport  # noqa: F401
    from azure.identity.aio import DefaultAzureCredential as AioDefaultAzureCredential

    ManagedIdentityCredential()
    AioDefaultAzureCredential(exclude_cli_credential=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", help="a JSON list of {id, sdk, by, value}")
    parser.add_argument("--timeout", type=float, default=6.0, help="seconds before a case is stopped")
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    pending: list[dict[str, Any]] = list(json.loads(args.cases))
    preload()
    running: dict[int, tuple[int, float, dict[str, Any], bytearray]] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            case = pending.pop(0)
            pid, fd, started = _fork(case)
            running[fd] = (pid, started, case, bytearray())
        ready, _, _ = select.select(list(running), [], [], 0.05)
        for fd in ready:
            chunk = os.read(fd, 65536)
            running[fd][3].extend(chunk)
            if not chunk:
                pid, _, case, data = running.pop(fd)
                os.close(fd)
                os.waitpid(pid, 0)
                text = data.decode().strip()
                silent = failure(case["id"], "NoOutput", "the case printed nothing", None, None)
                print(text or silent, flush=True)
        now = time.monotonic()
        for fd, (pid, started, case, _) in list(running.items()):
            if now - started > args.timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(fd)
                del running[fd]
                message = f"no answer within {args.timeout:g}s (still retrying?)"
                print(failure(case["id"], "Timeout", message, None, now - started), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
