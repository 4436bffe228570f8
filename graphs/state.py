"""State of the campaign graph: input, working state with named reducers, and output."""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

from agents.schemas import EmailDraft, Profile, ProspectInfo, RenderedEmail, ValidationResult

__all__ = ["CampaignInput", "CampaignOutput", "CampaignState"]


class CampaignInput(TypedDict):
    """What a run starts from: one prospect."""

    prospect: ProspectInfo


class CampaignOutput(TypedDict, total=False):
    """What a run returns: ``status`` is ``done`` (a valid email) or ``failed`` (see ``error``)."""

    status: str
    error: str | None
    profile: Profile
    draft: EmailDraft | None
    rendered: RenderedEmail | None
    validation: ValidationResult | None
    attempts: int


class CampaignState(CampaignInput, CampaignOutput, total=False):
    """Working state. ``attempts`` counts writer attempts (summed by ``operator.add``);
    ``feedback`` carries the last validation errors to the next writer attempt."""

    queries: list[str]
    fetch_errors: list[str]
    feedback: list[str]
    attempts: Annotated[int, operator.add]  # type: ignore[misc]
