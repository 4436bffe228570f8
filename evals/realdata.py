"""Loaders for the real company data in ``../shared/realdata`` (never copied into the repository).

``companies/yc_companies_even_ids.csv`` holds real Y Combinator companies (source: github.com/corralm/
yc-scraper, MIT; see ``../shared/realdata/README.md``). Columns: company_id, company_name,
short_description, long_description, batch, status, tags (a Python-list string), location, country,
year_founded (float), num_founders, founders_names (a Python-list string), team_size (float), website,
cb_url, linkedin_url. Quoted fields span several lines.

``load_yc_companies`` parses it into ``YcCompany`` rows, ``yc_prospects`` turns those into prospects
(the first founder as the contact) and ``yc_gold`` into gold for ``evals.scoring.score_profiles``
(location, employee_count, founded_year). ``measure_yc_companies`` is the measurement behind
``outreach realdata companies``: every Active row imported as one corpus (in a ``YC_RENDERINGS``
rendering), a campaign over the first rows as prospects, and ``yc_figures`` read back from the store:
per-field precision and recall, facts kept and dropped by reason, kept facts whose source is another
company's page, and valid emails that use such a fact.
"""

from __future__ import annotations

import ast
import csv
import logging
import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, computed_field

from evals.scoring import ExtractionScores

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from agents.schemas import Offer
    from graphs.models import ModelPool
    from graphs.runner import RunEvent
    from miniatures.pricing import Price
    from tools import Corpus, CsvImportReport

__all__ = [
    "YC_COLUMNS",
    "YC_EMPLOYEE_TOLERANCE",
    "YC_GOLD_FIELDS",
    "YC_PRECISION_TARGET",
    "YC_RENDERINGS",
    "ForeignFact",
    "YcCompany",
    "YcFigures",
    "import_yc_corpus",
    "load_yc_companies",
    "measure_yc_companies",
    "website_host",
    "yc_figures",
    "yc_gold",
    "yc_prospects",
]

logger = logging.getLogger(__name__)

#: Columns ``load_yc_companies`` needs in the CSV header.
YC_COLUMNS: tuple[str, ...] = (
    "company_id", "company_name", "short_description", "long_description", "batch", "status", "tags",
    "location", "country", "year_founded", "num_founders", "founders_names", "team_size", "website",
    "cb_url", "linkedin_url",
)

#: Profile fields that ``yc_gold`` fills. ``industry`` is not scored: the rows' tags are YC's own
#: vocabulary ("B2B", "Developer Tools", "Artificial Intelligence"), and no sound rule maps an industry
#: phrase read from text onto it ("AI" is not "Artificial Intelligence" by tokens; "B2B" is no industry).
YC_GOLD_FIELDS: tuple[str, ...] = ("location", "employee_count", "founded_year")

#: Columns rendered into each company's corpus document (``tools.import_csv``), per rendering:
#: ``directory`` like a directory page (descriptions plus labelled fields: the facts are there, labelled),
#: ``prose`` only the company's own descriptions (facts must be read from free text, if they are there).
YC_RENDERINGS: dict[str, tuple[str, ...]] = {
    "directory": ("short_description", "long_description", "tags", "location", "year_founded", "team_size"),
    "prose": ("short_description", "long_description"),
}

#: How far (a fraction of the row's team size) the row's ``team_size`` may lie outside the count a fact
#: states (``evals.scoring.value_matches``): the sizes are a May 2024 snapshot, the texts older or newer.
YC_EMPLOYEE_TOLERANCE = 0.25

#: Issue 11's target for the precision of kept facts on ``YC_GOLD_FIELDS`` (micro average).
YC_PRECISION_TARGET = 0.95


