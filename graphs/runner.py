"""The batch runner: a campaign over many prospects with bounded concurrency, per-prospect error
isolation, resume, and any number of workers (processes, machines) sharing one store.

A worker (one ``run_campaign`` call) claims runs one at a time as its concurrency frees a slot
(``store.claims``: atomic claims with a lease it renews while the run works), so several workers on one
campaign never take the same run. A worker that dies leaves its runs ``running`` under leases that stop
being renewed; once they expire (at once for a dead process of this machine) any worker claims them
again. A worker keeps going until no run is left to do, waiting for leases held by others to end.

Resume works because each run's results and traces are committed in one transaction together with
its ``done``/``no_facts``/``failed`` status, and that transaction is fenced: it writes only if the
run's claim is still the worker's own (``store.claims.fence``). After ``kill -9``, runs left ``pending``
or ``running`` have written nothing and are simply run again; a worker that was paused past its lease
finds its claim taken and drops its late result. So no email or trace is duplicated or lost. ``done``
and ``no_facts`` runs are finished and never rerun on their own; ``failed`` ones rerun with
``retry_failed``, ``no_facts`` ones with ``retry_no_facts`` (those finished before the call started,
each once however many workers are given the flag).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Engine, delete, func, update
from sqlalchemy.orm import make_transient
from sqlmodel import col, select

from agents.schemas import Offer, Profile, ProspectInfo
from graphs.arms import ArmPlan, load_arms, run_backends
from graphs.campaign import graph
from graphs.context import CampaignContext
from graphs.models import ModelPool
from graphs.recorder import RecordingWeb, TraceRecorder
from miniatures.pricing import DEFAULT_PRICES, Price
from miniatures.redaction import RedactingFilter, redact
from store import session_scope
from store.claims import (
    DEFAULT_LEASE_S,
    Claim,
    LeaseLost,
    StoreUnavailableError,
    claim_next,
    claim_run,
    dead_local_owners,
    exclusive_session,
    fence,
    is_store_unavailable,
    live_lease_owners,
    new_worker_id,
    release,
    renew,
)
from store.exports import new_message_id
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

__all__ = ["DEFAULT_LEASE_S", "BeforePersist", "CampaignReport", "RunEvent", "add_prospects", "run_campaign"]

logger = logging.getLogger(__name__)
logger.addFilter(RedactingFilter())  # a failed run's traceback may quote a backend's credentials

_T = TypeVar("_T")


@dataclass(frozen=True)
class RunEvent:
    """Progress of one run, for progress bars: ``status`` is ``running``, ``done``, ``no_facts``, ``failed``
    or ``discarded`` (the run's lease was lost to another worker, which redoes it; its result was dropped)."""

    prospect: str
    status: str
    error: str | None = None


@dataclass
class CampaignReport:
    """What one ``run_campaign`` call (one worker) did.

    ``total`` counts the runs this call claimed; ``no_facts`` counts runs whose research found no
    verified fact (``without_facts`` lists their prospect emails with what research saw); ``skipped``
    counts runs finished (``done`` or ``no_facts``) before the call started and not rerun by it;
    ``discarded`` counts runs whose lease expired while they worked and were claimed by another worker
    (their results were dropped; the other worker's stand). ``worker`` is the worker's name in the store
    (``runs.lease_owner``).
    """

    campaign: str
    total: int = 0
    done: int = 0
    no_facts: int = 0
    failed: int = 0
    skipped: int = 0
    discarded: int = 0
    elapsed_s: float = 0.0
    worker: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)
    without_facts: list[tuple[str, str]] = field(default_factory=list)


def _campaign_lock(campaign: str) -> str:
    """The advisory-lock key under which a campaign's prospects and runs are created (PostgreSQL)."""
    return f"outreach:campaign:{campaign}"


