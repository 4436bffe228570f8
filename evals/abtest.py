"""A/B statistics on engagement events exported from an email-sending tool (or read from the mail server),
joined to the store's emails and their A/B arms.

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
``message_id``   one of    the email's ``Message-ID`` (``<id@domain>``, brackets optional), or a sending
                 these     tool's own id [``sg_message_id``, ``message-id``, ``msg_id``]
``recipient``              the recipient's address [``email``, ``to``]
``variant``      no        the A/B variant [``group``, ``arm``]; needed only for events that are not
                           joined to an email of the store
``campaign``     no        the campaign, to join by recipient [``campaign_name``]; a row that is not
                           joined and has no variant uses it as its variant (tools that export one
                           campaign per variant)
``timestamp``    no        ISO 8601 (``2025-03-01T09:30:00Z``) or Unix seconds [``time``, ``occurred_at``,
                           ``date``]; needed for re-imports to be idempotent
``email_id``     no        id of the ``emails`` row in this store the event belongs to
===============  ========  ============================================================================

Joining (``read_events(path, engine)``): a row whose ``Message-ID`` is a stored email's
(``emails.message_id``, set when the email was written) is that email's; else a row is joined by recipient
within its campaign (the ``campaign`` column, or the one given, or the only campaign that emailed the
address). A joined row's variant is its run's arm (``runs.arm``, ``graphs.arms``), so the file needs no
variant column. A row that breaks these rules is reported with its line number (``EventsImport.errors``)
and skipped: no way to join it and no variant (a malformed ``Message-ID`` says so), a ``Message-ID`` given
for a recipient other than its email's or than on an earlier line (duplicated), a row that repeats an
earlier one. The rest is imported into the store's ``engagement_events`` table (``import_events``).

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
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from store import session_scope
from store.exports import normalise_message_id
from store.models import Campaign, EmailRecord, EngagementEvent, Prospect, Run

__all__ = [
    "ABSection",
    "ArmFigures",
    "SendPlan",
    "ab_section",
    "ab_sections",
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
    "group_by_campaign",
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
    "variant": ("variant", "group", "arm"),
    "campaign": ("campaign", "campaign_name"),
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
    """One valid event row of an events file (``line`` is 1-based, the header being line 1 in a CSV).

    ``variant`` is the A/B arm: the store's (``runs.arm``) when the row is joined to an email of this store
    (``email_id`` and ``campaign`` set, ``message_id`` the stored ``Message-ID``), else the file's.
    """

    line: int
    event: str
    variant: str
    message_id: str
    recipient: str
    occurred_at: datetime | None
    email_id: int | None = None
    campaign: str = ""

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
        errors: ``(line, reason)`` per skipped row (among them events that cannot be joined to an email and
            carry no variant, a malformed ``Message-ID``, a ``Message-ID`` given for two recipients, a row
            that repeats an earlier one).
        warnings: ``(line, note)`` per row kept with a change (e.g. an unknown ``email_id`` dropped).
        joined: rows joined to an email of the store (by ``Message-ID``, or by recipient and campaign).
        stored: rows written to the store (``import_events``); ``duplicates``: rows already there.
    """

    path: Path
    events: list[EventRow] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    joined: int = 0
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
    """Validate one raw row (its variant may be empty: joining fills it); raises ``ValueError`` with the reason."""
    lowered = {str(k).strip().lower(): ("" if v is None else str(v).strip()) for k, v in raw.items() if k is not None}

    def get(name: str) -> str:
        return next((lowered[a] for a in _COLUMN_ALIASES[name] if lowered.get(a)), "")

    event = get("event").lower()
    event = EVENT_ALIASES.get(event, event)
    if not event:
        raise ValueError("no event (column 'event')")
    if event not in EVENT_TYPES:
        raise ValueError(f"unknown event {event!r}; use one of {', '.join(EVENT_TYPES)}")
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
    return EventRow(line=line, event=event, variant=get("variant"), message_id=message_id, recipient=recipient,
                    occurred_at=occurred, email_id=int(email_raw) if email_raw else None, campaign=get("campaign"))


