"""The batch runner: a campaign over many prospects with bounded concurrency, per-prospect error
isolation and resume.

Resume works because each run's results and traces are committed in one transaction together with
its ``done``/``no_facts``/``failed`` status: after ``kill -9``, runs left ``pending`` or ``running`` have
written nothing and are simply run again, so no email or trace is duplicated or lost. ``done`` and
``no_facts`` runs are finished and never rerun on their own; ``failed`` ones rerun with ``retry_failed``,
``no_facts`` ones with ``retry_no_facts`` (e.g. after the corpus grew, or to write non-personalised
emails for them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, update
from sqlmodel import col, select

from agents.schemas import Offer, Profile, ProspectInfo
from graphs.campaign import graph
from graphs.context import CampaignContext
from graphs.models import ModelPool
from graphs.recorder import RecordingWeb, TraceRecorder
from miniatures.pricing import DEFAULT_PRICES, Price
from miniatures.redaction import RedactingFilter, redact
from store import session_scope
from store.models import (
    Campaign,
    EmailRecord,
    FactRecord,
    ProfileRecord,
    Prospect,
    Review,
    Run,
    RunStatus,
    utcnow,
)
from tools.types import Web

__all__ = ["BeforePersist", "CampaignReport", "RunEvent", "add_prospects", "run_campaign"]

logger = logging.getLogger(__name__)
logger.addFilter(RedactingFilter())  # a failed run's traceback may quote a backend's credentials


@dataclass(frozen=True)
class RunEvent:
    """Progress of one run, for progress bars: ``status`` is ``running``, ``done``, ``no_facts`` or ``failed``."""

    prospect: str
    status: str
    error: str | None = None


@dataclass
class CampaignReport:
    """What one ``run_campaign`` call did.

    ``no_facts`` counts runs whose research found no verified fact (``without_facts`` lists their
    prospect emails with what research saw); ``skipped`` counts runs finished (``done`` or ``no_facts``)
    before the call started and not rerun by it.
    """

    campaign: str
    total: int = 0
    done: int = 0
    no_facts: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    without_facts: list[tuple[str, str]] = field(default_factory=list)


def add_prospects(
    engine: Engine, campaign: str, offer: Offer, prospects: Sequence[tuple[int, ProspectInfo]], *, split: str = ""
) -> tuple[int, int]:
    """Create (or extend) a campaign with prospects; a prospect whose email is already in the
    campaign is left as it is. Returns ``(added, already_present)``."""
    with session_scope(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if record is None:
            record = Campaign(name=campaign, offer=offer.model_dump())
            session.add(record)
            session.flush()
        else:
            record.offer = offer.model_dump()
        existing = set(session.exec(select(Prospect.email).where(Prospect.campaign_id == record.id)).all())
        added = 0
        for row, p in prospects:
            if p.email in existing:
                continue
            existing.add(p.email)
            session.add(Prospect(campaign_id=record.id, row_number=row, split=split, **p.model_dump()))  # type: ignore[arg-type]
            added += 1
        return added, len(prospects) - added


#: Statuses of finished runs (``CampaignReport.skipped`` counts those a call does not rerun).
_FINISHED = {RunStatus.DONE, RunStatus.NO_FACTS}


def _pending_runs(engine: Engine, campaign: str, retry: set[str], limit: int | None
                  ) -> tuple[Campaign, list[tuple[Run, Prospect]], int]:
    """The campaign, its runs to do now (pending or interrupted ones, and those whose status is in
    ``retry``) and how many finished runs it leaves as they are."""
    with session_scope(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if record is None:
            raise KeyError(f"no campaign named {campaign!r} in the store; create it with `outreach run PROSPECTS.csv`")
        prospects = session.exec(
            select(Prospect).where(Prospect.campaign_id == record.id).order_by(Prospect.id)  # type: ignore[arg-type]
        ).all()
        runs = {r.prospect_id: r for r in session.exec(select(Run).where(Run.campaign_id == record.id)).all()}
        for p in prospects:
            if p.id not in runs:
                run = Run(campaign_id=record.id, prospect_id=p.id)  # type: ignore[arg-type]
                session.add(run)
                runs[p.id] = run  # type: ignore[index]
        session.flush()
        wanted = {RunStatus.PENDING, RunStatus.RUNNING} | retry
        todo = [(runs[p.id], p) for p in prospects if runs[p.id].status in wanted]  # type: ignore[index]
        finished = sum(1 for r in runs.values() if r.status in _FINISHED - wanted)
        if limit is not None:
            todo = todo[:limit]
        return record, todo, finished


def _mark_running(engine: Engine, run_id: int, researcher: str, writer: str) -> None:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.status, run.researcher, run.writer = RunStatus.RUNNING, redact(researcher), redact(writer)
        run.attempts += 1
        run.started_at, run.finished_at, run.error = utcnow(), None, None


#: Called with a run (attached to the saving session) and its recorder just before they are written.
BeforePersist = Callable[[Run, TraceRecorder], None]


def _persist(engine: Engine, run_id: int, final: Mapping[str, Any], recorder: TraceRecorder,
             before_persist: BeforePersist | None = None) -> None:
    """Write a run's profile, email, traces and tool calls and its status in ONE transaction."""
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        if before_persist is not None:
            before_persist(run, recorder)
        old = session.exec(select(ProfileRecord.id).where(ProfileRecord.run_id == run_id)).all()
        # A rerun (--retry-failed) replaces the run's profile and email; reviews of the old ones keep
        # their trace and note, and lose only the link to the rows that are replaced.
        old_emails = select(EmailRecord.id).where(EmailRecord.run_id == run_id)
        session.exec(update(Review).where(col(Review.email_id).in_(old_emails)).values(email_id=None))  # type: ignore[call-overload]
        if old:
            session.exec(update(Review).where(col(Review.profile_id).in_(old)).values(profile_id=None))  # type: ignore[call-overload]
            session.exec(delete(FactRecord).where(FactRecord.profile_id.in_(old)))  # type: ignore[call-overload,attr-defined]
            session.exec(delete(ProfileRecord).where(ProfileRecord.run_id == run_id))  # type: ignore[call-overload,arg-type]
        session.exec(delete(EmailRecord).where(EmailRecord.run_id == run_id))  # type: ignore[call-overload,arg-type]
        profile: Profile | None = final.get("profile")
        if profile is not None:
            prec = ProfileRecord(run_id=run_id, company=profile.company, website=profile.website,
                                 dropped_facts=profile.dropped_facts, drop_reasons=dict(profile.drop_reasons),
                                 sources=profile.sources)
            session.add(prec)
            session.flush()
            for fact in profile.facts:
                session.add(FactRecord(profile_id=prec.id, **fact.model_dump()))  # type: ignore[arg-type]
        draft, rendered, validation = final.get("draft"), final.get("rendered"), final.get("validation")
        if draft is not None and rendered is not None:
            session.add(EmailRecord(
                run_id=run_id, subject_template=draft.subject, body_template=draft.body,
                subject=rendered.subject, body=rendered.body,
                checks=validation.model_dump() if validation else {}, valid=bool(validation and validation.ok),
                personalised=final.get("personalised", True),
            ))
        session.flush()
        for trace in recorder.traces:
            trace.run_id = run_id
            session.add(trace)
        for call in recorder.tool_calls:
            call.run_id = run_id
            session.add(call)
        run.status = final.get("status", RunStatus.FAILED)
        run.error = final.get("error")
        run.finished_at = utcnow()


