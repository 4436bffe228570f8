"""Replay: re-run stored runs through other backends, offline, to compare them or to make training data.

DESIGN.md, "replay": the stored inputs of a run are run again. Research searches are answered from
the run's recorded search calls (``tools.snapshots.RecordedSearch``) and pages come from the stored
web snapshots, or from the corpus the run read (the corpus is the stored copy of an offline web), so
no network is needed and the same pages are seen; the model calls then get the recorded messages.

- An agent given a backend spec is **replayed**: its calls go to that backend and are recorded as
  new traces, each linked to the trace it replays (``Trace.replay_of_id``, matched by agent and
  call order within the run).
- An agent without one **keeps its recorded answers**: a call whose messages equal a recorded call's
  gets the recorded output (not stored again, no cost). A call whose input changed (the writer,
  after a replayed researcher found other facts) goes to the agent's original backend and is
  recorded like any call.

Any finished run can be replayed: ``done``, ``failed`` and ``no_facts`` (research kept no verified
fact, so no writer call was recorded: replayed through a better researcher it may find facts, and the
writer then runs on its original backend and the run may end ``done``).

Each replay is a campaign of its own (default name ``"<source> -> replay(<researcher>, <writer>)"``,
``recorded`` for an agent kept as it was) with the source's offer and prospects and one run per
replayed run (``Run.replay_of_id``), so it resumes like any campaign (rerun the same command), can be
reviewed, evaluated and distilled from (``finetune.datasets`` treats replayed traces as their own
kind), and can itself be replayed: recorded answers are looked up along the chain of replays.

Runs whose recorded pages are neither snapshotted nor in the given corpus are reported
(``ReplayReport.missing``) and left out; the rest are replayed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from core.errors import UserError
from graphs.models import ModelPool
from graphs.recorder import TraceRecorder
from graphs.runner import CampaignReport, RunEvent, run_campaign
from miniatures.pricing import DEFAULT_PRICES, Price, call_cost_usd
from miniatures.redaction import redact
from store import session_scope
from store.models import Campaign, Prospect, Run, RunStatus, ToolCall, Trace
from tools.snapshots import RecordedSearch, SnapshotWeb
from tools.types import FetchError, Web

__all__ = [
    "AGENTS",
    "FINISHED_STATUSES",
    "RECORDED",
    "MissingSnapshot",
    "RecordedAnswers",
    "ReplayError",
    "ReplayInputChangedError",
    "ReplayReport",
    "messages_key",
    "replay",
    "replay_campaign_name",
    "select_replay_runs",
]

logger = logging.getLogger(__name__)

#: The agents a replay can re-run, in graph order.
AGENTS = ("researcher", "writer")
#: How an agent kept with its recorded answers is named in replay campaign names.
RECORDED = "recorded"
#: Statuses of the runs a replay can select.
FINISHED_STATUSES = (RunStatus.DONE, RunStatus.NO_FACTS, RunStatus.FAILED)


class ReplayError(UserError, ValueError):
    """A replay cannot start: unknown campaign, nothing selected, no agent to replay."""


class ReplayInputChangedError(UserError, RuntimeError):
    """An agent kept with its recorded answers got a call whose messages were never recorded, and
    there is no original backend to ask instead."""


def messages_key(messages: Sequence[Mapping[str, Any]]) -> str:
    """A stable key for messages in OpenAI chat format (``Trace.messages``): canonical JSON."""
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class RecordedAnswers(BaseChatModel):
    """A chat model that answers with recorded outputs: the backend of an agent a replay keeps.

    Args:
        answers: ``{messages_key(messages): (trace id, output)}`` of the recorded calls.
        fallback: builds the model asked when the messages were never recorded (the agent's
            original backend); None raises ``ReplayInputChangedError`` instead.

    A recorded answer carries ``response_metadata["recorded_trace_id"]`` and zero token usage.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    answers: dict[str, tuple[int, str]]
    fallback: Callable[[], BaseChatModel] | None = None

    @property
    def _llm_type(self) -> str:
        return "recorded"

    def _recorded(self, messages: list[BaseMessage]) -> ChatResult | None:
        hit = self.answers.get(messages_key(convert_to_openai_messages(messages)))  # type: ignore[arg-type]
        if hit is None:
            return None
        trace_id, output = hit
        message = AIMessage(content=output, response_metadata={"recorded_trace_id": trace_id},
                            usage_metadata={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _no_record(self) -> ReplayInputChangedError:
        return ReplayInputChangedError(
            "these messages were never recorded (an upstream agent's replay changed this agent's input) and no "
            "original backend was given; replay this agent too with its own backend spec")

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        result = self._recorded(messages)
        if result is not None:
            return result
        if self.fallback is None:
            raise self._no_record()
        answer = self.fallback().invoke(messages, config={"callbacks": []}, stop=stop, **kwargs)  # task= too
        return ChatResult(generations=[ChatGeneration(message=answer)])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        result = self._recorded(messages)
        if result is not None:
            return result
        if self.fallback is None:
            raise self._no_record()
        answer = await self.fallback().ainvoke(messages, config={"callbacks": []}, stop=stop, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=answer)])


