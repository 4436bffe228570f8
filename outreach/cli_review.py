"""``outreach review``: step through the review queue in the terminal, or serve the review page (``--web``).

Keys are read with ``typer.getchar`` (typer's bundled click, which typer's ``CliRunner`` feeds in tests); the
editor is ``click.edit`` ($VISUAL / $EDITOR). Only typer and rich are imported at start-up; click, the store,
the queue and the web stack load inside the command.
"""

from __future__ import annotations

import getpass
import re
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from outreach.cli_common import ConfigOpt, StoreOpt, err, open_engine, settings_or_exit

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from finetune.review import ReviewCounts, ReviewItem

__all__ = ["KEYS_HELP", "render_item", "review_command"]

console = Console()

#: What each key does in the terminal review.
KEYS_HELP = "a approve · e edit · r reject · s skip · q quit · ? help"
_HELP = """[bold]Keys[/bold]
  a  approve: the output is good training data as it is
  e  edit: open the output in your editor ($EDITOR); the saved edit becomes the training target
  r  reject: keep this output out of training
  s  skip: leave it for later
  q  quit (a summary follows)
  ?  this help
Email edits: a 'Subject: ...' line, a blank line, then the body, with merge tags such as {{first_name}}.
Profile edits: the researcher's JSON; each fact's evidence is a sentence id (S12) whose sentence contains the value."""
# Control characters (except tab and newline) in hostile page text must not reach the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: object) -> str:
    return _CONTROL.sub("\ufffd", str(text))


def _t(text: object, style: str = "") -> Text:
    """Store text as a rich ``Text`` (never parsed as markup), control characters replaced."""
    return Text(_clean(text), style=style)


def _counts_line(counts: ReviewCounts) -> Text:
    return _t(f"total {counts.total} · reviewed {counts.reviewed} (approved {counts.approved}, edited "
              f"{counts.edited}, rejected {counts.rejected}) · left {counts.left} · failed {counts.failed}")


def _facts_table(item: ReviewItem) -> Table | Text:
    profile = item.profile
    if profile is None:
        return _t("no profile stored for this run", "dim")
    table = Table("field", "value", "evidence", "source", show_lines=False, expand=True)
    for fact in profile.facts:
        table.add_row(_t(fact.field), _t(fact.value, "bold"), _t(fact.evidence, "italic"), _t(fact.source_url, "cyan"))
    if not profile.facts:
        table.add_row(_t("-"), _t("no grounded facts", "dim"), _t(""), _t(""))
    return table


def render_item(item: ReviewItem, index: int, total: int) -> Group:
    """The rich renderable of one queue item (header, prospect, email or profile, checks, latest review)."""
    head = _t(f"item {index} of {total} · {item.kind} · trace {item.trace_id} · run {item.run_id} · campaign "
              f"{item.campaign} · {item.agent} on {item.backend}", "bold")
    if item.failed:
        head.append(_t(f"  FAILED ({item.run_status}{': ' + item.run_error if item.run_error else ''})", "bold red"))
    p = item.prospect
    who = _t(f"to {p.first_name} {p.last_name}".rstrip() + (f", {p.title}" if p.title else "")
             + f" <{p.email}> at {p.company}" + (f" ({p.website})" if p.website else ""))
    parts: list[object] = [head, who]
    if item.review is not None:
        r = item.review
        parts.append(_t(f"latest review: {r.status}" + (f" by {r.reviewer}" if r.reviewer else "")
                        + (f" ({r.note})" if r.note else ""), "yellow"))
    if item.kind == "email":
        if item.email is None:
            parts.append(_t("no email stored for this run; the raw output:\n" + item.output, "red"))
        else:
            e = item.email
            body = Text()
            body.append_text(_t("Subject: ", "bold"))
            body.append_text(_t(e.subject + "\n\n"))
            body.append_text(_t(e.body))
            parts.append(Panel(body, title="email (rendered)", border_style="green" if e.valid else "red"))
            parts.append(Panel(_t(f"Subject: {e.subject_template}\n\n{e.body_template}", "dim"),
                               title="templates (what the writer wrote)", border_style="dim"))
            checks = Text()
            for name, ok in e.checks.items():
                checks.append_text(_t(f"{'✓' if ok else '✗'} {name}  ", "green" if ok else "red"))
            parts.append(checks)
            parts.extend(_t(f"  {msg}", "red") for msg in e.errors)
        parts.append(_t("facts behind the merge tags:", "dim"))
        parts.append(_facts_table(item))
    else:
        parts.append(Panel(_facts_table(item), title="profile (grounded facts)"))
        if item.profile is not None:
            parts.append(_t(f"{item.profile.drops_text} · sources: "
                            + (", ".join(item.profile.sources) or "none"), "dim"))
    return Group(*parts)  # type: ignore[arg-type]


