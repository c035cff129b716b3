"""Reading Azure AD's answers as MSAL hands them over: a token, a throttle, or an NMI error.

Refusals keep Azure AD's ``error`` and the first line of its description (the AADSTS code and
text), never trace IDs or credential material.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import requests

from nmi.logs import redact as redact_id
from nmi.tokens.aad_http import Answer, DeadlinePassed, Reply
from nmi.tokens.credentials import CredentialError
from podidentity.errors import ServiceError, UpstreamRefused, UpstreamUnavailable
from podidentity.model import AzureIdentity
from podidentity.tokens import Token, number

log = logging.getLogger("nmi.tokens.msal_source")

DEFAULT_RETRY_AFTER_S = 5.0
_DESCRIPTION_MAX = 400
_ERROR_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_GUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")


@dataclass(frozen=True, slots=True)
class Throttled:
    retry_after: float


def interpret(reply: Reply, redact: tuple[str, ...]) -> dict[str, Any] | Throttled:
    """A token response, a throttle to wait out, or raise the NMI error that describes the failure."""
    answer = reply.answer
    if reply.error is not None and _transport_failure(reply.error):
        raise failure(reply.error, None, redact)  # Any recorded answer is from an earlier call.
    if answer is not None and answer.status == 429:
        return Throttled(answer.retry_after if answer.retry_after is not None else DEFAULT_RETRY_AFTER_S)
    if reply.error is not None:
        raise failure(reply.error, answer, redact)
    result = reply.result or {}
    if answer is not None and answer.status >= 500:
        raise UpstreamUnavailable(f"Azure AD answered HTTP {answer.status}", retry_after=answer.retry_after)
    if "access_token" in result:
        return result
    raise _refusal(result, answer.status if answer is not None else None, redact)


def _transport_failure(exc: BaseException) -> bool:
    return isinstance(exc, DeadlinePassed | requests.RequestException | OSError)


def failure(exc: BaseException, answer: Answer | None, redact: tuple[str, ...]) -> ServiceError:
    if isinstance(exc, DeadlinePassed | requests.Timeout):
        return UpstreamUnavailable("Azure AD did not answer in time")
    if isinstance(exc, requests.RequestException | OSError):
        return UpstreamUnavailable(f"Azure AD is unreachable ({type(exc).__name__})")
    if isinstance(exc, CredentialError):
        return UpstreamUnavailable(str(exc))
    if answer is not None and answer.status == 429:
        retry_after = answer.retry_after if answer.retry_after is not None else DEFAULT_RETRY_AFTER_S
        return UpstreamUnavailable("Azure AD is throttling requests (429)", retry_after=retry_after)
    if answer is not None and answer.status >= 500:
        return UpstreamUnavailable(f"Azure AD answered HTTP {answer.status}", retry_after=answer.retry_after)
    if answer is not None and answer.status >= 400:
        # MSAL raised on an error answer (authority discovery, or a body that is not JSON): read it ourselves.
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            return _refusal(body, answer.status, redact)
        return UpstreamRefused(
            "invalid_response",
            f"Azure AD answered HTTP {answer.status} without an OAuth error",
            upstream_status=answer.status,
        )
    log.warning("Azure AD token request failed: %s", type(exc).__name__, exc_info=exc)
    return UpstreamUnavailable(f"Azure AD token request failed ({type(exc).__name__})")


def _refusal(body: dict[str, Any], status: int | None, redact: tuple[str, ...]) -> UpstreamRefused:
    error = body.get("error")
    error = error if isinstance(error, str) and _ERROR_RE.match(error) else "invalid_response"
    if status is None:
        status = 401 if error == "invalid_client" else 400
    return UpstreamRefused(error, _short_description(body, redact), upstream_status=status)


def _short_description(body: dict[str, Any], redact: tuple[str, ...]) -> str:
    """The AADSTS code and the first line of Azure AD's text: no trace/correlation IDs, no timestamps."""
    raw = body.get("error_description")
    text = raw.strip().splitlines()[0].strip() if isinstance(raw, str) and raw.strip() else ""
    codes = body.get("error_codes")
    if not text.startswith("AADSTS") and isinstance(codes, list) and codes and isinstance(codes[0], int):
        text = f"AADSTS{codes[0]}: {text}".rstrip(": ")
    for needle in redact:
        if len(needle) >= 4:
            text = text.replace(needle, "[redacted]")
    # Azure AD quotes application and tenant IDs; they reach bodies and audit lines redacted, as the
    # client IDs NMI writes itself are (nmi-spec §9.24).
    text = _GUID.sub(lambda m: redact_id(m.group()), text)
    if len(text) > _DESCRIPTION_MAX:
        text = text[: _DESCRIPTION_MAX - 3] + "..."
    return text or "Azure AD refused the token request"


def to_token(result: dict[str, Any], identity: AzureIdentity, resource: str, now: float) -> Token:
    access_token = result.get("access_token")
    expires_in = _seconds(result.get("expires_in"))
    if not isinstance(access_token, str) or not access_token or expires_in is None:
        raise UpstreamUnavailable("Azure AD returned an unusable token response")
    ext = _seconds(result.get("ext_expires_in"))
    token_type = result.get("token_type")
    return Token(
        access_token=access_token,
        resource=resource,
        token_type=token_type if isinstance(token_type, str) and token_type else "Bearer",
        client_id=identity.client_id,
        expires_on=now + expires_in,
        not_before=now,
        obtained_at=now,
        ext_expires_in=int(ext) if ext is not None else None,
    )


def _seconds(value: object) -> float | None:
    """Azure AD v2 sends integers; v1 and some clouds send strings. Anything else is unusable."""
    seconds = number(value)
    return seconds if seconds is not None and seconds >= 0 else None