async def run_campaign(
    engine: Engine,
    campaign: str,
    *,
    web: Web,
    researcher: str = "heuristic",
    writer: str = "heuristic",
    concurrency: int = 4,
    models: ModelPool | None = None,
    prices: Mapping[str, Price] = DEFAULT_PRICES,
    max_pages: int = 5,
    prospect_timeout_s: float = 120.0,
    retry_failed: bool = False,
    retry_no_facts: bool = False,
    unpersonalised_emails: bool = False,
    limit: int | None = None,
    on_event: Callable[[RunEvent], None] | None = None,
    before_persist: BeforePersist | None = None,
) -> CampaignReport:
    """Run (or resume) a campaign: every prospect whose run is not finished goes through the graph.

    Args:
        engine: the store.
        campaign: campaign name (created by ``add_prospects``).
        web: where research searches and fetches (``tools.corpus.CorpusWeb`` or ``tools.fetch.LiveWeb``).
        researcher, writer: backend specs per agent.
        concurrency: runs in flight at once (``asyncio.Semaphore``), >= 1.
        models: built models to reuse (one is made when omitted).
        prices: price table for trace costs (US dollars per million tokens).
        max_pages: pages the researcher fetches per prospect.
        prospect_timeout_s: a run still going after this many seconds is marked failed.
        retry_failed: also rerun runs that failed before.
        retry_no_facts: also rerun runs whose research found no verified fact before (``no_facts``).
        unpersonalised_emails: when research finds no verified fact, still write an email without company
            facts (stored with ``EmailRecord.personalised = False``); by default such a run ends
            ``no_facts`` with no email.
        limit: run at most this many of the pending runs.
        on_event: called as each run starts and ends (for progress bars).
        before_persist: called with each finished run and its ``TraceRecorder`` inside the transaction
            that saves them, to adjust what is written (``finetune.replay`` links replayed traces).

    Returns:
        ``CampaignReport`` with counts, each failure's prospect email and reason, and each ``no_facts``
        prospect's email and what research saw.

    Raises:
        KeyError: no campaign of that name. A failing prospect never raises: it is marked failed.
        ValueError: ``concurrency`` < 1.
        miniatures.specs.BackendSpecError: a backend spec is malformed (checked before any run starts).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    started = time.perf_counter()
    models = models or ModelPool(store=engine)
    if models.store is None:
        models.store = engine  # miniature: specs are looked up in this campaign's store
    models.get(researcher), models.get(writer)  # fail fast on a bad spec, before touching any run
    retry = {s for s, on in ((RunStatus.FAILED, retry_failed), (RunStatus.NO_FACTS, retry_no_facts)) if on}
    record, todo, already_done = _pending_runs(engine, campaign, retry, limit)
    offer = Offer.model_validate(record.offer)
    report = CampaignReport(campaign=campaign, total=len(todo), skipped=already_done)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(run: Run, prospect: Prospect) -> None:
        async with semaphore:
            info = ProspectInfo(first_name=prospect.first_name, last_name=prospect.last_name, title=prospect.title,
                                email=prospect.email, company=prospect.company, website=prospect.website)
            assert run.id is not None
            _mark_running(engine, run.id, researcher, writer)
            if on_event:
                on_event(RunEvent(info.email, RunStatus.RUNNING))
            recorder = TraceRecorder({"researcher": researcher, "writer": writer}, prices)
            saved: dict[str, Any] = {}

            async def on_save(final: dict[str, Any]) -> None:
                saved.update(final)

            context = CampaignContext(offer=offer, web=RecordingWeb(web, recorder), researcher=researcher,
                                      writer=writer, models=models, max_pages=max_pages,
                                      unpersonalised_emails=unpersonalised_emails, on_save=on_save)
            try:
                await asyncio.wait_for(
                    graph.ainvoke({"prospect": info}, context=context, config={"callbacks": [recorder]}),
                    timeout=prospect_timeout_s,
                )
            except TimeoutError:
                saved = {**saved, "status": RunStatus.FAILED, "error": f"timed out after {prospect_timeout_s:g} s"}
            except Exception as exc:  # noqa: BLE001 - one prospect's failure never stops the campaign
                error = redact(f"{type(exc).__name__}: {exc}")
                logger.warning("run for %s failed: %s", info.email, error, exc_info=logger.isEnabledFor(logging.DEBUG))
                saved = {**saved, "status": RunStatus.FAILED, "error": error}
            saved["error"] = redact(saved.get("error"))  # an upstream error may echo a backend's key
            _persist(engine, run.id, saved, recorder, before_persist)
            status = saved.get("status", RunStatus.FAILED)
            if status == RunStatus.DONE:
                report.done += 1
            elif status == RunStatus.NO_FACTS:
                report.no_facts += 1
                report.without_facts.append((info.email, str(saved.get("error"))))
            else:
                report.failed += 1
                report.failures.append((info.email, str(saved.get("error"))))
            if on_event:
                on_event(RunEvent(info.email, status, saved.get("error")))

    await asyncio.gather(*(one(run, prospect) for run, prospect in todo))
    report.elapsed_s = time.perf_counter() - started
    return report

