"""A deterministic rubric for written emails: one named pass/fail check per rule.

The rubric reuses the graph's own email checks (``agents.validation.validate_email``) for the rules they
already enforce, so what is measured is what the graph validates, and adds the rules of craft the writer
prompt asks for (``agents.prompts.WRITER_SYSTEM_PROMPT``) and two checks over a whole campaign:

=====================  ==============================================================================
check                  passes when
=====================  ==============================================================================
``fact_used``          the body *template* uses at least one ``{{fact.<field>}}`` tag whose fact exists in
                       the profile (a grounded, prospect-specific fact).
``no_unsupported``     the rendered email names no number, URL, domain or email address absent from the
                       prospect, the offer and the profile's fact values (``validate_email``'s grounding
                       scan) and no capitalised name absent from them (``unsupported_names``).
``length``             body length within ``agents.validation.BODY_WORDS`` words.
``one_cta``            the offer's call to action appears exactly once.
``subject_length``     subject length within ``agents.validation.SUBJECT_CHARS`` characters.
``no_spam``            no phrase of ``agents.validation.SPAM_PHRASES``.
``merge_tags``         no unresolved merge tag (``{{``/``}}``) left in the rendered email.
``opt_out``            the offer's opt-out line is in the body.
``opener``             the greeting is not "Dear ..." or "To whom ...", and the first sentence after it
                       is about the prospect: its first word is not I, I'm, me, my, we, our, us (...).
``subject_form``       the subject has ``SUBJECT_WORDS`` (2 to 5) words, no "!", no shouted word (four or
                       more capitals that the prospect's company does not have), and names neither the
                       product, the sender's company nor the prospect's first name.
``word_band``          ``WORD_BAND`` (50 to 90) words from the start of the body to the end of the call
                       to action.
``product_once``       the product's name occurs exactly once between the greeting and the call to
                       action (the signature does not count).
``proof_point``        the offer has no proof point, or the body has every number of it and at least
                       ``PROOF_SHARE`` of its content stems (``agents.prose.content_stems``).
``fact_relevant``      every pain-point or event fact the body template uses is relevant to the offer
                       (``agents.prose.relevant_problem``: it shares a stem with a problem it solves).
``sentence_variety``   (campaign) no free sentence of the email appears in more than ``MAX_SHARE`` (20%)
                       of the campaign's emails.
``ngram_variety``      (campaign) at most ``MAX_REPEATED_NGRAMS`` (half) of the distinct word trigrams of
                       the rendered email's free sentences appear in more than ``MAX_SHARE`` of the
                       campaign's emails (what the prospect reads, so fact values and names count).
=====================  ==============================================================================

Free sentences are the sentences of the body *template* (merge tags as written, so the same frame with
other facts is the same sentence), without the call to action, the opt-out line and short lines that
do not end a sentence (the greeting, the sign-off, the signature), lower-cased. A campaign check needs
the other emails: ``score_email`` scores one email on the email checks, ``score_campaign`` adds the
campaign checks to a campaign's results, and ``summarize_rubric`` and ``evals.judge.judge_pairs`` call
it. "More than 20%" is more than ``floor(0.2 * n)`` of ``n`` written emails; a campaign of fewer than
``MIN_CAMPAIGN_EMAILS`` (10) written emails is too small to tell a habit from chance (a sentence in 2 of
6 emails is 33%), so there the campaign checks pass. Distinct-3 (``CampaignVariety.distinct_3``) is the
number of distinct word trigrams of the rendered free sentences over all of them (Li et al. 2016, "A
Diversity-Promoting Objective Function for Neural Conversation Models", distinct-n).

A prospect for whom no email was written fails every check (``RubricResult.missing``), so a
configuration that fails often cannot look better by writing fewer emails.

Name check (``unsupported_names``): every capitalised word (``[A-Z]`` then letters, digits, ``'`` or ``-``)
that does not start a sentence or a line, is not ``I`` and is not a weekday or month name must occur,
case-insensitively, among the words of the prospect, offer and fact values. Sentence-initial words are
skipped because English capitalises them anyway; a name there goes unnoticed (a known limit of a rule
without a part-of-speech tagger).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from agents.prose import GATED_FIELDS, content_stems, prose_value, relevant_problem
from agents.schemas import EmailDraft, Offer, Profile, ProspectInfo, RenderedEmail
from agents.validation import validate_email, word_count
from agents.writer import used_merge_tags

__all__ = [
    "CAMPAIGN_CHECKS",
    "EMAIL_CHECKS",
    "MAX_REPEATED_NGRAMS",
    "MAX_SHARE",
    "MIN_CAMPAIGN_EMAILS",
    "PROOF_SHARE",
    "RUBRIC_CHECKS",
    "SUBJECT_WORDS",
    "WORD_BAND",
    "CampaignVariety",
    "RubricResult",
    "RubricSummary",
    "campaign_variety",
    "free_sentences",
    "score_campaign",
    "score_email",
    "summarize_rubric",
    "unsupported_names",
]

#: Checks of one email, in report order.
EMAIL_CHECKS: tuple[str, ...] = (
    "fact_used",
    "no_unsupported",
    "length",
    "one_cta",
    "subject_length",
    "no_spam",
    "merge_tags",
    "opt_out",
    "opener",
    "subject_form",
    "word_band",
    "product_once",
    "proof_point",
    "fact_relevant",
)
#: Checks of one email against the rest of its campaign (``score_campaign``).
CAMPAIGN_CHECKS: tuple[str, ...] = ("sentence_variety", "ngram_variety")
#: Rubric check names, in report order.
RUBRIC_CHECKS: tuple[str, ...] = EMAIL_CHECKS + CAMPAIGN_CHECKS
#: Words from the start of the body to the end of the call to action (inclusive).
WORD_BAND: tuple[int, int] = (50, 90)
#: Words of a subject (inclusive).
SUBJECT_WORDS: tuple[int, int] = (2, 5)
#: Share of a proof point's content stems the body must have.
PROOF_SHARE = 0.6
#: Largest share of a campaign's emails a free sentence (or trigram) may appear in before it counts as
#: repeated.
MAX_SHARE = 0.2
#: Largest share of an email's distinct trigrams that may be repeated ones.
MAX_REPEATED_NGRAMS = 0.5
#: Fewest written emails for the campaign checks to be measured; in a smaller campaign they pass.
MIN_CAMPAIGN_EMAILS = 10

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
_FIRST_PERSON = frozenset("i i'm i've i'd i'll me my mine myself we we're we've we'd we'll our ours us".split())
_STIFF_GREETING = re.compile(r"^\s*(?:dear|to whom)\b", re.IGNORECASE)
_GREETING = re.compile(r"^\s*(?:hi|hello|hey|dear|good (?:morning|afternoon|evening)|greetings)\b|[,\u2014-]\s*$",
                       re.IGNORECASE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_TOKEN = re.compile(r"\{\{[^{}]+\}\}|[\w'$%.-]+")
_SHOUTED = re.compile(r"\b[A-Z]{4,}\b")

_R = TypeVar("_R", Sequence["RubricResult"], Mapping[str, "RubricResult"])


@dataclass(frozen=True)
class RubricResult:
    """The rubric's verdict on one email.

    Attributes:
        checks: ``{check name: passed}`` for every name in ``EMAIL_CHECKS``, and in ``CAMPAIGN_CHECKS``
            once ``score_campaign`` has seen the email's campaign (``RUBRIC_CHECKS`` order).
        problems: one human-readable line per failed check, starting with the check name.
        facts_used: distinct ``fact.<field>`` tags of the body template whose fact exists.
        written: False when no email was written (every check then fails).
        sentences: the free sentences of the body template (module docstring), for ``sentence_variety``.
        trigrams: the word trigrams of the rendered body's free sentences, for ``ngram_variety``.
    """

    checks: dict[str, bool]
    problems: list[str] = field(default_factory=list)
    facts_used: int = 0
    written: bool = True
    sentences: tuple[str, ...] = ()
    trigrams: frozenset[tuple[str, ...]] = frozenset()

    @property
    def passed(self) -> int:
        """Number of checks passed (0 to ``len(RUBRIC_CHECKS)``)."""
        return sum(self.checks.values())

    @property
    def ok(self) -> bool:
        """True when every check made passed."""
        return all(self.checks.values())

    @classmethod
    def missing(cls, reason: str = "no email was written") -> RubricResult:
        """The verdict for a prospect without an email: every check failed with ``reason``."""
        return cls(checks=dict.fromkeys(RUBRIC_CHECKS, False), problems=[f"email: {reason}"], written=False)


def _possessive_stripped(word: str) -> str:
    return word[:-2] if word.endswith(("'s", "\u2019s")) else word


def unsupported_names(text: str, allowed: Iterable[str]) -> list[str]:
    """Capitalised words of ``text`` that occur in none of ``allowed`` (rules: module docstring).

    Args:
        text: rendered subject and body.
        allowed: texts whose words may be named (prospect, offer and fact values).

    Returns:
        The offending words in order of first appearance, without duplicates.
    """
    known = {_possessive_stripped(w.casefold().strip("'-")) for a in allowed for w in _WORDS.findall(a)}
    known |= _ALWAYS_ALLOWED
    out: list[str] = []
    for match in _CAPITALISED.finditer(text):
        word = _possessive_stripped(match.group(0).strip("'-"))
        if not word or _SENTENCE_START.search(text[: match.start()]) or word.casefold() in known:
            continue
        out.append(word)
    return list(dict.fromkeys(out))


def _phrase(text: str) -> re.Pattern[str]:
    """``text`` as a case-insensitive pattern on word boundaries that allows any whitespace between words."""
    words = [re.escape(w) for w in text.split()]
    return re.compile(r"(?<![\w])" + r"\s+".join(words) + r"(?![\w])", re.IGNORECASE)


def _greeting_and_rest(body: str) -> tuple[str, str]:
    """The body's greeting line ('' when it has none) and the text after it."""
    stripped = body.strip()
    first, _, rest = stripped.partition("\n")
    if len(first.split()) <= 6 and _GREETING.search(first):
        return first.strip(), rest.strip()
    return "", stripped