def _parse_rows(path: Path, result: EventsImport) -> list[EventRow]:
    """The file's rows that parse (errors go to ``result``); format: module docstring."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"events file {path} is not UTF-8 text ({exc}); export it as UTF-8 CSV or JSONL") from exc
    rows: list[EventRow] = []
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
                rows.append(_row(lineno, obj))
            except ValueError as exc:
                result.errors.append((lineno, str(exc)))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if not any(a in header for a in _COLUMN_ALIASES["event"]):
        raise ValueError(f"events file {path}: the header {header} has no 'event' column; columns: event, "
                         "message_id or recipient, variant (optional when the store has the emails), campaign, "
                         "timestamp (see evals.abtest)")
    for row in reader:
        row_line = reader.line_num
        if None in row:
            result.errors.append((row_line, f"{len(header) + len(row[None])} fields, the header has {len(header)}"))
            continue
        try:
            rows.append(_row(row_line, row))
        except ValueError as exc:
            result.errors.append((row_line, str(exc)))
    return rows


@dataclass(frozen=True)
class _StoredEmail:
    email_id: int
    message_id: str
    recipient: str
    campaign: str
    arm: str


def _stored_emails(engine: Engine) -> list[_StoredEmail]:
    with Session(engine) as session:
        rows = session.exec(
            select(EmailRecord, Prospect.email, Campaign.name, Run.arm)
            .join(Run, col(Run.id) == col(EmailRecord.run_id))
            .join(Prospect, col(Prospect.id) == col(Run.prospect_id))
            .join(Campaign, col(Campaign.id) == col(Run.campaign_id))
        ).all()
    return [_StoredEmail(email_id=e.id or 0, message_id=e.message_id or "", recipient=r, campaign=c, arm=a)
            for e, r, c, a in rows]


class _Joiner:
    """Finds the stored email of an event: by ``Message-ID``, else by recipient and campaign."""

    def __init__(self, emails: Sequence[_StoredEmail], campaign: str | None) -> None:
        self.campaign = campaign
        self.by_id = {e.message_id: e for e in emails if e.message_id}
        self.by_recipient: dict[str, list[_StoredEmail]] = {}
        for e in emails:
            self.by_recipient.setdefault(e.recipient.casefold(), []).append(e)

    def by_address(self, row: EventRow) -> tuple[_StoredEmail | None, str]:
        """The email to ``row.recipient`` in the row's (or the given) campaign; ``(None, why)`` when none or
        several."""
        if not row.recipient:
            return None, "it has no recipient"
        found = self.by_recipient.get(row.recipient.casefold(), [])
        campaign = row.campaign or self.campaign
        if campaign:
            found = [e for e in found if e.campaign == campaign]
        if len(found) == 1:
            return found[0], ""
        if not found:
            where = f" in campaign {campaign!r}" if campaign else ""
            return None, f"no email of this store went to {row.recipient}{where}"
        campaigns = sorted({e.campaign for e in found})
        return None, (f"{row.recipient} has {len(found)} emails in campaign(s) {', '.join(campaigns)}; give a "
                      "campaign column or --campaign")

    def join(self, row: EventRow) -> tuple[EventRow | None, str, str]:
        """``(joined row or None, error, warning)``: the row with the store's email, or why it cannot be joined
        (the error is empty when the row is kept as it is, with its own variant)."""
        raw_id = row.message_id
        message_id = normalise_message_id(raw_id) if raw_id else None
        email: _StoredEmail | None = None
        why = ""
        if message_id is not None and message_id in self.by_id:
            email = self.by_id[message_id]
            if row.recipient and row.recipient.casefold() != email.recipient.casefold():
                return None, (f"Message-ID {message_id} is email {email.email_id} to {email.recipient}, not to "
                              f"{row.recipient}"), ""
        else:
            email, why = self.by_address(row)
            if raw_id and message_id is None:
                why = f"malformed Message-ID {raw_id!r} (an RFC 5322 msg-id is <id@domain>), and {why}"
            elif raw_id:
                why = f"Message-ID {message_id} is not an email of this store, and {why}"
        if email is None:
            if row.variant:
                return row, "", ""
            if row.campaign:  # tools that export one campaign per variant (the column's old meaning)
                return replace(row, variant=row.campaign), "", ""
            return None, f"no variant (column 'variant') and cannot be joined: {why}", ""
        warning = ""
        variant = email.arm or row.variant
        if not variant:
            return None, (f"email {email.email_id} of campaign {email.campaign!r} belongs to no A/B arm and the row "
                          "has no variant (column 'variant')"), ""
        if email.arm and row.variant and row.variant != email.arm:
            warning = f"variant {row.variant!r} in the file, arm {email.arm!r} in the store: the store's is used"
        joined = replace(row, variant=variant, message_id=email.message_id or row.message_id,
                         recipient=row.recipient or email.recipient, email_id=email.email_id, campaign=email.campaign)
        return joined, "", warning


def _check_repeats(rows: Sequence[EventRow], result: EventsImport) -> list[EventRow]:
    """Rows minus those that repeat an earlier row (same message, event and time) or give a Message-ID to a
    second recipient; each is reported by line."""
    kept: list[EventRow] = []
    seen_rows: dict[tuple[str, str, datetime], int] = {}
    recipient_of: dict[str, tuple[str, int]] = {}
    for row in rows:
        normalised = normalise_message_id(row.message_id) if row.message_id else None
        mid = normalised or row.message_id
        if mid and row.recipient:
            first = recipient_of.setdefault(mid, (row.recipient.casefold(), row.line))
            if first[0] != row.recipient.casefold():
                result.errors.append((row.line, f"duplicated Message-ID {mid}: line {first[1]} gives it to another "
                                                f"recipient than {row.recipient}"))
                continue
        if row.occurred_at is not None:
            key = (mid or row.recipient.casefold(), row.event, row.occurred_at)
            if key in seen_rows:
                result.errors.append((row.line, f"repeats line {seen_rows[key]} (same message, event and time)"))
                continue
            seen_rows[key] = row.line
        kept.append(row)
    return kept


def read_events(path: Path, engine: Engine | None = None, *, campaign: str | None = None) -> EventsImport:
    """Read an events file (format: module docstring) and join it to the store's emails; bad rows are reported
    by line, not raised.

    With ``engine``, a row is joined to a stored email by its ``Message-ID`` (with or without angle brackets),
    else by recipient within its ``campaign`` column (or ``campaign``, or the only campaign that emailed the
    recipient); a joined row's variant is its run's arm (``runs.arm``), so no variant column is needed. A row
    that cannot be joined keeps the file's variant (or, without one, its campaign column); with neither it is
    reported. Without ``engine`` every row needs a variant.

    Args:
        path: a CSV file, or JSON Lines when the name ends in ``.jsonl`` or ``.ndjson``.
        engine: the store whose emails events are joined to (None: no joining).
        campaign: campaign of rows that have no campaign column (joining by recipient).

    Returns:
        ``EventsImport`` with the valid rows and ``(line, reason)`` for each skipped one.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not UTF-8, or a CSV has no header with an ``event`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"events file {path} not found")
    result = EventsImport(path=path)
    rows = _check_repeats(_parse_rows(path, result), result)
    joiner = _Joiner(_stored_emails(engine), campaign) if engine is not None else None
    for row in rows:
        if joiner is None:
            if row.variant:
                result.events.append(row)
            elif row.campaign:
                result.events.append(replace(row, variant=row.campaign))
            else:
                result.errors.append((row.line, "no variant (column 'variant'); give one, or a store whose emails "
                                                "the events join by Message-ID or by recipient and campaign"))
            continue
        joined, error, warning = joiner.join(row)
        if joined is None:
            result.errors.append((row.line, error))
            continue
        result.joined += joined.email_id is not None and joined.campaign != ""
        if warning:
            result.warnings.append((row.line, warning))
        result.events.append(joined)
    result.errors.sort()
    return result


def import_events(engine: Engine, path: Path, *, campaign: str | None = None) -> EventsImport:
    """Read an events file, join it to the store's emails and store its valid rows in ``engagement_events``.

    A row identical to one already stored (same message id, recipient, variant, event and time) is
    not stored again, so importing the same export twice changes nothing. An ``email_id`` that is not
    in this store is dropped with a warning (the event is kept).

    Args:
        engine: the store.
        path: the events file.
        campaign: campaign of rows without a campaign column (``read_events``).

    Returns:
        ``EventsImport`` with ``stored`` and ``duplicates`` filled.

    Raises:
        FileNotFoundError, ValueError: as ``read_events``.
    """
    result = read_events(path, engine, campaign=campaign)
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
    result.warnings.sort()
    logger.info("imported %d events from %s (%d joined to emails, %d duplicates, %d bad rows)", result.stored, path,
                result.joined, result.duplicates, len(result.errors))
    return result


def _naive(stamp: datetime) -> datetime:
    """UTC without tzinfo: SQLite returns stored datetimes naive, so keys compare on that form."""
    return stamp.astimezone(UTC).replace(tzinfo=None) if stamp.tzinfo else stamp


def load_events(engine: Engine, variants: Sequence[str] | None = None,
                campaign: str | None = None) -> list[EventRow]:
    """Events stored in ``engagement_events`` (all, of ``variants``, of ``campaign``), as ``EventRow`` (line = row
    id). An event joined to an email gets its campaign, and its run's arm as its variant."""
    with Session(engine) as session:
        query = (
            select(EngagementEvent, Campaign.name, Run.arm)
            .join(EmailRecord, col(EmailRecord.id) == col(EngagementEvent.email_id), isouter=True)
            .join(Run, col(Run.id) == col(EmailRecord.run_id), isouter=True)
            .join(Campaign, col(Campaign.id) == col(Run.campaign_id), isouter=True)
            .order_by(col(EngagementEvent.id))
        )
        if campaign:
            query = query.where(Campaign.name == campaign)
        rows = session.exec(query).all()
    events = [EventRow(line=r.id or 0, event=r.event, variant=arm or r.variant, message_id=r.message_id,
                       recipient=r.recipient, occurred_at=r.occurred_at, email_id=r.email_id, campaign=name or "")
              for r, name, arm in rows]
    return [e for e in events if e.variant in variants] if variants else events


def group_by_campaign(events: Iterable[EventRow]) -> dict[str, list[EventRow]]:
    """Events by campaign (``""`` for events not joined to an email), in order of first appearance: arms are
    compared within one campaign."""
    groups: dict[str, list[EventRow]] = {}
    for e in events:
        groups.setdefault(e.campaign, []).append(e)
    return groups


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


# ------------------------------------------------------------------------------------------------
# The A/B section of a campaign with arms (the evaluation report and ``outreach abtest report``)
# ------------------------------------------------------------------------------------------------


class ArmFigures(BaseModel):
    """One arm of a campaign: its backends (redacted specs), its share of the split, valid emails written and
    messages with at least one engagement event (``sent``)."""

    name: str
    researcher: str
    writer: str
    share: float
    emails: int
    sent: int


class SendPlan(BaseModel):
    """How many sends a conclusive test of one metric needs (``sample_size``), against what each arm has.

    Attributes:
        metric: a key of ``METRICS``.
        baseline: the control's observed rate, or ``REFERENCE_REPLY_RATE`` for replies before any is observed
            (``baseline_from`` says which: ``control`` or ``reference``).
        mde: the planned minimum detectable effect, relative (0.2 = +20%); ``target`` the rate it detects.
        alpha, power: two-sided significance level and power of the plan.
        n_per_arm: messages per arm the plan needs (denominator of the metric: sent or delivered).
        have_per_arm: the smallest arm's denominator so far.
        more_per_arm: ``max(0, n_per_arm - have_per_arm)``: sends still needed in the smallest arm.
        conclusive: some arm differs from the control at ``alpha`` (Fisher's exact test) already.
        p_value_fisher: the smallest Fisher p-value against the control (NaN without a comparison).
    """

    model_config = ConfigDict(ser_json_inf_nan="strings")  # an undefined p-value stays NaN through JSON

    metric: str
    baseline: float
    baseline_from: str
    mde: float
    target: float
    alpha: float
    power: float
    n_per_arm: int
    have_per_arm: int
    more_per_arm: int
    conclusive: bool
    p_value_fisher: float


class ABSection(BaseModel):
    """A campaign's A/B test in one view: arms, per-arm rates with Wilson intervals, each arm against the
    control (z-test, Fisher's exact test, lift with its interval), and the sends a conclusive result needs."""

    model_config = ConfigDict(ser_json_inf_nan="strings")  # undefined statistics (NaN) stay NaN through JSON

    campaign: str
    control: str
    seed: int
    confidence: float
    arms: list[ArmFigures]
    events: int
    rates: dict[str, dict[str, Rate]] = Field(default_factory=dict)
    comparisons: list[Comparison] = Field(default_factory=list)
    plans: list[SendPlan] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def _plan(metric: str, control: str, counts: Mapping[str, VariantCounts], arms: Sequence[str],
          comparisons: Sequence[Comparison], *, mde: float, alpha: float, power: float) -> SendPlan | None:
    base = counts.get(control)
    rate = base.rate(metric).rate if base is not None and getattr(base, METRICS[metric]) else None
    if rate is not None and 0 < rate < 1:
        baseline, source = rate, "control"
    elif metric == "reply":
        baseline, source = REFERENCE_REPLY_RATE, "reference"
    else:
        return None
    size = sample_size(baseline, mde, alpha=alpha, power=power)
    have = min((getattr(counts[a], METRICS[metric]) if a in counts else 0) for a in arms)
    mine = [c for c in comparisons if c.metric == metric]
    p_min = min((c.p_value_fisher for c in mine), default=math.nan)
    return SendPlan(metric=metric, baseline=baseline, baseline_from=source, mde=mde, target=size.target, alpha=alpha,
                    power=power, n_per_arm=size.n_per_variant, have_per_arm=have,
                    more_per_arm=max(0, size.n_per_variant - have), conclusive=bool(mine) and p_min < alpha,
                    p_value_fisher=p_min)


def ab_section(engine: Engine, campaign: str, *, events: Iterable[EventRow] | None = None, confidence: float = 0.95,
               mde: float = 0.2, alpha: float = 0.05, power: float = 0.8,
               plan_metrics: Sequence[str] = ("open", "click", "reply")) -> ABSection:
    """The A/B section of a campaign with arms, from the store (arms, emails, imported engagement events).

    Args:
        engine: the store.
        campaign: a campaign started with ``--arm`` (``graphs.arms``).
        events: the campaign's events joined to its emails (``read_events(path, engine).events``); None: those
            stored in ``engagement_events``.
        confidence: two-sided level of the intervals.
        mde: planned minimum detectable effect, relative, for the send plans.
        alpha, power: of the send plans.
        plan_metrics: metrics to plan sends for (keys of ``METRICS``).

    Returns:
        ``ABSection``; without events its rates and comparisons are empty and its plans start from the
        reference reply rate.

    Raises:
        KeyError: no campaign of that name, or it has no arms.
    """
    from graphs.arms import ArmPlan

    with Session(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if record is None:
            raise KeyError(f"no campaign named {campaign!r} in the store")
        plan = ArmPlan.from_stored(record.arms or {})
        if plan is None:
            raise KeyError(f"campaign {campaign!r} has no A/B arms; start one with `outreach run ... --arm A=R,W "
                           "--arm B=R,W`")
        written = session.exec(select(Run.arm).join(EmailRecord, col(EmailRecord.run_id) == col(Run.id))
                               .where(Run.campaign_id == record.id, EmailRecord.valid == True)).all()  # noqa: E712
    names = plan.names
    source = load_events(engine, campaign=campaign) if events is None else events
    events = [e for e in source if e.campaign == campaign and e.variant in names]
    counts = count_variants(events)
    notes: list[str] = []
    rates: dict[str, dict[str, Rate]] = {}
    comparisons: list[Comparison] = []
    control = names[0]
    if not events:
        notes.append("no engagement events joined to this campaign's emails yet: import them with "
                     "`outreach abtest report EVENTS`")
    elif control not in counts:
        notes.append(f"the control arm {control!r} has no events yet, so nothing is compared")
        rates = {v: {m: c.rate(m, confidence) for m in METRICS} for v, c in counts.items()}
    else:
        report = ab_report(events, control=control, confidence=confidence)
        rates, comparisons = report.rates, report.comparisons
    plans = [p for m in plan_metrics
             if (p := _plan(m, control, counts, names, comparisons, mde=mde, alpha=alpha, power=power)) is not None]
    per_arm = Counter(written)
    arms = [ArmFigures(name=a.name, researcher=a.researcher, writer=a.writer, share=a.weight, emails=per_arm[a.name],
                       sent=counts[a.name].sent if a.name in counts else 0) for a in plan.arms]
    return ABSection(campaign=campaign, control=control, seed=plan.seed, confidence=confidence, arms=arms,
                     events=len(events), rates=rates, comparisons=comparisons, plans=plans, notes=notes)


def ab_sections(engine: Engine, campaigns: Sequence[str] | None = None, **options: Any) -> list[ABSection]:
    """``ab_section`` of each campaign named, or of every campaign in the store that has arms (by name).

    Raises:
        KeyError: a named campaign is missing or has no arms.
    """
    if campaigns is None:
        with Session(engine) as session:
            stored = session.exec(select(Campaign.name, Campaign.arms).order_by(col(Campaign.name))).all()
        campaigns = [name for name, arms in stored if arms and arms.get("arms")]
    return [ab_section(engine, name, **options) for name in campaigns]
