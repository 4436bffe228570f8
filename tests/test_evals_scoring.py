"""Extraction scores against hand-computed examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.schemas import FACT_FIELDS, Fact, Profile
from evals.scoring import (
    ExtractionScores,
    parse_int,
    profile_values,
    score_profiles,
    text_tokens,
    token_f1,
    value_matches,
)
from evals.world import generate_world, load_gold

FIELDS = ("founded_year", "employee_count", "location", "industry")
GOLD = {
    "Alpha": {"founded_year": "1998", "employee_count": "120", "location": "Austin, Texas",
              "industry": "logistics software"},
    "Beta": {"founded_year": "2005", "employee_count": "45", "location": "Lyon, France",
             "industry": "fintech"},
}
PREDICTED = {
    # all four correct under the normalisers
    "Alpha": {"founded_year": "Founded in 1998", "employee_count": "about 120 people", "location": "austin",
              "industry": "software for logistics"},
    # year wrong, employees missing, location wrong, industry right (token F1 2/3)
    "Beta": {"founded_year": "2006", "employee_count": "", "location": "Paris, France",
             "industry": "fintech platform"},
    # a company gold does not know: one spurious prediction
    "Gamma": {"industry": "edtech"},
}


def test_hand_computed_scores_with_wrong_missing_and_spurious() -> None:
    s = score_profiles(PREDICTED, GOLD, fields=FIELDS)
    assert isinstance(s, ExtractionScores) and s.n_companies == 3
    counts = {f: (v.tp, v.n_pred, v.n_gold) for f, v in s.per_field.items()}
    assert counts == {"founded_year": (1, 2, 2), "employee_count": (1, 1, 2), "location": (1, 2, 2),
                      "industry": (2, 3, 2)}
    year, staff = s.per_field["founded_year"], s.per_field["employee_count"]
    industry = s.per_field["industry"]
    assert (year.precision, year.recall, year.f1) == (0.5, 0.5, 0.5)
    assert (staff.precision, staff.recall) == (1.0, 0.5) and staff.f1 == pytest.approx(2 / 3)
    assert industry.precision == pytest.approx(2 / 3) and industry.recall == 1.0
    assert industry.f1 == pytest.approx(0.8)
    assert (s.micro.tp, s.micro.n_pred, s.micro.n_gold) == (5, 8, 8)
    assert s.micro.precision == s.micro.recall == s.micro.f1 == pytest.approx(0.625)
    assert s.macro_f1 == pytest.approx((0.5 + 2 / 3 + 0.5 + 0.8) / 4)
    assert [(m.company, m.field, m.kind) for m in s.mismatches] == [
        ("Beta", "founded_year", "wrong"), ("Beta", "employee_count", "missing"),
        ("Beta", "location", "wrong"), ("Gamma", "industry", "spurious")]
    dumped = s.model_dump()
    assert dumped["micro"]["f1"] == pytest.approx(0.625)


def test_ignore_missing_gold_skips_unverifiable_predictions() -> None:
    gold = {**GOLD, "Beta": {**GOLD["Beta"], "location": ""}}
    s = score_profiles(PREDICTED, gold, fields=FIELDS, ignore_missing_gold=True)
    assert s.n_companies == 2  # Gamma has no gold
    location = s.per_field["location"]
    assert (location.tp, location.n_pred, location.n_gold) == (1, 1, 1)
    assert (s.micro.tp, s.micro.n_pred, s.micro.n_gold) == (5, 6, 7)
    plain = score_profiles(PREDICTED, gold, fields=FIELDS)
    assert (plain.micro.tp, plain.micro.n_pred, plain.micro.n_gold) == (5, 8, 7)


def test_empty_inputs_give_zero_scores_not_errors() -> None:
    s = score_profiles({}, {}, fields=["location"])
    assert (s.micro.precision, s.micro.recall, s.micro.f1, s.macro_f1) == (0.0, 0.0, 0.0, 0.0)
    only_gold = score_profiles({}, {"A": {"location": "Leeds, United Kingdom"}}, fields=["location"])
    assert (only_gold.micro.recall, only_gold.micro.n_gold) == (0.0, 1)


def test_integer_fields() -> None:
    assert parse_int("1,200") == 1200
    assert parse_int("est. 1998") == 1998
    assert parse_int("a team of 1 200 people") == 1200
    assert parse_int("several") is None
    assert value_matches("founded_year", "1998", "Founded: 1998")
    assert not value_matches("founded_year", "1999", "1998")
    assert not value_matches("founded_year", "nineteen ninety-eight", "1998")
    assert value_matches("employee_count", "1,200", "1200")
    assert not value_matches("employee_count", "130", "120")
    assert value_matches("employee_count", "130", "120", employee_tolerance=0.1)
    assert not value_matches("employee_count", "130", "120", employee_tolerance=0.05)


def test_location_matches_by_city() -> None:
    assert value_matches("location", "San Francisco, CA", "San Francisco")
    assert value_matches("location", "SAN  francisco", "San Francisco, California")
    assert value_matches("location", "South San Francisco", "San Francisco")
    assert not value_matches("location", "Oakland, California", "San Francisco, California")
    assert not value_matches("location", ", France", "Lyon, France")


def test_text_fields_by_token_f1() -> None:
    assert text_tokens("The regional banks, and credit-unions!") == ["regional", "banks", "credit", "unions"]
    assert token_f1("the regional banks", "regional banks and credit unions") == pytest.approx(2 / 3)
    # 1 common token of 3 and 4: P=1/3, R=1/4, F1=2/7
    f1 = token_f1("manual invoice reconciliation", "invoice fraud detection and prevention")
    assert f1 == pytest.approx(2 / 7)
    assert not value_matches("pain_point", "manual invoice reconciliation", "invoice fraud detection")
    assert value_matches("recent_event", "Raised a $12 million Series A.", "raised a $12 million Series A")
    assert value_matches("customer_segment", "regional banks", "regional banks and credit unions",
                         text_threshold=0.6)
    assert not value_matches("customer_segment", "regional banks", "regional banks and credit unions",
                             text_threshold=0.7)
    assert not value_matches("industry", "", "fintech") and not value_matches("industry", "fintech", "  ")


def test_bad_arguments_name_the_input() -> None:
    with pytest.raises(ValueError, match="fields"):
        score_profiles({}, {}, fields=[])
    with pytest.raises(ValueError, match="fields"):
        score_profiles({}, {}, fields=["location", "location"])
    with pytest.raises(ValueError, match="employee_tolerance"):
        score_profiles({}, {}, employee_tolerance=-0.1)
    with pytest.raises(ValueError, match="text_threshold"):
        score_profiles({}, {}, text_threshold=0)
    with pytest.raises(TypeError, match="'Alpha'.founded_year"):
        score_profiles({"Alpha": {"founded_year": 1998}}, GOLD, fields=FIELDS)  # type: ignore[dict-item]


def test_profile_values_takes_the_first_fact_per_field() -> None:
    profile = Profile(company="Alpha", facts=[
        Fact(field="location", value="Austin, Texas", evidence="HQ: Austin, Texas", source_url="https://a/"),
        Fact(field="location", value="Dallas", evidence="Dallas", source_url="https://a/x"),
        Fact(field="founded_year", value="1998", evidence="Founded: 1998", source_url="https://a/"),
        Fact(field="mood", value="great", evidence="great", source_url="https://a/"),
    ])
    assert profile_values(profile) == {"location": "Austin, Texas", "founded_year": "1998"}
    with pytest.raises(TypeError, match="Profile"):
        profile_values({"facts": "nope"})


def test_demo_world_gold_scores_perfectly_against_itself_and_not_against_distractors(tmp_path: Path) -> None:
    generate_world(tmp_path / "w", n_companies=30, seed=3)
    gold = load_gold(tmp_path / "w")
    facts = {name: g.facts for name, g in gold.items()}
    perfect = score_profiles(facts, facts)
    assert perfect.micro.f1 == 1.0 and perfect.micro.n_gold == len(gold) * len(FACT_FIELDS)
    # Answering with the near-namesake's facts must score (almost) nothing.
    swapped = {g.distractor_of: g.facts for g in gold.values() if g.distractor_of}
    confused = score_profiles(swapped, {name: facts[name] for name in swapped})
    assert confused.micro.precision < 0.3
