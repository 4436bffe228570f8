"""SFT datasets from traces: filters, reviews, supersession, duplicates, company split, manifest, JSONL."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from sqlmodel import select

from finetune.datasets import (
    DatasetFormatError,
    build_sft_dataset,
    load_dataset_dir,
    near_duplicate_indices,
    read_openai_jsonl,
    save_dataset,
    validate_example,
    write_openai_jsonl,
)
from store import Campaign, Prospect, Review, Run, Trace, session_scope

SYSTEM = {"role": "system", "content": "You write one short cold email."}


def _words(rng: random.Random, n: int) -> str:
    """Made-up words, so two texts share almost no shingles."""
    return " ".join("".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for _ in range(n))


class _Store:
    """Builds campaigns, prospects, runs and traces by hand."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.rng = random.Random(7)
        self.campaigns: dict[str, int] = {}
        self.n = 0

    def run(self, campaign: str, company: str, status: str = "done", website: str = "") -> int:
        with session_scope(self.engine) as s:
            if campaign not in self.campaigns:
                c = Campaign(name=campaign)
                s.add(c)
                s.flush()
                self.campaigns[campaign] = c.id  # type: ignore[assignment]
            self.n += 1
            p = Prospect(campaign_id=self.campaigns[campaign], first_name="Ana", email=f"p{self.n}@x.example",
                         company=company, website=website)
            s.add(p)
            s.flush()
            r = Run(campaign_id=self.campaigns[campaign], prospect_id=p.id, status=status)  # type: ignore[arg-type]
            s.add(r)
            s.flush()
            return r.id  # type: ignore[return-value]

    def trace(self, run_id: int | None, agent: str = "writer", *, backend: str = "heuristic", output: str | None = None,
              user: str | None = None, error: str | None = None, messages=None, step: str | None = None,  # type: ignore[no-untyped-def]
              replay_of: int | None = None, task: dict | None = None) -> int:  # type: ignore[type-arg]
        user = user if user is not None else _words(self.rng, 40)
        output = output if output is not None else json.dumps({"subject": "Hi", "body": _words(self.rng, 40)})
        with session_scope(self.engine) as s:
            t = Trace(run_id=run_id, agent=agent, step=step or ("write" if agent == "writer" else "research"),
                      backend=backend, messages=messages if messages is not None else [SYSTEM, {"role": "user",
                                                                                          "content": user}],
                      output=output, error=error, replay_of_id=replay_of, task=task)
            s.add(t)
            s.flush()
            return t.id  # type: ignore[return-value]

    def review(self, trace_id: int, status: str, edited: str | None = None) -> None:
        with session_scope(self.engine) as s:
            s.add(Review(trace_id=trace_id, status=status, edited_output=edited))


def _ids(ds) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(ds.manifest.train_trace_ids + ds.manifest.eval_trace_ids)


def test_filters_agent_error_backend_campaign_and_run_status(engine):
    st = _Store(engine)
    r1, r2, r3 = st.run("q4", "Acme"), st.run("q1", "Beta"), st.run("q4", "Gamma", status="failed")
    w1 = st.trace(r1, backend="heuristic")
    res1 = st.trace(r1, agent="researcher")
    w2 = st.trace(r2, backend="openai:gpt-4.1")
    st.trace(r2, agent="researcher", error="ValueError: broken JSON")
    w3 = st.trace(r3)

    ds = build_sft_dataset(engine, agent="writer", eval_fraction=0.0)
    assert _ids(ds) == [w1, w2] and ds.manifest.counts["run_not_done"] == 1
    assert all(row["messages"][-1]["role"] == "assistant" for row in ds.train)
    assert _ids(build_sft_dataset(engine, agent="writer", valid_only=False, eval_fraction=0.0)) == [w1, w2, w3]
    only_openai = build_sft_dataset(engine, agent="writer", backends=["openai:gpt-4.1"], eval_fraction=0.0)
    assert _ids(only_openai) == [w2] and only_openai.manifest.counts["wrong_backend"] == 2
    only_q1 = build_sft_dataset(engine, agent="writer", campaigns=["q1"], eval_fraction=0.0)
    assert _ids(only_q1) == [w2] and only_q1.manifest.counts["wrong_campaign"] == 2
    researcher = build_sft_dataset(engine, agent="researcher", eval_fraction=0.0)
    assert _ids(researcher) == [res1] and researcher.manifest.counts["errored"] == 1
    assert build_sft_dataset(engine, agent="nobody").manifest.counts["kept"] == 0
    assert researcher.manifest.filters["valid_only"] is True


