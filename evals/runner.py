"""Evaluation runs: one set of prospects through several configurations, side by side.

What is measured is what runs: each configuration (a backend spec per agent) is run as its own
campaign in the store (``<run name>:<configuration name>``) through ``graphs.runner.run_campaign``, the
same code path as ``outreach run``; every figure is then read back from the store. Running the same
evaluation again resumes it (done prospects are not run twice).

Per configuration (``ConfigResult``):

* research: field precision, recall and F1 against gold (``evals.scoring.score_profiles``), the
  grounded-fact rate (facts kept / (kept + dropped by grounding)), the drops by reason (``ungrounded``,
  ``misattributed``, ``bad_value``) and the schema-valid rate (researcher model calls whose answer
  parses as ``ExtractionOutput``);
* runs: ``done``, ``no_facts`` (research kept no verified fact) and failed;
* email: the rubric's pass rate per check (``evals.rubric``), the graph's own validation rate and how
  many emails were written without a company fact (when the campaign opts in);
* pairwise: head-to-head against the reference configuration (``evals.judge``);
* cost and speed (``evals.costs``).

A configuration whose backend fails does not stop the others: a malformed spec or a missing
miniature fails before any run; an unreachable endpoint is found by the **probe** (the first
``probe`` prospects are run first, and when all of them fail the configuration is stopped and
reported as failed with the first reason instead of waiting on every prospect's timeouts). A probe
prospect that ends ``no_facts`` counts as a working backend.
"""

from __future__ import annotations

import logging
import re
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import Engine

from agents.parsing import OutputParseError, parse_model_output
from agents.schemas import FACT_FIELDS, EmailDraft, ExtractionOutput, Offer, Profile, ProspectInfo, RenderedEmail
from core.errors import UserError
from evals.abtest import ABSection, ab_sections
from evals.campaigns import CampaignRow, collect_rows, sum_drop_reasons
from evals.costs import DEFAULT_COST_BASIS, DEFAULT_INSTANCE_PRICES, CostBasis, CostFigures, cost_figures
from evals.judge import Judge, JudgeItem, LLMJudge, PairwiseResult, RubricJudge, judge_pairs
from evals.rubric import RUBRIC_CHECKS, RubricResult, RubricSummary, score_email, summarize_rubric
from evals.scoring import ExtractionScores, profile_values, score_profiles
from graphs.models import ModelPool
from graphs.runner import CampaignReport, RunEvent, add_prospects, run_campaign
from miniatures.pricing import DEFAULT_PRICES, Price
from miniatures.redaction import RedactingFilter, redact
from miniatures.specs import BackendSpecError, parse_backend_spec
from store.models import RunStatus, Trace
from tools.types import Web

__all__ = [
    "ConfigResult",
    "EmailFigures",
    "EvalConfig",
    "EvalPlan",
    "EvalResult",
    "EvalSet",
    "EvalSpecError",
    "PairwiseFigures",
    "ResearchFigures",
    "load_eval_plan",
    "parse_config",
    "run_eval",
    "world_eval_set",
    "yc_eval_set",
]

logger = logging.getLogger(__name__)
logger.addFilter(RedactingFilter())  # a failed configuration's traceback may quote a backend's credentials

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EvalSpecError(UserError, ValueError):
    """A configuration option or evaluation file is malformed; the message shows the accepted form."""


@dataclass(frozen=True)
class EvalConfig:
    """One configuration under evaluation.

    Attributes:
        name: short name (letters, digits, ``_ . -``; up to 64 characters), unique in an evaluation.
        researcher: backend spec of the researcher.
        writer: backend spec of the writer.
        max_pages: pages the researcher fetches per prospect.
    """

    name: str
    researcher: str = "heuristic"
    writer: str = "heuristic"
    max_pages: int = 5

    @property
    def backends(self) -> tuple[str, str]:
        """``(researcher, writer)`` specs."""
        return self.researcher, self.writer


