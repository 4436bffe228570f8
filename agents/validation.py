"""Checks on a rendered email before it can be sent; each failure says what a model should fix.

``validate_email`` returns a ``ValidationResult`` with these named checks (True = passed):
``merge_tags``, ``grounded``, ``length``, ``subject_length``, ``spam``, ``one_cta``, ``opt_out``.
Each error string starts with the check name (``"length: ..."``) so a retrying writer, and the
heuristic backend, can tell which rule to fix.
"""

from __future__ import annotations

import re

from agents.grounding import normalize
from agents.schemas import EmailDraft, Offer, Profile, ProspectInfo, RenderedEmail, ValidationResult

__all__ = [
    "BODY_WORDS",
    "CHECKS",
    "SPAM_PHRASES",
    "SUBJECT_CHARS",
    "validate_email",
    "word_count",
]

#: Check names, in report order.
CHECKS: tuple[str, ...] = ("merge_tags", "grounded", "length", "subject_length", "spam", "one_cta", "opt_out")
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
_URL = re.compile(r"\bhttps?://[^\s<>\"')\]]+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_DOMAIN = re.compile(r"\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_FACT_TAG = re.compile(r"\{\{\s*fact\.[a-z_]+\s*\}\}")
_WORD = re.compile(r"\S+")


def word_count(text: str) -> int:
    """Number of whitespace-separated words in ``text``."""
    return len(_WORD.findall(text))


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "").rstrip(".") for n in _NUMBER.findall(text)}


def _ungrounded(rendered: RenderedEmail, allowed_text: str) -> list[str]:
    """Numbers, URLs, emails and domains of ``rendered`` that do not occur in ``allowed_text``."""
    text = f"{rendered.subject}\n{rendered.body}"
    allowed_norm = normalize(allowed_text)
    missing: list[str] = []
    for url in _URL.findall(text):
        url = url.rstrip(".,;:!?")
        if normalize(url) not in allowed_norm:
            missing.append(url)
    rest = _URL.sub(" ", text)
    for email in _EMAIL.findall(rest):
        if normalize(email) not in allowed_norm:
            missing.append(email)
    rest = _EMAIL.sub(" ", rest)
    for domain in _DOMAIN.findall(rest):
        if not re.search(rf"(?<![\w-]){re.escape(normalize(domain))}(?![\w-])", allowed_norm):
            missing.append(domain)
    known_numbers = _numbers(allowed_text)
    missing += sorted(_numbers(_DOMAIN.sub(" ", rest)) - known_numbers)
    return list(dict.fromkeys(missing))


def validate_email(
    draft: EmailDraft,
    rendered: RenderedEmail,
    prospect: ProspectInfo,
    profile: Profile,
    offer: Offer,
) -> ValidationResult:
    """Run the named checks on an email.

    Args:
        draft: The email as written (with merge tags); ``grounded`` requires a ``{{fact.*}}`` tag here.
        rendered: The same email with tags filled (``agents.writer.render``).
        prospect, profile, offer: The only allowed sources of numbers, URLs, domains and email
            addresses (all prospect and offer fields; the profile's fact values).

    Returns:
        ``checks`` for every name in ``CHECKS`` and one error string per failed check, each starting
        with the check name and saying what to change.
    """
    checks: dict[str, bool] = {}
    errors: list[str] = []

    def record(name: str, ok: bool, message: str) -> None:
        checks[name] = ok
        if not ok:
            errors.append(f"{name}: {message}")

    text = f"{rendered.subject}\n{rendered.body}"
    left = "{{" in text or "}}" in text
    record("merge_tags", not left,
           "the rendered email still contains '{{' or '}}'; write merge tags exactly as listed, "
           "e.g. {{first_name}}, and no other braces")

    allowed_text = "\n".join(
        [*prospect.model_dump().values(), *offer.model_dump().values(), *(f.value for f in profile.facts)]
    )
    missing = _ungrounded(rendered, allowed_text)
    has_fact = _FACT_TAG.search(draft.body) is not None
    problems = []
    if not has_fact:
        problems.append("the body mentions no company fact; use at least one {{fact.<field>}} tag")
    if missing:
        problems.append(
            f"the email mentions {', '.join(repr(m) for m in missing)}, which the prospect, offer and "
            "profile facts do not contain; remove it or use a {{fact.<field>}} tag"
        )
    record("grounded", not problems, "; ".join(problems))

    words = word_count(rendered.body)
    lo, hi = BODY_WORDS
    record("length", lo <= words <= hi,
           f"the body has {words} words, {'too short' if words < lo else 'too long'}; "
           f"write between {lo} and {hi} words (aim for 60-160)")

    chars = len(rendered.subject.strip())
    slo, shi = SUBJECT_CHARS
    record("subject_length", slo <= chars <= shi,
           f"the subject has {chars} characters, {'too short' if chars < slo else 'too long'}; "
           f"write {slo} to {shi} characters (aim for at most 60)")

    spam = list(dict.fromkeys(m.group(0).lower() for m in _SPAM.finditer(text)))
    record("spam", not spam, f"remove the spam phrase(s) {', '.join(repr(s) for s in spam)}")

    cta = normalize(offer.call_to_action).rstrip(".?!")
    count = normalize(text).count(cta) if cta else 0
    record("one_cta", count == 1,
           f"the call to action {offer.call_to_action!r} appears {count} times; include it exactly once, "
           "word for word, and no other call to action")

    record("opt_out", contains_opt_out(rendered.body, offer.opt_out_line),
           f"end the body with the opt-out line, word for word: {offer.opt_out_line!r}")

    return ValidationResult(checks=checks, errors=errors)


def contains_opt_out(body: str, opt_out_line: str) -> bool:
    """True when ``opt_out_line`` occurs in ``body`` (case- and whitespace-insensitive)."""
    line = normalize(opt_out_line)
    return bool(line) and line in normalize(body)
