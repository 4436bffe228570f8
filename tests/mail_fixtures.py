"""A real SMTP server on loopback (aiosmtpd) that records what it receives and can refuse, stall or drop per
recipient, and a store with a campaign of valid emails, for the sending and mail-event tests."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import Engine

from store import Campaign, EmailRecord, Prospect, Run, session_scope
from store.exports import new_message_id
from store.models import RunStatus

SENDER = "dana@ledgerline.example"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Recorder:
    """aiosmtpd handler: ``received`` holds each accepted message (parsed), ``rcpts`` every RCPT TO seen.

    ``rcpt_rules`` maps an address to a reply (``"450 4.2.1 Mailbox busy"``) or ``"drop"`` (close the
    connection); ``hold_at`` (1-based) makes that message's DATA wait, after it is recorded, until ``release``
    is set; ``data_delay_s`` delays every DATA answer (a server that times out).
    """

    rcpt_rules: dict[str, str] = field(default_factory=dict)
    hold_at: int | None = None
    data_delay_s: float = 0.0
    received: list[EmailMessage] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        self.rcpts.append(address)
        rule = self.rcpt_rules.get(address)
        if rule == "drop":
            server.transport.close()
            return "421 4.4.2 closing"
        if rule:
            return rule
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.raw.append(envelope.original_content or envelope.content)
        parsed = message_from_bytes(self.raw[-1], policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append(parsed)
        if self.hold_at is not None and len(self.received) == self.hold_at:
            self.held.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        if self.data_delay_s:
            await asyncio.sleep(self.data_delay_s)
        return "250 2.0.0 Ok: queued"

    def message_ids(self) -> list[str]:
        return [str(m["Message-ID"]) for m in self.received]


@pytest.fixture
def smtp() -> Iterator[tuple[Recorder, int]]:
    """A running loopback SMTP server: ``(recorder, port)``."""
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    try:
        yield recorder, port
    finally:
        recorder.release.set()
        controller.stop()


def make_campaign(engine: Engine, name: str = "q4", n: int = 3, *, sender: str = SENDER, arm: str = "teacher",
                  invalid: int = 0, recipients: list[str] | None = None) -> list[tuple[int, str, str]]:
    """A campaign with ``n`` valid emails (and ``invalid`` invalid ones) written straight into the store.

    Returns:
        ``[(email_id, recipient, message_id)]`` of the valid emails, in order.
    """
    out = []
    offer = {"sender_name": "Dana Whitfield", "sender_company": "Ledgerline", "sender_email": sender,
             "product": "Ledgerline", "value_proposition": "closes books faster", "call_to_action": "A call?",
             "opt_out_line": "If this isn't relevant, just reply 'no thanks' and I won't write again."}
    with session_scope(engine) as s:
        campaign = Campaign(name=name, offer=offer)
        s.add(campaign)
        s.flush()
        for i in range(n + invalid):
            address = recipients[i] if recipients and i < len(recipients) else f"person{i}@company{i}.example"
            prospect = Prospect(campaign_id=campaign.id or 0, row_number=i + 2, first_name=f"P{i}", last_name="Doe",
                                email=address, company=f"Company {i}", website=f"https://company{i}.example")
            s.add(prospect)
            s.flush()
            run = Run(campaign_id=campaign.id or 0, prospect_id=prospect.id or 0, status=RunStatus.DONE, arm=arm)
            s.add(run)
            s.flush()
            message_id = new_message_id(sender)
            valid = i < n
            record = EmailRecord(run_id=run.id or 0, subject_template="Hello", body_template="Hi {{first_name}}",
                                 subject=f"Hello P{i}", body=f"Hi P{i},\nshort note {i}.\n.\nA line with a dot.",
                                 valid=valid, message_id=message_id)
            s.add(record)
            s.flush()
            if valid:
                out.append((record.id or 0, address, message_id))
    return out
