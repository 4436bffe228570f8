"""Contact points in text: URLs, e-mail addresses, domains and phone numbers.

Grounding refuses fact values that carry any of them, and email validation allows only the offer's
and the prospect's own (DESIGN.md: an email may hold only the offer's and the prospect's links and
addresses). Phone numbers are found with ``phonenumbers`` (Google's libphonenumber) in the regions
listed in ``PHONE_REGIONS`` plus any number written in international form (``+<country code>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PHONE_REGIONS", "Contacts", "find_contacts", "phone_digits"]

#: Regions whose national phone formats are recognised without a ``+`` prefix.
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "ES", "IT", "NL")

# A scheme URL, or a "www." address without a scheme.
_URL = re.compile(r"(?:\bhttps?://|\bwww\.)[^\s<>\"')\]]+", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", re.UNICODE)
# Labels of letters (any script), digits and hyphens, a final label of two or more letters: "acme.co.uk".
_DOMAIN = re.compile(r"(?<![\w@.-])(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}(?![\w-])", re.UNICODE)
_TRAIL = ".,;:!?"


@dataclass(frozen=True)
class Contacts:
    """Contact points found in a text, each in the order first seen, without duplicates.

    Attributes:
        urls: Addresses with a scheme or ``www.`` (trailing punctuation removed).
        emails: E-mail addresses.
        domains: Bare domain names outside URLs and e-mail addresses (``acme.example``).
        phones: Phone numbers as written in the text.
    """

    urls: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.urls or self.emails or self.domains or self.phones)


def phone_digits(number: str) -> str:
    """The digits of a phone number (``'+1 (415) 555-0132'`` -> ``'14155550132'``), for comparing numbers."""
    return re.sub(r"\D", "", number)


def _phones(text: str) -> list[str]:
    if not any(ch.isdigit() for ch in text):  # every phone number has a digit: skip the matchers' scan
        return []
    import phonenumbers

    found: dict[str, str] = {}
    for region in PHONE_REGIONS:
        for match in phonenumbers.PhoneNumberMatcher(text, region):
            number = phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164)
            found.setdefault(number, match.raw_string)
    return list(found.values())


def find_contacts(text: str) -> Contacts:
    """Find the URLs, e-mail addresses, bare domains and phone numbers in ``text``.

    Args:
        text: Any text (an email body, a fact value).

    Returns:
        The contact points, each kind without duplicates; a domain inside a URL or e-mail address is not
        listed again as a domain.
    """
    urls = [u.rstrip(_TRAIL) for u in _URL.findall(text)]
    rest = _URL.sub(" ", text)
    emails = [e.rstrip(_TRAIL) for e in _EMAIL.findall(rest)]
    rest = _EMAIL.sub(" ", rest)
    domains = _DOMAIN.findall(rest)
    phones = _phones(rest) if re.search(r"\d{2}", rest) else []
    return Contacts(
        urls=tuple(dict.fromkeys(urls)),
        emails=tuple(dict.fromkeys(emails)),
        domains=tuple(dict.fromkeys(domains)),
        phones=tuple(dict.fromkeys(phones)),
    )
