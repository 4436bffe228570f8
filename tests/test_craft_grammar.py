"""The writer's craft grammar (``miniatures.grammar.craft_email_grammar``): the heuristic teacher's emails pass,
emails that break a rule of the rubric are refused, and the rules follow the task (no facts, no proof point).

Answers are fed as a tiny locally trained tokenizer splits them (no downloads, no model run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.heuristic import write_email
from agents.schemas import Fact, Offer, Profile, ProspectInfo
from agents.writer import writing_task
from core.tasks import WritingTask
from evals.rubric import score_email
from miniatures.grammar import GrammarError, answer_grammar, craft_email_grammar, email_grammar

pytest.importorskip("llguidance")
pytest.importorskip("transformers")

from tests.miniature_fixtures import grammar_accepts, grammar_tokenizer  # noqa: E402

OFFER = Offer(
    sender_name="Ilse Varnum", sender_title="Account Executive", sender_company="Tallyfold",
    product="Tallyfold Signals",
    value_proposition="Tallyfold Signals spots the accounts that are ready to buy, so your team spends its week on "
                      "conversations instead of spreadsheets.",
    call_to_action="Would a 15-minute call next week be worth it?",
    problems_solved=["finding the accounts that are ready to buy", "filling the pipeline for a newly opened office",
                     "hitting pipeline targets after raising a round"],
    proof_point="Brightline's sales team booked 30% more meetings in its first quarter with it.",
    cta_style="meeting",
)
FACTS = [("industry", "logistics software"), ("location", "Omaha, Nebraska"), ("employee_count", "120"),
         ("recent_event", "opened an office in Lisbon"), ("customer_segment", "third-party logistics providers")]


def _task(i: int, offer: Offer = OFFER, facts: list[tuple[str, str]] = FACTS, first_name: str = "Ada") -> WritingTask:
    prospect = ProspectInfo(first_name=first_name, last_name="Lovel", title="Head of Growth",
                            email=f"p{i}@acme{i}.example", company=f"Acme{i} Freight", website=f"https://acme{i}.example")
    kept = facts[i % 3:]
    profile = Profile(company=prospect.company, website=prospect.website, facts=[
        Fact(field=f, value=v, evidence=f"S{j}", source_url=prospect.website) for j, (f, v) in enumerate(kept)])
    return writing_task(offer, prospect, profile)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return grammar_tokenizer(tmp_path_factory.mktemp("craft") / "base")


_accepts = grammar_accepts


GOOD = {
    "subject": "After the big news",
    "body": "Hi {{first_name}},\n\nNow that {{company}} {{fact.recent_event}}, the next few months are probably busy. "
            "That is usually when filling the pipeline for a newly opened office starts to matter, and as {{title}} "
            "you probably see it first.\n\n{{product}} was made for this: it spots the accounts that are ready to buy. "
            "One data point: Brightline's sales team booked 30% more meetings in its first quarter with it.\n\n"
            "Would a 15-minute call next week be worth it?\n\nThanks,\n{{sender_name}}\n{{sender_company}}\n\n"
            "If this isn't relevant, just reply 'no thanks' and I won't write again.",
}


def test_the_teachers_emails_pass_the_craft_grammar(tok: tuple[Any, Any]) -> None:
    for i in range(12):
        task = _task(i)
        assert _accepts(tok, craft_email_grammar(task), write_email(task)), (i, write_email(task))
    assert _accepts(tok, craft_email_grammar(_task(3)), GOOD)


@pytest.mark.parametrize("change", [
    ("body", "{{product}} was made", "{{product}} and {{product}} were made"),  # the product twice
    ("body", "{{product}} was made for this: it", "This"),  # no product
    ("body", "One data point: Brightline's sales team booked 30% more meetings in its first quarter with it.",
     "It helps."),  # no proof point
    ("body", "Brightline's sales team booked 30%", "Brightline's team booked 20%"),  # a changed proof point
    ("body", "Thanks,", "Thanks, Would a 15-minute call next week be worth it?"),  # the call to action twice
    ("body", "Hi {{first_name}},", "Dear {{first_name}},"),  # a stiff greeting
    ("body", "Now that {{company}}", "We saw that {{company}}"),  # a first-person opener
    ("body", "{{company}} {{fact.recent_event}}", "{{company}} grew"),  # no fact
    ("body", "Now that {{company}} {{fact.recent_event}}, the next few months are probably busy. That is usually when "
             "filling the pipeline for a newly opened office starts to matter, and as {{title}} you probably see it "
             "first.", "{{company}} {{fact.recent_event}}."),  # 50 words up to the call to action: under the band
    ("body", "One data point:", "One data point, and there are many more that I could share with you today if "
                                "there were time for it:"),  # over the band
    ("body", "If this isn't relevant, just reply 'no thanks' and I won't write again.", "Bye."),  # no opt-out line
    ("subject", "After the big news", "{{product}} news"),  # a product pitch
    ("subject", "After the big news", "Hi {{first_name}}"),  # the first name
    ("subject", "After the big news", "Big news!"),  # shouting
    ("subject", "After the big news", "After the big news at your company"),  # seven words
    ("subject", "After the big news", "News"),  # one word
])
def test_emails_that_break_a_rule_are_refused(tok: tuple[Any, Any], change: tuple[str, str, str]) -> None:
    key, old, new = change
    assert old in GOOD[key]
    broken = {**GOOD, key: GOOD[key].replace(old, new)}
    task = _task(3)
    # The format grammar refuses the product twice and a product or first-name tag in the subject; the rest it
    # lets through.
    format_refuses = "{{product}} and" in new or (key == "subject" and "{{" in new)
    assert _accepts(tok, email_grammar(task), broken) is not format_refuses
    assert not _accepts(tok, craft_email_grammar(task), broken)


def test_the_rules_follow_the_task(tok: tuple[Any, Any]) -> None:
    """Without facts, proof point or first name the grammar asks for none; the teacher's emails still pass."""
    plain = OFFER.model_copy(update={"proof_point": ""})
    task = _task(0, offer=plain, facts=[], first_name="")
    assert not task.fact_tags and "first_name" not in task.tag_names
    answer = write_email(task)
    assert _accepts(tok, craft_email_grammar(task), answer), answer
    with_proof = {**answer, "body": answer["body"].replace("{{product}}", "{{product}} ({{product}})", 1)}
    assert not _accepts(tok, craft_email_grammar(task), with_proof)


