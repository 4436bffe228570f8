"""Whose page is it: attribution of sources and sentences to the prospect's company.

A fact is about the prospect only when its source is the company's own site (its registrable domain,
subdomains included) or when the evidence sentence itself names the company, by name or by domain
(DESIGN.md, "Grounding by construction"). Registrable domains come from the Public Suffix List as
bundled with ``tldextract`` (no network); legal suffixes of company names (Inc., GmbH, ...) are
recognised with ``cleanco``; how common a word is comes from ``wordfreq``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

__all__ = ["COMMON_NAME_ZIPF", "CompanyMatcher", "company_core_name", "registrable_domain"]

#: A one-word company name at least this frequent as an English word (Zipf scale of ``wordfreq``: 3 is
#: once per million words; "million" 5.3, "atlas" 3.8, "fume" 2.6, "brex" 1.4) is too common to count as a
#: mention on its own: a third-party sentence must give it with a legal suffix ("Ramp Inc.") or the domain.
COMMON_NAME_ZIPF = 3.5

# Letters of any script, digits: what may not touch a name on either side for a word-boundary match.
_WORD_CHAR = r"[^\W_]"


@lru_cache(maxsize=1)
def _extractor():  # type: ignore[no-untyped-def]
    import tldextract

    # The snapshot of the Public Suffix List that ships inside the package: never fetched, never cached.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, include_psl_private_domains=False)


@lru_cache(maxsize=8192)
def registrable_domain(url_or_host: str) -> str:
    """Return the registrable domain ("eTLD+1") of a URL or host, lower case, e.g. ``acme.co.uk``.

    ``https://blog.acme.co.uk/x`` -> ``acme.co.uk``; ``www.acme.example`` -> ``acme.example`` (a name
    outside the Public Suffix List is split at its last dot); an IP address or a single label is
    returned as it is; ``''`` for an empty or unparsable input.

    Source: the Public Suffix List (publicsuffix.org), as bundled with ``tldextract``.
    """
    raw = (url_or_host or "").strip()
    if not raw:
        return ""
    try:
        host = (urlsplit(raw if "//" in raw else f"//{raw}").hostname or "").lower().rstrip(".")
    except ValueError:
        return ""
    if not host:
        return ""
    parts = _extractor()(host)
    if parts.domain and parts.suffix:
        return f"{parts.domain}.{parts.suffix}"
    labels = host.split(".")
    return ".".join(labels[-2:]) if len(labels) >= 2 and not host.replace(".", "").isdigit() else host


def company_core_name(company: str) -> str:
    """Return ``company`` without a trailing legal suffix or punctuation (``"Acme Freight, Inc."`` ->
    ``"Acme Freight"``; ``"Müller GmbH"`` -> ``"Müller"``), via ``cleanco.basename``; the name itself
    when nothing is left."""
    from cleanco import basename

    name = " ".join(company.split())
    core = basename(name).strip(" ,.-") if name else ""
    return core or name


@lru_cache(maxsize=1)
def _legal_suffix() -> str:
    """A regex alternation of cleanco's legal-form terms ("inc", "gmbh", "s de rl", ...), longest first."""
    from cleanco.clean import prepare_default_terms

    terms = {r"[\s.]*".join(re.escape(t) for t in words) for _n, words in prepare_default_terms()}
    return "|".join(sorted(terms, key=len, reverse=True))


@lru_cache(maxsize=4096)  # compiled once per company name, not once per prospect
def _name_pattern(name: str, *, with_suffix: bool = False) -> re.Pattern[str] | None:
    words = name.split()
    if not words:
        return None
    # Words of the name separated by any whitespace or a hyphen; no letter or digit may touch either end.
    body = r"[\s\-]+".join(re.escape(w) for w in words)
    if with_suffix:
        body += rf",?\s+(?i:{_legal_suffix()})\.?"
    return re.compile(rf"(?<!{_WORD_CHAR}){body}(?!{_WORD_CHAR})")


@lru_cache(maxsize=4096)
def _common_word(name: str) -> bool:
    from wordfreq import zipf_frequency

    return len(name.split()) == 1 and zipf_frequency(name.lower(), "en") >= COMMON_NAME_ZIPF


# A name right after these is one of several examples or a comparison, not the sentence's subject.
_LIST_BEFORE = re.compile(
    r"(?:\b(?:like|such as|including|includes|include|e\.g\.|vs\.?|versus|compared (?:to|with)|than|unlike|"
    r"alongside|rivals?|competitors?|alternatives? to)|[,;&/])\s*$",
    re.IGNORECASE,
)
# A name right before these is an item of a list of names, a comparison, or an "X for Y" analogy.
_LIST_AFTER = re.compile(
    r"^(?:\s*,\s*[A-Z][\w.&'-]*(?:\s+[A-Z][\w.&'-]*)*\s*(?:,|\band\b|\bor\b|&)|\s*[&/]\s*[A-Z]"
    r"|\s+(?:and|or|vs\.?|versus)\s+[A-Z]|\s+for\s+(?![$\d]))"
)
_MARKDOWN_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)?")
# A capitalised word right after the name makes a longer name ("Acme Freight Systems"): another company.
_LONGER_NAME = re.compile(r"^[\s-]+[A-Z][\w&'-]*")


