"""Draft tokens for the local engine's speculative decoding, looked up by n-grams at no model cost.

Two sources, both n-gram lookups (no draft model):

- prompt lookup decoding (Saxena 2023, https://github.com/apoorvumang/prompt-lookup-decoding; vLLM's ``ngram``
  speculative method): the row's last ``n`` tokens are looked up in the row's own prompt and output, and the
  tokens that followed their latest earlier occurrence are proposed. A researcher's answer copies a span of the
  sentence in its prompt and a writer's email copies the prospect's facts, so those come out of the prompt;
- retrieval drafts (REST, He et al. 2023, "REST: Retrieval-Based Speculative Decoding", arXiv 2311.08252): the
  same lookup in a bounded store of the adapter's own recent completions (``CompletionStore``). A miniature
  learned its teacher's templates, so its earlier answers predict the wording of the next ones.

``DraftSource.propose`` tries the longest n-gram first (``n_max`` down to ``n_min``), the row's own tokens before
the store at each length. Drafts only decide how many tokens one forward pass may settle; the engine verifies each
one against the model (``miniatures.local._Batch.step``), so they never change an answer.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

__all__ = ["CompletionStore", "DraftSource", "NgramIndex"]

#: Separates completions in a ``CompletionStore``'s sequence (no token id is negative, so no n-gram spans it).
_SEPARATOR = -1


class NgramIndex:
    """The tokens of one growing sequence, with every ``n``-gram (``n_min <= n <= n_max``) indexed by where the token
    after its latest occurrence sits.

    ``append`` costs ``n_max - n_min + 1`` dict writes; ``follower`` is one dict read. An n-gram ending at the last
    token is indexed only once the next token arrives, so a lookup of the sequence's own suffix finds an earlier
    occurrence, never itself.

    Args:
        n_max, n_min: longest and shortest n-grams indexed (``1 <= n_min <= n_max``).
        tokens: the sequence's first tokens.

    Raises:
        ValueError: bad n-gram lengths.
    """

    def __init__(self, n_max: int, n_min: int = 1, tokens: Iterable[int] = ()) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram lengths must satisfy 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.n_max = n_max
        self.n_min = n_min
        self.tokens: list[int] = []
        self._followers: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        """Add ``token`` at the end (the n-grams that end just before it now point at it)."""
        tokens = self.tokens
        at = len(tokens)
        followers = self._followers
        for n in range(self.n_min, min(self.n_max, at) + 1):
            followers[tuple(tokens[at - n:at])] = at
        tokens.append(token)

    def extend(self, tokens: Iterable[int]) -> None:
        """``append`` each of ``tokens``."""
        for token in tokens:
            self.append(token)

    def follower(self, gram: Sequence[int]) -> int | None:
        """Where the token after the latest indexed occurrence of ``gram`` sits, or None."""
        return self._followers.get(tuple(gram))

    def continuation(self, gram: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest indexed occurrence of ``gram`` (none: ``[]``); cut before a
        ``_SEPARATOR``."""
        at = self._followers.get(tuple(gram))
        if at is None:
            return []
        out = self.tokens[at:at + k]
        if _SEPARATOR in out:
            out = out[: out.index(_SEPARATOR)]
        return out


class CompletionStore:
    """A bounded store of each adapter's recent completions, for retrieval drafts (REST).

    Each adapter's completions are kept in one sequence (``NgramIndex``), each one preceded by the last ``n_max``
    tokens of its prompt (so the first tokens of an answer can be drafted from the end of the prompt, typically the
    chat template's assistant header) and followed by a separator. Past ``max_tokens`` tokens for an adapter the
    older half of its completions is dropped and the index rebuilt.

    Args:
        n_max, n_min: n-gram lengths (``NgramIndex``).
        max_tokens: most tokens kept per adapter (at least 1).

    Raises:
        ValueError: bad lengths or ``max_tokens``.
    """

    def __init__(self, n_max: int, n_min: int = 1, max_tokens: int = 65536) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        NgramIndex(n_max, n_min)  # checks the lengths
        self.n_max = n_max
        self.n_min = n_min
        self.max_tokens = max_tokens
        self._indexes: dict[str, NgramIndex] = {}
        self._completions: dict[str, collections.deque[list[int]]] = {}

    def add(self, adapter: str, prompt: Sequence[int], completion: Sequence[int]) -> None:
        """Keep ``completion`` (token ids, its stop token included) of a request of ``adapter`` whose prompt was
        ``prompt``."""
        if not completion:
            return
        piece = [*prompt[-self.n_max:], *completion, _SEPARATOR]
        kept = self._completions.setdefault(adapter, collections.deque())
        kept.append(piece)
        index = self._indexes.get(adapter)
        if index is None:
            index = self._indexes[adapter] = NgramIndex(self.n_max, self.n_min)
        if len(index) + len(piece) <= self.max_tokens:
            index.extend(piece)
            return
        while len(kept) > 1 and sum(len(p) for p in kept) > self.max_tokens // 2:
            kept.popleft()
        index = self._indexes[adapter] = NgramIndex(self.n_max, self.n_min)
        for p in kept:
            index.extend(p[: self.max_tokens])

    def continuation(self, adapter: str, gram: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest stored occurrence of ``gram`` in ``adapter``'s completions."""
        index = self._indexes.get(adapter)
        return index.continuation(gram, k) if index is not None else []

    def tokens(self, adapter: str) -> int:
        """Tokens held for ``adapter`` (separators and prompt tails included)."""
        index = self._indexes.get(adapter)
        return len(index) if index is not None else 0

    def clear(self) -> None:
        """Drop every completion (the adapters' weights changed)."""
        self._indexes.clear()
        self._completions.clear()


class DraftSource:
    """The drafts of one row: prompt lookup in its own tokens, then retrieval from its adapter's completions.

    Args:
        prompt: the row's prompt token ids.
        store: the engine's ``CompletionStore`` (None: prompt lookup alone).
        adapter: the row's adapter (its completions in ``store``).
        n_max, n_min: n-gram lengths, longest tried first.
    """

    def __init__(self, prompt: Sequence[int], store: CompletionStore | None, adapter: str, n_max: int,
                 n_min: int) -> None:
        self.index = NgramIndex(n_max, n_min, prompt)
        self.prompt_length = len(prompt)
        self.store = store
        self.adapter = adapter

    def propose(self, generated: Sequence[int], k: int, stops: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """Up to ``k`` draft tokens to follow the row's ``generated`` tokens (all of them so far; ``[]``: none).

        Drafts end at the first stop token (kept: a row may end inside a forward pass).
        """
        index = self.index
        have = len(index) - self.prompt_length
        if have < len(generated):
            index.extend(generated[have:])
        if k < 1:
            return []
        tokens = index.tokens
        out: list[int] = []
        for n in range(min(index.n_max, len(tokens)), index.n_min - 1, -1):
            gram = tokens[-n:]
            out = index.continuation(gram, k)
            if not out and self.store is not None:
                out = self.store.continuation(self.adapter, gram, k)
            if out:
                break
        for i, token in enumerate(out):
            if token in stops:
                return out[: i + 1]
        return out