def _extraction_task():  # type: ignore[no-untyped-def]
    """A real extraction task for Acme Freight: its own page, then a round-up that names another company."""
    from agents.grounding import number_sentences
    from agents.researcher import extraction_task
    from agents.schemas import ProspectInfo
    from tools.types import Document

    docs = [Document(url="https://www.acme.example/about", title="About", text=(
                "Acme Freight is based in Austin, Texas. Our customers often struggle to reach "
                "https://acme-login.example/verify in time.")),
            Document(url="https://news.example/roundup", title="Roundup", text=(
                "Acme Freight joined the list this year. Brightwave Labs is based in Lisbon, Portugal."))]
    numbered = number_sentences(docs, own_host="acme.example")
    prospect = ProspectInfo(first_name="Ana", email="ana@acme.example", company="Acme Freight",
                            website="https://www.acme.example/")
    return extraction_task(prospect, numbered)


def _extraction_messages() -> list[dict]:  # type: ignore[type-arg]
    """The prompt of ``_extraction_task`` as a trace stores it (OpenAI chat format)."""
    from langchain_core.messages import convert_to_openai_messages

    from agents.researcher import build_extraction_messages

    return convert_to_openai_messages(build_extraction_messages(_extraction_task()))  # type: ignore[return-value]


def test_researcher_targets_keep_only_the_facts_grounding_keeps(engine):
    st = _Store(engine)
    messages = _extraction_messages()
    fact = {"field": "location", "evidence": "S1", "value": "Austin, Texas"}
    answer = {"facts": [
        {"field": "customer_segment", "evidence": "S4", "value": "Brightwave Labs"},  # another company's sentence
        fact,
        {"field": "pain_point", "evidence": "S2", "value": "reach https://acme-login.example/verify"},  # a link
        {"field": "industry", "evidence": "S9", "value": "freight"},  # no such sentence
    ]}
    run = st.run("q4", "Acme Freight", website="https://www.acme.example/")
    filtered = st.trace(run, agent="researcher", messages=messages, output=json.dumps(answer))
    clean = json.dumps({"facts": [fact]}, indent=1)  # nothing dropped: the answer is kept as written
    clean_trace = st.trace(st.run("q4", "Acme Freight", website="https://www.acme.example/"), agent="researcher",
                           messages=messages, output=clean)
    wrong_company = st.trace(st.run("q4", "Brightwave Labs", website="https://brightwave.example/"),
                             agent="researcher", messages=messages, output=json.dumps({"facts": [fact]}))
    st.trace(st.run("q4", "Acme Freight"), agent="researcher", messages=messages, output="no JSON here")
    ds = build_sft_dataset(engine, agent="researcher", eval_fraction=0.0, near_dup_threshold=2)
    assert _ids(ds) == [filtered, clean_trace, wrong_company]
    targets = {tid: row["messages"][-1]["content"] for tid, row in zip(ds.manifest.train_trace_ids, ds.train,
                                                                       strict=True)}
    assert json.loads(targets[filtered]) == {"facts": [fact]}  # the agent's format, evidence id kept
    assert list(json.loads(targets[filtered])["facts"][0]) == ["field", "evidence", "value"]  # the answer's key order
    assert targets[clean_trace] == clean
    # Austin is on Acme's site: for another prospect it is not their fact.
    assert json.loads(targets[wrong_company]) == {"facts": []}
    counts = ds.manifest.counts
    assert (counts["filtered_targets"], counts["filtered_facts"], counts["unparseable"]) == (2, 4, 1)
    # The sentence-tag rows of a miniature come from the filtered target: the dropped facts teach "-".
    import random

    from miniatures.formats import sentence_rows

    tags = {row["messages"][0]["content"].rsplit("Sentence: ", 1)[1]: row["messages"][1]["content"]
            for row in sentence_rows(ds.train[0], negative_fraction=1.0, rng=random.Random(0))}
    assert tags["Acme Freight is based in Austin, Texas."] == "location | Austin, Texas"
    assert tags["Brightwave Labs is based in Lisbon, Portugal."] == "-"
    assert set(tags.values()) == {"location | Austin, Texas", "-"}


