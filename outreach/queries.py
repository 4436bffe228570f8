"""Store queries the CLI lists and exports from."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session, select

from store.models import Campaign, Run, Trace

__all__ = ["select_traces"]


def select_traces(engine: Engine, *, campaign: str | None = None, agent: str | None = None,
                  limit: int | None = None, newest_first: bool = False) -> list[Trace]:
    """Traces filtered by campaign name and agent, oldest first unless ``newest_first``."""
    with Session(engine) as session:
        query = select(Trace)
        if campaign:
            query = query.join(Run, Run.id == Trace.run_id).join(Campaign, Campaign.id == Run.campaign_id).where(  # type: ignore[arg-type]
                Campaign.name == campaign)
        if agent:
            query = query.where(Trace.agent == agent)
        query = query.order_by(Trace.id.desc() if newest_first else Trace.id)  # type: ignore[union-attr,arg-type]
        if limit:
            query = query.limit(limit)
        return list(session.exec(query).all())
