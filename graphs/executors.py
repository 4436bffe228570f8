"""Executors: one campaign run by several workers (local processes or Ray actors) sharing one store.

A **worker** is ``run_worker``: it opens the store, builds its web and models, and runs
``graphs.runner.run_campaign`` with its own concurrency; ``run_campaign`` claims each run with a lease, so
workers never take the same run and a dead worker's runs are taken again once their leases expire. The
**driver** (``run_campaign_workers``) starts the workers, follows the campaign's run statuses in the store
(so its progress events and report are the same whatever executes the runs, and stay right when a worker
dies) and returns one ``CampaignReport``:

- ``local`` with one worker runs ``run_campaign`` in this process (the default executor);
- ``local`` with N workers starts N processes (``multiprocessing``, forked from a fork server that has
  imported the project and the libraries a run loads once, ``graphs.worker_preload``); a worker whose
  driver is gone exits, so killing the driver stops them and running the command again resumes;
- ``ray`` starts N Ray actors (``ray.init``: a local Ray, or the cluster at ``ray_address``); Ray ends them
  when the driver exits. A cluster's workers run on many machines and so need a store they can all reach:
  a SQLite store is refused for one (use PostgreSQL).

Rate limits of backends (``graphs.ratelimit``) are taken in the store, so they hold across all workers.
Ray: https://docs.ray.io/en/latest/ray-core/actors.html (actors, ``ray.kill``, fate sharing with the driver).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy import select as sa_select
from sqlalchemy.engine import make_url
from sqlmodel import Session, col, select

from core.errors import UserError
from graphs.models import ModelPool
from graphs.ratelimit import RateLimit
from graphs.runner import CampaignReport, RunEvent, run_campaign
from miniatures.pricing import DEFAULT_PRICES, Price
from store import open_store
from store.models import Campaign, Prospect, Run, RunStatus
from tools import Corpus, CorpusWeb
from tools.types import Web

__all__ = ["EXECUTORS", "ExecutorError", "WorkerJob", "check_executor", "corpus_web", "is_remote_ray",
           "ray_worker_class", "run_campaign_workers", "run_worker"]

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
#: Environment variables (by prefix) the driver hands to the workers of a Ray cluster: settings and API keys.
FORWARDED_ENV = ("OUTREACH_", "OPENAI_API_KEY", "OPENAI_BASE_URL")
#: Statuses a run ends a pass with.
_ENDED = {RunStatus.DONE, RunStatus.NO_FACTS, RunStatus.FAILED}


class ExecutorError(UserError):
    """An executor cannot run as asked (Ray not installed, a cluster with a SQLite store, bad worker count)."""


@dataclass(frozen=True)
class WorkerJob:
    """What one worker runs, picklable (it travels to a process or a Ray actor).

    Args:
        store_url: SQLAlchemy URL of the store every worker shares.
        campaign: campaign name (its prospects already added).
        make_web: builds the worker's research web from its engine, e.g.
            ``functools.partial(outreach.pipeline.open_web, settings)`` (a module-level callable, so it pickles).
        researcher, writer: backend specs.
        concurrency: runs in flight at once in this worker.
        prices: price table for trace costs (US dollars per million tokens).
        max_pages, prospect_timeout_s, retry_failed, retry_no_facts, unpersonalised_emails, limit: as for
            ``run_campaign``.
        rate_limits: limits by backend spec, shared by every worker through the store.
        model_timeout_s: per-request timeout of remote backends, seconds.
        run_options: further keyword arguments of ``run_campaign`` (e.g. its lease settings).
    """

    store_url: str
    campaign: str
    make_web: Callable[[Engine], Web]
    researcher: str = "heuristic"
    writer: str = "heuristic"
    concurrency: int = 4
    prices: Mapping[str, Price] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    max_pages: int = 5
    prospect_timeout_s: float = 120.0
    retry_failed: bool = False
    retry_no_facts: bool = False
    unpersonalised_emails: bool = False
    limit: int | None = None
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    model_timeout_s: float = 60.0
    run_options: Mapping[str, Any] = field(default_factory=dict)


async def _run_job(job: WorkerJob, engine: Engine, on_event: Callable[[RunEvent], None] | None) -> CampaignReport:
    models = ModelPool(timeout_s=job.model_timeout_s, store=engine, rate_limits=job.rate_limits)
    return await run_campaign(
        engine, job.campaign, web=job.make_web(engine), researcher=job.researcher, writer=job.writer,
        concurrency=job.concurrency, models=models, prices=job.prices, max_pages=job.max_pages,
        prospect_timeout_s=job.prospect_timeout_s, retry_failed=job.retry_failed, retry_no_facts=job.retry_no_facts,
        unpersonalised_emails=job.unpersonalised_emails, limit=job.limit, on_event=on_event, **job.run_options)


def run_worker(job: WorkerJob) -> CampaignReport:
    """Run one worker to the end: open the store, build the web and models, ``run_campaign``.

    The function a worker process or a Ray actor calls; it can also be called directly.

    Raises:
        KeyError: no such campaign. Errors of ``open_store`` and ``run_campaign`` pass through.
    """
    engine = open_store(job.store_url)
    try:
        return asyncio.run(_run_job(job, engine, None))
    finally:
        engine.dispose()


def check_executor(store_url: str, executor: str, workers: int, ray_address: str | None = None) -> None:
    """Refuse, before any work, what ``run_campaign_workers`` cannot do with these arguments.

    Raises:
        ExecutorError: ``workers`` < 1; an unknown executor; ``--ray-address`` without the ray executor; Ray
            not installed; a Ray cluster address or several workers with a store they cannot share (a Ray
            cluster and a SQLite file; an in-memory SQLite and more than this process).
    """
    if workers < 1:
        raise ExecutorError(f"--workers must be >= 1, got {workers}")
    if executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if ray_address and executor != "ray":
        raise ExecutorError(f"--ray-address {ray_address} needs --executor ray")
    url = make_url(store_url)
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite and (url.database in (None, "", ":memory:")) and (workers > 1 or executor == "ray"):
        raise ExecutorError(f"the store {store_url} lives in one process's memory, so other workers cannot share "
                            "it; give a SQLite file (sqlite:///outreach.sqlite) or a PostgreSQL URL")
    if executor == "ray":
        _ray()
        if is_remote_ray(ray_address) and sqlite:
            raise ExecutorError(
                f"the Ray cluster at {ray_address} runs workers on several machines, which cannot share the "
                f"SQLite store {url.database}; use a PostgreSQL store (--store postgresql+psycopg://USER@HOST/DB), "
                "or leave out --ray-address to run a Ray on this machine")


def corpus_web(path: str | Path, engine: Engine) -> Web:
    """A worker's web over the local corpus file at ``path`` (``functools.partial(corpus_web, path)`` is a
    ``WorkerJob.make_web`` that pickles). The engine is not used: the corpus is its own SQLite file."""
    return CorpusWeb(Corpus(Path(path)))


def is_remote_ray(address: str | None) -> bool:
    """True for an address that names a Ray cluster (``auto``, ``HOST:PORT``, ``ray://...``); False for None,
    ``""`` and ``local`` (a Ray started on this machine for this command)."""
    return address not in (None, "", "local")


# --- following the store ---------------------------------------------------------------------------------


@dataclass
class _Follower:
    """Turns the campaign's run rows into run events: a run whose (status, finished_at) changed to an ended
    status since the driver started has ended a pass now."""

    engine: Engine
    campaign: str
    retry: set[str]
    seen: dict[int, tuple[str, datetime | None]] = field(default_factory=dict)
    report: CampaignReport | None = None

    def rows(self) -> list[tuple[int, str, str | None, datetime | None, str]]:
        with Session(self.engine) as session:
            record = session.exec(select(Campaign).where(Campaign.name == self.campaign)).first()
            if record is None:
                raise KeyError(f"no campaign named {self.campaign!r} in the store; create it with "
                               "`outreach run PROSPECTS.csv`")
            query = (sa_select(col(Run.id), col(Run.status), col(Run.error), col(Run.finished_at), col(Prospect.email))
                     .join(Prospect, col(Prospect.id) == col(Run.prospect_id)).where(col(Run.campaign_id) == record.id))
            return [(r[0], r[1], r[2], r[3], r[4]) for r in session.execute(query).all()]

    def start(self) -> CampaignReport:
        """Record the runs as they are; return the report to fill (``total``: runs to do now)."""
        finished = {RunStatus.DONE, RunStatus.NO_FACTS} - self.retry
        with Session(self.engine) as session:
            record = session.exec(select(Campaign).where(Campaign.name == self.campaign)).first()
            if record is None:
                raise KeyError(f"no campaign named {self.campaign!r} in the store; create it with "
                               "`outreach run PROSPECTS.csv`")
            prospects = len(session.exec(select(Prospect.id).where(Prospect.campaign_id == record.id)).all())
        rows = self.rows()
        self.seen = {run_id: (status, at) for run_id, status, _, at, _ in rows}
        skipped = sum(1 for _, status, _, _, _ in rows if status in finished)
        self.report = CampaignReport(campaign=self.campaign, total=prospects - skipped, skipped=skipped)
        return self.report

    def poll(self, on_event: Callable[[RunEvent], None] | None) -> int:
        """Count runs that ended since the last poll into the report, call ``on_event`` for each; return how
        many runs of the campaign are still to do (not ended since the start)."""
        assert self.report is not None
        for run_id, status, error, at, email in self.rows():
            if status in _ENDED and self.seen.get(run_id) != (status, at):
                self.seen[run_id] = (status, at)
                if status == RunStatus.DONE:
                    self.report.done += 1
                elif status == RunStatus.NO_FACTS:
                    self.report.no_facts += 1
                    self.report.without_facts.append((email, str(error)))
                else:
                    self.report.failed += 1
                    self.report.failures.append((email, str(error)))
                if on_event:
                    on_event(RunEvent(email, status, error))
        report = self.report
        return report.total - report.done - report.no_facts - report.failed


# --- local processes -------------------------------------------------------------------------------------


def _exit_when_orphaned(driver: int) -> None:
    """Exit this worker process when its driver process is gone (killed), so no worker outlives its command."""
    while True:
        try:
            os.kill(driver, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            os._exit(3)
        time.sleep(0.5)


def _process_main(job: WorkerJob, driver: int) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(driver,), daemon=True).start()
    run_worker(job)


def _split_limit(job: WorkerJob, workers: int) -> list[WorkerJob]:
    """One job per worker; a ``limit`` is shared out between them (its total stays ``limit``)."""
    if job.limit is None:
        return [job] * workers
    share, extra = divmod(job.limit, workers)
    return [replace(job, limit=share + (i < extra)) for i in range(workers) if share + (i < extra) > 0]


async def _follow(follower: _Follower, alive: Callable[[], bool], on_event: Callable[[RunEvent], None] | None,
                  poll_s: float) -> None:
    while alive():
        follower.poll(on_event)
        await asyncio.sleep(poll_s)
    follower.poll(on_event)


async def _run_processes(jobs: list[WorkerJob], follower: _Follower, on_event: Callable[[RunEvent], None] | None,
                         poll_s: float) -> list[int | None]:
    # A fork server imports the project once and forks each worker from it (spawn would import it per worker;
    # a plain fork would copy this process's threads and open connections). It also loads what a worker
    # would load on its first run (graphs.worker_preload) and the main module (which each worker would
    # otherwise run again to find the job's functions), so a worker starts in milliseconds.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "graphs.executors", "graphs.worker_preload"])
    processes = [context.Process(target=_process_main, args=(job, os.getpid()), name=f"outreach-worker-{i}",
                                 daemon=True) for i, job in enumerate(jobs)]
    for process in processes:
        process.start()
    try:
        await _follow(follower, lambda: any(p.is_alive() for p in processes), on_event, poll_s)
    finally:
        for process in processes:
            if process.is_alive():  # the driver was interrupted: stop the workers (their runs resume later)
                process.terminate()
            process.join()
    return [p.exitcode for p in processes]


# --- Ray ---------------------------------------------------------------------------------------------------


def _ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise ExecutorError("--executor ray needs the 'ray' extra of outreach-miniatures, and ray is not "
                            "installed. Install it: pip install -e \".[ray]\"") from exc
    return ray


class _RayWorker:
    """The Ray actor: one worker (``run_worker``) per actor, in its own process."""

    def run(self, job: WorkerJob) -> CampaignReport:
        return run_worker(job)

    def pid(self) -> int:
        return os.getpid()


def ray_worker_class(cpus_per_worker: float = 1.0) -> Any:
    """The Ray actor class of a worker, asking for ``cpus_per_worker`` CPUs (the work waits mostly on I/O)."""
    ray = _ray()
    return ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(_RayWorker)


async def _run_ray(jobs: list[WorkerJob], follower: _Follower, on_event: Callable[[RunEvent], None] | None,
                   poll_s: float, cpus_per_worker: float, on_actors: Callable[[list[Any]], None] | None,
                   ) -> list[str | None]:
    ray = _ray()
    worker = ray_worker_class(cpus_per_worker)
    actors = [worker.remote() for _ in jobs]
    if on_actors is not None:
        on_actors(actors)
    pending = {actor.run.remote(job): i for i, (actor, job) in enumerate(zip(actors, jobs, strict=True))}
    outcomes: list[str | None] = [None] * len(jobs)

    def alive() -> bool:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            i = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor died (killed, its node lost)
                outcomes[i] = f"worker {i} died: {type(exc).__name__}"
            except ray.exceptions.RayTaskError as exc:  # the worker raised
                outcomes[i] = f"worker {i} failed: {exc.cause!r}"
        return bool(pending)

    try:
        await _follow(follower, alive, on_event, poll_s)
    finally:
        for actor in actors:
            ray.kill(actor)
    return outcomes


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to (or start) Ray unless it is running in this process already; True when started here."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if is_remote_ray(address):
        # The cluster's workers do not see this shell's environment: hand them the settings and the API key.
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


async def run_campaign_workers(
    job: WorkerJob,
    *,
    workers: int = 1,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    cpus_per_worker: float = 1.0,
    on_event: Callable[[RunEvent], None] | None = None,
    poll_s: float = 0.5,
    on_ray_actors: Callable[[list[Any]], None] | None = None,
    engine: Engine | None = None,
) -> CampaignReport:
    """Run (or resume) a campaign with ``workers`` workers and return what they did together.

    Args:
        job: what each worker runs (a ``limit`` is shared out between the workers).
        workers: workers (>= 1), each with ``job.concurrency`` runs in flight.
        executor: ``local`` (this process for one worker, else processes) or ``ray`` (Ray actors).
        ray_address: the Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); None or
            ``local``: start a Ray on this machine with ``workers * cpus_per_worker`` CPUs.
        cpus_per_worker: CPUs a Ray actor asks for.
        on_event: called as runs end (``RunEvent``; from the store's statuses when workers run elsewhere).
        poll_s: how often the driver reads the run statuses, seconds.
        on_ray_actors: called with the Ray actors once started (tests kill one).
        engine: the store of ``job.store_url`` when the caller has it open already (it stays open).

    Returns:
        ``CampaignReport``: runs to do at the start, how each one that ended since then ended, and the
        wall time. A worker that died is logged; the runs it held are done by the others once their leases
        expire, or by running the command again.

    Raises:
        ExecutorError: ``workers`` < 1, an unknown executor, Ray not installed, a Ray cluster address with a
            SQLite store, or every worker failed.
        KeyError: no campaign of that name.
    """
    check_executor(job.store_url, executor, workers, ray_address)
    started = time.perf_counter()
    own = engine is None
    engine = open_store(job.store_url) if engine is None else engine
    try:
        if executor == "local" and workers == 1:
            return await _run_job(job, engine, on_event)
        return await _drive(job, engine, workers=workers, executor=executor, ray_address=ray_address,
                            cpus_per_worker=cpus_per_worker, on_event=on_event, poll_s=poll_s,
                            on_ray_actors=on_ray_actors, started=started)
    finally:
        if own:
            engine.dispose()


async def _drive(job: WorkerJob, engine: Engine, *, workers: int, executor: str, ray_address: str | None,
                 cpus_per_worker: float, on_event: Callable[[RunEvent], None] | None, poll_s: float,
                 on_ray_actors: Callable[[list[Any]], None] | None, started: float) -> CampaignReport:
    """Start the workers and follow the store until they have all ended (see ``run_campaign_workers``)."""
    retry = {s for s, on in ((RunStatus.FAILED, job.retry_failed), (RunStatus.NO_FACTS, job.retry_no_facts)) if on}
    follower = _Follower(engine, job.campaign, retry)
    report = follower.start()
    if job.limit is not None:
        report.total = min(report.total, job.limit)
    jobs = _split_limit(job, workers)
    problems: list[str | None]
    if executor == "local":
        codes = await _run_processes(jobs, follower, on_event, poll_s)
        problems = [None if code == 0 else f"worker {i} exited with status {code}" for i, code in enumerate(codes)]
    else:
        started_ray = _init_ray(ray_address, None if is_remote_ray(ray_address)
                                else max(1, round(workers * cpus_per_worker)))
        try:
            problems = await _run_ray(jobs, follower, on_event, poll_s, cpus_per_worker, on_ray_actors)
        finally:
            if started_ray:
                _ray().shutdown()
    for problem in filter(None, problems):
        logger.warning("%s; its runs are taken again once their leases expire (or rerun the command)", problem)
    if problems and all(problems) and not (report.done or report.no_facts or report.failed):
        raise ExecutorError(f"every worker failed ({problems[0]}); see the log above")
    report.elapsed_s = time.perf_counter() - started
    return report
