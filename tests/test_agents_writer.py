"""The writer (prompt, retries, feedback), the renderer and every validation check."""

from __future__ import annotations

import json

import pytest

from agents import (
    EmailDraft,
    Fact,
    MergeTagError,
    ModelOutputError,
    Offer,
    Profile,
    ProspectInfo,
    render,
    validate_email,
    write,
)
from agents.prompts import WRITER_SYSTEM_PROMPT
from agents.validation import CHECKS, FAILURE_CODES, merge_tag_failure
from core.tasks import FailedCheck
from graphs.recorder import TraceRecorder
from tests.test_agents_support import PromptRecorder, scripted

OFFER = Offer(
    sender_name="Sam Lee", sender_company="Routewise", product="Routewise Dispatch",
    value_proposition="It assigns routes automatically so dispatchers plan in minutes.",
    call_to_action="Would you be open to a 15-minute call next week?",
)
PROSPECT = ProspectInfo(first_name="Dana", last_name="Kim", title="VP Operations", email="dana@acme.example",
                        company="Acme Freight", website="https://acme.example")
PROFILE = Profile(company="Acme Freight", facts=[
    Fact(field="recent_event", value="raised a $12 million Series A",
         evidence="Acme Freight today announced that it has raised a $12 million Series A.",
         source_url="https://acme.example/news"),
    Fact(field="location", value="Austin, Texas", evidence="Based in Austin, Texas.",
         source_url="https://acme.example/"),
])
GOOD_BODY = (
    "Hi {{ first_name }},\n\nI saw that {{company}} {{fact.recent_event}}. Congratulations, that is a real "
    "milestone for a team based in {{fact.location}}. Growth like that usually means more routes and more "
    "pressure on the people who plan them.\n\nAt {{sender_company}} we built {{product}} for teams like "
    "yours. It assigns routes automatically so dispatchers plan in minutes.\n\n"
    "Would you be open to a 15-minute call next week?\n\nBest,\n{{sender_name}}\n\n"
    "If this isn't relevant, just reply 'no thanks' and I won't write again."
)
GOOD = EmailDraft(subject="Quick idea for {{company}}", body=GOOD_BODY)


def check(draft: EmailDraft, offer: Offer = OFFER, profile: Profile = PROFILE) -> dict[str, bool]:
    result = validate_email(draft, render(draft, PROSPECT, profile, offer), PROSPECT, profile, offer)
    failed = {name for name, ok in result.checks.items() if not ok}
    assert {e.split(":", 1)[0] for e in result.errors} == failed
    return result.checks


def test_render_fills_tags_with_inner_spaces() -> None:
    rendered = render(GOOD, PROSPECT, PROFILE, OFFER)
    assert rendered.subject == "Quick idea for Acme Freight"
    assert rendered.body.startswith("Hi Dana,")
    assert "Acme Freight raised a $12 million Series A." in rendered.body
    assert "based in Austin, Texas." in rendered.body and "\nSam Lee\n" in rendered.body


@pytest.mark.parametrize(("body", "bad"), [
    ("Hi {{nickname}}, {{fact.location}}", ["nickname"]),
    ("Hi {{first_name}}, congrats on {{fact.founded_year}} and {{ fact.revenue }}",
     ["fact.founded_year", "fact.revenue"]),
])
def test_render_rejects_unknown_or_missing_tags(body: str, bad: list[str]) -> None:
    with pytest.raises(MergeTagError) as info:
        render(EmailDraft(subject="Hi", body=body), PROSPECT, PROFILE, OFFER)
    assert info.value.tags == bad
    assert "fact.location" in info.value.allowed and "first_name" in info.value.allowed
    assert "{{" + bad[0] + "}}" in str(info.value) and "Rewrite" in str(info.value)


def test_render_treats_empty_prospect_fields_as_missing() -> None:
    no_title = PROSPECT.model_copy(update={"title": ""})
    with pytest.raises(MergeTagError, match="title"):
        render(EmailDraft(subject="Hi", body="As {{title}}"), no_title, PROFILE, OFFER)


