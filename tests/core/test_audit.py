import logging

from nmi.logs import AuditLog, redact


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_audit_is_rate_limited_and_reports_what_it_dropped(caplog) -> None:
    clock = Clock()
    logger = logging.getLogger("test.audit")
    audit = AuditLog(2.0, logger=logger, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.audit"):
        written = [audit.record("granted", pod=f"default/p{i}") for i in range(10)]
        assert written.count(True) == 2 and audit.suppressed == 8
        clock.now += 0.5
        assert audit.record("denied", pod="default/x") is True
    records = [r for r in caplog.records if r.name == "test.audit"]
    assert [r.getMessage() for r in records] == ["granted", "granted", "denied"]
    assert records[-1].suppressed_before == 8 and audit.suppressed == 0


def test_redaction_keeps_four_characters_each_side() -> None:
    assert redact("6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10") == "6f1c##### REDACTED #####4f10"
    assert redact("short") == "##### REDACTED #####" and redact("") == ""