def _listed(sentence: str, start: int, end: int) -> bool:
    """True when the name at ``sentence[start:end]`` stands in a list, a comparison or an analogy, or is
    the start of a longer name (in a sentence that is not written in title case)."""
    before = sentence[:start]
    longer = _LONGER_NAME.match(sentence[end:])
    if longer and not re.match(rf"^[\s-]+(?i:{_legal_suffix()})\b", sentence[end:]):
        # Prose, not a title-case headline ("Acme Freight Opens Office in Lyon"): words of four or more
        # letters after the name are mostly lower case.
        words = [w for w in sentence[end:].split() if w[:1].isalpha() and len(w) > 3]
        if sum(w[0].isupper() for w in words) <= 0.75 * len(words):
            return True
    # "In Austin, Acme ..." is not a list: a comma counts only after another name that follows a separator.
    if before.rstrip().endswith(",") and not re.search(r"(?:[,;&]|\band|\blike|\bsuch as|\bincluding)\s*"
                                                       r"[^\W\d_][^,;]*,\s*$", before):
        return _LIST_AFTER.match(sentence[end:]) is not None
    return _LIST_BEFORE.search(before) is not None or _LIST_AFTER.match(sentence[end:]) is not None


def _find(sentence: str, value: str) -> tuple[int, int] | None:
    """Where ``value`` occurs in ``sentence`` (case-insensitive, whitespace-tolerant), or None."""
    words = value.split()
    if not words:
        return None
    m = re.search(r"\s+".join(re.escape(w) for w in words), sentence, re.IGNORECASE)
    return (m.start(), m.end()) if m else None


@dataclass
class CompanyMatcher:
    """Decides whether a URL is the company's own and whether a sentence names the company.

    Args:
        company: The prospect's company name as given (``"Acme Freight Inc."``).
        website: The prospect's website (URL or bare domain), or '' when unknown.

    A sentence names the company when it contains the name with or without its legal suffix, or the
    registrable domain (``fumedev.com``), as whole words: no letter or digit may touch the match, so
    ``Brightline`` does not name ``Brightlane`` and ``Patriot`` does not name ``Pat``. Names match as
    written, with each word capitalised, or in capitals (``Fume`` names Fume, "toxic fume" does not; "one
    month later" does not name One Month). A one-word name that is a common English word
    (``COMMON_NAME_ZIPF``: "Atlas", "Ramp", "Million") counts only with a legal suffix ("Atlas Inc.") or as
    the domain.

    ``attributed`` is stricter than ``names`` for a sentence on another site: the company must be named
    outside the fact's value and not only as an item of a list of names ("companies like Ramp, Webflow"),
    a comparison ("unlike Acme", "Acme vs ...") or an "X for Y" analogy ("Retool for logistics"), and not
    as the start of a longer name in prose ("Acme Freight Systems is hiring": another company).
    """

    company: str
    website: str = ""
    own_domain: str = field(init=False)
    _patterns: list[re.Pattern[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.own_domain = registrable_domain(self.website)
        names = dict.fromkeys(n for n in (" ".join(self.company.split()), company_core_name(self.company)) if n)
        self._patterns = []
        for name in names:
            common = _common_word(name)
            capitalised = " ".join(w[:1].upper() + w[1:] for w in name.split())
            for variant in dict.fromkeys((name, capitalised, name.upper())):
                if (p := _name_pattern(variant, with_suffix=common)) is not None:
                    self._patterns.append(p)
        if self.own_domain and "." in self.own_domain:
            self._patterns.append(
                re.compile(rf"(?<![\w-]){re.escape(self.own_domain)}(?![\w-]|\.[^\W_])", re.IGNORECASE))

    def is_own(self, url: str) -> bool:
        """True when ``url`` is on the company's registrable domain (subdomains included)."""
        return bool(self.own_domain) and registrable_domain(url) == self.own_domain

    def names(self, text: str) -> bool:
        """True when ``text`` names the company by name or domain, as whole words (see the class)."""
        return any(p.search(text) for p in self._patterns)

    def attributed(self, url: str, sentence: str, value: str = "") -> bool:
        """True when a fact with ``value`` quoted from ``sentence`` on ``url`` is about the company: the page
        is the company's own, or the sentence names the company as what it is about (see the class)."""
        if self.is_own(url):
            return True
        sentence = _MARKDOWN_LINK.sub(r"\1", sentence)  # "[Webflow](https://webflow.com/)" reads "Webflow"
        span = _find(sentence, value)
        for pattern in self._patterns:
            for m in pattern.finditer(sentence):
                inside_value = span is not None and m.start() < span[1] and span[0] < m.end()
                if not inside_value and not _listed(sentence, m.start(), m.end()):
                    return True
        return False
