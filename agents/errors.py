"""Errors the agents raise for problems a user (or a backend) can cause.

Both carry the data a caller needs to react (the graph retries a writer on ``MergeTagError`` and
reports a ``ModelOutputError``), and both say in their message what to do about it.
"""

from __future__ import annotations

__all__ = ["MergeTagError", "ModelOutputError"]

_RAW_PREVIEW_CHARS = 300


class ModelOutputError(ValueError):
    """A model's answer was still not valid JSON for the agent's schema after one corrective retry.

    Args:
        agent: The agent whose model failed (``"researcher"`` or ``"writer"``).
        reason: Why the last answer was rejected (JSON error or schema validation error).
        raw_output: The last raw answer of the model (kept whole on the exception; shortened in the message).

    Attributes:
        agent, reason, raw_output: As given.
    """

    def __init__(self, agent: str, reason: str, raw_output: str) -> None:
        self.agent = agent
        self.reason = reason
        self.raw_output = raw_output
        preview = raw_output
        if len(preview) > _RAW_PREVIEW_CHARS:
            preview = preview[:_RAW_PREVIEW_CHARS] + "..."
        super().__init__(
            f"the {agent} model did not return valid JSON for its output format, even after one retry: "
            f"{reason}. Raw output: {preview!r}. Check that the backend answers with the JSON object the "
            f"prompt asks for (use a stronger teacher, or train the {agent} miniature on more traces)."
        )


class MergeTagError(ValueError):
    """An email uses merge tags that cannot be filled (unknown tags, or missing/empty facts or fields).

    Args:
        tags: The offending tag names as written inside the braces (e.g. ``["fact.revenue", "nickname"]``).
        allowed: Every tag name that can be filled for this prospect and profile.

    Attributes:
        tags, allowed: As given (copied into new lists).
    """

    def __init__(self, tags: list[str], allowed: list[str]) -> None:
        self.tags = list(tags)
        self.allowed = list(allowed)
        bad = ", ".join("{{" + t + "}}" for t in self.tags)
        ok = ", ".join("{{" + t + "}}" for t in self.allowed)
        super().__init__(
            f"the email uses merge tags that cannot be filled: {bad}. Allowed tags for this prospect: {ok}. "
            "Rewrite the email using only the allowed tags."
        )
