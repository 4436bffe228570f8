"""Greedy decoding's check-first grammar step (``miniatures.grammar.mask_rows_greedy``): same choices as full masks.

At every step of seeded walks through each grammar kind, the argmax of the scores it leaves equals the argmax of
the same scores fully masked (``GrammarLogitsProcessor.mask_rows``), whether the top token is allowed, refused, a
stop token before or after the answer is complete, a special token or an id past the tokenizer (a padded model
vocabulary); rows whose top token is allowed and free rows keep their scores. A tiny locally trained tokenizer
(no downloads, no model run).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from core.tasks import ExtractionTask, FieldSpec, Sentence
from miniatures.grammar import GrammarLogitsProcessor, answer_grammar, mask_rows_greedy, matcher, tag_grammar

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")
pytest.importorskip("transformers")

from tests.miniature_fixtures import grammar_tokenizer  # noqa: E402
from tests.test_craft_grammar import _task  # noqa: E402

EXTRACTION = ExtractionTask(
    company="Acme", website="https://a.example/",
    fields=(FieldSpec(name="location", description="where"), FieldSpec(name="founded_year", description="when")),
    sentences=(Sentence(id="S1", text="Founded in 2014 in Cork.", source_url="https://a.example/"),
               Sentence(id="S2", text='Acme (Omaha) ships to 3,000 "carriers".', source_url="https://a.example/")))
#: Extra columns of the model's scores past the tokenizer (a vocabulary padded to a multiple of 64).
PADDING = 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, int]:
    tokenizer, llt = grammar_tokenizer(tmp_path_factory.mktemp("apply") / "base")
    return tokenizer, llt, int(tokenizer.convert_tokens_to_ids("<|im_end|>"))


def _allowed(m: Any, vocab: int) -> list[int]:
    bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
    return [int(t) for t in np.flatnonzero(np.unpackbits(bits, bitorder="little")[:vocab])]


GRAMMARS = {
    "extraction": lambda: answer_grammar(EXTRACTION),
    "email": lambda: answer_grammar(_task(3)),
    "craft email": lambda: answer_grammar(_task(3), craft=True),
    "sentence tags": lambda: tag_grammar("Founded in 2014 in Cork.", ["location"]),
}


@pytest.mark.parametrize("kind", sorted(GRAMMARS))
def test_the_check_first_step_picks_what_full_masks_pick(tok: tuple[Any, Any, int], kind: str) -> None:
    tokenizer, llt, stop = tok
    grammar = GRAMMARS[kind]()
    vocab = len(tokenizer)
    special = int(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    accepted = refused = 0
    for seed in range(6):
        rnd = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        m = matcher(llt, grammar)
        processor = GrammarLogitsProcessor(llt, [None, None], 1, [stop])
        for step in range(400):
            scores = torch.randn((2, vocab + PADDING), generator=generator)
            allowed = _allowed(m, llt.vocab_size)
            pick = rnd.random()
            if pick < 0.6:  # the model follows its grammar (the common case)
                top = rnd.choice(allowed)
            elif pick < 0.7:
                top = stop  # refused until the answer is complete
            elif pick < 0.8:
                top = special
            elif pick < 0.85:
                top = vocab + rnd.randrange(PADDING)  # past the tokenizer
            else:
                top = rnd.randrange(vocab)  # anything
            scores[0, top] = 100.0
            full = processor.mask_rows(scores.clone(), [m, None])
            checked = mask_rows_greedy(processor, scores.clone(), [m, None])
            given = mask_rows_greedy(processor, scores.clone(), [m, None], scores.argmax(dim=-1).tolist())
            assert torch.equal(given, checked), "the caller's own argmax must give the same step"
            choice = int(checked[0].argmax())
            assert choice == int(full[0].argmax()), f"{kind}, walk {seed}, step {step}, top {top}"
            assert torch.equal(checked[1], scores[1]), "a free row must keep its scores"
            if choice != top:
                refused += 1
            elif top != stop:  # a stop token always goes through the mask
                accepted += 1
                assert torch.equal(checked[0], scores[0]), "an accepted row must keep its scores"
            if choice == stop:
                assert m.is_accepting()
                break
            assert choice in allowed and m.consume_token(choice)
            if m.is_stopped():
                break
    assert accepted >= 10 and refused >= 10, (accepted, refused)  # both paths taken


def test_rows_must_match_the_matchers(tok: tuple[Any, Any, int]) -> None:
    tokenizer, llt, stop = tok
    processor = GrammarLogitsProcessor(llt, [None], 1, [stop])
    with pytest.raises(ValueError, match="one matcher"):
        mask_rows_greedy(processor, torch.zeros((2, len(tokenizer))), [None])
    with pytest.raises(ValueError, match="top tokens"):
        mask_rows_greedy(processor, torch.zeros((1, len(tokenizer))), [None], [0, 1])
    scores = torch.randn((1, len(tokenizer)))
    assert torch.equal(mask_rows_greedy(processor, scores.clone(), [None]), scores)


def test_a_refused_top_token_gets_the_full_mask(tmp_path: Path, tok: tuple[Any, Any, int]) -> None:
    """Where the top token is refused, the row is masked exactly as ``mask_rows`` masks it."""
    tokenizer, llt, stop = tok
    m = matcher(llt, GRAMMARS["email"]())
    processor = GrammarLogitsProcessor(llt, [None], 1, [stop])
    scores = torch.randn((1, len(tokenizer) + PADDING))
    scores[0, stop] = 100.0  # an empty answer: refused
    full = processor.mask_rows(scores.clone(), [m])
    checked = mask_rows_greedy(processor, scores.clone(), [m])
    assert torch.equal(torch.isfinite(checked), torch.isfinite(full))
    assert not bool(torch.isfinite(checked[0, stop]))
