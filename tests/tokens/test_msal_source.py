"""MsalTokenSource: the real msal against the Azure AD stand-in over TLS on loopback.

MSAL is not patched: it is pointed at the stand-in as at a private cloud (``spec.adEndpoint``), and trusts it
through the CA bundle given to the source.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nmi.metrics import Metrics
from nmi.tokens.msal_source import MsalTokenSource, resource_to_scope
from podidentity.errors import BadRequest, UpstreamRefused, UpstreamUnavailable
from podidentity.model import AzureIdentity, IdentityType, Secret, SecretRef
from podidentity.tokens import TokenRequest
from standins.aad import AadStandin, ClientCertificate, issue_client_certificate

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
AUX_TENANT = "aux-tenant-0001"
CLIENT = "8d7a1b2c-0000-4000-8000-00000000c1e7"
SECRET = "Xy9~p.Q2-correct-horse-battery"
RESOURCE = "https://management.azure.com/"
NOW = 1_700_000_000.0


class Secrets:
    """The injected secret reader: an in-memory store that counts reads and can fail."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict[str, bytes]] = {}
        self.reads = 0
        self.fail: Exception | None = None

    def put(self, ns: str, name: str, **data: bytes) -> None:
        self.data[(ns, name)] = data

    async def __call__(self, ns: str, name: str) -> Secret:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return Secret(ns, name, self.data[(ns, name)])


@pytest.fixture(scope="module")
def rsa_cert() -> ClientCertificate:
    return issue_client_certificate(key_type="RSA", password=b"pfx-pass", with_chain=True)


@pytest.fixture(scope="module")
def ec_cert() -> ClientCertificate:
    return issue_client_certificate(key_type="EC", with_chain=True, leaf_first=False)


@pytest.fixture
async def aad() -> AsyncIterator[AadStandin]:
    async with AadStandin() as standin:
        yield standin


@pytest.fixture
def ca_bundle(aad: AadStandin, tmp_path: Path) -> str:
    return aad.write_ca_bundle(tmp_path / "aad-ca.pem")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def secrets() -> Secrets:
    store = Secrets()
    store.put("apps", "sp-secret", clientSecret=SECRET.encode())
    return store


@pytest.fixture
def changed() -> list[AzureIdentity]:
    return []


@pytest.fixture
def source(
    secrets: Secrets, registry: CollectorRegistry, ca_bundle: str, changed: list[AzureIdentity]
) -> Iterator[MsalTokenSource]:
    src = MsalTokenSource(
        secrets,
        Metrics(registry),
        ca_bundle=ca_bundle,
        clock=lambda: NOW,
        http_timeout_s=5.0,
        on_credentials_changed=changed.append,
    )
    yield src
    src.close()


def identity(
    aad: AadStandin,
    *,
    type_: IdentityType = IdentityType.SERVICE_PRINCIPAL,
    client_id: str = CLIENT,
    secret_name: str = "sp-secret",
    secret_ns: str = "apps",
    tenant: str = TENANT,
    aux: tuple[str, ...] = (),
) -> AzureIdentity:
    return AzureIdentity(
        namespace="apps",
        name=f"sp-{secret_name}",
        type=type_,
        client_id=client_id,
        tenant_id=tenant,
        auxiliary_tenant_ids=aux,
        ad_endpoint=aad.url,
        client_password=SecretRef(secret_ns, secret_name),
    )


