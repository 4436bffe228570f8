"""Supervised fine-tuning (SFT) datasets per agent, built from the traces in the store.

One example per qualifying model call, in OpenAI chat format: ``{"messages": [system?, user, ...,
assistant], "task": {...}}``, the last message the answer to learn (the teacher's recorded output, or a
reviewer's edit), ``task`` the call's typed task (``core.tasks.dump_task`` JSON: the stored one, or for a
trace recorded before tasks were stored the one ``agents.legacy_tasks`` reads back from its prompt), which
answer formats such as ``sentence-tags`` read instead of the prompt text. ``messages`` is the format TRL's
``SFTTrainer`` reads for conversational data and the JSONL format of OpenAI chat fine-tuning, so the same
rows serve local LoRA training and hosted fine-tuning (a trainer reads ``messages`` only; a file for a
hosted service can be written without ``task``).

**Chat template.** The rows stay in ``messages`` form: nothing here renders a prompt string. The
trainer applies the tokenizer's chat template (TRL calls ``tokenizer.apply_chat_template`` on
``messages`` data), and the local inference backend applies the same tokenizer's template to the
same message list, so training and inference see identical prompt text (a mismatch there is a
common source of silent quality loss; see DESIGN.md, "The one interface for models").

**Pipeline** (``build_sft_dataset``), each stage counted in the manifest:

1. *Qualify*: traces of the agent without an error, not superseded (only the LAST successful call of
   each kind ``(run, agent, step)`` counts: a writer retry after failed validation supersedes the first
   attempt; a replay, ``Trace.replay_of_id``, belongs to its own run in the replay campaign that
   ``finetune.replay`` made, so it is a row of its own), matching the backend and campaign filters, and
   with ``valid_only`` from runs whose status is ``done`` or ``no_facts`` (research kept no verified
   fact: its researcher call is a "nothing found" example, and a writer call there wrote the
   non-personalised email the campaign opted in to, which passed validation, or the run would be
   ``failed``).
2. *Review*: the latest ``Review`` row of a trace decides: ``rejected`` drops it, ``edited`` replaces the
   target by ``Review.edited_output``, ``approved`` keeps it; ``review="approved"`` keeps only approved or
   edited traces, ``review="reviewed"`` any reviewed trace not rejected.
3. *Parse*: rows whose messages are not a valid chat (see ``validate_example``) are skipped and counted.
   A researcher row's target is the answer filtered to the facts grounding keeps
   (``check_extraction_answer``: ``agents.grounding.check_fact`` re-run on the sentences of the trace's
   own task, for the run's prospect), so a miniature never learns a fact that was dropped as ungrounded,
   misattributed (another company's page) or of a bad value; rows whose target lost facts are counted
   (``filtered_targets``, ``filtered_facts``), and a researcher answer that does not parse is skipped.
4. *Exact duplicates*: sha256 of the canonical JSON of the normalised messages (roles, Unicode NFC,
   whitespace runs collapsed) plus target; the first occurrence (lowest trace id) is kept.
5. *Near duplicates*: Jaccard similarity of word 3-shingle sets over the user messages plus the target
   (Broder, "On the resemblance and containment of documents", 1997), computed exactly; candidate pairs
   come from prefix filtering (Chaudhuri et al., ICDE 2006; Bayardo et al., "Scaling up all pairs
   similarity search", WWW 2007), which finds every pair at or above the threshold without comparing all
   pairs. A row whose similarity to an already kept row is >= ``near_dup_threshold`` is dropped (keep the
   first). The system prompt is left out: it is the same for every call of an agent.
6. *Split by company*: the prospect's company of the trace's run; companies are ordered by
   ``sha256(seed:company)`` (a seeded order that does not change when other companies are added) and
   taken into eval until it holds ``eval_fraction`` of the rows, so no company is in both splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import Engine
from sqlmodel import SQLModel, col, select

from agents.attribution import CompanyMatcher
from agents.grounding import NumberedSentences, check_fact
from agents.legacy_tasks import task_from_messages, trace_task
from agents.parsing import OutputParseError, extract_json_object, parse_model_output
from agents.schemas import ExtractionOutput
from core.errors import UserError
from core.tasks import ExtractionTask, WritingTask, dump_task
from miniatures.redaction import redact
from store import session_scope
from store.exports import trace_to_openai_example
from store.models import Campaign, Prospect, Review, Run, RunStatus, Trace

__all__ = [
    "DatasetFormatError",
    "DatasetManifest",
    "ExtractionCheck",
    "SftDataset",
    "build_sft_dataset",
    "by_ids",
    "check_extraction_answer",
    "content_hash",
    "extraction_json",
    "flatten_content",
    "latest_reviews",
    "load_dataset_dir",
    "near_duplicate_indices",
    "read_openai_jsonl",
    "save_dataset",
    "sentence_tag_rows",
    "task_sentences",
    "validate_example",
    "write_openai_jsonl",
    "writer_brief_rows",
]

logger = logging.getLogger(__name__)

ReviewFilter = Literal["any", "approved", "reviewed"]

#: Roles a training row may hold (OpenAI chat fine-tuning without tools).
ROLES = frozenset({"system", "user", "assistant"})
#: Words per shingle for near-duplicate detection.
SHINGLE_WORDS = 3
#: Review statuses the store knows (``store.models.Review.status``).
REVIEW_STATUSES = frozenset({"approved", "edited", "rejected"})
#: File names written by ``save_dataset``.
TRAIN_FILE, EVAL_FILE, MANIFEST_FILE = "train.jsonl", "eval.jsonl", "manifest.json"
#: Near-duplicate method, as recorded in the manifest.
NEAR_DUP_METHOD = (
    f"exact Jaccard of word {SHINGLE_WORDS}-shingle sets over user messages + target, "
    "candidates by prefix filtering; first kept"
)
_CHUNK = 500  # ids per IN (...) query
#: Run statuses whose traces ``valid_only`` keeps.
_VALID_RUNS = frozenset({RunStatus.DONE, RunStatus.NO_FACTS})
_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


class DatasetFormatError(UserError, ValueError):
    """A training row (or a JSONL line) is not a valid OpenAI chat example.

    Attributes:
        line: 1-based line number in the file, when the row came from a file.
        path: the file, when the row came from a file.
    """

    def __init__(self, message: str, *, line: int | None = None, path: Path | None = None) -> None:
        where = f"{path}:{line}: " if path is not None and line is not None else (f"line {line}: " if line else "")
        super().__init__(where + message)
        self.line = line
        self.path = path


@dataclass
class DatasetManifest:
    """What a dataset holds and how it was made.

    Attributes:
        agent: the agent whose traces these are (``researcher``, ``writer``).
        filters: the arguments of ``build_sft_dataset`` (backends, campaigns, review, valid_only,
            eval_fraction, near_dup_threshold, seed).
        counts: stage counts: ``traces`` (all of the agent), ``errored``, ``superseded``, ``no_run``,
            ``wrong_backend``, ``wrong_campaign``, ``run_not_done`` (neither ``done`` nor ``no_facts``),
            ``candidates`` (qualified before review), ``rejected``, ``unreviewed`` (dropped by the review
            filter), ``edited``, ``approved``, ``unreviewed_kept``, ``unparseable``, ``filtered_targets``
            (researcher rows whose target lost facts grounding drops) and ``filtered_facts`` (the facts
            they lost), ``exact_duplicates``, ``near_duplicates``, ``kept``, ``train``, ``eval``,
            ``train_companies``, ``eval_companies``.
        content_hash: sha256 hex of the canonical JSON of the rows (``content_hash``).
        train_trace_ids, eval_trace_ids: source trace id of each row, in row order.
        train_companies, eval_companies: normalised company names per split (sorted; disjoint).
        near_dup_method: how near duplicates were found.
        created_at: ISO 8601 UTC time the dataset was built (not part of the hash).
    """

    agent: str
    filters: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    content_hash: str = ""
    train_trace_ids: list[int] = field(default_factory=list)
    eval_trace_ids: list[int] = field(default_factory=list)
    train_companies: list[str] = field(default_factory=list)
    eval_companies: list[str] = field(default_factory=list)
    near_dup_method: str = NEAR_DUP_METHOD
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetManifest:
        """Read a manifest written by ``to_dict``; unknown keys are ignored (newer writers).

        Raises:
            ValueError: ``agent`` is missing.
        """
        if "agent" not in data:
            raise ValueError("manifest has no 'agent'; is this a manifest.json written by save_dataset?")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SftDataset:
    """Train and eval rows (``{"messages": [...]}``, last message assistant) plus their manifest."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    manifest: DatasetManifest