@dataclass(frozen=True)
class MissingSnapshot:
    """A run left out of a replay: pages it read are neither snapshotted nor in the corpus given.

    Attributes:
        run_id: the source run.
        prospect: the prospect's email.
        trace_ids: the run's traces that were not replayed.
        urls: the missing pages (or ``"(no recorded searches)"`` when the run recorded none).
    """

    run_id: int
    prospect: str
    trace_ids: list[int]
    urls: list[str]


@dataclass
class ReplayReport:
    """What one ``replay`` call did.

    Attributes:
        campaign: the replay campaign's name.
        source_campaign: the campaign whose runs were replayed.
        replayed_agents: the agents given a new backend.
        runs: source run ids replayed (or left pending for a resume) in this call.
        missing: runs left out because pages they read are missing.
        recorded_answers: calls answered from the records (not stored again).
        result: the replay campaign's ``CampaignReport``.
    """

    campaign: str
    source_campaign: str
    replayed_agents: list[str]
    runs: list[int] = field(default_factory=list)
    missing: list[MissingSnapshot] = field(default_factory=list)
    recorded_answers: int = 0
    result: CampaignReport | None = None


def replay_campaign_name(source: str, researcher: str | None, writer: str | None) -> str:
    """The default name of a replay campaign: ``"<source> -> replay(<researcher>, <writer>)"``."""
    return f"{source} -> replay({researcher or RECORDED}, {writer or RECORDED})"


def select_replay_runs(
    engine: Engine,
    *,
    campaign: str | None = None,
    agent: str | None = None,
    backend: str | None = None,
    trace_ids: Iterable[int] | None = None,
    failed_only: bool = False,
    no_facts_only: bool = False,
) -> dict[str, list[int]]:
    """The finished runs to replay, by campaign name: those with a trace matching every filter given.

    Finished runs are ``done``, ``no_facts`` (research kept no verified fact: replayed through a better
    researcher such a run may end ``done``) and ``failed``.

    Args:
        campaign: only this campaign's runs (all its finished runs when no trace filter is given).
        agent, backend: traces of this agent / backend spec.
        trace_ids: only these traces.
        failed_only: only runs that failed (e.g. an email that failed validation twice).
        no_facts_only: only runs whose research kept no verified fact; with ``failed_only``, runs of either.

    Returns:
        ``{campaign name: [run id, ...]}`` in run order; empty when nothing matches.
    """
    wanted = [s for s, on in ((RunStatus.NO_FACTS, no_facts_only), (RunStatus.FAILED, failed_only)) if on]
    finished = wanted or list(FINISHED_STATUSES)
    with Session(engine) as session:
        query = (select(Run.id, Campaign.name).join(Campaign, col(Campaign.id) == col(Run.campaign_id))
                 .where(col(Run.status).in_(finished)))
        if campaign is not None:
            query = query.where(Campaign.name == campaign)
        ids = list(trace_ids) if trace_ids is not None else None
        if agent is not None or backend is not None or ids is not None:
            traced = select(Trace.run_id).where(col(Trace.run_id).is_not(None))
            if agent is not None:
                traced = traced.where(Trace.agent == agent)
            if backend is not None:
                traced = traced.where(Trace.backend == redact(backend))  # stored specs are redacted
            if ids is not None:
                traced = traced.where(col(Trace.id).in_(ids))
            query = query.where(col(Run.id).in_(traced))
        selected: dict[str, list[int]] = {}
        for run_id, name in session.exec(query.order_by(col(Run.id))):
            selected.setdefault(name, []).append(int(run_id))  # type: ignore[arg-type]
    return selected


