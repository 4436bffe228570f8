"""How a replay's outputs differ from the ones they replay, per agent (``outreach replay`` prints it).

Each run of a replay campaign is paired with the run it replays (``Run.replay_of_id``) and each new
trace with the trace it replays (``Trace.replay_of_id``). Per agent the comparison gives, for the
source side and the replay side:

- researcher: runs whose research kept no verified fact (status ``no_facts``), facts kept, facts
  dropped by grounding in all and by reason (``agents.schemas.DROP_REASONS``: ungrounded, misattributed,
  bad value), grounded-fact rate, schema-valid answers, and the share of fields whose value both sides
  agree on (of fields either side found);
- writer: the evaluation rubric's all-pass rate (``evals.rubric.score_email``), the valid-email rate
  (``agents.validation`` as stored), facts used per email, and the mean text similarity of the
  rendered emails (``difflib.SequenceMatcher.ratio``, 0-1);
- both: calls, identical inputs (the replay saw exactly the recorded messages) and identical outputs,
  tokens in/out per call, latency p50 (ms) and cost (USD).

Agents the replay kept with their recorded answers have no new traces and are left out.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from agents.parsing import OutputParseError, parse_model_output
from agents.schemas import EmailDraft, ExtractionOutput, Offer, Profile, RenderedEmail
from evals.campaigns import CampaignRow, collect_rows, sum_drop_reasons
from evals.costs import percentile
from evals.rubric import score_email
from store.models import Campaign, Run, RunStatus, Trace

__all__ = ["AgentComparison", "ComparisonRow", "ReplayComparison", "compare_replay"]


@dataclass(frozen=True)
class ComparisonRow:
    """One figure on both sides; ``None`` where it does not apply (no email, no trace)."""

    metric: str
    source: float | None
    replay: float | None


@dataclass
class AgentComparison:
    """One agent's figures: ``pairs`` replayed calls with a source call, backends on each side."""

    agent: str
    pairs: int
    source_backends: list[str]
    replay_backends: list[str]
    rows: list[ComparisonRow] = field(default_factory=list)

    def row(self, metric: str) -> ComparisonRow:
        """The row named ``metric``. Raises ``KeyError`` when there is none."""
        for r in self.rows:
            if r.metric == metric:
                return r
        raise KeyError(f"no metric {metric!r}; have {[r.metric for r in self.rows]}")


@dataclass
class ReplayComparison:
    """The comparison of one replay campaign with the campaign(s) it replays."""

    campaign: str
    source_campaigns: list[str]
    runs: int
    agents: list[AgentComparison] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _call_rows(traces: Sequence[Trace]) -> list[float | None]:
    """calls, tokens in per call, tokens out per call, latency p50 ms, cost USD."""
    if not traces:
        return [0, None, None, None, 0.0]
    return [len(traces), _mean([t.input_tokens for t in traces]), _mean([t.output_tokens for t in traces]),
            percentile([t.latency_ms for t in traces], 50), sum(t.cost_usd for t in traces)]


_CALL_METRICS = ("calls", "tokens in per call", "tokens out per call", "latency p50 (ms)", "cost (USD)")


def _values(profile: Profile | None) -> dict[str, str]:
    if profile is None:
        return {}
    out: dict[str, str] = {}
    for fact in profile.facts:
        out.setdefault(fact.field, " ".join(fact.value.casefold().split()))
    return out


def _schema_valid(traces: Sequence[Trace]) -> float | None:
    flags = []
    for t in traces:
        if t.error:
            flags.append(False)
            continue
        try:
            parse_model_output(t.output, ExtractionOutput)
            flags.append(True)
        except OutputParseError:
            flags.append(False)
    return _rate(flags)


def _research_rows(pairs: Sequence[tuple[CampaignRow, CampaignRow]], source: Sequence[Trace],
                   replay: Sequence[Trace]) -> list[ComparisonRow]:
    rows: list[tuple[int, int, float | None]] = []
    reasons: list[dict[str, int]] = []
    no_facts: list[int] = []
    for side in (0, 1):
        profiles = [p for p in (pair[side].profile for pair in pairs) if p is not None]
        facts = sum(len(p.facts) for p in profiles)
        dropped = sum(p.dropped_facts for p in profiles)
        rows.append((facts, dropped, facts / (facts + dropped) if facts + dropped else None))
        reasons.append(sum_drop_reasons(p.drop_reasons for p in profiles))
        runs = [pair[side].run for pair in pairs]
        no_facts.append(sum(run is not None and run.status == RunStatus.NO_FACTS for run in runs))
    agree: list[bool] = []
    for src, new in pairs:
        a, b = _values(src.profile), _values(new.profile)
        agree += [a.get(f) == b.get(f) for f in set(a) | set(b)]
    return [
        ComparisonRow("runs without a verified fact", no_facts[0], no_facts[1]),
        ComparisonRow("facts kept", rows[0][0], rows[1][0]),
        ComparisonRow("facts dropped", rows[0][1], rows[1][1]),
        *(ComparisonRow(f"dropped: {reason.replace('_', ' ')}", reasons[0].get(reason, 0),
                        reasons[1].get(reason, 0)) for reason in dict.fromkeys([*reasons[0], *reasons[1]])),
        ComparisonRow("grounded-fact rate", rows[0][2], rows[1][2]),
        ComparisonRow("schema-valid answers", _schema_valid(source), _schema_valid(replay)),
        ComparisonRow("fields agreeing with the source", None, _rate(agree)),
    ]


