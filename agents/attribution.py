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


def _name_pattern(name: str, *, case_sensitive: bool, with_suffix: bool = False) -> re.Pattern[str] | None:
    words = name.split()
    if not words:
        return None
    # Words of the name separated by any whitespace or a hyphen; no letter or digit may touch either end.
    body = r"[\s\-]+".join(re.escape(w) for w in words)
    if with_suffix:
        body += rf",?\s+(?i:{_legal_suffix()})\.?"
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(rf"(?<!{_WORD_CHAR}){body}(?!{_WORD_CHAR})", flags)


def _common_word(name: str) -> bool:
    from wordfreq import zipf_frequency

    return len(name.split()) == 1 and zipf_frequency(name.lower(), "en") >= COMMON_NAME_ZIPF


@dataclass
class CompanyMatcher:
    """Decides whether a URL is the company's own and whether a sentence names the company.

    Args:
        company: The prospect's company name as given (``"Acme Freight Inc."``).
        website: The prospect's website (URL or bare domain), or '' when unknown.

    A sentence names the company when it contains the name with or without its legal suffix, or the
    registrable domain (``fumedev.com``), as whole words: no letter or digit may touch the match, so
    ``Brightline`` does not name ``Brightlane`` and ``Patriot`` does not name ``Pat``. A one-word name is
    matched case-sensitively as written or capitalised (``Fume`` names Fume; "toxic fume" does not);
    longer names case-insensitively. A one-word name that is a common English word (``COMMON_NAME_ZIPF``:
    "Atlas", "Ramp", "Million") counts only with a legal suffix ("Atlas Inc.") or as the domain.
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
            if len(name.split()) == 1:
                common = _common_word(name)
                for variant in dict.fromkeys((name, name[:1].upper() + name[1:])):
                    if (p := _name_pattern(variant, case_sensitive=True, with_suffix=common)) is not None:
                        self._patterns.append(p)
            elif (p := _name_pattern(name, case_sensitive=False)) is not None:
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

    def attributed(self, url: str, sentence: str) -> bool:
        """True when a fact quoted from ``sentence`` on ``url`` is about the company: the page is the
        company's own, or the sentence names the company."""
        return self.is_own(url) or self.names(sentence)
