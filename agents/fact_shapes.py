"""The shape each profile field's value must have before a fact is kept.

A verbatim quote is not enough (DESIGN.md, "Grounding by construction"): a founded year must be a
plausible year, an employee count a number or range that keeps its qualifier ("less than 10" is not
10), a location a place, and every phrase field a short phrase that carries no link, address, phone
number, credential request or instruction addressed to the reader. The checks are by structure, not by
a list of attack phrasings; the few word lists here name what a value may not *be about* (credentials,
the reader), in several languages.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from agents.attribution import registrable_domain
from agents.contacts import find_contacts

__all__ = ["CREDENTIAL_WORDS", "EARLIEST_FOUNDED_YEAR", "MAX_PHRASE_WORDS", "value_problem"]

#: Earliest founding year accepted (older companies exist, but B2B prospects founded before are rare
#: and a four-digit number before it is far more often something else).
EARLIEST_FOUNDED_YEAR = 1800
#: Most words in a phrase value (product, customer segment, recent event, pain point, industry).
MAX_PHRASE_WORDS = 16
_MAX_LOCATION_WORDS = 8

_NUM = r"\d{1,3}(?:[,.\u202f ]\d{3})+|\d+"
_QUALIFIERS = (r"less than|fewer than|under|below|up to|at most|more than|over|above|at least|about|around|"
               r"approximately|approx\.?|nearly|almost|roughly|some|close to|between|~|<|>|\+")
_COUNT = re.compile(
    rf"^(?:(?:{_QUALIFIERS})\s*)?(?:{_NUM})\+?(?:\s*(?:-|\u2013|\u2014|to|and)\s*(?:{_NUM})\+?)?$", re.IGNORECASE
)
_QUALIFIER_BEFORE = re.compile(rf"(?:\b(?:{_QUALIFIERS})|[~<>+])\s*$", re.IGNORECASE)
_RANGE_AFTER = re.compile(rf"^\s*(?:\+|(?:-|\u2013|\u2014|to|and)\s*(?:{_NUM}))", re.IGNORECASE)
_QUALIFIER_START = re.compile(rf"^(?:{_QUALIFIERS})", re.IGNORECASE)
_RANGE_INSIDE = re.compile(r"\d\s*(?:-|\u2013|\u2014|to|and)\s*\d|\+$", re.IGNORECASE)
_YEAR = re.compile(r"^\d{4}$")
# A place: letters of any script with spaces, commas, periods, apostrophes, hyphens and parentheses.
_PLACE = re.compile(r"^[^\W\d_][^\W\d_\s.,'\u2019()-]*(?:[\s.,'\u2019()-]+[^\W\d_]+)*\.?$")
_MARKUP = re.compile(r"[{}<>\[\]|\\`]")
# Words that make a value about the reader (second person) in the project's page languages.
_SECOND_PERSON = re.compile(
    r"\b(?:you|your|yours|yourself|yourselves|vous|votre|vos|toi|dich|dein|deine|deinen|euch|euer|"
    r"usted|ustedes|tu|tus|vosotros|vuestro|vuestra|tuo|tua|vostro|jij|jouw)\b",
    re.IGNORECASE,
)
#: Credentials and payment details (several languages), which no company fact or outreach email is about.
CREDENTIAL_WORDS = re.compile(
    r"\b(?:passwords?|passcodes?|passphrases?|log-?ins?|log in|sign-?in|sign in|credentials?|"
    r"card details|card numbers?|credit cards?|cvv|cvc|pin codes?|pin numbers?|one-time codes?|otp|2fa codes?|"
    r"bank details|account numbers?|iban|social security|ssn|seed phrase|private keys?|"
    r"mot de passe|identifiants?|coordonn\u00e9es bancaires|carte bancaire|"
    r"passwort|kennwort|zugangsdaten|anmeldedaten|kartendaten|kreditkarte|"
    r"contrase\u00f1a|credenciales|datos bancarios|tarjeta de cr\u00e9dito)\b",
    re.IGNORECASE,
)
# A value that states an obligation is an instruction to someone, not a company fact ("customers should
# now re-verify billing at ..."), in the project's page languages.
_OBLIGATION = re.compile(
    r"\b(?:should|must|ought to|needs? to|ha(?:ve|s) to|(?:is|are) required to|"
    r"doi(?:t|vent)|devez|faut|m\u00fcssen|muss|sollen|soll|deben|debe|tienen que|tiene que|hay que)\b",
    re.IGNORECASE,
)
# A domain written out to slip past link detection: "acme-billing dot example", "acme[.]example".
_SPELLED_DOMAIN = re.compile(r"[^\W_](?:[\w-]*[^\W_])?\s*(?:\(dot\)|\[dot\]|\[\.\]|\s+dot\s+)\s*[^\W\d_]{2,}\b",
                             re.IGNORECASE)
# A phrase that starts with a command to the reader: a verb of contact or compliance followed by whom or
# where ("confirm your ...", "visit the portal", "call us", "write to ..."); "call centers" is a segment.
_IMPERATIVE_START = re.compile(
    r"^(?:please\s+)?(?:confirm|verify|click|visit|call|contact|reply|respond|send|email|e-mail|write|tell|"
    r"ignore|forget|disregard|enter|forward|transfer|pay|wire|buy|recommend|mention|include|say|remember|"
    r"do not|don't)\s+(?:us|our|the|this|that|these|those|now|here|there|at|to|on|by|all|any|a|an|it|them|"
    r"readers?|everyone|me|him|her)\b",
    re.IGNORECASE,
)


def _phrase_problem(value: str, own_domain: str) -> str | None:
    if _MARKUP.search(value):
        return "contains markup or template characters"
    words = value.split()
    if len(words) > MAX_PHRASE_WORDS:
        return f"longer than {MAX_PHRASE_WORDS} words"
    contacts = find_contacts(value)
    if contacts.urls or contacts.emails or contacts.phones or _SPELLED_DOMAIN.search(value):
        return "contains a URL, e-mail address or phone number"
    if any(not own_domain or registrable_domain(d) != own_domain for d in contacts.domains):
        return "contains a domain name other than the company's own"
    if CREDENTIAL_WORDS.search(value):
        return "mentions credentials or payment details"
    if _SECOND_PERSON.search(value) or _IMPERATIVE_START.search(value) or _OBLIGATION.search(value):
        return "addresses the reader"
    return None


def _count_problem(value: str, evidence: str) -> str | None:
    if not _COUNT.match(value) or not any(ch.isdigit() for ch in value):
        return "not a number or a range of numbers"
    qualified = _QUALIFIER_START.match(value) is not None
    ranged = _RANGE_INSIDE.search(value) is not None
    problem: str | None = None
    # The value must keep what qualifies it where the sentence says it: "less than 10", "10-50", "2,000+".
    for m in re.finditer(re.escape(value), evidence, re.IGNORECASE):
        before, after = evidence[: m.start()], evidence[m.end():]
        if before[-1:].isdigit() or re.search(r"\d[.,]$", before) or re.match(r"[.,]?\d", after):
            problem = "part of a longer number"
        elif not qualified and _QUALIFIER_BEFORE.search(before):
            problem = "drops its qualifier (e.g. '10' of 'less than 10')"
        elif not ranged and _RANGE_AFTER.match(after):
            problem = "drops the rest of a range (e.g. '10' of '10-50')"
        else:
            return None
    return problem


def value_problem(field: str, value: str, evidence: str, *, own_domain: str = "") -> str | None:
    """Say what is wrong with ``value`` as a value of ``field`` quoted from ``evidence``, or None.

    Shapes: ``founded_year`` a four-digit year from ``EARLIEST_FOUNDED_YEAR`` to this year;
    ``employee_count`` a number or range with its qualifier kept (``"less than 10"``, ``"11-50"``,
    ``"2,000+"``; the bare ``"10"`` of "less than 10 people" is refused); ``location`` a place (letters,
    spaces and punctuation, no digits, at most 8 words, starting with a capital); every field a phrase of at most
    ``MAX_PHRASE_WORDS`` words with no markup, URL, e-mail address, phone number, domain other than the
    company's own (also spelled out: "acme dot example"), credential or payment word, second-person word,
    leading command or obligation ("customers should ...": an instruction, not a fact).

    Args:
        field: A field of ``agents.schemas.FACT_FIELDS``.
        value: The value as the model gave it, stripped.
        evidence: The sentence it is quoted from.
        own_domain: The company's registrable domain ('' when unknown); the only domain a value may name.

    Returns:
        A short reason (for logs and counts under ``bad_value``), or None when the value has its shape.
    """
    problem = _phrase_problem(value, own_domain)
    if problem:
        return problem
    if field == "founded_year":
        if not _YEAR.match(value):
            return "not a four-digit year"
        if not EARLIEST_FOUNDED_YEAR <= int(value) <= datetime.now(UTC).year:
            return f"not a year from {EARLIEST_FOUNDED_YEAR} to this year"
        return None
    if field == "employee_count":
        return _count_problem(value, evidence)
    if field == "location":
        if len(value.split()) > _MAX_LOCATION_WORDS or not _PLACE.match(value) or not value[0].isupper():
            return "not a place name"
        return None
    return None