def _email_rows(pairs: Sequence[tuple[CampaignRow, CampaignRow]], offers: Mapping[int, Offer],
                offer: Offer) -> list[ComparisonRow]:
    rubric: tuple[list[bool], list[bool]] = ([], [])
    valid: tuple[list[bool], list[bool]] = ([], [])
    used: tuple[list[float], list[float]] = ([], [])
    similarity: list[float] = []
    for src, new in pairs:
        for side, row in enumerate((src, new)):
            e = row.email
            valid[side].append(bool(e and e.valid))
            if e is None:
                rubric[side].append(False)
                continue
            profile = row.profile or Profile(company=row.prospect.company, website=row.prospect.website)
            side_offer = offers.get(row.run.campaign_id, offer) if row.run else offer
            result = score_email(EmailDraft(subject=e.subject_template, body=e.body_template),
                                 RenderedEmail(subject=e.subject, body=e.body), row.prospect, profile, side_offer)
            rubric[side].append(result.ok)
            used[side].append(result.facts_used)
        if src.email is not None and new.email is not None:
            similarity.append(difflib.SequenceMatcher(None, f"{src.email.subject}\n{src.email.body}",
                                                      f"{new.email.subject}\n{new.email.body}").ratio())
    return [
        ComparisonRow("rubric all-pass rate", _rate(rubric[0]), _rate(rubric[1])),
        ComparisonRow("valid-email rate", _rate(valid[0]), _rate(valid[1])),
        ComparisonRow("facts used per email", _mean(used[0]), _mean(used[1])),
        ComparisonRow("text similarity to the source", None, _mean(similarity)),
    ]


def compare_replay(engine: Engine, campaign: str) -> ReplayComparison:
    """Compare the replay campaign ``campaign`` with the runs it replays.

    Args:
        engine: the store.
        campaign: a campaign made by ``finetune.replay.replay`` (its runs carry ``replay_of_id``).

    Returns:
        ``ReplayComparison`` with one ``AgentComparison`` per replayed agent (researcher first).

    Raises:
        KeyError: no campaign of that name, or it is not a replay (no run replays another).
    """
    rows, traces = collect_rows(engine, campaign)
    if not rows:
        raise KeyError(f"no campaign named {campaign!r} with prospects in the store")
    with Session(engine) as session:
        runs = {r.id: r for r in session.exec(
            select(Run).where(col(Run.id).in_([r.run.id for r in rows.values() if r.run])))}
        source_ids = {r.replay_of_id for r in runs.values() if r.replay_of_id is not None}
        if not source_ids:
            raise KeyError(f"campaign {campaign!r} is not a replay: none of its runs replays another")
        source_runs = {r.id: r for r in session.exec(select(Run).where(col(Run.id).in_(source_ids)))}
        campaigns = {c.id: c for c in session.exec(
            select(Campaign).where(col(Campaign.id).in_({r.campaign_id for r in source_runs.values()} |
                                                        {r.campaign_id for r in runs.values()})))}
        replayed_ids = [t.replay_of_id for t in traces if t.replay_of_id is not None]
        originals = {t.id: t for t in session.exec(select(Trace).where(col(Trace.id).in_(replayed_ids)))}
    offers = {int(cid or 0): Offer.model_validate(c.offer) for cid, c in campaigns.items()}
    offer = offers[next(iter(runs.values())).campaign_id]
    source_rows: dict[int, CampaignRow] = {}
    for cid in {r.campaign_id for r in source_runs.values()}:
        found, _ = collect_rows(engine, campaigns[cid].name)
        source_rows.update({int(row.run.id or 0): row for row in found.values()
                            if row.run and row.run.id in source_runs})
    pairs = [(source_rows[r.run.replay_of_id], r) for r in rows.values()  # type: ignore[index]
             if r.run and r.run.replay_of_id in source_rows]
    comparison = ReplayComparison(
        campaign=campaign, source_campaigns=sorted({campaigns[r.campaign_id].name for r in source_runs.values()}),
        runs=len(pairs))
    for agent in ("researcher", "writer"):
        new = [t for t in traces if t.agent == agent]
        if not new:
            continue
        linked = [(originals[t.replay_of_id], t) for t in new if t.replay_of_id in originals]
        old = [o for o, _ in linked]
        result = AgentComparison(agent=agent, pairs=len(linked), source_backends=sorted({t.backend for t in old}),
                                 replay_backends=sorted({t.backend for t in new}))
        if agent == "researcher":
            result.rows += _research_rows(pairs, old, new)
        else:
            result.rows += _email_rows(pairs, offers, offer)
        same_input = [o.messages == t.messages for o, t in linked]
        result.rows.append(ComparisonRow("identical inputs", None, _rate(same_input)))
        result.rows.append(ComparisonRow("identical outputs", None, _rate([o.output == t.output for o, t in linked])))
        result.rows += [ComparisonRow(m, a, b) for m, a, b in zip(_CALL_METRICS, _call_rows(old), _call_rows(new),
                                                                  strict=True)]
        comparison.agents.append(result)
    return comparison
