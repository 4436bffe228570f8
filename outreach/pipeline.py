"""Wiring of the layers below for the CLI: which web to research on, the demo world's corpus, the
real-data jobs. No business logic lives here; each step calls the package that owns it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from agents import HeuristicChatModel, ProspectInfo, research
from agents.schemas import Profile
from outreach.settings import Settings
from tools import Corpus, CorpusWeb, DdgsSearch, Fetcher, FetchPolicy, LiveWeb, SnapshotStore, import_html
from tools.types import Web

__all__ = [
    "PageResearch",
    "import_world_corpus",
    "open_web",
    "research_real_pages",
]

def open_web(settings: Settings, engine: Engine) -> Web:
    """The web research runs on: the local corpus (offline default) or ddgs + httpx with snapshots.

    Raises:
        FileNotFoundError: ``web = "corpus"`` and the corpus file does not exist yet.
    """
    if settings.web == "corpus":
        if not Path(settings.corpus_path).is_file():
            raise FileNotFoundError(
                f"no corpus at {settings.corpus_path}: run `outreach world generate` or `outreach corpus import` "
                "first, or research the live web with --web ddgs"
            )
        return CorpusWeb(Corpus(settings.corpus_path))
    policy = FetchPolicy(**settings.fetch.model_dump())
    return LiveWeb(DdgsSearch(backends=tuple(settings.search_backends)), Fetcher(policy), SnapshotStore(engine))


def import_world_corpus(world_dir: Path, corpus_path: Path, *, workers: int | None = None) -> int:
    """Import a generated demo world's ``sites/`` folder into the corpus; returns pages imported.

    ``tools.import_html`` with ``workers`` extraction processes (default: one per CPU); the documents are the same,
    in the same order, at any count.

    Raises:
        ValueError: ``workers`` < 1.
    """
    import os

    sites = world_dir / "sites"
    corpus = Corpus(corpus_path)
    try:
        return import_html(sites, corpus, root=sites, workers=workers if workers is not None else os.cpu_count() or 1)
    finally:
        corpus.close()


@dataclass(frozen=True)
class PageResearch:
    """The profile the heuristic researcher found on one real page."""

    name: str
    url: str
    profile: Profile


def research_real_pages(pages_dir: Path, corpus_path: Path, names: Sequence[str] | None = None) -> list[PageResearch]:
    """Research each real page folder (``<name>/source.html``) with the heuristic researcher.

    Each page is imported into the corpus at ``https://<name>.realdata.test/`` and researched as a
    prospect whose company is the page's folder name.
    """
    corpus = Corpus(corpus_path)
    folders = sorted(p.parent for p in pages_dir.rglob("source.html") if not names or p.parent.name in names)
    model = HeuristicChatModel()

    async def one(folder: Path) -> PageResearch:
        url = f"https://{folder.name}.realdata.test/"
        import_html(folder / "source.html", corpus, url=url)
        prospect = ProspectInfo(first_name="Reader", email=f"reader@{folder.name}.realdata.test",
                                company=folder.name.replace("-", " "), website=url)
        result = await research(prospect, model=model, web=CorpusWeb(corpus), max_pages=1)
        return PageResearch(folder.name, url, result.profile)

    async def all_pages() -> list[PageResearch]:
        return [await one(f) for f in folders]

    return asyncio.run(all_pages())