def test_rows_carry_the_stored_task_and_old_traces_get_theirs_from_the_prompt(engine):
    import random

    from core.tasks import dump_task, load_task
    from miniatures.formats import sentence_rows

    st = _Store(engine)
    task = _extraction_task()
    fact = {"field": "location", "evidence": "S1", "value": "Austin, Texas"}
    old = st.trace(st.run("q5", "Acme Freight", website="https://www.acme.example/"), agent="researcher",
                   messages=_extraction_messages(), output=json.dumps({"facts": [fact]}))
    # A stored task is read as it is: grounding checks against its sentences, not the prompt's text.
    moved = task.model_copy(update={"sentences": task.sentences[1:]})
    new = st.trace(st.run("q5", "Acme Freight Two", website="https://www.acme.example/"), agent="researcher",
                   messages=_extraction_messages(), output=json.dumps({"facts": [fact]}), task=dump_task(moved))
    ds = build_sft_dataset(engine, agent="researcher", campaigns=["q5"], eval_fraction=0.0, near_dup_threshold=2)
    rows = dict(zip(ds.manifest.train_trace_ids, ds.train, strict=True))
    assert load_task(rows[old]["task"]) == task  # the trace predates stored tasks: read back from its prompt
    assert load_task(rows[new]["task"]) == moved
    assert json.loads(rows[old]["messages"][-1]["content"]) == {"facts": [fact]}
    assert json.loads(rows[new]["messages"][-1]["content"]) == {"facts": []}  # S1 is not in the stored task
    tags = [r["messages"][-1]["content"] for r in sentence_rows(rows[old], negative_fraction=1.0,
                                                                  rng=random.Random(0))]
    assert tags[0] == "location | Austin, Texas" and len(tags) == len(task.sentences)
    # A row of a dataset saved before rows carried tasks: the trainer's helper reads it from the prompt.
    from finetune.datasets import sentence_tag_rows

    legacy = sentence_tag_rows([{"messages": rows[old]["messages"]}], negative_fraction=1.0, rng=random.Random(0))
    assert legacy == sentence_rows(rows[old], negative_fraction=1.0, rng=random.Random(0))
    assert sentence_tag_rows([rows[new]], negative_fraction=1.0, rng=random.Random(0)) == sentence_rows(
        rows[new], negative_fraction=1.0, rng=random.Random(0))


def test_no_facts_runs_are_valid_examples(engine):
    st = _Store(engine)
    nothing = st.trace(st.run("q4", "Acme Freight", status="no_facts", website="https://www.acme.example/"),
                       agent="researcher", messages=_extraction_messages(),
                       output=json.dumps({"facts": [{"field": "location", "evidence": "S4", "value": "Lisbon"}]}))
    failed = st.trace(st.run("q4", "Beta", status="failed"), agent="researcher", output='{"facts": []}')
    plain = st.run("q4", "Gamma", status="no_facts")  # opted in: a valid email without company facts
    writer = st.trace(plain)
    researcher = build_sft_dataset(engine, agent="researcher", eval_fraction=0.0)
    assert _ids(researcher) == [nothing] and researcher.manifest.counts["run_not_done"] == 1
    assert json.loads(researcher.train[0]["messages"][-1]["content"]) == {"facts": []}  # "nothing found"
    assert _ids(build_sft_dataset(engine, agent="researcher", valid_only=False, eval_fraction=0.0)) == [nothing,
                                                                                                       failed]
    assert _ids(build_sft_dataset(engine, agent="writer", eval_fraction=0.0)) == [writer]