def _check_name(name: str, where: str) -> str:
    if not _NAME.match(name):
        raise EvalSpecError(f"{where}: configuration name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                            "starting with a letter or digit")
    return name


def parse_config(text: str) -> EvalConfig:
    """Parse a ``--config`` option: ``NAME=RESEARCHER_SPEC,WRITER_SPEC[,max_pages=N]``.

    Examples: ``teacher=heuristic,heuristic``, ``mini=miniature:researcher-v1,miniature:writer-v1``,
    ``shallow=heuristic,heuristic,max_pages=1``. Specs are not checked here: a spec that cannot be built
    makes that configuration fail in the report, not the whole evaluation.

    Raises:
        EvalSpecError: the text does not have that form.
    """
    form = "NAME=RESEARCHER_SPEC,WRITER_SPEC[,max_pages=N], e.g. teacher=heuristic,heuristic"
    name, eq, rest = text.partition("=")
    parts = [p.strip() for p in rest.split(",")]
    if not eq or len(parts) not in (2, 3) or not all(parts):
        raise EvalSpecError(f"--config {text!r}: use {form}")
    max_pages = 5
    if len(parts) == 3:
        key, _, value = parts[2].partition("=")
        if key.strip() != "max_pages" or not value.strip().isdigit() or int(value) < 1:
            raise EvalSpecError(f"--config {text!r}: the third item must be max_pages=N with N >= 1; use {form}")
        max_pages = int(value)
    return EvalConfig(name=_check_name(name.strip(), "--config"), researcher=parts[0], writer=parts[1],
                      max_pages=max_pages)


@dataclass
class EvalPlan:
    """An evaluation file's content (``load_eval_plan``).

    Attributes:
        configs: configurations in report order.
        reference: name of the reference configuration (None: the first).
        judge: ``"rubric"`` or a backend spec.
        instance_prices: USD per instance hour by spec, model or kind (``evals.costs``).
    """

    configs: list[EvalConfig]
    reference: str | None = None
    judge: str = "rubric"
    instance_prices: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_INSTANCE_PRICES))


