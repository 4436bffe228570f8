"""Normalise untrusted page text before anything reads it: one canonical form for what a page says.

``normalize_page_text`` is applied where page text enters the system (``tools.extract``,
``tools.corpus_import``) and again by the grounding layer, so a hidden or disguised instruction
("ign\\u200bore", "ｉｇｎｏｒｅ", Cyrillic "іgnоrе") reads as the plain text a filter or a model would
see rendered. Steps, in order:

1. Unicode NFKC (compatibility forms such as fullwidth and mathematical letters become plain ones).
2. Invisible characters are removed: every ``Cc`` control except tab, newline and carriage return
   (line-like controls and U+2028/U+2029 become a newline), every ``Cf`` format character (zero-width
   space/joiners, word joiner, BOM, soft hyphen, bidirectional marks, embeddings, overrides and
   isolates, tag characters), lone surrogates, and the other Default_Ignorable_Code_Points of Unicode's
   DerivedCoreProperties.txt (variation selectors, Hangul fillers, combining grapheme joiner,
   Mongolian free variation selectors, Khmer inherent vowels).
3. Look-alike letters are folded with the confusables data of Unicode TR39 as packaged by
   ``confusable-homoglyphs``: a letter of another script whose confusable is one ASCII letter (Cyrillic
   "а" -> "a", Greek "ο" -> "o", Cherokee, Armenian, ...; with accents: Cyrillic "ё" -> "ë") is
   replaced by it when

   - its word (a ``\\w+`` run) also holds Latin letters (a mixed-script word), or
   - every letter of its word has such a look-alike and its line reads as Latin: the line's Latin
     letters outnumber its letters that have no Latin look-alike (or it has none of those at all).

   Real Russian or Greek text keeps its letters: its words have no Latin letters, and its lines are
   full of letters with no Latin twin (б, д, и, л, я, λ, π, σ, ...), so the whole-word rule does not
   apply. A line made only of Latin-looking Cyrillic or Greek letters (rare in real text) is read as
   Latin.

Whitespace, case and typographic punctuation are kept as they are. Not folded: Latin-script
look-alikes (dotless "ı", Latin alpha "ɑ"; they are real letters of Latin orthographies), digits for
letters ("1gn0re") and letters spaced apart.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["fold_confusables", "normalize_page_text"]

logger = logging.getLogger(__name__)

#: Controls that are kept.
_KEPT_CONTROLS = frozenset("\t\n\r")
#: Line-like controls and separators (``str.splitlines`` boundaries) that become a newline.
_LINE_BREAKS = frozenset("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
#: Default_Ignorable_Code_Point ranges (Unicode DerivedCoreProperties.txt) outside category Cf.
_IGNORABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors and vowel separator
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xE0100, 0xE01EF),  # variation selectors supplement
)
#: Planes scanned for Cc/Cf characters (every one of them lies in planes 0, 1 and 14).
_CONTROL_PLANES = (range(0x20000), range(0xE0000, 0xE1000))
#: Highest code point scanned for accented forms of foldable letters (the Greek and Cyrillic blocks
#: and Greek Extended lie below it).
_ACCENTED_SCAN_LIMIT = 0x2000
_NOT_FOLDED_SCRIPTS = ("LATIN", "COMMON", "INHERITED")
_ASCII_REMOVALS = {
    i: "\n" if chr(i) in _LINE_BREAKS else "" for i in (*range(0x20), 0x7F) if chr(i) not in _KEPT_CONTROLS
}
_ASCII_REMOVABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ASCII_BYTES = bytes(range(0x80))
_WORD = re.compile(r"\w+")
_ASCII_LETTER = re.compile(r"[A-Za-z]")

_OTHER, _LATIN, _FOLD, _FOREIGN = range(4)


def _non_ascii(text: str) -> set[str]:
    """The distinct non-ASCII characters of ``text`` (via bytes: several times faster than ``set(text)``)."""
    data = text.encode("utf-8", "surrogatepass").translate(None, _ASCII_BYTES)
    return set(data.decode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class _Tables:
    """Everything ``normalize_page_text`` precomputes once.

    Attributes:
        removals: ``str.translate`` table of step 2 (code point -> '' or '\\n').
        folds: step 3's table: look-alike letter -> its Latin twin of the same case (Cyrillic "І" -> "I").
        folds_inner: the same, but with TR39's prototype where it differs in case (Cyrillic "І" and
            "Ӏ" -> "l"), for letters after the first of a word that has lower-case letters ("аӀӀ" -> "all").
        foldable: the look-alike letters.
    """

    removals: dict[int, str]
    folds: dict[int, str]
    folds_inner: dict[int, str]
    foldable: frozenset[str]


def _removal_table() -> dict[int, str]:
    table = {cp: "" for plane in _CONTROL_PLANES for cp in plane
             if unicodedata.category(chr(cp)) in ("Cc", "Cf", "Cs") and chr(cp) not in _KEPT_CONTROLS}
    table.update((cp, "") for lo, hi in _IGNORABLE_RANGES for cp in range(lo, hi + 1))
    table.update((ord(c), "\n") for c in _LINE_BREAKS)
    return table


def _fold_tables() -> tuple[dict[int, str], dict[int, str]]:
    """Look-alike letters of other scripts -> their ASCII twin, from ``confusable-homoglyphs``.

    Returns:
        ``(folds, folds_inner)`` as described in ``_Tables``.
    """
    from confusable_homoglyphs import categories, confusables

    data = confusables.confusables_data

    def ascii_twins(char: str) -> set[str]:
        return {e["c"] for e in data.get(char, ()) if len(e["c"]) == 1 and e["c"].isascii() and e["c"].isalpha()}

    folds: dict[int, str] = {}
    inner: dict[int, str] = {}
    for char in data:
        if len(char) != 1 or not unicodedata.category(char).startswith("L"):
            continue
        if categories.alias(char) in _NOT_FOLDED_SCRIPTS or not (direct := ascii_twins(char)):
            continue
        # TR39 maps each look-alike set to one prototype ("I" and Cyrillic "І" both to "l"); one more
        # hop finds the twin of the same case, which is how the letter reads at the start of a word.
        twins = direct | {t for d in direct for t in ascii_twins(d)}
        same_case = sorted(t for t in twins if t.isupper() == char.isupper())
        inner[ord(char)] = sorted(direct)[0]
        folds[ord(char)] = same_case[0] if same_case else inner[ord(char)]
    # Accented forms ("ё" = Cyrillic "е" + diaeresis) fold through their decomposition.
    for cp in range(0x80, _ACCENTED_SCAN_LIMIT):
        char = chr(cp)
        if cp in folds or not unicodedata.category(char).startswith("L"):
            continue
        decomposed = unicodedata.normalize("NFD", char)
        base, marks = ord(decomposed[0]), decomposed[1:]
        if marks and base in folds and categories.alias(char) not in _NOT_FOLDED_SCRIPTS:
            folds[cp] = unicodedata.normalize("NFC", folds[base] + marks)
            inner[cp] = unicodedata.normalize("NFC", inner[base] + marks)
    return folds, inner


@functools.cache
def _tables() -> _Tables:
    """Build the tables on first use (about 0.1 s)."""
    removals = _removal_table()
    folds, inner = _fold_tables()
    logger.debug("text normalisation: %d removable characters, %d look-alike letters", len(removals), len(folds))
    return _Tables(removals, folds, inner, frozenset(map(chr, folds)))


@functools.lru_cache(maxsize=1 << 16)
def _kind(char: str) -> int:
    """Classify a character: Latin letter, foldable look-alike, other-script letter, or other."""
    if char.isascii():
        return _LATIN if char.isalpha() else _OTHER
    if not unicodedata.category(char).startswith("L"):
        return _OTHER
    if char in _tables().foldable:
        return _FOLD
    from confusable_homoglyphs import categories

    script = categories.alias(char)
    if script == "LATIN":
        return _LATIN
    return _OTHER if script in _NOT_FOLDED_SCRIPTS else _FOREIGN


def _fold_line(line: str, tables: _Tables, latin_extra: list[str], foreign: list[str]) -> str:
    """Fold one line; ``latin_extra`` and ``foreign`` are the text's non-ASCII Latin and foreign letters."""
    foreign_here = [c for c in foreign if c in line]
    latin = len(_ASCII_LETTER.findall(line)) + sum(line.count(c) for c in latin_extra)
    if not latin and foreign_here:
        return line  # no mixed-script word, and the line does not read as Latin
    latin_line = not foreign_here or latin > sum(line.count(c) for c in foreign_here)

    def fold_word(match: re.Match[str]) -> str:
        word = match.group()
        if word.isascii():
            return word
        kinds = {_kind(c) for c in word}
        if _FOLD not in kinds or not (_LATIN in kinds or (latin_line and _FOREIGN not in kinds)):
            return word
        if any(c.islower() for c in word):
            return word[0].translate(tables.folds) + word[1:].translate(tables.folds_inner)
        return word.translate(tables.folds)

    folded = _WORD.sub(fold_word, line)
    # A folded letter may carry a combining mark ("е" + U+0301 -> "e" + U+0301): compose it.
    return unicodedata.normalize("NFKC", folded) if folded != line else line