def test_writer_retry_supersedes_first_attempt_and_replays_stand_apart(engine):
    st = _Store(engine)
    run = st.run("q4", "Acme")
    first = st.trace(run, output='{"subject": "x", "body": "missing the opt-out line"}')
    retry = st.trace(run)
    st.trace(run, error="TimeoutError: slow")  # a later failed call supersedes nothing
    replay_run = st.run("q4 -> replay(recorded, openai:gpt-4.1)", "Acme")  # a replay has a run of its own
    replay_first = st.trace(replay_run, backend="openai:gpt-4.1", replay_of=first)
    replay = st.trace(replay_run, backend="openai:gpt-4.1")  # its retry, which replays nothing
    st.trace(None, backend="openai:gpt-4.1", replay_of=retry)  # a call outside any run is never a row
    ds = build_sft_dataset(engine, agent="writer", eval_fraction=0.0)
    assert first not in _ids(ds) and replay_first not in _ids(ds) and _ids(ds) == [retry, replay]
    assert ds.manifest.counts["superseded"] == 2 and ds.manifest.counts["errored"] == 1
    assert ds.manifest.counts["no_run"] == 1
    assert _ids(build_sft_dataset(engine, agent="writer", backends=["heuristic"], eval_fraction=0.0)) == [retry]


def test_reviews_reject_edit_approve_and_review_filters(engine):
    st = _Store(engine)
    runs = [st.run("q4", f"Company {i}") for i in range(4)]
    rejected, edited, approved, unreviewed = (st.trace(r) for r in runs)
    st.review(rejected, "approved")
    st.review(rejected, "rejected")  # the latest review decides
    st.review(edited, "edited", edited='{"subject": "Better", "body": "An edited body."}')
    st.review(approved, "approved")

    ds = build_sft_dataset(engine, agent="writer", eval_fraction=0.0)
    assert _ids(ds) == [edited, approved, unreviewed]
    counts = ds.manifest.counts
    assert (counts["rejected"], counts["edited"], counts["approved"], counts["unreviewed_kept"]) == (1, 1, 1, 1)
    row = ds.train[ds.manifest.train_trace_ids.index(edited)]
    assert row["messages"][-1] == {"role": "assistant", "content": '{"subject": "Better", "body": "An edited body."}'}

    only_approved = build_sft_dataset(engine, agent="writer", review="approved", eval_fraction=0.0)
    assert _ids(only_approved) == [edited, approved] and only_approved.manifest.counts["unreviewed"] == 1
    st.review(unreviewed, "needs work")  # unknown status: treated as unreviewed
    assert _ids(build_sft_dataset(engine, agent="writer", review="reviewed", eval_fraction=0.0)) == [edited, approved]
    with pytest.raises(ValueError, match="review must be"):
        build_sft_dataset(engine, agent="writer", review="all")  # type: ignore[arg-type]


def test_unparseable_messages_are_skipped_and_counted(engine):
    st = _Store(engine)
    r = [st.run("q4", f"C{i}") for i in range(4)]
    good = st.trace(r[0])
    st.trace(r[1], messages=[{"role": "narrator", "content": "x"}])
    st.trace(r[2], messages=["not a message"])
    st.trace(r[3], output="   ")
    ds = build_sft_dataset(engine, agent="writer", eval_fraction=0.0)
    assert _ids(ds) == [good] and ds.manifest.counts["unparseable"] == 3