def _read_key() -> str:
    """One key press, lower-cased; end of input or Ctrl-C reads as ``q``."""
    try:
        return typer.getchar().lower()
    except (EOFError, KeyboardInterrupt, typer.Abort):
        return "q"


def _edit(engine: Engine, item: ReviewItem, start: str, reviewer: str) -> tuple[bool, str]:
    """Open the editor on ``start``; returns (saved, text to start from next time)."""
    import click

    from finetune.review import ReviewInputError, ReviewNotFoundError, apply_review, output_from_editable

    try:
        edited = click.edit(start, extension=".txt" if item.kind == "email" else ".json", require_save=True)
    except click.ClickException as exc:
        err.print(_t(f"could not open an editor: {exc.format_message()} (set $EDITOR)", "red"))
        return False, start
    if edited is None:
        console.print(_t("edit cancelled: nothing saved", "yellow"))
        return False, start
    try:
        apply_review(engine, item.trace_id, "edit", edited_output=output_from_editable(item.kind, edited),
                     reviewer=reviewer)
    except (ReviewInputError, ReviewNotFoundError) as exc:
        err.print(_t(f"edit not saved: {exc}", "red"))
        console.print(_t("press e to edit again (your text is kept) or s to skip", "yellow"))
        return False, edited
    return True, edited


def _review_loop(engine: Engine, items: list[ReviewItem], reviewer: str) -> dict[str, int]:
    """Step through ``items`` with single keys; returns what this session did per action."""
    from finetune.review import ReviewInputError, ReviewNotFoundError, apply_review, editable_text

    done = {"approved": 0, "edited": 0, "rejected": 0, "skipped": 0}
    for index, item in enumerate(items, start=1):
        console.rule()
        console.print(render_item(item, index, len(items)))
        text = editable_text(item)
        while True:
            console.print(_t(f"[{KEYS_HELP}] > ", "bold"), end="")
            key = _read_key()
            console.print(_t(key))
            if key in ("a", "r"):
                action = "approve" if key == "a" else "reject"
                try:
                    review = apply_review(engine, item.trace_id, action, reviewer=reviewer)
                except (ReviewInputError, ReviewNotFoundError) as exc:
                    err.print(_t(str(exc), "red"))
                    done["skipped"] += 1
                    break
                done[review.status] += 1
                console.print(_t(f"trace {item.trace_id} {review.status}", "green"))
                break
            if key == "e":
                saved, text = _edit(engine, item, text, reviewer)
                if saved:
                    done["edited"] += 1
                    console.print(_t(f"trace {item.trace_id} edited: the edit is its training target", "green"))
                    break
                continue
            if key == "s":
                done["skipped"] += 1
                break
            if key in ("q", ""):
                return done
            if key == "?":
                console.print(_HELP, highlight=False)
                continue
            console.print(_t(f"unknown key {key!r}; press ? for help", "yellow"))
    return done


