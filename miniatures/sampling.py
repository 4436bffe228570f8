"""Seeded sampling per row of a batch, as a logits processor that leaves generation greedy.

``transformers``' own sampling draws every row from the process's global random generator, so a row's
tokens depend on which other requests share its batch. Here each row that asks for sampling has its own
``torch.Generator`` seeded by its request: the processor draws that row's next token (temperature, then
nucleus / top-p filtering as in Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", then
min-p filtering as in Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM
Outputs", arXiv 2407.01082) and leaves only it selectable, so greedy decoding picks it. Rows without sampling
are left as they are. Put it after any grammar mask, so tokens the grammar refuses have probability 0.
``SeededSampler.probabilities`` gives the processed distributions alone and ``draw`` draws from one the way
``torch.multinomial`` does, for the engine's speculative steps (``miniatures.local._Batch._speculate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RowSampling", "SeededSampler", "draw", "prompt_seed"]


@dataclass(frozen=True)
class RowSampling:
    """How one row samples: ``temperature`` > 0, ``top_p`` in (0, 1], the request's ``seed`` (any int), and
    ``min_p`` in [0, 1): tokens whose probability (after temperature) is below ``min_p`` times the row's most likely
    token's are dropped (0 keeps all). Min-p keeps many tokens where the model is unsure (a sentence's opening)
    and few where it is sure (inside a phrase), so a campaign's emails vary without the tail's broken words."""

    temperature: float
    top_p: float
    seed: int
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling needs a temperature > 0 (0 means greedy: pass no RowSampling), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    def generator(self) -> Any:
        """A new CPU ``torch.Generator`` seeded with ``seed``: the row's draws, whatever shares its batch."""
        import torch

        return torch.Generator(device="cpu").manual_seed(self.seed)


def prompt_seed(text: str) -> int:
    """A stable 63-bit seed from a prompt's text (SHA-256), so the same request samples the same answer."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


class SeededSampler:
    """A ``transformers`` logits processor: rows with a ``RowSampling`` draw their token from their own generator.

    Args:
        rows: one entry per batch row, ``None`` for a greedy row.
        generators: each row's ``torch.Generator`` (None for a greedy row), for a decoding loop whose rows come and
            go: it keeps each request's generator (``RowSampling.generator()``) and makes a sampler per step. Default:
            a new generator per sampling row, seeded with its ``seed``.

    Called as ``processor(input_ids, scores)`` with ``scores`` of shape ``(batch, vocab)`` (float logits);
    returns the scores with, in each sampling row, every token but the drawn one at ``-inf``. Temperature,
    softmax, top-p and min-p run on all sampling rows at once (each row's own reductions, so its probabilities are those
    it would get alone); only the draw loops over rows, one ``torch.multinomial`` with the row's generator each.
    """

    def __init__(self, rows: Sequence[RowSampling | None], generators: Sequence[Any] | None = None) -> None:
        import torch

        self.rows = list(rows)
        if generators is not None and len(generators) != len(self.rows):
            raise ValueError(f"SeededSampler got {len(generators)} generators for {len(self.rows)} rows")
        self._generators: list[Any] = (
            [None if r is None else r.generator() for r in self.rows] if generators is None else list(generators))
        self._sampled = [i for i, r in enumerate(self.rows) if r is not None]
        sampled = [r for r in self.rows if r is not None]
        self._temperatures = torch.tensor([[r.temperature] for r in sampled], dtype=torch.float32)
        self._top_p = torch.tensor([[r.top_p] for r in sampled], dtype=torch.float32)
        self._nucleus = any(r.top_p < 1 for r in sampled)
        self._min_p = torch.tensor([[r.min_p] for r in sampled], dtype=torch.float32)
        self._truncated = any(r.min_p > 0 for r in sampled)
        self._all_sampled = len(sampled) == len(self.rows)
        self._devices: dict[Any, tuple[Any, Any, Any, Any]] = {}

    def _on(self, device: Any) -> tuple[Any, Any, Any, Any]:
        """The sampled rows' indices, temperatures, top-p and min-p on ``device`` (moved once per device)."""
        import torch

        if device not in self._devices:
            self._devices[device] = (torch.tensor(self._sampled, device=device), self._temperatures.to(device),
                                     self._top_p.to(device), self._min_p.to(device))
        return self._devices[device]

    def probabilities(self, scores: Any) -> tuple[Any, list[bool]]:
        """The sampling rows' processed distributions: temperature, softmax, top-p, min-p (what ``__call__`` draws
        from), on the CPU.

        Args:
            scores: (batch, vocab) float logits, after any grammar mask.

        Returns:
            ``(probs, usable)``: float32 CPU probabilities (sampling rows, vocab), in the order of the sampling rows
            (``rows`` without the None entries), not renormalised after top-p / min-p (``draw`` needs no sum of 1);
            and per sampling row whether it has a finite, positive mass (False: every token masked).

        Raises:
            ValueError: ``scores`` has another number of rows than ``rows``.
        """
        import torch

        if len(self.rows) != scores.shape[0]:
            raise ValueError(f"SeededSampler has {len(self.rows)} rows, the batch has {scores.shape[0]}")
        index, temperatures, top_p, min_p = self._on(scores.device)
        # Every sampled row at once (each row's softmax, sort and cumulative sum are its own): (rows, vocab).
        picked = scores if self._all_sampled else scores[index]  # (a gather copies: skipped when every row samples)
        probs = torch.softmax(picked.float() / temperatures, dim=-1)
        if self._nucleus:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays); top_p 1 keeps all
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p) & (top_p < 1)
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        if self._truncated:  # min-p: below min_p x the row's top probability goes (the top token always stays)
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        usable = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
        return probs.cpu(), usable

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if len(self.rows) != scores.shape[0]:
            raise ValueError(f"SeededSampler has {len(self.rows)} rows, the batch has {scores.shape[0]}")
        if not self._sampled:
            return scores
        cpu, usable = self.probabilities(scores)
        rows: list[int] = []
        tokens: list[Any] = []
        for j, row in enumerate(self._sampled):
            if not usable[j]:
                continue  # every token masked (a finished row): leave it to the stop logic
            rows.append(row)
            # the row's own generator: its draws do not depend on the other rows of the batch
            tokens.append(torch.multinomial(cpu[j], 1, generator=self._generators[row]))
        if not rows:
            return scores
        at = torch.tensor(rows, device=scores.device)
        drawn = torch.cat(tokens).to(scores.device)
        keep = scores[at, drawn].clone()
        scores.index_fill_(0, at, float("-inf"))  # (index_fill_: a fraction of the cost of scores[at] = -inf)
        scores[at, drawn] = keep
        return scores


def draw(probs: Any, generator: Any) -> int:
    """One token drawn from ``probs`` (vocab,) float32 CPU weights (any positive sum) with ``generator``.

    The exponential-race form of ``torch.multinomial(probs, 1, generator=generator)``: ``argmax(probs / e)`` with
    ``e`` vocab-many Exp(1) draws, which is what torch's one-sample ``multinomial`` computes (aten
    ``Distributions.cpp``: "s = argmax(p / q) where q ~ Exp(1)"), so the same generator gives the same token and
    advances the same way. A speculative step (``miniatures.local._Batch.step``) draws each position's token with
    it, one draw per token it keeps, so a row's answer does not depend on its drafts.
    """
    import torch

    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return int(torch.argmax(probs / race))
