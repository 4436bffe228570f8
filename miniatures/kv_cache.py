"""Key/value caches of the local engine: in-place slot layers for its decoding loop, and a prefix cache.

The slot layers (transformers' ``DynamicLayer`` API) hold a decoding batch whose rows come and go
(``miniatures.local.LocalEngine``); ``PrefixCache`` keeps prompts' keys and values so a new prompt is prefilled
only past its longest prefix already computed; ``use_packed_attention`` lets several query tokens per row
(speculative steps) attend over a grouped-query cache without copying it.
Heavy imports (torch, transformers) happen inside functions.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PACKED_SDPA", "PrefixCache", "use_packed_attention"]

logger = logging.getLogger(__name__)


_CACHE_KEYWORDS: dict[Any, str] = {}


def _cache_keyword(model_class: Any) -> str:
    """The keyword ``generate`` takes a cache under: ``cache`` (newer transformers 5) or ``past_key_values``.

    Read from the model class's own ``forward`` signature (``generate`` takes either under ``**kwargs``), once.
    """

    if model_class not in _CACHE_KEYWORDS:
        names = inspect.signature(model_class.forward).parameters
        _CACHE_KEYWORDS[model_class] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_KEYWORDS[model_class]


@functools.cache
def _slot_layer_class() -> type:
    """``SlotLayer``: a transformers cache layer whose rows can join and leave a running batch (made on first use)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):  # type: ignore[misc]
        """One attention layer's keys and values for the rows of a running batch, in buffers with room to spare.

        ``key_buffer`` and ``value_buffer`` are ``(row room, kv heads, slot room, head dim)``, zero where nothing
        was written (a masked slot must hold finite values: attention multiplies its weight 0 by them). The batch's
        ``rows`` rows and ``length`` slots are in use; attention gets a view of them. New keys and values are
        written in place (past the room the slots double), so a step costs what attention itself reads.
        The engine's decoding batch (``miniatures.local``) moves rows in and out, and ``resize`` shifts every row
        right when a longer prompt joins. A speculative step writes each row's last token and drafts, and the slots
        of the drafts the model rejects stay behind, masked (holes), until ``compact`` packs each row's kept slots.
        A sliding-window layer is held whole: the model's sliding-window mask leaves out what is too far back.
        """

        def __init__(self, reserve: int) -> None:
            super().__init__()
            self.reserve = reserve
            self.rows = 0
            self.length = 0
            self.key_buffer: Any = None
            self.value_buffer: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n = key_states.shape[-2]
            if self.key_buffer is None:
                self.preload(key_states[:, :, :0], value_states[:, :, :0], n + self.reserve)
            elif self.length + n > self.key_buffer.shape[2]:
                self.resize(self.key_buffer.shape[0], max(self.length + n, 2 * self.key_buffer.shape[2]))
            end = self.length + n
            self.key_buffer[: self.rows, :, self.length:end] = key_states
            self.value_buffer[: self.rows, :, self.length:end] = value_states
            self.length = end
            self.refresh()
            return self.keys, self.values

        def preload(self, keys: Any, values: Any, room: int) -> None:
            """Start the layer with ``keys``/``values`` (rows, kv heads, slots, head dim), room for ``room`` slots."""
            self.is_initialized = True
            self.device = keys.device
            self.rows, self.length = keys.shape[0], keys.shape[2]
            room = max(room, self.length)
            self.key_buffer = keys.new_zeros((self.rows, keys.shape[1], room, keys.shape[3]))
            self.value_buffer = values.new_zeros((self.rows, values.shape[1], room, values.shape[3]))
            self.key_buffer[:, :, : self.length] = keys
            self.value_buffer[:, :, : self.length] = values
            self.refresh()

        def resize(self, rows: int, slots: int, shift: int = 0) -> None:
            """New buffers with room for ``rows`` rows and ``slots`` slots; the rows move ``shift`` slots right."""
            keys, values = self.key_buffer, self.value_buffer
            self.key_buffer = keys.new_zeros((rows, keys.shape[1], slots, keys.shape[3]))
            self.value_buffer = values.new_zeros((rows, values.shape[1], slots, values.shape[3]))
            end = shift + self.length
            self.key_buffer[: self.rows, :, shift:end] = keys[: self.rows, :, : self.length]
            self.value_buffer[: self.rows, :, shift:end] = values[: self.rows, :, : self.length]
            self.length = end
            self.refresh()

        def compact(self, index: Any, length: int) -> None:
            """Keep, in row ``i``, the slots ``index[i]`` ((rows, length) int64, in order) as slots 0 to ``length``."""
            rows = self.rows
            shape = (rows, self.key_buffer.shape[1], length, self.key_buffer.shape[3])
            at = index[:, None, :, None].expand(shape)
            keys = self.key_buffer[:rows].gather(2, at)
            values = self.value_buffer[:rows].gather(2, at)
            self.key_buffer[:rows, :, :length] = keys
            self.value_buffer[:rows, :, :length] = values
            self.length = length
            self.refresh()

        def refresh(self) -> None:
            self.keys = self.key_buffer[: self.rows, :, : self.length]
            self.values = self.value_buffer[: self.rows, :, : self.length]

        def get_seq_length(self) -> int:
            return int(self.length)

        def reset(self) -> None:
            super().reset()
            self.rows = self.length = 0
            self.key_buffer = self.value_buffer = None

    return SlotLayer