async def fetch(
    source: MsalTokenSource, ident: AzureIdentity, *, budget_s: float = 5.0, tenant_id: str | None = None
):
    deadline = asyncio.get_running_loop().time() + budget_s
    return await source.fetch(
        TokenRequest(ident, RESOURCE, "2018-02-01"), deadline=deadline, tenant_id=tenant_id
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- success


async def test_client_secret_token(
    aad: AadStandin, source: MsalTokenSource, registry: CollectorRegistry
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    token = await fetch(source, identity(aad))
    assert token.client_id == CLIENT
    assert token.resource == RESOURCE
    assert token.token_type == "Bearer"
    assert token.obtained_at == token.not_before == NOW
    assert token.expires_on == NOW + 3599
    assert token.ext_expires_in == 3599
    claims = aad.verify_access_token(token.access_token)
    assert claims["aud"] == "https://management.azure.com" and claims["tid"] == TENANT
    (call,) = aad.calls
    assert (call.method, call.scope, call.status) == ("secret", "https://management.azure.com/.default", 200)
    count = "aadpodidentity_imds_operations_duration_seconds_count"
    assert sample(registry, count, operation_type="adal_token") == 1


@pytest.mark.parametrize("key_type", ["RSA", "EC"])
async def test_certificate_token_from_pfx_with_chain(
    key_type: str,
    aad: AadStandin,
    source: MsalTokenSource,
    secrets: Secrets,
    rsa_cert: ClientCertificate,
    ec_cert: ClientCertificate,
) -> None:
    cert = rsa_cert if key_type == "RSA" else ec_cert
    aad.register_app(TENANT, CLIENT, certificate_pem=cert.leaf_pem)
    secrets.put("apps", "sp-cert", certificate=cert.pfx, password=cert.password)
    ident = identity(aad, type_=IdentityType.SERVICE_PRINCIPAL_CERTIFICATE, secret_name="sp-cert")
    token = await fetch(source, ident)
    assert aad.verify_access_token(token.access_token)["appidacr"] == "2"
    (call,) = aad.calls
    assert call.method == "assertion"
    assert call.algorithm == ("PS256" if key_type == "RSA" else "ES256")


async def test_every_fetch_reaches_azure_ad(aad: AadStandin, source: MsalTokenSource) -> None:
    """MSAL's token cache is bypassed: the NMI cache in front decides when to refresh."""
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    first = await fetch(source, identity(aad))
    second = await fetch(source, identity(aad))
    assert aad.token_call_count(CLIENT) == 2
    assert first.access_token != second.access_token
    assert aad.discovery_calls == 1  # One MSAL application, reused.


async def test_concurrent_first_fetches_share_one_application(
    aad: AadStandin, source: MsalTokenSource
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    aad.delay_s = 0.1
    tokens = await asyncio.gather(*(fetch(source, identity(aad)) for _ in range(5)))
    assert len({t.access_token for t in tokens}) == 5
    assert aad.discovery_calls == 1


# ---------------------------------------------------------------- refusals


async def test_wrong_secret_is_refused_without_leaking_it(
    aad: AadStandin, source: MsalTokenSource, secrets: Secrets, registry: CollectorRegistry
) -> None:
    aad.register_app(TENANT, CLIENT, secret="the-registered-one")
    with pytest.raises(UpstreamRefused) as err:
        await fetch(source, identity(aad))
    exc = err.value
    assert exc.status == 403
    assert exc.error == "invalid_client"
    assert exc.upstream_status == 401
    assert exc.description.startswith("AADSTS7000215: Invalid client secret provided.")
    assert "Trace ID" not in exc.description and "\n" not in exc.description
    for text in (str(exc), exc.description, repr(exc), repr(exc.args)):
        assert SECRET not in text
    errors = "aadpodidentity_imds_operations_errors_count"
    assert sample(registry, errors, operation_type="adal_token") == 1


async def test_unknown_application(aad: AadStandin, source: MsalTokenSource) -> None:
    aad.add_tenant(TENANT)
    with pytest.raises(UpstreamRefused) as err:
        await fetch(source, identity(aad))
    assert (err.value.error, err.value.upstream_status) == ("unauthorized_client", 400)
    assert err.value.description.startswith("AADSTS700016: Application with identifier")


async def test_disabled_application(aad: AadStandin, source: MsalTokenSource) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET, enabled=False)
    with pytest.raises(UpstreamRefused, match="AADSTS7000112"):
        await fetch(source, identity(aad))


async def test_unknown_tenant_fails_discovery_as_a_refusal(aad: AadStandin, source: MsalTokenSource) -> None:
    with pytest.raises(UpstreamRefused) as err:
        await fetch(source, identity(aad, tenant="no-such-tenant"))
    assert (err.value.error, err.value.upstream_status) == ("invalid_tenant", 400)
    assert err.value.description.startswith("AADSTS90002: Tenant 'no-such-tenant' not found.")


# ---------------------------------------------------------------- rotation


async def test_rotated_secret_switches_credentials_and_fires_the_hook(
    aad: AadStandin, source: MsalTokenSource, secrets: Secrets, changed: list[AzureIdentity]
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    ident = identity(aad)
    await fetch(source, ident)
    assert changed == []
    # Azure AD accepts only the new secret; until the Kubernetes secret follows, tokens are refused.
    aad.rotate_secret(TENANT, CLIENT, "rotated-secret-value")
    with pytest.raises(UpstreamRefused, match="AADSTS7000215"):
        await fetch(source, ident)
    assert changed == []
    secrets.put("apps", "sp-secret", clientSecret=b"rotated-secret-value")
    token = await fetch(source, ident)
    assert changed == [ident]
    assert aad.calls[-1].status == 200 and token.access_token
    assert aad.discovery_calls == 2  # The old application was dropped, a new one built.
    await fetch(source, ident)
    assert changed == [ident]  # Same material again: no second notification.


# ------------------------------------------------------------ availability


async def test_azure_ad_down_is_unavailable_then_recovers(aad: AadStandin, source: MsalTokenSource) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    await fetch(source, identity(aad))  # A kept-alive connection exists from here on.
    await aad.go_down()
    for _ in range(2):  # The reset kept-alive connection, then a refused new one.
        with pytest.raises(UpstreamUnavailable, match="unreachable"):
            await fetch(source, identity(aad))
    await aad.come_up()
    assert (await fetch(source, identity(aad))).access_token


async def test_down_before_discovery_is_unavailable(aad: AadStandin, source: MsalTokenSource) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    await aad.go_down()
    with pytest.raises(UpstreamUnavailable):
        await fetch(source, identity(aad))


async def test_server_error_is_unavailable_and_not_replayed(aad: AadStandin, source: MsalTokenSource) -> None:
    """MSAL's HTTP cache would replay a 500 for 5 s; it is off, so the next call reaches Azure AD."""
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    aad.fail_next(kind="server_error")
    with pytest.raises(UpstreamUnavailable, match="HTTP 500"):
        await fetch(source, identity(aad))
    assert (await fetch(source, identity(aad))).access_token
    assert aad.token_call_count(CLIENT) == 2


async def test_throttled_request_is_retried_after_retry_after(
    aad: AadStandin, source: MsalTokenSource, registry: CollectorRegistry
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    await fetch(source, identity(aad))
    aad.fail_next(kind="throttle", retry_after=1)
    started = time.monotonic()
    token = await fetch(source, identity(aad), budget_s=5.0)
    assert time.monotonic() - started >= 1.0
    assert token.access_token
    assert aad.token_call_count(CLIENT) == 3
    assert sample(registry, "nmi_upstream_retries_total", reason="throttled") == 1


async def test_throttle_longer_than_the_deadline_is_unavailable_with_retry_after(
    aad: AadStandin, source: MsalTokenSource
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    aad.fail_next(kind="throttle", retry_after=30)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as err:
        await fetch(source, identity(aad), budget_s=2.0)
    assert err.value.retry_after == 30
    assert time.monotonic() - started < 1.5
    assert aad.token_call_count(CLIENT) == 1


async def test_deadline_bounds_a_slow_azure_ad(aad: AadStandin, source: MsalTokenSource) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    await fetch(source, identity(aad))
    aad.delay_s = 2.0
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="in time"):
        await fetch(source, identity(aad), budget_s=0.3)
    assert time.monotonic() - started < 0.6


async def test_queued_calls_of_departed_callers_never_reach_azure_ad(
    aad: AadStandin, secrets: Secrets, ca_bundle: str
) -> None:
    """With every worker busy, a call whose caller timed out or was cancelled is dropped, not sent late."""
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    src = MsalTokenSource(secrets, Metrics(CollectorRegistry()), ca_bundle=ca_bundle, executor_workers=1)
    try:
        await fetch(src, identity(aad))
        aad.delay_s = 0.5
        busy = asyncio.create_task(fetch(src, identity(aad), budget_s=3.0))
        await asyncio.sleep(0.05)
        cancelled = asyncio.create_task(fetch(src, identity(aad), budget_s=3.0))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(UpstreamUnavailable, match="in time"):
            await fetch(src, identity(aad), budget_s=0.2)
        assert (await busy).access_token
        await asyncio.sleep(0.3)  # Room for a wrongly started call to reach the stand-in.
        assert aad.token_call_count(CLIENT) == 2
        assert cancelled.cancelled()
    finally:
        src.close()


@pytest.mark.parametrize("credential", ["secret", "EC certificate", "RSA certificate"])
async def test_msal_never_blocks_the_event_loop(
    credential: str,
    aad: AadStandin,
    source: MsalTokenSource,
    secrets: Secrets,
    rsa_cert: ClientCertificate,
    ec_cert: ClientCertificate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While MSAL waits on a slow Azure AD, the loop keeps its heartbeat and runs no slow callback."""
    ident = identity(aad)
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    if credential != "secret":
        cert = rsa_cert if credential == "RSA certificate" else ec_cert
        aad.register_app(TENANT, CLIENT, certificate_pem=cert.leaf_pem)
        secrets.put("apps", "sp-cert", certificate=cert.pfx, password=cert.password)
        ident = identity(aad, type_=IdentityType.SERVICE_PRINCIPAL_CERTIFICATE, secret_name="sp-cert")
    if credential == "RSA certificate":
        # Decoding an RSA PKCS#12 holds the GIL ~40 ms once per new credential (documented in the source);
        # what is measured below is every later token: signing and MSAL's waits on the network.
        await fetch(source, ident)
    aad.delay_s = 0.5
    # A full collection of the whole test session's heap can pause every thread for tens of ms: move what
    # exists so far out of the collector's reach, so that only this code's own stalls are measured.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    caplog.set_level(logging.WARNING, logger="asyncio")
    beats: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        # Wall time and the process's CPU time per beat. On a busy machine the OS may deschedule the whole
        # process for tens of ms: wall time passes, CPU time does not. A stall caused by this process (work
        # on the loop, or a worker thread holding the GIL) burns CPU for as long as it lasts.
        last_wall, last_cpu = time.perf_counter(), time.process_time()
        while not done.is_set():
            await asyncio.sleep(0.005)
            wall, cpu = time.perf_counter(), time.process_time()
            beats.append((wall - last_wall, cpu - last_cpu))
            last_wall, last_cpu = wall, cpu

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.03)  # Beating already: a stall right at the start of the fetch is measured too.
    try:
        started = time.perf_counter()
        token = await fetch(source, ident, budget_s=5.0)
        elapsed = time.perf_counter() - started
    finally:
        done.set()
        await beat
        loop.set_debug(False)
        gc.unfreeze()
    assert token.access_token
    assert elapsed >= 0.5  # The heartbeat ran across real waits on the slow stand-in.
    assert len(beats) > 30
    busy_stalls = [(round(w * 1000), round(c * 1000)) for w, c in beats if w > 0.03 and c > 0.03]
    assert not busy_stalls, f"event loop stalled by this process, (wall ms, cpu ms): {busy_stalls}"
    slow = [r.getMessage() for r in caplog.records if "Executing" in r.getMessage()]
    assert not slow, slow


# ------------------------------------------------------------ secret access


async def test_secret_read_failure_is_unavailable_and_counted(
    aad: AadStandin, source: MsalTokenSource, secrets: Secrets, registry: CollectorRegistry
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    secrets.fail = RuntimeError('secrets "sp-secret" is forbidden')
    with pytest.raises(
        UpstreamUnavailable, match=r"failed to get Kubernetes secret apps/sp-secret: .*forbidden"
    ):
        await fetch(source, identity(aad))
    kube = "aadpodidentity_kubernetes_api_operations_errors_count"
    assert sample(registry, kube, operation_type="get_secret") == 1
    assert aad.token_call_count() == 0


async def test_cross_namespace_secret_is_refused_before_reading(
    aad: AadStandin, source: MsalTokenSource, secrets: Secrets
) -> None:
    secrets.put("kube-system", "sp-secret", clientSecret=SECRET.encode())
    with pytest.raises(UpstreamUnavailable, match="outside the identity's namespace"):
        await fetch(source, identity(aad, secret_ns="kube-system"))
    assert secrets.reads == 0


async def test_cross_namespace_secret_when_allowed(aad: AadStandin, secrets: Secrets, ca_bundle: str) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    secrets.put("kube-system", "sp-secret", clientSecret=SECRET.encode())
    src = MsalTokenSource(
        secrets, Metrics(CollectorRegistry()), ca_bundle=ca_bundle, allow_cross_namespace_secrets=True
    )
    try:
        assert (await fetch(src, identity(aad, secret_ns="kube-system"))).access_token
    finally:
        src.close()


async def test_ambiguous_secret_is_unavailable_with_keys_listed(
    aad: AadStandin, source: MsalTokenSource, secrets: Secrets
) -> None:
    secrets.put("apps", "sp-secret", a=SECRET.encode(), b=b"other")
    with pytest.raises(UpstreamUnavailable, match=r"several keys \(a, b\)") as err:
        await fetch(source, identity(aad))
    assert SECRET not in str(err.value)
    assert aad.token_call_count() == 0


# --------------------------------------------------------- tenants, misc


async def test_auxiliary_tenant_on_request(aad: AadStandin, source: MsalTokenSource) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    aad.register_app(AUX_TENANT, CLIENT, secret=SECRET)
    ident = identity(aad, aux=(AUX_TENANT,))
    primary = await fetch(source, ident)
    aux = await fetch(source, ident, tenant_id=AUX_TENANT.upper())
    assert aad.verify_access_token(primary.access_token)["tid"] == TENANT
    assert aad.verify_access_token(aux.access_token)["tid"] == AUX_TENANT
    with pytest.raises(BadRequest, match="not among the identity's auxiliaryTenantIDs"):
        await fetch(source, ident, tenant_id="someone-else")


async def test_user_assigned_identity_is_not_served(aad: AadStandin, source: MsalTokenSource) -> None:
    with pytest.raises(UpstreamUnavailable, match="unsupported identity type 0"):
        await fetch(source, identity(aad, type_=IdentityType.USER_ASSIGNED_MSI))


async def test_http_authority_is_refused(aad: AadStandin, source: MsalTokenSource) -> None:
    ident = identity(aad)
    plain = AzureIdentity(
        **{**{f: getattr(ident, f) for f in ident.__slots__}, "ad_endpoint": "http://aad.local/"}
    )
    with pytest.raises(UpstreamUnavailable, match="must be an https URL"):
        await fetch(source, plain)


async def test_closed_source_refuses(aad: AadStandin, source: MsalTokenSource) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    source.close()
    with pytest.raises(UpstreamUnavailable, match="shut down"):
        await fetch(source, identity(aad))


async def test_close_during_a_queued_fetch_is_unavailable_not_cancelled(
    aad: AadStandin, secrets: Secrets, ca_bundle: str
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    src = MsalTokenSource(secrets, Metrics(CollectorRegistry()), ca_bundle=ca_bundle, executor_workers=1)
    await fetch(src, identity(aad))
    aad.delay_s = 0.3
    busy = asyncio.create_task(fetch(src, identity(aad)))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(fetch(src, identity(aad)))
    await asyncio.sleep(0.05)
    src.close()
    with pytest.raises(UpstreamUnavailable, match="shut down"):
        await queued
    assert (await busy).access_token  # The running call finishes; its result is still delivered.


async def test_forget_drops_the_identity(
    aad: AadStandin, source: MsalTokenSource, secrets: Secrets, changed: list[AzureIdentity]
) -> None:
    aad.register_app(TENANT, CLIENT, secret=SECRET)
    ident = identity(aad)
    await fetch(source, ident)
    source.forget(ident)
    aad.rotate_secret(TENANT, CLIENT, "after-forget")
    secrets.put("apps", "sp-secret", clientSecret=b"after-forget")
    await fetch(source, ident)
    assert changed == []  # Forgotten: the next secret is a first sighting, not a rotation.
    assert aad.discovery_calls == 2


@pytest.mark.parametrize(
    ("resource", "scope"),
    [
        ("https://management.azure.com/", "https://management.azure.com/.default"),
        ("https://management.azure.com", "https://management.azure.com/.default"),
        ("https://vault.azure.net", "https://vault.azure.net/.default"),
        ("api://my-app", "api://my-app/.default"),
        ("https://graph.microsoft.com/.default", "https://graph.microsoft.com/.default"),
    ],
)
def test_resource_to_scope(resource: str, scope: str) -> None:
    assert resource_to_scope(resource) == scope
