"""Test helpers: a small demo world in a corpus, scripted chat models, ids of stored rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from evals.world import generate_world
from graphs.inputs import load_offer, read_prospects_csv
from tools import Corpus, import_html

GOOD_DRAFT = {
    "subject": "{{company}} and {{fact.location}}",
    "body": (
        "Hi {{first_name}},\n\nI saw that {{company}} is based in {{fact.location}} and wanted to share how "
        "{{product}} helps teams like yours spend less time on routine reconciliation work every single month. "
        "Customers of {{sender_company}} usually see results within weeks of starting, without changing the "
        "tools they already use every day.\n\n{cta}\n\nBest,\n{{sender_name}}\n\n{opt_out}"
    ),
}


def small_world(tmp_path: Path, n: int = 6, seed: int = 3):  # type: ignore[no-untyped-def]
    """Generate a tiny demo world, import it into a corpus; return (world_dir, corpus, offer, prospects)."""
    world = tmp_path / "world"
    generate_world(world, n_companies=n, seed=seed, heldout_fraction=0.0)
    corpus = Corpus(tmp_path / "corpus.sqlite")
    import_html(world / "sites", corpus, root=world / "sites")
    offer = load_offer(world / "offer.toml")
    prospects = read_prospects_csv(world / "prospects_train.csv").prospects
    return world, corpus, offer, prospects


def good_draft_json(offer) -> str:  # type: ignore[no-untyped-def]
    """A valid writer answer for ``offer`` (uses the location fact)."""
    body = GOOD_DRAFT["body"].replace("{cta}", offer.call_to_action).replace("{opt_out}", offer.opt_out_line)
    return json.dumps({"subject": GOOD_DRAFT["subject"], "body": body})


class StoredRow(Protocol):
    """A store row (``store.models``): its primary key is None until it is inserted."""

    id: int | None


def stored_id(row: StoredRow) -> int:
    """The primary key of a row read back from the store.

    Raises:
        AssertionError: the row was never inserted (its id is None).
    """
    assert row.id is not None, f"{type(row).__name__} row has no id: it was not read back from the store"
    return row.id


def scripted(*responses: str) -> FakeListChatModel:
    """A chat model that answers with ``responses`` in turn (and records nothing else)."""
    return FakeListChatModel(responses=list(responses))


class TrainerSpy:
    """Patches trl.SFTTrainer with a subclass that keeps the trainer and a copy of the weights before training."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.before: dict[str, Any] = {}

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import trl

        spy = self

        class SpySFTTrainer(trl.SFTTrainer):  # type: ignore[misc]
            def train(self, *args: Any, **kwargs: Any) -> Any:
                spy.trainer = self
                assert self.model is not None
                spy.before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                return super().train(*args, **kwargs)

        mp.setattr(trl, "SFTTrainer", SpySFTTrainer)
