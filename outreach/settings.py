"""Settings: ``outreach.toml`` (or the file named by ``OUTREACH_CONFIG``), overridden by environment
variables ``OUTREACH_<NAME>`` (nested with ``__``, e.g. ``OUTREACH_FETCH__TIMEOUT_S=5``), overridden by
CLI flags. Loaded with pydantic-settings; every entry point calls ``load_settings``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from miniatures.pricing import DEFAULT_PRICES, Price

if TYPE_CHECKING:
    from evals.costs import CostBasis

__all__ = ["CostSettings", "FetchSettings", "MailSettings", "MailboxSetting", "PriceSetting", "RateLimitSetting",
           "Settings", "load_settings"]


class FetchSettings(BaseModel):
    """Live-web fetch policy (see ``tools.fetch.FetchPolicy``)."""

    timeout_s: float = Field(10.0, description="Per-request timeout, seconds.")
    max_bytes: int = Field(2_000_000, description="Largest page accepted, bytes.")
    max_redirects: int = Field(5, description="Redirects followed at most.")
    respect_robots: bool = Field(True, description="Obey robots.txt.")
    allow_private: bool = Field(False, description="Allow addresses that are not global (private, loopback, "
                                       "link-local, carrier-grade NAT, ...); for tests and intranets only.")


class MailboxSetting(BaseModel):
    """Limits of one sending mailbox, over ``[mail]``'s defaults."""

    daily_cap: int | None = Field(None, ge=0, description="Messages in any 24 hours at most.")
    pace_s: float | None = Field(None, ge=0, description="Seconds between two messages.")


class MailSettings(BaseModel):
    """Sending over SMTP and reading mail back (``outreach send``, ``outreach events import-mail``); the user and
    passwords come from the environment: ``OUTREACH_MAIL__USERNAME``, ``OUTREACH_MAIL__PASSWORD``,
    ``OUTREACH_MAIL__IMAP_PASSWORD``."""

    host: str = Field("localhost", description="SMTP submission server.")
    port: int = Field(587, ge=1, le=65535, description="587 STARTTLS submission, 465 implicit TLS, 25 plain.")
    security: Literal["starttls", "tls", "none"] = Field("starttls", description="starttls, tls, or none "
                                                                                   "(plain text: loopback only).")
    username: str = Field("", description="SMTP AUTH user (empty: no login); $OUTREACH_MAIL__USERNAME.")
    password: SecretStr = Field(SecretStr(""), description="SMTP AUTH password; $OUTREACH_MAIL__PASSWORD.")
    timeout_s: float = Field(30.0, gt=0, description="Seconds each SMTP or IMAP operation may wait.")
    daily_cap: int = Field(50, ge=0, description="Messages per sending mailbox in any 24 hours.")
    pace_s: float = Field(30.0, ge=0, description="Seconds between two messages of one mailbox.")
    max_attempts: int = Field(5, ge=1, description="Attempts of one email (temporary refusals) before it fails.")
    retry_after_s: float = Field(300.0, ge=0, description="Seconds before a deferred email is tried again.")
    unsubscribe_mailto: str = Field("", description="Where List-Unsubscribe requests are mailed (default: the "
                                                    "sending mailbox).")
    unsubscribe_url: str = Field("", description="One-click unsubscribe URL ({message_id} is replaced); https "
                                                 "adds List-Unsubscribe-Post (RFC 8058).")
    imap_password: SecretStr = Field(SecretStr(""), description="IMAP password; $OUTREACH_MAIL__IMAP_PASSWORD.")
    mailboxes: dict[str, MailboxSetting] = Field(default_factory=dict,
                                                 description='Limits per mailbox ([mail.mailboxes."a@b.example"]).')


