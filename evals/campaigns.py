"""What a campaign in the store produced: per-company predictions for scoring, and a summary of
runs, emails, grounding (facts kept, dropped by reason), tokens, latency and cost (read from the store,
never recomputed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from agents.schemas import DROP_REASONS, Fact, Profile, ProspectInfo
from evals.costs import DEFAULT_COST_BASIS, CostBasis, cost_figures, percentile
from miniatures.pricing import DEFAULT_PRICES, Price
from store.models import Campaign, EmailRecord, FactRecord, ProfileRecord, Prospect, Run, RunStatus, Trace

__all__ = ["CampaignRow", "CampaignSummary", "campaign_predictions", "campaign_summary", "collect_rows",
           "sum_drop_reasons"]


def _campaign_id(session: Session, campaign: str) -> int:
    record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
    if record is None or record.id is None:
        raise KeyError(f"no campaign named {campaign!r} in the store")
    return record.id


def campaign_predictions(engine: Engine, campaign: str) -> dict[str, dict[str, str]]:
    """``{company: {field: value}}`` from the campaign's stored profiles (first fact per field).

    Raises:
        KeyError: no campaign of that name.
    """
    with Session(engine) as session:
        cid = _campaign_id(session, campaign)
        rows = session.exec(
            select(ProfileRecord.company, FactRecord.field, FactRecord.value)
            .join(FactRecord, FactRecord.profile_id == ProfileRecord.id)  # type: ignore[arg-type]
            .join(Run, Run.id == ProfileRecord.run_id)  # type: ignore[arg-type]
            .where(Run.campaign_id == cid)
            .order_by(FactRecord.id)  # type: ignore[arg-type]
        ).all()
        companies = session.exec(
            select(ProfileRecord.company).join(Run, Run.id == ProfileRecord.run_id).where(Run.campaign_id == cid)  # type: ignore[arg-type]
        ).all()
    predictions: dict[str, dict[str, str]] = {c: {} for c in companies}
    for company, field, value in rows:
        predictions[company].setdefault(field, value)
    return predictions


@dataclass(frozen=True)
class CampaignSummary:
    """Counts and figures of one campaign. Latencies are milliseconds per model call; cost in US dollars.

    Attributes:
        no_facts: runs whose research found no verified fact (status ``no_facts``).
        valid_emails: emails that passed validation, ``unpersonalised_emails`` of them written without a
            company fact (the campaign opted in to such emails).
        dropped_facts: model facts dropped by grounding, in all; ``drop_reasons`` splits them by reason
            (every key of ``agents.schemas.DROP_REASONS``, 0 when none). Profiles stored before reasons
            were recorded count in ``dropped_facts`` only, so the reasons may sum to less.
        cost_usd: recorded trace costs (API models' tokens at their list prices).
        stand_in_cost_usd: the heuristic's tokens priced as the API teacher it stands in for
            (``stand_in_model``, None when the campaign made no heuristic call; ``evals.costs``), not in ``cost_usd``.
    """

    runs: int
    done: int
    no_facts: int
    failed: int
    pending: int
    valid_emails: int
    unpersonalised_emails: int
    facts: int
    dropped_facts: int
    drop_reasons: dict[str, int]
    model_calls: int
    input_tokens: int
    output_tokens: int
    latency_p50_ms: float
    latency_p95_ms: float
    cost_usd: float
    stand_in_cost_usd: float = 0.0
    stand_in_model: str | None = None


def campaign_summary(engine: Engine, campaign: str, *, prices: Mapping[str, Price] = DEFAULT_PRICES,
                     basis: CostBasis = DEFAULT_COST_BASIS) -> CampaignSummary:
    """Summarise a campaign from the store.

    Args:
        engine: the store.
        campaign: its name.
        prices: per-token price table (to price the heuristic's stand-in).
        basis: the model the heuristic stands in for (settings ``[costs]``).

    Raises:
        KeyError: no campaign of that name.
    """
    with Session(engine) as session:
        cid = _campaign_id(session, campaign)
        statuses = session.exec(select(Run.status).where(Run.campaign_id == cid)).all()
        run_ids = select(Run.id).where(Run.campaign_id == cid)
        emails = session.exec(select(EmailRecord.valid, EmailRecord.personalised)
                              .where(col(EmailRecord.run_id).in_(run_ids))).all()
        profiles = session.exec(select(ProfileRecord).where(col(ProfileRecord.run_id).in_(run_ids))).all()
        n_facts = len(session.exec(select(FactRecord.id).where(
            col(FactRecord.profile_id).in_([p.id for p in profiles]))).all())
        traces = session.exec(select(Trace).where(col(Trace.run_id).in_(run_ids))).all()
    latencies = [t.latency_ms for t in traces]
    priced = cost_figures(backends=[], emails=0,  # the token part only: a campaign's wall time is not recorded
                          call_tokens=[(t.input_tokens, t.output_tokens) for t in traces],
                          call_costs_usd=[t.cost_usd for t in traces], call_latencies_ms=latencies,
                          run_latencies_ms=[], wall_s=0.0, prices=prices, call_backends=[t.backend for t in traces],
                          basis=basis)
    return CampaignSummary(
        runs=len(statuses),
        done=sum(s == RunStatus.DONE for s in statuses),
        no_facts=sum(s == RunStatus.NO_FACTS for s in statuses),
        failed=sum(s == RunStatus.FAILED for s in statuses),
        pending=sum(s in (RunStatus.PENDING, RunStatus.RUNNING) for s in statuses),
        valid_emails=sum(bool(v) for v, _ in emails),
        unpersonalised_emails=sum(bool(v) and not personal for v, personal in emails),
        facts=n_facts,
        dropped_facts=sum(p.dropped_facts for p in profiles),
        drop_reasons=sum_drop_reasons(p.drop_reasons for p in profiles),
        model_calls=len(traces),
        input_tokens=sum(t.input_tokens for t in traces),
        output_tokens=sum(t.output_tokens for t in traces),
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        cost_usd=sum(t.cost_usd for t in traces),
        stand_in_cost_usd=priced.stand_in_cost_usd,
        stand_in_model=priced.stand_in_model,
    )


def sum_drop_reasons(reasons: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Add up ``Profile.drop_reasons`` dicts: ``{reason: count}`` with every ``DROP_REASONS`` key (0 when
    none), in that order, then any other reason found."""
    total = dict.fromkeys(DROP_REASONS, 0)
    for one in reasons:
        for reason, n in (one or {}).items():
            total[reason] = total.get(reason, 0) + int(n)
    return total


@dataclass
class CampaignRow:
    """One prospect of a campaign with its run, profile and email as stored (None where missing)."""

    prospect: ProspectInfo
    run: Run | None
    profile: Profile | None
    email: EmailRecord | None


def collect_rows(engine: Engine, campaign: str, emails: Iterable[str] | None = None
                 ) -> tuple[dict[str, CampaignRow], list[Trace]]:
    """The campaign's prospects (by email; only ``emails`` when given) with their stored results, and
    every trace of the campaign. An unknown campaign gives ``({}, [])``."""
    wanted = set(emails) if emails is not None else None
    with Session(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if record is None:
            return {}, []
        pairs = session.exec(
            select(Prospect, Run).join(Run, col(Run.prospect_id) == col(Prospect.id), isouter=True)
            .where(Prospect.campaign_id == record.id)
        ).all()
        run_ids = [r.id for _, r in pairs if r is not None]
        mails = {e.run_id: e for e in session.exec(select(EmailRecord).where(col(EmailRecord.run_id).in_(run_ids)))}
        profiles = {p.run_id: p for p in session.exec(
            select(ProfileRecord).where(col(ProfileRecord.run_id).in_(run_ids)))}
        facts: dict[int, list[Fact]] = {}
        profile_ids = [p.id for p in profiles.values()]
        for f in session.exec(select(FactRecord).where(col(FactRecord.profile_id).in_(profile_ids))
                              .order_by(col(FactRecord.id))):
            facts.setdefault(f.profile_id, []).append(
                Fact(field=f.field, value=f.value, evidence=f.evidence, source_url=f.source_url))
        traces = list(session.exec(select(Trace).where(col(Trace.run_id).in_(run_ids))).all())
    rows: dict[str, CampaignRow] = {}
    for p, run in pairs:
        if wanted is not None and p.email not in wanted:
            continue
        info = ProspectInfo(first_name=p.first_name, last_name=p.last_name, title=p.title, email=p.email,
                            company=p.company, website=p.website)
        run_id = run.id if run is not None and run.id is not None else -1
        prec = profiles.get(run_id)
        profile = None
        if prec is not None:
            profile = Profile(company=prec.company, website=prec.website, facts=facts.get(prec.id or -1, []),
                              dropped_facts=prec.dropped_facts, drop_reasons=dict(prec.drop_reasons or {}),
                              sources=prec.sources)
        rows[p.email] = CampaignRow(info, run, profile, mails.get(run_id))
    return rows, traces
