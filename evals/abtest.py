"""A/B statistics on engagement events exported from an email-sending tool.

Events file
-----------
CSV (header row) or JSON Lines (one object per line; chosen by the suffix ``.jsonl``/``.ndjson``, else
CSV). Column names are case-insensitive; the aliases in brackets are what common tools export:

===============  ========  ============================================================================
column           required  meaning
===============  ========  ============================================================================
``event``        yes       ``sent``, ``delivered``, ``open``, ``click``, ``reply``, ``bounce``,
                           ``unsubscribe`` [also ``type``, ``event_type``; values ``processed``,
                           ``opened``, ``clicked``, ``replied``, ``bounced``, ``hard_bounce``,
                           ``soft_bounce``, ``unsubscribed``, ``delivery`` map to these]
``variant``      yes       the A/B variant the email belongs to [``campaign``, ``group``]
``message_id``   one of    the sending tool's message id [``sg_message_id``, ``message-id``, ``msg_id``]
``recipient``    these     the recipient's address [``email``, ``to``]
``timestamp``    no        ISO 8601 (``2025-03-01T09:30:00Z``) or Unix seconds [``time``, ``occurred_at``,
                           ``date``]; needed for re-imports to be idempotent
``email_id``     no        id of the ``emails`` row in this store the event belongs to
===============  ========  ============================================================================

A row that breaks these rules is reported with its line number (``EventsImport.errors``) and skipped;
the rest is imported into the store's ``engagement_events`` table (``import_events``).

Counting
--------
The unit is the message (``message_id``, else ``recipient``): each rate counts messages with at least
one event of a kind, so repeated opens count once. ``sent`` = messages with any event; ``delivered`` =
sent messages without a ``bounce``. ``bounce`` and ``delivered`` rates are per sent message; ``open``,
``click``, ``reply`` and ``unsubscribe`` rates are per delivered message.

Statistics
----------
* rates with Wilson score intervals (Wilson 1927; Newcombe 1998, "Two-sided confidence intervals for
  the single proportion", Statistics in Medicine 17:857-872, method 3);
* two-proportion z-test with pooled variance (``statsmodels.stats.proportion.proportions_ztest``) and
  Fisher's exact test (``scipy.stats.fisher_exact``), both two-sided;
* relative lift ``p_B / p_A - 1`` with the Katz log risk-ratio interval (Katz et al. 1978);
* sample size per variant for a baseline rate, minimum detectable effect, significance and power:
  the normal approximation with pooled variance under H0 (Fleiss, Levin & Paik, "Statistical Methods
  for Rates and Proportions", 3rd ed., eq. 4.14 without continuity correction; the formula of R's
  ``power.prop.test``).

Real reply rates are low (an Italian B2B panel of 507 campaigns had a median reply rate of 1.71%), so
conclusive tests need many emails: at that baseline, detecting a 20% relative lift with 80% power at
the 5% level takes about 24,800 emails per variant (``sample_size(0.0171, 0.2)``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from store import session_scope
from store.models import EmailRecord, EngagementEvent

__all__ = [
    "EVENT_ALIASES",
    "EVENT_TYPES",
    "METRICS",
    "REFERENCE_REPLY_RATE",
    "ABReport",
    "Comparison",
    "EventRow",
    "EventsImport",
    "Rate",
    "SampleSize",
    "VariantCounts",
    "ab_report",
    "compare_rates",
    "count_variants",
    "import_events",
    "load_events",
    "read_events",
    "sample_size",
    "wilson_interval",
]

logger = logging.getLogger(__name__)

#: Event kinds, in funnel order.
EVENT_TYPES: tuple[str, ...] = ("sent", "delivered", "open", "click", "reply", "bounce", "unsubscribe")
#: Names other tools use for the same events.
EVENT_ALIASES: dict[str, str] = {
    "processed": "sent", "send": "sent", "delivery": "delivered", "opened": "open", "clicked": "click",
    "replied": "reply", "bounced": "bounce", "hard_bounce": "bounce", "soft_bounce": "bounce",
    "unsubscribed": "unsubscribe", "unsub": "unsubscribe",
}
#: Rates reported per variant: name -> denominator (``sent`` or ``delivered`` messages).
METRICS: dict[str, str] = {
    "delivered": "sent", "open": "delivered", "click": "delivered", "reply": "delivered",
    "unsubscribe": "delivered", "bounce": "sent",
}
#: Median reply rate of 507 Italian B2B cold-email campaigns (1.71%), the scale of a realistic baseline.
REFERENCE_REPLY_RATE = 0.0171

_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "event": ("event", "type", "event_type"),
    "variant": ("variant", "campaign", "group"),
    "message_id": ("message_id", "sg_message_id", "message-id", "msg_id"),
    "recipient": ("recipient", "email", "to"),
    "timestamp": ("timestamp", "time", "occurred_at", "date"),
    "email_id": ("email_id",),
}


# ------------------------------------------------------------------------------------------------
# Intervals and tests
# ------------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion.

    ``successes`` may be fractional (a win rate with ties counted as half a win); the formula only
    uses the observed share ``successes / n``.

    Args:
        successes: observed successes, 0 <= successes <= n.
        n: trials, >= 0 (``(0.0, 1.0)`` is returned for 0 trials).
        confidence: two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)`` within [0, 1].

    Raises:
        ValueError: arguments out of range.

    Source: Wilson (1927); Newcombe (1998), method 3. Matches
    ``statsmodels.stats.proportion.proportion_confint(method="wilson")``.
    """
    from scipy.stats import norm

    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n and n >= 0, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """A proportion with its Wilson interval: ``count`` of ``n`` (``rate`` = 0.0 when n is 0)."""

    count: int
    n: int
    rate: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, count: int, n: int, confidence: float = 0.95) -> Rate:
        """Build from counts (Wilson interval at ``confidence``)."""
        low, high = wilson_interval(count, n, confidence)
        return cls(count=count, n=n, rate=count / n if n else 0.0, ci_low=low, ci_high=high)


