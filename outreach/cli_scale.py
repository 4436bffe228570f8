"""Wiring of ``outreach run --executor/--workers/--ray-address``: the worker job a campaign's settings make
(``graphs.executors.WorkerJob``) and the rate limits of the ``[rate_limits]`` settings."""

from __future__ import annotations

import functools
from typing import Any

from graphs.executors import WorkerJob
from graphs.ratelimit import RateLimit, parse_rate_limits
from outreach.pipeline import open_web
from outreach.settings import Settings

__all__ = ["campaign_job", "rate_limits"]


def rate_limits(settings: Settings) -> dict[str, RateLimit]:
    """``{backend spec: RateLimit}`` of the settings' ``[rate_limits."<spec>"]`` tables (requests per minute)."""
    return parse_rate_limits([(spec, c, r) for spec, (c, r) in settings.rate_limit_table().items()])


def campaign_job(settings: Settings, campaign: str, *, retry_failed: bool = False, retry_no_facts: bool = False,
                 limit: int | None = None, **run_options: Any) -> WorkerJob:
    """The job each worker of ``campaign`` runs, from the settings (store, web, backends, concurrency, limits).

    ``run_options`` go to ``graphs.runner.run_campaign`` as they are (e.g. ``arms``, ``lease_s``).
    """
    return WorkerJob(
        store_url=settings.store_url, campaign=campaign, make_web=functools.partial(open_web, settings),
        researcher=settings.researcher, writer=settings.writer, concurrency=settings.concurrency,
        prices=settings.price_table(), max_pages=settings.max_pages, prospect_timeout_s=settings.prospect_timeout_s,
        retry_failed=retry_failed, retry_no_facts=retry_no_facts, unpersonalised_emails=settings.unpersonalised_emails,
        limit=limit, rate_limits=rate_limits(settings), run_options=run_options)