class YcCompany(BaseModel):
    """One row of the YC companies CSV, parsed.

    Numbers that the CSV writes as floats (``"2024.0"``) are integers here; missing numbers are None;
    ``tags`` and ``founders`` are lists parsed from their Python-list strings.
    """

    company_id: int
    name: str
    short_description: str = ""
    long_description: str = ""
    batch: str = ""
    status: str = ""
    tags: list[str] = Field(default_factory=list)
    location: str = ""
    country: str = ""
    year_founded: int | None = None
    num_founders: int | None = None
    founders: list[str] = Field(default_factory=list)
    team_size: int | None = None
    website: str = ""
    cb_url: str = ""
    linkedin_url: str = ""


def _parse_list(raw: str, *, column: str, where: str) -> list[str]:
    """Parse a Python-list string like ``"['b2b', 'fintech']"`` with ``ast.literal_eval`` (no code runs)."""
    raw = raw.strip()
    if not raw:
        return []
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"{where}: column {column!r} is not a Python list literal "
                         f"({raw[:60]!r}): {exc}") from exc
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: column {column!r} must be a list of strings, got {raw[:60]!r}")
    return [v.strip() for v in value if v.strip()]


def _parse_number(raw: str, *, column: str, where: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        number = float(raw)
    except ValueError as exc:
        raise ValueError(f"{where}: column {column!r} must be a number like '2019.0', got {raw!r}") from exc
    if number != number or not number.is_integer():  # NaN or a fraction
        raise ValueError(f"{where}: column {column!r} must be a whole number, got {raw!r}")
    return int(number)


def load_yc_companies(
    csv_path: Path,
    *,
    status: str | None = "Active",
    tag: str | None = "b2b",
    limit: int | None = None,
) -> list[YcCompany]:
    """Load YC companies from the CSV, filtered by status and tag.

    Args:
        csv_path: path of ``yc_companies_even_ids.csv`` (in ``../shared/realdata/companies/``).
        status: keep rows whose ``status`` equals this (case-insensitive); None keeps all.
        tag: keep rows whose ``tags`` contain this tag (case-insensitive); None keeps all.
        limit: keep at most this many rows (file order); None keeps all.

    Returns:
        YcCompany rows in file order (about 400 for the defaults).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: the header lacks a column of ``YC_COLUMNS``, ``limit`` is negative, or a row has a
            malformed list or number (the message names the line and company_id).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"YC companies CSV {path} not found; it lives in "
                                "../shared/realdata/companies/yc_companies_even_ids.csv")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 or None")
    want_status = status.casefold() if status else None
    want_tag = tag.casefold() if tag else None
    out: list[YcCompany] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in YC_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected the yc-scraper header "
                             f"{list(YC_COLUMNS)}")
        for row in reader:
            if limit is not None and len(out) >= limit:
                break
            where = f"{path.name} line {reader.line_num} (company_id {row.get('company_id')!r})"
            if want_status and (row["status"] or "").strip().casefold() != want_status:
                continue
            tags = _parse_list(row["tags"] or "", column="tags", where=where)
            if want_tag and want_tag not in (t.casefold() for t in tags):
                continue
            company_id = _parse_number(row["company_id"] or "", column="company_id", where=where)
            if company_id is None:
                raise ValueError(f"{where}: company_id is empty")
            out.append(YcCompany(
                company_id=company_id,
                name=(row["company_name"] or "").strip(),
                short_description=(row["short_description"] or "").strip(),
                long_description=(row["long_description"] or "").strip(),
                batch=(row["batch"] or "").strip(),
                status=(row["status"] or "").strip(),
                tags=tags,
                location=(row["location"] or "").strip(),
                country=(row["country"] or "").strip(),
                year_founded=_parse_number(row["year_founded"] or "", column="year_founded", where=where),
                num_founders=_parse_number(row["num_founders"] or "", column="num_founders", where=where),
                founders=_parse_list(row["founders_names"] or "", column="founders_names", where=where),
                team_size=_parse_number(row["team_size"] or "", column="team_size", where=where),
                website=(row["website"] or "").strip(),
                cb_url=(row["cb_url"] or "").strip(),
                linkedin_url=(row["linkedin_url"] or "").strip(),
            ))
    logger.info("loaded %d YC companies from %s (status=%s, tag=%s)", len(out), path, status, tag)
    return out


def website_host(website: str) -> str:
    """Host of a website URL without ``www.``, lower case (``"https://www.Yarn.so/x"`` -> ``"yarn.so"``).

    A URL without a scheme (``"yarn.so"``) is read as ``https://``. Returns ``""`` when there is no host.
    """
    website = website.strip()
    if not website:
        return ""
    if "://" not in website:
        website = f"https://{website}"
    host = (urlsplit(website).hostname or "").lower()
    return host.removeprefix("www.")


def _email_part(name: str) -> str:
    """ASCII letters, digits and hyphens of a name part, lower case (``"Müller"`` -> ``"muller"``)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9-]", "", ascii_name.lower()).strip("-")


