"""Grammar-constrained extraction answers: JSON layout, listed fields, existing ids, values copied from the evidence.

A random tiny Llama with a byte-level BPE tokenizer trained here (no downloads) generates the answers; without
the processor it writes text that is no answer at all, with it every answer parses and every value is a span.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from miniatures.constrained import (
    EmailGrammar,
    ExtractionGrammar,
    GrammarProcessor,
    State,
    cited_sentences,
    decode_vocabulary,
    grammar_for,
    listed_fields,
    listed_merge_tags,
)

torch = pytest.importorskip("torch")

from tests.miniature_fixtures import build_tiny_base  # noqa: E402

SENTENCE = "Our flagship product, Sarnora Sync, brings the whole workflow into one place."
PROMPT = (f"Fields:\n- product: the main product\n- founded_year: the year\n\nSentences:\nSource 1: https://a.example/\n"
          f"S1: Founded in 2014 in Cork.\nS2: {SENTENCE}\n")
WRITER_PROMPT = ("Offer:\nProduct: Ledgerline\n\nMerge tags you may use:\n{{first_name}}: the prospect's first name\n"
                 "{{fact.location}}: Cork, Ireland\n\nAnswer with the JSON object only.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_base(tmp_path_factory.mktemp("span") / "base")
    return AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()


def test_cited_sentences_and_fields_are_read_from_the_prompt() -> None:
    assert cited_sentences(PROMPT) == {"S1": "Founded in 2014 in Cork.", "S2": SENTENCE}
    assert listed_fields(PROMPT) == ("product", "founded_year")
    assert cited_sentences("Merge tags you may use:\n{{first_name}}: the prospect's first name") == {}


def _kind(state: State | None) -> str | None:
    return state[0] if state is not None else None


def test_grammar_accepts_answers_and_refuses_what_grounding_would_drop() -> None:
    grammar = ExtractionGrammar(cited_sentences(PROMPT), listed_fields(PROMPT))
    answer = json.dumps({"facts": [{"field": "product", "evidence": "S2", "value": "Sarnora Sync"},
                                   {"field": "founded_year", "evidence": "S1", "value": "2014"}]})
    assert _kind(grammar.run(answer)) == "done"
    assert _kind(grammar.run('{"facts": []}')) == "done"
    assert grammar.run(answer[:50]) is not None  # every prefix is on the way to an answer
    refused = [
        '{"facts": [{"field": "revenue"',  # a field the prompt does not list
        '{"facts": [{"field": "product", "evidence": "S9"',  # an id the prompt does not have
        '{"facts": [{"field": "product", "evidence": "S2", "value": "Quorvanta',  # not in S2
        '{"facts": [{"field": "product", "evidence": "S2", "value": ""',  # blank value
        '{"facts": [{"field": "product", "evidence": "S2", "value": "Sync"}, {"field": "product"',  # twice
        '{"facts": [{"value": "Sync"',  # value before evidence
    ]
    assert [grammar.run(text) for text in refused] == [None] * len(refused)


def test_email_grammar_allows_only_listed_merge_tags_in_json_strings() -> None:
    grammar = grammar_for(WRITER_PROMPT)
    assert isinstance(grammar, EmailGrammar) and listed_merge_tags(WRITER_PROMPT) == ("first_name", "fact.location")
    email = json.dumps({"subject": "Hi {{first_name}}", "body": "Hello {{first_name}},\n\nIn {{fact.location}}?"})
    assert _kind(grammar.run(email)) == "done"
    refused = [
        '{"subject": "Hi {{company}}',  # a tag the prompt does not list
        '{"subject": "Hi {first_name',  # a single brace
        '{"subject": "Hi }',  # a lone closing brace
        '{"subject": "",',  # a blank subject
        '{"subject": "Hi\\n',  # a subject is one line
        '{"subject": "Hi", "body": "line\n',  # a raw newline inside a JSON string
        '{"subject": "Hi", "body": "x\\q',  # not a JSON escape
        '{"subject": "' + "a" * 61,  # a subject of more than 60 characters
    ]
    assert [grammar.run(text) for text in refused] == [None] * len(refused)


def _generate(tiny: tuple[Any, Any], constrained: bool, seed: int, prompt: str = PROMPT,
              max_new_tokens: int = 120) -> str:
    from transformers import LogitsProcessorList

    tokenizer, model = tiny
    prompt_ids = tokenizer(prompt + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    kwargs = {}
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if constrained:
        proc = GrammarProcessor(tokenizer, [grammar_for(prompt)], len(prompt_ids), decode_vocabulary(tokenizer), [stop])
        kwargs["logits_processor"] = LogitsProcessorList([proc])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a different random model per seed
            p.add_(torch.randn_like(p) * 0.05)
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True)


def test_generated_answers_parse_and_every_value_is_a_span_of_its_sentence(tiny: tuple[Any, Any]) -> None:
    free = [_generate(tiny, False, seed) for seed in range(3)]
    assert not any(text.startswith('{"facts": [') for text in free), free  # a random model writes no answer
    for seed in range(3):
        text = _generate(tiny, True, seed)
        assert text.startswith('{"facts": [') and text.endswith("]}"), text  # complete: the stop waits for "]}"
        facts = json.loads(text)["facts"]
        sentences = cited_sentences(PROMPT)
        assert all(f["value"] in sentences[f["evidence"]] and f["value"].strip() for f in facts), facts
        assert len({f["field"] for f in facts}) == len(facts)


def test_the_engine_constrains_only_prompts_with_a_grammar(tmp_path: Path) -> None:
    from miniatures.local import LocalEngine

    engine = LocalEngine(str(build_tiny_base(tmp_path / "base")), device="cpu", max_new_tokens=4)
    try:
        seen: list[object] = []
        original = engine._model.generate

        def spy(**kwargs: object) -> object:
            seen.append(kwargs.get("logits_processor"))
            return original(**kwargs)

        engine._model.generate = spy
        engine.generate_sync("__base__", [{"role": "user", "content": PROMPT}])
        engine.generate_sync("__base__", [{"role": "user", "content": WRITER_PROMPT}])
        engine.generate_sync("__base__", [{"role": "user", "content": "Write to the company."}])
        assert seen[0] is not None and seen[1] is not None and seen[2] is None
    finally:
        engine.close()


def test_generated_emails_stay_inside_the_email_grammar(tiny: tuple[Any, Any]) -> None:
    import re

    grammar = grammar_for(WRITER_PROMPT)
    assert grammar is not None
    assert grammar.run(_generate(tiny, False, 0, WRITER_PROMPT, max_new_tokens=40)) is None
    for seed in range(2):
        text = _generate(tiny, True, seed, WRITER_PROMPT, max_new_tokens=60)
        decoded = text.replace("\ufffd", "")  # bytes of a random model that never complete a character
        assert text.startswith('{"subject": "') and grammar.run(decoded) is not None, text
        assert set(re.findall(r"\{\{([^{}]*)\}\}", text)) <= {"first_name", "fact.location"}
