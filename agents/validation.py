"""Checks on a rendered email before it can be sent; each failure says what a model should fix.

``validate_email`` returns a ``ValidationResult`` with these named checks (True = passed):
``merge_tags``, ``grounded``, ``length``, ``subject_length``, ``spam``, ``one_cta``, ``opt_out``.
Each error string starts with the check name (``"length: ..."``) and says what to change; the same
failures come as data (``ValidationResult.failed``: ``core.tasks.FailedCheck`` with a stable code of
``FAILURE_CODES``), which the writer's next task carries, so nothing downstream reads the wording.
``merge_tag_failure`` and ``output_failure`` give the same for a draft that could not be rendered or parsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from agents.attribution import registrable_domain
from agents.contacts import Contacts, find_contacts, phone_digits
from agents.errors import MergeTagError, ModelOutputError
from agents.fact_shapes import CREDENTIAL_WORDS as _CREDENTIAL
from agents.grounding import normalize
from agents.schemas import EmailDraft, Offer, Profile, ProspectInfo, RenderedEmail, ValidationResult
from core.tasks import FailedCheck

__all__ = [
    "BODY_WORDS",
    "CHECKS",
    "FAILURE_CODES",
    "SPAM_PHRASES",
    "SUBJECT_CHARS",
    "merge_tag_failure",
    "output_failure",
    "validate_email",
    "word_count",
]

#: Check names, in report order.
CHECKS: tuple[str, ...] = ("merge_tags", "grounded", "length", "subject_length", "spam", "one_cta", "opt_out")
#: Stable codes of ``core.tasks.FailedCheck`` -> the check (``CHECKS``, or ``json`` for an answer that was
#: not the writer's JSON) they fail. ``subject`` names the tag (``unknown_merge_tag``), the phrase (``spam``)
#: or the unsourced link, address, number or credential word (``ungrounded``); it is empty for the others.
FAILURE_CODES: dict[str, str] = {
    "merge_tags_left": "merge_tags",
    "unknown_merge_tag": "merge_tags",
    "no_fact": "grounded",
    "ungrounded": "grounded",
    "too_short": "length",
    "too_long": "length",
    "subject_too_short": "subject_length",
    "subject_too_long": "subject_length",
    "spam": "spam",
    "cta_count": "one_cta",
    "opt_out_missing": "opt_out",
    "invalid_json": "json",
}
#: Allowed body length in words (inclusive).
BODY_WORDS: tuple[int, int] = (50, 200)
#: Allowed subject length in characters (inclusive).
SUBJECT_CHARS: tuple[int, int] = (3, 78)
#: Phrases that mark an email as spam (matched case-insensitively on word boundaries).
SPAM_PHRASES: tuple[str, ...] = (
    "act now",
    "100% free",
    "risk-free",
    "risk free",
    "guaranteed",
    "guarantee you",
    "limited time",
    "click here",
    "winner",
    "you have won",
    "you've won",
    "free iphone",
    "free gift",
    "free money",
    "claim your prize",
    "claim now",
    "no strings attached",
    "once in a lifetime",
    "urgent",
    "buy now",
    "order now",
    "cash bonus",
    "double your",
    "earn money",
    "make money",
    "miracle",
    "100% satisfied",
    "best price",
    "dear friend",
)
_SPAM = re.compile(
    "|".join(rf"(?<![\w%]){re.escape(p)}(?!\w)" for p in sorted(SPAM_PHRASES, key=len, reverse=True)),
    re.IGNORECASE,
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_FACT_TAG = re.compile(r"\{\{\s*fact\.[a-z_]+\s*\}\}")
_WORD = re.compile(r"\S+")


def word_count(text: str) -> int:
    """Number of whitespace-separated words in ``text``."""
    return len(_WORD.findall(text))


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "").rstrip(".") for n in _NUMBER.findall(text)}


def _own_domains(prospect: ProspectInfo) -> set[str]:
    """Registrable domains of the prospect's website and e-mail address."""
    email_host = prospect.email.rsplit("@", 1)[-1] if "@" in prospect.email else ""
    return {d for d in (registrable_domain(prospect.website), registrable_domain(email_host)) if d}


def _unallowed_contacts(found: Contacts, prospect: ProspectInfo, offer_text: str) -> list[str]:
    """The contact points ``found`` in an email that are not on an allowed domain (the prospect's website or
    e-mail domain, or a domain the offer names in a link, address or domain) or, for phone numbers, not one
    of the offer's."""
    offer = find_contacts(offer_text)
    allowed = _own_domains(prospect) | {
        registrable_domain(c) for c in (*offer.urls, *offer.domains, *(e.rsplit("@", 1)[-1] for e in offer.emails))
    }
    offer_phones = {phone_digits(p) for p in offer.phones}
    bad = [u for u in (*found.urls, *found.domains) if registrable_domain(u) not in allowed]
    bad += [e for e in found.emails if registrable_domain(e.rsplit("@", 1)[-1]) not in allowed]
    bad += [p for p in found.phones if phone_digits(p) not in offer_phones]
    return bad


def _ungrounded(rendered: RenderedEmail, prospect: ProspectInfo, offer: Offer, profile: Profile) -> list[str]:
    """What ``rendered`` mentions without a source: contact points that are not the offer's or the
    prospect's own (whatever a fact says), and numbers that no prospect field, offer field or fact holds."""
    text = f"{rendered.subject}\n{rendered.body}"
    offer_text = "\n".join(str(v) for v in offer.model_dump().values())
    contacts = find_contacts(text)
    missing = _unallowed_contacts(contacts, prospect, offer_text)
    rest = text
    for item in (*contacts.urls, *contacts.emails, *contacts.domains, *contacts.phones):
        rest = rest.replace(item, " ")
    allowed_text = "\n".join([*prospect.model_dump().values(), offer_text, *(f.value for f in profile.facts)])
    missing += sorted(_numbers(rest) - _numbers(allowed_text))
    offer_norm = normalize(offer_text)
    missing += [m.group(0) for m in _CREDENTIAL.finditer(text) if normalize(m.group(0)) not in offer_norm]
    return list(dict.fromkeys(missing))