@dataclass(frozen=True)
class Comparison:
    """Variant B against variant A on one metric.

    Attributes:
        metric: the metric (a key of ``METRICS``).
        a, b: the two variants' names; ``rate_a``, ``rate_b`` their rates.
        difference: ``rate_b - rate_a``.
        z, p_value_z: two-proportion z statistic (pooled) and two-sided p-value; NaN when undefined.
        odds_ratio, p_value_fisher: Fisher's exact test, two-sided (table ``[[x_a, n_a - x_a], [x_b, n_b - x_b]]``,
            so the odds ratio is A's odds over B's, as ``scipy.stats.fisher_exact`` reports it).
        lift: relative lift ``rate_b / rate_a - 1`` (NaN when rate_a is 0).
        lift_ci_low, lift_ci_high: Katz log risk-ratio interval of the lift (NaN when a count is 0).
        confidence: two-sided level of the intervals.
    """

    metric: str
    a: str
    b: str
    rate_a: Rate
    rate_b: Rate
    difference: float
    z: float
    p_value_z: float
    odds_ratio: float
    p_value_fisher: float
    lift: float
    lift_ci_low: float
    lift_ci_high: float
    confidence: float = 0.95

    def significant(self, alpha: float | None = None) -> bool:
        """True when Fisher's exact p-value is below ``alpha`` (default ``1 - confidence``)."""
        level = 1 - self.confidence if alpha is None else alpha
        return self.p_value_fisher < level


