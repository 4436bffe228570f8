"""The writer agent: a personalised cold email written with merge tags, and its renderer.

The model never types a name or a fact (DESIGN.md, "Grounding by construction"): it writes
``{{first_name}}``, ``{{company}}``, ``{{fact.<field>}}`` ...; ``render`` fills them from the prospect,
the offer and the profile, and a tag that cannot be filled is a ``MergeTagError``, never a blank. The
model is asked with a typed task (``core.tasks.WritingTask``: offer, title, allowed merge tags, limits,
the checks an earlier draft failed), rendered into the prompt by ``agents.prompts``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agents.errors import MergeTagError
from agents.parsing import ainvoke_structured
from agents.prompts import NAME_TAG_DESCRIPTIONS, WRITER_SYSTEM_PROMPT, render_feedback, render_writer_user
from agents.prose import GATED_FIELDS, prose_problem, prose_value, relevant_problem
from agents.schemas import FACT_FIELDS, EmailDraft, Offer, Profile, ProspectInfo, RenderedEmail
from core.tasks import FailedCheck, MergeTag, OfferBrief, WritingTask

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import RunnableConfig

__all__ = [
    "MERGE_TAG_PATTERN",
    "build_writer_messages",
    "merge_tag_values",
    "render",
    "used_merge_tags",
    "writable_facts",
    "write",
    "writer_messages",
    "writing_task",
]

logger = logging.getLogger(__name__)

#: A merge tag: ``{{ name }}`` with optional inner spaces; group 1 is the name.
MERGE_TAG_PATTERN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_TAG_AND_PERIOD = re.compile(MERGE_TAG_PATTERN.pattern + r"(\.?)")


def merge_tag_values(prospect: ProspectInfo, profile: Profile, offer: Offer) -> dict[str, str]:
    """Return every merge tag that can be filled, mapped to its value.

    Name tags come from the prospect (``first_name``, ``last_name``, ``company``, ``title``) and the
    offer (``sender_name``, ``sender_company``, ``product``); ``fact.<field>`` tags from the profile's
    facts (first fact per field), written as prose (``agents.prose.prose_value``: no trailing
    punctuation, no sentence-start or heading capitals in a noun phrase). Tags whose value is empty are
    left out, so using them is an error rather than a blank in a sent email. Keys are in prompt order:
    names first, then facts in ``FACT_FIELDS`` order.
    """
    names = {
        "first_name": prospect.first_name,
        "last_name": prospect.last_name,
        "company": prospect.company,
        "title": prospect.title,
        "sender_name": offer.sender_name,
        "sender_company": offer.sender_company,
        "product": offer.product,
    }
    values = {k: v.strip() for k, v in names.items() if v and v.strip()}
    for name in FACT_FIELDS:
        fact = profile.fact(name)
        value = prose_value(name, fact.value) if fact is not None else ""
        if value:
            values[f"fact.{name}"] = value
    return values


def writable_facts(prospect: ProspectInfo, profile: Profile, offer: Offer) -> dict[str, str]:
    """The fact tags the writer is offered, mapped to their values (a subset of ``merge_tag_values``).

    A fact is offered when its value reads as prose in its field's role (``agents.prose.prose_problem``:
    no tag slugs or tag lists, an event that can follow the company's name, ...) and, for a pain point or
    an event (``agents.prose.GATED_FIELDS``), when it is relevant to what the offer solves
    (``agents.prose.relevant_problem``). When that leaves none, the prose-ready facts are offered without
    the relevance rule, and when none is prose-ready, every fact: validation asks a personalised email for
    a fact, and the rubric's ``fact_relevant`` check then reports the irrelevant one.
    """
    facts = {t: v for t, v in merge_tag_values(prospect, profile, offer).items() if t.startswith("fact.")}
    prose = {t: v for t, v in facts.items() if prose_problem(t[5:], v) is None}
    relevant = {t: v for t, v in prose.items() if t[5:] not in GATED_FIELDS
                or relevant_problem(v, offer.problems_solved, offer.value_proposition)[0]}
    for name, chosen in (("relevant", relevant), ("prose-ready", prose)):
        if chosen:
            if len(chosen) < len(facts):
                logger.debug("writer offered %d of %d facts (%s) for %s", len(chosen), len(facts), name,
                             prospect.email)
            return chosen
    return facts


def used_merge_tags(text: str) -> list[str]:
    """Return the tag names used in ``text``, in order of first use, without duplicates."""
    return list(dict.fromkeys(m.group(1) for m in MERGE_TAG_PATTERN.finditer(text)))


def writing_task(
    offer: Offer, prospect: ProspectInfo, profile: Profile, feedback: Sequence[FailedCheck] = ()
) -> WritingTask:
    """The writer's typed task for one prospect.

    The offer without the sender's identity (``OfferBrief``), the prospect's title, the merge tags that can
    be filled (``merge_tag_values``: name tags with ``NAME_TAG_DESCRIPTIONS``, then the facts of
    ``writable_facts``, each described by its value), the prompt's limits, and ``feedback``: the checks an
    earlier draft failed (``ValidationResult.failed``).

    Raises:
        TypeError: a feedback item is not a ``core.tasks.FailedCheck`` (validation's error strings are
            not feedback: pass ``ValidationResult.failed``).
    """
    bad = [type(item).__name__ for item in feedback if not isinstance(item, FailedCheck)]
    if bad:
        raise TypeError(f"writer feedback takes core.tasks.FailedCheck items (ValidationResult.failed), got {bad[0]}")
    values = merge_tag_values(prospect, profile, offer)
    names = [MergeTag(name=tag, description=NAME_TAG_DESCRIPTIONS[tag]) for tag in values
             if not tag.startswith("fact.")]
    facts = [MergeTag(name=tag, description=value, value=value)
             for tag, value in writable_facts(prospect, profile, offer).items()]
    brief = OfferBrief(
        sender_title=offer.sender_title, product=offer.product, value_proposition=offer.value_proposition,
        problems_solved=tuple(offer.problems_solved), proof_point=offer.proof_point,
        call_to_action=offer.call_to_action, cta_style=offer.cta_style, opt_out_line=offer.opt_out_line,
    )
    return WritingTask(offer=brief, prospect_title=prospect.title, merge_tags=(*names, *facts),
                       feedback=tuple(feedback))


def writer_messages(task: WritingTask) -> list[BaseMessage]:
    """The writer prompt of ``task``: ``WRITER_SYSTEM_PROMPT``, the user message
    ``agents.prompts.render_writer_user`` renders (followed by ``WRITER_NO_FACTS_NOTE`` when no fact tag is
    offered: a non-personalised email, the system prompt's rule to mention a fact then does not apply), and,
    when the task carries feedback, a second user message (``agents.prompts.render_feedback``) listing it."""
    from langchain_core.messages import HumanMessage, SystemMessage

    messages: list[BaseMessage] = [SystemMessage(content=WRITER_SYSTEM_PROMPT),
                                   HumanMessage(content=render_writer_user(task))]
    feedback = render_feedback(task.feedback)
    if feedback is not None:
        messages.append(HumanMessage(content=feedback))
    return messages


def build_writer_messages(
    offer: Offer, prospect: ProspectInfo, profile: Profile, feedback: Sequence[FailedCheck] = ()
) -> list[BaseMessage]:
    """The writer prompt for one prospect: ``writer_messages(writing_task(offer, prospect, profile, feedback))``.

    Raises:
        TypeError: see ``writing_task``.
    """
    return writer_messages(writing_task(offer, prospect, profile, feedback))


async def write(
    offer: Offer,
    prospect: ProspectInfo,
    profile: Profile,
    *,
    model: BaseChatModel,
    feedback: Sequence[FailedCheck] = (),
    config: RunnableConfig | None = None,
) -> EmailDraft:
    """Ask the writer model for an email draft with merge tags.

    Args:
        offer: What is sold and how (call to action, opt-out line).
        prospect: Who receives the email (only the title is shown as text; names are tags).
        profile: The researcher's grounded facts (offered as ``{{fact.<field>}}`` tags).
        model: The writer's chat model (teacher or miniature); never built here. It is called with the
            typed task (``writing_task``) as ``task=``.
        feedback: The checks an earlier attempt failed (``ValidationResult.failed``), carried by the task
            and shown as an extra user message.
        config: Run config of the graph node, forwarded to every model call.

    Returns:
        The draft (not yet rendered or validated: see ``render`` and ``validate_email``).

    Raises:
        ModelOutputError: the model's answer was not valid JSON twice.
        TypeError: a feedback item is not a ``FailedCheck``.
    """
    task = writing_task(offer, prospect, profile, feedback)
    draft = await ainvoke_structured(model, writer_messages(task), EmailDraft, agent="writer", config=config,
                                     task=task)
    logger.debug("writer draft for %s: subject %r, %d tag(s)", prospect.email, draft.subject,
                 len(used_merge_tags(draft.subject + draft.body)))
    return draft


def render(draft: EmailDraft, prospect: ProspectInfo, profile: Profile, offer: Offer) -> RenderedEmail:
    """Fill every merge tag of ``draft`` (``{{ tag }}``, inner spaces tolerated).

    Args:
        draft: Subject and body with merge tags.
        prospect, profile, offer: Where the values come from (see ``merge_tag_values``).

    Returns:
        The email with every tag replaced by its value.

    Raises:
        MergeTagError: a tag is unknown, names a fact the profile lacks, or names an empty field;
            the error lists the bad tags and the allowed ones.
    """
    values = merge_tag_values(prospect, profile, offer)
    bad = [t for t in used_merge_tags(draft.subject + "\n" + draft.body) if t not in values]
    if bad:
        raise MergeTagError(bad, list(values))

    def value(match: re.Match[str]) -> str:
        filled = values[match.group(1)]
        # A value that ends its own abbreviation ("Washington, D.C.") takes the sentence's period.
        return filled if match.group(2) and filled.endswith(".") else filled + match.group(2)

    def fill(text: str) -> str:
        return _TAG_AND_PERIOD.sub(value, text)

    return RenderedEmail(subject=fill(draft.subject), body=fill(draft.body))