def load_eval_plan(path: Path) -> EvalPlan:
    """Load configurations from a TOML file.

    Format::

        reference = "teacher"          # optional; default: the first configuration
        judge = "rubric"               # optional; or a backend spec, e.g. "openai:gpt-4.1@http://host/v1"

        [instance_prices]              # optional; USD per instance hour, added to the defaults
        miniature = 0.35

        [[configs]]
        name = "teacher"
        researcher = "heuristic"
        writer = "heuristic"
        max_pages = 5                  # optional

    Raises:
        FileNotFoundError: no such file.
        EvalSpecError: not valid TOML, or a key is missing or of the wrong type (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EvalSpecError(f"{path}: not valid TOML ({exc})") from exc
    raw_configs = data.get("configs")
    if not isinstance(raw_configs, list) or not raw_configs:
        raise EvalSpecError(f"{path}: needs at least one [[configs]] table with name, researcher and writer")
    configs = []
    for i, item in enumerate(raw_configs, start=1):
        where = f"{path} [[configs]] #{i}"
        if not isinstance(item, dict):
            raise EvalSpecError(f"{where}: must be a table")
        unknown = set(item) - {"name", "researcher", "writer", "max_pages"}
        if unknown:
            raise EvalSpecError(f"{where}: unknown keys {sorted(unknown)}; use name, researcher, writer, max_pages")
        try:
            name, researcher, writer = item["name"], item["researcher"], item["writer"]
        except KeyError as exc:
            raise EvalSpecError(f"{where}: missing key {exc.args[0]!r}") from exc
        max_pages = item.get("max_pages", 5)
        if not all(isinstance(v, str) and v.strip() for v in (name, researcher, writer)):
            raise EvalSpecError(f"{where}: name, researcher and writer must be non-empty strings")
        if not isinstance(max_pages, int) or max_pages < 1:
            raise EvalSpecError(f"{where}: max_pages must be an integer >= 1")
        configs.append(EvalConfig(name=_check_name(name, where), researcher=researcher.strip(),
                                  writer=writer.strip(), max_pages=max_pages))
    prices = dict(DEFAULT_INSTANCE_PRICES)
    for key, value in (data.get("instance_prices") or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise EvalSpecError(f"{path} [instance_prices] {key}: must be a number >= 0 (USD per hour)")
        prices[key] = float(value)
    reference, judge = data.get("reference"), data.get("judge", "rubric")
    if reference is not None and not isinstance(reference, str):
        raise EvalSpecError(f"{path}: reference must be a configuration name")
    if not isinstance(judge, str) or not judge.strip():
        raise EvalSpecError(f"{path}: judge must be 'rubric' or a backend spec")
    return EvalPlan(configs=configs, reference=reference, judge=judge.strip(), instance_prices=prices)


@dataclass
class EvalSet:
    """The prospects an evaluation runs, their offer and (optionally) the gold to score research against.

    Attributes:
        name: label for the report (e.g. ``"demo world heldout"``).
        offer: the campaign offer.
        prospects: ``(row number, prospect)`` pairs.
        gold: ``{company: {field: value}}``, or None (research is then not scored).
        gold_fields: fields scored.
        ignore_missing_gold: skip fields whose gold is empty (real data).
        employee_tolerance: allowed relative error of ``employee_count``.
    """

    name: str
    offer: Offer
    prospects: list[tuple[int, ProspectInfo]]
    gold: dict[str, dict[str, str]] | None = None
    gold_fields: tuple[str, ...] = FACT_FIELDS
    ignore_missing_gold: bool = False
    employee_tolerance: float = 0.0


def world_eval_set(world_dir: Path, *, split: Literal["train", "heldout", "all"] = "all",
                   limit: int | None = None) -> EvalSet:
    """The demo world's prospects (a split or both) with its gold profiles.

    Args:
        world_dir: a folder written by ``evals.world.generate_world`` (its sites must be in the corpus).
        split: ``train``, ``heldout`` or ``all``.
        limit: keep the first ``limit`` prospects.

    Raises:
        FileNotFoundError: the world's files are missing.
        ValueError: an unknown split or a negative limit.
    """
    from evals.world import load_gold
    from graphs.inputs import load_offer, read_prospects_csv

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split {split!r} must be train, heldout or all")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0")
    world_dir = Path(world_dir)
    prospects: list[tuple[int, ProspectInfo]] = []
    for name in (("train", "heldout") if split == "all" else (split,)):
        path = world_dir / f"prospects_{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: generate a demo world first (outreach world generate)")
        prospects += read_prospects_csv(path).prospects
    prospects = prospects[:limit] if limit is not None else prospects
    gold = {n: g.facts for n, g in load_gold(world_dir).items()}
    return EvalSet(name=f"demo world ({split})", offer=load_offer(world_dir / "offer.toml"), prospects=prospects,
                   gold=gold)


def yc_eval_set(csv_path: Path, offer: Offer, *, limit: int = 30, employee_tolerance: float = 0.0) -> EvalSet:
    """Real companies: the Active, b2b-tagged YC rows as prospects, scored against the rows' own fields.

    The rows must be in the corpus research runs on (``outreach realdata companies`` or
    ``tools.import_csv``); only location, employee count and founded year are scored, and fields the
    row leaves empty are skipped.

    Raises:
        FileNotFoundError, ValueError: as ``evals.realdata.load_yc_companies``.
    """
    from evals.realdata import load_yc_companies, yc_gold, yc_prospects

    companies = [c for c in load_yc_companies(csv_path) if c.website.strip() not in ("", "https://", "http://")]
    companies = companies[:limit]
    prospects = [(i + 2, ProspectInfo(**p)) for i, p in enumerate(yc_prospects(companies))]
    return EvalSet(name=f"YC companies ({len(prospects)})", offer=offer, prospects=prospects,
                   gold=yc_gold(companies), gold_fields=("location", "employee_count", "founded_year"),
                   ignore_missing_gold=True, employee_tolerance=employee_tolerance)


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


class ResearchFigures(BaseModel):
    """Research quality of one configuration (rates in [0, 1]; None when undefined).

    ``dropped_facts`` is the total dropped by grounding; ``drop_reasons`` splits it by reason (every key
    of ``agents.schemas.DROP_REASONS``, e.g. ``misattributed``: the source is not about the prospect's
    company).
    """

    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    per_field: dict[str, dict[str, float]] = Field(default_factory=dict)
    facts: int = 0
    dropped_facts: int = 0
    drop_reasons: dict[str, int] = Field(default_factory=dict)
    grounded_fact_rate: float | None = None
    researcher_calls: int = 0
    schema_valid_rate: float | None = None


class EmailFigures(BaseModel):
    """Email quality of one configuration: rubric pass rates per check, over every prospect.
    ``unpersonalised`` counts emails written without a company fact (the campaign opted in)."""

    prospects: int
    written: int
    unpersonalised: int = 0
    pass_rates: dict[str, float]
    all_pass_rate: float
    mean_checks_passed: float
    graph_valid_rate: float


class PairwiseFigures(BaseModel):
    """Head-to-head figures against the reference (``evals.judge.PairwiseResult`` without outcomes)."""

    judge: str
    reference: str
    wins: int
    losses: int
    ties: int
    errors: int
    n: int
    judge_calls: int
    win_rate: float
    ci_low: float
    ci_high: float
    confidence: float


class ConfigResult(BaseModel):
    """Everything measured for one configuration. ``status`` is ``ok`` or ``failed`` (with ``error``);
    ``done``, ``no_facts`` (research kept no verified fact) and ``failed_runs`` count its runs by status."""

    name: str
    researcher: str
    writer: str
    max_pages: int
    campaign: str
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    prospects: int = 0
    done: int = 0
    no_facts: int = 0
    failed_runs: int = 0
    failures: list[tuple[str, str]] = Field(default_factory=list)
    research: ResearchFigures | None = None
    email: EmailFigures | None = None
    pairwise: PairwiseFigures | None = None
    cost: CostFigures | None = None


class EvalResult(BaseModel):
    """An evaluation's figures (what the JSON report holds)."""

    run_name: str
    eval_set: str
    n_prospects: int
    created_at: datetime
    elapsed_s: float
    reference: str
    judge: str
    confidence: float
    rubric_checks: list[str] = Field(default_factory=lambda: list(RUBRIC_CHECKS))
    instance_prices: dict[str, float] = Field(default_factory=dict)
    configs: list[ConfigResult] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    #: The A/B section of every campaign of the store that has arms (``evals.abtest.ab_sections``).
    ab_tests: list[ABSection] = Field(default_factory=list)

    def config(self, name: str) -> ConfigResult:
        """The result of the configuration called ``name``.

        Raises:
            KeyError: no such configuration.
        """
        for c in self.configs:
            if c.name == name:
                return c
        raise KeyError(f"no configuration {name!r} in this evaluation; have {[c.name for c in self.configs]}")