@dataclass
class _Source:
    """One source run with what its replay needs."""

    run: Run
    prospect: Prospect
    chain: list[int]  # the run, then the run it replays, and so on
    traces: dict[str, list[Trace]]  # per agent: the calls of the nearest run in the chain that has some
    fetched: list[str]  # pages fetched without error
    attempted: int  # fetch calls, failed ones included (the source's page budget)
    searched: int


def _load_sources(session: Session, run_ids: Sequence[int]) -> list[_Source]:
    runs = {r.id: r for r in session.exec(select(Run).where(col(Run.id).in_(run_ids)))}
    chains: dict[int, list[int]] = {}
    for rid in run_ids:
        chain, current = [rid], runs.get(rid)
        while current is not None and current.replay_of_id is not None and current.replay_of_id not in chain:
            chain.append(current.replay_of_id)
            current = runs.get(current.replay_of_id) or session.get(Run, current.replay_of_id)
        chains[rid] = chain
    every = sorted({r for chain in chains.values() for r in chain})
    by_run: dict[int, dict[str, list[Trace]]] = {}
    for trace in session.exec(select(Trace).where(col(Trace.run_id).in_(every)).order_by(col(Trace.id))):
        by_run.setdefault(int(trace.run_id or 0), {}).setdefault(trace.agent, []).append(trace)
    calls: dict[int, list[ToolCall]] = {}
    for call in session.exec(select(ToolCall).where(col(ToolCall.run_id).in_(run_ids)).order_by(col(ToolCall.id))):
        calls.setdefault(int(call.run_id or 0), []).append(call)
    prospects = {p.id: p for p in session.exec(
        select(Prospect).where(col(Prospect.id).in_([r.prospect_id for r in runs.values()])))}
    sources = []
    for rid in run_ids:
        run = runs[rid]
        traces = {agent: next((by_run[r][agent] for r in chains[rid] if agent in by_run.get(r, {})), [])
                  for agent in AGENTS}
        own = calls.get(rid, [])
        fetched = list(dict.fromkeys(str(c.input.get("url")) for c in own if c.tool == "fetch" and not c.error))
        attempted = len({str(c.input.get("url")) for c in own if c.tool == "fetch"})
        searched = sum(1 for c in own if c.tool == "search")
        sources.append(_Source(run, prospects[run.prospect_id], chains[rid], traces, fetched, attempted, searched))
    return sources


async def _missing_pages(web: Web, source: _Source) -> list[str]:
    if source.searched == 0:
        return ["(no recorded searches)"]
    missing = []
    for url in source.fetched:
        try:
            await web.fetch(url)
        except FetchError:
            missing.append(url)
    return missing