def _up_to_cta(body: str, offer: Offer) -> str | None:
    """The body from its start to the end of the call to action, or None without one."""
    cta = offer.call_to_action.strip().rstrip(".?!")
    match = _phrase(cta).search(body) if cta else None
    return body[: match.end()] if match else None


def free_sentences(body: str, offer: Offer) -> tuple[str, ...]:
    """The free sentences of a body (module docstring), lower-cased, whitespace collapsed, without their
    final punctuation, in order and without duplicates."""
    text = body
    for fixed in (offer.call_to_action, offer.opt_out_line):
        if fixed.strip():
            text = _phrase(fixed.strip()).sub(" ", text)
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or (len(line.split()) <= 5 and line[-1] not in ".!?"):
            continue
        for sentence in _SENTENCE_SPLIT.split(line):
            key = re.sub(r"\{\{\s*([^{}]*?)\s*\}\}", r"{{\1}}", " ".join(sentence.split())).lower()
            key = key.strip(" .!?")
            if key:
                out.append(key)
    return tuple(dict.fromkeys(out))


def _trigrams(sentences: Iterable[str]) -> list[tuple[str, ...]]:
    grams: list[tuple[str, ...]] = []
    for sentence in sentences:
        tokens = _TOKEN.findall(sentence)
        grams += [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    return grams


def _craft(draft: EmailDraft, rendered: RenderedEmail, prospect: ProspectInfo, profile: Profile,
           offer: Offer) -> dict[str, str | None]:
    """The craft checks: check name -> a problem line, or None when it passed."""
    out: dict[str, str | None] = {}
    greeting, rest = _greeting_and_rest(rendered.body)
    first_sentence = _SENTENCE_SPLIT.split(rest, maxsplit=1)[0] if rest else ""
    first_word = (_WORDS.findall(first_sentence.lower()) or [""])[0]
    if _STIFF_GREETING.match(greeting):
        out["opener"] = f"opener: greet plainly ('Hi ...'), not {greeting!r}"
    elif first_word in _FIRST_PERSON:
        out["opener"] = (f"opener: the first sentence starts with {first_word!r}; open with the prospect's "
                         "world, not yourself")
    else:
        out["opener"] = None

    subject = rendered.subject.strip()
    words = _WORDS.findall(subject)
    lo, hi = SUBJECT_WORDS
    named = [name for name in (offer.product, offer.sender_company) if name.strip() and _phrase(name).search(subject)]
    named += [f"{{{{{t}}}}}" for t in used_merge_tags(draft.subject) if t in {"product", "sender_company"}]
    first_name = prospect.first_name.strip()
    has_first_name = bool(first_name and _phrase(first_name).search(subject)) or \
        "first_name" in used_merge_tags(draft.subject)
    shouted = [w for w in _SHOUTED.findall(subject) if w.lower() not in prospect.company.lower()]
    subject_problems = []
    if not lo <= len(words) <= hi:
        subject_problems.append(f"it has {len(words)} words; write {lo} to {hi}")
    if named:
        subject_problems.append(f"it names {', '.join(dict.fromkeys(named))}: no product pitch")
    if has_first_name:
        subject_problems.append("it carries the first name")
    if "!" in subject or shouted:
        subject_problems.append("it shouts ('!' or capitals)")
    out["subject_form"] = f"subject_form: {'; '.join(subject_problems)}" if subject_problems else None

    head = _up_to_cta(rendered.body, offer)
    if head is None:
        out["word_band"] = "word_band: no call to action to count the words up to"
    else:
        n = word_count(head)
        blo, bhi = WORD_BAND
        out["word_band"] = None if blo <= n <= bhi else (
            f"word_band: {n} words from the greeting to the call to action; write {blo} to {bhi}")

    region = (head if head is not None else rendered.body)[len(greeting):]
    product = offer.product.strip()
    times = len(_phrase(product).findall(region)) if product else 1
    out["product_once"] = None if times == 1 else (
        f"product_once: the product {product!r} is named {times} times before the call to action; name it once")

    proof = offer.proof_point.strip()
    if proof:
        numbers = set(_NUMBER.findall(proof)) - set(_NUMBER.findall(rendered.body))
        stems = content_stems(proof)
        share = len(stems & content_stems(rendered.body)) / len(stems) if stems else 1.0
        out["proof_point"] = None if not numbers and share >= PROOF_SHARE else (
            f"proof_point: the offer's proof point {proof!r} is not used; cite it once")
    else:
        out["proof_point"] = None

    irrelevant = []
    for tag in used_merge_tags(draft.body):
        fact = profile.fact(tag[5:]) if tag.startswith("fact.") else None
        if fact is None or fact.field not in GATED_FIELDS:
            continue
        value = prose_value(fact.field, fact.value)
        if not relevant_problem(value, offer.problems_solved, offer.value_proposition)[0]:
            irrelevant.append(f"{fact.field} {value!r}")
    out["fact_relevant"] = (f"fact_relevant: {', '.join(irrelevant)} shares no word with what the offer solves; "
                            "use another fact or the role") if irrelevant else None
    return out


def score_email(
    draft: EmailDraft,
    rendered: RenderedEmail,
    prospect: ProspectInfo,
    profile: Profile,
    offer: Offer,
) -> RubricResult:
    """Score one email with the rubric's email checks (``score_campaign`` adds the campaign checks).

    Args:
        draft: the email as written, with merge tags (``EmailRecord.subject_template/body_template``).
        rendered: the same email with tags filled (``EmailRecord.subject/body``).
        prospect: the recipient.
        profile: the researcher's profile the email was written from.
        offer: the campaign's offer.

    Returns:
        ``RubricResult`` with a verdict for every check of ``EMAIL_CHECKS`` and the email's free sentences.
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

    allowed = [*prospect.model_dump().values(), *(str(v) for v in offer.model_dump().values()),
               *offer.problems_solved, *(f.value for f in profile.facts)]
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
    for check, problem in _craft(draft, rendered, prospect, profile, offer).items():
        checks[check] = problem is None
        if problem:
            problems.append(problem)
    return RubricResult(checks={c: checks[c] for c in EMAIL_CHECKS}, problems=problems, facts_used=len(used),
                        sentences=free_sentences(draft.body, offer),
                        trigrams=frozenset(_trigrams(free_sentences(rendered.body, offer))))


@dataclass(frozen=True)
class CampaignVariety:
    """How much a campaign's emails repeat each other (module docstring).

    Attributes:
        emails: written emails.
        top_sentence: the free sentence in the most emails ('' when there is none).
        top_share: the share of written emails that have it, in [0, 1].
        distinct_3: distinct word trigrams over all trigrams of the rendered free sentences (each email's
            distinct trigrams counted once per email), in [0, 1] (0.0 without any).
        repeated_sentences: free sentences in more than ``MAX_SHARE`` of the emails.
    """

    emails: int
    top_sentence: str
    top_share: float
    distinct_3: float
    repeated_sentences: frozenset[str]


def _limit(n: int) -> int:
    """Most emails a sentence or trigram may appear in; every one when the campaign is too small to tell."""
    return max(1, math.floor(MAX_SHARE * n)) if n >= MIN_CAMPAIGN_EMAILS else n


def campaign_variety(results: Iterable[RubricResult]) -> CampaignVariety:
    """Measure the repetition among the written emails of ``results`` (one campaign's)."""
    written = [r for r in results if r.written]
    sentences = Counter(s for r in written for s in r.sentences)
    total = sum(len(r.trigrams) for r in written)
    distinct = len(set().union(*(r.trigrams for r in written))) if written else 0
    top, count = sentences.most_common(1)[0] if sentences else ("", 0)
    limit = _limit(len(written))
    return CampaignVariety(
        emails=len(written), top_sentence=top, top_share=count / len(written) if written else 0.0,
        distinct_3=distinct / total if total else 0.0,
        repeated_sentences=frozenset(s for s, c in sentences.items() if c > limit))


def score_campaign(results: _R) -> _R:
    """Add the campaign checks to one campaign's results (same keys or order; missing emails fail them).

    Args:
        results: every result of one campaign (a sequence, or a mapping from prospect to result).

    Returns:
        The results, each with ``sentence_variety`` and ``ngram_variety`` set (module docstring).
    """
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    variety = campaign_variety(items)
    limit = _limit(variety.emails)
    grams = Counter(g for r in items if r.written for g in r.trigrams)
    scored: list[RubricResult] = []
    for r in items:
        checks, problems = dict(r.checks), [p for p in r.problems if p.split(":", 1)[0] not in CAMPAIGN_CHECKS]
        if not r.written:
            checks.update(dict.fromkeys(CAMPAIGN_CHECKS, False))
        else:
            repeated = [s for s in r.sentences if s in variety.repeated_sentences]
            checks["sentence_variety"] = not repeated
            if repeated:
                problems.append(f"sentence_variety: {repeated[0]!r} is in more than {MAX_SHARE:.0%} of the "
                                f"campaign's {variety.emails} emails; vary it")
            share = sum(grams[g] > limit for g in r.trigrams) / len(r.trigrams) if r.trigrams else 0.0
            checks["ngram_variety"] = share <= MAX_REPEATED_NGRAMS
            if share > MAX_REPEATED_NGRAMS:
                problems.append(f"ngram_variety: {share:.0%} of its word trigrams are in more than {MAX_SHARE:.0%} "
                                "of the campaign's emails; write more of it for this prospect")
        scored.append(replace(r, checks={c: checks[c] for c in RUBRIC_CHECKS if c in checks}, problems=problems))
    if isinstance(results, Mapping):
        return dict(zip(results, scored, strict=True))  # type: ignore[return-value]
    return scored  # type: ignore[return-value]


@dataclass(frozen=True)
class RubricSummary:
    """Rubric pass rates over one campaign's prospects.

    Attributes:
        n: prospects scored (emails written or not).
        written: prospects with an email.
        pass_rates: ``{check: passed / n}`` for every check of ``RUBRIC_CHECKS``, in [0, 1].
        all_pass_rate: share of prospects whose email passed every check.
        mean_passed: mean number of checks passed per prospect.
        variety: the campaign's repetition figures (``campaign_variety``).
    """

    n: int
    written: int
    pass_rates: dict[str, float]
    all_pass_rate: float
    mean_passed: float
    variety: CampaignVariety


def summarize_rubric(results: Sequence[RubricResult] | Mapping[str, RubricResult]) -> RubricSummary:
    """Pass rate per check over one campaign's ``results`` (a prospect without an email fails every check).

    Results that lack the campaign checks get them first (``score_campaign`` over ``results``).

    Args:
        results: rubric results, as a sequence or a mapping (its values are used).

    Returns:
        ``RubricSummary``; every rate is 0.0 when ``results`` is empty.
    """
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    if any(c not in r.checks for r in items for c in CAMPAIGN_CHECKS):
        items = list(score_campaign(items))
    n = len(items)
    rates = {c: (sum(r.checks[c] for r in items) / n if n else 0.0) for c in RUBRIC_CHECKS}
    return RubricSummary(
        n=n,
        written=sum(r.written for r in items),
        pass_rates=rates,
        all_pass_rate=sum(r.ok for r in items) / n if n else 0.0,
        mean_passed=sum(r.passed for r in items) / n if n else 0.0,
        variety=campaign_variety(items),
    )
