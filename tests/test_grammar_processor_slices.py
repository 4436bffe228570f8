"""Mask speed-ups that must not change a mask: llguidance's slices (``TEXT_SLICES``) and the span terminals.

* Slices only change how a mask is computed: at every step of seeded random walks through each grammar kind, the
  masks of ``llg_tokenizer`` (with ``TEXT_SLICES``) equal those of the same tokenizer without slices, and on a
  free-text lexeme of the form the slicer takes the slices are in fact applied.
* The span terminals (``_span_terminals``, a chain of optional terminals) accept exactly the runs of a sentence's
  pieces (words, single other characters) that start and end with a piece that is not white space.

A tiny locally trained byte-level tokenizer splits the texts (no downloads, no model run).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from core.tasks import ExtractionTask, FieldSpec, MergeTag, OfferBrief, Sentence, WritingTask
from miniatures.grammar import answer_grammar, extraction_grammar, llg_tokenizer, matcher, tag_grammar

np = pytest.importorskip("numpy")
llguidance = pytest.importorskip("llguidance")
pytest.importorskip("transformers")

from tests.miniature_fixtures import build_tiny_base  # noqa: E402

SENTENCES = (
    "Founded in 2014 in Cork.",
    'Zoë said "hi"  in Zürich, twice: "hi" again.',
    "Acme Freight (Omaha) ships to 3,000 carriers - fast.",
    "  Lead and trail spaces, an_underscore and tabs\there.  ",
)
OFFER = OfferBrief(sender_title="AE", product="Tallyfold Signals",
                   value_proposition="spots the accounts that are ready to buy",
                   call_to_action="Would a 15-minute call next week be worth it?",
                   proof_point="Brightline booked 30% more meetings with it.",
                   opt_out_line="If this isn't relevant, just reply 'no thanks'.")
WRITING = WritingTask(offer=OFFER, merge_tags=(MergeTag(name="first_name", description="the first name"),
                                               MergeTag(name="company", description="the company"),
                                               MergeTag(name="product", description="the product"),
                                               MergeTag(name="fact.location", description="Omaha", value="Omaha")))
EXTRACTION = ExtractionTask(company="Acme", website="https://a.example/",
                            fields=(FieldSpec(name="location", description="where"),
                                    FieldSpec(name="founded_year", description="when")),
                            sentences=tuple(Sentence(id=f"S{i + 1}", text=t, source_url="https://a.example/")
                                            for i, t in enumerate(SENTENCES)))
#: A free-text lexeme the slicer takes: JSON-string text and one merge tag, not all blank.
SLICEABLE = ('%llguidance {}\nstart: "\\"" BODY "\\""\n'
             'BODY: (/[^"\\\\{}\\x00-\\x1f]/ | /\\\\[nt]/ | "{{company}}")+ & ~(/ */)\n')


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_base(tmp_path_factory.mktemp("slices") / "base"))
    end: Any = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer, int(end)


def _bits(m: Any) -> Any:
    return np.frombuffer(m.compute_bitmask(), dtype=np.uint8)


def _slices_applied(m: Any, refused: int) -> int:
    """llguidance's count of slices applied so far by ``m`` (from the parser statistics of a copy's error)."""
    copy = m.deep_copy()
    assert not copy.consume_token(refused), "the probe token must be refused"
    found = re.search(r'"slices_applied":\s*(\d+)', copy.get_error())
    assert found, f"llguidance's error no longer carries parser statistics: {copy.get_error()[:300]}"
    return int(found.group(1))


@pytest.mark.parametrize("kind", ["extraction", "email", "craft email", "sentence tags", "sliceable"])
def test_slices_never_change_a_mask(tok: tuple[Any, int], kind: str) -> None:
    tokenizer, stop = tok
    grammar = {"extraction": extraction_grammar(EXTRACTION), "email": answer_grammar(WRITING),
               "craft email": answer_grammar(WRITING, craft=True),
               "sentence tags": tag_grammar(SENTENCES[1], ["location", "founded_year"]), "sliceable": SLICEABLE}[kind]
    sliced_tokenizer, plain_tokenizer = llg_tokenizer(tokenizer, [stop]), llg_tokenizer(tokenizer, [stop], slices=())
    special = int(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    walks = 0
    for seed in range(4):
        rnd = random.Random(seed)
        sliced, plain = matcher(sliced_tokenizer, grammar), matcher(plain_tokenizer, grammar)
        for step in range(120):
            bits = _bits(sliced)
            assert np.array_equal(bits, _bits(plain)), f"{kind}, walk {seed}, step {step}"
            allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little")[: len(tokenizer)])
            choices = [int(t) for t in allowed if t != stop] or [stop]
            token = rnd.choice(choices)
            assert sliced.consume_token(token) and plain.consume_token(token)
            if token == stop or sliced.is_stopped():
                break
        walks += 1
        if kind == "sliceable":  # the walk stays inside the string's body: slices applied
            assert _slices_applied(sliced, special) > 0
            assert _slices_applied(plain, special) == 0
    assert walks == 4


def _pieces(text: str) -> list[str]:
    return re.findall(r"[^\W_]+|[\W_]", text)


def _spans(text: str) -> tuple[set[str], set[str]]:
    """(every run of pieces that starts and ends with a non-blank piece, the other substrings of ``text``)."""
    pieces = _pieces(text)
    good = {"".join(pieces[i:j + 1]) for i in range(len(pieces)) for j in range(i, len(pieces))
            if not pieces[i].isspace() and not pieces[j].isspace()}
    others = {text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)} - good
    return good, others


def _accepts(llt: Any, tokenizer: Any, grammar: str, text: str) -> bool:
    found = matcher(llt, grammar)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(found.consume_tokens(ids) and found.is_accepting())


@pytest.mark.parametrize("sentence", SENTENCES)
def test_tag_values_are_exactly_the_whole_word_spans(tok: tuple[Any, int], sentence: str) -> None:
    tokenizer, stop = tok
    llt = llg_tokenizer(tokenizer, [stop])
    grammar = tag_grammar(sentence, ["location"])
    good, others = _spans(sentence)
    for value in sorted(good):
        assert _accepts(llt, tokenizer, grammar, f"location | {value}"), value
    rnd = random.Random(0)
    for value in rnd.sample(sorted(others), min(150, len(others))):  # cut words, padded or blank spans
        assert not _accepts(llt, tokenizer, grammar, f"location | {value}"), value
    assert len(good) > 10


def test_extraction_values_are_exactly_the_whole_word_spans_as_json(tok: tuple[Any, int]) -> None:
    """Values are written JSON-escaped (quotes as \\"); a value from another sentence or a cut word is refused."""
    tokenizer, stop = tok
    llt = llg_tokenizer(tokenizer, [stop])
    grammar = extraction_grammar(EXTRACTION)
    good, others = _spans(SENTENCES[1])
    rnd = random.Random(1)

    def answer(value: str, evidence: str = "S2") -> str:
        return json.dumps({"facts": [{"field": "location", "evidence": evidence, "value": value}]}, ensure_ascii=False)

    for value in sorted(good):
        assert _accepts(llt, tokenizer, grammar, answer(value)), value
    for value in rnd.sample(sorted(others), 80):
        assert not _accepts(llt, tokenizer, grammar, answer(value)), value
    assert _accepts(llt, tokenizer, grammar, answer("Cork", "S1"))
    assert not _accepts(llt, tokenizer, grammar, answer("Cork", "S2"))
