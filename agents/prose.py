"""How offer and fact values read inside an email: relevance to the offer and grammatical role.

Two rules the writer (``agents.writer``), the heuristic teacher's templates and the rubric share:

* **Relevance.** A pain-point or event fact belongs in an email only when it connects to what the offer
  solves: its content words share at least one stem with a problem of ``Offer.problems_solved`` or, when
  the offer lists none, with its value proposition (``relevant_problem``). The writer offers only such
  facts to the model (``agents.writer.writable_facts``) and the rubric's ``fact_relevant`` checks it.
  Content words are the words of ``[a-z0-9]`` letters left after ``STOPWORDS`` and numbers are
  removed; stems come from a light inflectional stemmer (Harman 1991, "How effective is suffixing?",
  the S-stemmer, extended with ``-ed``/``-ing`` and a final ``-e``), so "expanded" meets "expanding"
  and "offices" meets "office", but "officer" does not meet "office" as it would under Porter's
  derivational rules, nor "marketing" "market" (a short list of ``-ing`` nouns is left whole).
* **Grammatical role.** Each profile field's value has one role (``FIELD_ROLES``): a noun phrase, a
  past-tense verb phrase that follows the company's name, a place, a count that reads before "people",
  a year or a name. ``prose_problem`` says why a value cannot fill a slot of its role (a tag slug such
  as ``developer-tools``, a tag list, a capitalised verb phrase, a count of one ...); ``prose_value``
  normalises what can be fixed without changing the fact (trailing punctuation, the sentence-start or
  title casing of a noun phrase); ``grammatical_number`` tells singular from plural noun phrases so a
  template can agree with them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

__all__ = [
    "FIELD_ROLES",
    "GATED_FIELDS",
    "STOPWORDS",
    "content_stems",
    "grammatical_number",
    "lower_first",
    "prose_problem",
    "prose_value",
    "relevant_problem",
    "stem",
]

Role = Literal["noun phrase", "verb phrase", "place", "count", "year", "name"]

#: The grammatical role of each profile field's value.
FIELD_ROLES: dict[str, Role] = {
    "industry": "noun phrase",
    "product": "name",
    "customer_segment": "noun phrase",
    "location": "place",
    "employee_count": "count",
    "founded_year": "year",
    "recent_event": "verb phrase",
    "pain_point": "noun phrase",
}
#: Fields whose facts the writer uses only when they are relevant to the offer (``relevant_problem``).
GATED_FIELDS: frozenset[str] = frozenset({"pain_point", "recent_event"})

#: Words that carry no topic: English function words and words every business text has.
STOPWORDS: frozenset[str] = frozenset(
    "a an the and or but nor so yet of in on at to for from by with without into onto over under about "
    "after before between through during across against among around per via than then that this these "
    "those there here it its it's is are was were be been being has have had do does did done can could "
    "will would shall should may might must not no yes all any each every some more most much many few "
    "less least other another such own same very too just also only even still again ever now new next "
    "recent recently last first one two three four five six seven eight nine ten hundred thousand million "
    "billion us we our ours you your yours they them their theirs he him his she her i me my who whom "
    "whose which what when where why how while if as up down out off well get gets got make makes made "
    "team teams company companies business businesses people year years month months week day days way "
    "ways thing things lot lots part kind help helps helping use uses using used work works working".split()
)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_TRAILING = re.compile(r"[\s,;:!?]+$")
_ABBREVIATION = re.compile(r"(?:\b[A-Za-z]\.[A-Za-z]\.|\b(?:inc|ltd|co|corp|llc|st|jr|sr|no|vs|etc)\.)$",
                           re.IGNORECASE)
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)+$")
_LIST_SEPARATORS = re.compile(r"\s*[,;|/]\s*")
_TAGGISH = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_IRREGULAR_PAST = frozenset(
    "won began built grew hit made became brought took led sold set wrote rose bought began broke chose "
    "drew drove fell found gave got held kept knew left lost met paid put ran saw sent shut spent stood "
    "struck swore threw told thought understood went".split()
)
_AUXILIARIES = frozenset("has have had was were is are just recently also".split())
_MASS_NOUNS = frozenset(
    "analytics logistics news series chaos economics ethics physics politics means data status process "
    "access success business compliance".split()
)
_PREPOSITIONS = frozenset("of on for in at with from to across among between by during under over about "
                          "into within without per via".split())
#: Nouns that only look inflected: "marketing" is not "market", "series" is not "sery".
_UNSTEMMED = frozenset(
    "marketing pricing engineering accounting banking hosting manufacturing shipping housing clothing "
    "catering computing advertising publishing lending staffing consulting series species news".split()
)
#: ``-ing`` words that head or modify noun phrases rather than start a gerund ("phishing attacks").
_ING_NOUNS = _UNSTEMMED | frozenset(
    "phishing onboarding billing invoicing scheduling training hiring recruiting ticketing routing tracking "
    "reporting messaging networking spending".split()
)
_PARTICIPLE_ADJECTIVES = frozenset(
    "rising growing increasing declining falling missing shrinking existing changing competing recurring "
    "remaining lingering mounting outstanding failing ongoing slowing spiraling spiralling".split()
)
_COMMON_ZIPF = 3.0


@lru_cache(maxsize=8192)
def stem(word: str) -> str:
    """The light inflectional stem of a lower-case ``word`` (rules: module docstring)."""
    if len(word) <= 3 or word in _UNSTEMMED:
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # planned -> plan, stopping -> stop (but "called", "passed" keep theirs)
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def content_stems(text: str) -> set[str]:
    """Stems of the content words of ``text``: lower-cased words, no ``STOPWORDS``, no numbers."""
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    return {stem(w.split("'")[0]) for w in words if w not in STOPWORDS and not w.isdigit() and len(w) > 1}


def relevant_problem(value: str, problems: Sequence[str], value_proposition: str) -> tuple[bool, str | None]:
    """Whether ``value`` connects to what an offer solves, and through which of its problems.

    Args:
        value: A fact value (a pain point or an event).
        problems: The offer's ``problems_solved`` (may be empty).
        value_proposition: The offer's value proposition, used only when ``problems`` is empty.

    Returns:
        ``(relevant, problem)``: ``relevant`` is True when the value shares a content stem with a
        problem or (only when there are no problems) the value proposition; ``problem`` is the problem
        sharing the most stems (the first on ties), or None when none does.
    """
    stems = content_stems(value)
    problems = [p for p in problems if p.strip()]
    if not stems:
        return False, None
    if not problems:
        return bool(stems & content_stems(value_proposition)), None
    best, best_shared = None, 0
    for problem in problems:
        shared = len(stems & content_stems(problem))
        if shared > best_shared:
            best, best_shared = problem, shared
    return best is not None, best


def _is_common(word: str) -> bool:
    from wordfreq import zipf_frequency

    return zipf_frequency(word.lower(), "en") >= _COMMON_ZIPF


def lower_first(text: str) -> str:
    """``text`` with its first word lower-cased when that word is capitalised only because it starts a
    sentence: written ``Xxxx`` (not ``XXX`` or ``xXx``), a common English word (``wordfreq`` Zipf >= 3) and
    not ``I``. Used to put a phrase after a comma or inside a sentence."""
    match = re.match(r"([A-Z][a-z]+)\b", text)
    if not match or not _is_common(match.group(1)) or match.group(1) == "I":
        return text
    return text[0].lower() + text[1:]


def _strip_trailing(value: str) -> str:
    value = _TRAILING.sub("", value.strip())
    while value.endswith(".") and not _ABBREVIATION.search(value):
        value = value[:-1].rstrip()
    return value


def _recase_noun_phrase(value: str) -> str:
    words = value.split()
    letters = [w for w in words if any(c.isalpha() for c in w)]
    all_caps = len(letters) >= 2 and all(w.isupper() for w in letters)
    title = len([w for w in letters if len(w) >= 4]) >= 2 and all(
        w[0].isupper() for w in letters if len(w) >= 4 and w.lower() not in _PREPOSITIONS)
    if all_caps or title:
        fixed = []
        for w in words:
            plain = w.isalpha() and (w.isupper() if all_caps else (w[0].isupper() and w[1:].islower()))
            fixed.append(w.lower() if plain and len(w) >= 4 and _is_common(w) else w)
        return " ".join(fixed)
    return lower_first(value)


def prose_value(field: str, value: str) -> str:
    """``value`` as it is written into an email: stripped, without trailing punctuation (a final period is
    kept only after an abbreviation such as "D.C." or "Inc."), and, for noun-phrase fields, without the
    capitals of a sentence start, a heading in Title Case or ALL CAPS (common words only: acronyms and
    names keep theirs). The result is still a case-insensitive span of the fact's evidence."""
    value = _strip_trailing(value)
    if FIELD_ROLES.get(field) == "noun phrase":
        value = _recase_noun_phrase(value)
    return value


