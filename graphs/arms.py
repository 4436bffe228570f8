"""A/B arms inside one campaign: which researcher and writer each prospect's run uses.

``outreach run PROSPECTS.csv --offer OFFER.toml --arm teacher=RESEARCHER,WRITER --arm mini=RESEARCHER,WRITER
[--split 50,50] [--seed N]`` runs an experiment: every prospect is assigned to one arm, and its run uses
that arm's backends.

Assignment is random, seeded and reproducible, and by **company**: a prospect's key is the registrable
domain of its company's website (Public Suffix List, ``agents.attribution.registrable_domain``; so
``www.acme.example`` and ``shop.acme.example`` are one company), else its company name without legal
suffix, case-folded (``agents.attribution.company_core_name``); ``SHA-256(seed, key)`` read as a number in
[0, 1) falls into one arm's share of the split. Colleagues are therefore never compared against each
other (one company's prospects share an arm), the same seed gives the same assignment on any machine
(no Python ``hash()``), and a prospect added later to a campaign lands where its company already is.

What is stored: the campaign's arms (names, redacted backend specs, weights, seed) in ``campaigns.arms``
and each run's arm in ``runs.arm``, written once when the run first starts and never changed after
(resume, ``--retry-failed`` and later runs keep it).

Specs are parsed (``miniatures.specs.parse_backend_spec``) when the arms are parsed, before the CLI adds
anything to the store, so an unknown or malformed backend is refused with the store unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import col, select

from agents.attribution import company_core_name, registrable_domain
from core.errors import UserError
from miniatures.redaction import redact
from miniatures.specs import BackendSpecError, parse_backend_spec
from store import session_scope
from store.models import Campaign, Prospect, Run

__all__ = [
    "Arm",
    "ArmPlan",
    "ArmsError",
    "check_campaign_arms",
    "company_key",
    "load_arms",
    "parse_arms",
    "record_arms",
    "run_backends",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_FORM = "NAME=RESEARCHER_SPEC,WRITER_SPEC, e.g. --arm teacher=openai:gpt-4.1-mini,heuristic"


class ArmsError(UserError, ValueError):
    """An ``--arm``/``--split``/``--seed`` value is malformed, or does not fit the campaign already stored."""


@dataclass(frozen=True)
class Arm:
    """One arm: its name, the backend specs of its researcher and writer, and its share weight (> 0)."""

    name: str
    researcher: str
    writer: str
    weight: float = 1.0


@dataclass(frozen=True)
class ArmPlan:
    """A campaign's arms in order (the first is the control of A/B reports) and the assignment seed."""

    arms: tuple[Arm, ...]
    seed: int = 0

    @property
    def names(self) -> list[str]:
        """Arm names in order."""
        return [a.name for a in self.arms]

    def arm(self, name: str) -> Arm:
        """The arm called ``name``.

        Raises:
            KeyError: no such arm.
        """
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm {name!r}; arms: {', '.join(self.names)}")

    def assign(self, key: str) -> Arm:
        """The arm of a company key (``company_key``): ``SHA-256("<seed>\\x1f<key>")``'s first 64 bits as a
        share of 2**64, placed on the cumulative split."""
        digest = hashlib.sha256(f"{self.seed}\x1f{key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        total = sum(a.weight for a in self.arms)
        cumulative = 0.0
        for a in self.arms:
            cumulative += a.weight / total
            if point < cumulative:
                return a
        return self.arms[-1]

    def stored(self) -> dict[str, Any]:
        """The form kept in ``campaigns.arms`` (specs redacted: a base URL's credentials never reach the store)."""
        return {"seed": self.seed, "arms": [{"name": a.name, "researcher": redact(a.researcher),
                                             "writer": redact(a.writer), "weight": a.weight} for a in self.arms]}

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> ArmPlan | None:
        """The plan of a ``campaigns.arms`` value, None for ``{}`` (a campaign without arms)."""
        if not data or not data.get("arms"):
            return None
        return cls(arms=tuple(Arm(name=str(a["name"]), researcher=str(a["researcher"]), writer=str(a["writer"]),
                                  weight=float(a.get("weight", 1.0))) for a in data["arms"]),
                   seed=int(data.get("seed", 0)))


def _split(split: str | None, n: int) -> list[float]:
    if split is None or not split.strip():
        return [1.0] * n
    parts = [p.strip() for p in split.split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ArmsError(f"--split {split!r}: give one number per arm separated by commas, e.g. 50,50") from None
    if len(weights) != n:
        raise ArmsError(f"--split {split!r} has {len(weights)} numbers for {n} arms; give one per --arm, in order")
    if any(not w > 0 or w == float("inf") for w in weights):
        raise ArmsError(f"--split {split!r}: every share must be a number > 0, e.g. 50,50 or 80,20")
    return weights


def parse_arms(values: Sequence[str], split: str | None = None, seed: int = 0) -> ArmPlan:
    """Parse ``--arm NAME=RESEARCHER,WRITER`` values with ``--split`` and ``--seed``, checking every backend spec.

    Args:
        values: two or more ``NAME=RESEARCHER_SPEC,WRITER_SPEC`` (names: letters, digits, ``_ . -``, at most
            40, unique); specs as ``miniatures.specs``.
        split: shares per arm in order, e.g. ``"50,50"`` or ``"80,20"`` (any positive numbers; they are
            normalised); None: equal shares.
        seed: assignment seed (same seed, same assignment).

    Returns:
        ``ArmPlan`` with the specs as given (credentials included, to build models; store ``plan.stored()``).

    Raises:
        ArmsError: fewer than two arms, a malformed value, a repeated name, a bad split, or a backend spec that is
            unknown or malformed (the message names the arm and the spec's accepted forms).
    """
    if len(values) < 2:
        raise ArmsError(f"an A/B campaign needs at least two --arm values ({_FORM}); got {len(values)}")
    raw_weights = _split(split, len(values))
    weights = [w / sum(raw_weights) for w in raw_weights]  # shares: 50,50 and 1,1 are one split
    arms: list[Arm] = []
    for value, weight in zip(values, weights, strict=True):
        name, eq, rest = value.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        if not eq or len(parts) != 2 or not all(parts):
            raise ArmsError(f"--arm {redact(value)!r}: use {_FORM}")
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise ArmsError(f"--arm {redact(value)!r}: the name {name!r} must be 1-40 letters, digits, '_', '.' or "
                            "'-', starting with a letter or digit")
        if name in {a.name for a in arms}:
            raise ArmsError(f"--arm {name}: two arms have that name; give each arm its own")
        for agent, spec in zip(("researcher", "writer"), parts, strict=True):
            try:
                parse_backend_spec(spec)
            except BackendSpecError as exc:
                raise ArmsError(f"--arm {name}: the {agent} backend is not valid: {exc}") from None
        arms.append(Arm(name=name, researcher=parts[0], writer=parts[1], weight=weight))
    return ArmPlan(arms=tuple(arms), seed=seed)


def company_key(company: str, website: str = "") -> str:
    """The key prospects of one company share: ``domain:<registrable domain>`` of ``website``, else
    ``name:<company name without legal suffix, case-folded, spaces collapsed>``."""
    if website.strip():
        domain = registrable_domain(website)
        if domain:
            return f"domain:{domain.lower()}"
    return "name:" + " ".join(company_core_name(company).casefold().split())


def check_campaign_arms(engine: Engine, campaign: str, plan: ArmPlan) -> None:
    """Refuse ``plan`` for a campaign already in the store that it does not fit; reading only.

    A new campaign fits any plan; a campaign with arms fits the same arms (names, redacted specs, shares and
    seed); a campaign that already has prospects but no arms fits none (its runs were not assigned).

    Raises:
        ArmsError: the plan does not fit (the message says what is stored and what to do).
    """
    with session_scope(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if record is None:
            return
        stored = ArmPlan.from_stored(record.arms or {})
        if stored is None:
            has_prospects = session.exec(select(Prospect.id).where(Prospect.campaign_id == record.id)).first()
            if has_prospects is not None:
                raise ArmsError(f"campaign {campaign!r} already has prospects run without arms; start the A/B test "
                                "as a new campaign (--campaign NAME)")
            return
    if stored.stored() != plan.stored():
        shown = ", ".join(f"{a.name}={redact(a.researcher)},{redact(a.writer)}" for a in stored.arms)
        weights = ",".join(f"{a.weight:g}" for a in stored.arms)
        raise ArmsError(f"campaign {campaign!r} was started with the arms {shown}, --split {weights} and --seed "
                        f"{stored.seed}; rerun it with the same values (or without --arm to use the stored arms), "
                        "or start a new campaign")


def record_arms(engine: Engine, campaign: str, plan: ArmPlan) -> None:
    """Store ``plan`` (redacted) on the campaign (created by ``graphs.runner.add_prospects``).

    Raises:
        KeyError: no campaign of that name.
    """
    with session_scope(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        if record is None:
            raise KeyError(f"no campaign named {campaign!r} in the store")
        record.arms = plan.stored()
    logger.info("campaign %s: arms %s (seed %d)", campaign, ", ".join(plan.names), plan.seed)


def load_arms(engine: Engine, campaign: str, given: ArmPlan | None = None) -> ArmPlan | None:
    """The arms a campaign's runs use: ``given`` (specs with their credentials, from the command line) when the
    caller has them, else the campaign's stored arms (redacted specs), else None (a campaign without arms)."""
    if given is not None:
        return given
    with session_scope(engine) as session:
        record = session.exec(select(Campaign).where(Campaign.name == campaign)).first()
        return ArmPlan.from_stored(record.arms or {}) if record is not None else None


def run_backends(engine: Engine, run_id: int, prospect: Prospect, plan: ArmPlan | None,
                 researcher: str, writer: str) -> tuple[str, str, str]:
    """The researcher and writer specs of one run, and its arm, recording the arm on the run the first time.

    A run that already has an arm keeps it (``UPDATE ... WHERE arm = ''``: an assignment never changes); a new
    one gets ``plan.assign(company_key(...))``. Without a plan the campaign's own backends are used.

    Args:
        engine: the store.
        run_id: the run.
        prospect: its prospect (company and website give the key).
        plan: the campaign's arms (``load_arms``), or None.
        researcher, writer: the campaign's backends, used when ``plan`` is None.

    Returns:
        ``(researcher spec, writer spec, arm name)``; the arm is ``""`` without a plan.

    Raises:
        ArmsError: the run's stored arm is not one of the plan's (the campaign's arms were edited by hand).
    """
    if plan is None:
        return researcher, writer, ""
    chosen = plan.assign(company_key(prospect.company, prospect.website)).name
    with session_scope(engine) as session:
        session.exec(update(Run).where(col(Run.id) == run_id, col(Run.arm) == "").values(arm=chosen))  # type: ignore[call-overload]
        arm_name = session.exec(select(Run.arm).where(Run.id == run_id)).one()
    try:
        arm = plan.arm(arm_name)
    except KeyError:
        raise ArmsError(f"run {run_id} belongs to arm {arm_name!r}, which the campaign's arms "
                        f"({', '.join(plan.names)}) do not have; rerun with the arms the campaign was started with"
                        ) from None
    return arm.researcher, arm.writer, arm.name
