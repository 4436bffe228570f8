"""Cost and speed of a configuration: tokens per email, cost per 1,000 emails, latency, throughput.

Cost model (US dollars), so that "how much cheaper is the miniature" can be read even offline:

* **API models, per token**: every trace carries ``cost_usd``, priced when it was recorded from the price
  table (``miniatures.pricing``, settings ``[prices]``); the configuration's token cost is their sum.
* **The heuristic stand-in, per token as the teacher it stands in for**: the ``heuristic`` backend is a
  rule-based stand-in for an API teacher, so its calls' tokens are priced at the list price of a named model
  (``CostBasis.stand_in_model``, settings ``[costs] stand_in_model``; default ``gpt-4.1-mini``, 0.40 / 1.60
  USD per million input / output tokens, OpenAI's list price published 2025-04-14), and the report labels
  the figure so (``CostFigures.pricing``).
* **Local miniatures, per instance hour**: ``miniature:`` backends run in-process on one machine, priced at a
  named instance's price per hour (``CostBasis.instance`` and ``instance_usd_per_hour``, settings ``[costs]``;
  default an AWS EC2 c7i.large, 2 vCPU and 4 GiB like the machine the figures are measured on, Linux
  on-demand in us-east-1 at 0.08925 USD/h) times the configuration's measured wall time, once however many
  agents use miniatures.
* **Instance prices by spec** (``instance_prices``, USD per hour, looked up by whole spec, then model name,
  then kind, like the token price table; from an eval plan's ``[instance_prices]``) override that for a
  spec, and price self-hosted ``vllm:``/``ollama:`` servers (e.g. ``"vllm" = 0.80`` for a GPU instance);
  two agents on the same spec share one instance.
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
from miniatures.specs import BackendSpecError, parse_backend_spec

__all__ = [
    "DEFAULT_COST_BASIS",
    "DEFAULT_INSTANCE_PRICES",
    "CostBasis",
    "CostFigures",
    "cost_figures",
    "instance_price_for",
    "percentile",
]

#: US dollars per instance hour by backend spec, model name or kind: overrides of ``CostBasis`` (see the
#: module docstring); none by default.
DEFAULT_INSTANCE_PRICES: dict[str, float] = {}


@dataclass(frozen=True)
class CostBasis:
    """What configurations without a recorded token price are priced at (settings ``[costs]``).

    Attributes:
        stand_in_model: the API teacher the ``heuristic`` stands in for; its tokens are priced at this model's
            entry of the price table (US dollars per million tokens).
        stand_in_price_source: where and when that list price was published (shown in the report).
        instance: the machine local ``miniature:`` backends run on (shown in the report).
        instance_usd_per_hour: its price, US dollars per hour, >= 0.
        instance_price_source: where and when that price was listed (shown in the report).
    """

    stand_in_model: str = "gpt-4.1-mini"
    stand_in_price_source: str = "OpenAI API list price, openai.com/api/pricing, published 2025-04-14"
    instance: str = "AWS EC2 c7i.large (2 vCPU, 4 GiB), Linux on-demand, us-east-1"
    instance_usd_per_hour: float = 0.08925
    instance_price_source: str = "aws.amazon.com/ec2/pricing/on-demand, 2025 list price"


#: The default cost basis (settings ``[costs]`` override each field).
DEFAULT_COST_BASIS = CostBasis()


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
        token_cost_usd: per-token cost: recorded trace costs plus the heuristic's tokens priced as its stand-in.
        stand_in_cost_usd: the part of ``token_cost_usd`` that prices heuristic calls as ``stand_in_model``.
        stand_in_model: the model heuristic calls were priced as (None when the configuration has none).
        instance_cost_usd: instance price per hour x wall time, per priced local backend.
        cost_usd: token plus instance cost.
        cost_per_1k_emails_usd: ``cost_usd / emails x 1000``; None without emails.
        wall_s: measured wall time of the configuration's campaign, seconds.
        latency_p50_ms, latency_p95_ms: per email (one run), milliseconds.
        call_latency_p50_ms, call_latency_p95_ms: per model call, milliseconds.
        throughput_emails_per_s: emails written per second of wall time.
        unpriced: notes naming backends with neither price (counted as free).
        pricing: one line per priced part saying what it is priced at (model and list price, or instance and
            price per hour, with their sources), for the report.
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
    stand_in_cost_usd: float = 0.0
    stand_in_model: str | None = None
    pricing: list[str] = field(default_factory=list)


def _stand_in_price(model: str, prices: Mapping[str, Price]) -> Price:
    """The price table's entry of a model name (``gpt-4.1-mini``) or spec (``openai:gpt-4.1-mini``); 0 if absent."""
    if model in prices:
        return prices[model]
    try:
        return price_for(model if ":" in model else f"openai:{model}", prices)
    except BackendSpecError:
        return Price()


