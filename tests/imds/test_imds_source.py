"""ImdsTokenSource against the IMDS stand-in on loopback: the real aiohttp client, real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from podidentity.errors import UpstreamRefused, UpstreamUnavailable
from podidentity.imds.limiter import UpstreamLimiter
from podidentity.imds.metrics import UpstreamMetrics
from podidentity.imds.settings import UpstreamSettings
from podidentity.imds.source import ImdsTokenSource, parse_token
from podidentity.model import AzureIdentity, IdentityType
from podidentity.tokens import TokenRequest
from standins.imds import ImdsStandIn

pytestmark = pytest.mark.timeout(20)

CID = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10"
RID = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/web"
SYSTEM = "5157a000-0000-4000-8000-00000000000a"
VAULT = "https://vault.azure.net"
UA = "nmi-test/1.0"
NOW = 1_800_000_000.0
IDENTITY = AzureIdentity("default", "web", IdentityType.USER_ASSIGNED_MSI, client_id=CID, resource_id=RID)
BACKOFF = (0.05, 0.1, 0.1)


class Rig:
    def __init__(self, imds: ImdsStandIn, session: aiohttp.ClientSession, **settings: object) -> None:
        self.imds = imds
        self.registry = CollectorRegistry()
        self.metrics = UpstreamMetrics(self.registry)
        self.settings = UpstreamSettings(
            metadata_ip="127.0.0.1",
            metadata_port=imds.port,
            retry_backoff_s=BACKOFF,
            **settings,  # type: ignore[arg-type]
        )
        self.limiter = UpstreamLimiter(self.settings.max_concurrent, self.settings.rate_per_s)
        self.source = ImdsTokenSource(
            self.settings, session, self.limiter, self.metrics, user_agent=UA, clock=lambda: NOW
        )

    async def fetch(self, request: TokenRequest | None = None, *, within: float = 5.0):  # type: ignore[no-untyped-def]
        req = request or TokenRequest(IDENTITY, VAULT, "2018-02-01")
        return await self.source.fetch(req, deadline=asyncio.get_running_loop().time() + within)

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
async def imds() -> AsyncIterator[ImdsStandIn]:
    server = ImdsStandIn(token_lifetime_s=3600, clock=lambda: NOW)
    server.add_identity(CID, resource_id=RID)
    server.add_identity(SYSTEM, system_assigned=True)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def rig(imds: ImdsStandIn, session: aiohttp.ClientSession) -> Rig:
    return Rig(imds, session)


def elapsed_since(start: float) -> float:
    return asyncio.get_running_loop().time() - start


async def test_success_returns_the_token_and_sends_only_what_imds_needs(rig: Rig) -> None:
    token = await rig.fetch()
    assert token.client_id == CID and token.resource == VAULT and token.token_type == "Bearer"
    assert token.access_token.count(".") == 2
    assert (token.obtained_at, token.expires_on, token.not_before) == (NOW, NOW + 3600, NOW)
    assert token.ext_expires_in == 3600
    (seen,) = rig.imds.requests
    assert seen.query == {"api-version": "2018-02-01", "resource": VAULT, "client_id": CID}
    assert seen.headers.getall("Metadata") == ["true"] and seen.headers["User-Agent"] == UA
    assert not {"X-Forwarded-For", "Forwarded", "X-Real-IP"} & set(seen.headers)
    assert rig.sample("aadpodidentity_imds_operations_duration_seconds_count",
                      operation_type="adal_token_msi_userassignedid") == 1  # fmt: skip
    assert rig.sample("nmi_upstream_in_flight") == 0


async def test_identity_client_id_is_sent_even_when_the_request_named_another(rig: Rig) -> None:
    await rig.fetch(TokenRequest(IDENTITY, VAULT, "2019-08-01", client_id="someone-else"))
    assert rig.imds.requests[0].query["client_id"] == CID
    assert rig.imds.requests[0].query["api-version"] == "2019-08-01"


async def test_pass_through_system_assigned_and_by_client_or_resource_id(rig: Rig) -> None:
    system = await rig.fetch(TokenRequest(None, VAULT, ""))
    assert system.client_id == SYSTEM
    assert rig.imds.requests[0].query == {"api-version": "2018-02-01", "resource": VAULT}
    assert (
        rig.sample("aadpodidentity_imds_operations_duration_seconds_count", operation_type="adal_token_msi")
        == 1
    )
    by_client = await rig.fetch(TokenRequest(None, VAULT, "", client_id=CID.upper()))
    by_resource = await rig.fetch(TokenRequest(None, VAULT, "", resource_id=RID))
    assert by_client.client_id == by_resource.client_id == CID
    assert rig.imds.requests[2].query["msi_res_id"] == RID and "client_id" not in rig.imds.requests[2].query


async def test_410_is_retried_once_then_succeeds(rig: Rig) -> None:
    rig.imds.fail_next(1, 410)
    token = await rig.fetch()
    assert token.client_id == CID
    assert [r.status for r in rig.imds.requests] == [410, 200]
    assert rig.sample("nmi_upstream_retries_total", reason="410") == 1


async def test_429_retry_after_is_honoured_and_pauses_the_whole_node(rig: Rig) -> None:
    rig.imds.fail_next(1, 429, retry_after=0.3)
    start = asyncio.get_running_loop().time()
    await rig.fetch()
    assert 0.29 <= elapsed_since(start) < 1.0
    assert rig.limiter.paused_until >= start + 0.29
    assert rig.sample("nmi_upstream_retries_total", reason="429") == 1


async def test_retry_after_beyond_the_deadline_gives_up_at_once_with_the_hint(rig: Rig) -> None:
    rig.imds.fail_next(1, 429, retry_after=30)
    start = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamUnavailable) as caught:
        await rig.fetch(within=2.0)
    assert elapsed_since(start) < 0.5
    assert caught.value.retry_after == 30 and "429" in caught.value.description
    assert rig.imds.count() == 1


async def test_persistent_500_exhausts_the_attempts_as_unavailable(rig: Rig) -> None:
    rig.imds.fail_next(10, 500)
    with pytest.raises(UpstreamUnavailable) as caught:
        await rig.fetch()
    assert not isinstance(caught.value, UpstreamRefused)
    assert rig.imds.count() == len(BACKOFF) + 1
    assert "500" in caught.value.description and "http" not in caught.value.description
    assert rig.sample("nmi_upstream_retries_total", reason="5xx") == len(BACKOFF)
    assert rig.sample("aadpodidentity_imds_operations_errors_count",
                      operation_type="adal_token_msi_userassignedid") == 1  # fmt: skip


async def test_identity_not_found_is_refused_without_retry_or_url(rig: Rig) -> None:
    unknown = AzureIdentity("default", "x", IdentityType.USER_ASSIGNED_MSI, client_id="not-on-this-vm")
    with pytest.raises(UpstreamRefused) as caught:
        await rig.fetch(TokenRequest(unknown, VAULT, "2018-02-01"))
    error = caught.value
    assert (error.error, error.description, error.upstream_status, error.status) == (
        "invalid_request", "Identity not found", 400, 403,
    )  # fmt: skip
    assert "http" not in error.description and "169.254" not in error.description
    assert rig.imds.count() == 1


async def test_501_is_refused_not_retried(rig: Rig) -> None:
    rig.imds.fail_next(1, 501, error="not_implemented", description="nope")
    with pytest.raises(UpstreamRefused) as caught:
        await rig.fetch()
    assert (caught.value.error, caught.value.upstream_status) == ("not_implemented", 501)
    assert rig.imds.count() == 1


async def test_slow_upstream_fails_at_the_deadline_not_after_the_retry_ladder(rig: Rig) -> None:
    rig.imds.set_delay(10)
    start = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamUnavailable) as caught:
        await rig.fetch(within=0.4)
    assert 0.35 <= elapsed_since(start) < 0.8
    assert "in time" in caught.value.description
    assert rig.sample("nmi_upstream_in_flight") == 0


async def test_per_attempt_timeout_retries_within_the_deadline(imds: ImdsStandIn, session) -> None:
    rig = Rig(imds, session, request_timeout_s=0.15)
    imds.set_delay(0.5)
    start = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamUnavailable):
        await rig.fetch(within=0.5)
    assert elapsed_since(start) < 0.8
    assert imds.count() >= 2 and rig.sample("nmi_upstream_retries_total", reason="timeout") >= 1


async def test_dropped_connections_are_retried_as_transport_errors(rig: Rig) -> None:
    rig.imds.drop_next(2)  # aiohttp itself retries one drop; the second is ours to retry
    token = await rig.fetch()
    assert token.client_id == CID
    assert rig.sample("nmi_upstream_retries_total", reason="transport") == 1


async def test_unreachable_upstream_is_unavailable_without_address(session) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = UpstreamSettings(metadata_ip="127.0.0.1", metadata_port=port, retry_backoff_s=(0.01,))
    metrics = UpstreamMetrics(CollectorRegistry())
    source = ImdsTokenSource(settings, session, UpstreamLimiter(5, 0), metrics, user_agent=UA)
    deadline = asyncio.get_running_loop().time() + 2
    with pytest.raises(UpstreamUnavailable) as caught:
        await source.fetch(TokenRequest(IDENTITY, VAULT, "2018-02-01"), deadline=deadline)
    assert "127.0.0.1" not in caught.value.description and str(port) not in caught.value.description


async def test_expired_deadline_never_calls_upstream(rig: Rig) -> None:
    with pytest.raises(UpstreamUnavailable):
        await rig.fetch(within=-0.1)
    assert rig.imds.count() == 0


async def test_a_200_without_a_token_is_refused(rig: Rig) -> None:
    rig.imds.fail_next(1, 200)  # an error-shaped body with status 200
    with pytest.raises(UpstreamRefused) as caught:
        await rig.fetch()
    assert caught.value.error == "upstream_error" and "access_token" in caught.value.description


async def test_date_formatted_expires_on_is_normalised(session) -> None:
    imds = ImdsStandIn(token_lifetime_s=3600, expires_on_format="date", clock=lambda: NOW)
    imds.add_identity(CID)
    await imds.start()
    try:
        token = await Rig(imds, session).fetch()
    finally:
        await imds.stop()
    assert token.expires_on == NOW + 3600


async def test_limiter_keeps_concurrency_under_the_imds_throttle(session) -> None:
    imds = ImdsStandIn(max_concurrent=2, clock=lambda: NOW)
    imds.add_identity(CID)
    imds.set_delay(0.05)
    await imds.start()
    try:
        rig = Rig(imds, session, max_concurrent=2, rate_per_s=0.0)
        tokens = await asyncio.gather(*(rig.fetch() for _ in range(8)))
    finally:
        await imds.stop()
    assert len(tokens) == 8 and imds.count(status=429) == 0 and imds.max_seen_concurrency == 2


@pytest.mark.parametrize(
    ("body", "expires_on"),
    [
        (b'{"access_token":"t","expires_on":1800003600,"expires_in":3600}', NOW + 3600),
        (b'{"access_token":"t","expires_on":"1800003600.0"}', NOW + 3600),
        (b'{"access_token":"t","expires_in":"120"}', NOW + 120),
        (b'{"access_token":"t","expires_on":"garbage","expires_in":60}', NOW + 60),
        (b'{"access_token":"t","expires_on":"01/15/2027 08:00:00 PM +00:00"}',
         datetime(2027, 1, 15, 20, 0, tzinfo=UTC).timestamp()),
        (b'{"access_token":"t","expires_on":"2027-01-15T20:00:00Z"}',
         datetime(2027, 1, 15, 20, 0, tzinfo=UTC).timestamp()),
    ],
)  # fmt: skip
def test_parse_token_accepts_imds_variants(body: bytes, expires_on: float) -> None:
    token = parse_token(body, now=NOW, resource=VAULT, client_id=CID)
    assert token.expires_on == expires_on
    assert (token.resource, token.client_id, token.token_type, token.not_before) == (
        VAULT,
        CID,
        "Bearer",
        NOW,
    )


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"expires_in":"60"}', b'{"access_token":"t"}', b'{"access_token":7}']
)
def test_parse_token_rejects_bodies_without_a_usable_token(body: bytes) -> None:
    from podidentity.imds.source import _BadBody

    with pytest.raises(_BadBody):
        parse_token(body, now=NOW, resource=VAULT, client_id=CID)