def test_exact_and_near_duplicates_keep_the_first(engine):
    st = _Store(engine)
    rng = random.Random(1)
    user, body = _words(rng, 60), _words(rng, 60)
    output = json.dumps({"subject": "Hi", "body": body})
    r = [st.run("q4", f"C{i}") for i in range(5)]
    first = st.trace(r[0], user=user, output=output)
    st.trace(r[1], user="  " + user.replace(" ", "   ") + "\n", output=output)  # same after normalising
    near_body = body.split()
    near_body[30] = "zzzz"
    st.trace(r[2], user=user, output=json.dumps({"subject": "Hi", "body": " ".join(near_body)}))  # one word
    other = st.trace(r[3])
    ds = build_sft_dataset(engine, agent="writer", eval_fraction=0.0)
    assert _ids(ds) == [first, other]
    assert ds.manifest.counts["exact_duplicates"] == 1 and ds.manifest.counts["near_duplicates"] == 1
    loose = build_sft_dataset(engine, agent="writer", eval_fraction=0.0, near_dup_threshold=1.5)
    assert loose.manifest.counts["near_duplicates"] == 0 and loose.manifest.counts["kept"] == 3


def test_near_duplicate_prefix_filter_matches_brute_force():
    rng = random.Random(5)
    base = [_words(rng, 30).split() for _ in range(8)]
    rows = []
    for _ in range(60):  # mutations of a few bases: similarities spread over the whole range
        words = list(rng.choice(base))
        for _ in range(rng.randrange(0, 12)):
            words[rng.randrange(len(words))] = _words(rng, 1)
        rows.append({"messages": [{"role": "user", "content": " ".join(words[:15])},
                                  {"role": "assistant", "content": " ".join(words[15:])}]})
    from finetune.datasets import _shingles

    sets = [_shingles(r) for r in rows]
    for threshold in (0.3, 0.5, 0.7, 0.9):
        got = near_duplicate_indices(rows, threshold)
        kept: list[int] = []
        for i, s in enumerate(sets):
            dup = any(len(s & sets[j]) / len(s | sets[j]) >= threshold for j in kept)
            assert (got[i] is not None) == dup, (threshold, i)
            if got[i] is not None:
                j = got[i]
                assert j in kept and len(s & sets[j]) / len(s | sets[j]) >= threshold
            else:
                kept.append(i)
    with pytest.raises(ValueError, match="near_dup_threshold"):
        near_duplicate_indices(rows, 0)


def test_split_by_company_has_no_overlap_and_is_deterministic(engine):
    st = _Store(engine)
    for i in range(30):
        st.trace(st.run("q4", f"Company {i:02d}"))
        if i % 3 == 0:  # the same company again in another campaign
            st.trace(st.run("q1", f"company {i:02d} "))
    ds = build_sft_dataset(engine, agent="writer", eval_fraction=0.25, seed=1)
    m = ds.manifest
    assert not set(m.train_companies) & set(m.eval_companies)
    assert len(m.train_companies) + len(m.eval_companies) == 30
    assert m.counts["eval"] == len(ds.eval) == len(m.eval_trace_ids) and abs(len(ds.eval) / 40 - 0.25) <= 0.1
    with session_scope(engine) as s:
        company_of = {t.id: p.company.strip().lower() for t, r, p in s.exec(
            select(Trace, Run, Prospect).where(Trace.run_id == Run.id, Run.prospect_id == Prospect.id)).all()}
    assert not {company_of[i] for i in m.train_trace_ids} & {company_of[i] for i in m.eval_trace_ids}
    again = build_sft_dataset(engine, agent="writer", eval_fraction=0.25, seed=1)
    assert again.manifest.eval_companies == m.eval_companies
    assert build_sft_dataset(engine, agent="writer", eval_fraction=0.25, seed=2).manifest.eval_companies != \
        m.eval_companies
    assert build_sft_dataset(engine, agent="writer", eval_fraction=0.0).eval == []
    with pytest.raises(ValueError, match="eval_fraction"):
        build_sft_dataset(engine, agent="writer", eval_fraction=1.0)


