"""Seeded sampling per row of a batch, as a logits processor that leaves generation greedy.

``transformers``' own sampling draws every row from the process's global random generator, so a row's
tokens depend on which other requests share its batch. Here each row that asks for sampling has its own
``torch.Generator`` seeded by its request: the processor draws that row's next token (temperature, then
nucleus / top-p filtering as in Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") and
leaves only it selectable, so greedy decoding picks it. Rows without sampling are left as they are. Put it
after any grammar mask, so tokens the grammar refuses have probability 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RowSampling", "SeededSampler", "prompt_seed"]


@dataclass(frozen=True)
class RowSampling:
    """How one row samples: ``temperature`` > 0, ``top_p`` in (0, 1], and the request's ``seed`` (any int)."""

    temperature: float
    top_p: float
    seed: int

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling needs a temperature > 0 (0 means greedy: pass no RowSampling), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def prompt_seed(text: str) -> int:
    """A stable 63-bit seed from a prompt's text (SHA-256), so the same request samples the same answer."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


class SeededSampler:
    """A ``transformers`` logits processor: rows with a ``RowSampling`` draw their token from their own generator.

    Args:
        rows: one entry per batch row, ``None`` for a greedy row.

    Called as ``processor(input_ids, scores)`` with ``scores`` of shape ``(batch, vocab)`` (float logits);
    returns the scores with, in each sampling row, every token but the drawn one at ``-inf``.
    """

    def __init__(self, rows: Sequence[RowSampling | None]) -> None:
        import torch

        self.rows = list(rows)
        self._generators: list[Any] = [
            None if r is None else torch.Generator(device="cpu").manual_seed(r.seed) for r in self.rows]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if len(self.rows) != scores.shape[0]:
            raise ValueError(f"SeededSampler has {len(self.rows)} rows, the batch has {scores.shape[0]}")
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            logits = scores[i].float() / row.temperature
            probs = torch.softmax(logits, dim=-1)
            if row.top_p < 1:
                sorted_probs, order = torch.sort(probs, descending=True)
                # keep the smallest prefix whose mass reaches top_p (the first token always stays)
                drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= row.top_p
                sorted_probs[drop] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            if not torch.isfinite(probs).all() or probs.sum() <= 0:
                continue  # every token masked (a finished row): leave it to the stop logic
            token = torch.multinomial(probs.cpu(), 1, generator=self._generators[i]).to(scores.device)
            keep = scores[i, token].clone()
            scores[i] = float("-inf")
            scores[i, token] = keep
        return scores