# ------------------------------------------------------------------------------------------------
# Reading a configuration's campaign back from the store
# ------------------------------------------------------------------------------------------------


def _research_figures(eval_set: EvalSet, rows: Mapping[str, CampaignRow], traces: Sequence[Trace]) -> ResearchFigures:
    facts = sum(len(r.profile.facts) for r in rows.values() if r.profile)
    profiles = [r.profile for r in rows.values() if r.profile]
    dropped = sum(p.dropped_facts for p in profiles)
    researcher_traces = [t for t in traces if t.agent == "researcher"]
    valid = 0
    for t in researcher_traces:
        if t.error:
            continue
        try:
            parse_model_output(t.output, ExtractionOutput)
            valid += 1
        except OutputParseError:
            pass
    figures = ResearchFigures(
        facts=facts, dropped_facts=dropped, drop_reasons=sum_drop_reasons(p.drop_reasons for p in profiles),
        grounded_fact_rate=facts / (facts + dropped) if facts + dropped else None,
        researcher_calls=len(researcher_traces),
        schema_valid_rate=valid / len(researcher_traces) if researcher_traces else None,
    )
    if eval_set.gold is not None:
        companies = {r.prospect.company for r in rows.values()}
        gold = {c: eval_set.gold.get(c, {}) for c in companies}
        predicted = {r.prospect.company: profile_values(r.profile, eval_set.gold_fields)
                     for r in rows.values() if r.profile}
        scores: ExtractionScores = score_profiles(
            {c: predicted.get(c, {}) for c in gold}, gold, eval_set.gold_fields,
            employee_tolerance=eval_set.employee_tolerance, ignore_missing_gold=eval_set.ignore_missing_gold)
        figures.precision, figures.recall, figures.f1 = scores.micro.precision, scores.micro.recall, scores.micro.f1
        figures.per_field = {f: {"precision": s.precision, "recall": s.recall, "f1": s.f1, "tp": s.tp,
                                 "predicted": s.n_pred, "gold": s.n_gold} for f, s in scores.per_field.items()}
    return figures