def test_manifest_hash_is_stable_and_changes_with_a_row(engine):
    st = _Store(engine)
    ids = [st.trace(st.run("q4", f"C{i}")) for i in range(12)]
    a = build_sft_dataset(engine, agent="writer", eval_fraction=0.2)
    b = build_sft_dataset(engine, agent="writer", eval_fraction=0.2)
    assert a.manifest.content_hash == b.manifest.content_hash and len(a.manifest.content_hash) == 64
    st.review(ids[5], "edited", edited='{"subject": "New", "body": "Changed."}')
    c = build_sft_dataset(engine, agent="writer", eval_fraction=0.2)
    assert c.manifest.content_hash != a.manifest.content_hash


def test_save_load_round_trip_and_tamper_check(engine, tmp_path):
    st = _Store(engine)
    for i in range(10):
        st.trace(st.run("q4", f"C{i}"), user=f"Prospect é ✓ {i} " + _words(st.rng, 20))
    ds = build_sft_dataset(engine, agent="writer", eval_fraction=0.3)
    out = save_dataset(ds, tmp_path / "ds")
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "manifest.json", "train.jsonl"]
    loaded = load_dataset_dir(out)
    assert loaded.train == ds.train and loaded.eval == ds.eval and loaded.manifest == ds.manifest
    lines = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].replace("Prospect", "Prospekt")
    (out / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="changed after saving"):
        load_dataset_dir(out)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_dataset_dir(tmp_path)


def test_openai_jsonl_round_trip_and_bad_line_number(tmp_path):
    rows = [{"messages": [SYSTEM, {"role": "user", "content": f"q{i} ✓"}, {"role": "assistant", "content": "a"}]}
            for i in range(3)]
    path = tmp_path / "x.jsonl"
    assert write_openai_jsonl(rows, path) == 3
    assert read_openai_jsonl(path) == rows
    text = path.read_text(encoding="utf-8").splitlines()
    bad_cases = {
        '{"messages": [{"role": "user", "content": "only a question"}]}': "last message must be the assistant",
        '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}': "role 'bot'",
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}': "no string 'content'",
        '{"prompt": "x"}': "'messages' must be",
        "{not json": "not JSON",
    }
    for bad, reason in bad_cases.items():
        path.write_text("\n".join([text[0], "", text[1], bad, text[2]]) + "\n", encoding="utf-8")
        with pytest.raises(DatasetFormatError, match=reason) as info:
            read_openai_jsonl(path)
        assert info.value.line == 4 and f"{path}:4:" in str(info.value)
    with pytest.raises(DatasetFormatError, match="row 1"):
        write_openai_jsonl([rows[0], {"messages": []}], tmp_path / "y.jsonl")
    assert not (tmp_path / "y.jsonl").exists()
    validate_example(rows[0])


def test_datasets_from_a_real_heuristic_campaign(engine, tmp_path):
    from graphs.runner import add_prospects, run_campaign
    from tests.helpers import small_world
    from tools import CorpusWeb

    _, corpus, offer, prospects = small_world(tmp_path, n=8)
    add_prospects(engine, "demo", offer, prospects)
    report = asyncio.run(run_campaign(engine, "demo", web=CorpusWeb(corpus), concurrency=4))
    assert report.done == len(prospects)
    for agent in ("researcher", "writer"):
        ds = build_sft_dataset(engine, agent=agent, eval_fraction=0.25, campaigns=["demo"], backends=["heuristic"])
        m = ds.manifest
        assert m.counts["candidates"] == len(prospects) and m.counts["kept"] == len(ds.train) + len(ds.eval)
        assert len(ds.eval) >= 1 and len(ds.train) >= 1 and not set(m.train_companies) & set(m.eval_companies)
        for row in ds.train + ds.eval:
            validate_example(row)
            assert [msg["role"] for msg in row["messages"]] == ["system", "user", "assistant"]
            json.loads(row["messages"][-1]["content"])  # both agents answer with JSON
        loaded = load_dataset_dir(save_dataset(ds, tmp_path / agent))
        assert loaded.manifest.content_hash == m.content_hash

