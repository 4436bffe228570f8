"""Cost and speed of a configuration: tokens per email, cost per 1,000 emails, latency, throughput.

Cost model (US dollars):

* **per token** (remote models): every trace carries ``cost_usd``, priced when it was recorded from the
  price table (``miniatures.pricing``, settings ``[prices]``); the configuration's token cost is their sum.
* **per instance hour** (local models: the ``heuristic``, ``miniature:`` run in-process, or a self-hosted
  ``vllm:``/``ollama:`` server): ``instance price per hour x measured wall time`` of the configuration's
  campaign, once for each distinct backend spec of the configuration that has an instance price (two
  agents on the same spec share one instance). Instance prices are a setting (``instance_prices``,
  USD per hour, looked up by whole spec, then model name, then kind, like the token price table);
  the default is 0.0 for ``heuristic`` and ``miniature`` (it runs on the machine you already have) and
  no entry for other kinds. Set e.g. ``miniature = 0.35`` for a rented CPU instance or
  ``"vllm" = 2.50`` for a GPU instance.
* A backend with neither a token price nor an instance price counts as free, and the report names it
  (``CostFigures.unpriced``) so a missing price is never mistaken for a cheap model.

``cost per 1,000 emails = (token cost + instance cost) / emails written x 1,000``.

Speed: latency per email is the wall time of one run (research + writing + validation, from the
``runs`` table's start and end), p50 and p95 by linear interpolation (``statistics.quantiles``,
``method="inclusive"``); model-call latency p50/p95 comes from the traces; throughput is emails written
per second of the configuration's measured wall time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from miniatures.pricing import DEFAULT_PRICES, Price, lookup_by_spec, price_for
from miniatures.redaction import redact
from miniatures.specs import parse_backend_spec

__all__ = [
    "DEFAULT_INSTANCE_PRICES",
    "CostFigures",
    "cost_figures",
    "instance_price_for",
    "percentile",
]

#: US dollars per instance hour by backend spec, model name or kind (a setting; see the module docstring).
DEFAULT_INSTANCE_PRICES: dict[str, float] = {"heuristic": 0.0, "miniature": 0.0}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation between order statistics.

    Args:
        values: samples (any order); an empty sequence gives 0.0, one value gives that value.
        q: percentile in [0, 100].

    Raises:
        ValueError: ``q`` outside [0, 100].
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} must be in [0, 100]")
    data = sorted(values)
    if not data:
        return 0.0
    if len(data) == 1:
        return float(data[0])
    position = (len(data) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return float(data[low] + (data[high] - data[low]) * (position - low))


def instance_price_for(backend: str, table: Mapping[str, float] = DEFAULT_INSTANCE_PRICES) -> float | None:
    """USD per instance hour of ``backend``: whole spec, then model name, then kind; None when absent.

    Raises:
        miniatures.specs.BackendSpecError: ``backend`` is not a valid spec.
    """
    return lookup_by_spec(backend, table)


@dataclass(frozen=True)
class CostFigures:
    """Cost and speed of one configuration (units in the names: tokens, USD, ms, s).

    Attributes:
        emails: emails written.
        model_calls: traces recorded.
        input_tokens, output_tokens: summed over the traces.
        tokens_in_per_email, tokens_out_per_email: those sums per email written (0.0 without emails).
        token_cost_usd: summed trace costs (per-token prices).
        instance_cost_usd: instance price per hour x wall time, per priced local backend.
        cost_usd: token plus instance cost.
        cost_per_1k_emails_usd: ``cost_usd / emails x 1000``; None without emails.
        wall_s: measured wall time of the configuration's campaign, seconds.
        latency_p50_ms, latency_p95_ms: per email (one run), milliseconds.
        call_latency_p50_ms, call_latency_p95_ms: per model call, milliseconds.
        throughput_emails_per_s: emails written per second of wall time.
        unpriced: notes naming backends with neither price (counted as free).
    """

    emails: int
    model_calls: int
    input_tokens: int
    output_tokens: int
    tokens_in_per_email: float
    tokens_out_per_email: float
    token_cost_usd: float
    instance_cost_usd: float
    cost_usd: float
    cost_per_1k_emails_usd: float | None
    wall_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    call_latency_p50_ms: float
    call_latency_p95_ms: float
    throughput_emails_per_s: float
    unpriced: list[str] = field(default_factory=list)


def cost_figures(
    *,
    backends: Sequence[str],
    emails: int,
    call_tokens: Sequence[tuple[int, int]],
    call_costs_usd: Sequence[float],
    call_latencies_ms: Sequence[float],
    run_latencies_ms: Sequence[float],
    wall_s: float,
    prices: Mapping[str, Price] = DEFAULT_PRICES,
    instance_prices: Mapping[str, float] = DEFAULT_INSTANCE_PRICES,
) -> CostFigures:
    """Compute a configuration's cost and speed figures (cost model: module docstring).

    Args:
        backends: the configuration's backend specs (researcher, writer; repeats share an instance).
        emails: emails written, >= 0.
        call_tokens: ``(input_tokens, output_tokens)`` per model call.
        call_costs_usd: recorded cost per model call (per-token prices), US dollars.
        call_latencies_ms: latency per model call, milliseconds.
        run_latencies_ms: wall time per run (one prospect), milliseconds.
        wall_s: measured wall time of the whole campaign, seconds, >= 0.
        prices: per-token price table (to tell priced from unpriced backends).
        instance_prices: USD per instance hour by spec, model or kind.

    Returns:
        ``CostFigures``.

    Raises:
        ValueError: ``emails`` or ``wall_s`` is negative.
    """
    if emails < 0 or wall_s < 0:
        raise ValueError(f"emails={emails} and wall_s={wall_s} must be >= 0")
    instance_cost = 0.0
    unpriced: list[str] = []
    for spec in dict.fromkeys(backends):
        hourly = instance_price_for(spec, instance_prices)
        token_price = price_for(spec, prices)
        if hourly is not None:
            instance_cost += hourly * wall_s / 3600
        elif token_price == Price() and parse_backend_spec(spec).kind != "heuristic":
            unpriced.append(f"{redact(spec)}: no token price and no instance price; counted as free "
                            "(add it to [prices] or to the instance prices)")
    token_cost = float(sum(call_costs_usd))
    tokens_in = sum(t[0] for t in call_tokens)
    tokens_out = sum(t[1] for t in call_tokens)
    total = token_cost + instance_cost
    return CostFigures(
        emails=emails,
        model_calls=len(call_tokens),
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        tokens_in_per_email=tokens_in / emails if emails else 0.0,
        tokens_out_per_email=tokens_out / emails if emails else 0.0,
        token_cost_usd=token_cost,
        instance_cost_usd=instance_cost,
        cost_usd=total,
        cost_per_1k_emails_usd=total / emails * 1000 if emails else None,
        wall_s=wall_s,
        latency_p50_ms=percentile(run_latencies_ms, 50),
        latency_p95_ms=percentile(run_latencies_ms, 95),
        call_latency_p50_ms=percentile(call_latencies_ms, 50),
        call_latency_p95_ms=percentile(call_latencies_ms, 95),
        throughput_emails_per_s=emails / wall_s if wall_s > 0 else 0.0,
        unpriced=unpriced,
    )