def yc_prospects(companies: Sequence[YcCompany]) -> list[dict[str, str]]:
    """Make one prospect per company: the first founder, titled "Founder".

    The email is ``first.last@<website host without www>`` (ASCII-folded, lower case; several last-name
    words are joined without separator; ``first@host`` for a one-word name). These addresses are
    guesses for offline tests and evaluation, never for sending; middle initials are dropped. Companies
    without founders, a usable founder name or a website are skipped (logged at INFO).

    Args:
        companies: rows from ``load_yc_companies``.

    Returns:
        Dicts with the keys first_name, last_name, title, email, company, website (``ProspectInfo``
        fields), in input order.
    """
    return [prospect for company in companies if (prospect := _prospect(company)) is not None]


def _prospect(company: YcCompany) -> dict[str, str] | None:
    """The prospect of ``yc_prospects`` for one company, or None when it has none."""
    host = website_host(company.website)
    if not company.founders or not host:
        logger.info("YC company %r skipped: no founder name or website", company.name)
        return None
    first, _, rest = company.founders[0].strip().partition(" ")
    last = " ".join(w for w in rest.split() if len(w.rstrip(".")) > 1)  # drop middle initials ("D.")
    first_part, last_part = _email_part(first), "".join(_email_part(p) for p in last.split())
    if not first_part:
        logger.info("YC company %r skipped: founder name %r has no ASCII letters", company.name,
                    company.founders[0])
        return None
    local = f"{first_part}.{last_part}" if last_part else first_part
    return {
        "first_name": first,
        "last_name": last,
        "title": "Founder",
        "email": f"{local}@{host}",
        "company": company.name,
        "website": company.website,
    }


def yc_gold(companies: Sequence[YcCompany]) -> dict[str, dict[str, str]]:
    """Gold facts for ``evals.scoring.score_profiles``: location, employee_count, founded_year.

    ``location`` is the CSV's ``location`` column as written (``"San Francisco"``, ``"London, United
    Kingdom"``), ``employee_count`` the team size and ``founded_year`` the year, as digit strings; any of
    them is ``""`` when the CSV leaves it empty. Team sizes are a snapshot (May 2024): score them with an
    ``employee_tolerance``. When two rows share a name the first is kept (logged as a warning).

    Args:
        companies: rows from ``load_yc_companies``.

    Returns:
        ``{company name: {field: value}}`` with the keys of ``YC_GOLD_FIELDS``.
    """
    gold: dict[str, dict[str, str]] = {}
    for company in companies:
        if company.name in gold:
            logger.warning("YC company name %r appears twice; keeping the first row", company.name)
            continue
        gold[company.name] = _gold_fields(company)
    return gold


def _gold_fields(company: YcCompany) -> dict[str, str]:
    return {
        "location": company.location,
        "employee_count": "" if company.team_size is None else str(company.team_size),
        "founded_year": "" if company.year_founded is None else str(company.year_founded),
    }