class PriceSetting(BaseModel):
    """US dollars per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


class CostSettings(BaseModel):
    """What the evaluation report prices configurations without a recorded token price at (``evals.costs``)."""

    stand_in_model: str = Field("gpt-4.1-mini", min_length=1, description=(
        "The API teacher the heuristic stands in for: its tokens are priced at this model's [prices] entry."))
    stand_in_price_source: str = Field("OpenAI API list price, openai.com/api/pricing, published 2025-04-14",
                                       description="Where and when that list price was published (shown).")
    instance: str = Field("AWS EC2 c7i.large (2 vCPU, 4 GiB), Linux on-demand, us-east-1", min_length=1,
                          description="The machine local miniatures run on (shown).")
    instance_usd_per_hour: float = Field(0.08925, ge=0, description="Its price, US dollars per hour.")
    instance_price_source: str = Field("aws.amazon.com/ec2/pricing/on-demand, 2025 list price",
                                       description="Where and when that price was listed (shown).")


class RateLimitSetting(BaseModel):
    """Limits of one backend (an API teacher), honoured by every worker and process sharing the store."""

    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once at most.")
    requests_per_minute: int | None = Field(None, ge=1, description="Requests started per minute at most.")


class Settings(BaseSettings):
    """Every setting with its default; see README "Settings"."""

    model_config = SettingsConfigDict(env_prefix="OUTREACH_", env_nested_delimiter="__", extra="ignore")

    store_url: str = Field("sqlite:///outreach.sqlite", description="SQLAlchemy URL of the store.")
    corpus_path: Path = Field(Path("corpus.sqlite"), description="SQLite FTS5 file of the local web corpus.")
    web: Literal["corpus", "ddgs"] = Field("corpus", description="Research web: local corpus or live ddgs+httpx.")
    researcher: str = Field("heuristic", description="Backend spec of the researcher.")
    writer: str = Field("heuristic", description="Backend spec of the writer.")
    concurrency: int = Field(4, ge=1, description="Prospects researched and written at once.")
    max_pages: int = Field(5, ge=1, description="Pages the researcher fetches per prospect.")
    prospect_timeout_s: float = Field(120.0, gt=0, description="A run taking longer is marked failed.")
    unpersonalised_emails: bool = Field(
        False, description="When research finds no verified fact, still write an email without company facts "
                           "(exported as not personalised); off: the run ends no_facts with no email.")
    search_backends: list[str] = Field(
        default_factory=lambda: ["duckduckgo", "brave", "mojeek", "bing"],
        description="ddgs backends, tried in this order.",
    )
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    mail: MailSettings = Field(default_factory=MailSettings)
    prices: dict[str, PriceSetting] = Field(default_factory=dict, description="Added to the default price table.")
    costs: CostSettings = Field(default_factory=CostSettings)  # type: ignore[arg-type]
    rate_limits: dict[str, RateLimitSetting] = Field(
        default_factory=dict, description='Request limits by backend spec ([rate_limits."openai:gpt-4.1-mini"]), '
                                          "shared by every worker through the store.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("OUTREACH_CONFIG", "outreach.toml"))
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file)

    def cost_basis(self) -> CostBasis:
        """``[costs]`` as the ``evals.costs.CostBasis`` the evaluation report prices configurations at."""
        from evals.costs import CostBasis

        return CostBasis(**self.costs.model_dump())

    def price_table(self) -> dict[str, Price]:
        """The default price table with this file's ``[prices]`` entries on top."""
        table = dict(DEFAULT_PRICES)
        table.update({k: Price(v.input_per_mtok, v.output_per_mtok) for k, v in self.prices.items()})
        return table

    def rate_limit_table(self) -> dict[str, tuple[int | None, int | None]]:
        """``{backend spec: (max_concurrent, requests_per_minute)}`` of the ``[rate_limits]`` entries."""
        return {spec: (v.max_concurrent, v.requests_per_minute) for spec, v in self.rate_limits.items()}


def load_settings(**overrides: object) -> Settings:
    """Load settings from ``outreach.toml``/``OUTREACH_CONFIG`` and the environment; ``overrides``
    (CLI flags that were given) win. Raises ``pydantic.ValidationError`` naming a bad setting."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
