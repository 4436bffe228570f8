"""Runtime context of the campaign graph (LangGraph ``context_schema``), per run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agents.schemas import Offer
from graphs.models import ModelPool
from tools.types import Web

__all__ = ["CampaignContext", "SaveHook"]

#: Called by the ``save`` node with the final state; the batch runner persists it.
SaveHook = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(kw_only=True)
class CampaignContext:
    """Everything a run needs besides its prospect.

    ``researcher`` and ``writer`` are backend specs, used as given: the environment
    (``OUTREACH_RESEARCHER``, ``OUTREACH_WRITER``) is read once, by ``outreach.settings``, so the run, its
    traces and the model that answers always name the same backend.
    """

    offer: Offer = field(metadata={"description": "The campaign's offer (sender, product, call to action)."})
    web: Web = field(metadata={"description": "Where research searches and fetches (corpus or live web)."})
    researcher: str = field(default="heuristic", metadata={"description": "Backend spec of the researcher."})
    writer: str = field(default="heuristic", metadata={"description": "Backend spec of the writer."})
    models: ModelPool = field(default_factory=ModelPool, metadata={"description": "Built models, by spec."})
    max_pages: int = field(default=5, metadata={"description": "Pages the researcher fetches at most."})
    max_write_attempts: int = field(default=2, metadata={"description": "Writer attempts (1 + retries)."})
    unpersonalised_emails: bool = field(default=False, metadata={
        "description": "When research finds no verified fact, still write an email without company facts "
                       "(stored as not personalised); when False such a run ends ``no_facts`` with no email."})
    on_save: SaveHook | None = field(default=None, metadata={"description": "Persists the final state."})