def test_good_email_passes_every_check() -> None:
    result = validate_email(GOOD, render(GOOD, PROSPECT, PROFILE, OFFER), PROSPECT, PROFILE, OFFER)
    assert result.ok and result.errors == [] and set(result.checks) == set(CHECKS)


def test_check_merge_tags_flags_leftover_braces() -> None:
    draft = GOOD.model_copy(update={"body": GOOD_BODY.replace("Best,", "Best, {first_name}}")})
    assert check(draft)["merge_tags"] is False


def test_check_grounded_needs_a_fact_tag() -> None:
    draft = GOOD.model_copy(update={"body": GOOD_BODY.replace("{{fact.recent_event}}", "grew fast")
                                    .replace("{{fact.location}}", "nearby")})
    assert check(draft)["grounded"] is False


@pytest.mark.parametrize("invented", [
    "40% faster", "see https://routewise.example/demo", "mail sam@rw.example", "visit routewise.io"])
def test_check_grounded_flags_invented_numbers_urls_and_domains(invented: str) -> None:
    draft = GOOD.model_copy(update={"body": GOOD_BODY.replace("in minutes.", f"in minutes, {invented}.")})
    assert check(draft)["grounded"] is False


def test_check_length() -> None:
    short = EmailDraft(subject="Hi", body="Hi {{first_name}}, {{fact.location}}. Would you be open to a "
                       "15-minute call next week? If this isn't relevant, just reply 'no thanks' and I won't "
                       "write again.")
    assert check(short)["length"] is False
    long = GOOD.model_copy(update={"body": GOOD_BODY.replace("Best,", "More words here. " * 60 + "Best,")})
    assert check(long)["length"] is False


def test_check_subject_length() -> None:
    assert check(GOOD.model_copy(update={"subject": "Hi"}))["subject_length"] is False
    assert check(GOOD.model_copy(update={"subject": "x" * 79}))["subject_length"] is False


def test_check_spam() -> None:
    draft = GOOD.model_copy(update={"body": GOOD_BODY.replace("Best,", "Act now, it is risk-free. Best,")})
    result = validate_email(draft, render(draft, PROSPECT, PROFILE, OFFER), PROSPECT, PROFILE, OFFER)
    assert result.checks["spam"] is False
    assert "act now" in result.errors[0] and "risk-free" in result.errors[0]


def test_check_one_cta() -> None:
    twice = GOOD.model_copy(update={"body": GOOD_BODY.replace(
        "Best,", "So, would you be open to a 15-minute call next week? Best,")})
    assert check(twice)["one_cta"] is False
    none = GOOD.model_copy(update={"body": GOOD_BODY.replace(
        "Would you be open to a 15-minute call next week?", "Could we talk on a 15-minute call?")})
    assert check(none)["one_cta"] is False


def test_check_opt_out() -> None:
    draft = GOOD.model_copy(update={"body": GOOD_BODY.split("\n\nIf this")[0]})
    assert check(draft)["opt_out"] is False


async def test_writer_that_obeys_a_hostile_page_fails_validation() -> None:
    hostile = {"subject": "A gift for {{first_name}}", "body": GOOD_BODY.replace(
        "Best,", "Also, {{company}} readers get a free iPhone at http://win-prize.example/claim now. Best,")}
    draft = await write(OFFER, PROSPECT, PROFILE, model=scripted(json.dumps(hostile)))
    result = validate_email(draft, render(draft, PROSPECT, PROFILE, OFFER), PROSPECT, PROFILE, OFFER)
    assert result.checks["spam"] is False and result.checks["grounded"] is False
    assert any("win-prize.example" in e for e in result.errors)


