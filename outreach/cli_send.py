"""``outreach send``, ``outreach events import-mail`` and ``outreach suppressions``: sending a campaign over SMTP,
reading bounces and replies back, and the list of addresses never emailed. Registered by ``outreach.cli``; the
rules are in ``outreach.sending``, ``outreach.mail_import``, ``tools.mail`` and ``tools.mailbox_events``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from outreach.cli_common import ConfigOpt, StoreOpt, err, open_engine, settings_or_exit

if TYPE_CHECKING:
    from outreach.sending import SendPolicy, SendReport
    from outreach.settings import Settings
    from tools.mail import SmtpServer

__all__ = ["events_app", "send_command", "suppressions_app"]

console = Console()

events_app = typer.Typer(help="Engagement events: read bounces and replies back from the mail server.")
suppressions_app = typer.Typer(help="Addresses that are never emailed (opt-outs, bounces, unsubscribes, complaints).")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]{escape(message)}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _server(settings: Settings) -> SmtpServer:
    from miniatures.redaction import register_secret
    from tools.mail import SmtpServer

    mail = settings.mail
    password = mail.password.get_secret_value()
    register_secret(password)
    return SmtpServer(host=mail.host, port=mail.port, security=mail.security, username=mail.username,
                      password=password, timeout_s=mail.timeout_s)


def _policy(settings: Settings, *, resend_unknown: bool, limit: int | None) -> SendPolicy:
    from outreach.sending import MailboxLimits, SendPolicy

    mail = settings.mail
    return SendPolicy(daily_cap=mail.daily_cap, pace_s=mail.pace_s, max_attempts=mail.max_attempts,
                      retry_after_s=mail.retry_after_s, resend_unknown=resend_unknown, limit=limit,
                      unsubscribe_mailto=mail.unsubscribe_mailto, unsubscribe_url=mail.unsubscribe_url,
                      mailboxes={k.strip().lower(): MailboxLimits(v.daily_cap, v.pace_s)
                                 for k, v in mail.mailboxes.items()})


def _print_report(report: SendReport) -> None:
    from outreach.sending import SKIPPED

    title = f"campaign {report.campaign}: {'dry run, nothing sent' if report.dry_run else 'sent over SMTP'}"
    table = Table(title=title)
    table.add_column("status")
    table.add_column("emails", justify="right")
    table.add_column("meaning")
    meanings = {"sent": "accepted by the server", "failed": "refused for good (5xx, or too many 4xx)",
                "deferred": "refused for now (4xx) or connection lost before DATA: a later run retries",
                "unknown": "no answer after DATA: may be delivered; not resent without --resend-unknown", **SKIPPED}
    for status, n in sorted(report.counts.items(), key=lambda kv: -kv[1]):
        table.add_row(status, str(n), meanings.get(status, ""))
    console.print(table)
    for item in [i for i in report.items if i.status in ("failed", "deferred", "unknown", "unusable")][:20]:
        err.print(f"{item.status} email {item.email_id} to {item.to}: {item.code or ''} {item.text}".replace("  ", " "),
                  markup=False, highlight=False, soft_wrap=True)


def send_command(
    campaign: Annotated[str, typer.Option("--campaign", help="The campaign whose valid emails are sent.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; connect to nothing, "
                                                            "write nothing.")] = False,
    resend_unknown: Annotated[bool, typer.Option(
        help="Also send emails whose earlier attempt got no answer (a crash, or a connection lost during DATA): "
             "the server may have delivered them, so check its log or the sent folder first.")] = False,
    limit: Annotated[int | None, typer.Option(min=0, help="Send at most this many emails now.")] = None,
    daily_cap: Annotated[int | None, typer.Option(min=0, help="Messages per mailbox in any 24 hours "
                                                              "(setting mail.daily_cap).")] = None,
    pace: Annotated[float | None, typer.Option(min=0, help="Seconds between two messages of one mailbox "
                                                           "(setting mail.pace_s).")] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Send a campaign's valid emails over SMTP, each at most once.

    The server, port, security (`starttls`, `tls`, `none`) and limits come from `[mail]` in the settings; the user
    and password from `$OUTREACH_MAIL__USERNAME` and `$OUTREACH_MAIL__PASSWORD`. Each message carries the store's
    Message-ID and a List-Unsubscribe header; addresses on the suppression list are never emailed. Every attempt
    is recorded before the message goes out and the server's answer after, so running the command again after a
    crash sends the rest and nothing twice; an email whose attempt got no answer is reported as `unknown` and sent
    again only with `--resend-unknown`.

    Examples:

    * `outreach send --campaign demo-train --dry-run`
    * `OUTREACH_MAIL__USERNAME=dana OUTREACH_MAIL__PASSWORD=... outreach send --campaign q3-leads`
    """
    from outreach.sending import SendError, send_campaign

    settings = settings_or_exit(config, store_url=store)
    if daily_cap is not None:
        settings.mail.daily_cap = daily_cap
    if pace is not None:
        settings.mail.pace_s = pace
    engine = open_engine(settings)
    policy = _policy(settings, resend_unknown=resend_unknown, limit=limit)
    server = None if dry_run else _server(settings)
    if server is not None and server.security == "none" and server.host not in ("localhost", "127.0.0.1", "::1"):
        err.print(f"[yellow]mail.security is none: the messages{' and the password' if server.username else ''} "
                  f"go to {escape(server.label())} in plain text[/yellow]", highlight=False)
    try:
        report = send_campaign(engine, campaign, server, policy, dry_run=dry_run)
    except SendError as exc:
        raise _fail(str(exc)) from exc
    _print_report(report)
    if report.stopped is not None:
        raise _fail(f"sending stopped: {report.stopped}", code=1)


