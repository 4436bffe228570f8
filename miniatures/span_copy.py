"""Span-copy decoding: a cited fact's value can only be a verbatim span of the sentence it cites.

The researcher's extraction prompt numbers page sentences as ``S<i>: <text>`` lines and its answer
cites one per fact, evidence first: ``{"field": "product", "evidence": "S12", "value": "..."}``
(``agents.prompts``). While a model writes the value string of such a fact, ``SpanCopyProcessor``
masks (logit -inf) every token that would make the value stop being a substring of sentence S12,
and the closing quote until the value is non-empty. The model still chooses the sentence, where the
span starts and where it ends; it no longer has to spell a name or number it has never seen, which
small models do badly (issue 3: a 10M model got held-out company names right 0% of the time). This
is grammar-constrained decoding (as in llama.cpp's GBNF grammars or the ``outlines`` library) with a
grammar made per answer from the prompt; grounding (``agents.grounding.ground_facts``) still checks
every fact afterwards.

Token texts are decoded one id at a time (``tokenizer.decode([id])``): exact for byte-level BPE
tokenizers (GPT-2 style: the bootstrapped bases, Qwen, Llama 3); for SentencePiece tokenizers, whose
single-token decode drops the leading space, the mask is approximate. A token that decodes to a
partial UTF-8 character (``\\ufffd``) is allowed where the sentence has non-ASCII text, so accented
names stay reachable. Values with JSON escapes (``\\"``, ``\\u00e9``) are left unconstrained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["SpanCopyProcessor", "cited_sentences", "decode_vocabulary"]

_SENTENCE_LINE = re.compile(r"^(S\d+): ?(.*)$", re.MULTILINE)
# The answer so far ends inside the value string of a fact whose evidence id came first.
_OPEN_VALUE = re.compile(r'"evidence"\s*:\s*"\s*\[?\s*(S\d+)\s*\]?\s*"\s*,\s*"value"\s*:\s*"([^"\\]*)\Z',
                         re.IGNORECASE)
_REPLACEMENT = "\ufffd"


def cited_sentences(prompt: str) -> dict[str, str]:
    """The numbered sentences of a rendered prompt: ``{"S12": text}`` from its ``S<i>: <text>`` lines.

    Ids are upper-cased; a repeated id keeps its first text. Returns ``{}`` for a prompt without such
    lines (a writer prompt, say), which ``SpanCopyProcessor`` then leaves unconstrained.
    """
    found: dict[str, str] = {}
    for match in _SENTENCE_LINE.finditer(prompt):
        found.setdefault(match.group(1).upper(), match.group(2).strip())
    return found


def decode_vocabulary(tokenizer: Any) -> list[str]:
    """``tokenizer.decode([i])`` for every id of ``tokenizer`` (special tokens decode to their text)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


class SpanCopyProcessor:
    """A ``transformers`` logits processor for one batched ``generate`` call (see the module docstring).

    Args:
        tokenizer: the model's tokenizer (``decode`` and ``len`` are used).
        prompts: the rendered prompt text of each batch row, in batch order.
        prompt_width: the padded prompt length in tokens (generated tokens start there).
        token_texts: ``tokenizer.decode([i])`` for every token id ``i`` (computed once per tokenizer by
            ``decode_vocabulary``; passed in so batches share it).

    ``__call__(input_ids, scores)`` takes ``input_ids`` (batch, prompt_width + generated) and ``scores``
    (batch, vocab) and returns ``scores`` with the disallowed tokens of constrained rows set to -inf.
    Rows whose prompt has no numbered sentences, or whose answer is not inside a cited value, pass
    through unchanged.
    """

    def __init__(self, tokenizer: Any, prompts: Sequence[str], prompt_width: int, token_texts: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.sentences = [cited_sentences(p) for p in prompts]
        self.prompt_width = prompt_width
        self.token_texts = token_texts
        self._candidates: dict[str, list[tuple[int, str, bool]]] = {}
        self.constrained_steps = 0

    def _candidates_for(self, sentence: str) -> list[tuple[int, str, bool]]:
        """Token ids whose text before any quote occurs in ``sentence``: (id, that text, has a quote)."""
        cached = self._candidates.get(sentence)
        if cached is not None:
            return cached
        partial_ok = any(ord(ch) > 127 for ch in sentence)
        out: list[tuple[int, str, bool]] = []
        for i, text in enumerate(self.token_texts):
            if not text:
                continue
            head, quote, _tail = text.partition('"')
            if _REPLACEMENT in head:
                if partial_ok and not quote:
                    out.append((i, head, False))
                continue
            if head in sentence:
                out.append((i, head, bool(quote)))
        self._candidates[sentence] = out
        return out

    def allowed(self, sentence: str, value: str) -> list[int]:
        """Token ids that keep ``value`` a substring of ``sentence`` (or close a value that is not blank)."""
        value = value.rstrip(_REPLACEMENT)
        ok: list[int] = []
        for i, head, quote in self._candidates_for(sentence):
            grown = value + head.replace(_REPLACEMENT, "")
            if (grown in sentence or _REPLACEMENT in head) and (not quote or grown.strip()):
                ok.append(i)
        return ok

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for row, sentences in enumerate(self.sentences):
            if not sentences:
                continue
            text = self.tokenizer.decode(input_ids[row, self.prompt_width:].tolist(), skip_special_tokens=True)
            match = _OPEN_VALUE.search(text)
            if match is None:
                continue
            sentence = sentences.get(match.group(1).upper())
            if sentence is None:
                continue  # an id the prompt does not have: grounding drops the fact
            allowed = self.allowed(sentence, match.group(2))
            if not allowed:
                continue
            keep = torch.tensor(allowed, device=scores.device)
            masked = torch.full_like(scores[row], float("-inf"))
            masked[keep] = scores[row, keep]
            scores[row] = masked
            self.constrained_steps += 1
        return scores
