"""Wiring of the layers below for the CLI: which web to research on, the demo world's corpus, the
real-data jobs. No business logic lives here; each step calls the package that owns it."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from agents import HeuristicChatModel, ProspectInfo, research
from agents.schemas import Offer, Profile
from evals.campaigns import campaign_predictions
from evals.realdata import load_yc_companies, yc_gold, yc_prospects
from evals.scoring import ExtractionScores, score_profiles
from graphs.runner import CampaignReport, RunEvent, add_prospects, run_campaign
from outreach.settings import Settings
from tools import Corpus, CorpusWeb, DdgsSearch, Fetcher, FetchPolicy, LiveWeb, SnapshotStore, import_csv, import_html
from tools.types import Web

__all__ = [
    "YC_PROSE_COLUMNS",
    "YC_TEXT_COLUMNS",
    "PageResearch",
    "import_world_corpus",
    "open_web",
    "research_real_pages",
    "run_yc_campaign",
]

#: Columns of the YC directory rows rendered into each corpus document, like a directory page.
YC_TEXT_COLUMNS = ("short_description", "long_description", "tags", "location", "year_founded", "team_size")
#: Only the companies' own prose: the facts must then be found in free text, if they are there at all.
YC_PROSE_COLUMNS = ("short_description", "long_description")


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


def import_world_corpus(world_dir: Path, corpus_path: Path) -> int:
    """Import a generated demo world's ``sites/`` folder into the corpus; returns pages imported."""
    corpus = Corpus(corpus_path)
    try:
        return import_html(world_dir / "sites", corpus, root=world_dir / "sites")
    finally:
        corpus.close()


def _is_active_b2b(row: dict[str, str]) -> bool:
    try:
        tags = ast.literal_eval(row.get("tags") or "[]")
    except (ValueError, SyntaxError):
        tags = []
    return row.get("status") == "Active" and "b2b" in {str(t).lower() for t in tags}


def run_yc_campaign(
    engine: Engine, settings: Settings, csv_path: Path, *, campaign: str, offer: Offer, limit: int,
    text_columns: Sequence[str] = YC_TEXT_COLUMNS, on_event: Callable[[RunEvent], None] | None = None,
) -> tuple[CampaignReport, ExtractionScores, int]:
    """The real-data job: import the Active, b2b-tagged YC rows as a corpus (one directory-page
    document per company) and ``limit`` of them as prospects (first founder as the contact), run the
    campaign with the settings' backends, and score location, employee count and founded year
    against the rows' own fields. ``text_columns`` says which columns make each document's text
    (``YC_PROSE_COLUMNS`` leaves the directory fields out, so facts must come from the prose).

    Returns:
        ``(campaign report, extraction scores, documents imported)``.
    """
    imported = import_csv(
        csv_path, Corpus(settings.corpus_path), name_column="company_name", url_column="website",
        text_columns=text_columns, where=_is_active_b2b,
    ).imported
    companies = [c for c in load_yc_companies(csv_path) if c.website.strip() not in ("", "https://", "http://")][:limit]
    rows = [(i + 2, ProspectInfo(**p)) for i, p in enumerate(yc_prospects(companies))]
    add_prospects(engine, campaign, offer, rows, split="realdata")
    report = asyncio.run(run_campaign(
        engine, campaign, web=CorpusWeb(Corpus(settings.corpus_path)), researcher=settings.researcher,
        writer=settings.writer, concurrency=settings.concurrency, prices=settings.price_table(),
        max_pages=settings.max_pages, prospect_timeout_s=settings.prospect_timeout_s, on_event=on_event,
    ))
    gold = yc_gold(companies)
    predictions = campaign_predictions(engine, campaign)
    fields = ("location", "employee_count", "founded_year")
    scores = score_profiles({c: predictions.get(c, {}) for c in gold}, gold, fields, ignore_missing_gold=True)
    return report, scores, imported


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

