"""The email rubric, the pairwise judges and the cost figures."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from agents.schemas import EmailDraft, Fact, Offer, Profile, ProspectInfo, RenderedEmail
from agents.writer import render
from evals.costs import cost_figures, instance_price_for, percentile
from evals.judge import JudgeItem, LLMJudge, RubricJudge, combine_orders, judge_pairs
from evals.rubric import (
    CAMPAIGN_CHECKS,
    EMAIL_CHECKS,
    RUBRIC_CHECKS,
    RubricResult,
    campaign_variety,
    free_sentences,
    score_campaign,
    score_email,
    summarize_rubric,
    unsupported_names,
)
from miniatures.pricing import Price

OFFER = Offer(sender_name="Ilse Varnum", sender_company="Tallyfold", product="Tallyfold Signals",
              value_proposition="spots the accounts that are ready to buy",
              call_to_action="Would a 15-minute call next week be worth it?",
              problems_solved=["finding the accounts that are ready to buy", "hitting targets after raising a round"],
              proof_point="Brightline's team booked 30% more meetings in a quarter.")
PROSPECT = ProspectInfo(first_name="Yutan", last_name="Caldeez", title="VP of Engineering",
                        email="yutan@amberhollow.example", company="Amberhollow Data",
                        website="https://www.amberhollow.example/")
PROFILE = Profile(company="Amberhollow Data", facts=[
    Fact(field="location", value="Cork, Ireland", evidence="We are based in Cork, Ireland.",
         source_url="https://www.amberhollow.example/about"),
    Fact(field="employee_count", value="120", evidence="Our 120 people build tools.",
         source_url="https://www.amberhollow.example/about"),
])
BODY = (
    "Hello {{first_name}},\n\n{{company}} is based in {{fact.location}} and has grown to "
    "{{fact.employee_count}} people. Teams at that stage often spend their week on spreadsheets instead of "
    "conversations. {{product}} spots the accounts that are ready to buy, so your team can spend its time "
    "where it matters most. Brightline's team booked 30% more meetings in a quarter.\n\n{cta}\n\nBest,\n"
    "{{sender_name}}\n{{sender_company}}\n\n{opt_out}"
)


def _email(body: str = BODY, subject: str = "An idea for {{company}}") -> tuple[EmailDraft, RenderedEmail]:
    draft = EmailDraft(subject=subject, body=body.replace("{cta}", OFFER.call_to_action)
                       .replace("{opt_out}", OFFER.opt_out_line))
    return draft, render(draft, PROSPECT, PROFILE, OFFER)


def _score(draft: EmailDraft, rendered: RenderedEmail, profile: Profile = PROFILE, offer: Offer = OFFER
           ) -> RubricResult:
    return score_email(draft, rendered, PROSPECT, profile, offer)


def _with_body(r: RenderedEmail, old: str, new: str) -> RenderedEmail:
    assert old in r.body
    return RenderedEmail(subject=r.subject, body=r.body.replace(old, new))


LONG = " ".join(["This sentence only adds words to the body so that it runs past the band."] * 3)


def test_a_good_email_passes_every_check() -> None:
    result = _score(*_email())
    assert result.checks == dict.fromkeys(EMAIL_CHECKS, True), result.problems
    assert result.ok and result.passed == len(EMAIL_CHECKS) and result.facts_used == 2
    (scored,) = score_campaign([result])
    assert scored.checks == dict.fromkeys(RUBRIC_CHECKS, True) and list(scored.checks) == list(RUBRIC_CHECKS)


@pytest.mark.parametrize(
    ("edit", "failed"),
    [
        (lambda d, r: (EmailDraft(subject=d.subject, body=d.body.replace("{{fact.location}}", "Cork, Ireland")
                                  .replace("{{fact.employee_count}}", "120")), r), {"fact_used"}),
        (lambda d, r: (d, _with_body(r, "120 people", "450 people")), {"no_unsupported"}),
        (lambda d, r: (d, _with_body(r, "spreadsheets", "Salesforce")), {"no_unsupported"}),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body + "\nSee https://evil.example/x")),
         {"no_unsupported"}),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=f"Hi Yutan,\n{OFFER.call_to_action}\n"
                                                               f"{OFFER.opt_out_line}")),
         {"length", "word_band", "product_once", "proof_point"}),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body + "\n" + OFFER.call_to_action)), {"one_cta"}),
        (lambda d, r: (d, RenderedEmail(subject="x" * 90, body=r.body)), {"subject_length", "subject_form"}),
        (lambda d, r: (d, _with_body(r, "Best,", "Act now! Best,")), {"no_spam"}),
        (lambda d, r: (d, _with_body(r, "Best,", "Best {{nickname}},")), {"merge_tags"}),
        (lambda d, r: (d, _with_body(r, OFFER.opt_out_line, "")), {"opt_out"}),
        (lambda d, r: (d, _with_body(r, "Amberhollow Data is based", "I saw that Amberhollow Data is based")),
         {"opener"}),
        (lambda d, r: (d, _with_body(r, "Hello Yutan,", "Dear Yutan,")), {"opener"}),
        (lambda d, r: (d, RenderedEmail(subject="Tallyfold Signals for Amberhollow", body=r.body)), {"subject_form"}),
        (lambda d, r: (d, RenderedEmail(subject="Yutan, a quick idea", body=r.body)), {"subject_form"}),
        (lambda d, r: (d, RenderedEmail(subject="A quick idea for the whole team", body=r.body)), {"subject_form"}),
        (lambda d, r: (d, RenderedEmail(subject="Big news!", body=r.body)), {"subject_form"}),
        (lambda d, r: (d, RenderedEmail(subject="An IDEA for Amberhollow", body=r.body)),
         {"subject_form", "no_unsupported"}),
        (lambda d, r: (d, RenderedEmail(subject="Idea", body=r.body)), {"subject_form"}),
        (lambda d, r: (d, _with_body(r, "Brightline's", LONG + " Brightline's")), {"word_band"}),
        (lambda d, r: (d, _with_body(r, "Teams at that stage", "Tallyfold Signals users at that stage")),
         {"product_once"}),
        (lambda d, r: (d, _with_body(r, " Brightline's team booked 30% more meetings in a quarter.", "")),
         {"proof_point"}),
        (lambda d, r: (d, _with_body(r, "30%", "20%")), {"proof_point", "no_unsupported"}),
    ],
    ids=["no-fact-tag", "invented-number", "invented-name", "invented-url", "too-short", "two-ctas",
         "long-subject", "spam", "unresolved-tag", "no-opt-out", "opener-i", "opener-dear", "subject-product",
         "subject-first-name", "subject-seven-words", "subject-exclaims", "subject-shouts", "subject-one-word",
         "over-90-words", "product-twice", "no-proof", "proof-number-changed"],
)
def test_each_rule_fails_alone(edit, failed: set[str]) -> None:  # type: ignore[no-untyped-def]
    draft, rendered = edit(*_email())
    result = _score(draft, rendered)
    assert {c for c, ok in result.checks.items() if not ok} == failed, result.problems
    for check in failed:
        assert any(p.startswith(f"{check}:") for p in result.problems), result.problems


def test_an_offer_without_proof_point_passes_proof_point() -> None:
    offer = OFFER.model_copy(update={"proof_point": ""})
    draft, rendered = _email(BODY.replace(" Brightline's team booked 30% more meetings in a quarter.", ""))
    assert _score(draft, rendered, offer=offer).checks["proof_point"]


def test_fact_relevant_needs_a_pain_point_or_event_the_offer_solves() -> None:
    def scored(field: str, value: str) -> RubricResult:
        profile = PROFILE.model_copy(update={"facts": [*PROFILE.facts, Fact(
            field=field, value=value, evidence=value, source_url="https://www.amberhollow.example/")]})
        body = BODY.replace("Teams at that stage", f"With {{{{fact.{field}}}}} on the table, teams")
        draft = EmailDraft(subject="An idea for {{company}}", body=body.replace("{cta}", OFFER.call_to_action)
                           .replace("{opt_out}", OFFER.opt_out_line))
        return _score(draft, render(draft, PROSPECT, profile, OFFER), profile=profile)

    assert scored("pain_point", "finding accounts ready to buy").checks["fact_relevant"]
    assert scored("recent_event", "raised a $5 million seed round").checks["fact_relevant"]
    burnout = scored("pain_point", "on-call burnout")
    assert not burnout.checks["fact_relevant"]
    assert any("'on-call burnout'" in p for p in burnout.problems)
    assert scored("location", "Cork").checks["fact_relevant"]  # only pain points and events are gated


def test_free_sentences_leave_out_greeting_cta_opt_out_and_signature() -> None:
    draft, _ = _email()
    sentences = free_sentences(draft.body, OFFER)
    assert sentences[0] == "{{company}} is based in {{fact.location}} and has grown to {{fact.employee_count}} people"
    assert len(sentences) == 4
    assert not any("15-minute" in s or "no thanks" in s or "hello" in s or s == "best," for s in sentences)
    assert free_sentences("Hi {{ first_name }},\n\nOne. One! Two?\n\nBest,\nSam", OFFER) == ("one", "two")


def _campaign(bodies: list[str]) -> list[RubricResult]:
    results = []
    for body in bodies:
        draft = EmailDraft(subject="An idea for {{company}}", body=body)
        results.append(_score(draft, render(draft, PROSPECT, PROFILE, OFFER)))
    return results


def test_campaign_checks_flag_a_sentence_in_more_than_a_fifth_of_the_emails() -> None:
    shared = "Teams at that stage often spend their week on spreadsheets instead of conversations."

    def bodies(n: int, with_shared: int) -> list[str]:
        return [f"Hi {{{{first_name}}}},\n\nSentence number {i} is about {{{{fact.location}}}} and item {i}. "
                f"{shared if i < with_shared else f'Another line {i} here for {{{{company}}}}.'}\n\n"
                f"Best,\n{{{{sender_name}}}}" for i in range(n)]

    scored = score_campaign(_campaign(bodies(20, 5)))  # 5 of 20 emails: 25%
    assert [r.checks["sentence_variety"] for r in scored] == [False] * 5 + [True] * 15
    assert any(p.startswith("sentence_variety:") and "spreadsheets" in p for p in scored[0].problems)
    assert all(r.checks["sentence_variety"] for r in score_campaign(_campaign(bodies(20, 4))))  # 20%
    variety = campaign_variety(scored)
    assert variety.emails == 20 and variety.top_share == pytest.approx(0.25) and "spreadsheets" in variety.top_sentence
    assert 0.0 < variety.distinct_3 < 1.0
    assert all(r.checks["sentence_variety"] for r in score_campaign(_campaign(bodies(9, 9))))  # too few to tell

    same = score_campaign(_campaign([bodies(1, 1)[0]] * 10))
    assert not any(r.checks["ngram_variety"] for r in same)  # every trigram in every email
    assert all(r.checks["ngram_variety"] for r in score_campaign(_campaign(bodies(12, 0))))
    by_key = score_campaign({"a": _campaign(bodies(1, 0))[0], "b": RubricResult.missing()})
    assert by_key["a"].checks["sentence_variety"] and by_key["b"].checks == dict.fromkeys(RUBRIC_CHECKS, False)


def test_fact_tag_of_a_missing_fact_does_not_count() -> None:
    draft = EmailDraft(subject="Hi", body=BODY.replace("{{fact.location}}", "{{fact.recent_event}}"))
    result = score_email(draft, _email()[1], PROSPECT, PROFILE, OFFER)
    assert result.facts_used == 1  # only employee_count exists in the profile
    no_facts = EmailDraft(subject="Hi", body="Hello {{fact.recent_event}} and {{fact.pain_point}}")
    assert not score_email(no_facts, _email()[1], PROSPECT, PROFILE, OFFER).checks["fact_used"]


def test_unsupported_names_skips_sentence_starts_and_known_words() -> None:
    allowed = ["Amberhollow Data", "Tallyfold Signals", "Cork, Ireland", "Brightline's team"]
    text = "Hello there.\nAmberhollow Data in Cork uses Tallyfold. We met Oracle on Monday. Great! Ask Brightline's."
    assert unsupported_names(text, allowed) == ["Oracle"]
    assert unsupported_names("I think Globex's team met Initech", allowed) == ["Globex", "Initech"]


def test_summary_counts_missing_emails_as_failures() -> None:
    good = _score(*_email())
    summary = summarize_rubric([good, RubricResult.missing("research failed")])
    assert summary.n == 2 and summary.written == 1
    assert summary.pass_rates == dict.fromkeys(RUBRIC_CHECKS, 0.5)
    assert summary.all_pass_rate == 0.5 and summary.mean_passed == len(RUBRIC_CHECKS) / 2
    assert summary.variety.emails == 1 and summary.variety.top_share == 1.0
    assert summarize_rubric([]).all_pass_rate == 0.0
    assert set(CAMPAIGN_CHECKS) <= set(summarize_rubric({"a": good}).pass_rates)


# ------------------------------------------------------------------------------------------------ judges


def _item(key: str, rubric: RubricResult, written: bool = True) -> JudgeItem:
    prospect = PROSPECT.model_copy(update={"email": key})
    draft, rendered = _email()
    return JudgeItem(prospect, OFFER, PROFILE, rendered.subject if written else None,
                     rendered.body if written else None, rubric)


def _own(result: RubricResult, key: str) -> RubricResult:
    """``result`` with sentences of its own, so that campaign checks pass."""
    return replace(result, sentences=(f"sentence {key}",), trigrams=frozenset({("only", "in", key)}))


def test_combine_orders_is_conservative() -> None:
    assert combine_orders("B", "A") == "win"
    assert combine_orders("A", "B") == "loss"
    for inconsistent in (("A", "A"), ("B", "B"), ("tie", "A"), ("B", "tie"), ("tie", "tie")):
        assert combine_orders(*inconsistent) == "tie"


async def test_rubric_judge_counts_wins_losses_ties_and_missing_emails() -> None:
    good = _score(*_email())
    worse = RubricResult(checks={**good.checks, "opt_out": False}, facts_used=2)
    fewer_facts = RubricResult(checks=good.checks, facts_used=1)
    reference = {"a": _item("a", _own(good, "a")), "b": _item("b", _own(worse, "b")), "c": _item("c", _own(good, "c")),
                 "d": _item("d", _own(good, "d")), "e": _item("e", RubricResult.missing(), written=False)}
    candidate = {"a": _item("a", _own(worse, "a")), "b": _item("b", _own(good, "b")), "c": _item("c", _own(good, "c")),
                 "d": _item("d", RubricResult.missing(), written=False), "e": _item("e", _own(fewer_facts, "e"))}
    result = await judge_pairs(reference, candidate, RubricJudge(), reference_name="teacher")
    assert result.outcomes == {"a": "loss", "b": "win", "c": "tie", "d": "loss", "e": "win"}
    assert (result.wins, result.losses, result.ties, result.n, result.judge_calls) == (2, 2, 1, 5, 0)
    assert result.win_rate == pytest.approx(2.5 / 5)
    assert result.ci_low < 0.5 < result.ci_high


async def test_rubric_judge_counts_the_campaign_checks() -> None:
    good = _score(*_email())
    varied = {k: _item(k, _own(good, k)) for k in "abcdefghij"}
    same = {k: _item(k, good) for k in "abcdefghij"}  # every email repeats the same sentences
    result = await judge_pairs(varied, same, RubricJudge())
    assert (result.wins, result.losses) == (0, 10)


async def test_llm_judge_is_asked_both_orders_and_position_bias_cancels() -> None:
    good = _score(*_email())
    ref = {k: _item(k, good) for k in ("a", "b", "c")}
    cand = {k: _item(k, good) for k in ("a", "b", "c")}
    always_first = FakeListChatModel(responses=[json.dumps({"winner": "A", "reason": "first"})] * 6)
    biased = await judge_pairs(ref, cand, LLMJudge(always_first, "openai:judge"), concurrency=1)
    assert (biased.wins, biased.losses, biased.ties, biased.judge_calls) == (0, 0, 3, 6)

    # prefers the candidate in both orders: B when the reference is shown first, A when the candidate is
    prefers_candidate = FakeListChatModel(responses=['{"winner": "B"}', 'Sure: {"winner": "A", "reason": "x"}'] * 3)
    consistent = await judge_pairs(ref, cand, LLMJudge(prefers_candidate, "openai:judge"), concurrency=1)
    assert (consistent.wins, consistent.losses, consistent.ties) == (3, 0, 0)
    assert consistent.win_rate == 1.0 and consistent.ci_high == 1.0 and consistent.ci_low < 1.0


async def test_llm_judge_errors_are_counted_not_raised() -> None:
    good = _score(*_email())
    ref, cand = {"a": _item("a", good)}, {"a": _item("a", good)}
    babbling = FakeListChatModel(responses=["no idea", "still no idea"])
    result = await judge_pairs(ref, cand, LLMJudge(babbling, "openai:judge"))
    assert result.errors == 1 and result.n == 0 and result.win_rate == 0.0


# ------------------------------------------------------------------------------------------------ costs


def test_percentile_matches_statistics_quantiles_inclusive() -> None:
    data = [13.0, 2.5, 7.0, 41.0, 3.3, 9.9, 18.0]
    q = statistics.quantiles(data, n=100, method="inclusive")
    assert percentile(data, 50) == pytest.approx(q[49])
    assert percentile(data, 95) == pytest.approx(q[94])
    assert percentile([], 50) == 0.0 and percentile([4.0], 95) == 4.0
    with pytest.raises(ValueError, match="percentile"):
        percentile(data, 101)


def test_cost_per_thousand_emails_adds_token_and_instance_costs() -> None:
    figures = cost_figures(
        backends=("miniature:writer", "openai:gpt-4.1-mini"), emails=4,
        call_tokens=[(1000, 200)] * 8, call_costs_usd=[0.0007] * 8, call_latencies_ms=[10, 20, 30, 40] * 2,
        run_latencies_ms=[100, 200, 300, 400], wall_s=1800.0, instance_prices={"miniature": 0.5},
    )
    assert figures.token_cost_usd == pytest.approx(0.0056)
    assert figures.instance_cost_usd == pytest.approx(0.25)  # 0.5 USD/h x half an hour
    assert figures.cost_per_1k_emails_usd == pytest.approx((0.0056 + 0.25) / 4 * 1000)
    assert figures.tokens_in_per_email == 2000 and figures.tokens_out_per_email == 400
    assert figures.latency_p50_ms == pytest.approx(250) and figures.throughput_emails_per_s == pytest.approx(4 / 1800)
    assert figures.unpriced == []


def test_unpriced_backends_are_named_and_instances_shared() -> None:
    figures = cost_figures(backends=("ollama:qwen", "ollama:qwen"), emails=0, call_tokens=[], call_costs_usd=[],
                           call_latencies_ms=[], run_latencies_ms=[], wall_s=3600.0, prices={},
                           instance_prices={"qwen": 1.0})
    assert figures.instance_cost_usd == pytest.approx(1.0)  # one instance for both agents
    assert figures.cost_per_1k_emails_usd is None
    unpriced = cost_figures(backends=("openai:mystery@http://127.0.0.1:1/v1",), emails=1, call_tokens=[(1, 1)],
                            call_costs_usd=[0.0], call_latencies_ms=[1.0], run_latencies_ms=[1.0], wall_s=1.0,
                            prices={"heuristic": Price()})
    assert len(unpriced.unpriced) == 1 and "openai:mystery" in unpriced.unpriced[0]
    assert instance_price_for("miniature:w@2", {"miniature": 0.5}) == 0.5
    assert instance_price_for("openai:gpt-4.1") is None
