"""``outreach eval`` and ``outreach abtest``: side-by-side evaluation of configurations, and A/B statistics
on engagement events. Registered by ``outreach.cli`` (``app.command("eval")(eval_command)``,
``app.add_typer(abtest_app, name="abtest")``); tables and progress bars live here, figures in ``evals``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from outreach.cli_common import StoreOpt, err, quiet_library_bars, require_extras, settings_or_exit

if TYPE_CHECKING:
    from evals.abtest import ABReport, ABSection
    from evals.runner import ConfigResult, EvalConfig, EvalResult, EvalSet
    from graphs.runner import RunEvent

__all__ = ["ab_section_tables", "abtest_app", "eval_command", "eval_progress", "overview_tables", "print_ab_section",
           "require_eval_extras"]

console = Console()

abtest_app = typer.Typer(
    help="A/B statistics on engagement events exported from an email-sending tool.", no_args_is_help=True
)

SettingsOpt = Annotated[
    Path | None, typer.Option("--settings", help="Settings file (default: ./outreach.toml or $OUTREACH_CONFIG).")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]{message}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# ------------------------------------------------------------------------------------------------
# outreach eval
# ------------------------------------------------------------------------------------------------


def _configs(values: list[str]) -> tuple[list[EvalConfig], str | None, str | None, dict[str, float]]:
    """``--config`` values: ``NAME=R,W[,max_pages=N]`` items and/or TOML files (merged in order)."""
    from evals.costs import DEFAULT_INSTANCE_PRICES
    from evals.runner import load_eval_plan, parse_config

    configs: list[EvalConfig] = []
    reference = judge = None
    prices = dict(DEFAULT_INSTANCE_PRICES)
    for value in values:
        if "=" not in value and value.lower().endswith(".toml"):
            plan = load_eval_plan(Path(value))
            configs += plan.configs
            reference = reference or plan.reference
            judge = judge or (plan.judge if plan.judge != "rubric" else None)
            prices.update(plan.instance_prices)
        else:
            configs.append(parse_config(value))
    return configs, reference, judge, prices


def _instance_prices(values: list[str], base: dict[str, float]) -> dict[str, float]:
    prices = dict(base)
    for value in values:
        key, eq, number = value.partition("=")
        try:
            price = float(number)
        except ValueError:
            price = -1.0
        if not eq or not key.strip() or price < 0 or math.isnan(price):
            raise _fail(f"--instance-price {value!r}: use SPEC_OR_KIND=USD_PER_HOUR, e.g. miniature=0.35")
        prices[key.strip()] = price
    return prices


def _eval_set(world: Path | None, split: str, yc: Path | None, prospects: Path | None, offer: Path | None,
              limit: int | None, corpus_path: Path) -> EvalSet:
    from evals.runner import EvalSet, world_eval_set, yc_eval_set
    from graphs.inputs import InputError, load_offer, read_prospects_csv

    chosen = [x for x in (world, yc, prospects) if x is not None]
    if len(chosen) != 1:
        raise _fail("give exactly one of --world DIR (demo world + gold), --yc CSV (real companies) or "
                    "--prospects CSV --offer TOML (no gold)")
    try:
        if world is not None:
            if split not in ("train", "heldout", "all"):
                raise _fail(f"--split {split!r}: use train, heldout or all")
            return world_eval_set(world, split=split, limit=limit)  # type: ignore[arg-type]
        if offer is None:
            raise _fail("--offer TOML is needed with --yc and --prospects (e.g. world/offer.toml)")
        offer_model = load_offer(offer)
        if yc is not None:
            from evals.realdata import load_yc_companies
            from tools import Corpus, import_csv

            eval_set = yc_eval_set(yc, offer_model, limit=limit or 30)
            names = {p.company for _, p in eval_set.prospects}
            names_ok = {c.name for c in load_yc_companies(yc) if c.name in names}
            import_csv(yc, Corpus(corpus_path), name_column="company_name", url_column="website",
                       text_columns=("short_description", "long_description", "tags", "location", "year_founded",
                                     "team_size"),
                       where=lambda row: (row.get("company_name") or "").strip() in names_ok)
            return eval_set
        assert prospects is not None
        parsed = read_prospects_csv(prospects)
        for row_error in parsed.errors:
            err.print(f"[yellow]skipped {prospects}: {row_error}[/yellow]", soft_wrap=True)
        rows = parsed.prospects[:limit] if limit is not None else parsed.prospects
        return EvalSet(name=f"{prospects.name} (no gold)", offer=offer_model, prospects=rows)
    except (InputError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def require_eval_extras(command: str, configs: list[EvalConfig], judge: str | None = None) -> bool:
    """Exit naming the extras to install: the ``eval`` extra (the report's plots and page), and ``train`` when a
    configuration or the judge runs a ``miniature:`` in-process. Returns whether one does."""
    from miniatures.specs import BackendSpecError, parse_backend_spec

    def in_process(spec: str) -> bool:
        try:
            return parse_backend_spec(spec).kind == "miniature"
        except BackendSpecError:
            return False  # reported where the spec is used

    specs = [spec for c in configs for spec in c.backends] + ([judge] if judge and judge != "rubric" else [])
    local = any(in_process(s) for s in specs)
    require_extras(command, "eval", *(("train",) if local else ()))
    return local


@contextmanager
def eval_progress(total: int) -> Iterator[Callable[[str, RunEvent], None]]:
    """One rich progress bar per configuration (prospects finished of ``total``) on standard error; yields the
    ``on_event`` function of ``evals.runner.run_eval``."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=not err.is_terminal) as progress:
        tasks: dict[str, Any] = {}

        def on_event(name: str, event: RunEvent) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            if event.status != "running":
                progress.advance(tasks[name])

        yield on_event


def _valid(c: ConfigResult) -> str:
    """A configuration's ``valid`` cell: valid emails of prospects (``59/60``, yellow when some are missing), or
    ``ok`` without email figures."""
    if c.email is None or not c.email.prospects:
        return "ok"
    valid = round(c.email.graph_valid_rate * c.email.prospects)
    cell = f"{valid}/{c.email.prospects}"
    return cell if valid == c.email.prospects else f"[yellow]{cell}[/yellow]"


def overview_tables(result: EvalResult) -> tuple[Table, ...]:
    """Terminal tables: quality (research, rubric, win rate), cost and speed (what each part is priced at in its
    caption; ``*`` marks a configuration whose heuristic calls are priced as the API teacher they stand in for),
    then the A/B section of each campaign of the store that has arms (``ab_section_tables``).

    Quality columns: ``valid`` (valid emails of prospects, e.g. ``59/60``, or ``failed`` for a configuration
    whose backend failed), F1 against gold, ``no facts / misattr.`` (prospects whose research kept no verified
    fact / facts dropped because their source is not about the prospect's company), the grounded-fact and
    schema-valid rates, the rubric's all-pass rate and the win rate.
    """
    quality = Table(title=f"evaluation {result.run_name}: {result.eval_set}, {result.n_prospects} prospects")
    for name in ("config", "valid", "F1", "no facts / misattr.", "grounded", "schema", "rubric", "win rate [CI]"):
        quality.add_column(name, justify="left" if name in ("config", "valid") else "right",
                           min_width=9 if name == "win rate [CI]" else None)  # "reference" whole
    cost = Table(title="cost and speed")
    for name in ("config", "tokens in/out per email", "USD / 1k emails", "p50 / p95 ms", "emails/s"):
        cost.add_column(name, justify="left" if name == "config" else "right")
    for c in result.configs:
        if c.status == "failed":
            quality.add_row(c.name, "[red]failed[/red]", *["-"] * 6)
            continue
        r, e, p, k = c.research, c.email, c.pairwise, c.cost
        win = (f"{p.win_rate:.1%} [{p.ci_low:.1%}, {p.ci_high:.1%}]" if p else
               "reference" if c.name == result.reference else "-")
        quality.add_row(c.name, _valid(c), _f(r.f1 if r else None),
                        f"{c.no_facts} / {r.drop_reasons.get('misattributed', 0) if r else '-'}",
                        _f(r.grounded_fact_rate if r else None, ".1%"), _f(r.schema_valid_rate if r else None, ".1%"),
                        _f(e.all_pass_rate if e else None, ".1%"), win)
        if k is not None:
            cost.add_row(c.name + (" *" if k.stand_in_model else ""),
                         f"{k.tokens_in_per_email:.0f} / {k.tokens_out_per_email:.0f}",
                         _f(k.cost_per_1k_emails_usd, ".4f"), f"{k.latency_p50_ms:.0f} / {k.latency_p95_ms:.0f}",
                         _f(k.throughput_emails_per_s, ".1f"))
    priced = [f"{c.name}: {line}" for c in result.configs if c.cost for line in c.cost.pricing]
    if priced:
        cost.caption = "\n".join(priced)
        cost.caption_justify = "left"
    ab = [table for section in result.ab_tests for table in ab_section_tables(section)]
    return (quality, cost, *ab)


def eval_command(
    config: Annotated[list[str] | None, typer.Option(
        "--config", help="A configuration NAME=RESEARCHER_SPEC,WRITER_SPEC[,max_pages=N] (repeat), or a TOML "
                         "file of [[configs]] (see evals.runner.load_eval_plan).")] = None,
    world: Annotated[Path | None, typer.Option(
        help="Demo world folder: its prospects, scored against its gold.")] = None,
    split: Annotated[str, typer.Option(help="Demo world split: train, heldout or all.")] = "all",
    yc: Annotated[Path | None, typer.Option(
        help="YC companies CSV (real rows, scored against their own fields).")] = None,
    prospects: Annotated[Path | None, typer.Option(help="A prospects CSV (no gold: research is not scored).")] = None,
    offer: Annotated[Path | None, typer.Option(help="Offer TOML (needed with --yc and --prospects).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N prospects.")] = None,
    reference: Annotated[str | None, typer.Option(
        help="Configuration the others are judged against (default: the first).")] = None,
    judge: Annotated[str | None, typer.Option(help="Pairwise judge: rubric (offline) or a backend spec.")] = None,
    instance_price: Annotated[list[str] | None, typer.Option(
        help="USD per instance hour of a local backend, SPEC_OR_KIND=PRICE (repeat); "
             "default heuristic=0, miniature=0.")] = None,
    run_name: Annotated[str, typer.Option(
        help="Name of this evaluation; campaigns are `<name>:<config>`. Rerun to resume.")] = "eval",
    out: Annotated[Path, typer.Option(help="Folder for report.html, report.json and plots/.")] = Path("eval-report"),
    concurrency: Annotated[int | None, typer.Option(help="Prospects in flight at once per configuration.")] = None,
    probe: Annotated[int, typer.Option(
        help="Prospects run first; if all fail, the configuration is reported failed.")] = 3,
    retry_failed: Annotated[bool, typer.Option(help="When resuming, also rerun prospects that failed before.")] = False,
    store: StoreOpt = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus file (setting corpus_path).")] = None,
    settings_file: SettingsOpt = None,
) -> None:
    """Evaluate configurations side by side on one set of prospects: research P/R/F1 against gold, an email
    rubric, pairwise judgement against a reference, cost and speed; writes an HTML report with plots and JSON.

    Examples:

    * `outreach eval --world world --config teacher=heuristic,heuristic --config short=heuristic,heuristic,max_pages=1`
    * `outreach eval --world world --split heldout --config eval.toml --judge openai:gpt-4.1-mini`
    """
    from evals.report import write_report
    from evals.runner import EvalSpecError, run_eval
    from outreach.pipeline import open_web
    from store import open_store

    settings = settings_or_exit(settings_file, store_url=store, corpus_path=corpus, concurrency=concurrency)
    try:
        configs, plan_reference, plan_judge, prices = _configs(config or [])
    except (EvalSpecError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    if not configs:
        raise _fail("give at least one --config NAME=RESEARCHER_SPEC,WRITER_SPEC (or a TOML file)")
    if require_eval_extras("outreach eval", configs, judge or plan_judge):
        quiet_library_bars()  # miniatures load in-process: one bar per configuration, not the libraries' own
    instance_prices = _instance_prices(instance_price or [], prices)
    eval_set = _eval_set(world, split, yc, prospects, offer, limit, settings.corpus_path)
    engine = open_store(settings.store_url)
    try:
        web = open_web(settings, engine)
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from exc

    with eval_progress(len(eval_set.prospects)) as on_event:
        try:
            result = asyncio.run(run_eval(
                engine, eval_set, configs, web=web, run_name=run_name, reference=reference or plan_reference,
                judge=judge or plan_judge or "rubric", prices=settings.price_table(), instance_prices=instance_prices,
                cost_basis=settings.cost_basis(), concurrency=settings.concurrency, probe=probe,
                prospect_timeout_s=settings.prospect_timeout_s,
                retry_failed=retry_failed, unpersonalised_emails=settings.unpersonalised_emails, on_event=on_event))
        except (EvalSpecError, ValueError) as exc:
            raise _fail(str(exc)) from exc
    files = write_report(result, out)
    for table in overview_tables(result):
        console.print(table)
    for c in result.configs:
        if c.status == "failed":
            err.print(f"[red]configuration {c.name} failed:[/red] {c.error}", highlight=False, soft_wrap=True)
    for note in result.notes:
        err.print(f"[yellow]{note}[/yellow]", highlight=False, soft_wrap=True)
    console.print(f"report: {files.html}  figures: {files.json}  ({result.elapsed_s:.1f} s)", soft_wrap=True)


# ------------------------------------------------------------------------------------------------
# outreach abtest
# ------------------------------------------------------------------------------------------------


def _p(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _print_ab(report: ABReport) -> None:
    for table in _ab_tables(report):
        console.print(table)
    if not report.comparisons:
        console.print("only one variant: nothing to compare")


def _ab_tables(report: ABReport) -> list[Table]:
    """Rates per variant with intervals, and (with two variants or more) each against the control."""
    from evals.abtest import METRICS

    rates = Table(title=f"rates per variant ({report.confidence:.0%} Wilson intervals)")
    for name in ("variant", "metric", "count / base", "rate", "interval"):
        rates.add_column(name, justify="left" if name in ("variant", "metric") else "right")
    for name, per in report.rates.items():
        for metric, r in per.items():
            rates.add_row(name, metric, f"{r.count:,} / {r.n:,} {METRICS[metric]}", f"{r.rate:.2%}",
                          f"[{r.ci_low:.2%}, {r.ci_high:.2%}]")
        rates.add_section()
    if not report.comparisons:
        return [rates]
    comp = Table(title=f"each variant against the control {report.control} (two-sided tests)")
    for name in ("metric", "variant", "rates", "lift [interval]", "p z-test", "p Fisher", "sig."):
        comp.add_column(name, justify="left" if name in ("metric", "variant") else "right")
    for c in report.comparisons:
        lift = "-" if math.isnan(c.lift) else (
            f"{c.lift:+.1%}" + ("" if math.isnan(c.lift_ci_low) else f" [{c.lift_ci_low:+.1%}, {c.lift_ci_high:+.1%}]"))
        comp.add_row(c.metric, c.b, f"{c.rate_a.rate:.2%} -> {c.rate_b.rate:.2%}", lift, _p(c.p_value_z),
                     _p(c.p_value_fisher), "yes" if c.significant() else "no")
    return [rates, comp]


def print_ab_section(section: ABSection) -> None:
    """Print a campaign's A/B section (``evals.abtest.ABSection``): arms, rates with intervals, tests, send plans."""
    for table in ab_section_tables(section):
        console.print(table)
    for note in section.notes:
        console.print(note, highlight=False, soft_wrap=True)


def ab_section_tables(section: ABSection) -> list[Table]:
    """The tables of a campaign's A/B section: arms, rates with intervals and tests (once there are events), and
    the sends a conclusive result needs (its notes go in the last table's caption)."""
    tables = []
    arms = Table(title=f"A/B test of campaign {section.campaign}: arms (seed {section.seed}; control "
                       f"{section.control}; {section.events:,} events)")
    for name in ("arm", "share", "researcher", "writer", "valid emails", "messages with events"):
        arms.add_column(name, justify="right" if name in ("share", "valid emails", "messages with events") else "left")
    for a in section.arms:
        arms.add_row(a.name, f"{a.share:.0%}", a.researcher, a.writer, f"{a.emails:,}", f"{a.sent:,}")
    tables.append(arms)
    if section.rates:
        from evals.abtest import ABReport, count_variants

        tables += _ab_tables(ABReport(control=section.control, variants=count_variants([]), rates=section.rates,
                                      comparisons=section.comparisons, confidence=section.confidence))
    plans = Table(title="sends a conclusive result needs (abtest plan; two-sided)")
    for name in ("metric", "baseline", "to detect", "needed per arm", "smallest arm has", "more per arm",
                 "conclusive now"):
        plans.add_column(name, justify="left" if name == "metric" else "right")
    for p in section.plans:
        plans.add_row(p.metric, f"{p.baseline:.2%} ({p.baseline_from})", f"{p.mde:+.0%} -> {p.target:.2%}",
                      f"{p.n_per_arm:,}", f"{p.have_per_arm:,}", f"{p.more_per_arm:,}",
                      f"yes (p {_p(p.p_value_fisher)})" if p.conclusive else
                      ("no" if math.isnan(p.p_value_fisher) else f"no (p {_p(p.p_value_fisher)})"))
    tables.append(plans)
    return tables


@abtest_app.command("report")
def abtest_report(
    events: Annotated[Path, typer.Argument(help="Events CSV or JSONL (columns: event, message_id or recipient, "
                                                "variant (not needed for events of this store's emails), campaign, "
                                                "timestamp, email_id; see evals.abtest).")],
    control: Annotated[str | None, typer.Option(help="Control variant (default: the first in the file).")] = None,
    confidence: Annotated[float, typer.Option(help="Two-sided confidence level of the intervals.")] = 0.95,
    save: Annotated[bool, typer.Option(
        "--save/--no-save", help="Store the events in the engagement_events table.")] = True,
    all_stored: Annotated[bool, typer.Option(help="Report on every event in the store, not only this file's.")] = False,
    campaign: Annotated[str | None, typer.Option(
        help="Campaign of rows without a campaign column, to join them by recipient (also limits --all-stored).")
    ] = None,
    store: StoreOpt = None,
    settings_file: SettingsOpt = None,
) -> None:
    """Import engagement events, join them to the store's emails and report per-arm rates (Wilson intervals),
    z-test, Fisher's exact test, relative lift with its interval and the sends a conclusive result needs.

    An event is joined to its email by `Message-ID` (as exported and sent), else by recipient and campaign;
    its arm comes from the store (campaigns run with `outreach run --arm`), so no variant column is needed.
    Events that cannot be joined and carry no variant are reported by line. With `--no-save` the file is read
    alone, unless `--store` is given.

    Example: `outreach abtest report events.csv` (after `outreach run ... --arm A=R,W --arm B=R,W`)
    """
    require_extras("outreach abtest report", "eval")
    from evals.abtest import ab_report, ab_section, group_by_campaign, import_events, load_events, read_events

    if not 0 < confidence < 1:
        raise _fail(f"--confidence {confidence}: use a level in (0, 1), e.g. 0.95")
    engine = None
    try:
        if save or all_stored or store:
            from store import open_store

            engine = open_store(settings_or_exit(settings_file, store_url=store).store_url)
        parsed = (import_events(engine, events, campaign=campaign) if save and engine is not None
                  else read_events(events, engine, campaign=campaign))
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    for line, reason in parsed.errors:
        err.print(f"[yellow]{events}:{line}: skipped: {reason}[/yellow]", highlight=False, soft_wrap=True)
    for line, note in parsed.warnings:
        err.print(f"[yellow]{events}:{line}: {note}[/yellow]", highlight=False, soft_wrap=True)
    console.print(f"{events}: {len(parsed.events)} events read, {len(parsed.errors)} rows skipped"
                  + (f", {parsed.joined} joined to emails of the store" if engine is not None else "")
                  + (f", {parsed.stored} stored, {parsed.duplicates} already stored" if save else ""), soft_wrap=True)
    rows = load_events(engine, campaign=campaign) if all_stored and engine is not None else parsed.events
    if not rows:
        raise _fail("no valid events to report on", code=1)
    for name, group in group_by_campaign(rows).items():
        if name and engine is not None:
            try:
                section = ab_section(engine, name, events=group, confidence=confidence)
            except KeyError:  # a campaign without arms: its events carry their own variants
                section = None
            if section is not None:
                print_ab_section(section)
                continue
        if name:
            console.print(f"campaign {name} (no A/B arms: variants from the file)", highlight=False)
        try:
            report = ab_report(group, control=control, confidence=confidence)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        _print_ab(report)


@abtest_app.command("plan")
def abtest_plan(
    baseline: Annotated[float, typer.Option(help="The control's rate, e.g. 0.05 (5%). Real reply rates are ~0.017.")],
    mde: Annotated[float, typer.Option(help="Minimum detectable effect, relative (0.2 = +20%) unless --absolute.")],
    alpha: Annotated[float, typer.Option(help="Two-sided significance level.")] = 0.05,
    power: Annotated[float, typer.Option(help="Power (1 - type II error rate).")] = 0.8,
    absolute: Annotated[bool, typer.Option(help="--mde is an absolute difference in rate (0.01 = 1 point).")] = False,
    per_week: Annotated[int | None, typer.Option(
        help="Emails you send per week, to say how long the test takes.")] = None,
) -> None:
    """How many emails a conclusive A/B test needs, for a baseline rate and minimum detectable effect.

    Example: `outreach abtest plan --baseline 0.05 --mde 0.2`
    """
    require_extras("outreach abtest plan", "eval")
    from evals.abtest import REFERENCE_REPLY_RATE, sample_size

    try:
        size = sample_size(baseline, mde, alpha=alpha, power=power, relative=not absolute)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"baseline {size.baseline:.2%} -> target {size.target:.2%} "
                  f"(alpha {alpha:g} two-sided, power {power:.0%}):")
    console.print(f"[bold]{size.n_per_variant:,} emails per variant, {size.total:,} in all[/bold] "
                  f"(Cohen's h approximation: {size.n_cohen_h:,} per variant)", soft_wrap=True)
    if per_week:
        console.print(f"at {per_week:,} emails a week: {size.total / per_week:.1f} weeks")
    table = Table(title="emails per variant by minimum detectable (relative) lift")
    table.add_column("relative lift", justify="right")
    table.add_column(f"baseline {baseline:.2%}", justify="right")
    table.add_column(f"baseline {REFERENCE_REPLY_RATE:.2%} *", justify="right")
    for lift in (0.1, 0.2, 0.3, 0.5, 1.0):
        cells = []
        for base in (baseline, REFERENCE_REPLY_RATE):
            try:
                cells.append(f"{sample_size(base, lift, alpha=alpha, power=power).n_per_variant:,}")
            except ValueError:
                cells.append("-")
        table.add_row(f"+{lift:.0%}", *cells)
    console.print(table)
    console.print(f"* {REFERENCE_REPLY_RATE:.2%} is the median reply rate of 507 Italian B2B cold-email campaigns.")
    console.print("Smaller samples cannot tell these lifts from noise: stop the test only at the planned size.")