def _ensure_campaign(engine: Engine, name: str, source: Campaign, sources: Sequence[_Source]) -> None:
    """Create (or extend) the replay campaign: the source's offer, prospects and one pending run per source run."""
    with session_scope(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == name)).first()
        if record is None:
            record = Campaign(name=name, offer=dict(source.offer))
            session.add(record)
            session.flush()
        prospects = {p.email: p for p in session.exec(select(Prospect).where(Prospect.campaign_id == record.id))}
        runs = {r.prospect_id: r for r in session.exec(select(Run).where(Run.campaign_id == record.id))}
        for src in sources:
            p = src.prospect
            mine = prospects.get(p.email)
            if mine is None:
                mine = Prospect(campaign_id=record.id, row_number=p.row_number, first_name=p.first_name,  # type: ignore[arg-type]
                                last_name=p.last_name, title=p.title, email=p.email, company=p.company,
                                website=p.website, split=p.split)
                session.add(mine)
                session.flush()
                prospects[p.email] = mine
            if mine.id not in runs:
                run = Run(campaign_id=record.id, prospect_id=mine.id, replay_of_id=src.run.id)  # type: ignore[arg-type]
                session.add(run)
                runs[mine.id] = run  # type: ignore[index]


def _pending_sources(engine: Engine, name: str) -> list[int]:
    """Source run ids of the replay campaign's runs still to run (this call's work, resumes included)."""
    with Session(engine) as session:
        rows = session.exec(
            select(Run.replay_of_id).join(Campaign, col(Campaign.id) == col(Run.campaign_id))
            .where(Campaign.name == name, col(Run.status).in_([RunStatus.PENDING, RunStatus.RUNNING]),
                   col(Run.replay_of_id).is_not(None))
            .order_by(col(Run.id))
        ).all()
    return [int(r) for r in rows if r is not None]


def _original_spec(sources: Sequence[_Source], agent: str) -> str | None:
    specs = Counter(getattr(s.run, agent) for s in sources if getattr(s.run, agent))
    return specs.most_common(1)[0][0] if specs else None