def _slot_layers_fit(config: Any) -> bool:
    """Whether every layer of ``config``'s KV cache is plain or sliding-window attention (what ``SlotLayer`` holds)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = DynamicCache(config=config.get_text_config(decoder=True)).layers
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


def _has_sliding_layers(config: Any) -> bool:
    """Whether ``config``'s KV cache has a sliding-window layer (``DynamicSlidingWindowLayer``)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    layers = DynamicCache(config=config.get_text_config(decoder=True)).layers
    return any(isinstance(layer, DynamicSlidingWindowLayer) for layer in layers)


def _slot_cache(config: Any, reserve: int) -> Any:
    """A transformers ``DynamicCache`` of ``SlotLayer`` layers, one per decoder layer of ``config``, each with room
    for ``reserve`` slots past what its first update writes (``_slot_layer_class``)."""
    from transformers import DynamicCache

    text = config.get_text_config(decoder=True)
    cache: Any = DynamicCache(config=text)
    layer_class = _slot_layer_class()
    cache.layers = [layer_class(reserve) for _ in range(int(text.num_hidden_layers))]
    return cache


@dataclass
class _PrefixEntry:
    adapter: str
    ids: Any  # numpy int64 (tokens,)
    kv: list[tuple[Any, Any]]  # per layer: keys and values (1, kv heads, tokens, head dim)
    blocks: list[int]  # chained hashes of its whole leading blocks (``PrefixCache.BLOCK`` tokens each)


class PrefixCache:
    """Prompt KV caches kept for reuse: a new prompt is prefilled only past its longest prefix already computed.

    Like vLLM's automatic prefix caching, each prefilled prompt is indexed by chained hashes of its leading
    blocks of ``BLOCK`` tokens (a hash per block, each over the one before it and the block's tokens); unlike
    it, the keys and values are kept per prompt, whole (an LRU bounded by ``max_tokens`` tokens in all), not in
    shared blocks. A new prompt of the same adapter walks its own block hashes to the deepest one indexed and
    reuses that entry's longest common prefix with it, block boundary or not, checked token by token (so a hash
    collision can never reuse a wrong prefix): at least ``min_tokens``, and never the whole prompt, whose last
    token must be run for its logits. The prompts of one agent share their system prompt, instructions and offer,
    so most of a prompt is usually cached. Keys and values depend only on the tokens before them (causal
    attention, absolute positions), so a reused prefix holds what a full prefill would compute, up to
    floating-point rounding of the different matrix shapes.

    Args:
        max_tokens: most prompt tokens kept, all entries together (the least recently used entries go first).
        min_tokens: the shortest prefix worth reusing (at least ``BLOCK``).

    Attributes:
        hits, lookups: prompts that reused a prefix, prompts looked up (``fill``).
        tokens: prompt tokens held now.
    """

    #: Tokens per indexed block.
    BLOCK = 16

    def __init__(self, max_tokens: int, min_tokens: int = 16) -> None:
        if max_tokens < 1 or min_tokens < 1:
            raise ValueError(f"max_tokens and min_tokens must be at least 1, got {max_tokens} and {min_tokens}")
        self.max_tokens = max_tokens
        self.min_tokens = max(min_tokens, self.BLOCK)
        self.tokens = 0
        self.hits = 0
        self.lookups = 0
        self._entries: collections.OrderedDict[tuple[str, bytes], _PrefixEntry] = collections.OrderedDict()
        self._index: dict[tuple[str, int], dict[tuple[str, bytes], None]] = {}  # block hash -> entries (ordered)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def block_hashes(cls, ids: Sequence[int]) -> list[int]:
        """The chained hashes of the whole ``BLOCK``-token blocks at the start of ``ids``."""
        hashes: list[int] = []
        last = 0
        for start in range(0, len(ids) - cls.BLOCK + 1, cls.BLOCK):
            last = hash((last, *ids[start:start + cls.BLOCK]))
            hashes.append(last)
        return hashes

    def shared_blocks(self, adapter: str, ids: Sequence[int]) -> int:
        """How many leading blocks of ``ids`` some entry of ``adapter`` starts with (by hash)."""
        depth = 0
        for h in self.block_hashes(ids):
            if (adapter, h) not in self._index:
                break
            depth += 1
        return depth

    def longest(self, adapter: str, ids: Sequence[int]) -> tuple[_PrefixEntry | None, int]:
        """The entry of ``adapter`` sharing the longest prefix with ``ids`` and that prefix's length in tokens
        (at most ``len(ids) - 1``); ``(None, 0)`` below ``min_tokens``."""
        import numpy as np

        hashes = self.block_hashes(ids)
        found: dict[tuple[str, bytes], None] | None = None
        for h in hashes:
            entries = self._index.get((adapter, h))
            if entries is None:
                break
            found = entries
        if found is None:
            return None, 0
        entry = self._entries[next(reversed(found))]  # the most recently stored of the deepest
        wanted = np.asarray(ids, dtype=np.int64)
        n = min(len(entry.ids), len(wanted) - 1)
        differ = np.flatnonzero(entry.ids[:n] != wanted[:n])
        common = int(differ[0]) if differ.size else n
        if common < self.min_tokens:
            return None, 0
        return entry, common

    def fill(self, adapter: str, ids: Sequence[int], cache: Any) -> int:
        """Load the longest cached prefix of ``ids`` into the empty ``cache`` (``_slot_cache``); returns its length
        in tokens (0: nothing reused)."""
        self.lookups += 1
        entry, length = self.longest(adapter, ids)
        if entry is None:
            return 0
        self.hits += 1
        self.touch(entry)
        room = len(ids) + cache.layers[0].reserve
        for layer, (keys, values) in zip(cache.layers, entry.kv, strict=True):
            layer.preload(keys[:, :, :length], values[:, :, :length], room)
        return length

    def touch(self, entry: _PrefixEntry) -> None:
        """Mark ``entry`` as just used (the LRU keeps it longest)."""
        key = (entry.adapter, entry.ids.tobytes())
        if key in self._entries:
            self._entries.move_to_end(key)

    def store(self, adapter: str, ids: Sequence[int], layers: Sequence[Any], row: int = 0, start: int = 0) -> None:
        """Keep the keys and values of the prompt ``ids`` (a copy), unless kept already: row ``row`` of the prefilled
        cache ``layers`` (``SlotLayer``), from slot ``start``. Past ``max_tokens`` the least recently used entries
        go. A prompt shorter than ``min_tokens`` or longer than ``max_tokens`` is not kept."""
        import numpy as np

        wanted = np.asarray(ids, dtype=np.int64)
        key = (adapter, wanted.tobytes())
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        n = len(wanted)
        if n > self.max_tokens or n < self.min_tokens:
            return
        kv = [(layer.key_buffer[row:row + 1, :, start:start + n].clone(),
               layer.value_buffer[row:row + 1, :, start:start + n].clone()) for layer in layers]
        entry = _PrefixEntry(adapter=adapter, ids=wanted, kv=kv, blocks=self.block_hashes(ids))
        self._entries[key] = entry
        for h in entry.blocks:
            self._index.setdefault((adapter, h), {})[key] = None
        self.tokens += n
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, bytes]) -> None:
        entry = self._entries.pop(key)
        self.tokens -= len(entry.ids)
        for h in entry.blocks:
            entries = self._index.get((entry.adapter, h))
            if entries is not None:
                entries.pop(key, None)
                if not entries:
                    del self._index[(entry.adapter, h)]

    def clear(self) -> None:
        """Drop every entry (the adapters' weights changed, or to free memory)."""
        self._entries.clear()
        self._index.clear()
        self.tokens = 0