def _is_active(row: Mapping[str, str]) -> bool:
    return (row.get("status") or "").strip().casefold() == "active"


def import_yc_corpus(csv_path: Path, corpus: Corpus, rendering: str) -> CsvImportReport:
    """Import every Active row of the YC CSV into ``corpus`` as one document per company.

    The shared store a team builds with ``outreach corpus import`` from a directory CSV: each document
    sits at the company's website (``tools.import_csv``; the row's name is its title) and its text holds
    the columns of ``YC_RENDERINGS[rendering]``, one ``"<Label>: <value>"`` line each.

    Args:
        csv_path: the YC companies CSV.
        corpus: where the documents go.
        rendering: a key of ``YC_RENDERINGS`` (``"directory"`` or ``"prose"``).

    Returns:
        The import report (``imported`` documents; rows without a website in ``skipped``).

    Raises:
        ValueError: ``rendering`` is not a key of ``YC_RENDERINGS``.
        FileNotFoundError: ``csv_path`` does not exist.
    """
    from tools import import_csv

    if rendering not in YC_RENDERINGS:
        raise ValueError(f"rendering {rendering!r} is not one of {sorted(YC_RENDERINGS)}")
    return import_csv(csv_path, corpus, name_column="company_name", url_column="website",
                      text_columns=YC_RENDERINGS[rendering], where=_is_active)


class ForeignFact(BaseModel):
    """A kept fact whose source is not on the prospect's own registrable domain (another company's page)."""

    company: str
    field: str
    value: str
    evidence: str
    source_url: str
    in_valid_email: bool = Field(description="a valid email of the prospect has a {{fact.<field>}} tag for it")


class YcFigures(BaseModel):
    """What ``outreach realdata companies`` measures for one rendering (``yc_figures``).

    Attributes:
        rendering: the key of ``YC_RENDERINGS`` the corpus was built with ('' when unknown).
        corpus_documents: documents in the corpus (one per Active row with a website).
        prospects, done, no_facts, failed: the campaign's prospects and its runs by status.
        employee_tolerance: the ``employee_count`` tolerance ``scores`` were computed with.
        scores: precision and recall of the first kept fact per field against the rows' own fields
            (``YC_GOLD_FIELDS``; a (company, field) whose row is empty is not scored).
        facts_kept: facts the profiles kept, all fields.
        dropped_facts, drop_reasons: facts grounding dropped, in all and by reason
            (``agents.schemas.DROP_REASONS``: ``misattributed`` = source not about the prospect).
        foreign_facts: kept facts whose ``source_url`` is not the prospect's own site
            (``agents.attribution.CompanyMatcher.is_own``); ``foreign_examples`` lists up to 20.
        valid_emails: emails that passed validation.
        emails_using_foreign_facts: valid emails whose subject or body template has a
            ``{{fact.<field>}}`` tag for a foreign fact (target 0).
        elapsed_s: wall time of the whole measurement (import, campaign, scoring), seconds.
    """

    rendering: str = ""
    corpus_documents: int = 0
    prospects: int
    done: int
    no_facts: int
    failed: int
    employee_tolerance: float
    scores: ExtractionScores
    facts_kept: int
    dropped_facts: int
    drop_reasons: dict[str, int]
    foreign_facts: int
    valid_emails: int
    emails_using_foreign_facts: int
    foreign_examples: list[ForeignFact] = Field(default_factory=list)
    elapsed_s: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def targets_met(self) -> dict[str, bool | None]:
        """Issue 11's targets: no valid email uses another company's fact; micro precision of the kept
        facts on the scored fields >= ``YC_PRECISION_TARGET`` (None when no fact was scored)."""
        micro = self.scores.micro
        return {"no_email_uses_foreign_fact": self.emails_using_foreign_facts == 0,
                "precision": micro.precision >= YC_PRECISION_TARGET if micro.n_pred else None}


