"""The ``outreach`` command line (typer + rich). Progress bars and tables live here, not in the library."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.errors import UserError
from outreach.cli_common import (
    EXTRA_MODULES,
    ConfigOpt,
    CorpusOpt,
    StoreOpt,
    describe_backend,
    err,
    open_engine,
    probe_backends,
    quiet_library_bars,
    require_extras,
    settings_or_exit,
    store_label,
)
from outreach.settings import Settings

app = typer.Typer(
    help="Trained miniatures for sales outreach: research prospects, write grounded emails, record every model call.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
world_app = typer.Typer(help="The demo world: a seeded, fictional market of companies with websites and gold profiles.")
corpus_app = typer.Typer(help="The local web corpus (SQLite FTS5) that offline research searches and fetches.")
traces_app = typer.Typer(help="Recorded model calls (one row per call).")
emails_app = typer.Typer(help="Written emails.")
realdata_app = typer.Typer(help="Jobs on the real data in ../shared/realdata (never copied into the repository).")
for sub, name in ((world_app, "world"), (corpus_app, "corpus"), (traces_app, "traces"), (emails_app, "emails"),
                  (realdata_app, "realdata")):
    app.add_typer(sub, name=name, no_args_is_help=True)

console = Console()

@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at debug level.")] = False) -> None:
    """Set up logging."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@world_app.command("generate")