def compare_rates(x_a: int, n_a: int, x_b: int, n_b: int, *, metric: str = "rate", a: str = "A", b: str = "B",
                  confidence: float = 0.95) -> Comparison:
    """Compare two proportions: z-test, Fisher's exact test, and relative lift with its interval.

    Args:
        x_a, n_a: successes and trials of variant A (the control), 0 <= x <= n.
        x_b, n_b: the same for variant B.
        metric, a, b: labels for the report.
        confidence: two-sided level of the intervals, in (0, 1).

    Returns:
        ``Comparison``.

    Raises:
        ValueError: a count is negative or larger than its trials.

    Sources: ``statsmodels.stats.proportion.proportions_ztest``, ``scipy.stats.fisher_exact``; lift
    interval: Katz, Baptista, Azen & Pike (1978), ``exp(ln RR +- z * sqrt(1/x_b - 1/n_b + 1/x_a - 1/n_a)) - 1``.
    """
    from scipy.stats import fisher_exact, norm
    from statsmodels.stats.proportion import proportions_ztest

    for name, x, n in (("A", x_a, n_a), ("B", x_b, n_b)):
        if n < 0 or x < 0 or x > n:
            raise ValueError(f"variant {name}: need 0 <= count <= n, got count={x}, n={n}")
    rate_a, rate_b = Rate.of(x_a, n_a, confidence), Rate.of(x_b, n_b, confidence)
    z_stat, p_z = math.nan, math.nan
    if n_a and n_b and 0 < x_a + x_b < n_a + n_b:
        z_raw, p_raw = proportions_ztest([x_b, x_a], [n_b, n_a])
        z_stat, p_z = float(z_raw), float(p_raw)
    odds, p_fisher = math.nan, 1.0
    if n_a and n_b:
        res = fisher_exact([[x_a, n_a - x_a], [x_b, n_b - x_b]], alternative="two-sided")
        odds, p_fisher = float(res.statistic), float(res.pvalue)
    lift = rate_b.rate / rate_a.rate - 1 if rate_a.rate > 0 else math.nan
    low = high = math.nan
    if x_a and x_b:
        z = float(norm.ppf(1 - (1 - confidence) / 2))
        se = math.sqrt(1 / x_b - 1 / n_b + 1 / x_a - 1 / n_a)
        log_rr = math.log(rate_b.rate / rate_a.rate)
        low, high = math.exp(log_rr - z * se) - 1, math.exp(log_rr + z * se) - 1
    return Comparison(metric=metric, a=a, b=b, rate_a=rate_a, rate_b=rate_b, difference=rate_b.rate - rate_a.rate,
                      z=z_stat, p_value_z=p_z, odds_ratio=odds, p_value_fisher=p_fisher, lift=lift,
                      lift_ci_low=low, lift_ci_high=high, confidence=confidence)


@dataclass(frozen=True)
class SampleSize:
    """Emails needed per variant to detect a change from ``baseline`` to ``target``.

    Attributes:
        baseline, target: the control's rate and the rate to detect.
        alpha: two-sided significance level; ``power``: 1 - type II error rate.
        n_per_variant: emails per variant (rounded up); ``total``: for both variants.
        n_cohen_h: the same figure by ``statsmodels`` ``NormalIndPower`` on Cohen's effect size h
            (an arcsine-transformed approximation; a cross-check, a little different for small rates).
    """

    baseline: float
    target: float
    alpha: float
    power: float
    n_per_variant: int
    total: int
    n_cohen_h: int


