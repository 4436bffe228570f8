"""Layer 2: the agents. One module per role, each with its prompt, output format and node logic;
the model is always injected (a langchain-core ``BaseChatModel``), never built here.

* ``research`` (researcher): web search and fetch -> numbered sentences -> one model call -> a
  grounded ``Profile``.
* ``write`` / ``render`` (writer): an email with merge tags, then filled from prospect and profile.
* ``validate_email``: named checks on a rendered email, with errors a model can act on.
* ``HeuristicChatModel``: the offline, deterministic, rule-based teacher (not an LLM). It is
  imported lazily so that ``import agents`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agents.errors import MergeTagError, ModelOutputError
from agents.grounding import is_instruction, number_sentences, split_sentences
from agents.prompts import EXTRACTION_SYSTEM_PROMPT, WRITER_SYSTEM_PROMPT
from agents.researcher import plan_queries, rank_urls, research
from agents.schemas import (
    FACT_FIELDS,
    EmailDraft,
    ExtractedFact,
    ExtractionOutput,
    Fact,
    Offer,
    Profile,
    ProspectInfo,
    RenderedEmail,
    ResearchResult,
    ValidationResult,
)
from agents.validation import SPAM_PHRASES, validate_email
from agents.writer import merge_tag_values, render, write

if TYPE_CHECKING:
    from agents.heuristic import HeuristicChatModel

__all__ = [
    "EXTRACTION_SYSTEM_PROMPT",
    "FACT_FIELDS",
    "SPAM_PHRASES",
    "WRITER_SYSTEM_PROMPT",
    "EmailDraft",
    "ExtractedFact",
    "ExtractionOutput",
    "Fact",
    "HeuristicChatModel",
    "MergeTagError",
    "ModelOutputError",
    "Offer",
    "Profile",
    "ProspectInfo",
    "RenderedEmail",
    "ResearchResult",
    "ValidationResult",
    "is_instruction",
    "merge_tag_values",
    "number_sentences",
    "plan_queries",
    "rank_urls",
    "render",
    "research",
    "split_sentences",
    "validate_email",
    "write",
]


def __getattr__(name: str) -> Any:
    """Import ``HeuristicChatModel`` on first use (it pulls in langchain-core's model classes)."""
    if name == "HeuristicChatModel":
        from agents.heuristic import HeuristicChatModel

        return HeuristicChatModel
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
