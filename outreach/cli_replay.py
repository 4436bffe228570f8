"""`outreach replay`: re-run stored runs through other backends, offline, and compare per agent."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from core.errors import UserError
from outreach.cli_common import ConfigOpt, CorpusOpt, StoreOpt, err, open_engine, probe_backends, settings_or_exit

if TYPE_CHECKING:
    from evals.replays import ReplayComparison
    from finetune.replay import ReplayReport

__all__ = ["parse_trace_filter", "replay_command"]

console = Console()

_FILTER_KEYS = ("campaign", "agent", "backend", "ids")
#: Bare words of a ``--traces`` filter: the run statuses to select (either, when both are given).
_STATUS_WORDS = {"failed": "failed_only", "no_facts": "no_facts_only"}
_IDS = re.compile(r"^\d+(-\d+)?$")


class TraceFilterError(UserError, ValueError):
    """A ``--traces`` filter that cannot be read; the message shows the expected form."""


def parse_trace_filter(text: str) -> dict[str, Any]:
    """Read a ``--traces`` filter into ``finetune.replay.select_replay_runs`` arguments.

    Form: space-separated ``key=value`` terms, keys ``campaign``, ``agent``, ``backend`` and ``ids``
    (comma-separated ids and ranges, e.g. ``ids=3,10-20``), plus the bare words ``failed`` (only
    failed runs) and ``no_facts`` (only runs whose research kept no verified fact); with both, runs of
    either. Example: ``"campaign=q4 agent=writer backend=heuristic failed"``.

    Raises:
        TraceFilterError: an unknown key, a term without ``=``, or ids that are not numbers/ranges.
    """
    out: dict[str, Any] = {}
    for term in text.split():
        if term in _STATUS_WORDS:
            out[_STATUS_WORDS[term]] = True
            continue
        key, sep, value = term.partition("=")
        if not sep or key not in _FILTER_KEYS or not value:
            raise TraceFilterError(
                f"cannot read {term!r} in --traces {text!r}: use space-separated key=value terms with keys "
                f"{', '.join(_FILTER_KEYS)} (ids=3,10-20) and the words 'failed' and 'no_facts'")
        if key == "ids":
            ids: list[int] = []
            for part in value.split(","):
                if not _IDS.match(part):
                    raise TraceFilterError(f"ids must be numbers or ranges like 10-20, got {part!r} in --traces")
                low, _, high = part.partition("-")
                ids += list(range(int(low), int(high or low) + 1))
            out["trace_ids"] = ids
        else:
            out[key] = value
    return out


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if "rate" in metric or "agree" in metric or "identical" in metric or "similarity" in metric or "valid" in metric:
        return f"{value:.1%}"
    if "USD" in metric:
        return f"{value:.4f}"
    return f"{value:.1f}" if value != int(value) else str(int(value))


def print_comparison(comparison: ReplayComparison) -> None:
    """Print one table per replayed agent: each figure on the source side and on the replay side."""
    for agent in comparison.agents:
        table = Table(title=f"{agent.agent}: {', '.join(agent.source_backends) or '-'} -> "
                            f"{', '.join(agent.replay_backends)} ({agent.pairs} replayed calls, "
                            f"{comparison.runs} runs)")
        table.add_column("figure")
        table.add_column("source", justify="right")
        table.add_column("replay", justify="right")
        for row in agent.rows:
            table.add_row(row.metric, _fmt(row.source, row.metric), _fmt(row.replay, row.metric))
        console.print(table)


def _print_report(report: ReplayReport) -> None:
    done = report.result.done if report.result else 0
    no_facts = report.result.no_facts if report.result else 0
    failed = report.result.failed if report.result else 0
    console.print(f"replay {report.campaign!r} of {report.source_campaign!r}: agents replayed "
                  f"{', '.join(report.replayed_agents)}; {done} runs done, {no_facts} without a verified fact, "
                  f"{failed} failed now, {report.recorded_answers} calls answered from the records")
    for m in report.missing:
        err.print(f"[yellow]not replayed: run {m.run_id} ({m.prospect}), traces {m.trace_ids}: missing snapshot "
                  f"of {', '.join(m.urls[:3])}{' ...' if len(m.urls) > 3 else ''}[/yellow]")
    if report.result:
        for email, reason in report.result.failures[:10]:
            err.print(f"[yellow]failed {email}: {reason}[/yellow]")


def replay_command(
    campaign: Annotated[str | None, typer.Option(help="Replay every finished run of this campaign.")] = None,
    traces: Annotated[str | None, typer.Option(
        help="Replay the runs of the traces matching this filter, e.g. 'campaign=q4 agent=writer backend=heuristic "
             "ids=3,10-20 failed' ('no_facts': runs whose research kept no verified fact).")] = None,
    researcher: Annotated[str | None, typer.Option(
        help="Backend spec to replay the researcher with (omit to keep its recorded answers).")] = None,
    writer: Annotated[str | None, typer.Option(
        help="Backend spec to replay the writer with (omit to keep its recorded answers).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Name of the replay campaign (default: `<source> -> replay(<researcher>, <writer>)`); rerun to resume.")
    ] = None,
    use_corpus: Annotated[bool, typer.Option(
        "--use-corpus/--snapshots-only", help="Read pages without a snapshot from the corpus (offline campaigns).")
    ] = True,
    concurrency: Annotated[int | None, typer.Option(help="Runs replayed at once.")] = None,
    unpersonalised_emails: Annotated[bool | None, typer.Option(
        "--unpersonalised-emails/--no-unpersonalised-emails",
        help="When a replayed research keeps no verified fact, still write an email without company facts "
             "(setting unpersonalised_emails; default: no email, status no_facts).")] = None,
    store: StoreOpt = None,
    corpus: CorpusOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Replay stored runs through other backends, offline, and compare the outputs per agent.

    Research is answered from the recorded searches and the stored web snapshots (or the corpus), so
    the same pages are seen without a network; each model call gets the recorded messages. New traces
    link to the ones they replay and feed `outreach finetune dataset` like any others.

    Examples:

    * `outreach replay --campaign q4 --writer openai:gpt-4.1@http://localhost:8000/v1`
    * `outreach replay --traces 'agent=writer failed' --researcher heuristic --writer heuristic`
    * `outreach replay --traces 'campaign=q4 no_facts' --researcher openai:gpt-4.1` (research that found nothing)
    """
    from evals.replays import compare_replay
    from finetune.replay import ReplayError, replay, select_replay_runs
    from miniatures.specs import BackendSpecError, parse_backend_spec
    from tools import Corpus, CorpusWeb

    if (campaign is None) == (traces is None):
        err.print("[red]give exactly one of --campaign NAME or --traces FILTER[/red]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, concurrency=concurrency, store_url=store, corpus_path=corpus,
                                unpersonalised_emails=unpersonalised_emails)
    try:
        specs = {agent: parse_backend_spec(spec) for agent, spec in (("researcher", researcher), ("writer", writer))
                 if spec is not None}
        wanted = parse_trace_filter(traces) if traces is not None else {"campaign": campaign}
    except (BackendSpecError, TraceFilterError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    engine = open_engine(settings)
    probe_backends(specs, settings)
    selected = select_replay_runs(engine, **wanted)
    if campaign is not None and not selected:
        selected = {campaign: []}  # let replay() say whether the campaign exists or has nothing finished
    if not selected:
        err.print(f"[red]no finished run has a trace matching --traces {traces!r}; `outreach traces list` shows "
                  "what is stored[/red]")
        raise typer.Exit(2)
    pages = None
    if use_corpus and Path(settings.corpus_path).is_file():
        pages = CorpusWeb(Corpus(settings.corpus_path))
    if name is not None and len(selected) > 1:
        err.print(f"[red]--name names one replay campaign, but the traces come from {len(selected)} campaigns "
                  f"({', '.join(selected)}); narrow --traces with campaign=...[/red]")
        raise typer.Exit(2)
    failed = False
    for source, run_ids in selected.items():
        try:
            report = asyncio.run(replay(
                engine, source, run_ids=run_ids if traces is not None else None, researcher=researcher,
                writer=writer, name=name, pages=pages, prices=settings.price_table(),
                concurrency=settings.concurrency, unpersonalised_emails=settings.unpersonalised_emails))
        except (ReplayError, BackendSpecError) as exc:
            err.print(f"[red]{exc}[/red]")
            failed = True
            continue
        _print_report(report)
        if report.result is None and report.missing:
            err.print(f"[red]nothing of {source!r} replayed: every selected run misses pages; read them from the "
                      "corpus the campaign used (--use-corpus --corpus FILE) or fetch them live first[/red]")
            failed = True
            continue
        try:
            print_comparison(compare_replay(engine, report.campaign))
        except KeyError as exc:
            err.print(f"[yellow]{exc.args[0]}[/yellow]")
    if failed:
        raise typer.Exit(2)
