"""Answer grammars from typed tasks (llguidance): accepted and refused answers, masks in generation, greedy decoding.

A random tiny Llama with a byte-level BPE tokenizer trained here (no downloads) generates the answers; without
the grammar it writes text that is no answer at all, with it every answer parses and every value is a span.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.tasks import ExtractionTask, FieldSpec, MergeTag, OfferBrief, Sentence, WritingTask
from miniatures.grammar import (
    GrammarError,
    GrammarLogitsProcessor,
    answer_grammar,
    json_schema,
    llg_tokenizer,
    matcher,
    tag_grammar,
)

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")

from tests.miniature_fixtures import build_tiny_base  # noqa: E402

SENTENCE = "Our flagship product, Sarnora Sync, brings the whole workflow into one place."
TASK = ExtractionTask(
    company="Sarnora", website="https://a.example/",
    fields=(FieldSpec(name="product", description="the main product"), FieldSpec(name="founded_year", description="y")),
    sentences=(Sentence(id="S1", text="Founded in 2014 in Cork.", source_url="https://a.example/"),
               Sentence(id="S2", text=SENTENCE, source_url="https://a.example/"),
               Sentence(id="S3", text='Zoë said "hi" in Zürich.', source_url="https://news.example/")))
OFFER = OfferBrief(sender_title="AE", product="Ledgerline", value_proposition="v", call_to_action="c", opt_out_line="o")
WRITING = WritingTask(offer=OFFER, merge_tags=(MergeTag(name="first_name", description="the first name"),
                                               MergeTag(name="fact.location", description="Cork", value="Cork")))
SPECIAL = "<|start_header_id|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_base(tmp_path_factory.mktemp("grammar") / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": [SPECIAL]})
    return tokenizer, AutoModelForCausalLM.from_pretrained(base).eval()


@pytest.fixture(scope="module")
def llt(tiny: tuple[Any, Any]) -> Any:
    tokenizer = tiny[0]
    return llg_tokenizer(tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")])


def _accepts(llt: Any, tokenizer: Any, grammar: str, text: str | list[int]) -> tuple[bool, bool]:
    """(every token consumed, the answer is complete) for ``text`` fed as the tokenizer splits it, or as ids."""
    found = matcher(llt, grammar)
    ids = text if isinstance(text, list) else tokenizer(text, add_special_tokens=False)["input_ids"]
    return found.consume_tokens(ids), found.is_accepting()


def test_extraction_answers_accepted_and_refused(tiny: tuple[Any, Any], llt: Any) -> None:
    tokenizer = tiny[0]
    grammar = answer_grammar(TASK)
    answer = json.dumps({"facts": [{"field": "product", "evidence": "S2", "value": "Sarnora Sync"},
                                   {"field": "founded_year", "evidence": "S1", "value": "2014"}]})
    assert _accepts(llt, tokenizer, grammar, answer) == (True, True)
    assert _accepts(llt, tokenizer, grammar, '{"facts": []}') == (True, True)
    quoted = json.dumps({"facts": [{"field": "product", "evidence": "S3", "value": '"hi" in Zürich'}]},
                        ensure_ascii=False)
    assert _accepts(llt, tokenizer, grammar, quoted) == (True, True)  # escaped quotes and non-ASCII copy
    assert _accepts(llt, tokenizer, grammar, answer[:50]) == (True, False)  # a prefix: on the way, not done
    refused = {
        "unlisted field": '{"facts": [{"field": "revenue"',
        "unknown sentence id": '{"facts": [{"field": "product", "evidence": "S9"',
        "not in the cited sentence": '{"facts": [{"field": "product", "evidence": "S2", "value": "Quorvanta',
        "blank value": '{"facts": [{"field": "product", "evidence": "S2", "value": ""',
        "padded value": '{"facts": [{"field": "product", "evidence": "S2", "value": " Sync"',
        "repeated field": '{"facts": [{"field": "product", "evidence": "S2", "value": "Sync"}, {"field": "product"',
        "not a whole word (start)": '{"facts": [{"field": "founded_year", "evidence": "S1", "value": "014"',
        "not a whole word (end)": '{"facts": [{"field": "founded_year", "evidence": "S1", "value": "201"}',
        "value before evidence": '{"facts": [{"value": "Sync"',
    }
    for why, text in refused.items():
        assert _accepts(llt, tokenizer, grammar, text)[0] is False, why


def test_email_answers_accepted_and_refused(tiny: tuple[Any, Any], llt: Any) -> None:
    tokenizer = tiny[0]
    grammar = answer_grammar(WRITING)
    email = json.dumps({"subject": "{{fact.location}}", "body": "Hello {{first_name}},\n\nIn {{fact.location}}?"})
    assert _accepts(llt, tokenizer, grammar, email) == (True, True)
    sixty = json.dumps({"subject": "a" * 60, "body": "x"})
    assert _accepts(llt, tokenizer, grammar, sixty) == (True, True)
    refused = {
        "unlisted tag": '{"subject": "Hi {{company}}',
        "first name in the subject": '{"subject": "Hi {{first_name}}',
        "single brace": '{"subject": "Hi {first_name',
        "lone closing brace": '{"subject": "Hi }',
        "brace as a unicode escape": '{"subject": "Hi \\u007b',
        "blank subject": '{"subject": "",',
        "white-space subject": '{"subject": "   ",',
        "subject on two lines": '{"subject": "Hi\\n',
        "raw newline in a string": '{"subject": "Hi", "body": "line\n',
        "not a JSON escape": '{"subject": "Hi", "body": "x\\q',
        "subject of 61 characters": '{"subject": "' + "a" * 61,
    }
    for why, text in refused.items():
        assert _accepts(llt, tokenizer, grammar, text)[0] is False, why


def test_subject_length_counts_characters_whatever_the_tokens(tiny: tuple[Any, Any], llt: Any) -> None:
    """At the subject limit a token carrying the first byte of one more character is refused: partial UTF-8
    counts, and no unlimited stream of broken bytes (\\ufffd) gets in."""
    tokenizer = tiny[0]
    grammar = answer_grammar(WRITING.model_copy(update={"subject_max_chars": 3}))
    head = tokenizer('{"subject": "', add_special_tokens=False)["input_ids"]
    byte_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("é")]  # 2 byte-level tokens
    assert len(byte_ids) == 2
    found = matcher(llt, grammar)
    assert found.consume_tokens(head + byte_ids * 3)  # 3 characters of 2 tokens each: at the limit
    assert not found.consume_token(byte_ids[0])  # a 4th character's first byte
    free = matcher(llt, grammar)
    assert free.consume_tokens(head + byte_ids[:1])  # half a character: allowed, it can still complete
    assert not free.consume_tokens(byte_ids[:1])  # two first bytes in a row are no UTF-8


def test_special_tokens_never_appear_inside_strings(tiny: tuple[Any, Any], llt: Any) -> None:
    tokenizer = tiny[0]
    special = tokenizer.convert_tokens_to_ids(SPECIAL)
    head = tokenizer('{"subject": "Hi', add_special_tokens=False)["input_ids"]
    assert _accepts(llt, tokenizer, answer_grammar(WRITING), [*head, special])[0] is False
    found = matcher(llt, answer_grammar(WRITING))
    assert found.consume_tokens(head)
    mask = torch.frombuffer(bytearray(found.compute_bitmask()), dtype=torch.uint8)
    allowed = torch.from_numpy(__import__("numpy").unpackbits(mask.numpy(), bitorder="little"))
    assert allowed[special] == 0 and allowed[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 0


def test_sentence_tag_grammar(tiny: tuple[Any, Any], llt: Any) -> None:
    tokenizer = tiny[0]
    grammar = tag_grammar("The company employs 6 people.", ["employee_count", "location"])
    for text in ("-", "employee_count | 6", "employee_count | 6 people", "location | company employs"):
        assert _accepts(llt, tokenizer, grammar, text) == (True, True), text
    assert _accepts(llt, tokenizer, grammar, "employee_count | ") == (True, False)  # blank: not done
    for text in ("revenue | 6", "employee_count | eople", "employee_count | 6\n", "- x"):
        assert _accepts(llt, tokenizer, grammar, text)[0] is False, text
    free = tag_grammar("Based in Cork.")
    assert _accepts(llt, tokenizer, free, "location | Cork") == (True, True)


def test_json_schema_shadows_the_grammar() -> None:
    extraction = json_schema(TASK)["schema"]
    item = extraction["properties"]["facts"]["items"]
    assert item["properties"]["field"]["enum"] == ["product", "founded_year"]
    assert item["properties"]["evidence"]["enum"] == ["S1", "S2", "S3"]
    import re

    email = json_schema(WRITING)["schema"]["properties"]
    assert re.fullmatch(email["body"]["pattern"], "Hi {{first_name}}, in {{fact.location}}")
    assert not re.fullmatch(email["body"]["pattern"], "Hi {{company}}")
    assert not re.fullmatch(email["subject"]["pattern"], "two\nlines")


def test_a_grammar_that_does_not_compile_is_refused(llt: Any) -> None:
    with pytest.raises(GrammarError, match="does not compile"):
        matcher(llt, "start: undefined_rule\n")


def _generate(tiny: tuple[Any, Any], grammar: str | None, seed: int, max_new_tokens: int = 120) -> str:
    from transformers import LogitsProcessorList

    tokenizer, model = tiny
    prompt_ids = tokenizer("Extract.<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    kwargs = {}
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if grammar is not None:
        proc = GrammarLogitsProcessor(llg_tokenizer(tokenizer, [stop]), [grammar], len(prompt_ids), [stop])
        kwargs["logits_processor"] = LogitsProcessorList([proc])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a different random model per seed
            p.add_(torch.randn_like(p) * 0.05)
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return str(tokenizer.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True))


def test_generated_answers_parse_and_every_value_is_a_span_of_its_sentence(tiny: tuple[Any, Any]) -> None:
    free = [_generate(tiny, None, seed) for seed in range(2)]
    assert not any(text.startswith('{"facts": [') for text in free), free  # a random model writes no answer
    for seed in range(3):
        text = _generate(tiny, answer_grammar(TASK), seed)
        assert text.startswith('{"facts": [') and text.endswith("]}"), text  # complete: the stop waits for "]}"
        facts = json.loads(text)["facts"]
        assert all(f["value"] in (TASK.sentence(f["evidence"]) or Sentence(id="", text="", source_url="")).text
                   for f in facts), facts
        assert len({f["field"] for f in facts}) == len(facts)


def test_generated_emails_stay_inside_the_email_grammar(tiny: tuple[Any, Any], llt: Any) -> None:
    import re

    for seed in range(2):
        text = _generate(tiny, answer_grammar(WRITING), seed, max_new_tokens=60)
        assert text.startswith('{"subject": "') and "\ufffd" not in text.split('", "body"')[0], text
        assert _accepts(llt, tiny[0], answer_grammar(WRITING), text)[0], text
        assert set(re.findall(r"\{\{([^{}]*)\}\}", text)) <= {"first_name", "fact.location"}


@pytest.mark.parametrize(("parallel_rows", "dtype", "extra_columns", "sparse_limit", "free_row"), [
    (1, "float32", -5, None, True),  # numpy view; the defaults (a bias below 32k tokens); calling thread
    (99, "bfloat16", 7, -1, True),  # torch ops; every row by a bias
    (99, "float32", 7, -1, False),  # numpy view; every row by a bias, all rows at once
    (1, "float32", 0, 12, True),  # numpy view; few refused tokens (the email's body)
    (2, "bfloat16", -5, 12, False),  # torch ops; few refused tokens; the executor
    (2, "bfloat16", 7, -1, False),  # torch ops; every row by a bias, all rows at once
])
def test_processor_masks_equal_llguidance_bitmasks(tiny: tuple[Any, Any], llt: Any, parallel_rows: int, dtype: str,
                                                    extra_columns: int, sparse_limit: int | None,
                                                    free_row: bool) -> None:
    """At every step of rows replaying answers (extraction: mostly a few allowed tokens; email: a free body,
    most tokens allowed; a free row; a row stopped early) the processor's scores equal the scores with every
    token a fresh matcher's bit mask refuses at -inf, whatever the scores' width (narrower or wider than the
    tokenizer), dtype and way of masking, on the executor's threads or the calling thread; free and stopped
    rows are untouched."""
    import numpy as np

    tokenizer = tiny[0]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    extraction = json.dumps({"facts": [{"field": "product", "evidence": "S2", "value": "Sarnora Sync"}]})
    email = json.dumps({"subject": "{{fact.location}}", "body": "Hello {{first_name}}, a body in {{fact.location}}."})
    grammars = [answer_grammar(TASK), None, answer_grammar(WRITING), answer_grammar(WRITING)]
    answers = [tokenizer(extraction, add_special_tokens=False)["input_ids"] + [stop], [],
               tokenizer(email, add_special_tokens=False)["input_ids"] + [stop],
               tokenizer(email, add_special_tokens=False)["input_ids"][:3] + [stop]]
    if not free_row:
        grammars[1], answers[1] = grammars[0], answers[0]
    steps = max(len(a) for a in answers)
    fed = [a + [stop] * (steps - len(a)) if a else [5] * steps for a in answers]  # after a stop: padding
    references = [matcher(llt, g) if g is not None else None for g in grammars]
    proc = GrammarLogitsProcessor(llt, grammars, 1, [stop], parallel_rows=parallel_rows, sparse_limit=sparse_limit)
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    allowed_counts = []
    prefix = torch.zeros((4, 1), dtype=torch.long)
    for step in range(steps):
        scores = torch.randn((4, vocab + extra_columns), generator=generator).to(getattr(torch, dtype))
        expected = scores.clone()
        for row, ref in enumerate(references):
            if ref is None or (step > 0 and fed[row][step - 1] == stop):
                references[row] = None
                continue
            bits = np.unpackbits(np.frombuffer(ref.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(np.resize(bits[:vocab].astype(bool), vocab + max(extra_columns, 0)))
            allowed[vocab:] = False
            expected[row] = expected[row].masked_fill(~allowed[: scores.shape[1]], float("-inf"))
            allowed_counts.append(int(allowed.sum()))
            assert fed[row][step] == stop or ref.consume_token(fed[row][step])
        got = proc(prefix, scores)
        assert torch.equal(got, expected), f"step {step}"
        prefix = torch.cat([prefix, torch.tensor([[t[step]] for t in fed])], dim=1)
    assert min(allowed_counts) <= 2 and max(allowed_counts) > vocab // 2  # both kinds of rows were masked


def test_batched_rows_each_follow_their_own_grammar(tiny: tuple[Any, Any]) -> None:
    """Two rows with two grammars and one free row in one generate call; a stop id outside the vocabulary
    (as the speed benchmark sets) never reaches the mask."""
    from transformers import LogitsProcessorList

    tokenizer, model = tiny
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer("Hi<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    grammars = [answer_grammar(TASK), None, answer_grammar(WRITING)]
    stops = [stop, len(tokenizer) + 10**6]
    proc = GrammarLogitsProcessor(llg_tokenizer(tokenizer, [stop]), grammars, len(prompt), stops)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt] * 3), max_new_tokens=40, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([proc]))
    texts = [tokenizer.decode(row[len(prompt):].tolist(), skip_special_tokens=True) for row in out]
    assert texts[0].startswith('{"facts": [') and texts[2].startswith('{"subject": "'), texts
    assert proc.constrained_steps > 0


def test_the_engine_constrains_only_calls_with_a_task(tmp_path: Path) -> None:
    from langchain_core.messages import HumanMessage

    from miniatures.local import LocalEngine, LocalMiniatureChatModel

    engine = LocalEngine(str(build_tiny_base(tmp_path / "base")), device="cpu", max_new_tokens=200)
    try:
        seen: list[object] = []
        original = engine._prepare

        def spy(*args: Any, **kwargs: Any) -> Any:
            request = original(*args, **kwargs)
            seen.append(request.matcher)  # the grammar's matcher the engine's loop masks with, or None
            return request

        engine._prepare = spy  # type: ignore[method-assign]
        chat = LocalMiniatureChatModel(engine=engine, adapter="__base__")
        answer = chat.invoke([HumanMessage("S1: Founded in 2014 in Cork.")], task=TASK)
        assert json.loads(answer.text)["facts"] is not None
        chat.invoke([HumanMessage("{{first_name}}: the first name")], task=WRITING)
        chat.invoke([HumanMessage("S1: Founded in 2014 in Cork.")], max_new_tokens=4)  # no task: no sniffing
        assert seen[0] is not None and seen[1] is not None and seen[2] is None
        tags = LocalMiniatureChatModel(engine=engine, adapter="__base__", answer_format="sentence-tags")
        calls = engine.generate_calls
        assembled = json.loads(tags.invoke([HumanMessage("extract")], task=TASK).text)
        assert engine.generate_calls - calls == len(TASK.sentences)  # one tag prompt per sentence (sync path)
        assert all(f["field"] in TASK.field_names for f in assembled["facts"])
        with pytest.raises(TypeError, match="task must be"):
            chat.invoke([HumanMessage("x")], task="extract this")
    finally:
        engine.close()


def test_greedy_ignores_the_bases_generation_config(tmp_path: Path) -> None:
    """A base whose generation_config asks for repetition_penalty 1.1 and sampling still decodes plain greedy:
    the engine's answer equals an argmax loop over the model's own logits."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from miniatures.local import LocalEngine

    base = build_tiny_base(tmp_path / "base")
    GenerationConfig(repetition_penalty=1.1, do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                     no_repeat_ngram_size=2).save_pretrained(base)
    engine = LocalEngine(str(base), device="cpu", max_new_tokens=30)
    try:
        assert engine._base.generation_config.repetition_penalty == 1.1
        engine.stop_token_ids = [len(engine.tokenizer) + 1]  # never stops: 30 tokens each way
        messages = [{"role": "user", "content": "logistics software in Austin"}]
        got = engine.generate_sync("__base__", messages)
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        ids = engine.prompt_ids(messages)
        with torch.no_grad():
            for _ in range(30):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        expected = engine.tokenizer.decode(ids[-30:], skip_special_tokens=True)
        assert got.text == expected
        resolved, _ = engine._base._prepare_generation_config(engine.generation_config(5))
        assert (resolved.repetition_penalty, resolved.do_sample, resolved.no_repeat_ngram_size) == (1.0, False, 0)
    finally:
        engine.close()
