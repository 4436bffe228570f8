"""Per-token prices of backends, from the settings' price table, in US dollars per million tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from miniatures.specs import parse_backend_spec

__all__ = ["DEFAULT_PRICES", "Price", "call_cost_usd", "lookup_by_spec", "price_for"]

T = TypeVar("T")


@dataclass(frozen=True)
class Price:
    """US dollars per one million input (prompt) and output (completion) tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


#: Defaults, overridable in ``outreach.toml`` ``[prices]``. OpenAI list prices as published for
#: the GPT-4.1 family (openai.com/api/pricing, 2025); local backends cost nothing per token (their
#: cost is instance time, which the evaluation report accounts for separately).
DEFAULT_PRICES: dict[str, Price] = {
    "heuristic": Price(0.0, 0.0),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "miniature": Price(0.0, 0.0),
    "ollama": Price(0.0, 0.0),
    "vllm": Price(0.0, 0.0),
}


def lookup_by_spec(backend: str, table: Mapping[str, T]) -> T | None:
    """The entry of ``table`` for ``backend``: the whole spec first, then its model name, then its kind.

    Raises:
        miniatures.specs.BackendSpecError: ``backend`` is not a valid spec.
    """
    if backend in table:
        return table[backend]
    spec = parse_backend_spec(backend)
    for key in (spec.model, spec.kind):
        if key and key in table:
            return table[key]
    return None


def price_for(backend: str, table: Mapping[str, Price] = DEFAULT_PRICES) -> Price:
    """Look up the price of ``backend`` (a backend spec string): the whole spec first, then its
    model name, then its kind; unknown backends cost 0 (and the evaluation report says so).

    Raises:
        miniatures.specs.BackendSpecError: ``backend`` is not a valid spec.
    """
    found = lookup_by_spec(backend, table)
    return Price() if found is None else found


def call_cost_usd(backend: str, input_tokens: int, output_tokens: int,
                  table: Mapping[str, Price] = DEFAULT_PRICES) -> float:
    """Cost in US dollars of one call with the given token counts."""
    price = price_for(backend, table)
    return (input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok) / 1_000_000