async def replay(
    engine: Engine,
    source_campaign: str,
    *,
    run_ids: Sequence[int] | None = None,
    researcher: str | None = None,
    writer: str | None = None,
    name: str | None = None,
    pages: Web | None = None,
    models: ModelPool | None = None,
    prices: Mapping[str, Price] = DEFAULT_PRICES,
    concurrency: int = 4,
    unpersonalised_emails: bool = False,
    on_event: Callable[[RunEvent], None] | None = None,
) -> ReplayReport:
    """Replay runs of ``source_campaign`` through other backends (see the module docstring).

    Args:
        engine: the store holding the source runs, their traces, tool calls and web snapshots.
        source_campaign: the campaign whose runs are replayed (itself possibly a replay).
        run_ids: only these runs of it (``select_replay_runs``); None replays every finished run.
        researcher, writer: backend spec of each agent to replay; None keeps its recorded answers.
        name: the replay campaign's name (default ``replay_campaign_name(...)``); an existing replay
            campaign of that name is resumed: runs already done are not replayed again.
        pages: where pages without a snapshot are read (the ``CorpusWeb`` the source campaign used).
        models: built models to reuse (a scripted model in tests); one is made when omitted.
        prices: price table for the new traces' costs (US dollars per million tokens).
        concurrency: runs replayed at once.
        unpersonalised_emails: when a replayed research keeps no verified fact, still write an email
            without company facts (as ``graphs.runner.run_campaign``); by default the run ends ``no_facts``.
        on_event: progress callback per run (as ``graphs.runner.run_campaign``).

    Returns:
        ``ReplayReport``; the new runs, profiles, emails and traces are in the store.

    Raises:
        ReplayError: no agent to replay, no such campaign, or no finished run selected.
        miniatures.specs.BackendSpecError: a backend spec is malformed (before anything runs).
    """
    if researcher is None and writer is None:
        raise ReplayError("give --researcher SPEC, --writer SPEC or both: the agents to replay")
    specs = {"researcher": researcher, "writer": writer}
    replayed = [a for a in AGENTS if specs[a] is not None]
    name = name or replay_campaign_name(source_campaign, researcher, writer)
    if name == source_campaign:
        raise ReplayError(f"the replay campaign cannot be the source campaign {source_campaign!r}; pick another --name")
    with Session(engine) as session:
        source = session.exec(select(Campaign).where(Campaign.name == source_campaign)).first()
        if source is None:
            raise ReplayError(f"no campaign named {source_campaign!r} in the store; `outreach traces list` shows "
                              "what is stored")
        selected = select_replay_runs(engine, campaign=source_campaign).get(source_campaign, [])
        if run_ids is not None:
            wanted = set(run_ids)
            selected = [r for r in selected if r in wanted]
        if not selected:
            raise ReplayError(f"campaign {source_campaign!r} has no finished run to replay"
                              + (" among the selected traces" if run_ids is not None else ""))
        sources = _load_sources(session, selected)
    report = ReplayReport(campaign=name, source_campaign=source_campaign, replayed_agents=replayed)

    web = SnapshotWeb(engine, search=RecordedSearch(engine, selected), pages=pages)
    ready = []
    for src in sources:
        missing = await _missing_pages(web, src)
        if missing:
            trace_ids = [int(t.id or 0) for agent in AGENTS for t in src.traces[agent]]
            report.missing.append(MissingSnapshot(int(src.run.id or 0), src.prospect.email, trace_ids, missing))
            logger.warning("run %s (%s) not replayed: %d page(s) missing, e.g. %s", src.run.id, src.prospect.email,
                           len(missing), missing[0])
        else:
            ready.append(src)
    if ready:
        _ensure_campaign(engine, name, source, ready)
    pending = _pending_sources(engine, name)
    report.runs = pending
    if not pending:
        return report
    with Session(engine) as session:
        sources = _load_sources(session, pending)
    by_source = {int(s.run.id or 0): s for s in sources}

    pool = models or ModelPool(store=engine)
    if pool.store is None:
        pool.store = engine
    keys: dict[str, str] = {}
    answers: dict[str, dict[str, tuple[int, str]]] = {}
    originals: dict[str, str | None] = {}
    for agent in AGENTS:
        spec = specs[agent]
        if spec is not None:
            pool.get(spec)  # fail fast on a malformed spec, before any run starts
            keys[agent] = spec
            continue
        originals[agent] = original = _original_spec(sources, agent)
        answers[agent] = {messages_key(t.messages): (int(t.id or 0), t.output)
                          for s in sources for t in s.traces[agent] if not t.error}
        fallback = partial(pool.get, original) if original else None
        keys[agent] = f"{RECORDED}:{agent}"
        pool.put(keys[agent], RecordedAnswers(answers=answers[agent], fallback=fallback))

    def link(run: Run, recorder: TraceRecorder) -> None:
        src = by_source.get(int(run.replay_of_id or 0))
        if src is None:
            return
        position: Counter[str] = Counter()
        kept = []
        for trace in recorder.traces:
            index = position[trace.agent]
            position[trace.agent] += 1
            if trace.agent in answers:
                if messages_key(trace.messages) in answers[trace.agent] and not trace.error:
                    report.recorded_answers += 1
                    continue  # answered from the records: already stored
                trace.backend = originals.get(trace.agent) or trace.backend
                trace.cost_usd = call_cost_usd(trace.backend, trace.input_tokens, trace.output_tokens, prices)
            previous = src.traces.get(trace.agent, [])
            if index < len(previous):
                trace.replay_of_id = previous[index].id
            kept.append(trace)
        recorder.traces[:] = kept
        for agent, original in originals.items():
            setattr(run, agent, original or "")

    # Recorded answers cost nothing; their keys are not specs, so they get a price of their own.
    run_prices = {**prices, **{keys[agent]: Price() for agent in answers}}
    max_pages = max((s.attempted for s in sources), default=0) or 5
    web = SnapshotWeb(engine, search=RecordedSearch(engine, pending), pages=pages)
    report.result = await run_campaign(
        engine, name, web=web, researcher=keys["researcher"], writer=keys["writer"], concurrency=concurrency,
        models=pool, prices=run_prices, max_pages=max_pages, retry_failed=False,
        unpersonalised_emails=unpersonalised_emails, on_event=on_event, before_persist=link,
    )
    return report
