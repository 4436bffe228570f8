"""Emails a sales rep would send: relevance, grammar of inserted facts, craft, variety and bad input.

The heuristic teacher writes every email here (through the writer's real prompt), the renderer fills it
and the rubric (``evals.rubric``) judges it, so a test fails when any of the three regresses.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path

import pytest
import tomli_w
from pydantic import ValidationError

from agents.heuristic import HeuristicChatModel
from agents.prompts import WRITER_SYSTEM_PROMPT
from agents.prose import (
    content_stems,
    grammatical_number,
    lower_first,
    prose_problem,
    prose_value,
    relevant_problem,
    stem,
)
from agents.schemas import EmailDraft, Fact, Offer, Profile, ProspectInfo, RenderedEmail
from agents.validation import validate_email
from agents.writer import build_writer_messages, render, writable_facts
from evals.rubric import EMAIL_CHECKS, RubricResult, campaign_variety, score_campaign, score_email
from graphs.inputs import InputError, load_offer

SIGNALS = Offer(
    sender_name="Ilse Varnum", sender_title="Account Executive", sender_company="Tallyfold",
    product="Tallyfold Signals",
    value_proposition="Tallyfold Signals spots the accounts that are ready to buy, so your team spends its week "
                      "on conversations instead of spreadsheets.",
    call_to_action="Would a 15-minute call next week be worth it?",
    problems_solved=["finding the accounts that are ready to buy", "hitting pipeline targets after raising a round",
                     "filling the pipeline for a newly opened office", "supplier delays in the sales pipeline",
                     "rising return rates after a sale"],
    proof_point="Brightline's sales team booked 30% more meetings in its first quarter with it.",
    cta_style="meeting",
)
#: The issue's example: product and company share a name, the value proposition is a verb phrase.
LEDGERLINE = Offer(
    sender_name="Dana Whitfield", sender_title="Account Executive", sender_company="Ledgerline", product="Ledgerline",
    value_proposition="cuts month-end close time by automating reconciliation",
    call_to_action="Would a 20-minute call next week be useful?",
)


def fact(field: str, value: str) -> Fact:
    return Fact(field=field, value=value, evidence=value, source_url="https://acme.example/")


def prospect(i: int = 0, title: str = "VP Sales") -> ProspectInfo:
    return ProspectInfo(first_name=f"Dana{i}", last_name="Kim", title=title, email=f"dana{i}@acme{i}.example",
                        company=f"Acme{i} Freight", website=f"https://acme{i}.example")


def write(offer: Offer, person: ProspectInfo, profile: Profile) -> tuple[EmailDraft, RenderedEmail]:
    answer = HeuristicChatModel().invoke(build_writer_messages(offer, person, profile))
    draft = EmailDraft.model_validate_json(answer.text)
    return draft, render(draft, person, profile, offer)


_BROKEN = re.compile(r"[.!?]\s+[a-z]|\.\.|\s[,.;:]|\s{2,}(?!\n)|\{\{|\}\}|\b(\w+) \1\b")


def assert_well_formed(offer: Offer, person: ProspectInfo, profile: Profile) -> tuple[str, RubricResult]:
    """Write, render, validate and score one email; every email check must pass and no sentence be broken."""
    draft, rendered = write(offer, person, profile)
    assert validate_email(draft, rendered, person, profile, offer).ok
    result = score_email(draft, rendered, person, profile, offer)
    assert result.checks == dict.fromkeys(EMAIL_CHECKS, True), (result.problems, rendered.body)
    text = "\n".join(line for line in rendered.body.splitlines() if line != offer.opt_out_line)
    assert not _BROKEN.search(re.sub(r"\s*\n\s*", " ", text)), rendered.body
    return f"{rendered.subject}\n{rendered.body}", result


# ------------------------------------------------------------------------------------------ the cases


def test_a_capitalised_description_is_not_used_as_news() -> None:
    profile = Profile(company="Pledge Health", facts=[fact("recent_event", "Secured consumer lending in India"),
                                                      fact("location", "Bengaluru, India")])
    person = prospect().model_copy(update={"company": "Pledge Health"})
    assert "fact.recent_event" not in writable_facts(person, profile, SIGNALS)
    text, _ = assert_well_formed(SIGNALS, person, profile)
    assert "Secured consumer lending" not in text and "Bengaluru, India" in text


@pytest.mark.parametrize("pain", ["supplier delays", "rising return rates", "phishing attacks on staff"])
def test_plural_pain_points_take_plural_verbs(pain: str) -> None:
    offer = SIGNALS.model_copy(update={"problems_solved": [*SIGNALS.problems_solved, "phishing attacks on staff"]})
    for i in range(12):  # several templates
        text, _ = assert_well_formed(offer, prospect(i), Profile(company="X", facts=[fact("pain_point", pain)]))
        assert f"{pain} is" not in text and f"{pain} looks" not in text and f"{pain} does" not in text
    assert grammatical_number(pain) == "plural"
    assert grammatical_number("manual invoice reconciliation") == "singular"
    assert grammatical_number("finding the accounts that are ready to buy") == "singular"
    assert grammatical_number("hitting pipeline targets after raising a round") == "singular"


@pytest.mark.parametrize("industry", ["api", "latin-america", "developer-tools", "b2b, saas, fintech"])
def test_tag_slugs_and_tag_lists_are_never_prose(industry: str) -> None:
    profile = Profile(company="X", facts=[fact("industry", industry), fact("founded_year", "2021")])
    assert prose_problem("industry", prose_value("industry", industry)) is not None
    assert list(writable_facts(prospect(), profile, SIGNALS)) == ["fact.founded_year"]
    text, _ = assert_well_formed(SIGNALS, prospect(), profile)
    assert industry not in text and "rare in" not in text


def test_a_verb_phrase_value_proposition_follows_the_product_and_the_product_is_named_once() -> None:
    profile = Profile(company="X", facts=[fact("location", "Austin, Texas"), fact("employee_count", "120")])
    texts = [assert_well_formed(LEDGERLINE, prospect(i), profile)[0] for i in range(16)]
    joined = "\n".join(texts)
    assert "comes in. cuts" not in joined and "Ledgerline at Ledgerline" not in joined
    assert "Ledgerline cuts month-end close time" in joined or "it cuts month-end close time" in joined


def test_openers_subjects_and_role_lines_follow_the_craft_rules() -> None:
    profile = Profile(company="X", facts=[fact("recent_event", "raised a $12 million Series A"),
                                          fact("location", "Lyon, France")])
    for i in range(20):
        text, _ = assert_well_formed(SIGNALS, prospect(i), profile)
        subject, body = text.split("\n", 1)
        assert not body.startswith("Dear") and "lands on your desk" not in body
        assert f"Dana{i}" not in subject and "Tallyfold" not in subject


# ------------------------------------------------------------------------------------------------ relevance


def test_pain_points_and_events_are_used_only_when_the_offer_solves_them() -> None:
    irrelevant = Profile(company="X", facts=[fact("pain_point", "on-call burnout"),
                                             fact("recent_event", "hired a new Chief Technology Officer"),
                                             fact("location", "Cork, Ireland")])
    assert list(writable_facts(prospect(), irrelevant, SIGNALS)) == ["fact.location"]
    for i in range(8):
        text, _ = assert_well_formed(SIGNALS, prospect(i), irrelevant)
        assert "burnout" not in text and "Chief Technology" not in text
    relevant = Profile(company="X", facts=[fact("recent_event", "opened an office in Berlin"),
                                           fact("location", "Cork, Ireland")])
    for i in range(8):
        draft, rendered = write(SIGNALS, prospect(i), relevant)
        assert "{{fact.recent_event}}" in draft.body  # a relevant event is the observation
        assert "filling the pipeline for a newly opened office" in rendered.body  # tied to its problem


def test_only_irrelevant_facts_are_still_offered_and_the_rubric_reports_them() -> None:
    profile = Profile(company="X", facts=[fact("pain_point", "on-call burnout")])
    assert list(writable_facts(prospect(), profile, SIGNALS)) == ["fact.pain_point"]
    draft, rendered = write(SIGNALS, prospect(), profile)
    assert validate_email(draft, rendered, prospect(), profile, SIGNALS).ok
    assert not score_email(draft, rendered, prospect(), profile, SIGNALS).checks["fact_relevant"]


def test_relevance_rule_stems_content_words() -> None:
    assert stem("expanded") == stem("expanding") == "expand"
    assert stem("offices") == stem("office") and stem("officer") != stem("office")
    assert stem("planned") == stem("planning") == stem("plan") and stem("marketing") != stem("market")
    assert content_stems("a new team of the company") == set()  # stopwords only
    problems = ["expanding into a market without local contacts", "hiring revenue leaders"]
    assert relevant_problem("expanded into Germany", problems, "") == (True, problems[0])
    assert relevant_problem("hired a new Chief Revenue Officer", problems, "")[1] == problems[1]
    assert relevant_problem("flaky test suites", problems, "") == (False, None)
    # without problems, the value proposition decides (and names no problem)
    assert relevant_problem("manual load planning", [], "Dispatchers plan routes in minutes.") == (True, None)


# ------------------------------------------------------------------------------------------------ bad input


def test_empty_offer_values_are_refused_with_the_field_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="product is empty"):
        Offer.model_validate({**SIGNALS.model_dump(), "product": "   "})
    path = tmp_path / "offer.toml"
    path.write_text(tomli_w.dumps({**SIGNALS.model_dump(), "call_to_action": ""}), encoding="utf-8")
    with pytest.raises(InputError, match="call_to_action"):
        load_offer(path)


def test_optional_offer_fields_are_checked_and_old_offer_files_still_load(tmp_path: Path) -> None:
    old = {"sender_name": "Sam", "sender_company": "W", "product": "Widget", "value_proposition": "V is good.",
           "call_to_action": "Call?"}
    path = tmp_path / "offer.toml"
    path.write_text(tomli_w.dumps(old), encoding="utf-8")
    offer = load_offer(path)
    assert offer.problems_solved == [] and offer.proof_point == "" and offer.cta_style == ""
    for bad, match in ((["x" * 121], "too long"), (["a; b"], "holds ';'"), (["p"] * 13, "at most 12")):
        with pytest.raises(ValidationError, match=match):
            Offer.model_validate({**old, "problems_solved": bad})
    with pytest.raises(ValidationError, match="proof_point is 301 characters"):
        Offer.model_validate({**old, "proof_point": "y" * 301})
    with pytest.raises(ValidationError, match="cta_style"):
        Offer.model_validate({**old, "cta_style": "pushy"})
    assert Offer.model_validate({**old, "problems_solved": ["  a  b ", ""]}).problems_solved == ["a b"]


def test_a_very_long_value_proposition_still_gives_an_email_in_the_band() -> None:
    long_vp = ("Tallyfold Signals reads every public signal about your accounts, " + "scores them, " * 40
               + "and tells your team whom to call.")
    offer = SIGNALS.model_copy(update={"value_proposition": long_vp})
    profile = Profile(company="X", facts=[fact("location", "Porto, Portugal")])
    for i in range(8):
        text, result = assert_well_formed(offer, prospect(i), profile)
        assert "scores them, scores them" not in text


@pytest.mark.parametrize("value_proposition", [
    "cuts month-end close time by automating reconciliation",
    "Faster month-end close for lean finance teams",
    "We help finance teams close the books in two days.",
    "It matches invoices to payments",
    "Finance teams close the books in two days instead of ten.",
])
def test_value_propositions_in_any_form_read_as_sentences(value_proposition: str) -> None:
    offer = LEDGERLINE.model_copy(update={"value_proposition": value_proposition})
    profile = Profile(company="X", facts=[fact("employee_count", "less than 10")])
    for i in range(8):
        assert_well_formed(offer, prospect(i), profile)


def test_odd_casing_and_trailing_punctuation_in_facts_are_written_as_prose() -> None:
    profile = Profile(company="X", facts=[fact("pain_point", "Supplier Delays."),
                                          fact("recent_event", "raised a $12 million Series A."),
                                          fact("location", "Washington, D.C."),
                                          fact("customer_segment", "REGIONAL BANKS;")])
    assert prose_value("pain_point", "Supplier Delays.") == "supplier delays"
    assert prose_value("recent_event", "raised a $12 million Series A.") == "raised a $12 million Series A"
    assert prose_value("location", "Washington, D.C.") == "Washington, D.C."
    assert prose_value("customer_segment", "REGIONAL BANKS;") == "regional banks"
    assert prose_value("customer_segment", "B2B marketing teams") == "B2B marketing teams"
    assert lower_first("Manual reconciliation") == "manual reconciliation" and lower_first("Northwind") == "Northwind"
    texts = [assert_well_formed(SIGNALS, prospect(i), profile)[0] for i in range(12)]
    assert "Supplier Delays" not in "".join(texts) and "Series A.." not in "".join(texts)
    draft = EmailDraft(subject="Hi", body="Teams in {{fact.location}}. Hello")
    assert render(draft, prospect(), profile, SIGNALS).body == "Teams in Washington, D.C. Hello"


def test_a_prospect_without_a_title_gets_no_role_line() -> None:
    profile = Profile(company="X", facts=[fact("recent_event", "opened an office in Toronto")])
    for i in range(10):
        text, _ = assert_well_formed(SIGNALS, prospect(i, title=""), profile)
        assert "As ," not in text and "as ." not in text and "(unknown)" not in text


def test_no_fact_emails_are_well_formed_too() -> None:
    draft, rendered = write(SIGNALS, prospect(), Profile(company="X"))
    assert "{{fact." not in draft.body
    assert validate_email(draft, rendered, prospect(), Profile(company="X"), SIGNALS, require_fact=False).ok


# ------------------------------------------------------------------------------------------------ variety


FACTS = {
    "recent_event": ["raised a $12 million Series A", "opened an office in Berlin", "expanded into Japan",
                     "hired a new Chief Technology Officer"],
    "pain_point": ["supplier delays", "on-call burnout", "rising return rates"],
    "customer_segment": ["regional banks", "independent clinics"],
    "location": ["Lyon, France", "Austin, Texas"],
    "industry": ["fintech", "logistics software"],
    "employee_count": ["120", "less than 10"],
    "founded_year": ["2012", "2019"],
}


def test_a_campaign_repeats_no_sentence_in_more_than_a_fifth_of_its_emails() -> None:
    profiles = []
    for i, values in enumerate(itertools.islice(itertools.product(*FACTS.values()), 0, None, 3)):
        chosen = [fact(f, v) for k, (f, v) in enumerate(zip(FACTS, values, strict=True)) if (i + k) % 3]
        profiles.append(Profile(company="X", facts=chosen))
    results = []
    for i, profile in enumerate(profiles[:100]):
        person = prospect(i, title=["CFO", "Head of Sales", ""][i % 3])
        draft, rendered = write(SIGNALS, person, profile)
        results.append(score_email(draft, rendered, person, profile, SIGNALS))
    variety = campaign_variety(results)
    assert variety.emails == 100 and variety.top_share <= 0.2, variety.top_sentence
    scored = score_campaign(results)
    assert all(r.checks["sentence_variety"] for r in scored)
    assert sum(r.checks["ngram_variety"] for r in scored) >= 90


# ------------------------------------------------------------------------------------------------ prompt


def test_the_llm_writer_prompt_states_the_craft_rules() -> None:
    for rule in ("not yourself", "does not start \nwith I, We or My", "one problem the offer solves",
                 "proof point", "exactly one call to action", "50 to 90 words", "2 to 5 plain words",
                 "Name the product once", "not \"Dear\"", "make the verb agree with a plural"):
        assert " ".join(rule.split()) in " ".join(WRITER_SYSTEM_PROMPT.split()), rule
    user = build_writer_messages(SIGNALS, prospect(), Profile(company="X"))[1].text
    assert "Problems solved: finding the accounts that are ready to buy; hitting pipeline" in user
    assert "Proof point: Brightline's sales team booked 30% more meetings" in user
    assert "Call to action style: meeting" in user


def test_the_demo_offer_has_the_optional_fields() -> None:
    from evals.world import _offer_toml

    offer = Offer.model_validate(tomllib.loads(_offer_toml()))
    assert len(offer.problems_solved) >= 5 and offer.proof_point and offer.cta_style == "meeting"
