"""The campaign graph: research -> write -> validate -> (one retry of write) -> save, per prospect.

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
    ValidationResult,
    render,
    research,
    validate_email,
    write,
)
from graphs.context import CampaignContext
from graphs.state import CampaignInput, CampaignOutput, CampaignState

__all__ = ["graph"]

logger = logging.getLogger(__name__)


async def research_node(state: CampaignState, runtime: Runtime[CampaignContext]) -> dict[str, Any]:
    """Research the prospect's company into a grounded profile."""
    ctx = runtime.context
    try:
        result = await research(
            state["prospect"], model=ctx.models.get(ctx.researcher), web=ctx.web,
            config=get_config(), max_pages=ctx.max_pages,
        )
    except ModelOutputError as exc:
        return {"error": str(exc), "status": "failed"}
    return {"profile": result.profile, "queries": result.queries, "fetch_errors": result.fetch_errors}


def route_after_research(state: CampaignState) -> Literal["write", "save"]:
    """Go on to the writer unless research failed."""
    return "save" if state.get("error") else "write"


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
        return {"attempts": 1, "draft": None, "rendered": None, "error": str(exc),
                "validation": ValidationResult(checks={"json": False}, errors=[str(exc)])}
    try:
        rendered = render(draft, prospect, profile, ctx.offer)
    except MergeTagError as exc:
        return {"attempts": 1, "draft": draft, "rendered": None, "error": None,
                "validation": ValidationResult(checks={"merge_tags": False}, errors=[str(exc)])}
    return {"attempts": 1, "draft": draft, "rendered": rendered, "error": None, "validation": None}


async def validate_node(
    state: CampaignState, runtime: Runtime[CampaignContext]
) -> Command[Literal["write", "save"]]:
    """Check grounding, merge tags, length, spam phrases, call to action and opt-out line; retry once."""
    ctx = runtime.context
    validation = state.get("validation")
    if validation is None and state.get("rendered") is not None and state.get("draft") is not None:
        validation = validate_email(state["draft"], state["rendered"], state["prospect"],  # type: ignore[arg-type]
                                    state["profile"], ctx.offer)
    assert validation is not None
    if validation.ok:
        return Command(goto="save", update={"validation": validation, "feedback": []})
    if state.get("attempts", 0) < ctx.max_write_attempts:
        logger.debug("retrying writer for %s: %s", state["prospect"].email, validation.errors)
        return Command(goto="write", update={"validation": validation, "feedback": validation.errors})
    return Command(goto="save", update={"validation": validation})


async def save_node(state: CampaignState, runtime: Runtime[CampaignContext]) -> dict[str, Any]:
    """Decide the run's status and hand the final state to the context's save hook."""
    validation = state.get("validation")
    ok = not state.get("error") and validation is not None and validation.ok
    error = state.get("error")
    if not ok and not error:
        error = "email failed validation: " + "; ".join(validation.errors if validation else ["no email"])
    update: dict[str, Any] = {"status": "done" if ok else "failed", "error": None if ok else error}
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
builder.add_conditional_edges("research", route_after_research)
builder.add_edge("write", "validate")
builder.add_edge("save", END)
graph = builder.compile(name="Campaign")
