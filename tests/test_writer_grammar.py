"""The writer's format grammar refuses what the rubric fails and the teacher never writes, and forces nothing:
``miniatures.grammar.email_grammar`` (the product tag at most once, no product, sender-company or first-name tag
in the subject; ``writer-brief`` offer tags).

Answers are fed as a tiny locally trained tokenizer splits them (no downloads, no model run).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from agents.heuristic import write_email
from agents.schemas import Fact, Offer, Profile, ProspectInfo
from agents.writer import writing_task
from core.tasks import WritingTask
from miniatures.formats import OFFER_TAGS, brief_answer
from miniatures.grammar import email_grammar

pytest.importorskip("llguidance")
pytest.importorskip("transformers")

from tests.miniature_fixtures import grammar_accepts, grammar_tokenizer  # noqa: E402
from tests.test_craft_grammar import FACTS as CRAFT_FACTS  # noqa: E402
from tests.test_craft_grammar import OFFER as CRAFT_OFFER  # noqa: E402

# The craft grammar tests' offer and facts, with one more problem solved and a pain point.
OFFER = CRAFT_OFFER.model_copy(update={
    "problems_solved": [*CRAFT_OFFER.problems_solved, "expanding into a market without local contacts"]})
FACTS = [*CRAFT_FACTS, ("pain_point", "finding accounts that are ready to buy")]


def _task(i: int, offer: Offer = OFFER) -> WritingTask:
    prospect = ProspectInfo(first_name="Ada", last_name="Lovel", title="Head of Growth" if i % 2 else "",
                            email=f"p{i}@acme{i}.example", company=f"Acme{i} Freight", website=f"https://acme{i}.example")
    kept = FACTS[i % 4:]
    profile = Profile(company=prospect.company, website=prospect.website, facts=[
        Fact(field=f, value=v, evidence=f"S{j}", source_url=prospect.website) for j, (f, v) in enumerate(kept)])
    return writing_task(offer, prospect, profile)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return grammar_tokenizer(tmp_path_factory.mktemp("writer-grammar") / "base")


_accepts = grammar_accepts


def test_the_teachers_emails_pass(tok: tuple[Any, Any]) -> None:
    for i in range(16):
        task = _task(i)
        assert _accepts(tok, email_grammar(task), write_email(task)), (i, write_email(task))


@pytest.mark.parametrize("change", [
    ("body", "{{product}}", "{{product}} and {{product}}"),  # the product twice
    ("subject", None, "About {{product}}"),  # a product pitch
    ("subject", None, "From {{sender_company}}"),
    ("subject", None, "Hi {{first_name}}"),
])
def test_answers_that_break_a_rule_are_refused(tok: tuple[Any, Any], change: tuple[str, str | None, str]) -> None:
    key, old, new = change
    task = _task(3)
    good = write_email(task)
    assert _accepts(tok, email_grammar(task), good)
    if old is None:
        broken = {**good, key: new}
    else:
        assert old in good[key]
        broken = {**good, key: good[key].replace(old, json.loads(f'"{new}"'), 1)}
    assert not _accepts(tok, email_grammar(task), broken), broken


def test_nothing_is_forced(tok: tuple[Any, Any]) -> None:
    """No product at all, the product's first word alone, a subject with other tags: all accepted (the grammar
    only refuses; the rubric reports a missing product)."""
    task = _task(1)
    good = write_email(task)
    for body in (good["body"].replace("{{product}}", "it"), good["body"].replace("{{product}}", "Tallyfold"),
                 "Hi {{first_name}},\n\nShort."):
        assert _accepts(tok, email_grammar(task), {**good, "body": body}), body
    assert _accepts(tok, email_grammar(task), {**good, "subject": "News from {{fact.location}}"})


def test_the_typed_name_is_left_to_validation(tok: tuple[Any, Any]) -> None:
    """The product's name typed out is not refused (no sliceable rule for it; validation and the rubric count
    it), with or without the tag listed; the tag stays at most once."""
    task = _task(1)
    email = {"subject": "Tallyfold Signals", "body": "Hi {{first_name}},\n\nTallyfold Signals and {{product}}."}
    untagged = task.model_copy(update={"merge_tags": tuple(t for t in task.merge_tags if t.name != "product")})
    assert _accepts(tok, email_grammar(untagged), {**email, "body": email["body"].replace("{{product}}", "it")})
    assert _accepts(tok, email_grammar(task), email)
    assert not _accepts(tok, email_grammar(task), {**email, "body": email["body"] + " {{product}}"})


def test_offer_tags_are_allowed_only_when_asked_for(tok: tuple[Any, Any]) -> None:
    """The ``writer-brief`` answers of the teacher's emails (offer texts as ``{{cta}}`` ...) pass the grammar with
    the offer tags and are refused by the one without them; the subject never takes them."""
    for i in range(8):
        task = _task(i)
        brief = brief_answer(json.dumps(write_email(task), ensure_ascii=False), task)
        assert brief is not None and "{{cta}}" in brief and "{{opt_out}}" in brief
        assert _accepts(tok, email_grammar(task, tuple(OFFER_TAGS)), brief), brief
        assert not _accepts(tok, email_grammar(task), brief)
    task = _task(0)
    assert not _accepts(tok, email_grammar(task, tuple(OFFER_TAGS)), {"subject": "{{cta}}", "body": "x"})


def test_hostile_and_long_product_names(tok: tuple[Any, Any]) -> None:
    """A name with regex and JSON metacharacters or a long one breaks nothing: the teacher's email passes, a long
    rambling answer gets through (the lexer does not give up), the tag stays at most once."""
    for product in ('Sig+nals (v2) "Pro" \\ [x]*', "Quorvanta Ledger Signals Suite Enterprise Edition"):
        task = _task(2, offer=OFFER.model_copy(update={"product": product}))
        good = write_email(task)
        assert _accepts(tok, email_grammar(task), good)
        rambling = {**good, "body": good["body"] + " and then {{company}} again, {{fact.recent_event}} and more." * 40}
        assert _accepts(tok, email_grammar(task), rambling)
        assert not _accepts(tok, email_grammar(task), {**good, "body": good["body"] + " {{product}}"})