def _judge_items(offer: Offer, rows: Mapping[str, CampaignRow]) -> dict[str, JudgeItem]:
    items: dict[str, JudgeItem] = {}
    for key, row in rows.items():
        profile = row.profile or Profile(company=row.prospect.company, website=row.prospect.website)
        if row.email is None:
            rubric = RubricResult.missing(f"no email ({(row.run.error if row.run else None) or 'not run'})")
            items[key] = JudgeItem(row.prospect, offer, profile, None, None, rubric)
            continue
        e = row.email
        rubric = score_email(EmailDraft(subject=e.subject_template, body=e.body_template),
                             RenderedEmail(subject=e.subject, body=e.body), row.prospect, profile, offer)
        items[key] = JudgeItem(row.prospect, offer, profile, e.subject, e.body, rubric)
    return items


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    if (start.tzinfo is None) != (end.tzinfo is None):
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return (end - start).total_seconds() * 1000


def _store_span_s(rows: Mapping[str, CampaignRow]) -> float:
    """Wall time from the first run's start to the last run's end (for a fully resumed campaign)."""
    runs = [r.run for r in rows.values() if r.run and r.run.started_at and r.run.finished_at]
    if not runs:
        return 0.0
    span = _ms(min(r.started_at for r in runs if r.started_at), max(r.finished_at for r in runs if r.finished_at))
    return (span or 0.0) / 1000


# ------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------


