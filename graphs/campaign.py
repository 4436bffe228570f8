"""The campaign graph: research -> write -> validate -> (one retry of write) -> save, per prospect.

Research that finds no verified fact goes straight to save (status ``no_facts``, no email) unless the
campaign opts in to non-personalised emails (``CampaignContext.unpersonalised_emails``); the writer then
writes without company facts and validation does not ask for a ``{{fact.*}}`` tag.

Nodes follow ``langchain-ai/react-agent``: ``async def node(state, runtime) -> dict``, routing
shown in ``Command[Literal[...]]`` hints, the graph wired at the bottom of the module.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from langgraph.config import get_config
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command

from agents import (
    MergeTagError,
    ModelOutputError,
    render,
    research,
    validate_email,
    write,
)
from agents.schemas import DROP_REASONS
from agents.validation import merge_tag_failure, output_failure
from graphs.context import CampaignContext
from graphs.state import CampaignInput, CampaignOutput, CampaignState
from store.models import RunStatus

__all__ = ["graph"]

logger = logging.getLogger(__name__)


async def research_node(
    state: CampaignState, runtime: Runtime[CampaignContext]
) -> Command[Literal["write", "save"]]:
    """Research the prospect's company into a grounded profile; go on to the writer when it holds a fact
    (or the campaign opts in to non-personalised emails), else to save."""
    ctx = runtime.context
    try:
        result = await research(
            state["prospect"], model=ctx.models.get(ctx.researcher), web=ctx.web,
            config=get_config(), max_pages=ctx.max_pages,
        )
    except ModelOutputError as exc:
        return Command(goto="save", update={"error": str(exc), "status": RunStatus.FAILED})
    personalised = bool(result.profile.facts)
    update = {"profile": result.profile, "queries": result.queries, "fetch_errors": result.fetch_errors,
              "personalised": personalised}
    return Command(goto="write" if personalised or ctx.unpersonalised_emails else "save", update=update)


async def write_node(state: CampaignState, runtime: Runtime[CampaignContext]) -> dict[str, Any]:
    """Write an email with merge tags and render it; a merge-tag error becomes feedback."""
    ctx = runtime.context
    prospect, profile = state["prospect"], state["profile"]
    try:
        draft = await write(
            ctx.offer, prospect, profile, model=ctx.models.get(ctx.writer),
            feedback=state.get("feedback", []), config=get_config(),
        )
    except ModelOutputError as exc:
        return {"attempts": 1, "draft": None, "rendered": None, "error": str(exc), "validation": output_failure(exc)}
    try:
        rendered = render(draft, prospect, profile, ctx.offer)
    except MergeTagError as exc:
        return {"attempts": 1, "draft": draft, "rendered": None, "error": None, "validation": merge_tag_failure(exc)}
    return {"attempts": 1, "draft": draft, "rendered": rendered, "error": None, "validation": None}


async def validate_node(
    state: CampaignState, runtime: Runtime[CampaignContext]
) -> Command[Literal["write", "save"]]:
    """Check grounding, merge tags, length, spam phrases, call to action and opt-out line; retry once."""
    ctx = runtime.context
    validation = state.get("validation")
    if validation is None and state.get("rendered") is not None and state.get("draft") is not None:
        validation = validate_email(state["draft"], state["rendered"], state["prospect"],  # type: ignore[arg-type]
                                    state["profile"], ctx.offer, require_fact=state.get("personalised", True))
    assert validation is not None
    if validation.ok:
        return Command(goto="save", update={"validation": validation, "feedback": []})
    if state.get("attempts", 0) < ctx.max_write_attempts:
        logger.debug("retrying writer for %s: %s", state["prospect"].email, validation.errors)
        return Command(goto="write", update={"validation": validation, "feedback": validation.failed})
    return Command(goto="save", update={"validation": validation})


def _no_facts_note(state: CampaignState) -> str:
    """What research saw when it found no verified fact (stored as the ``no_facts`` run's ``error``).

    Returns:
        e.g. ``"research found no verified fact: 3 page(s) read, 2 fact(s) dropped (misattributed 2);
        1 search/fetch error(s), first: ..."``.
    """
    profile = state["profile"]
    reasons = ", ".join(f"{k} {profile.drop_reasons[k]}" for k in DROP_REASONS if profile.drop_reasons.get(k))
    note = (f"research found no verified fact: {len(profile.sources)} page(s) read, "
            f"{profile.dropped_facts} fact(s) dropped" + (f" ({reasons})" if reasons else ""))
    errors = state.get("fetch_errors") or []
    return note + (f"; {len(errors)} search/fetch error(s), first: {errors[0]}" if errors else "")


async def save_node(state: CampaignState, runtime: Runtime[CampaignContext]) -> dict[str, Any]:
    """Decide the run's status and hand the final state to the context's save hook.

    ``no_facts`` when research found no verified fact and either no email was written (the campaign
    does not opt in) or the non-personalised one passed validation; ``done`` for a valid email;
    ``failed`` otherwise (research error, or an email that failed validation on every attempt).
    """
    validation, error = state.get("validation"), state.get("error")
    no_facts = not error and not state.get("personalised", True)
    update: dict[str, Any]
    if no_facts and (validation is None or validation.ok):
        update = {"status": RunStatus.NO_FACTS, "error": _no_facts_note(state)}
    elif not error and validation is not None and validation.ok:
        update = {"status": RunStatus.DONE, "error": None}
    else:
        error = error or "email failed validation: " + "; ".join(validation.errors if validation else ["no email"])
        update = {"status": RunStatus.FAILED, "error": error}
    if runtime.context.on_save is not None:
        await runtime.context.on_save({**state, **update})
    return update


builder = StateGraph(
    CampaignState, context_schema=CampaignContext, input_schema=CampaignInput, output_schema=CampaignOutput
)
builder.add_node("research", research_node)
builder.add_node("write", write_node)
builder.add_node("validate", validate_node)
builder.add_node("save", save_node)
builder.add_edge(START, "research")
builder.add_edge("write", "validate")
builder.add_edge("save", END)
graph = builder.compile(name="Campaign")