# --------------------------------------------------------------------------- validation and JSONL


def validate_example(row: Any) -> None:
    """Check one row is an OpenAI chat fine-tuning example.

    A valid row is a dict with ``messages``: a non-empty list of dicts, each with ``role`` in
    system/user/assistant and ``content`` a string, the last one the assistant's. Other keys (``weight``,
    ``name``) are allowed, as OpenAI allows them.

    Raises:
        DatasetFormatError: naming the first problem found.
    """
    if not isinstance(row, dict):
        raise DatasetFormatError(f"expected a JSON object with 'messages', got {type(row).__name__}")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetFormatError("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetFormatError(f"messages[{i}] is a {type(message).__name__}, not an object")
        role = message.get("role")
        if role not in ROLES:
            raise DatasetFormatError(f"messages[{i}] has role {role!r}; use one of {sorted(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DatasetFormatError(f"messages[{i}] ({role}) has no string 'content'")
    if messages[-1]["role"] != "assistant":
        raise DatasetFormatError(f"the last message must be the assistant's answer, not {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise DatasetFormatError("the last (assistant) message is empty")


def write_openai_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write rows as OpenAI fine-tuning JSONL (one ``{"messages": [...]}`` object per line, UTF-8).

    Every row is validated before anything is written, so a bad row leaves no half-written file.

    Args:
        rows: examples in OpenAI chat format.
        path: the file to write (its folder is created).

    Returns:
        The number of rows written.

    Raises:
        DatasetFormatError: a row is invalid (the message names its 0-based index).
    """
    rows = list(rows)
    for i, row in enumerate(rows):
        try:
            validate_example(row)
        except DatasetFormatError as exc:
            raise DatasetFormatError(f"row {i}: {exc}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(rows)


def read_openai_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate OpenAI fine-tuning JSONL; blank lines are skipped.

    Args:
        path: a ``.jsonl`` file, one example per line.

    Returns:
        The rows, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DatasetFormatError: a line is not JSON or not a valid example; ``.line`` holds its 1-based number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"not JSON ({exc.msg} at column {exc.colno})", line=number,
                                         path=path) from exc
            try:
                validate_example(row)
            except DatasetFormatError as exc:
                raise DatasetFormatError(str(exc), line=number, path=path) from exc
            rows.append(row)
    return rows


def content_hash(train: Sequence[Mapping[str, Any]], eval: Sequence[Mapping[str, Any]]) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces, UTF-8) of ``{"eval": ..., "train": ...}``."""
    canonical = json.dumps({"train": list(train), "eval": list(eval)}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def save_dataset(ds: SftDataset, out_dir: str | Path) -> Path:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``manifest.json`` into ``out_dir`` (created if needed).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        DatasetFormatError: a row is invalid.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_openai_jsonl(ds.train, out / TRAIN_FILE)
    write_openai_jsonl(ds.eval, out / EVAL_FILE)
    manifest = ds.manifest.to_dict()
    manifest["content_hash"] = content_hash(ds.train, ds.eval)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("saved %s dataset to %s: %d train, %d eval rows", ds.manifest.agent, out, len(ds.train),
                len(ds.eval))
    return out


def load_dataset_dir(directory: str | Path) -> SftDataset:
    """Read a folder written by ``save_dataset`` and check its rows against the manifest's hash.

    Raises:
        FileNotFoundError: the folder or one of its three files is missing.
        DatasetFormatError: a JSONL line is invalid (with its line number).
        ValueError: the rows' hash differs from the manifest's (the files were edited after saving:
            rebuild the dataset, or save it again to record the new hash).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"no dataset folder at {folder}")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing; is {folder} a folder written by save_dataset?")
    manifest = DatasetManifest.from_dict(json.loads(manifest_path.read_text(encoding="utf-8")))
    train = read_openai_jsonl(folder / TRAIN_FILE)
    eval_rows = read_openai_jsonl(folder / EVAL_FILE)
    actual = content_hash(train, eval_rows)
    if manifest.content_hash and actual != manifest.content_hash:
        raise ValueError(f"{folder}: rows hash to {actual[:12]}... but manifest.json records "
                         f"{manifest.content_hash[:12]}...; the files changed after saving (rebuild the dataset)")
    return SftDataset(train=train, eval=eval_rows, manifest=manifest)


# --------------------------------------------------------------------------- duplicates


def _normalise_text(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _exact_key(row: Mapping[str, Any]) -> str:
    normalised = [{"role": m["role"], "content": _normalise_text(m["content"])} for m in row["messages"]]
    return hashlib.sha256(json.dumps(normalised, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _shingles(row: Mapping[str, Any]) -> frozenset[str]:
    """Word ``SHINGLE_WORDS``-grams (casefolded) of the user messages plus the target."""
    messages = row["messages"]
    text = "\n".join([m["content"] for m in messages[:-1] if m["role"] == "user"] + [messages[-1]["content"]])
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    if len(words) < SHINGLE_WORDS:
        return frozenset({" ".join(words)})
    return frozenset(" ".join(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))


def near_duplicate_indices(rows: Sequence[Mapping[str, Any]], threshold: float) -> list[int | None]:
    """For each row, the index of an earlier KEPT row it nearly duplicates, or ``None`` if it is kept.

    Similarity is the Jaccard index of word 3-shingle sets over the user messages plus the assistant
    target (Broder 1997), computed exactly. Candidate pairs come from prefix filtering (Chaudhuri et al.
    2006; Bayardo et al. 2007): with shingles in a global rare-first order, two sets with Jaccard >= t
    share a shingle within the first ``|x| - ceil(t*|x|) + 1`` of each, so only those prefixes are
    indexed; a size filter (``t*|x| <= |y|``) prunes further. Rows are visited in order and compared only
    with rows already kept, so the first of a group of near duplicates is the one kept.

    Args:
        rows: valid examples (see ``validate_example``).
        threshold: Jaccard similarity in (0, 1]; a value > 1 disables the check.

    Returns:
        A list as long as ``rows``.

    Raises:
        ValueError: ``threshold`` is not positive.
    """
    if not threshold > 0:
        raise ValueError(f"near_dup_threshold must be > 0 (a Jaccard similarity; > 1 disables it), got {threshold}")
    result: list[int | None] = [None] * len(rows)
    if threshold > 1 or not rows:
        return result
    sets = [_shingles(r) for r in rows]
    frequency = Counter(s for shingle_set in sets for s in shingle_set)
    ordered = [sorted(s, key=lambda g: (frequency[g], g)) for s in sets]
    index: dict[str, list[int]] = defaultdict(list)
    for i, tokens in enumerate(ordered):
        size = len(tokens)
        prefix = size - math.ceil(threshold * size - 1e-9) + 1
        seen: set[int] = set()
        for token in tokens[:prefix]:
            for j in index.get(token, ()):
                if j in seen:
                    continue
                seen.add(j)
                other = len(sets[j])
                if threshold * max(size, other) > min(size, other) + 1e-9:
                    continue
                overlap = len(sets[i] & sets[j])
                if overlap / (size + other - overlap) >= threshold:
                    result[i] = j
                    break
            if result[i] is not None:
                break
        if result[i] is None:
            for token in tokens[:prefix]:
                index[token].append(i)
    return result


# --------------------------------------------------------------------------- researcher targets


def task_sentences(task: ExtractionTask | WritingTask | None) -> NumberedSentences:
    """The numbered sentences of a call's task (``agents.legacy_tasks.trace_task`` of a trace) as grounding
    reads them; empty for a writing task or none."""
    return NumberedSentences.from_task(task) if isinstance(task, ExtractionTask) else NumberedSentences()


def extraction_json(output: ExtractionOutput, text: str, keep: Iterable[int] | None = None) -> str:
    """``output`` in the researcher's answer format, ``{"facts": [...]}`` JSON, each fact's keys in the
    order ``text`` (the answer ``output`` was parsed from) wrote them, so a rewritten answer looks like the
    agent's own.

    Args:
        output: the parsed answer.
        text: the answer's text.
        keep: indices (0-based) of the facts to write, in answer order; None writes every fact.
    """
    raw = extract_json_object(text).get("facts") or []
    wanted = set(range(len(output.facts))) if keep is None else set(keep)
    facts = []
    for i, fact in enumerate(output.facts):
        if i not in wanted:
            continue
        values = fact.model_dump()
        order = [k for k in (raw[i] if i < len(raw) and isinstance(raw[i], dict) else {}) if k in values]
        facts.append({k: values[k] for k in [*order, *(k for k in values if k not in order)]})
    return json.dumps({"facts": facts}, ensure_ascii=False)


@dataclass(frozen=True)
class ExtractionCheck:
    """A researcher answer checked against the sentences of its own task, as grounding checks it.

    Attributes:
        text: the answer's text.
        output: the parsed answer.
        kept: indices (0-based, into ``output.facts``) of the facts grounding keeps, in answer order.
        drops: ``(index, reason, detail)`` of every other fact: ``reason`` a key of
            ``agents.schemas.DROP_REASONS``, ``detail`` what is wrong and what to do.
    """

    text: str
    output: ExtractionOutput
    kept: list[int]
    drops: list[tuple[int, str, str]]

    def kept_json(self) -> str:
        """The answer filtered to the kept facts, in the agent's answer format (``extraction_json``)."""
        return extraction_json(self.output, self.text, self.kept)


def check_extraction_answer(text: str, task: ExtractionTask | WritingTask | None,
                            matcher: CompanyMatcher) -> ExtractionCheck:
    """Check each fact of a researcher answer with ``agents.grounding.check_fact`` against the numbered
    sentences of the task it answered, with no documents (so evidence must be a sentence id of that
    task, not a quote) and the first kept fact of a field taking it, as ``ground_facts`` does.

    Args:
        text: the answer (a model output or a reviewer's edit; prose or fences around the JSON tolerated).
        task: the call's typed task (``agents.legacy_tasks.trace_task(trace)``); no sentences without an
            extraction task, so every fact is then dropped.
        matcher: the run's prospect (``CompanyMatcher(company, website)``): whose facts count.

    Returns:
        ``ExtractionCheck``.

    Raises:
        agents.parsing.OutputParseError: ``text`` is not ``ExtractionOutput`` JSON.
    """
    output = parse_model_output(text, ExtractionOutput)
    numbered = task_sentences(task)
    kept: list[int] = []
    drops: list[tuple[int, str, str]] = []
    taken: set[str] = set()
    for i, fact in enumerate(output.facts):
        reason, detail, resolved = check_fact(fact, numbered, [], matcher, taken)
        if reason or resolved is None:
            drops.append((i, reason or "ungrounded", detail))
            continue
        kept.append(i)
        taken.add(fact.field.strip())
    return ExtractionCheck(text, output, kept, drops)


def sentence_tag_rows(rows: Iterable[Mapping[str, Any]], *, negative_fraction: float,
                      rng: random.Random) -> list[dict[str, Any]]:
    """The ``sentence-tags`` training rows of extraction ``rows`` (``miniatures.formats.sentence_rows``).

    Each row's task is the one it carries (``row["task"]``, as ``build_sft_dataset`` writes it), else, for a
    row of a dataset built before rows carried tasks, the one ``agents.legacy_tasks.task_from_messages``
    reads back from its messages; rows that are no extraction give none.

    Args:
        rows: chat rows ``{"messages": [...], "task"?: {...}}``.
        negative_fraction: share of ``-`` rows kept, in [0, 1].
        rng: the random source of that choice (seeded by the caller), consumed in row order.

    Returns:
        Rows ``{"messages": [user, assistant]}``, in row and sentence order.
    """
    from miniatures.formats import row_task, sentence_rows

    out: list[dict[str, Any]] = []
    for row in rows:
        task = row_task(row)
        if task is None and not row.get("task"):
            legacy = task_from_messages(row.get("messages") or [])
            task = legacy if isinstance(legacy, ExtractionTask) else None
        out += sentence_rows(row, negative_fraction=negative_fraction, rng=rng, task=task)
    return out


def writer_brief_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``writer-brief`` training rows of writer ``rows`` (``miniatures.formats.brief_row``: the brief of each
    row's writing task, ``row["task"]``, and the teacher's answer with the offer's texts as offer tags); rows
    without a writing task or whose answer is not the agent's JSON give none (counted in the log).

    Returns:
        Rows ``{"messages": [user, assistant], "task": {...}}``, in row order.
    """
    from miniatures.formats import brief_row

    out: list[dict[str, Any]] = []
    skipped = 0
    for row in rows:
        made = brief_row(row)
        if made is None:
            skipped += 1
        else:
            out.append(made)
    if skipped:
        logger.warning("writer-brief: %d of %d rows carry no writing task or no email answer; left out",
                       skipped, skipped + len(out))
    return out


# --------------------------------------------------------------------------- building


M = TypeVar("M", bound=SQLModel)


def by_ids(session: Any, model: type[M], ids: Iterable[int]) -> dict[int, M]:
    """Rows of table ``model`` by primary key (``{id: row}``), fetched in chunks of ``_CHUNK`` ids."""
    wanted = sorted(set(ids))
    found: dict[int, M] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        for obj in session.exec(select(model).where(col(model.id).in_(chunk))).all():  # type: ignore[attr-defined]
            found[_id(obj)] = obj
    return found


def latest_reviews(session: Any, trace_ids: Sequence[int]) -> dict[int, Review]:
    """The latest ``Review`` of each trace that has one (``{trace id: review}``; later rows win)."""
    latest: dict[int, Review] = {}
    wanted = sorted(set(trace_ids))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        query = select(Review).where(col(Review.trace_id).in_(chunk)).order_by(col(Review.id))
        for review in session.exec(query).all():
            latest[int(review.trace_id or 0)] = review  # later rows overwrite: the latest review decides
    return latest


def _company_key(name: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", name)).strip().casefold()


def flatten_content(messages: Any) -> Any:
    """Text-part lists (``[{"type": "text", "text": ...}]``) become one string; anything else is left as is."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
                m = {**m, "content": "".join(p["text"] for p in parts)}
        out.append(m)
    return out


def _split_by_company(companies: Sequence[str], eval_fraction: float, seed: int) -> set[str]:
    """Companies that go to eval: seeded hash order, taken until eval holds ``eval_fraction`` of the rows."""
    rows_per_company = Counter(companies)
    if eval_fraction <= 0 or len(rows_per_company) < 2:
        return set()
    order = sorted(rows_per_company, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    target = eval_fraction * len(companies)
    chosen: set[str] = set()
    taken = 0
    for company in order[:-1]:  # at least one company stays in train
        if taken >= target:
            break
        chosen.add(company)
        taken += rows_per_company[company]
    return chosen


def _id(obj: Any) -> int:
    """The primary key of a row read from the store (never ``None`` there)."""
    if obj.id is None:
        raise ValueError(f"{type(obj).__name__} has no id; only rows read from the store can be used")
    return int(obj.id)


def _iter_candidates(
    session: Any,
    *,
    agent: str,
    backends: set[str] | None,
    campaigns: set[str] | None,
    valid_only: bool,
    counts: Counter[str],
) -> Iterator[tuple[Trace, str, Prospect | None]]:
    """Yield ``(trace, company key, prospect)`` for each qualifying trace, in trace id order, counting what
    was dropped."""
    traces = session.exec(select(Trace).where(Trace.agent == agent).order_by(col(Trace.id))).all()
    counts["traces"] = len(traces)
    ok = [t for t in traces if not t.error]
    counts["errored"] = len(traces) - len(ok)
    run_of = {_id(t): int(t.run_id) for t in ok if t.run_id is not None}
    last: dict[tuple[int, str, str], Trace] = {}
    for t in ok:  # ascending id: a later call of the same kind supersedes an earlier one
        if _id(t) in run_of:
            last[(run_of[_id(t)], t.agent, t.step)] = t
    counts["no_run"] = len(ok) - len(run_of)
    counts["superseded"] = len(run_of) - len(last)
    runs = by_ids(session, Run, run_of.values())
    prospects = by_ids(session, Prospect, [r.prospect_id for r in runs.values()])
    campaign_names = {c.id: c.name for c in by_ids(session, Campaign, [r.campaign_id for r in runs.values()]).values()}
    for trace in sorted(last.values(), key=_id):
        run = runs[run_of[_id(trace)]]
        # Stored specs are redacted (miniatures.redaction): compare in the same form.
        if backends is not None and trace.backend not in {redact(b) for b in backends}:
            counts["wrong_backend"] += 1
            continue
        if campaigns is not None and campaign_names.get(run.campaign_id) not in campaigns:
            counts["wrong_campaign"] += 1
            continue
        if valid_only and run.status not in _VALID_RUNS:
            counts["run_not_done"] += 1
            continue
        prospect = prospects.get(run.prospect_id)
        counts["candidates"] += 1
        yield trace, _company_key(prospect.company if prospect is not None else f"run-{run.id}"), prospect


def _researcher_target(trace: Trace, target: str | None, prospect: Prospect | None, counts: Counter[str]) -> str:
    """The researcher row's target: the answer (``target``, else the trace's output) filtered to the facts
    grounding keeps for the run's prospect (``check_extraction_answer``); the answer as it is when nothing
    is dropped. Counts ``filtered_targets`` and ``filtered_facts``.

    Raises:
        agents.parsing.OutputParseError: the answer is not ``ExtractionOutput`` JSON.
    """
    text = trace.output if target is None else target
    matcher = CompanyMatcher(prospect.company, prospect.website) if prospect is not None else CompanyMatcher("", "")
    check = check_extraction_answer(text, trace_task(trace), matcher)
    if not check.drops:
        return text
    counts["filtered_targets"] += 1
    counts["filtered_facts"] += len(check.drops)
    logger.debug("trace %s: target keeps %d of %d facts (dropped: %s)", trace.id, len(check.kept),
                 len(check.output.facts), ", ".join(reason for _i, reason, _d in check.drops))
    return check.kept_json()


def build_sft_dataset(
    engine: Engine,
    *,
    agent: str,
    backends: Sequence[str] | None = None,
    campaigns: Sequence[str] | None = None,
    review: ReviewFilter = "any",
    valid_only: bool = True,
    eval_fraction: float = 0.1,
    near_dup_threshold: float = 0.9,
    seed: int = 0,
) -> SftDataset:
    """Build one agent's SFT dataset from the store's traces (see the module docstring for the stages).

    Args:
        engine: the store (``store.open_store``).
        agent: ``researcher`` or ``writer`` (any ``Trace.agent`` value).
        backends: keep traces of these backend specs only (e.g. ``["openai:gpt-4.1"]``); ``None``: any.
        campaigns: keep traces of runs in these campaigns (by name) only; ``None``: any.
        review: ``any`` keeps unreviewed traces too; ``approved`` only approved or edited ones; ``reviewed``
            any reviewed trace that was not rejected. Rejected traces are always dropped.
        valid_only: keep only traces of runs whose status is ``done`` (the email passed validation) or
            ``no_facts`` (research kept no verified fact: a researcher row then teaches "nothing found").
        eval_fraction: share of rows, in [0, 1), whose companies go to eval (whole companies, so the
            share is approximate; with fewer than two companies eval is empty).
        near_dup_threshold: Jaccard similarity in (0, 1] at which a row counts as a near duplicate of
            an earlier kept row; a value > 1 disables near-duplicate removal.
        seed: seed of the company split.

    Returns:
        ``SftDataset`` with train and eval rows in trace id order and a ``DatasetManifest``.

    Raises:
        ValueError: an argument is out of range (named in the message).
    """
    if not agent:
        raise ValueError("agent must name an agent, e.g. 'researcher' or 'writer'")
    if review not in ("any", "approved", "reviewed"):
        raise ValueError(f"review must be 'any', 'approved' or 'reviewed', got {review!r}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if not near_dup_threshold > 0:
        raise ValueError(f"near_dup_threshold must be > 0 (> 1 disables it), got {near_dup_threshold}")
    if isinstance(backends, str) or isinstance(campaigns, str):
        raise ValueError("backends and campaigns take a list of names, not a single string")
    counts: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    trace_ids: list[int] = []
    companies: list[str] = []
    with session_scope(engine) as session:
        candidates = list(_iter_candidates(
            session, agent=agent, backends=set(backends) if backends is not None else None,
            campaigns=set(campaigns) if campaigns is not None else None, valid_only=valid_only, counts=counts,
        ))
        reviews = latest_reviews(session, [_id(t) for t, _, _ in candidates])
        for trace, company, prospect in candidates:
            rev = reviews.get(_id(trace))
            status = rev.status.strip().lower() if rev is not None else None
            if status is not None and status not in REVIEW_STATUSES:
                logger.warning("review %s of trace %s has unknown status %r; treated as unreviewed",
                               rev.id if rev else None, trace.id, status)
                status = None
            if status == "rejected":
                counts["rejected"] += 1
                continue
            if review == "approved" and status not in ("approved", "edited"):
                counts["unreviewed"] += 1
                continue
            if review == "reviewed" and status is None:
                counts["unreviewed"] += 1
                continue
            target: str | None = None
            if status == "edited":
                if not (rev and rev.edited_output and rev.edited_output.strip()):
                    logger.warning("trace %s is reviewed 'edited' without edited_output; skipped", trace.id)
                    counts["unparseable"] += 1
                    continue
                target = rev.edited_output
            if agent == "researcher":
                try:
                    target = _researcher_target(trace, target, prospect, counts)
                except OutputParseError as exc:
                    logger.warning("trace %s skipped: the researcher answer is not ExtractionOutput JSON: %s",
                                   trace.id, exc)
                    counts["unparseable"] += 1
                    continue
            try:
                example = trace_to_openai_example(trace, output=target)
                example["messages"] = flatten_content(example["messages"])
                validate_example(example)
                task = trace_task(trace)
                if task is not None:
                    example["task"] = dump_task(task)
            except (ValueError, AttributeError, TypeError) as exc:  # DatasetFormatError is a ValueError
                logger.warning("trace %s skipped: %s", trace.id, exc)
                counts["unparseable"] += 1
                continue
            counts["edited" if status == "edited" else "approved" if status == "approved" else "unreviewed_kept"] += 1
            rows.append(example)
            trace_ids.append(_id(trace))
            companies.append(company)

    seen: set[str] = set()
    unique: list[int] = []
    for i, row in enumerate(rows):
        key = _exact_key(row)
        if key in seen:
            counts["exact_duplicates"] += 1
            continue
        seen.add(key)
        unique.append(i)
    near = near_duplicate_indices([rows[i] for i in unique], near_dup_threshold)
    kept = [i for i, dup in zip(unique, near, strict=True) if dup is None]
    counts["near_duplicates"] = len(unique) - len(kept)
    counts["kept"] = len(kept)

    eval_companies = _split_by_company([companies[i] for i in kept], eval_fraction, seed)
    train_idx = [i for i in kept if companies[i] not in eval_companies]
    eval_idx = [i for i in kept if companies[i] in eval_companies]
    train, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    train_companies = sorted({companies[i] for i in train_idx})
    counts.update({"train": len(train), "eval": len(eval_rows), "train_companies": len(train_companies),
                   "eval_companies": len(eval_companies)})
    for name in ("rejected", "unreviewed", "edited", "approved", "unparseable", "exact_duplicates",
                 "wrong_backend", "wrong_campaign", "run_not_done", "candidates", "filtered_targets",
                 "filtered_facts"):
        counts.setdefault(name, 0)
    manifest = DatasetManifest(
        agent=agent,
        filters={"backends": sorted(backends) if backends is not None else None,
                 "campaigns": sorted(campaigns) if campaigns is not None else None,
                 "review": review, "valid_only": valid_only, "eval_fraction": eval_fraction,
                 "near_dup_threshold": near_dup_threshold, "seed": seed},
        counts=dict(sorted(counts.items())),
        content_hash=content_hash(train, eval_rows),
        train_trace_ids=[trace_ids[i] for i in train_idx],
        eval_trace_ids=[trace_ids[i] for i in eval_idx],
        train_companies=train_companies,
        eval_companies=sorted(eval_companies),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    logger.info("%s dataset: %d candidates -> %d kept (%d train, %d eval); %d rejected, %d exact and %d near "
                "duplicates", agent, counts["candidates"], len(kept), len(train), len(eval_rows), counts["rejected"],
                counts["exact_duplicates"], counts["near_duplicates"])
    return SftDataset(train=train, eval=eval_rows, manifest=manifest)