def sample_size(baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8,
                relative: bool = True) -> SampleSize:
    """Sample size per variant for a two-sided two-proportion test (equal group sizes).

    ``n = (z_{1-a/2} sqrt(2 pbar qbar) + z_{power} sqrt(p1 q1 + p2 q2))^2 / (p2 - p1)^2`` with
    ``pbar = (p1 + p2) / 2`` (Fleiss, Levin & Paik, 3rd ed., eq. 4.14 without continuity correction;
    R's ``power.prop.test``: ``power.prop.test(p1 = .50, p2 = .75, power = .90)`` gives n = 76.7).

    Args:
        baseline: the control's rate, in (0, 1) (e.g. a reply rate of 0.0171).
        mde: minimum detectable effect: relative to ``baseline`` (0.2 = a 20% lift) when ``relative``,
            else an absolute difference in rate (0.01 = one percentage point); may be negative.
        alpha: two-sided significance level in (0, 1).
        power: wanted power in (0, 1).
        relative: whether ``mde`` is relative.

    Returns:
        ``SampleSize``.

    Raises:
        ValueError: a rate outside (0, 1), ``mde`` of 0, or ``alpha``/``power`` outside (0, 1).
    """
    from scipy.stats import norm
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    if not 0 < baseline < 1:
        raise ValueError(f"baseline={baseline} must be a rate in (0, 1), e.g. 0.05 for 5%")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha={alpha} and power={power} must be in (0, 1), e.g. 0.05 and 0.8")
    target = baseline * (1 + mde) if relative else baseline + mde
    if mde == 0 or not 0 < target < 1:
        raise ValueError(f"mde={mde} gives a target rate {target:.4g}; it must differ from the baseline and lie in "
                         f"(0, 1) ({'relative: 0.2 = +20%' if relative else 'absolute: 0.01 = +1 point'})")
    z_a, z_b = float(norm.ppf(1 - alpha / 2)), float(norm.ppf(power))
    pbar = (baseline + target) / 2
    num = z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(baseline * (1 - baseline) + target * (1 - target))
    n = math.ceil(num * num / (target - baseline) ** 2)
    h = abs(float(proportion_effectsize(target, baseline)))
    n_h = math.ceil(float(NormalIndPower().solve_power(effect_size=h, alpha=alpha, power=power, ratio=1.0)))
    return SampleSize(baseline=baseline, target=target, alpha=alpha, power=power, n_per_variant=n, total=2 * n,
                      n_cohen_h=n_h)


# ------------------------------------------------------------------------------------------------
# Events: reading, storing, counting
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventRow:
    """One valid event row of an events file (``line`` is 1-based, the header being line 1 in a CSV)."""

    line: int
    event: str
    variant: str
    message_id: str
    recipient: str
    occurred_at: datetime | None
    email_id: int | None = None

    @property
    def key(self) -> str:
        """The message this event belongs to: ``message_id``, else ``recipient``."""
        return self.message_id or self.recipient


@dataclass
class EventsImport:
    """What ``read_events`` (and ``import_events``) made of a file.

    Attributes:
        path: the file.
        events: valid rows.
        errors: ``(line, reason)`` per skipped row.
        warnings: ``(line, note)`` per row kept with a change (e.g. an unknown ``email_id`` dropped).
        stored: rows written to the store (``import_events``); ``duplicates``: rows already there.
    """

    path: Path
    events: list[EventRow] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    stored: int = 0
    duplicates: int = 0


def _timestamp(raw: str) -> datetime:
    text = raw.strip()
    try:
        return datetime.fromtimestamp(float(text), tz=UTC)
    except ValueError:
        pass
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _row(line: int, raw: Mapping[str, object]) -> EventRow:
    """Validate one raw row; raises ``ValueError`` with the reason."""
    lowered = {str(k).strip().lower(): ("" if v is None else str(v).strip()) for k, v in raw.items() if k is not None}

    def get(name: str) -> str:
        return next((lowered[a] for a in _COLUMN_ALIASES[name] if lowered.get(a)), "")

    event = get("event").lower()
    event = EVENT_ALIASES.get(event, event)
    if not event:
        raise ValueError("no event (column 'event')")
    if event not in EVENT_TYPES:
        raise ValueError(f"unknown event {event!r}; use one of {', '.join(EVENT_TYPES)}")
    variant = get("variant")
    if not variant:
        raise ValueError("no variant (column 'variant')")
    message_id, recipient = get("message_id"), get("recipient")
    if not message_id and not recipient:
        raise ValueError("neither message_id nor recipient is given; one identifies the message")
    stamp = get("timestamp")
    try:
        occurred = _timestamp(stamp) if stamp else None
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"timestamp {stamp!r} is neither ISO 8601 nor Unix seconds") from None
    email_raw = get("email_id")
    if email_raw and not email_raw.isdigit():
        raise ValueError(f"email_id {email_raw!r} is not a positive integer")
    return EventRow(line=line, event=event, variant=variant, message_id=message_id, recipient=recipient,
                    occurred_at=occurred, email_id=int(email_raw) if email_raw else None)