def add_prospects(
    engine: Engine, campaign: str, offer: Offer, prospects: Sequence[tuple[int, ProspectInfo]], *, split: str = ""
) -> tuple[int, int]:
    """Create (or extend) a campaign with prospects; a prospect whose email is already in the
    campaign is left as it is. Returns ``(added, already_present)``.

    Safe when several processes add the same prospects at once (each ``outreach run`` of a campaign
    does): the additions are serialised (``store.claims.exclusive_session``), so the second finds the
    first's rows instead of failing on their unique keys.
    """
    with exclusive_session(engine, _campaign_lock(campaign)) as session:
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


def _without_run(campaign_id: int) -> Any:
    """Ids of the campaign's prospects that have no run yet, in prospect order."""
    has_run = select(Run.id).where(Run.prospect_id == Prospect.id, Run.campaign_id == campaign_id).exists()
    return select(Prospect.id).where(Prospect.campaign_id == campaign_id, ~has_run).order_by(col(Prospect.id))


def _prepare(engine: Engine, campaign: str, retry: set[str]) -> tuple[Campaign, deque[tuple[int, int]], int]:
    """Make sure every prospect of the campaign has a run; return the campaign, the runs to rerun now
    (``(run id, claim_id)`` of those whose status is in ``retry``) and how many finished runs stay as they are.

    Raises:
        KeyError: no campaign of that name.
    """
    with session_scope(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if record is None:
            raise KeyError(f"no campaign named {campaign!r} in the store; create it with `outreach run PROSPECTS.csv`")
        missing = session.exec(_without_run(record.id).limit(1)).first()  # type: ignore[arg-type]
    if missing is not None:
        with exclusive_session(engine, _campaign_lock(campaign)) as session:  # another worker may be adding them
            for prospect_id in session.exec(_without_run(record.id)).all():  # type: ignore[arg-type]
                session.add(Run(campaign_id=record.id, prospect_id=prospect_id))  # type: ignore[arg-type]
    with session_scope(engine) as session:
        retry_runs = deque(session.exec(
            select(Run.id, Run.claim_id).where(Run.campaign_id == record.id, col(Run.status).in_(sorted(retry)))
            .order_by(col(Run.id))).all()) if retry else deque()
        finished = session.exec(select(func.count()).select_from(Run).where(
            Run.campaign_id == record.id, col(Run.status).in_(sorted(_FINISHED - retry)))).one()
    return record, retry_runs, int(finished)  # type: ignore[return-value]


#: Called with a run (attached to the saving session) and its recorder just before they are written.
BeforePersist = Callable[[Run, TraceRecorder], None]


def _persist(engine: Engine, claim: Claim, final: Mapping[str, Any], recorder: TraceRecorder,
             before_persist: BeforePersist | None = None, *, researcher: str = "", writer: str = "") -> None:
    """Write a run's profile, email, traces and tool calls and its status in ONE transaction, fenced:
    only while ``claim`` still holds the run (checked and locked first, in that transaction).

    Raises:
        store.claims.LeaseLost: another worker claimed the run since; nothing was written.
    """
    run_id = claim.run_id
    with session_scope(engine) as session:
        fence(session, claim, status=final.get("status", RunStatus.FAILED), error=final.get("error"),
              finished_at=utcnow(), researcher=redact(researcher), writer=redact(writer))
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
            campaign_offer = (session.get(Campaign, run.campaign_id) or Campaign(name="")).offer
            session.add(EmailRecord(
                run_id=run_id, subject_template=draft.subject, body_template=draft.body,
                subject=rendered.subject, body=rendered.body,
                checks=validation.model_dump() if validation else {}, valid=bool(validation and validation.ok),
                personalised=final.get("personalised", True),
                message_id=new_message_id(str(campaign_offer.get("sender_email", ""))),  # RFC 5322, unique
            ))
        session.flush()
        for trace in recorder.traces:
            trace.run_id = run_id
            session.add(trace)
        for call in recorder.tool_calls:
            call.run_id = run_id
            session.add(call)


def _forget_ids(recorder: TraceRecorder) -> None:
    """Make a recorder's rows new again after a failed save (a rolled-back flush leaves their ids set)."""
    for row in (*recorder.traces, *recorder.tool_calls):
        make_transient(row)
        row.id = None


class _LeaseKeeper:
    """Renews one claim's lease every third of ``lease_s`` while its run works, in a background task.

    When the store says the claim was taken (the lease expired meanwhile, e.g. the worker stalled),
    ``lost`` turns True and ``on_lost`` is called (the runner cancels the run's graph: its result would be
    refused anyway). A store that does not answer is logged and tried again at the next renewal.
    """

    def __init__(self, engine: Engine, claim: Claim, lease_s: float, on_lost: Callable[[], object]) -> None:
        self.engine, self.claim, self.lease_s, self.on_lost = engine, claim, lease_s, on_lost
        self.lost = False
        self._task = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                held = await asyncio.to_thread(renew, self.engine, self.claim, lease_s=self.lease_s)
            except Exception as exc:  # noqa: BLE001 - only an unreachable store is tolerated, see below
                if not is_store_unavailable(exc):
                    raise
                logger.warning("run %d: could not renew its lease (%s); trying again in %.1f s",
                               self.claim.run_id, redact(str(exc).splitlines()[0]), self.lease_s / 3)
                continue
            if not held:
                self.lost = True
                self.on_lost()
                return

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class _Worker:
    """One ``run_campaign`` call: claims runs as slots free up, runs each through the graph, saves it fenced."""

    def __init__(self, engine: Engine, record: Campaign, retry_runs: deque[tuple[int, int]], *, web: Web,
                 researcher: str, writer: str, plan: ArmPlan | None, models: ModelPool, prices: Mapping[str, Price],
                 concurrency: int, max_pages: int, prospect_timeout_s: float, unpersonalised_emails: bool,
                 limit: int | None, on_event: Callable[[RunEvent], None] | None,
                 before_persist: BeforePersist | None, report: CampaignReport, lease_s: float, retry: set[str]) -> None:
        assert record.id is not None
        self.engine, self.campaign_id, self.retry_runs, self.retry = engine, record.id, retry_runs, retry
        self.offer = Offer.model_validate(record.offer)
        self.web, self.researcher, self.writer, self.plan = web, researcher, writer, plan
        self.models, self.prices, self.concurrency, self.max_pages = models, prices, concurrency, max_pages
        self.prospect_timeout_s, self.unpersonalised_emails = prospect_timeout_s, unpersonalised_emails
        self.limit, self.on_event, self.before_persist, self.report = limit, on_event, before_persist, report
        self.lease_s, self.owner = lease_s, report.worker
        #: How often a worker with nothing to claim looks again for leases that ended, seconds.
        self.poll_s = max(0.05, min(lease_s / 4, 2.0))
        # Store calls run in a thread of their own, one at a time in the order asked, so that waiting for
        # another worker's write lock (SQLite) does not stall this worker's other runs; inline for an
        # in-memory SQLite store, whose database lives in one thread's connection.
        url = engine.url
        in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
        self._store_thread = None if in_memory else ThreadPoolExecutor(1, thread_name_prefix="outreach-store")

    # --- the store, tolerating a short outage --------------------------------------------------------------

    async def _store(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()`` (a store operation), retried with backoff while the store does not answer, for up to one
        lease; then ``StoreUnavailableError`` (the runs this worker holds are redone after their leases)."""
        deadline, delay = time.monotonic() + self.lease_s, 0.1
        while True:
            try:
                if self._store_thread is None:
                    return call()
                return await asyncio.get_running_loop().run_in_executor(self._store_thread, call)
            except Exception as exc:
                if not is_store_unavailable(exc):
                    raise
                if time.monotonic() >= deadline:
                    store = self.engine.url.render_as_string(hide_password=True)
                    first_line = redact(str(getattr(exc, "orig", None) or exc).splitlines()[0])
                    raise StoreUnavailableError(
                        f"lost the store {store} while {what} ({first_line}); this worker stopped. Nothing saved is "
                        f"lost: the runs it held are redone by any worker once their leases end (within "
                        f"{self.lease_s:g} s). Check that the store is reachable, then run the command again."
                    ) from exc
                logger.warning("store unavailable while %s (%s); trying again in %.1f s", what,
                               redact(str(exc).splitlines()[0]), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _claim(self) -> tuple[Claim | None, bool]:
        """The next run to do, and whether other workers still hold runs under live leases.

        Order: runs to rerun (``retry``, as they were when the call started), then expired claims, then pending
        runs; with nothing left, the runs of a dead process of this machine (no need to wait for its leases).
        """
        while self.retry_runs:
            run_id, claim_id = self.retry_runs.popleft()
            claim = await self._store("claiming a run", partial(
                claim_run, self.engine, run_id, claim_id, self.retry, self.owner, lease_s=self.lease_s))
            if claim is not None:
                return claim, True
        claim = await self._store("claiming a run", lambda: claim_next(
            self.engine, self.campaign_id, self.owner, lease_s=self.lease_s))
        if claim is not None:
            return claim, True
        others = await self._store("reading leases", lambda: live_lease_owners(self.engine, self.campaign_id))
        others.discard(self.owner)
        dead = dead_local_owners(others)
        if dead:
            logger.info("taking over the runs of exited worker(s) %s", ", ".join(sorted(dead)))
        # Claim once more: a lease may have ended between the two reads, or a dead owner's runs are free.
        claim = await self._store("claiming a run", lambda: claim_next(
            self.engine, self.campaign_id, self.owner, lease_s=self.lease_s, reclaim_owners=dead))
        return claim, bool(others - dead) or claim is not None

    # --- one run ----------------------------------------------------------------------------------------------

    def _prospect(self, claim: Claim) -> Prospect:
        with session_scope(self.engine) as session:
            prospect = session.get(Prospect, claim.prospect_id)
            assert prospect is not None
            return prospect

    async def run_one(self, claim: Claim) -> None:
        """The per-run function: one claimed run through the graph, then its fenced save and its counts."""
        prospect = await self._store("reading a prospect", lambda: self._prospect(claim))
        info = ProspectInfo(first_name=prospect.first_name, last_name=prospect.last_name, title=prospect.title,
                            email=prospect.email, company=prospect.company, website=prospect.website)
        run_researcher, run_writer, _ = await self._store("choosing a run's arm", lambda: run_backends(
            self.engine, claim.run_id, prospect, self.plan, self.researcher, self.writer))
        if self.on_event:
            self.on_event(RunEvent(info.email, RunStatus.RUNNING))
        recorder = TraceRecorder({"researcher": run_researcher, "writer": run_writer}, self.prices)
        saved: dict[str, Any] = {}

        async def on_save(final: dict[str, Any]) -> None:
            saved.update(final)

        context = CampaignContext(offer=self.offer, web=RecordingWeb(self.web, recorder), researcher=run_researcher,
                                  writer=run_writer, models=self.models, max_pages=self.max_pages,
                                  unpersonalised_emails=self.unpersonalised_emails, on_save=on_save)
        work = asyncio.ensure_future(asyncio.wait_for(
            graph.ainvoke({"prospect": info}, context=context, config={"callbacks": [recorder]}),
            timeout=self.prospect_timeout_s))
        keeper = _LeaseKeeper(self.engine, claim, self.lease_s, on_lost=work.cancel)
        try:
            await work
        except asyncio.CancelledError:
            if not keeper.lost:
                raise  # the worker is stopping, not this run's lease
        except TimeoutError:
            saved = {**saved, "status": RunStatus.FAILED, "error": f"timed out after {self.prospect_timeout_s:g} s"}
        except Exception as exc:  # noqa: BLE001 - one prospect's failure never stops the campaign
            error = redact(f"{type(exc).__name__}: {exc}")
            logger.warning("run for %s failed: %s", info.email, error, exc_info=logger.isEnabledFor(logging.DEBUG))
            saved = {**saved, "status": RunStatus.FAILED, "error": error}
        finally:
            await keeper.stop()
        try:
            if keeper.lost:
                raise LeaseLost(claim)
            saved["error"] = redact(saved.get("error"))  # an upstream error may echo a backend's key
            await self._save(claim, saved, recorder, run_researcher, run_writer)
        except LeaseLost as lost:
            logger.warning("%s; its result for %s is discarded (the new owner's stands)", lost, info.email)
            self.report.discarded += 1
            if self.on_event:
                self.on_event(RunEvent(info.email, "discarded", str(lost)))
            return
        self._count(info.email, saved)

    async def _save(self, claim: Claim, saved: dict[str, Any], recorder: TraceRecorder, researcher: str,
                    writer: str) -> None:
        attempts = 0

        def save() -> None:
            nonlocal attempts
            if attempts:
                _forget_ids(recorder)
            attempts += 1
            _persist(self.engine, claim, saved, recorder, self.before_persist, researcher=researcher, writer=writer)

        await self._store(f"saving run {claim.run_id}", save)

    def _count(self, email: str, saved: Mapping[str, Any]) -> None:
        status = saved.get("status", RunStatus.FAILED)
        if status == RunStatus.DONE:
            self.report.done += 1
        elif status == RunStatus.NO_FACTS:
            self.report.no_facts += 1
            self.report.without_facts.append((email, str(saved.get("error"))))
        else:
            self.report.failed += 1
            self.report.failures.append((email, str(saved.get("error"))))
        if self.on_event:
            self.on_event(RunEvent(email, status, saved.get("error")))

    # --- the loop ---------------------------------------------------------------------------------------------

    async def work(self) -> None:
        """Claim and run until nothing is left: no run to claim, none held by another worker (or ``limit``)."""
        tasks: dict[asyncio.Task[None], Claim] = {}
        try:
            while True:
                others = True
                while len(tasks) < self.concurrency and (self.limit is None or self.report.total < self.limit):
                    claim, others = await self._claim()
                    if claim is None:
                        break
                    self.report.total += 1
                    tasks[asyncio.create_task(self.run_one(claim))] = claim
                if not tasks:
                    if not others or (self.limit is not None and self.report.total >= self.limit):
                        return
                    await asyncio.sleep(self.poll_s)  # runs held by other workers: take them if their leases end
                    continue
                full = len(tasks) >= self.concurrency or (self.limit is not None and self.report.total >= self.limit)
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=None if full else self.poll_s)
                for task in done:
                    tasks.pop(task)
                    task.result()  # a lost store (StoreUnavailableError) or a bug stops the worker
        finally:
            await self._stop(tasks)

    async def _stop(self, tasks: dict[asyncio.Task[None], Claim]) -> None:
        """Cancel unfinished runs and give their claims back, so any worker can take them at once (when the
        store answers; otherwise their leases end on their own)."""
        if self._store_thread is not None:
            self._store_thread.shutdown(wait=not tasks, cancel_futures=True)
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._store_thread is not None:
            self._store_thread.shutdown(wait=True)  # a save under way ends (fenced) before its claim is given back
        try:
            released = release(self.engine, tasks.values())
        except Exception as exc:  # noqa: BLE001 - best effort: a lease ends by itself
            logger.warning("could not give back %d claim(s) (%s); they are redone once their leases end",
                           len(tasks), redact(str(exc).splitlines()[0]))
        else:
            logger.info("gave back %d unfinished claim(s)", released)


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
    arms: ArmPlan | None = None,
    worker_id: str | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> CampaignReport:
    """Run (or resume) a campaign: every prospect whose run is not finished goes through the graph.

    Any number of calls, in one process or many, on one machine or many, may run the same campaign on one
    store at once: each is a worker that claims runs with a lease (``store.claims``), and returns when no
    run is left to do (it waits for runs other workers hold, and takes them over if their leases end).

    Args:
        engine: the store.
        campaign: campaign name (created by ``add_prospects``).
        web: where research searches and fetches (``tools.corpus.CorpusWeb`` or ``tools.fetch.LiveWeb``).
        researcher, writer: backend specs per agent.
        concurrency: runs in flight at once in this worker, >= 1.
        models: built models to reuse (one is made when omitted).
        prices: price table for trace costs (US dollars per million tokens).
        max_pages: pages the researcher fetches per prospect.
        prospect_timeout_s: a run still going after this many seconds is marked failed.
        retry_failed: also rerun runs that failed before this call started.
        retry_no_facts: also rerun runs whose research found no verified fact before (``no_facts``).
        unpersonalised_emails: when research finds no verified fact, still write an email without company
            facts (stored with ``EmailRecord.personalised = False``); by default such a run ends
            ``no_facts`` with no email.
        limit: this worker claims at most this many runs.
        on_event: called as each run starts and ends (for progress bars).
        before_persist: called with each finished run and its ``TraceRecorder`` inside the transaction
            that saves them, to adjust what is written (``finetune.replay`` links replayed traces).
        arms: the campaign's A/B arms with their specs as given (``graphs.arms.parse_arms``); None: the arms
            stored on the campaign, if any. Each run uses its arm's researcher and writer (recorded on the run
            once, never changed); ``researcher``/``writer`` serve campaigns without arms.
        worker_id: this worker's name in the store (``runs.lease_owner``); default
            ``store.claims.new_worker_id()`` (``host:pid:random``, which lets a worker of the same machine
            take over a dead process's runs without waiting for their leases). Give each worker its own.
        lease_s: seconds a claim lasts unless renewed (renewed every third of it while the run works); a
            dead worker's runs wait this long before another takes them. Also how long the worker keeps
            retrying a store that does not answer.

    Returns:
        ``CampaignReport`` with counts, each failure's prospect email and reason, and each ``no_facts``
        prospect's email and what research saw.

    Raises:
        KeyError: no campaign of that name. A failing prospect never raises: it is marked failed.
        ValueError: ``concurrency`` < 1, ``lease_s`` <= 0, or ``limit`` < 0.
        miniatures.specs.BackendSpecError: a backend spec is malformed (checked before any run starts).
        store.claims.StoreUnavailableError: the store stopped answering for longer than ``lease_s``; results
            not yet saved are redone (by any worker) once the runs' leases end.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if lease_s <= 0:
        raise ValueError(f"lease_s must be > 0 seconds, got {lease_s}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    started = time.perf_counter()
    models = models or ModelPool(store=engine)
    if models.store is None:
        models.store = engine  # miniature: specs are looked up in this campaign's store
    models.get(researcher), models.get(writer)  # fail fast on a bad spec, before touching any run
    plan = load_arms(engine, campaign, arms)  # the campaign's A/B arms (graphs.arms); None without
    for arm in plan.arms if plan else ():
        models.get(arm.researcher), models.get(arm.writer)
    retry = {s for s, on in ((RunStatus.FAILED, retry_failed), (RunStatus.NO_FACTS, retry_no_facts)) if on}
    record, retry_runs, already_done = _prepare(engine, campaign, retry)
    report = CampaignReport(campaign=campaign, skipped=already_done, worker=worker_id or new_worker_id())
    worker = _Worker(engine, record, retry_runs, web=web, researcher=researcher, writer=writer, plan=plan,
                     models=models, prices=prices, concurrency=concurrency, max_pages=max_pages,
                     prospect_timeout_s=prospect_timeout_s, unpersonalised_emails=unpersonalised_emails, limit=limit,
                     on_event=on_event, before_persist=before_persist, report=report, lease_s=lease_s, retry=retry)
    await worker.work()
    report.elapsed_s = time.perf_counter() - started
    return report