def yc_figures(engine: Engine, campaign: str, companies: Sequence[YcCompany], *,
               employee_tolerance: float = YC_EMPLOYEE_TOLERANCE) -> YcFigures:
    """Read a finished YC campaign back from the store and measure it (fields: ``YcFigures``).

    Args:
        engine: the store the campaign ran on.
        campaign: the campaign name.
        companies: the rows its prospects came from (the gold, as ``yc_gold``), matched to the prospects by
            the e-mail address ``yc_prospects`` gives them, not by name: several YC companies share a name
            ("Atlas", "Index"). Scores name each company ``"<name> <email>"``.
        employee_tolerance: passed to ``evals.scoring.score_profiles``.

    Returns:
        YcFigures with ``rendering``, ``corpus_documents`` and ``elapsed_s`` left at their defaults.

    Raises:
        KeyError: no campaign of that name in the store.
    """
    from agents.attribution import CompanyMatcher
    from agents.writer import used_merge_tags
    from evals.campaigns import collect_rows, sum_drop_reasons
    from evals.scoring import profile_values, score_profiles
    from store.models import RunStatus

    rows, _ = collect_rows(engine, campaign)
    if not rows:
        raise KeyError(f"no campaign named {campaign!r} with prospects in the store")
    statuses = [row.run.status if row.run is not None else RunStatus.PENDING for row in rows.values()]
    profiles = [row.profile for row in rows.values() if row.profile is not None]
    foreign: list[ForeignFact] = []
    valid_emails = emails_using_foreign = 0
    for row in rows.values():
        email = row.email if row.email is not None and row.email.valid else None
        valid_emails += email is not None
        tags = set(used_merge_tags(f"{email.subject_template}\n{email.body_template}")) if email else set()
        if row.profile is None:
            continue
        matcher = CompanyMatcher(row.prospect.company, row.prospect.website)
        mine = [ForeignFact(company=row.prospect.company, field=f.field, value=f.value, evidence=f.evidence,
                            source_url=f.source_url, in_valid_email=f"fact.{f.field}" in tags)
                for f in row.profile.facts if not matcher.is_own(f.source_url)]
        foreign += mine
        emails_using_foreign += any(f.in_valid_email for f in mine)
    gold: dict[str, dict[str, str]] = {}
    for company in companies:
        if (prospect := _prospect(company)) is not None:  # the first row wins, as in ``add_prospects``
            gold.setdefault(f"{company.name} <{prospect['email']}>", _gold_fields(company))
    predictions = {f"{row.prospect.company} <{email}>": profile_values(row.profile, YC_GOLD_FIELDS)
                   for email, row in rows.items() if row.profile is not None}
    scores = score_profiles(predictions, gold, YC_GOLD_FIELDS, employee_tolerance=employee_tolerance,
                            ignore_missing_gold=True)
    return YcFigures(
        prospects=len(rows),
        done=statuses.count(RunStatus.DONE),
        no_facts=statuses.count(RunStatus.NO_FACTS),
        failed=statuses.count(RunStatus.FAILED),
        employee_tolerance=employee_tolerance,
        scores=scores,
        facts_kept=sum(len(p.facts) for p in profiles),
        dropped_facts=sum(p.dropped_facts for p in profiles),
        drop_reasons=sum_drop_reasons(p.drop_reasons for p in profiles),
        foreign_facts=len(foreign),
        valid_emails=valid_emails,
        emails_using_foreign_facts=emails_using_foreign,
        foreign_examples=sorted(foreign, key=lambda f: not f.in_valid_email)[:20],
    )