def read_events(path: Path) -> EventsImport:
    """Read an events file (format: module docstring); bad rows are reported by line, not raised.

    Args:
        path: a CSV file, or JSON Lines when the name ends in ``.jsonl`` or ``.ndjson``.

    Returns:
        ``EventsImport`` with the valid rows and ``(line, reason)`` for each skipped one.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not UTF-8, or a CSV has no header with an ``event`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"events file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"events file {path} is not UTF-8 text ({exc}); export it as UTF-8 CSV or JSONL") from exc
    result = EventsImport(path=path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                result.errors.append((lineno, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                result.errors.append((lineno, f"a JSON {type(obj).__name__}, not an object"))
                continue
            try:
                result.events.append(_row(lineno, obj))
            except ValueError as exc:
                result.errors.append((lineno, str(exc)))
        return result
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if not any(a in header for a in _COLUMN_ALIASES["event"]):
        raise ValueError(f"events file {path}: the header {header} has no 'event' column; columns: event, variant, "
                         "message_id or recipient, timestamp (see evals.abtest)")
    for row in reader:
        row_line = reader.line_num
        if None in row:
            result.errors.append((row_line, f"{len(header) + len(row[None])} fields, the header has {len(header)}"))
            continue
        try:
            result.events.append(_row(row_line, row))
        except ValueError as exc:
            result.errors.append((row_line, str(exc)))
    return result


def import_events(engine: Engine, path: Path) -> EventsImport:
    """Read an events file and store its valid rows in the ``engagement_events`` table.

    A row identical to one already stored (same message id, recipient, variant, event and time) is
    not stored again, so importing the same export twice changes nothing. An ``email_id`` that is not
    in this store is dropped with a warning (the event is kept).

    Args:
        engine: the store.
        path: the events file.

    Returns:
        ``EventsImport`` with ``stored`` and ``duplicates`` filled.

    Raises:
        FileNotFoundError, ValueError: as ``read_events``.
    """
    result = read_events(path)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        wanted_ids = {e.email_id for e in result.events if e.email_id is not None}
        known_ids = set(session.exec(select(EmailRecord.id).where(col(EmailRecord.id).in_(wanted_ids))).all()) \
            if wanted_ids else set()
        existing = {
            (r.message_id, r.recipient, r.variant, r.event, _naive(r.occurred_at))
            for r in session.exec(select(EngagementEvent)).all()
        }
        for row in result.events:
            email_id = row.email_id
            if email_id is not None and email_id not in known_ids:
                result.warnings.append((row.line, f"email_id {email_id} is not in this store; stored without it"))
                email_id = None
            occurred = row.occurred_at or now
            key = (row.message_id, row.recipient, row.variant, row.event, _naive(occurred))
            if row.occurred_at is not None and key in existing:
                result.duplicates += 1
                continue
            existing.add(key)
            session.add(EngagementEvent(email_id=email_id, message_id=row.message_id, variant=row.variant,
                                        event=row.event, recipient=row.recipient, occurred_at=occurred))
            result.stored += 1
    logger.info("imported %d events from %s (%d duplicates, %d bad rows)", result.stored, path, result.duplicates,
                len(result.errors))
    return result


def _naive(stamp: datetime) -> datetime:
    """UTC without tzinfo: SQLite returns stored datetimes naive, so keys compare on that form."""
    return stamp.astimezone(UTC).replace(tzinfo=None) if stamp.tzinfo else stamp


def load_events(engine: Engine, variants: Sequence[str] | None = None) -> list[EventRow]:
    """Events stored in ``engagement_events`` (all, or of ``variants``), as ``EventRow`` (line = row id)."""
    with Session(engine) as session:
        query = select(EngagementEvent).order_by(col(EngagementEvent.id))
        if variants:
            query = query.where(col(EngagementEvent.variant).in_(list(variants)))
        rows = session.exec(query).all()
    return [EventRow(line=r.id or 0, event=r.event, variant=r.variant, message_id=r.message_id,
                     recipient=r.recipient, occurred_at=r.occurred_at, email_id=r.email_id) for r in rows]


@dataclass(frozen=True)
class VariantCounts:
    """Messages of one variant with at least one event of each kind (rules: module docstring)."""

    variant: str
    sent: int
    delivered: int
    open: int
    click: int
    reply: int
    bounce: int
    unsubscribe: int

    def rate(self, metric: str, confidence: float = 0.95) -> Rate:
        """The rate of ``metric`` (a key of ``METRICS``) over its denominator, with a Wilson interval.

        Raises:
            KeyError: unknown metric.
        """
        if metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        return Rate.of(getattr(self, metric), getattr(self, METRICS[metric]), confidence)


def count_variants(events: Iterable[EventRow]) -> dict[str, VariantCounts]:
    """Count messages per variant and event kind (a message's variant is that of its first event).

    Returns:
        ``{variant: VariantCounts}`` in order of first appearance.
    """
    kinds: dict[str, set[str]] = {}
    variant_of: dict[str, str] = {}
    for e in events:
        variant_of.setdefault(e.key, e.variant)
        kinds.setdefault(e.key, set()).add(e.event)
    per: dict[str, dict[str, int]] = {}
    for key, seen in kinds.items():
        counts = per.setdefault(variant_of[key], dict.fromkeys(EVENT_TYPES, 0))
        counts["sent"] += 1
        counts["delivered"] += "bounce" not in seen
        for kind in ("open", "click", "reply", "bounce", "unsubscribe"):
            counts[kind] += kind in seen
    return {v: VariantCounts(variant=v, **c) for v, c in per.items()}


@dataclass(frozen=True)
class ABReport:
    """Per-variant rates and each variant against the control, per metric.

    Attributes:
        control: the control variant (first seen, unless named).
        variants: ``VariantCounts`` per variant.
        rates: ``{variant: {metric: Rate}}``.
        comparisons: every non-control variant against the control, per metric.
        confidence: two-sided level of every interval.
    """

    control: str
    variants: dict[str, VariantCounts]
    rates: dict[str, dict[str, Rate]]
    comparisons: list[Comparison]
    confidence: float = 0.95


def ab_report(events: Iterable[EventRow], *, control: str | None = None, metrics: Sequence[str] = tuple(METRICS),
              confidence: float = 0.95) -> ABReport:
    """Rates per variant and comparisons against the control.

    Args:
        events: event rows (``read_events(...).events`` or ``load_events(engine)``).
        control: the control variant (default: the first variant seen).
        metrics: metrics to report (keys of ``METRICS``).
        confidence: two-sided level of the intervals.

    Returns:
        ``ABReport``.

    Raises:
        ValueError: no events, or ``control`` is not a variant of the events.
        KeyError: an unknown metric.
    """
    variants = count_variants(events)
    if not variants:
        raise ValueError("no events to report on; import an events file first")
    control = control or next(iter(variants))
    if control not in variants:
        raise ValueError(f"control variant {control!r} is not in the events; variants: {', '.join(variants)}")
    rates = {v: {m: c.rate(m, confidence) for m in metrics} for v, c in variants.items()}
    comparisons = []
    base = variants[control]
    for name, counts in variants.items():
        if name == control:
            continue
        for m in metrics:
            denom = METRICS[m]
            comparisons.append(compare_rates(getattr(base, m), getattr(base, denom), getattr(counts, m),
                                             getattr(counts, denom), metric=m, a=control, b=name,
                                             confidence=confidence))
    return ABReport(control=control, variants=variants, rates=rates, comparisons=comparisons, confidence=confidence)