def _kind(spec: str) -> str:
    try:
        return parse_backend_spec(spec).kind
    except BackendSpecError:
        return ""


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
    call_backends: Sequence[str] | None = None,
    basis: CostBasis = DEFAULT_COST_BASIS,
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
        prices: per-token price table (to tell priced from unpriced backends, and to price the stand-in).
        instance_prices: USD per instance hour by spec, model or kind (overrides ``basis`` for a spec).
        call_backends: the backend spec (as recorded, redacted) of each model call, same order as
            ``call_tokens``; None: every call's is taken as the configuration's when it has one spec, else
            heuristic calls cannot be told apart and are priced only when both agents are heuristic.
        basis: the stand-in model and the local instance (settings ``[costs]``).

    Returns:
        ``CostFigures``.

    Raises:
        ValueError: ``emails`` or ``wall_s`` is negative, or ``call_backends`` has another length than
            ``call_tokens``.
    """
    if emails < 0 or wall_s < 0:
        raise ValueError(f"emails={emails} and wall_s={wall_s} must be >= 0")
    specs = list(dict.fromkeys(backends))
    if call_backends is None:
        call_backends = [specs[0]] * len(call_tokens) if len(specs) == 1 else [""] * len(call_tokens)
    if len(call_backends) != len(call_tokens):
        raise ValueError(f"call_backends has {len(call_backends)} entries for {len(call_tokens)} calls")
    instance_cost = 0.0
    unpriced: list[str] = []
    pricing: list[str] = []
    local_miniatures: list[str] = []
    for spec in specs:
        hourly = instance_price_for(spec, instance_prices)
        kind = parse_backend_spec(spec).kind
        if hourly is not None:
            instance_cost += hourly * wall_s / 3600
            pricing.append(f"{redact(spec)}: instance price {hourly:g} USD/h (instance_prices) x {wall_s:.1f} s = "
                           f"{hourly * wall_s / 3600:.4f} USD")
        elif kind == "miniature":
            local_miniatures.append(redact(spec))
        elif kind != "heuristic" and price_for(spec, prices) == Price():
            unpriced.append(f"{redact(spec)}: no token price and no instance price; counted as free "
                            "(add it to [prices] or to the instance prices)")
    if local_miniatures:
        part = basis.instance_usd_per_hour * wall_s / 3600
        instance_cost += part
        pricing.append(f"{', '.join(local_miniatures)}: local, one {basis.instance} at {basis.instance_usd_per_hour:g} "
                       f"USD/h ({basis.instance_price_source}) x {wall_s:.1f} s = {part:.4f} USD")
    stand_in_cost = 0.0
    heuristic_tokens = [(t, c) for t, c, b in zip(call_tokens, call_costs_usd, call_backends, strict=True)
                        if _kind(b) == "heuristic" and not c]
    stand_in = None
    if heuristic_tokens:
        stand_in = basis.stand_in_model
        price = _stand_in_price(stand_in, prices)
        stand_in_cost = sum(t[0] * price.input_per_mtok + t[1] * price.output_per_mtok
                            for t, _ in heuristic_tokens) / 1_000_000
        if price == Price():
            unpriced.append(f"heuristic: its stand-in model {stand_in!r} has no price in [prices]; counted as free")
        tin, tout = sum(t[0] for t, _ in heuristic_tokens), sum(t[1] for t, _ in heuristic_tokens)
        pricing.append(f"heuristic: a rule-based stand-in for an API teacher, priced as {stand_in} at "
                       f"{price.input_per_mtok:g} / {price.output_per_mtok:g} USD per million tokens in / out "
                       f"({basis.stand_in_price_source}): {tin:,} / {tout:,} tokens = {stand_in_cost:.4f} USD")
    token_cost = float(sum(call_costs_usd)) + stand_in_cost
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
        stand_in_cost_usd=stand_in_cost,
        stand_in_model=stand_in,
        pricing=pricing,
    )
