"""The email rubric, the pairwise judges and the cost figures."""

from __future__ import annotations

import json
import statistics

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from agents.schemas import EmailDraft, Fact, Offer, Profile, ProspectInfo, RenderedEmail
from agents.writer import render
from evals.costs import cost_figures, instance_price_for, percentile
from evals.judge import JudgeItem, LLMJudge, RubricJudge, combine_orders, judge_pairs
from evals.rubric import RUBRIC_CHECKS, RubricResult, score_email, summarize_rubric, unsupported_names
from miniatures.pricing import Price

OFFER = Offer(sender_name="Ilse Varnum", sender_company="Tallyfold", product="Tallyfold Signals",
              value_proposition="spots the accounts that are ready to buy",
              call_to_action="Would a 15-minute call next week be worth it?")
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
    "Hello {{first_name}},\n\nI saw that {{company}} is based in {{fact.location}} and has grown to "
    "{{fact.employee_count}} people. Teams at that stage often spend their week on spreadsheets instead of "
    "conversations. At {{sender_company}} we built {{product}}, which spots the accounts that are ready to buy, "
    "so your team can spend its time where it matters most.\n\n{cta}\n\nBest,\n{{sender_name}}\n\n{opt_out}"
)


def _email(body: str = BODY, subject: str = "An idea for {{company}}") -> tuple[EmailDraft, RenderedEmail]:
    draft = EmailDraft(subject=subject, body=body.replace("{cta}", OFFER.call_to_action)
                       .replace("{opt_out}", OFFER.opt_out_line))
    return draft, render(draft, PROSPECT, PROFILE, OFFER)


def _score(draft: EmailDraft, rendered: RenderedEmail) -> RubricResult:
    return score_email(draft, rendered, PROSPECT, PROFILE, OFFER)


def test_a_good_email_passes_every_check() -> None:
    result = _score(*_email())
    assert result.checks == dict.fromkeys(RUBRIC_CHECKS, True), result.problems
    assert result.ok and result.passed == len(RUBRIC_CHECKS) and result.facts_used == 2


@pytest.mark.parametrize(
    ("edit", "failed"),
    [
        (lambda d, r: (EmailDraft(subject=d.subject, body=d.body.replace("{{fact.location}}", "Cork, Ireland")
                                  .replace("{{fact.employee_count}}", "120")), r), "fact_used"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body.replace("120 people", "450 people"))),
         "no_unsupported"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body.replace("spreadsheets", "Salesforce"))),
         "no_unsupported"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body + "\nSee https://evil.example/x")),
         "no_unsupported"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=f"Hi Yutan,\n{OFFER.call_to_action}\n"
                                                               f"{OFFER.opt_out_line}")), "length"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body + "\n" + OFFER.call_to_action)), "one_cta"),
        (lambda d, r: (d, RenderedEmail(subject="x" * 90, body=r.body)), "subject_length"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body.replace("Best,", "Act now! Best,"))),
         "no_spam"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body.replace("Best,", "Best {{nickname}},"))),
         "merge_tags"),
        (lambda d, r: (d, RenderedEmail(subject=r.subject, body=r.body.replace(OFFER.opt_out_line, ""))), "opt_out"),
    ],
    ids=["no-fact-tag", "invented-number", "invented-name", "invented-url", "too-short", "two-ctas",
         "long-subject", "spam", "unresolved-tag", "no-opt-out"],
)
def test_each_rule_fails_alone(edit, failed: str) -> None:  # type: ignore[no-untyped-def]
    draft, rendered = edit(*_email())
    result = _score(draft, rendered)
    assert not result.checks[failed]
    assert any(p.startswith(f"{failed}:") for p in result.problems), result.problems
    others = {c for c, ok in result.checks.items() if not ok} - {failed}
    assert others <= {"length"} or failed == "length", others  # edits may shift the word count, nothing else


def test_fact_tag_of_a_missing_fact_does_not_count() -> None:
    draft = EmailDraft(subject="Hi", body=BODY.replace("{{fact.location}}", "{{fact.recent_event}}"))
    result = score_email(draft, _email()[1], PROSPECT, PROFILE, OFFER)
    assert result.facts_used == 1  # only employee_count exists in the profile
    no_facts = EmailDraft(subject="Hi", body="Hello {{fact.recent_event}} and {{fact.pain_point}}")
    assert not score_email(no_facts, _email()[1], PROSPECT, PROFILE, OFFER).checks["fact_used"]


def test_unsupported_names_skips_sentence_starts_and_known_words() -> None:
    allowed = ["Amberhollow Data", "Tallyfold Signals", "Cork, Ireland"]
    text = "Hello there.\nAmberhollow Data in Cork uses Tallyfold. We met Oracle on Monday. Great!"
    assert unsupported_names(text, allowed) == ["Oracle"]
    assert unsupported_names("I think Globex's team met Initech", allowed) == ["Globex", "Initech"]


def test_summary_counts_missing_emails_as_failures() -> None:
    good = _score(*_email())
    summary = summarize_rubric([good, RubricResult.missing("research failed")])
    assert summary.n == 2 and summary.written == 1
    assert summary.pass_rates == dict.fromkeys(RUBRIC_CHECKS, 0.5)
    assert summary.all_pass_rate == 0.5 and summary.mean_passed == len(RUBRIC_CHECKS) / 2
    assert summarize_rubric([]).all_pass_rate == 0.0


# ------------------------------------------------------------------------------------------------ judges


def _item(key: str, rubric: RubricResult, written: bool = True) -> JudgeItem:
    prospect = PROSPECT.model_copy(update={"email": key})
    draft, rendered = _email()
    return JudgeItem(prospect, OFFER, PROFILE, rendered.subject if written else None,
                     rendered.body if written else None, rubric)


def test_combine_orders_is_conservative() -> None:
    assert combine_orders("B", "A") == "win"
    assert combine_orders("A", "B") == "loss"
    for inconsistent in (("A", "A"), ("B", "B"), ("tie", "A"), ("B", "tie"), ("tie", "tie")):
        assert combine_orders(*inconsistent) == "tie"


async def test_rubric_judge_counts_wins_losses_ties_and_missing_emails() -> None:
    good = _score(*_email())
    worse = RubricResult(checks={**good.checks, "opt_out": False}, facts_used=2)
    fewer_facts = RubricResult(checks=good.checks, facts_used=1)
    reference = {"a": _item("a", good), "b": _item("b", worse), "c": _item("c", good), "d": _item("d", good),
                 "e": _item("e", RubricResult.missing(), written=False)}
    candidate = {"a": _item("a", worse), "b": _item("b", good), "c": _item("c", good),
                 "d": _item("d", RubricResult.missing(), written=False), "e": _item("e", fewer_facts)}
    result = await judge_pairs(reference, candidate, RubricJudge(), reference_name="teacher")
    assert result.outcomes == {"a": "loss", "b": "win", "c": "tie", "d": "loss", "e": "win"}
    assert (result.wins, result.losses, result.ties, result.n, result.judge_calls) == (2, 2, 1, 5, 0)
    assert result.win_rate == pytest.approx(2.5 / 5)
    assert result.ci_low < 0.5 < result.ci_high


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
    assert instance_price_for("miniature:w@2") == 0.0 and instance_price_for("openai:gpt-4.1") is None