def world_generate(
    out: Annotated[Path, typer.Option(help="Folder to write the world into.")] = Path("world"),
    companies: Annotated[int, typer.Option(help="Companies with a prospect (distractors come on top).")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same world, byte for byte.")] = 7,
    heldout: Annotated[float, typer.Option(help="Fraction of companies in the held-out split.")] = 0.3,
    import_corpus: Annotated[bool, typer.Option("--import/--no-import", help="Import the sites into the corpus.")] = True,
    corpus: CorpusOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Generate the demo world and import its websites into the corpus.

    Example: `outreach world generate --out world --companies 200 --seed 7`
    """
    from evals.world import generate_world
    from outreach.pipeline import import_world_corpus

    settings = settings_or_exit(config, corpus_path=corpus)
    manifest = generate_world(out, n_companies=companies, seed=seed, heldout_fraction=heldout)
    console.print(f"wrote the demo world to {out}/: {json.dumps(manifest.counts)}")
    if import_corpus:
        n = import_world_corpus(out, settings.corpus_path)
        console.print(f"imported {n} pages into the corpus {settings.corpus_path}")
    console.print(f"next: outreach run {out}/prospects_train.csv --offer {out}/offer.toml")


@corpus_app.command("import")
def corpus_import(
    path: Annotated[Path, typer.Argument(help="An HTML file or folder (`<root>/<host>/<path>.html`), a .csv or a .warc[.gz].")],
    url: Annotated[str | None, typer.Option(help="Address of a single HTML file.")] = None,
    name_column: Annotated[str, typer.Option(help="CSV: column with the page title.")] = "name",
    url_column: Annotated[str, typer.Option(help="CSV: column with the website.")] = "website",
    text_column: Annotated[list[str] | None, typer.Option(help="CSV: a column rendered into the text (repeat).")] = None,
    where: Annotated[list[str] | None, typer.Option(help="CSV: keep rows where COLUMN=VALUE (repeat; all must hold).")] = None,
    corpus: CorpusOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Import pages into the local corpus.

    Examples:

    * `outreach corpus import site/ `  (folders named after hosts)
    * `outreach corpus import page.html --url https://acme.example/about`
    * `outreach corpus import companies.csv --name-column company_name --url-column website --text-column long_description --where status=Active`
    * `outreach corpus import crawl.warc.gz`
    """
    from tools import Corpus, import_csv, import_html, import_warc

    settings = settings_or_exit(config, corpus_path=corpus)
    if not path.exists():
        err.print(f"[red]{path} does not exist[/red]")
        raise typer.Exit(2)
    store = Corpus(settings.corpus_path)
    name = path.name.lower()
    if name.endswith(".csv"):
        conditions = [w.split("=", 1) for w in where or []]
        if any(len(c) != 2 for c in conditions):
            err.print("[red]--where takes COLUMN=VALUE[/red]")
            raise typer.Exit(2)
        report = import_csv(path, store, name_column=name_column, url_column=url_column,
                            text_columns=text_column or [],
                            where=(lambda row: all(row.get(k) == v for k, v in conditions)) if conditions else None)
        for row, reason in report.skipped:
            err.print(f"[yellow]skipped row {row}: {reason}[/yellow]")
        n = report.imported
    elif name.endswith((".warc", ".warc.gz")):
        n = import_warc(path, store)
    else:
        n = import_html(path, store, url=url)
    console.print(f"imported {n} documents into {settings.corpus_path} ({len(store)} in all)")


@corpus_app.command("search")
def corpus_search(
    query: Annotated[str, typer.Argument(help="Words to search for (BM25 ranking).")],
    limit: Annotated[int, typer.Option(help="Hits to show.")] = 8,
    corpus: CorpusOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Search the local corpus. Example: `outreach corpus search "logistics software Austin"`"""
    from tools import Corpus

    settings = settings_or_exit(config, corpus_path=corpus)
    table = Table("rank", "score", "url", "title")
    for hit in Corpus(settings.corpus_path).search(query, max_results=limit):
        table.add_row(str(hit.rank), f"{hit.score:.2f}", hit.url, hit.title)
    console.print(table)


def _progress_run(coro_factory, total: int):  # type: ignore[no-untyped-def]
    """Run a campaign coroutine with a rich progress bar fed by its run events."""
    from graphs.runner import RunEvent

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("[red]{task.fields[failed]} failed"), console=err, transient=False,
                  disable=not err.is_terminal) as progress:
        task = progress.add_task("prospects", total=total, failed=0)
        failed = 0

        def on_event(event: RunEvent) -> None:
            nonlocal failed
            if event.status != "running":
                failed += event.status == "failed"
                progress.update(task, advance=1, failed=failed)

        return asyncio.run(coro_factory(on_event))


def _print_report(report, engine, campaign: str, settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """Print the campaign's figures table and its failures; return its ``evals.campaigns`` summary."""
    from evals.campaigns import campaign_summary

    summary = (campaign_summary(engine, campaign) if settings is None else
               campaign_summary(engine, campaign, prices=settings.price_table(), basis=settings.cost_basis()))
    table = Table(title=f"campaign {campaign}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    unrecorded = summary.dropped_facts - sum(summary.drop_reasons.values())
    rows = [
        ("prospects run now", report.total), ("done now", report.done),
        ("no verified fact now", report.no_facts), ("failed now", report.failed),
        ("already finished before", report.skipped), ("seconds", f"{report.elapsed_s:.1f}"),
        ("valid emails (all runs)", summary.valid_emails),
        ("  of them not personalised", summary.unpersonalised_emails),
        ("no verified fact (all runs)", summary.no_facts), ("grounded facts", summary.facts),
        ("facts dropped", summary.dropped_facts),
        *((f"  {reason.replace('_', ' ')}", n) for reason, n in summary.drop_reasons.items()),
        *((("  reason not recorded", unrecorded),) if unrecorded > 0 else ()),
        ("model calls", summary.model_calls),
        ("tokens in / out", f"{summary.input_tokens} / {summary.output_tokens}"),
        ("latency p50 / p95 ms", f"{summary.latency_p50_ms:.1f} / {summary.latency_p95_ms:.1f}"),
        ("cost USD", f"{summary.cost_usd:.4f}"),
        *(((f"  heuristic priced as {summary.stand_in_model}", f"{summary.stand_in_cost_usd:.4f}"),)
          if summary.stand_in_model else ()),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    for email, reason in report.failures[:10]:
        err.print(f"[yellow]failed {email}: {reason}[/yellow]")
    if len(report.failures) > 10:
        err.print(f"[yellow]... and {len(report.failures) - 10} more failures (outreach traces list)[/yellow]")
    for email, note in report.without_facts[:5]:
        err.print(f"no verified fact for {email}: {note}", markup=False)
    if len(report.without_facts) > 5:
        err.print(f"... and {len(report.without_facts) - 5} more prospects without a verified fact (no_facts)")
    return summary


def _exit_if_all_failed(report, researcher: str, writer: str) -> None:  # type: ignore[no-untyped-def]
    """Exit with status 1 when every prospect run now failed (a backend that went away, a broken model),
    naming both backends and their endpoints; a campaign where only some failed exits 0 (errors are isolated)."""
    if not report.total or report.failed < report.total:
        return
    from rich.markup import escape

    from miniatures.redaction import redact

    example = f" (e.g. {report.failures[0][0]}: {redact(report.failures[0][1])})" if report.failures else ""
    err.print(f"[red]{escape(f'every prospect run now failed, {report.failed} of {report.total}{example}')}. "
              f"Backends: researcher {escape(describe_backend(researcher))}, writer {escape(describe_backend(writer))}; "
              "check that they answer, then rerun with --retry-failed.[/red]", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command("run")
def run(
    prospects: Annotated[Path, typer.Argument(help="Prospects CSV: first_name,last_name,title,email,company,website.")],
    offer: Annotated[Path, typer.Option(help="Offer TOML (sender_name, sender_company, product, value_proposition, call_to_action).")],
    researcher: Annotated[str | None, typer.Option(
        help="Backend spec of the researcher: `heuristic`, `openai:<model>[@<base_url>]`, `ollama:<model>`, "
             "`miniature:<name>`.")] = None,
    writer: Annotated[str | None, typer.Option(help="Backend spec of the writer.")] = None,
    campaign: Annotated[str | None, typer.Option(help="Campaign name (default: the CSV's file name). Rerun to resume.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Prospects in flight at once.")] = None,
    web: Annotated[str | None, typer.Option(help="corpus (offline) or ddgs (live web).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Also rerun prospects that failed before.")] = False,
    retry_no_facts: Annotated[bool, typer.Option(
        help="Also rerun prospects whose research found no verified fact before (status no_facts).")] = False,
    unpersonalised_emails: Annotated[bool | None, typer.Option(
        "--unpersonalised-emails/--no-unpersonalised-emails",
        help="When research finds no verified fact, still write an email without company facts, exported as "
             "not personalised (setting unpersonalised_emails; default: no email, status no_facts).")] = None,
    limit: Annotated[int | None, typer.Option(help="Run at most this many pending prospects.")] = None,
    arm: Annotated[list[str] | None, typer.Option(
        "--arm", help="An A/B arm NAME=RESEARCHER,WRITER (repeat: two or more; the first is the control). Each "
                      "company's prospects run with one arm, assigned at random by --seed and --split "
                      "(graphs.arms); a rerun keeps every assignment.")] = None,
    split: Annotated[str | None, typer.Option(help="Shares of the --arm values in order, e.g. 50,50 or 80,20 "
                                                   "(default: equal).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the arm assignment (same seed, same arms).")] = 0,
    executor: Annotated[str, typer.Option(
        help="local (this machine: one process, or --workers processes) or ray (Ray actors; needs the ray "
             "extra).")] = "local",
    workers: Annotated[int, typer.Option(
        help="Workers, each with --concurrency prospects in flight, sharing the store through claims.")] = 1,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster to run on (auto, HOST:PORT, ray://HOST:10001; needs a PostgreSQL store); default: a "
             "Ray started on this machine.")] = None,
    lease_s: Annotated[float, typer.Option(
        help="Seconds a worker's claim on a run lasts unless renewed (every third of it while the run works): "
             "the runs of a worker that died on another machine wait this long before another worker redoes "
             "them (at once for a dead process of this machine).")] = 60.0,
    worker_id: Annotated[str | None, typer.Option(
        help="This worker's name in the store (runs.lease_owner); default host:pid:random.")] = None,
    store: StoreOpt = None,
    corpus: CorpusOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run a campaign: research each prospect, write a grounded email, record every model call.

    Running it again with the same campaign resumes it: finished prospects (done, or no verified fact) are
    skipped, interrupted ones rerun. A prospect whose research finds no verified fact gets no email unless
    `--unpersonalised-emails` is given. Several `outreach run` commands on one campaign and store, on one
    machine or many, share its prospects: each run is claimed by one worker with a lease (`--lease-s`), and
    a worker that dies has its runs redone by the others.

    Before any prospect is added each backend is checked: a remote one with one `GET <base_url>/models` (an
    endpoint that does not answer, or refuses the key, stops the command), a miniature by its registration.
    The command exits with status 1 when every prospect run now failed.

    Examples:

    * `outreach run world/prospects_train.csv --offer world/offer.toml`
    * `outreach run leads.csv --offer offer.toml --researcher openai:gpt-4.1-mini --writer ollama:qwen2.5:3b --web ddgs`
    * `outreach run leads.csv --offer offer.toml --campaign q4-ab --arm teacher=openai:gpt-4.1-mini,openai:gpt-4.1-mini
      --arm mini=miniature:researcher,miniature:writer --split 50,50 --seed 7`
    """
    from rich.markup import escape

    from graphs.arms import ArmsError, check_campaign_arms, parse_arms, record_arms
    from graphs.executors import check_executor, run_campaign_workers
    from graphs.inputs import InputError, load_offer, read_prospects_csv
    from graphs.runner import add_prospects
    from miniatures.specs import BackendSpecError, parse_backend_spec
    from outreach.cli_scale import campaign_job
    from outreach.pipeline import open_web

    settings = settings_or_exit(config, researcher=researcher, writer=writer, concurrency=concurrency, web=web,
                         store_url=store, corpus_path=corpus, unpersonalised_emails=unpersonalised_emails)
    check_executor(settings.store_url, executor, workers, ray_address)  # before any work (UserError)
    try:
        specs = {"researcher": parse_backend_spec(settings.researcher), "writer": parse_backend_spec(settings.writer)}
        if split is not None and not arm:
            raise ArmsError(f"--split {split!r} needs --arm values (two or more NAME=RESEARCHER,WRITER)")
        plan = parse_arms(arm, split, seed) if arm else None  # every arm's specs parsed before the store is touched
        for one_arm in plan.arms if plan else ():
            specs[f"{one_arm.name} researcher"] = parse_backend_spec(one_arm.researcher)
            specs[f"{one_arm.name} writer"] = parse_backend_spec(one_arm.writer)
        offer_model = load_offer(offer)
        parsed = read_prospects_csv(prospects)
    except (InputError, BackendSpecError, ArmsError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    for row_error in parsed.errors:
        err.print(f"[yellow]skipped {prospects}: {row_error}[/yellow]")
    for warning in parsed.warnings:
        err.print(f"[yellow]{escape(f'{prospects}: {warning}')}[/yellow]", highlight=False)
    name = campaign or prospects.stem
    probe_backends(specs if plan is None else {k: v for k, v in specs.items() if " " in k}, settings)
    engine = open_engine(settings, create=True)
    if plan is not None:
        try:
            check_campaign_arms(engine, name, plan)
        except ArmsError as exc:
            err.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from exc
    added, present = add_prospects(engine, name, offer_model, parsed.prospects)
    if plan is not None:
        record_arms(engine, name, plan)
    backends = (f"researcher={describe_backend(settings.researcher)} writer={describe_backend(settings.writer)}"
                if plan is None else "arms " + "; ".join(
                    f"{a.name} ({a.weight:.0%}): researcher={describe_backend(a.researcher)} "
                    f"writer={describe_backend(a.writer)}" for a in plan.arms) + f", seed {plan.seed}")
    console.print(f"campaign {name}: {added} prospects added, {present} already there, "
                  f"{len(parsed.errors)} rows skipped; {backends}", highlight=False)
    try:
        open_web(settings, engine)  # each worker opens its own; a missing corpus stops the command here
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    if lease_s <= 0:
        err.print(f"[red]--lease-s must be > 0 seconds, got {lease_s:g}[/red]")
        raise typer.Exit(2)
    job = campaign_job(settings, name, retry_failed=retry_failed, retry_no_facts=retry_no_facts, limit=limit,
                       arms=plan, lease_s=lease_s, **({"worker_id": worker_id} if worker_id else {}))
    try:
        report = _progress_run(lambda on_event: run_campaign_workers(
            job, workers=workers, executor=executor, ray_address=ray_address,  # type: ignore[arg-type]
            on_event=on_event, engine=engine), total=limit or len(parsed.prospects))
    except (BackendSpecError, ArmsError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    _print_report(report, engine, name, settings)
    _exit_if_all_failed(report, settings.researcher, settings.writer)


@traces_app.command("list")
def traces_list(
    campaign: Annotated[str | None, typer.Option(help="Only this campaign.")] = None,
    agent: Annotated[str | None, typer.Option(help="researcher or writer.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show (newest first).")] = 20,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List recorded model calls. Example: `outreach traces list --agent writer --limit 5`"""
    from outreach.queries import select_traces

    settings = settings_or_exit(config, store_url=store)
    traces = select_traces(open_engine(settings), campaign=campaign, agent=agent, limit=limit, newest_first=True)
    if not traces:
        err.print(f"no traces{_filters(campaign=campaign, agent=agent)} in the store {store_label(settings)}",
                  highlight=False, soft_wrap=True)
        return
    table = Table("id", "run", "agent", "step", "backend", "in", "out", "ms", "USD", "error",
                  title=f"traces in {store_label(settings)} (newest first)")
    for t in traces:
        table.add_row(str(t.id), str(t.run_id), t.agent, t.step, t.backend, str(t.input_tokens),
                      str(t.output_tokens), f"{t.latency_ms:.1f}", f"{t.cost_usd:.5f}", (t.error or "")[:40])
    console.print(table)


def _filters(**given: str | None) -> str:
    """`` of campaign 'q4', agent 'writer'`` for the filters given (empty when none), escaped for rich markup."""
    from rich.markup import escape

    named = [f"{key} {value!r}" for key, value in given.items() if value is not None]
    return escape(f" of {', '.join(named)}") if named else ""


@traces_app.command("show")
def traces_show(trace_id: Annotated[int, typer.Argument(help="Trace id.")], store: StoreOpt = None,
                config: ConfigOpt = None) -> None:
    """Show one trace: messages, output, tokens, latency. Example: `outreach traces show 12`"""
    from sqlmodel import Session

    from store.models import Trace

    settings = settings_or_exit(config, store_url=store)
    with Session(open_engine(settings)) as session:
        trace = session.get(Trace, trace_id)
    if trace is None:
        err.print(f"[red]no trace {trace_id} in the store {store_label(settings)}; see `outreach traces list`[/red]",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print_json(json.dumps(trace.model_dump(mode="json"), ensure_ascii=False))


@traces_app.command("export")
def traces_export(
    fmt: Annotated[str, typer.Option("--format", help="openai-jsonl: one {'messages': [...]} per line.")] = "openai-jsonl",
    out: Annotated[Path | None, typer.Option(help="Output file (default: standard output).")] = None,
    campaign: Annotated[str | None, typer.Option(help="Only this campaign.")] = None,
    agent: Annotated[str | None, typer.Option(help="researcher or writer.")] = None,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Export traces as OpenAI chat fine-tuning JSONL (what TRL reads).

    Example: `outreach traces export --format openai-jsonl --agent writer --out writer.jsonl`
    """
    from outreach.queries import select_traces
    from store.exports import write_openai_jsonl

    if fmt != "openai-jsonl":
        err.print(f"[red]unknown format {fmt!r}; use openai-jsonl[/red]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, store_url=store)
    traces = select_traces(open_engine(settings), campaign=campaign, agent=agent)
    if not traces:
        err.print(f"[yellow]no traces{_filters(campaign=campaign, agent=agent)} in the store "
                  f"{store_label(settings)}[/yellow]", highlight=False, soft_wrap=True)
    if out is None:
        write_openai_jsonl(traces, sys.stdout)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        n = write_openai_jsonl(traces, fh)
    err.print(f"wrote {n} examples from {store_label(settings)} to {out}", highlight=False, soft_wrap=True)


@emails_app.command("export")
def emails_export(
    fmt: Annotated[str, typer.Option("--format", help="csv, jsonl, or eml (one file per email in a folder).")] = "csv",
    out: Annotated[Path, typer.Option(help="Output file (csv, jsonl) or folder (eml).")] = Path("emails.csv"),
    campaign: Annotated[str | None, typer.Option(help="Only this campaign.")] = None,
    include_invalid: Annotated[bool, typer.Option(help="Also emails that failed validation.")] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Export written emails. Example: `outreach emails export --format eml --out outbox/`"""
    from outreach.exports import EXPORT_FORMATS, export_emails, load_emails

    if fmt not in EXPORT_FORMATS:
        err.print(f"[red]unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}[/red]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, store_url=store)
    n = export_emails(load_emails(open_engine(settings), campaign, include_invalid=include_invalid), fmt, out)
    console.print(f"wrote {n} emails from the store {store_label(settings)} to {out}", highlight=False, soft_wrap=True)
    if not n:
        err.print(f"[yellow]the store has no {'' if include_invalid else 'valid '}emails"
                  f"{_filters(campaign=campaign)}; `outreach traces list` shows what it holds[/yellow]",
                  highlight=False, soft_wrap=True)


def _scores_table(title: str, scores) -> Table:  # type: ignore[no-untyped-def]
    table = Table(title=title)
    for col in ("field", "precision", "recall", "F1", "tp", "predicted", "gold"):
        table.add_column(col, justify="right" if col != "field" else "left")
    for name, s in {**scores.per_field, "micro": scores.micro}.items():
        table.add_row(name, f"{s.precision:.3f}", f"{s.recall:.3f}", f"{s.f1:.3f}", str(s.tp), str(s.n_pred),
                      str(s.n_gold))
    return table


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Working folder (world, store, corpus).")] = Path("demo"),
    companies: Annotated[int | None, typer.Option(
        help="Demo-world companies (default 200; 600 with --distill, for more training data).")] = None,
    seed: Annotated[int, typer.Option(help="World seed.")] = 7,
    concurrency: Annotated[int, typer.Option(help="Prospects in flight at once.")] = 8,
    distill: Annotated[bool, typer.Option(help="Also distil both miniatures and compare them with the teacher on the held-out prospects.")] = False,
    base_model: Annotated[str | None, typer.Option(help="With --distill: base model id or folder (default: bootstrap a tiny one).")] = None,
    method: Annotated[str | None, typer.Option(help="With --distill: lora or full (default: full on a bootstrapped base, lora otherwise).")] = None,
    epochs: Annotated[float | None, typer.Option(
        help="With --distill: training epochs of each miniature (default: 1 for the researcher, 4 for the writer).")] = None,
    bootstrap_steps: Annotated[int, typer.Option(help="With --distill: pretraining steps of a bootstrapped base.")] = 150,
) -> None:
    """The main job offline: generate the demo world, run a campaign over its train prospects with the
    `heuristic` teacher on the local corpus, and score the profiles against the world's gold.

    The emails stay in the store OUT/outreach.sqlite; the closing lines give the command that exports them.

    With `--distill` (needs the `train` and `eval` extras) the loop goes on: build both agents' datasets from
    the teacher's traces, bootstrap a tiny base model unless `--base-model` is given, fine-tune a researcher
    and a writer miniature (`demo-researcher`, `demo-writer`), and evaluate two configurations side by side
    on up to 60 held-out prospects: the teacher, and both miniatures together (report in OUT/eval). To
    evaluate each miniature alone, run `outreach eval` on OUT's store afterwards.

    Examples: `outreach demo --out demo`, `outreach demo --out demo-distill --distill`
    """
    from evals.campaigns import campaign_predictions
    from evals.scoring import score_profiles
    from evals.world import generate_world, load_gold
    from graphs.inputs import load_offer, read_prospects_csv
    from graphs.runner import add_prospects, run_campaign
    from miniatures.specs import BackendSpecError, parse_backend_spec
    from outreach.pipeline import import_world_corpus, open_web

    if distill:
        require_extras("outreach demo --distill", "train", "eval")  # before the campaign, not after it
    if companies is None:
        companies = 600 if distill else 200
    settings = settings_or_exit(None, store_url=f"sqlite:///{out / 'outreach.sqlite'}", corpus_path=out / "corpus.sqlite",
                         web="corpus", concurrency=concurrency)
    try:
        specs = {"researcher": parse_backend_spec(settings.researcher), "writer": parse_backend_spec(settings.writer)}
    except BackendSpecError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    world_dir = out / "world"
    _check_same_world(world_dir, companies, seed)
    probe_backends(specs, settings)
    out.mkdir(parents=True, exist_ok=True)
    manifest = generate_world(world_dir, n_companies=companies, seed=seed)
    pages = import_world_corpus(world_dir, settings.corpus_path)
    console.print(f"demo world: {json.dumps(manifest.counts)}; {pages} pages in the corpus")
    engine = open_engine(settings, create=True)
    parsed = read_prospects_csv(world_dir / "prospects_train.csv")
    add_prospects(engine, "demo-train", load_offer(world_dir / "offer.toml"), parsed.prospects, split="train")
    web_impl = open_web(settings, engine)
    bootstrap = None
    if distill and base_model is None:
        # The base needs only the corpus: it pretrains in a child process on the core the teacher's campaign
        # (single-threaded Python) leaves idle, and takes every core once the campaign is done
        # (finetune.background; its weights came out byte-identical to a base pretrained at 2 threads throughout).
        from finetune.background import BackgroundJob, bootstrap_job

        bootstrap = BackgroundJob(bootstrap_job, str(settings.corpus_path), str(out / "models" / "base"), threads=1,
                                  preset="2m", pretrain_steps=bootstrap_steps)
    try:
        report = _progress_run(lambda on_event: run_campaign(
            engine, "demo-train", web=web_impl, researcher=settings.researcher, writer=settings.writer,
            concurrency=settings.concurrency, prices=settings.price_table(),
            unpersonalised_emails=settings.unpersonalised_emails, on_event=on_event),
            total=len(parsed.prospects))
    except BaseException:
        if bootstrap is not None:
            bootstrap.stop()
        raise
    if bootstrap is not None:
        bootstrap.set_threads(_cpu_threads())
    summary = _print_report(report, engine, "demo-train", settings)
    gold = {name: g.facts for name, g in load_gold(world_dir).items() if g.split == "train"}
    predictions = campaign_predictions(engine, "demo-train")
    scores = score_profiles({c: predictions.get(c, {}) for c in gold}, gold)
    console.print(_scores_table("extraction vs gold (train split)", scores))
    store = store_label(settings)
    console.print(f"emails: {summary.valid_emails} valid emails of campaign demo-train are in the store {store}; "
                  f"export them with `outreach emails export --store {store} --out {out / 'emails.csv'}` "
                  f"(or --format eml --out {out / 'outbox'}); model calls: `outreach traces list --store {store}`",
                  highlight=False, soft_wrap=True)
    if distill:
        _demo_distill(engine, settings, out, world_dir, base_model=base_model, method=method, epochs=epochs,
                      bootstrap_steps=bootstrap_steps, concurrency=concurrency, bootstrap=bootstrap)


def _cpu_threads() -> int:
    """The torch intra-op threads this process started with (one per core unless the environment says less)."""
    import torch

    return int(torch.get_num_threads())


def _check_same_world(world_dir: Path, companies: int, seed: int) -> None:
    """Exit with a clear message when ``world_dir`` holds a demo world of another size or seed: its train and
    held-out splits differ, so a campaign already stored there would leak held-out companies into training."""
    try:
        old = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if (old.get("n_companies"), old.get("seed")) != (companies, seed):
        err.print(f"[red]{world_dir.parent} already holds a demo world of {old.get('n_companies')} companies "
                  f"(seed {old.get('seed')}), not {companies} (seed {seed}); its campaigns would mix the two "
                  "worlds' train and held-out companies. Use another --out folder (e.g. `--out demo-distill`), "
                  "or the same --companies and --seed.[/red]")
        raise typer.Exit(2)


def _demo_distill(engine, settings: Settings, out: Path, world_dir: Path, *, base_model: str | None,  # type: ignore[no-untyped-def]
                  method: str | None, epochs: float | None, bootstrap_steps: int, concurrency: int,
                  bootstrap=None) -> None:
    """The second half of the demo: distil both agents, then teacher vs miniatures on held-out prospects.

    ``bootstrap`` is the ``finetune.background.BackgroundJob`` already pretraining the base beside the campaign
    (None: bootstrap it here, or use ``base_model``). The two miniatures train one after the other on every core:
    side by side (the researcher in a child on one thread) the researcher's padded batches at one thread came out
    different in the last bits from two threads, and the writer's rubric pass rate, sampled on that researcher's
    facts, fell from 96.7% to 73.3% (F1 0.962), though the writer's weights were byte-identical.

    Each phase draws one progress bar on standard error (bootstrapping a spinner, each training run its steps and
    loss, the evaluation one bar per configuration); the libraries' own bars and log printing are off."""
    import time

    from evals.report import write_report
    from evals.runner import EvalConfig, run_eval, world_eval_set
    from finetune.base import bootstrap_base, corpus_texts
    from finetune.distill import distill
    from outreach.cli_eval import eval_progress, overview_tables
    from outreach.cli_finetune import phase_progress, training_progress
    from outreach.pipeline import open_web

    started = time.perf_counter()
    quiet_library_bars()
    if base_model is None:
        with phase_progress(f"bootstrapping a tiny base model: a tokenizer on the corpus, then {bootstrap_steps} "
                            "pretraining steps"):
            if bootstrap is not None:
                info = bootstrap.result()
            else:
                texts = list(corpus_texts(settings.corpus_path))
                info = bootstrap_base(out / "models" / "base", texts, preset="2m", pretrain_steps=bootstrap_steps)
        base_model = str(info.path)
        method = method or "full"
        console.print(f"bootstrapped a {info.n_params / 1e6:.1f}M-parameter base in {info.seconds:.0f} s "
                      f"(loss {info.final_loss:.2f}); method {method}: a base this small and this briefly "
                      "pretrained has little for a LoRA adapter to adapt, so every weight is trained")
    else:
        method = method or "lora"
        console.print(f"base {base_model}; method {method}: LoRA adapters on a pretrained base, several per base")
    # The researcher miniature tags one sentence per prompt (miniatures.formats, "sentence-tags"): with the
    # whole prompt a model this small cited the first sentence for every field. Batches of 4: twice the
    # optimizer steps of 8 for the same compute, which a tiny base needs; its rows are short, so one padded
    # micro-batch of 4 (not 4 of 1). Its eval loss once, at the end: each pass over its 919 eval rows costs
    # about 40 training steps.
    # The writer is trained without its constant system prompt (15% fewer tokens per step; its rules are in
    # the examples) and for 4 epochs: after 1 its subjects ran on; after 2 (train loss 1.51), sampled at temperature
    # 1 with min-p 0.1, 60% of its emails passed every rubric check; after 4 (loss 0.82), 96.7%. Its eval loss
    # once too, at the end: only the loss plot showed the ones between, each pass costing about 3 training steps.
    formats: dict[str, dict[str, Any]] = {
        "researcher": {"answer_format": "sentence-tags", "eval_steps": 100_000, "num_train_epochs": epochs or 1.0,
                       "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
        "writer": {"eval_steps": 100_000, "system_prompt": False, "num_train_epochs": epochs or 4.0}}
    for agent in ("researcher", "writer"):
        with training_progress(f"training demo-{agent}") as on_progress:
            distilled = distill(engine, agent=agent, name=f"demo-{agent}", base_model=base_model,
                                work_dir=out / "models", campaigns=["demo-train"], method=method,  # type: ignore[arg-type]
                                # Steps of 4 rows as 4 micro-batches of 1 (the same gradient): a row without
                                # padding takes the causal attention kernel, which skips the masked half; 1.46x
                                # the writer's speed per row (benchmarks/train_speed.py --only demo).
                                train_overrides={"learning_rate": 2e-3, "save_steps": 10_000,
                                                 "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
                                                 **formats[agent]},
                                on_progress=on_progress)
        m = distilled.miniature
        console.print(f"miniature:{m.name}@{m.version} ({formats[agent].get('answer_format', 'json')} answers): "
                      f"{len(distilled.manifest.train_trace_ids)} training conversations, "
                      f"final train loss {distilled.metrics.get('train_loss', float('nan')):.3f}", highlight=False)
    # Teacher against both miniatures (each agent alone: `outreach eval --config`); 60 held-out prospects.
    configs = [
        EvalConfig(name="teacher"),
        EvalConfig(name="miniatures", researcher="miniature:demo-researcher", writer="miniature:demo-writer"),
    ]
    eval_set = world_eval_set(world_dir, split="heldout", limit=60)
    with eval_progress(len(eval_set.prospects)) as on_event:
        result = asyncio.run(run_eval(engine, eval_set, configs, web=open_web(settings, engine),
                                      run_name="demo-heldout", concurrency=concurrency, prices=settings.price_table(),
                                      cost_basis=settings.cost_basis(), unpersonalised_emails=settings.unpersonalised_emails, on_event=on_event))
    files = write_report(result, out / "eval")
    for table in overview_tables(result):
        console.print(table)
    store = store_label(settings)
    console.print(f"distillation and evaluation took {time.perf_counter() - started:.0f} s; report: {files.html}",
                  highlight=False, soft_wrap=True)
    console.print(f"each miniature alone: `outreach eval --world {world_dir} --split heldout --limit 60 --config "
                  "teacher=heuristic,heuristic --config researcher=miniature:demo-researcher,heuristic --config "
                  f"writer=heuristic,miniature:demo-writer --store {store} --corpus {settings.corpus_path} "
                  f"--out {out / 'eval-each'}`", highlight=False, soft_wrap=True)


@realdata_app.command("companies")
def realdata_companies(
    csv_path: Annotated[Path, typer.Option("--csv", help="The YC companies CSV.")] = Path(
        "../shared/realdata/companies/yc_companies_even_ids.csv"),
    rendering: Annotated[str, typer.Option(
        help="What each corpus document holds: directory (descriptions plus labelled directory fields), prose "
             "(descriptions only) or both (one corpus and campaign each, one table).")] = "both",
    limit: Annotated[int | None, typer.Option(help="Prospects per rendering (the first Active rows; default: all).")] = None,
    out: Annotated[Path, typer.Option(
        help="Folder for each rendering's corpus, store and figures (RENDERING-corpus.sqlite, RENDERING-store.sqlite "
             "and RENDERING.json are replaced).")] = Path("out/realdata-companies"),
    offer: Annotated[Path | None, typer.Option(help="Offer TOML (default: a built-in example offer).")] = None,
    store: Annotated[str | None, typer.Option(
        "--store", help="SQLAlchemy URL of the store whose registry `miniature:` backends are looked up in "
                        "(setting store_url); each rendering's campaign still goes to its own "
                        "RENDERING-store.sqlite.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Real companies: every Active YC row imported as one corpus, the first `--limit` as prospects (founders as
    contacts), a campaign per rendering with the settings' backends, and a report: precision and recall of
    location, employee count and founded year against the rows' own fields, facts kept, facts dropped by reason
    (`misattributed`: the source is not about the prospect), kept facts whose source is another company's page,
    and valid emails that use one (target 0).

    The `directory` rendering puts the fields on the page, labelled (an easy read); `prose` leaves only the
    descriptions, so facts must be read from free text (recall is low by construction: precision is the figure
    to watch). An employee count is right when the row's team size lies in the range the fact states ("11-50",
    "less than 10", "2,000+"), or at most 25% of it outside (sizes are a May 2024 snapshot).

    A `miniature:` backend is looked up in the registry of `--store` (the store that `outreach finetune train` or
    `outreach demo --distill` registered it in), loaded once and used for every rendering.

    Examples: `outreach realdata companies --rendering both --out out/realdata-companies`;
    `OUTREACH_WRITER=miniature:demo-writer outreach realdata companies --limit 20 --store sqlite:///demo/outreach.sqlite`
    """
    import os
    import time

    from agents.schemas import Offer
    from evals.realdata import YC_RENDERINGS, load_yc_companies, measure_yc_companies, yc_prospects
    from graphs.inputs import InputError, load_offer
    from graphs.models import ModelPool
    from miniatures.specs import BackendSpecError, parse_backend_spec
    from store import open_store
    from tools import Corpus

    renderings = list(YC_RENDERINGS) if rendering == "both" else [rendering]
    if any(r not in YC_RENDERINGS for r in renderings):
        err.print(f"[red]--rendering {rendering!r}: use {', '.join(YC_RENDERINGS)} or both[/red]")
        raise typer.Exit(2)
    if limit is not None and limit < 0:
        err.print(f"[red]--limit {limit}: give a number >= 0, or leave it out for all prospects[/red]")
        raise typer.Exit(2)
    if not csv_path.is_file():
        err.print(f"[red]{csv_path} not found; it lives in ../shared/realdata/companies/[/red]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, store_url=store)
    try:
        specs = {"researcher": parse_backend_spec(settings.researcher), "writer": parse_backend_spec(settings.writer)}
        offer_model = load_offer(offer) if offer else Offer(
            sender_name="Dana Whitfield", sender_title="Account Executive", sender_company="Ledgerline",
            product="Ledgerline", value_proposition="cuts month-end close time by automating reconciliation",
            call_to_action="Would a 20-minute call next week be useful?")
        n_prospects = len(yc_prospects(load_yc_companies(csv_path, tag=None)))
    except (InputError, BackendSpecError, ValueError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    n_prospects = min(n_prospects, limit) if limit is not None else n_prospects
    probe_backends(specs, settings)
    registry = open_engine(settings) if any(spec.kind == "miniature" for spec in specs.values()) else None
    models = ModelPool(timeout_s=settings.prospect_timeout_s, store=registry)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for name in renderings:
        corpus_path, store_path = out / f"{name}-corpus.sqlite", out / f"{name}-store.sqlite"
        for stale in (corpus_path, store_path):
            for path in (stale, stale.with_name(stale.name + "-wal"), stale.with_name(stale.name + "-shm")):
                path.unlink(missing_ok=True)
        engine, corpus = open_store(f"sqlite:///{store_path}"), Corpus(corpus_path)
        console.print(f"{name}: researching {n_prospects} prospects on {corpus_path} "
                      f"(researcher={describe_backend(settings.researcher)}, writer={describe_backend(settings.writer)})")
        try:
            figures = _progress_run(lambda on_event, name=name, engine=engine, corpus=corpus: measure_yc_companies(
                csv_path, engine=engine, corpus=corpus, rendering=name, offer=offer_model, campaign=f"yc-{name}",
                limit=limit, researcher=settings.researcher, writer=settings.writer, models=models,
                concurrency=settings.concurrency, max_pages=settings.max_pages,
                prospect_timeout_s=settings.prospect_timeout_s, prices=settings.price_table(),
                unpersonalised_emails=settings.unpersonalised_emails, on_event=on_event),
                total=n_prospects)
        finally:
            corpus.close()
            engine.dispose()
        (out / f"{name}.json").write_text(figures.model_dump_json(indent=2), encoding="utf-8")
        results.append(figures)
    if registry is not None:
        registry.dispose()
    console.print(_realdata_table(results))
    for figures in results:
        for fact in figures.foreign_examples[:5]:
            err.print(f"{figures.rendering}: {fact.company} kept {fact.field}={fact.value!r} from {fact.source_url}"
                      f"{' (used in its email)' if fact.in_valid_email else ''}: {fact.evidence[:120]!r}",
                      markup=False)
    load = os.getloadavg()
    console.print(f"{time.perf_counter() - started:.0f} s wall on {os.cpu_count()} CPUs, load average "
                  f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; figures and stores in {out}/ "
                  f"(e.g. outreach emails export --store sqlite:///{out}/{renderings[0]}-store.sqlite)")


def _realdata_table(results) -> Table:  # type: ignore[no-untyped-def]
    """One column per rendering of ``evals.realdata.YcFigures``."""
    from evals.realdata import YC_PRECISION_TARGET

    table = Table(title="real YC companies: research and emails vs the rows' own fields")
    table.add_column("figure")
    for figures in results:
        table.add_column(figures.rendering, justify="right")

    def pr(score) -> str:  # type: ignore[no-untyped-def]
        if not score.n_pred:
            return f"- / {score.recall:.3f} (0/0/{score.n_gold})"
        return f"{score.precision:.3f} / {score.recall:.3f} ({score.tp}/{score.n_pred}/{score.n_gold})"

    rows: list[tuple[str, list[str]]] = [
        ("corpus documents (Active rows)", [str(f.corpus_documents) for f in results]),
        ("prospects: done / no facts / failed",
         [f"{f.prospects}: {f.done} / {f.no_facts} / {f.failed}" for f in results]),
        *((f"{field} P / R (tp/pred/gold)", [pr(f.scores.per_field[field]) for f in results])
          for field in results[0].scores.fields),
        ("micro P / R (tp/pred/gold)", [pr(f.scores.micro) for f in results]),
        ("facts kept", [str(f.facts_kept) for f in results]),
        ("dropped: " + " / ".join(results[0].drop_reasons),
         [" / ".join(str(n) for n in f.drop_reasons.values()) for f in results]),
        ("kept facts from another company's page", [str(f.foreign_facts) for f in results]),
        ("valid emails", [str(f.valid_emails) for f in results]),
        ("  using another company's fact (target 0)", [str(f.emails_using_foreign_facts) for f in results]),
        (f"targets met (0 such emails; micro P >= {YC_PRECISION_TARGET})",
         [" / ".join({True: "yes", False: "NO", None: "-"}[ok] for ok in f.targets_met.values()) for f in results]),
        ("wall s", [f"{f.elapsed_s:.0f}" for f in results]),
    ]
    for label, values in rows:
        table.add_row(label, *values)
    return table


@realdata_app.command("pages")
def realdata_pages(
    pages_dir: Annotated[Path, typer.Option("--dir", help="Folder of real pages (`<name>/source.html`).")] = Path(
        "../shared/realdata/pages"),
    corpus: CorpusOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Research real company pages with the heuristic researcher and show the facts it found.

    Example: `outreach realdata pages --corpus pages-corpus.sqlite`
    """
    from outreach.pipeline import research_real_pages

    if not pages_dir.is_dir():
        err.print(f"[red]{pages_dir} not found; it lives in ../shared/realdata/pages/[/red]")
        raise typer.Exit(2)
    settings = settings_or_exit(config, corpus_path=corpus)
    table = Table("page", "field", "value", "evidence")
    results = research_real_pages(pages_dir, settings.corpus_path)
    for page in results:
        if not page.profile.facts:
            table.add_row(page.name, "-", "(no grounded facts)", f"dropped {page.profile.dropped_facts}")
        for fact in page.profile.facts:
            table.add_row(page.name, fact.field, fact.value, fact.evidence[:90])
    console.print(table)
    found = sum(bool(p.profile.facts) for p in results)
    console.print(f"{found} of {len(results)} pages gave at least one grounded fact; "
                  f"{sum(len(p.profile.facts) for p in results)} facts in all")


def _register_subcommands() -> None:
    from outreach.cli_eval import abtest_app, eval_command
    from outreach.cli_finetune import finetune_app, miniatures_app
    from outreach.cli_replay import replay_command
    from outreach.cli_review import review_command
    from outreach.cli_send import events_app, send_command, suppressions_app
    from outreach.cli_serve import export_gguf_command, relocate_command, serve_command

    app.command("eval")(eval_command)
    app.command("serve")(serve_command)
    app.command("review")(review_command)
    app.command("replay")(replay_command)
    app.add_typer(abtest_app, name="abtest", no_args_is_help=True)
    app.add_typer(finetune_app, name="finetune", no_args_is_help=True)
    miniatures_app.command("export-gguf")(export_gguf_command)
    miniatures_app.command("relocate")(relocate_command)
    app.add_typer(miniatures_app, name="miniatures", no_args_is_help=True)
    app.command("send")(send_command)
    app.add_typer(events_app, name="events", no_args_is_help=True)
    app.add_typer(suppressions_app, name="suppressions", no_args_is_help=True)


_register_subcommands()


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra of ``pyproject.toml`` that brings the module ``exc`` could not import, or None."""
    top = (exc.name or "").split(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def run_cli() -> None:
    """Entry point of the ``outreach`` command: the typer app with one handler for errors the user can fix.

    A ``core.errors.UserError`` raised anywhere in a command (a bad backend spec, a missing miniature, a damaged
    store or corpus, a malformed input file ...) prints as its one-line message, and a missing optional module
    names the extra to install; both exit with status 2 instead of a traceback. Anything else is a bug and
    keeps its traceback.
    """
    from rich.markup import escape

    try:
        app()
    except UserError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except ModuleNotFoundError as exc:
        extra = _missing_extra(exc)
        if extra is None:
            raise
        torch_first = (" (on a CPU-only machine first `pip install torch==2.13.0`, the CPU wheel)"
                       if exc.name == "torch" else "")
        message = (f"{exc.name} is not installed; it comes with the {extra!r} extra: "
                   f'pip install -e ".[{extra}]"{torch_first}')
        err.print(f"[red]{escape(message)}[/red]", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
