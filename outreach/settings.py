"""Settings: ``outreach.toml`` (or the file named by ``OUTREACH_CONFIG``), overridden by environment
variables ``OUTREACH_<NAME>`` (nested with ``__``, e.g. ``OUTREACH_FETCH__TIMEOUT_S=5``), overridden by
CLI flags. Loaded with pydantic-settings; every entry point calls ``load_settings``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from miniatures.pricing import DEFAULT_PRICES, Price

__all__ = ["FetchSettings", "PriceSetting", "Settings", "load_settings"]


class FetchSettings(BaseModel):
    """Live-web fetch policy (see ``tools.fetch.FetchPolicy``)."""

    timeout_s: float = Field(10.0, description="Per-request timeout, seconds.")
    max_bytes: int = Field(2_000_000, description="Largest page accepted, bytes.")
    max_redirects: int = Field(5, description="Redirects followed at most.")
    respect_robots: bool = Field(True, description="Obey robots.txt.")
    allow_private: bool = Field(False, description="Allow addresses that are not global (private, loopback, "
                                       "link-local, carrier-grade NAT, ...); for tests and intranets only.")


class PriceSetting(BaseModel):
    """US dollars per million tokens."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


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
    prices: dict[str, PriceSetting] = Field(default_factory=dict, description="Added to the default price table.")

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

    def price_table(self) -> dict[str, Price]:
        """The default price table with this file's ``[prices]`` entries on top."""
        table = dict(DEFAULT_PRICES)
        table.update({k: Price(v.input_per_mtok, v.output_per_mtok) for k, v in self.prices.items()})
        return table


def load_settings(**overrides: object) -> Settings:
    """Load settings from ``outreach.toml``/``OUTREACH_CONFIG`` and the environment; ``overrides``
    (CLI flags that were given) win. Raises ``pydantic.ValidationError`` naming a bad setting."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