def _web(engine: Engine, *, agent: str | None, campaign: str | None, backend: str | None, unreviewed_only: bool,
         failed_first: bool, reviewer: str, host: str, port: int, token: str | None) -> None:
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        err.print(_t(f"the review page needs the 'serve' extra (fastapi, uvicorn, jinja2), and {exc.name} is "
                     "missing: pip install -e '.[serve]'", "red"))
        raise typer.Exit(2) from exc
    from finetune.review import ReviewInputError
    from miniatures.server import InsecureBindError, check_bind, is_loopback
    from outreach.review_web import create_review_app, loopback_hosts, run_review_server

    try:
        check_bind(host, token)
    except InsecureBindError as exc:
        err.print(_t(f"refusing to serve the review page on {host!r} without a token: anyone who can reach it "
                     "could read the prospects and change reviews; pass --token (or set OUTREACH_REVIEW_TOKEN), "
                     "or bind to 127.0.0.1", "red"))
        raise typer.Exit(2) from exc
    try:
        app = create_review_app(engine, agent=agent, campaign=campaign, backend=backend,
                                unreviewed_only=unreviewed_only, failed_first=failed_first, token=token,
                                reviewer=reviewer, allowed_hosts=loopback_hosts(host) if is_loopback(host) else None)
    except ReviewInputError as exc:
        err.print(_t(str(exc), "red"))
        raise typer.Exit(2) from exc
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    err.print(_t(f"review page on {url}  (Ctrl-C stops)", "bold"))
    try:
        run_review_server(app, host=host, port=port)
    except OSError as exc:
        err.print(_t(f"cannot listen on {host}:{port}: {exc}; pick another --port", "red"))
        raise typer.Exit(2) from exc


def review_command(
    agent: Annotated[str | None, typer.Option(
        help="Only this agent's outputs: researcher (profiles) or writer (emails).")] = None,
    campaign: Annotated[str | None, typer.Option(help="Only this campaign.")] = None,
    backend: Annotated[str | None, typer.Option(help="Only outputs of this backend spec, e.g. heuristic.")] = None,
    all_items: Annotated[bool, typer.Option(
        "--all", help="Include items already reviewed (to change a review).")] = False,
    failed_first: Annotated[bool, typer.Option(
        "--failed-first/--no-failed-first", help="Failed runs and invalid emails first.")] = True,
    reviewer: Annotated[str | None, typer.Option(
        help="Name written on each review (default: your user name).")] = None,
    web: Annotated[bool, typer.Option("--web", help="Serve the review page in the browser instead.")] = False,
    host: Annotated[str, typer.Option(
        help="--web: address to bind; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="--web: port.")] = 8765,
    token: Annotated[str | None, typer.Option(
        envvar="OUTREACH_REVIEW_TOKEN", help="--web: require this token on every request.")] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Review emails and profiles: approve, edit or reject each; edits become training targets, rejections stay out.

    Keys: a approve · e edit (in $EDITOR) · r reject · s skip · q quit · ? help.

    Examples:

    * `outreach review --agent writer --campaign q4`
    * `outreach review --web`  (then open http://127.0.0.1:8765/)
    """
    from finetune.review import ReviewInputError, review_counts, review_queue
    settings = settings_or_exit(config, store_url=store)
    engine = open_engine(settings)
    if reviewer is None:
        try:
            reviewer = getpass.getuser()
        except (KeyError, OSError):
            reviewer = ""
    if web:
        _web(engine, agent=agent, campaign=campaign, backend=backend, unreviewed_only=not all_items,
             failed_first=failed_first, reviewer=reviewer, host=host, port=port, token=token)
        return
    try:
        items = review_queue(engine, agent=agent, campaign=campaign, backend=backend, unreviewed_only=not all_items,
                             failed_first=failed_first)
        before = review_counts(engine, agent=agent, campaign=campaign, backend=backend)
    except ReviewInputError as exc:
        err.print(_t(str(exc), "red"))
        raise typer.Exit(2) from exc
    console.print(_counts_line(before))
    if not items:
        console.print(_t("nothing to review" + (" (use --all to revisit reviewed items)" if not all_items else "")))
        return
    done = _review_loop(engine, items, reviewer)
    after = review_counts(engine, agent=agent, campaign=campaign, backend=backend)
    console.rule()
    console.print(_t(f"this session: approved {done['approved']}, edited {done['edited']}, rejected "
                     f"{done['rejected']}, skipped {done['skipped']}", "bold"))
    console.print(_counts_line(after))
