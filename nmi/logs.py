"""Logging set-up (``--log-format text|json``), redaction, and the rate-limited audit trail."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from nmi.settings import LogFormat

AUDIT_LOGGER = "nmi.audit"
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def redact(client_id: str) -> str:
    """aad-pod-identity's redaction: first and last four characters kept (nmi-spec §2.5)."""
    if len(client_id) <= 8:
        return "##### REDACTED #####" if client_id else ""
    return f"{client_id[:4]}##### REDACTED #####{client_id[-4:]}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
        ]
        return f"{text} {' '.join(extras)}" if extras else text


def configure(fmt: LogFormat, level: str, *, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AuditLog:
    """One line per grant or denial, at most ``rate_per_s`` lines per second.

    A token bucket keeps the hot path to a few float operations; lines over the budget are
    counted and reported in one summary line once the budget allows, so nothing is silently lost.
    """

    __slots__ = ("_allowance", "_clock", "_last", "_logger", "_next", "_rate", "suppressed")

    def __init__(
        self,
        rate_per_s: float,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._allowance = rate_per_s
        self._clock = clock
        self._last = clock()
        self._next = 0.0
        self._logger = logger or logging.getLogger(AUDIT_LOGGER)
        self.suppressed = 0

    def record(self, decision: str, **fields: Any) -> bool:
        return self.record_fields(decision, fields)

    def record_fields(self, decision: str, fields: dict[str, Any]) -> bool:
        """Write one audit line unless over budget; ``fields`` is not modified."""
        now = self._clock()
        if now < self._next:
            # Over budget: the common case under load, so it costs one comparison.
            self.suppressed += 1
            return False
        self._allowance = min(self._rate, self._allowance + (now - self._last) * self._rate)
        self._last = now
        if self._allowance < 1.0:
            self._next = now + (1.0 - self._allowance) / self._rate
            self.suppressed += 1
            return False
        self._allowance -= 1.0
        if not self._logger.isEnabledFor(logging.INFO):
            return False
        if self.suppressed:
            # Carried on the next line that gets through, so a flood adds no lines of its own.
            self._logger.info(decision, extra={**fields, "suppressed_before": self.suppressed})
            self.suppressed = 0
        else:
            self._logger.info(decision, extra=fields)
        return True