def _is_tag_list(value: str) -> bool:
    parts = [p for p in _LIST_SEPARATORS.split(value) if p]
    return len(parts) >= 2 and all(_TAGGISH.match(p) for p in parts)


def _is_slug(value: str) -> bool:
    return bool(_SLUG.match(value)) and all(len(part) >= 3 for part in value.split("-"))


def prose_problem(field: str, value: str) -> str | None:
    """Say why ``value`` (after ``prose_value``) cannot fill a template slot of its field's role, or None.

    A value of any field fails when it is empty, longer than 16 words, a tag slug (``developer-tools``:
    one lower-case token of hyphen-joined parts of three or more letters), a tag list (``b2b, saas``) or a
    lower-case token of at most three letters (``api``). By role: a noun phrase must not be in ALL CAPS; a
    verb phrase must start with a lower-case past-tense verb or auxiliary ("raised ...", "has opened ...");
    a place must start with a capital letter; a count must not be one (it reads before "people"); a year
    has four digits; a name starts with a capital letter or a digit.

    Args:
        field: A field of ``agents.schemas.FACT_FIELDS``.
        value: The value as ``prose_value`` returns it.

    Returns:
        A short reason, or None when the value reads as prose in its role.
    """
    role = FIELD_ROLES.get(field)
    if not value.strip():
        return "empty"
    if len(value.split()) > 16:
        return "longer than 16 words"
    if _is_slug(value):
        return "a tag slug, not words"
    if _is_tag_list(value):
        return "a list of tags"
    if " " not in value and value.islower() and len(value) <= 3:
        return "a lower-case tag, not a word"
    first = value.split()[0]
    if role == "noun phrase" and value.isupper() and len(value) > 4:
        return "written in capitals"
    if role == "verb phrase":
        word = first.lower()
        if not first.islower():
            return "does not start with a lower-case verb (it cannot follow the company's name)"
        if not (word.endswith("ed") or word in _IRREGULAR_PAST or word in _AUXILIARIES):
            return "does not start with a past-tense verb"
    if role == "place" and not first[:1].isupper():
        return "a place name that does not start with a capital letter"
    if role == "count" and value.lower() in {"1", "one", "a single"}:
        return "a count of one (it does not read before 'people')"
    if role == "year" and not re.fullmatch(r"\d{4}", value):
        return "not a four-digit year"
    if role == "name" and not (first[:1].isupper() or first[:1].isdigit()):
        return "not a name (it does not start with a capital letter or a digit)"
    return None


def grammatical_number(phrase: str) -> Literal["singular", "plural"]:
    """Whether the noun phrase ``phrase`` takes a singular or a plural verb.

    The head is the last word before the first preposition ("attacks" in "phishing attacks on staff"),
    else the last word; a head ending in ``s`` (not ``ss``, ``us`` or ``is``) and not a mass noun such as
    "analytics" is plural; a gerund phrase ("finding the accounts", "hitting targets") is singular, unless its
    first word is a participle used as an adjective ("rising return rates") or an ``-ing`` noun
    ("phishing attacks", "onboarding delays").
    """
    words = [w.strip(",.;:").lower() for w in phrase.split()]
    if not words:
        return "singular"
    if (words[0].endswith("ing") and len(words) > 1 and words[0] not in _PARTICIPLE_ADJECTIVES
            and words[0] not in _ING_NOUNS):
        return "singular"
    head = words[-1]
    for i, w in enumerate(words):
        if i and w in _PREPOSITIONS:
            head = words[i - 1]
            break
    plural = head.endswith("s") and not head.endswith(("ss", "us", "is")) and head not in _MASS_NOUNS
    return "plural" if plural else "singular"