@events_app.command("import-mail")
def import_mail_command(
    source: Annotated[str, typer.Argument(help="An .mbox file, a folder of .eml files, a Maildir, or "
                                               "imap[s]://user@host[:port]/MAILBOX.")],
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Read bounces (delivery status notifications), replies, unsubscribe requests and complaints, join each to
    the email it is about by In-Reply-To/References (or the bounced message's Message-ID), store them as
    engagement events, and put bounced, unsubscribed and complaining addresses on the suppression list, and those
    who reply in the words the offer's `opt_out_line` asks for ("no thanks").

    Messages that cannot be read are listed by file and line; importing the same mail twice stores nothing new.
    An IMAP mailbox is read without changing it; its password comes from `$OUTREACH_MAIL__IMAP_PASSWORD`.

    Examples:

    * `outreach events import-mail bounces.mbox`
    * `outreach events import-mail imaps://dana@imap.ledgerline.example/INBOX`
    """
    from miniatures.redaction import register_secret
    from outreach.mail_import import import_mail_events
    from tools.mailbox_events import MailSourceError, read_mail

    settings = settings_or_exit(config, store_url=store)
    engine = open_engine(settings)
    password = settings.mail.imap_password.get_secret_value()
    register_secret(password)
    try:
        read = read_mail(source, imap_password=password, timeout_s=settings.mail.timeout_s)
    except MailSourceError as exc:
        raise _fail(str(exc)) from exc
    result = import_mail_events(engine, read)
    for note in read.problems:
        err.print(f"[yellow]{escape(note.source)}: skipped: {escape(note.reason)}[/yellow]", highlight=False,
                  soft_wrap=True)
    for note in result.unmatched:
        err.print(f"[yellow]{escape(note.source)}: not joined: {escape(note.reason)}[/yellow]", highlight=False,
                  soft_wrap=True)
    for note in read.ignored:
        err.print(f"{note.source}: ignored: {note.reason}", markup=False, highlight=False, soft_wrap=True)
    stored = ", ".join(f"{n} {event}" for event, n in sorted(result.stored.items())) or "none"
    console.print(f"{source}: {read.messages} messages, {len(read.events)} events; stored {stored}; "
                  f"{result.duplicates} already stored, {len(result.unmatched)} not joined, "
                  f"{len(read.problems)} unreadable, {len(read.ignored)} ignored, {result.opt_outs} opt-out replies; "
                  f"{len(result.suppressed)} addresses suppressed now", highlight=False, soft_wrap=True)


@suppressions_app.command("add")
def suppressions_add(
    addresses: Annotated[list[str], typer.Argument(help="Email addresses.")],
    reason: Annotated[str, typer.Option(help="opt_out, bounce, unsubscribe or complaint.")] = "opt_out",
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Put addresses on the suppression list (never emailed again). Example: `outreach suppressions add a@b.example`"""
    from store.engine import session_scope
    from store.sends import add_suppression

    settings = settings_or_exit(config, store_url=store)
    engine = open_engine(settings, create=True)
    added = 0
    try:
        with session_scope(engine) as session:
            for address in addresses:
                added += add_suppression(session, address, reason, "cli")
    except ValueError as exc:
        raise _fail(f"{exc}; nothing was added") from exc
    console.print(f"{added} addresses added, {len(addresses) - added} already on the list")


@suppressions_app.command("list")
def suppressions_list(store: StoreOpt = None, config: ConfigOpt = None) -> None:
    """Show the suppression list."""
    from sqlmodel import Session, col, select

    from store.models import Suppression

    settings = settings_or_exit(config, store_url=store)
    engine = open_engine(settings)
    table = Table("address", "reason", "source", "since")
    with Session(engine) as session:
        for row in session.exec(select(Suppression).order_by(col(Suppression.id))):
            table.add_row(row.address, row.reason, row.source, f"{row.created_at:%Y-%m-%d %H:%M}")
    console.print(table)
