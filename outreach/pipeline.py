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
from tools.corpus_import import url_for_html_file
from tools.extract import decode_html, extract_document
from tools.types import Document, Web

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


#: Fewer pages than this are extracted in this process: starting workers would cost more than they save.
_POOL_MIN_PAGES = 200


def _extract_world_page(item: tuple[Path, str]) -> Document:
    """One world page read and extracted (``tools.extract``), in a worker process of ``import_world_corpus``."""
    path, url = item
    return extract_document(decode_html(path.read_bytes(), strict=True), url)


def import_world_corpus(world_dir: Path, corpus_path: Path, *, workers: int | None = None) -> int:
    """Import a generated demo world's ``sites/`` folder into the corpus; returns pages imported.

    The pages are those ``tools.import_html`` imports from the folder, stored in the same order with the same
    documents; the extraction (trafilatura, about 15 ms a page on one core, 3,255 pages in the 600-company world)
    runs in ``workers`` processes (default: one per CPU; 1, a single CPU or fewer than 200 pages: in this process,
    with ``import_html``).

    Raises:
        ValueError: ``workers`` < 1.
    """
    import os

    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = workers or os.cpu_count() or 1
    sites = world_dir / "sites"
    corpus = Corpus(corpus_path)
    try:
        files = sorted(p for p in sites.rglob("*") if p.is_file() and p.suffix.lower() in (".html", ".htm"))
        if workers == 1 or len(files) < _POOL_MIN_PAGES:
            return import_html(sites, corpus, root=sites)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        items = [(file, url_for_html_file(file, sites)) for file in files]
        imported, batch = 0, []
        # fork: the workers run extraction only (no torch thread pools to inherit), and a caller's script needs no
        # `if __name__ == "__main__"` guard as it would with spawn.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for doc in pool.map(_extract_world_page, items, chunksize=32):  # in order, as import_html stores them
                batch.append(doc)
                if len(batch) >= 500:
                    imported += corpus.add_many(batch)
                    batch = []
        return imported + corpus.add_many(batch)
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