def validate_email(
    draft: EmailDraft,
    rendered: RenderedEmail,
    prospect: ProspectInfo,
    profile: Profile,
    offer: Offer,
    *,
    require_fact: bool = True,
) -> ValidationResult:
    """Run the named checks on an email.

    Args:
        draft: The email as written (with merge tags); ``grounded`` requires a ``{{fact.*}}`` tag here
            unless ``require_fact`` is False.
        rendered: The same email with tags filled (``agents.writer.render``).
        prospect, profile, offer: The only allowed sources: URLs, domains, e-mail addresses and phone
            numbers must occur in the offer or be on the prospect's own website or e-mail domain (never
            taken from facts, which come from web pages); numbers must occur in a prospect or offer field or
            a fact value; credential words (password, login, card details, ...) only where the offer has them.
        require_fact: False for a non-personalised email (research found no verified fact and the
            campaign opted in): ``grounded`` then does not ask for a ``{{fact.*}}`` tag.

    Returns:
        ``checks`` for every name in ``CHECKS`` and one error string per failed check, each starting
        with the check name and saying what to change.
    """
    checks: dict[str, bool] = {}
    errors: list[str] = []
    failed: list[FailedCheck] = []

    def record(name: str, ok: bool, message: str, failures: Sequence[tuple[str, str]] = ()) -> None:
        """Record check ``name``; when it fails, its error line and one ``FailedCheck`` per ``(code, subject)``."""
        checks[name] = ok
        if not ok:
            errors.append(f"{name}: {message}")
            failed.extend(FailedCheck(code=code, detail=errors[-1], subject=subject) for code, subject in failures)

    text = f"{rendered.subject}\n{rendered.body}"
    left = "{{" in text or "}}" in text
    record("merge_tags", not left,
           "the rendered email still contains '{{' or '}}'; write merge tags exactly as listed, "
           "e.g. {{first_name}}, and no other braces", [("merge_tags_left", "")])

    missing = _ungrounded(rendered, prospect, offer, profile)
    has_fact = _FACT_TAG.search(draft.body) is not None
    problems = []
    grounding: list[tuple[str, str]] = []
    if require_fact and not has_fact:
        problems.append("the body mentions no company fact; use at least one {{fact.<field>}} tag")
        grounding.append(("no_fact", ""))
    if missing:
        problems.append(
            f"the email mentions {', '.join(repr(m) for m in missing)}, which the prospect, offer and "
            "profile facts do not contain (links, addresses and phone numbers may come only from the offer and "
            "the prospect's own website or e-mail domain); remove it or use a {{fact.<field>}} tag"
        )
        grounding += [("ungrounded", m) for m in missing]
    record("grounded", not problems, "; ".join(problems), grounding)

    words = word_count(rendered.body)
    lo, hi = BODY_WORDS
    record("length", lo <= words <= hi,
           f"the body has {words} words, {'too short' if words < lo else 'too long'}; "
           f"write between {lo} and {hi} words (aim for 60-160)", [("too_short" if words < lo else "too_long", "")])

    chars = len(rendered.subject.strip())
    slo, shi = SUBJECT_CHARS
    record("subject_length", slo <= chars <= shi,
           f"the subject has {chars} characters, {'too short' if chars < slo else 'too long'}; "
           f"write {slo} to {shi} characters (aim for at most 60)",
           [("subject_too_short" if chars < slo else "subject_too_long", "")])

    spam = list(dict.fromkeys(m.group(0).lower() for m in _SPAM.finditer(text)))
    record("spam", not spam, f"remove the spam phrase(s) {', '.join(repr(s) for s in spam)}",
           [("spam", phrase) for phrase in spam])

    cta = normalize(offer.call_to_action).rstrip(".?!")
    count = normalize(text).count(cta) if cta else 0
    record("one_cta", count == 1,
           f"the call to action {offer.call_to_action!r} appears {count} times; include it exactly once, "
           "word for word, and no other call to action", [("cta_count", "")])

    record("opt_out", contains_opt_out(rendered.body, offer.opt_out_line),
           f"end the body with the opt-out line, word for word: {offer.opt_out_line!r}", [("opt_out_missing", "")])

    return ValidationResult(checks=checks, errors=errors, failed=failed)


def merge_tag_failure(error: MergeTagError) -> ValidationResult:
    """The validation result of a draft that could not be rendered: check ``merge_tags`` failed, the error's
    message as its line, one ``unknown_merge_tag`` failure per tag that cannot be filled (``subject`` = the tag)."""
    detail = str(error)
    failed = [FailedCheck(code="unknown_merge_tag", detail=detail, subject=tag) for tag in error.tags]
    return ValidationResult(checks={"merge_tags": False}, errors=[detail], failed=failed)


def output_failure(error: ModelOutputError) -> ValidationResult:
    """The validation result of a writer answer that was not its JSON even after the retry: check ``json``
    failed, with one ``invalid_json`` failure."""
    detail = str(error)
    return ValidationResult(checks={"json": False}, errors=[detail],
                            failed=[FailedCheck(code="invalid_json", detail=detail)])


def contains_opt_out(body: str, opt_out_line: str) -> bool:
    """True when ``opt_out_line`` occurs in ``body`` (case- and whitespace-insensitive)."""
    line = normalize(opt_out_line)
    return bool(line) and line in normalize(body)
