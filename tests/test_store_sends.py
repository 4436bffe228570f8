"""Migration 7 (sends, suppressions) and the store's sending bookkeeping: one intent per email, a retryable row
taken by one sender only, suppressions unique per address."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect, text

from store import migrate, session_scope
from store.models import Send, SendStatus, Suppression
from store.sends import add_suppression, claim_send, mailbox_usage, record_answer, suppressed
from tests.mail_fixtures import SENDER, make_campaign

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def test_migration_7_spells_the_tables_the_models_read(engine):
    for table, model in (("sends", Send), ("suppressions", Suppression)):
        columns = {c["name"] for c in inspect(engine).get_columns(table)}
        assert columns == set(model.__table__.columns.keys())  # type: ignore[attr-defined]
    with engine.begin() as conn:  # a store from before migration 7
        conn.execute(text("DROP TABLE sends"))
        conn.execute(text("DROP TABLE suppressions"))
        conn.execute(text("DELETE FROM schema_migrations WHERE version = 7"))
    assert migrate(engine) == [7]
    assert {"sends", "suppressions"} <= set(inspect(engine).get_table_names())
    assert migrate(engine) == []


def test_an_email_is_claimed_once_and_a_deferred_one_by_one_sender(engine):
    (email_id, to, message_id), = make_campaign(engine, n=1)
    args = {"email_id": email_id, "message_id": message_id, "mailbox": SENDER.upper(), "recipient": to, "now": NOW}
    first = claim_send(engine, retryable=[SendStatus.DEFERRED], **args)
    assert first is not None and first.status == "sending" and first.mailbox == SENDER
    assert claim_send(engine, retryable=[SendStatus.DEFERRED], **args) is None  # in flight: not taken again
    assert first.id is not None
    record_answer(engine, first.id, status=SendStatus.DEFERRED, code=450, answer="busy", now=NOW)
    again = claim_send(engine, retryable=[SendStatus.DEFERRED], **args)
    assert again is not None and again.attempts == 2
    assert claim_send(engine, retryable=[SendStatus.DEFERRED], **args) is None
    assert mailbox_usage(engine, SENDER, NOW).handed_over == 1


def test_suppressions_are_unique_per_address_and_need_a_known_reason(engine):
    with session_scope(engine) as s:
        assert add_suppression(s, "Ann@Acme.example ", "opt_out", "cli") is True
        assert add_suppression(s, "ann@acme.example", "bounce", "x.mbox:3") is False
    assert suppressed(engine, ["ANN@acme.example", "bob@acme.example"]) == {"ann@acme.example": "opt_out"}
    with pytest.raises(ValueError, match="suppression reason 'spam'"), session_scope(engine) as s:
        add_suppression(s, "c@acme.example", "spam", "cli")