async def measure_yc_companies(
    csv_path: Path,
    *,
    engine: Engine,
    corpus: Corpus,
    rendering: str,
    offer: Offer,
    campaign: str,
    limit: int | None = None,
    researcher: str = "heuristic",
    writer: str = "heuristic",
    concurrency: int = 4,
    max_pages: int = 5,
    prospect_timeout_s: float = 120.0,
    prices: Mapping[str, Price] | None = None,
    unpersonalised_emails: bool = False,
    employee_tolerance: float = YC_EMPLOYEE_TOLERANCE,
    on_event: Callable[[RunEvent], None] | None = None,
    models: ModelPool | None = None,
) -> YcFigures:
    """Measure research and writing on the real YC companies (``outreach realdata companies``).

    Steps: import every Active row into the empty ``corpus`` (``import_yc_corpus``), add the first
    ``limit`` Active companies with a prospect (``yc_prospects``) to a new ``campaign`` in ``engine``, run
    it on that corpus (``graphs.runner.run_campaign``) and measure it (``yc_figures``).

    Args:
        csv_path: the YC companies CSV.
        engine: the store (the campaign must not be in it yet: a resumed campaign would keep old runs).
        corpus: an empty corpus (so that it holds exactly the Active rows).
        rendering: a key of ``YC_RENDERINGS``.
        offer: the campaign's offer.
        campaign: name of the new campaign.
        limit: prospects to run (the first ones in file order), None for all (about 1,650).
        researcher, writer: backend specs.
        concurrency, max_pages, prospect_timeout_s, prices, unpersonalised_emails: as
            ``graphs.runner.run_campaign`` (``prices`` None: its default table).
        employee_tolerance: as ``yc_figures``.
        on_event: progress callback of ``run_campaign``.
        models: built models to reuse, e.g. a ``graphs.models.ModelPool`` on the store that registers the
            ``miniature:`` backends (``engine`` holds only this measurement); None: one on ``engine``.

    Returns:
        YcFigures of the campaign, with the rendering, corpus size and wall time.

    Raises:
        ValueError: unknown ``rendering``, ``limit`` < 0, a non-empty ``corpus`` or an existing
            ``campaign`` (the message says what to do).
        FileNotFoundError: ``csv_path`` does not exist.
    """
    from agents.schemas import ProspectInfo
    from graphs.runner import add_prospects, run_campaign
    from miniatures.pricing import DEFAULT_PRICES
    from tools import CorpusWeb

    started = time.perf_counter()
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 or None (all prospects)")
    if len(corpus):
        raise ValueError(f"the corpus {corpus.path} already holds {len(corpus)} documents; measure on an empty "
                         "corpus so that it holds exactly the Active YC rows")
    if campaign in _campaign_names(engine):
        raise ValueError(f"campaign {campaign!r} is already in the store; use a new store or campaign name "
                         "(a resumed campaign would keep the runs of an earlier measurement)")
    imported = import_yc_corpus(csv_path, corpus, rendering).imported
    pairs = [(c, p) for c in load_yc_companies(csv_path, tag=None) if (p := _prospect(c)) is not None]
    pairs = pairs[:limit] if limit is not None else pairs
    add_prospects(engine, campaign, offer, [(i + 2, ProspectInfo(**p)) for i, (_, p) in enumerate(pairs)],
                  split="realdata")
    await run_campaign(engine, campaign, web=CorpusWeb(corpus), researcher=researcher, writer=writer,
                       concurrency=concurrency, max_pages=max_pages, prospect_timeout_s=prospect_timeout_s,
                       prices=DEFAULT_PRICES if prices is None else prices, models=models,
                       unpersonalised_emails=unpersonalised_emails, on_event=on_event)
    figures = yc_figures(engine, campaign, [c for c, _ in pairs], employee_tolerance=employee_tolerance)
    figures.rendering, figures.corpus_documents = rendering, imported
    figures.elapsed_s = time.perf_counter() - started
    logger.info("YC %s measurement: %d prospects in %.1f s", rendering, figures.prospects, figures.elapsed_s)
    return figures


def _campaign_names(engine: Engine) -> set[str]:
    from sqlmodel import Session, select

    from store.models import Campaign

    with Session(engine) as session:
        return set(session.exec(select(Campaign.name)).all())