#: The name ``use_packed_attention`` registers its attention function under (transformers' ``AttentionInterface``).
PACKED_SDPA = "miniature_packed_sdpa"


def _packed_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                 scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' SDPA attention, with the query heads of a grouped-query layer packed onto their key/value head
    when several query tokens run under a mask (a speculative step, ``miniatures.local._Batch._speculate``).

    transformers packs grouped-query heads for one query token only (``pack_gqa``); for several tokens under a mask
    it copies every key and value ``num_key_value_groups`` times (``repeat_kv``) and attends over the copies
    (measured on the demo's 1.7M writer, 8 rows by 1,200 slots, 1 thread: 48 ms a forward pass at 9 tokens per row
    against 17 ms at 1). Here the query ``(batch, heads, q, dim)`` becomes ``(batch, kv heads, groups * q, dim)``
    (head ``k * groups + r``'s token ``j`` is row ``r * q + j`` of key/value head ``k``), the mask's rows are tiled
    ``groups`` times to match, and one SDPA call attends over the cache as it is: the same products and sums per
    query, without the copies (17.6 ms at 9 tokens). Other calls (one token, no mask, a per-head mask, a position
    bias) go to transformers' ``sdpa_attention_forward`` unchanged.

    Returns:
        ``(attention output (batch, q, heads, dim), None)``, as transformers' attention functions do.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    tokens = query.shape[2]
    if (groups == 1 or tokens == 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap")
            or key.shape[1] * groups != query.shape[1]):
        out: tuple[Any, None] = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                       scaling=scaling, is_causal=is_causal, **kwargs)
        return out
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups * tokens, dim)
    mask = attention_mask.repeat(1, 1, groups, 1)
    attended = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=0.0,
                                                                scale=scaling)
    return attended.reshape(batch, heads, tokens, dim).transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` from transformers' ``sdpa`` attention to ``_packed_sdpa`` (same masks); returns whether it
    did (False: another attention implementation, or a model that cannot switch)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED_SDPA, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(PACKED_SDPA)
    except (ValueError, AttributeError, TypeError) as exc:
        logger.info("keeping transformers' sdpa attention for %s (%s)", type(model).__name__, exc)
        return False
    return bool(model.config._attn_implementation == PACKED_SDPA)