def test_accepted_emails_pass_the_rubrics_form_checks(tok: tuple[Any, Any]) -> None:
    from agents.schemas import EmailDraft
    from agents.writer import render

    prospect = ProspectInfo(first_name="Ada", title="Head of Growth", email="a@acme.example", company="Acme Freight")
    profile = Profile(company="Acme Freight", facts=[Fact(field="recent_event", value="opened an office in Lisbon",
                                                          evidence="S1", source_url="https://acme.example")])
    task = writing_task(OFFER, prospect, profile)
    assert _accepts(tok, craft_email_grammar(task), GOOD)
    draft = EmailDraft(**GOOD)
    result = score_email(draft, render(draft, prospect, profile, OFFER), prospect, profile, OFFER)
    assert result.ok, result.problems


def test_answer_grammar_is_the_format_grammar_unless_craft_is_asked() -> None:
    task = _task(1)
    assert answer_grammar(task) == email_grammar(task)
    assert answer_grammar(task, craft=True) == craft_email_grammar(task)


def test_an_offer_that_leaves_no_room_for_a_body_is_refused(tmp_path: Path) -> None:
    long_proof = OFFER.model_copy(update={"proof_point": " ".join(["word"] * 80) + "."})
    with pytest.raises(GrammarError, match="no room for a body"):
        craft_email_grammar(_task(0, offer=long_proof))


def test_the_craft_grammar_is_chosen_at_training_time() -> None:
    """``TrainConfig.email_grammar`` names the grammar; a writer miniature with ``craft_grammar`` gets the craft
    grammar, one without it the email format alone; an unknown name is refused."""
    from types import SimpleNamespace

    from finetune.config import TrainConfig
    from miniatures.local import LocalMiniatureChatModel

    assert TrainConfig(base_model="b", dataset_dir="d", output_dir="o", email_grammar="craft").email_grammar == "craft"
    with pytest.raises(ValueError, match="email_grammar must be one of format, craft"):
        TrainConfig(base_model="b", dataset_dir="d", output_dir="o", email_grammar="strict")
    task = _task(0)
    engine: Any = SimpleNamespace(constrained=True)
    craft = LocalMiniatureChatModel.model_construct(engine=engine, adapter="w", craft_grammar=True)
    plain = LocalMiniatureChatModel.model_construct(engine=engine, adapter="w")
    assert craft._grammar(task, None) == craft_email_grammar(task)
    assert plain._grammar(task, None) == email_grammar(task)