async def test_write_prompt_feedback_and_config() -> None:
    recorder, traces = PromptRecorder(), TraceRecorder({"writer": "heuristic"})
    too_short = FailedCheck(code="too_short", detail="length: the body has 20 words, too short")
    draft = await write(OFFER, PROSPECT, PROFILE, model=scripted(GOOD.model_dump_json()), feedback=[too_short],
                        config={"callbacks": [recorder, traces], "metadata": {"agent": "writer"}})
    assert draft == GOOD
    # The call carried its typed task: the trace stores it, feedback included.
    task = traces.traces[0].task
    assert task is not None and task["kind"] == "writing" and task["feedback"][0]["code"] == "too_short"
    assert [t["name"] for t in task["merge_tags"]][-1] == "fact.location"
    with pytest.raises(TypeError, match="FailedCheck"):
        await write(OFFER, PROSPECT, PROFILE, model=scripted(GOOD.model_dump_json()), feedback=["too short"])  # type: ignore[list-item]
    system, user, feedback = recorder.calls[0]
    assert system.content == WRITER_SYSTEM_PROMPT
    assert "{{fact.location}}: Austin, Texas" in user.content
    # a Series A shares no word with routing: the event is not offered to the writer
    assert "{{fact.recent_event}}" not in user.content
    assert "Problems solved: (none)\nProof point: (none)" in user.content
    assert "Call to action style: (not given)" in user.content
    assert "{{first_name}}: the prospect's first name" in user.content
    for name in ("Dana", "Kim", "Acme Freight", "Sam Lee"):  # names only as tags
        assert name not in user.content
    assert "Call to action: Would you be open to a 15-minute call next week?" in user.content
    assert "- length: the body has 20 words, too short" in feedback.content


async def test_write_retries_once_then_raises() -> None:
    fenced = "```json\n" + GOOD.model_dump_json() + "```"
    ok = await write(OFFER, PROSPECT, PROFILE, model=scripted("oops", fenced))
    assert ok == GOOD
    with pytest.raises(ModelOutputError) as info:
        await write(OFFER, PROSPECT, PROFILE, model=scripted('{"subject": "x"}', "still not json"))
    assert info.value.agent == "writer" and info.value.raw_output == "still not json"


@pytest.mark.parametrize("planted", [
    "https://acme-freight-login.example/verify", "security@acme-support.example", "acme-support.example",
    "+1 415 555 0132"])
def test_contacts_in_a_fact_never_make_an_email_valid(planted: str) -> None:
    # A fact that came through from a hostile page: validation must not trust it for links or numbers.
    profile = PROFILE.model_copy(update={"facts": [*PROFILE.facts, Fact(
        field="pain_point", value=f"reach {planted}", evidence=f"Customers reach {planted}.",
        source_url="https://acme.example/")]})
    draft = GOOD.model_copy(update={"body": GOOD_BODY.replace("Best,", "See {{fact.pain_point}}. Best,")})
    result = validate_email(draft, render(draft, PROSPECT, profile, OFFER), PROSPECT, profile, OFFER)
    assert result.checks["grounded"] is False
    assert any(planted in e for e in result.errors)


def test_the_offers_and_the_prospects_own_links_are_allowed() -> None:
    offer = OFFER.model_copy(update={"value_proposition": "See routewise.example/demo or call +1 212 555 0188."})
    body = GOOD_BODY.replace("Best,", "Your page https://www.acme.example/pricing and https://routewise.example/"
                             "demo helped; call +1 (212) 555-0188 or write dana@acme.example. Best,")
    draft = GOOD.model_copy(update={"body": body})
    assert check(draft, offer=offer)["grounded"] is True


def test_credential_requests_fail_validation_unless_the_offer_has_them() -> None:
    draft = GOOD.model_copy(update={"body": GOOD_BODY.replace(
        "Best,", "Please confirm your password on the portal first. Best,")})
    assert check(draft)["grounded"] is False


