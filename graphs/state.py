"""State of the campaign graph: input, working state with named reducers, and output."""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

from agents.schemas import EmailDraft, Profile, ProspectInfo, RenderedEmail, ValidationResult
from core.tasks import FailedCheck

__all__ = ["CampaignInput", "CampaignOutput", "CampaignState"]


class CampaignInput(TypedDict):
    """What a run starts from: one prospect."""

    prospect: ProspectInfo


class CampaignOutput(TypedDict, total=False):
    """What a run returns.

    ``status`` is ``done`` (a valid email), ``no_facts`` (research found no verified fact: no email, or,
    when the campaign opts in, a valid non-personalised one) or ``failed`` (see ``error``). For
    ``no_facts``, ``error`` says what research saw. ``personalised`` is False for an email written
    without any company fact.
    """

    status: str
    error: str | None
    personalised: bool
    profile: Profile
    draft: EmailDraft | None
    rendered: RenderedEmail | None
    validation: ValidationResult | None
    attempts: int


class CampaignState(CampaignInput, CampaignOutput, total=False):
    """Working state. ``attempts`` counts writer attempts (summed by ``operator.add``);
    ``feedback`` carries the checks the last draft failed (``ValidationResult.failed``) to the next writer
    attempt's task."""

    queries: list[str]
    fetch_errors: list[str]
    feedback: list[FailedCheck]
    attempts: Annotated[int, operator.add]  # type: ignore[misc]