def _fold(text: str, chars: set[str], tables: _Tables) -> str:
    by_kind: dict[int, list[str]] = {_LATIN: [], _FOLD: [], _FOREIGN: [], _OTHER: []}
    for char in chars:
        by_kind[_kind(char)].append(char)
    if not by_kind[_FOLD]:
        return text
    return "\n".join(
        _fold_line(line, tables, by_kind[_LATIN], by_kind[_FOREIGN]) if any(c in line for c in by_kind[_FOLD])
        else line
        for line in text.split("\n")
    )


def fold_confusables(text: str) -> str:
    """Fold look-alike letters of other scripts to Latin (step 3 of the module docstring).

    Args:
        text: any text; it should already be NFKC-normalised (``normalize_page_text`` does both).

    Returns:
        ``text`` with the look-alike letters of mixed-script words, and of all-look-alike words on
        lines that read as Latin, replaced by their ASCII twins; everything else unchanged.
    """
    return text if text.isascii() else _fold(text, _non_ascii(text), _tables())


def normalize_page_text(text: str) -> str:
    """Return untrusted page text in canonical form (NFKC, invisible characters out, look-alikes folded).

    See the module docstring for the steps and the folding rule. Idempotent, so text stored by an
    older corpus can be normalised again where it is read. Cost (CPU time) on the extracted text
    of the 19 real company pages in ``../shared/realdata``: about 15 microseconds per KB, most of it
    the NFKC pass (ASCII text: one pass, well under 1 microsecond per KB); the tables are built once,
    on the first non-ASCII text (about 0.1 s).

    Args:
        text: page text of any length (body text, a title, a meta description, a JSON-LD value).

    Returns:
        The normalised text (same lines; removed characters leave nothing behind).

    Raises:
        TypeError: ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_page_text needs str, got {type(text).__name__}")
    if text.isascii():
        return text.translate(_ASCII_REMOVALS) if _ASCII_REMOVABLE.search(text) else text
    tables = _tables()
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    chars = _non_ascii(text)
    removals = {ord(c): tables.removals[ord(c)] for c in chars if ord(c) in tables.removals}
    if removals or _ASCII_REMOVABLE.search(text):
        # Removing a character can put a letter next to a combining mark: compose them again.
        text = unicodedata.normalize("NFKC", text.translate(removals | _ASCII_REMOVALS))
        chars = _non_ascii(text)
    return _fold(text, chars, tables)