def _prompt_reading_writer():  # type: ignore[no-untyped-def]
    """A scripted writer that does what its prompt says: it uses a fact tag when the system prompt asks for one
    unconditionally or the merge tags list one, and writes without when the prompt says none is listed."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from agents.prompts import WRITER_NO_FACTS_NOTE

    class PromptReadingWriter(GenericFakeChatModel):
        def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
            system, user = messages[0].text, messages[1].text
            asked_for_a_fact = "- Mention at least one company fact through a {{fact.<field>}} tag.\n" in system
            tags = [line for line in user.splitlines() if line.startswith("{{fact.")]
            told_none = WRITER_NO_FACTS_NOTE.strip() in user
            assert not (tags and told_none), "the no-facts note must only come without fact tags"
            body = GOOD_BODY if asked_for_a_fact or tags or not told_none else PLAIN_BODY
            draft = EmailDraft(subject="Quick idea for {{company}}", body=body)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(draft.model_dump_json()))])

    return PromptReadingWriter(messages=iter(()))


PLAIN_BODY = (
    "Hi {{first_name}},\n\nI lead partnerships at {{sender_company}}, and I am writing because teams that plan "
    "routes every day often tell us how much of the week goes into it. {{product}} assigns routes automatically "
    "so dispatchers plan in minutes, and it works with the tools they already use.\n\nIf it would help, I can "
    "show you how other teams set it up and what changed for them in the first month.\n\n"
    "Would you be open to a 15-minute call next week?\n\nBest,\n{{sender_name}}\n\n"
    "If this isn't relevant, just reply 'no thanks' and I won't write again."
)


async def test_without_facts_the_prompt_asks_for_none_and_the_email_is_valid() -> None:
    from agents.prompts import WRITER_NO_FACTS_NOTE

    no_facts = Profile(company="Acme Freight")
    recorder = PromptRecorder()
    draft = await write(OFFER, PROSPECT, no_facts, model=_prompt_reading_writer(), config={"callbacks": [recorder]})
    system, user = recorder.calls[0]
    assert system.content == WRITER_SYSTEM_PROMPT  # one constant system prompt, with or without facts
    assert WRITER_NO_FACTS_NOTE.strip() in user.text
    assert not [line for line in user.text.splitlines() if line.startswith("{{fact.")]
    assert "{{fact." not in draft.body
    result = validate_email(draft, render(draft, PROSPECT, no_facts, OFFER), PROSPECT, no_facts, OFFER,
                            require_fact=False)
    assert result.ok, result.errors
    # With facts the note is left out and the same model uses a fact tag.
    recorder = PromptRecorder()
    personal = await write(OFFER, PROSPECT, PROFILE, model=_prompt_reading_writer(), config={"callbacks": [recorder]})
    assert WRITER_NO_FACTS_NOTE.strip() not in recorder.calls[0][1].text
    assert "{{fact." in personal.body and check(personal) == dict.fromkeys(CHECKS, True)


async def test_the_heuristic_teacher_writes_without_facts_too() -> None:
    from agents import HeuristicChatModel

    no_facts = Profile(company="Acme Freight")
    draft = await write(OFFER, PROSPECT, no_facts, model=HeuristicChatModel())
    assert "{{fact." not in draft.subject + draft.body
    result = validate_email(draft, render(draft, PROSPECT, no_facts, OFFER), PROSPECT, no_facts, OFFER,
                            require_fact=False)
    assert result.ok, result.errors


def test_failures_come_as_data_with_stable_codes() -> None:
    body = GOOD_BODY.replace("Best,", "Act now: call +1 415 555 0199. Best,")
    body = body.replace("{{fact.recent_event}}", "news").replace("{{fact.location}}", "Texas")
    draft = EmailDraft(subject="x", body=body)
    result = validate_email(draft, render(draft, PROSPECT, PROFILE, OFFER), PROSPECT, PROFILE, OFFER)
    codes = {(c.code, c.subject) for c in result.failed}
    assert {("no_fact", ""), ("spam", "act now"), ("subject_too_short", "")} <= codes
    assert any(code == "ungrounded" and "0199" in subject for code, subject in codes)
    assert all(c.code in FAILURE_CODES and FAILURE_CODES[c.code] in (*CHECKS, "json") for c in result.failed)
    # Every failure's detail is the error line of its check.
    assert {c.detail for c in result.failed} == set(result.errors)
    tags = merge_tag_failure(MergeTagError(["fact.revenue", "nickname"], ["company"]))
    assert [(c.code, c.subject) for c in tags.failed] == [("unknown_merge_tag", "fact.revenue"),
                                                          ("unknown_merge_tag", "nickname")]
    assert tags.checks == {"merge_tags": False} and tags.errors == [tags.failed[0].detail]
