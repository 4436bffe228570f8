"""A deterministic rubric for written emails: one named pass/fail check per rule.

The rubric reuses the graph's own email checks (``agents.validation.validate_email``) for the rules they
already enforce, so what is measured is what the graph validates, and adds two that the graph does not
separate:

=================  ==================================================================================
check              passes when
=================  ==================================================================================
``fact_used``      the body *template* uses at least one ``{{fact.<field>}}`` tag whose fact exists in the
                   profile (a grounded, prospect-specific fact).
``no_unsupported`` the rendered email names no number, URL, domain or email address absent from the
                   prospect, the offer and the profile's fact values (``validate_email``'s grounding scan)
                   and no capitalised name absent from them (``unsupported_names``).
``length``         body length within ``agents.validation.BODY_WORDS`` words.
``one_cta``        the offer's call to action appears exactly once.
``subject_length`` subject length within ``agents.validation.SUBJECT_CHARS`` characters.
``no_spam``        no phrase of ``agents.validation.SPAM_PHRASES``.
``merge_tags``     no unresolved merge tag (``{{``/``}}``) left in the rendered email.
``opt_out``        the offer's opt-out line is in the body.
=================  ==================================================================================

A prospect for whom no email was written fails every check (``RubricResult.missing``), so a
configuration that fails often cannot look better by writing fewer emails.

Name check (``unsupported_names``): every capitalised word (``[A-Z]`` then letters, digits, ``'`` or ``-``)
that does not start a sentence or a line, is not ``I`` and is not a weekday or month name must occur,
case-insensitively, among the words of the prospect, offer and fact values. Sentence-initial words are
skipped because English capitalises them anyway; a name there goes unnoticed (a known limit of a rule
without a part-of-speech tagger).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agents.schemas import EmailDraft, Offer, Profile, ProspectInfo, RenderedEmail
from agents.validation import validate_email
from agents.writer import used_merge_tags

__all__ = [
    "RUBRIC_CHECKS",
    "RubricResult",
    "RubricSummary",
    "score_email",
    "summarize_rubric",
    "unsupported_names",
]

#: Rubric check names, in report order.
RUBRIC_CHECKS: tuple[str, ...] = (
    "fact_used",
    "no_unsupported",
    "length",
    "one_cta",
    "subject_length",
    "no_spam",
    "merge_tags",
    "opt_out",
)

#: Rubric check -> the ``validate_email`` check it reads.
_FROM_VALIDATION = {
    "length": "length",
    "one_cta": "one_cta",
    "subject_length": "subject_length",
    "no_spam": "spam",
    "merge_tags": "merge_tags",
    "opt_out": "opt_out",
}
_ALWAYS_ALLOWED = frozenset(
    "i monday tuesday wednesday thursday friday saturday sunday january february march april may june july "
    "august september october november december".split()
)
_CAPITALISED = re.compile(r"(?<![\w'-])[A-Z][\w'-]*")
_WORDS = re.compile(r"[\w'-]+")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)$")
#: A body that surely holds a fact tag: ``validate_email`` then reports grounding problems only.
_FACT_PROBE = " {{fact.industry}}"


@dataclass(frozen=True)
class RubricResult:
    """The rubric's verdict on one email.

    Attributes:
        checks: ``{check name: passed}`` for every name in ``RUBRIC_CHECKS``.
        problems: one human-readable line per failed check, starting with the check name.
        facts_used: distinct ``fact.<field>`` tags of the body template whose fact exists.
        written: False when no email was written (every check then fails).
    """

    checks: dict[str, bool]
    problems: list[str] = field(default_factory=list)
    facts_used: int = 0
    written: bool = True

    @property
    def passed(self) -> int:
        """Number of checks passed (0 to ``len(RUBRIC_CHECKS)``)."""
        return sum(self.checks.values())

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(self.checks.values())

    @classmethod
    def missing(cls, reason: str = "no email was written") -> RubricResult:
        """The verdict for a prospect without an email: every check failed with ``reason``."""
        return cls(checks=dict.fromkeys(RUBRIC_CHECKS, False), problems=[f"email: {reason}"], written=False)


def unsupported_names(text: str, allowed: Iterable[str]) -> list[str]:
    """Capitalised words of ``text`` that occur in none of ``allowed`` (rules: module docstring).

    Args:
        text: rendered subject and body.
        allowed: texts whose words may be named (prospect, offer and fact values).

    Returns:
        The offending words in order of first appearance, without duplicates.
    """
    known = {w.casefold().strip("'-") for a in allowed for w in _WORDS.findall(a)} | _ALWAYS_ALLOWED
    out: list[str] = []
    for match in _CAPITALISED.finditer(text):
        word = match.group(0).strip("'-")
        if word.endswith("'s"):
            word = word[:-2]
        if not word or _SENTENCE_START.search(text[: match.start()]) or word.casefold() in known:
            continue
        out.append(word)
    return list(dict.fromkeys(out))


def score_email(
    draft: EmailDraft,
    rendered: RenderedEmail,
    prospect: ProspectInfo,
    profile: Profile,
    offer: Offer,
) -> RubricResult:
    """Score one email with the rubric.

    Args:
        draft: the email as written, with merge tags (``EmailRecord.subject_template/body_template``).
        rendered: the same email with tags filled (``EmailRecord.subject/body``).
        prospect: the recipient.
        profile: the researcher's profile the email was written from.
        offer: the campaign's offer.

    Returns:
        ``RubricResult`` with a verdict for every check of ``RUBRIC_CHECKS``.
    """
    validation = validate_email(draft, rendered, prospect, profile, offer)
    # Grounding alone: the probe tag makes validate_email's "uses a fact tag" rule pass, so its
    # "grounded" check then says only whether numbers, URLs, domains and addresses are supported.
    probe = validate_email(EmailDraft(subject=draft.subject, body=draft.body + _FACT_PROBE), rendered,
                           prospect, profile, offer)
    checks: dict[str, bool] = {}
    problems: list[str] = []

    known_facts = {f"fact.{f.field}" for f in profile.facts if f.value.strip()}
    used = [t for t in used_merge_tags(draft.body) if t in known_facts]
    checks["fact_used"] = bool(used)
    if not used:
        problems.append("fact_used: the body template uses no {{fact.<field>}} tag of a fact in the profile")

    allowed = [*prospect.model_dump().values(), *offer.model_dump().values(), *(f.value for f in profile.facts)]
    names = unsupported_names(f"{rendered.subject}\n{rendered.body}", allowed)
    numbers_ok = probe.checks.get("grounded", False)
    checks["no_unsupported"] = numbers_ok and not names
    if not numbers_ok:
        problems += [e.replace("grounded:", "no_unsupported:", 1) for e in probe.errors if e.startswith("grounded")]
    if names:
        problems.append(f"no_unsupported: names {', '.join(repr(n) for n in names)} appear in no prospect, offer "
                        "or fact value")

    for check, source in _FROM_VALIDATION.items():
        checks[check] = validation.checks.get(source, False)
        if not checks[check]:
            problems += [e.replace(f"{source}:", f"{check}:", 1) for e in validation.errors if e.startswith(source)]
    return RubricResult(checks={c: checks[c] for c in RUBRIC_CHECKS}, problems=problems, facts_used=len(used))


@dataclass(frozen=True)
class RubricSummary:
    """Rubric pass rates over a set of prospects.

    Attributes:
        n: prospects scored (emails written or not).
        written: prospects with an email.
        pass_rates: ``{check: passed / n}`` for every check of ``RUBRIC_CHECKS``, in [0, 1].
        all_pass_rate: share of prospects whose email passed every check.
        mean_passed: mean number of checks passed per prospect.
    """

    n: int
    written: int
    pass_rates: dict[str, float]
    all_pass_rate: float
    mean_passed: float


def summarize_rubric(results: Sequence[RubricResult] | Mapping[str, RubricResult]) -> RubricSummary:
    """Pass rate per check over ``results`` (a prospect without an email counts as failing every check).

    Args:
        results: rubric results, as a sequence or a mapping (its values are used).

    Returns:
        ``RubricSummary``; every rate is 0.0 when ``results`` is empty.
    """
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    n = len(items)
    rates = {c: (sum(r.checks[c] for r in items) / n if n else 0.0) for c in RUBRIC_CHECKS}
    return RubricSummary(
        n=n,
        written=sum(r.written for r in items),
        pass_rates=rates,
        all_pass_rate=sum(r.ok for r in items) / n if n else 0.0,
        mean_passed=sum(r.passed for r in items) / n if n else 0.0,
    )