async def _run_config(
    engine: Engine, campaign: str, config: EvalConfig, *, web: Web, models: ModelPool, prices: Mapping[str, Price],
    concurrency: int, probe: int, prospect_timeout_s: float, retry_failed: bool, unpersonalised_emails: bool,
    on_event: Callable[[RunEvent], None] | None,
) -> tuple[list[CampaignReport], str | None]:
    """Run one configuration's campaign (probe first); returns its reports and a failure reason or None."""
    reports: list[CampaignReport] = []
    kwargs: dict[str, Any] = dict(web=web, researcher=config.researcher, writer=config.writer, concurrency=concurrency,
                                  models=models, prices=prices, max_pages=config.max_pages,
                                  prospect_timeout_s=prospect_timeout_s, retry_failed=retry_failed,
                                  unpersonalised_emails=unpersonalised_emails, on_event=on_event)
    try:
        for spec in config.backends:
            parse_backend_spec(spec)
        if probe > 0:
            first = await run_campaign(engine, campaign, limit=probe, **kwargs)
            reports.append(first)
            if first.total and not first.done and not first.no_facts:
                reason = first.failures[0][1] if first.failures else "unknown error"
                return reports, (f"all {first.failed} probe prospects failed (researcher {redact(config.researcher)}, "
                                 f"writer {redact(config.writer)}); first reason: {reason}")
        reports.append(await run_campaign(engine, campaign, **kwargs))
    except BackendSpecError as exc:
        return reports, str(exc)
    except Exception as exc:  # noqa: BLE001 - one configuration's failure never stops the others
        error = redact(f"{type(exc).__name__}: {exc}")
        logger.warning("configuration %s failed: %s", config.name, error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return reports, error
    return reports, None


def _judge_for(spec: str, models: ModelPool) -> Judge:
    if spec == "rubric":
        return RubricJudge()
    return LLMJudge(models.get(spec), redact(spec))


async def run_eval(
    engine: Engine,
    eval_set: EvalSet,
    configs: Sequence[EvalConfig],
    *,
    web: Web,
    run_name: str = "eval",
    reference: str | None = None,
    judge: str = "rubric",
    prices: Mapping[str, Price] = DEFAULT_PRICES,
    instance_prices: Mapping[str, float] = DEFAULT_INSTANCE_PRICES,
    cost_basis: CostBasis = DEFAULT_COST_BASIS,
    concurrency: int = 4,
    probe: int = 3,
    prospect_timeout_s: float = 120.0,
    retry_failed: bool = False,
    unpersonalised_emails: bool = False,
    models: ModelPool | None = None,
    confidence: float = 0.95,
    on_event: Callable[[str, RunEvent], None] | None = None,
) -> EvalResult:
    """Run ``eval_set`` through every configuration (one campaign each) and measure them side by side.

    Args:
        engine: the store; campaigns ``<run_name>:<config name>`` are created or resumed in it.
        eval_set: prospects, offer and gold (``world_eval_set``, ``yc_eval_set``).
        configs: configurations in report order; names must be unique.
        web: where research searches and fetches (the same for every configuration).
        run_name: prefix of the campaigns (letters, digits, ``_ . -``); the same name resumes.
        reference: the configuration the others are judged against (default: the first).
        judge: ``"rubric"`` (offline) or any backend spec (an LLM judge, ``evals.judge``).
        prices: per-token price table (US dollars per million tokens).
        instance_prices: USD per instance hour for local backends (``evals.costs``).
        cost_basis: the heuristic's stand-in model and the local miniatures' instance (settings ``[costs]``).
        concurrency: prospects in flight at once within a configuration (configurations run one after
            another, so their timings do not disturb each other), >= 1.
        probe: prospects run first; when all of them fail the configuration is reported failed (0: no probe).
        prospect_timeout_s: a run taking longer is marked failed.
        retry_failed: when resuming, also rerun prospects that failed before (e.g. the endpoint is back).
        unpersonalised_emails: write a non-personalised email for prospects without a verified fact
            (labelled so); by default they end ``no_facts`` without an email.
        models: built models to reuse (a scripted fake model in tests); one pool is shared by all.
        confidence: two-sided level of the win-rate intervals.
        on_event: ``on_event(config name, RunEvent)`` as runs start and end (progress bars).

    Returns:
        ``EvalResult``; a configuration that failed has ``status="failed"`` and ``error``, the others
        are complete.

    Raises:
        EvalSpecError: no configurations, repeated names, a bad ``run_name`` or an unknown ``reference``.
        ValueError: ``eval_set`` has no prospects, or ``concurrency``/``probe`` out of range.
    """
    started = time.perf_counter()
    if not configs:
        raise EvalSpecError("no configurations to evaluate; give --config NAME=RESEARCHER,WRITER or a TOML file")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise EvalSpecError(f"configuration names must be unique, got {names}")
    _check_name(run_name, "run name")
    reference = reference or names[0]
    if reference not in names:
        raise EvalSpecError(f"reference {reference!r} is not a configuration; have {names}")
    if not eval_set.prospects:
        raise ValueError(f"evaluation set {eval_set.name!r} has no prospects")
    if concurrency < 1 or probe < 0:
        raise ValueError(f"concurrency must be >= 1 and probe >= 0, got {concurrency} and {probe}")
    models = models or ModelPool(timeout_s=prospect_timeout_s, store=engine)
    if models.store is None:
        models.store = engine
    emails = [p.email for _, p in eval_set.prospects]

    results: list[ConfigResult] = []
    items: dict[str, dict[str, JudgeItem]] = {}
    for config in configs:
        campaign = f"{run_name}:{config.name}"
        add_prospects(engine, campaign, eval_set.offer, eval_set.prospects, split="eval")
        callback = (lambda ev, _n=config.name: on_event(_n, ev)) if on_event else None
        reports, error = await _run_config(
            engine, campaign, config, web=web, models=models, prices=prices, concurrency=concurrency, probe=probe,
            prospect_timeout_s=prospect_timeout_s, retry_failed=retry_failed,
            unpersonalised_emails=unpersonalised_emails, on_event=callback)
        rows, traces = collect_rows(engine, campaign, emails)
        ran = sum(r.total for r in reports)
        wall_s = sum(r.elapsed_s for r in reports) if ran else _store_span_s(rows)
        result = ConfigResult(
            name=config.name, researcher=redact(config.researcher), writer=redact(config.writer),
            max_pages=config.max_pages,
            campaign=campaign, status="failed" if error else "ok", error=error, prospects=len(rows),
            done=sum(bool(r.run and r.run.status == RunStatus.DONE) for r in rows.values()),
            no_facts=sum(bool(r.run and r.run.status == RunStatus.NO_FACTS) for r in rows.values()),
            failed_runs=sum(bool(r.run and r.run.status == RunStatus.FAILED) for r in rows.values()),
            failures=[(k, r.run.error or "") for k, r in rows.items()
                      if r.run and r.run.status == RunStatus.FAILED][:10],
        )
        if error is None:
            config_items = _judge_items(eval_set.offer, rows)
            items[config.name] = config_items
            summary: RubricSummary = summarize_rubric([i.rubric for i in config_items.values()])
            written = [r for r in rows.values() if r.email is not None]
            result.research = _research_figures(eval_set, rows, traces)
            result.email = EmailFigures(
                prospects=summary.n, written=summary.written,
                unpersonalised=sum(bool(r.email and not r.email.personalised) for r in written),
                pass_rates=summary.pass_rates,
                all_pass_rate=summary.all_pass_rate, mean_checks_passed=summary.mean_passed,
                graph_valid_rate=sum(bool(r.email and r.email.valid) for r in written) / len(rows) if rows else 0.0)
            run_ms = [ms for r in written if r.run and (ms := _ms(r.run.started_at, r.run.finished_at)) is not None]
            result.cost = cost_figures(
                backends=config.backends, emails=len(written),
                call_tokens=[(t.input_tokens, t.output_tokens) for t in traces],
                call_costs_usd=[t.cost_usd for t in traces], call_latencies_ms=[t.latency_ms for t in traces],
                run_latencies_ms=run_ms, wall_s=wall_s, prices=prices, instance_prices=instance_prices,
                call_backends=[t.backend for t in traces], basis=cost_basis)
        logger.info("configuration %s: %s (%d done, %d failed, %.1f s)", config.name, result.status, result.done,
                    result.failed_runs, wall_s)
        results.append(result)

    notes: list[str] = []
    if reference not in items:
        notes.append(f"the reference configuration {reference!r} failed, so no pairwise judgement was made")
    else:
        try:
            judge_impl = _judge_for(judge, models)
        except BackendSpecError as exc:
            judge_impl = None
            notes.append(f"judge {judge!r} could not be built ({exc}); no pairwise judgement was made")
        if judge_impl is not None:
            for result in results:
                if result.name == reference or result.name not in items:
                    continue
                pair: PairwiseResult = await judge_pairs(items[reference], items[result.name], judge_impl,
                                                         reference_name=reference, concurrency=concurrency,
                                                         confidence=confidence)
                result.pairwise = PairwiseFigures(
                    judge=pair.judge, reference=reference, wins=pair.wins, losses=pair.losses, ties=pair.ties,
                    errors=pair.errors, n=pair.n, judge_calls=pair.judge_calls, win_rate=pair.win_rate,
                    ci_low=pair.ci_low, ci_high=pair.ci_high, confidence=confidence)
    for result in results:
        if result.cost:
            notes += [f"{result.name}: {u}" for u in result.cost.unpriced]
    return EvalResult(
        run_name=run_name, eval_set=eval_set.name, n_prospects=len(eval_set.prospects),
        created_at=datetime.now(UTC), elapsed_s=time.perf_counter() - started, reference=reference, judge=judge,
        confidence=confidence, instance_prices=dict(instance_prices), configs=results, notes=notes,
        ab_tests=ab_sections(engine, confidence=confidence))
