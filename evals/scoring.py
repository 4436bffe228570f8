"""Field-level extraction scores: precision, recall and F1 of researcher profiles against gold.

Inputs are plain mappings ``{company name: {field: value}}`` so that any source can be scored: demo-world
gold (``{name: g.facts for name, g in load_gold(dir).items()}``), real-data gold (``evals.realdata.yc_gold``)
and predictions made from ``agents.schemas.Profile`` objects (``profile_values``).

Counting rules (per field, then micro-averaged by summing the counts over fields):

* ``n_pred``: predictions with a non-empty value; ``n_gold``: gold entries with a non-empty value;
  ``tp``: predictions that match a non-empty gold value under the field's matcher (``value_matches``).
* precision = tp / n_pred, recall = tp / n_gold, F1 = 2PR / (P + R); each is 0.0 when its denominator is 0.
* A company missing from ``predicted`` counts as all-empty predictions; a predicted company missing from
  ``gold`` counts as all-empty gold (its predictions are false positives), unless
  ``ignore_missing_gold=True``, which skips every (company, field) whose gold value is empty: use it on
  real data where gold is incomplete.

Matchers (``value_matches``):

* ``founded_year``: the first integer of each side (thousands separators dropped, words ignored) must be
  equal.
* ``employee_count``: the prediction is read as the range of counts it states (``count_range``: ``"120"``
  and ``"about 120"`` -> [120, 120], ``"11-50"`` -> [11, 50], ``"less than 10"`` -> [0, 9], ``"over 2,000"``
  -> [2001, inf), ``"2,000+"`` -> [2000, inf)); it matches when the gold count (first integer) lies in the
  range or at most ``employee_tolerance * gold`` outside it (``0.0``, the default, means exact; real team
  sizes drift, so e.g. ``0.25`` on real data). For a bare number this is ``|pred - gold| <= tol * gold``.
* ``location``: the city (text before the first comma, case-folded, whitespace collapsed) of one side
  equals or contains the other's.
* any other field (text): token F1 >= ``text_threshold`` (0.5) between the bags of lower-cased word tokens
  with punctuation and English stop words removed; the token F1 is the SQuAD v1.1 measure (Rajpurkar et
  al., 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text", official evaluation script).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, Field, computed_field

from agents.schemas import FACT_FIELDS

__all__ = [
    "STOP_WORDS",
    "ExtractionScores",
    "FieldScore",
    "Mismatch",
    "count_range",
    "parse_int",
    "profile_values",
    "score_profiles",
    "text_tokens",
    "token_f1",
    "value_matches",
]

#: English stop words dropped before the token F1 (articles, pronouns, auxiliaries, prepositions).
STOP_WORDS: frozenset[str] = frozenset(
    """a an the and or but nor of to in on at by for with from as into onto about over under than then
    is are was were be been being am do does did has have had having it its it's this that these those
    there their they them we our us you your he she his her i me my who whom which what when where why
    how all any both each few more most other some such no not only own same so too very can will just
    should now also our ours via per""".split()
)

_THOUSANDS = re.compile(r"(?<=\d)[,_\u00a0\u202f ](?=\d{3}(?!\d))")
_INT = re.compile(r"\d+")
_TOKEN = re.compile(r"[^\W_]+")
_COUNT_NUMBER = r"\d{1,3}(?:[,_\u00a0\u202f ]\d{3})+(?!\d)|\d+"
# Qualifier words before a count, by what they say of it: below (<), at most (<=), above (>), at least (>=);
# any other ("about", "between", ...) leaves the number or range as it is.
_COUNT_QUALIFIERS = {
    "less than": "lt", "fewer than": "lt", "under": "lt", "below": "lt", "<": "lt",
    "up to": "le", "at most": "le", "no more than": "le",
    "more than": "gt", "over": "gt", "above": "gt", ">": "gt",
    "at least": "ge", "no fewer than": "ge",
    "about": "", "around": "", "approximately": "", "approx.": "", "approx": "", "roughly": "", "nearly": "",
    "almost": "", "some": "", "close to": "", "~": "", "between": "",
}
_COUNT_VALUE = re.compile(
    r"(?:(?<![^\W_])(?P<qualifier>" + "|".join(re.escape(q) for q in sorted(_COUNT_QUALIFIERS, key=len, reverse=True))
    + rf")\s*)?(?<!\d)(?P<low>{_COUNT_NUMBER})(?P<plus>\s*\+)?"
    rf"(?:\s*(?:-|\u2013|\u2014|to|and)\s*(?P<high>{_COUNT_NUMBER})\s*\+?)?",
    re.IGNORECASE,
)


def parse_int(value: str) -> int | None:
    """Return the first integer written in ``value``, or None.

    Thousands separators between digit groups (``"1,200"``, ``"1 200"``) are dropped first; words and
    signs around the number are ignored (``"about 120 people"`` -> 120, ``"est. 1998"`` -> 1998). A
    number written in words is not recognised.

    Args:
        value: free text.

    Returns:
        The integer, or None when ``value`` holds no digit.
    """
    match = _INT.search(_THOUSANDS.sub("", value))
    return int(match.group()) if match else None


def count_range(value: str) -> tuple[float, float] | None:
    """Read a head count as the range of counts it states, bounds included.

    The first number of ``value`` (thousands separators allowed), with the qualifier just before it and
    a range or ``+`` just after it: ``"120"``, ``"about 120 people"`` -> (120, 120); ``"11-50"``,
    ``"between 11 and 50"`` -> (11, 50); ``"less than 10"``, ``"under 10"`` -> (0, 9); ``"up to 10"``
    -> (0, 10); ``"over 2,000"``, ``"more than 2000"`` -> (2001, inf); ``"2,000+"``, ``"at least 2000"``
    -> (2000, inf). Approximate words ("about", "nearly", "~") leave the number as it is: how far off
    it may be is the scorer's tolerance, not the reader's.

    Args:
        value: a predicted ``employee_count`` (the shapes ``agents.fact_shapes`` accepts, words around
            them allowed).

    Returns:
        ``(low, high)`` with ``high`` possibly ``math.inf``; None when ``value`` holds no number.
    """
    match = _COUNT_VALUE.search(value)
    if match is None:
        return None
    low = float(_THOUSANDS.sub("", match["low"]))
    if match["high"] is not None:
        high = float(_THOUSANDS.sub("", match["high"]))
        return (min(low, high), max(low, high))
    kind = _COUNT_QUALIFIERS.get((match["qualifier"] or "").lower(), "")
    if match["plus"] or kind == "ge":
        return (low, math.inf)
    return {"lt": (0.0, low - 1), "le": (0.0, low), "gt": (low + 1, math.inf)}.get(kind, (low, low))


def text_tokens(value: str) -> list[str]:
    """Lower-cased word tokens of ``value`` without punctuation and ``STOP_WORDS``."""
    return [t for t in _TOKEN.findall(value.lower()) if t not in STOP_WORDS]


def token_f1(predicted: str, gold: str) -> float:
    """SQuAD-style token F1 between two strings (bags of ``text_tokens``).

    Args:
        predicted: predicted text.
        gold: reference text.

    Returns:
        F1 in [0, 1]; 1.0 when both have no tokens and are equal after case folding, else 0.0 when
        either has no tokens.
    """
    pred_tokens, gold_tokens = text_tokens(predicted), text_tokens(gold)
    if not pred_tokens or not gold_tokens:
        return 1.0 if not pred_tokens and not gold_tokens and predicted.casefold() == gold.casefold() else 0.0
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _city(value: str) -> str:
    return " ".join(value.split(",", 1)[0].casefold().split())


def value_matches(field: str, predicted: str, gold: str, *, employee_tolerance: float = 0.0,
                  text_threshold: float = 0.5) -> bool:
    """Whether ``predicted`` counts as a correct value of ``field`` given ``gold`` (rules: module docstring).

    Args:
        field: a profile field name (``founded_year`` and ``employee_count`` are numeric, ``location``
            is compared by city, anything else as text).
        predicted: predicted value.
        gold: gold value.
        employee_tolerance: how far outside the predicted ``count_range`` the gold ``employee_count`` may lie,
            as a fraction of the gold count (0.0 = exact).
        text_threshold: minimum token F1 for text fields.

    Returns:
        True when the values match; False when either is empty or blank.
    """
    predicted, gold = predicted.strip(), gold.strip()
    if not predicted or not gold:
        return False
    if field == "employee_count":
        bounds, gold_count = count_range(predicted), parse_int(gold)
        if bounds is None or gold_count is None:
            return False
        outside = max(bounds[0] - gold_count, gold_count - bounds[1], 0)
        return outside <= employee_tolerance * abs(gold_count)
    if field == "founded_year":
        pred_int, gold_int = parse_int(predicted), parse_int(gold)
        return pred_int is not None and pred_int == gold_int
    if field == "location":
        pred_city, gold_city = _city(predicted), _city(gold)
        return bool(pred_city and gold_city) and (pred_city in gold_city or gold_city in pred_city)
    return token_f1(predicted, gold) >= text_threshold


class FieldScore(BaseModel):
    """Counts for one field (or summed over fields) and the scores derived from them."""

    tp: int = 0
    n_pred: int = 0
    n_gold: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def precision(self) -> float:
        """tp / n_pred (0.0 when nothing was predicted)."""
        return self.tp / self.n_pred if self.n_pred else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def recall(self) -> float:
        """tp / n_gold (0.0 when there is no gold)."""
        return self.tp / self.n_gold if self.n_gold else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (0.0 when both are 0)."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


class Mismatch(BaseModel):
    """One (company, field) that did not score a true positive.

    ``kind`` is ``"wrong"`` (both non-empty, no match), ``"missing"`` (gold but no prediction) or
    ``"spurious"`` (prediction but no gold).
    """

    company: str
    field: str
    kind: str
    predicted: str = ""
    gold: str = ""


class ExtractionScores(BaseModel):
    """Result of ``score_profiles``.

    Attributes:
        fields: the fields scored, in order.
        per_field: FieldScore per field.
        micro: counts summed over fields (micro average).
        macro_f1: mean of the per-field F1 over fields with any prediction or gold.
        n_companies: companies scored (union of predicted and gold keys, or gold keys only when
            ``ignore_missing_gold``).
        mismatches: every non-true-positive, sorted by company then field order.
    """

    fields: list[str]
    per_field: dict[str, FieldScore]
    micro: FieldScore
    macro_f1: float
    n_companies: int
    mismatches: list[Mismatch] = Field(default_factory=list)


def score_profiles(
    predicted: Mapping[str, Mapping[str, str]],
    gold: Mapping[str, Mapping[str, str]],
    fields: Sequence[str] = FACT_FIELDS,
    *,
    employee_tolerance: float = 0.0,
    text_threshold: float = 0.5,
    ignore_missing_gold: bool = False,
) -> ExtractionScores:
    """Score predicted profiles against gold, field by field (rules: module docstring).

    Args:
        predicted: ``{company name: {field: value}}``; absent fields and empty strings are "no prediction".
        gold: ``{company name: {field: value}}``; absent or empty means "no gold value".
        fields: fields to score, e.g. ``FACT_FIELDS`` or ``("location", "employee_count", "founded_year")``.
        employee_tolerance: allowed relative error of ``employee_count``, >= 0 (0.0 = exact).
        text_threshold: minimum token F1 for text fields, in (0, 1].
        ignore_missing_gold: skip (company, field) pairs whose gold is empty instead of counting their
            predictions as false positives.

    Returns:
        ExtractionScores with per-field and micro-averaged counts and scores.

    Raises:
        ValueError: ``fields`` is empty or repeats a field, ``employee_tolerance`` < 0 or
            ``text_threshold`` outside (0, 1].
        TypeError: a value is not a string (the message names company and field).

    Example:
        >>> s = score_profiles({"A": {"founded_year": "1998"}}, {"A": {"founded_year": "1998"}},
        ...                    fields=["founded_year"])
        >>> (s.micro.tp, s.micro.precision, s.micro.recall)
        (1, 1.0, 1.0)
    """
    fields = list(fields)
    if not fields or len(set(fields)) != len(fields):
        raise ValueError(f"fields {fields!r} must be a non-empty list of distinct field names")
    if employee_tolerance < 0:
        raise ValueError(f"employee_tolerance={employee_tolerance} must be >= 0 "
                         "(a relative error, 0.0 = exact)")
    if not 0 < text_threshold <= 1:
        raise ValueError(f"text_threshold={text_threshold} must be in (0, 1]")

    companies = sorted(gold) if ignore_missing_gold else sorted(set(predicted) | set(gold))
    per_field = {f: FieldScore() for f in fields}
    mismatches: list[Mismatch] = []
    for company in companies:
        pred_row, gold_row = predicted.get(company, {}), gold.get(company, {})
        for field_name in fields:
            pred_value = _value(pred_row, company, field_name, "predicted")
            gold_value = _value(gold_row, company, field_name, "gold")
            if not gold_value and ignore_missing_gold:
                continue
            score = per_field[field_name]
            score.n_pred += bool(pred_value)
            score.n_gold += bool(gold_value)
            if pred_value and gold_value and value_matches(
                field_name, pred_value, gold_value, employee_tolerance=employee_tolerance,
                text_threshold=text_threshold,
            ):
                score.tp += 1
                continue
            if pred_value or gold_value:
                kind = "wrong" if pred_value and gold_value else ("missing" if gold_value else "spurious")
                mismatches.append(Mismatch(company=company, field=field_name, kind=kind,
                                           predicted=pred_value, gold=gold_value))

    micro = FieldScore(tp=sum(s.tp for s in per_field.values()),
                       n_pred=sum(s.n_pred for s in per_field.values()),
                       n_gold=sum(s.n_gold for s in per_field.values()))
    scored = [s.f1 for s in per_field.values() if s.n_pred or s.n_gold]
    macro_f1 = sum(scored) / len(scored) if scored else 0.0
    return ExtractionScores(fields=fields, per_field=per_field, micro=micro, macro_f1=macro_f1,
                            n_companies=len(companies), mismatches=mismatches)


def _value(row: Mapping[str, str], company: str, field_name: str, side: str) -> str:
    value = row.get(field_name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{side} value of {company!r}.{field_name} is {type(value).__name__} {value!r}; "
                        "give strings (e.g. str(year))")
    return value.strip()


def profile_values(profile: object, fields: Sequence[str] = FACT_FIELDS) -> dict[str, str]:
    """Turn an ``agents.schemas.Profile`` into ``{field: value}`` for ``score_profiles``.

    The first fact of each field wins (``Profile.fact``); fields without a fact are left out.

    Args:
        profile: an ``agents.schemas.Profile`` (or anything with a ``facts`` list of objects having
            ``field`` and ``value``).
        fields: fields to keep.

    Returns:
        ``{field: value}``.

    Raises:
        TypeError: ``profile`` has no ``facts`` list.
    """
    facts = getattr(profile, "facts", None)
    if not isinstance(facts, list):
        raise TypeError(f"profile_values: {type(profile).__name__} has no 'facts' list; pass a Profile")
    wanted = set(fields)
    out: dict[str, str] = {}
    for fact in facts:
        name, value = getattr(fact, "field", ""), getattr(fact, "value", "")
        if name in wanted and name not in out and value:
            out[name] = value
    return out
