"""MSAL's HTTP side: one shared ``requests`` session, per-thread answer records, deadlines.

MSAL's result dictionaries do not carry the HTTP status or ``Retry-After``; ``HttpClient`` records
them per worker thread so the source can map Azure AD's answers faithfully.
"""

from __future__ import annotations

import email.utils
import http.cookiejar
import math
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True, slots=True)
class Answer:
    """The last HTTP answer a worker thread got: what MSAL's result does not carry."""

    status: int
    retry_after: float | None
    body: str
    """Kept only for error statuses, to read Azure AD's OAuth error when MSAL raised instead."""


@dataclass(frozen=True, slots=True)
class Reply:
    result: dict[str, Any] | None
    answer: Answer | None
    error: BaseException | None


class DeadlinePassed(Exception):
    """Raised inside a worker thread when the caller's time ran out before an HTTP call."""


class NoStore(MutableMapping[str, Any]):
    """A mapping that keeps nothing: MSAL's HTTP throttling cache, switched off (see module docstring)."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        pass

    def __delitem__(self, key: str) -> None:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def make_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    # One connect-level retry, as MSAL's own session has; POSTs are never replayed after a read error.
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(pool_size, 1), max_retries=1)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # Azure AD sets affinity cookies; in a session shared by every identity they would only mix clients.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return session


class HttpClient:
    """MSAL's ``http_client`` contract (``get``/``post``/``close``) over one shared ``requests.Session``.

    It passes the CA bundle and timeout explicitly on every call: a per-request ``verify=None`` would let
    ``REQUESTS_CA_BUNDLE`` from the environment override the session's bundle. It also records, per worker
    thread, the last answer's status and Retry-After, which MSAL's result dictionaries do not carry.
    """

    def __init__(self, session: requests.Session, *, verify: str | bool, timeout_s: float) -> None:
        self.make_session = session
        self._verify = verify
        self._timeout_s = timeout_s
        self._local = threading.local()

    def begin(self, expires_at: float) -> None:
        self._local.expires_at = expires_at
        self._local.last = None

    def last(self) -> Answer | None:
        answer: Answer | None = getattr(self._local, "last", None)
        return answer

    def attach(self, exc: BaseException) -> None:
        """Carry this thread's last answer on an exception that leaves the thread (app construction)."""
        exc.nmi_answer = self.last()  # type: ignore[attr-defined]

    @staticmethod
    def answer_of(exc: BaseException) -> Answer | None:
        answer: Answer | None = getattr(exc, "nmi_answer", None)
        return answer

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._send("GET", url, kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._send("POST", url, kwargs)

    def close(self) -> None:
        """MSAL may call this; the session belongs to the source, which closes it once."""

    def close_session(self) -> None:
        self.make_session.close()

    def _send(self, method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
        remaining = getattr(self._local, "expires_at", math.inf) - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed()
        kwargs["timeout"] = min(self._timeout_s, remaining)
        kwargs["verify"] = self._verify
        response = self.make_session.request(method, url, **kwargs)
        status = int(response.status_code)
        self._local.last = Answer(
            status=status,
            retry_after=retry_after(response.headers.get("Retry-After")),
            body=response.text if status >= 400 else "",
        )
        return response


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
