"""The evaluation report: an HTML page with plots and tables, a JSON file with every figure, PNG plots.

``write_report(result, out_dir)`` writes::

    out_dir/report.html        self-contained: plots embedded as PNG data URIs (jinja2, autoescaped)
    out_dir/report.json        EvalResult as JSON (every figure, failures and notes)
    out_dir/plots/<name>.png   the same plots as files

Plots (matplotlib, Agg backend, 110 dpi): ``quality_vs_cost`` (rubric all-pass rate and research F1
against cost per 1,000 emails: the model-size trade-off view of "How Small Can You Go?", arXiv
2606.08051), ``rubric`` (pass rate per check), ``research_fields`` (F1 per field), ``win_rate`` (win rate
against the reference with its Wilson interval) and ``latency`` (p50 and p95 per email). Plots that have
no data (e.g. win rate with one configuration) are left out.

The cost table prices every configuration (``evals.costs``): API models at their tokens' list prices, the
heuristic stand-in as the API teacher it stands in for (marked ``*``, with the model, its list price and its
source), local miniatures at a named instance's price per hour times their wall time; each priced part is
listed under the table.

The A/B section (``EvalResult.ab_tests``, ``evals.abtest.ab_section``) has, for each campaign of the store
run with arms: the arms (share, backends, valid emails, messages with events), per-arm rates with Wilson
intervals, each arm against the control (z-test, Fisher's exact test, lift with its Katz interval), and per
metric the sends a conclusive result needs (``sample_size`` at the control's rate, or the reference reply
rate before any reply, for a +20% lift) against what the smallest arm has. The JSON holds the same figures.

The research table gives facts kept and dropped, the drops split by reason (``ungrounded``,
``misattributed``: the source is not about the prospect's company, ``bad_value``); the overview counts
prospects whose research kept no verified fact (``no_facts``) apart from failed ones.

Page text is hostile input (configuration names, failure reasons, emails quote web pages), so the
template is rendered with autoescaping on.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.schemas import DROP_REASONS
from evals.runner import ConfigResult, EvalResult

__all__ = ["PLOT_TITLES", "ReportFiles", "render_html", "render_plots", "write_report"]

logger = logging.getLogger(__name__)

_TEMPLATES = Path(__file__).resolve().parent / "templates"

#: Plot name -> title, in page order.
PLOT_TITLES: dict[str, str] = {
    "quality_vs_cost": "Quality against cost per 1,000 emails and latency",
    "rubric": "Email rubric: pass rate per check",
    "research_fields": "Research: F1 per field against gold",
    "win_rate": "Pairwise win rate against the reference",
    "latency": "Latency per email",
}


@dataclass(frozen=True)
class ReportFiles:
    """Paths ``write_report`` wrote."""

    html: Path
    json: Path
    plots: dict[str, Path]


def _missing(value: float | None) -> bool:
    """None or NaN (an undefined statistic, e.g. a lift against a rate of 0): shown as ``-``."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _ok(result: EvalResult) -> list[ConfigResult]:
    return [c for c in result.configs if c.status == "ok"]


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def render_plots(result: EvalResult) -> dict[str, bytes]:
    """Draw the report's plots.

    Args:
        result: an evaluation result.

    Returns:
        ``{plot name: PNG bytes}`` in ``PLOT_TITLES`` order, only for plots with data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(result)
    plots: dict[str, bytes] = {}
    if not ok:
        return plots
    names = [c.name for c in ok]
    colors = plt.get_cmap("tab10")

    costed = [c for c in ok if c.cost and c.cost.cost_per_1k_emails_usd is not None and c.email]
    if costed:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        panels = (("cost per 1,000 emails (USD)", lambda c: c.cost.cost_per_1k_emails_usd),
                  ("latency per email, p50 (ms)", lambda c: c.cost.latency_p50_ms))
        for ax, (label, x_of) in zip(axes, panels, strict=True):
            xs = [float(x_of(c)) for c in costed]
            ax.scatter(xs, [c.email.all_pass_rate for c in costed if c.email], s=70, marker="o", color=colors(0),
                       label="email rubric: all checks pass")
            with_f1 = [(x, c) for x, c in zip(xs, costed, strict=True) if c.research and c.research.f1 is not None]
            if with_f1:
                ax.scatter([x for x, _ in with_f1], [c.research.f1 for _, c in with_f1 if c.research], s=70,
                           marker="s", color=colors(1), label="research micro F1")
            placed: list[tuple[float, float]] = []
            for x, c in zip(xs, costed, strict=True):
                y = (c.research.f1 if c.research and c.research.f1 is not None
                     else c.email.all_pass_rate if c.email else 0.0)
                near = sum(abs(x - px) <= (max(xs) - min(xs) or 1) * 0.08 and abs(y - py) < 0.05 for px, py in placed)
                placed.append((x, y))
                ax.annotate(c.name, (x, y), textcoords="offset points", xytext=(8, -4 - 11 * near), fontsize=9)
            lo, hi = min(xs), max(xs)
            pad = (hi - lo) * 0.2 if hi > lo else max(abs(hi), 1.0) * 0.5
            ax.set_xlim(lo - pad * (0.1 if lo >= 0 and hi == lo else 1), hi + pad * 1.5)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylim(-0.02, 1.05)
        axes[0].set_ylabel("quality (share, 0-1)")
        axes[0].legend(loc="lower left", fontsize=8)
        plots["quality_vs_cost"] = _png(fig)
        plt.close(fig)

    with_email = [c for c in ok if c.email]
    if with_email:
        checks = result.rubric_checks
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(checks) * max(1, len(with_email)) ** 0.5 + 1.5))
        height = 0.8 / len(with_email)
        for i, c in enumerate(with_email):
            assert c.email is not None
            ys = [k + i * height for k in range(len(checks))]
            ax.barh(ys, [c.email.pass_rates.get(ch, 0.0) for ch in checks], height=height, color=colors(i),
                    label=c.name)
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(checks))], checks)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("pass rate (share of prospects)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="x", alpha=0.3)
        plots["rubric"] = _png(fig)
        plt.close(fig)

    with_fields = [c for c in ok if c.research and c.research.per_field]
    if with_fields:
        fields = list(with_fields[0].research.per_field) if with_fields[0].research else []
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(with_fields)
        for i, c in enumerate(with_fields):
            assert c.research is not None
            xs = [k + i * width for k in range(len(fields))]
            ax.bar(xs, [c.research.per_field.get(f, {}).get("f1", 0.0) for f in fields], width=width,
                   color=colors(i), label=c.name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(fields))], fields, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("F1")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
        plots["research_fields"] = _png(fig)
        plt.close(fig)

    judged = [c for c in ok if c.pairwise and c.pairwise.n]
    if judged:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(judged) + 1.6))
        rates = [c.pairwise.win_rate for c in judged if c.pairwise]
        low = [c.pairwise.win_rate - c.pairwise.ci_low for c in judged if c.pairwise]
        high = [c.pairwise.ci_high - c.pairwise.win_rate for c in judged if c.pairwise]
        ax.barh(range(len(judged)), rates, xerr=[low, high], color=colors(2), capsize=4)
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(judged)), [c.name for c in judged])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"win rate vs {result.reference} (ties = 1/2), {result.confidence:.0%} Wilson interval")
        plots["win_rate"] = _png(fig)
        plt.close(fig)

    timed = [c for c in ok if c.cost]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        xs = list(range(len(timed)))
        ax.bar([x - 0.2 for x in xs], [c.cost.latency_p50_ms for c in timed if c.cost], width=0.4,
               color=colors(0), label="p50")
        ax.bar([x + 0.2 for x in xs], [c.cost.latency_p95_ms for c in timed if c.cost], width=0.4,
               color=colors(3), label="p95")
        ax.set_xticks(xs, [c.name for c in timed])
        ax.set_ylabel("ms per email")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        plots["latency"] = _png(fig)
        plt.close(fig)
    logger.debug("drew %d plots for %s (%s)", len(plots), result.run_name, names)
    return plots


def render_html(result: EvalResult, plots: dict[str, bytes] | None = None) -> str:
    """Render the HTML report (template ``evals/templates/report.html.j2``, autoescaped).

    Args:
        result: an evaluation result.
        plots: ``render_plots(result)`` (drawn when None); embedded as ``data:image/png;base64`` URIs.

    Returns:
        The page as a string.
    """
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    plots = render_plots(result) if plots is None else plots
    env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "-" if _missing(v) else f"{v:.1%}"
    env.filters["num"] = lambda v, d=3: "-" if _missing(v) else f"{v:.{d}f}"
    images = [{"name": n, "title": PLOT_TITLES.get(n, n),
               "src": "data:image/png;base64," + base64.b64encode(png).decode("ascii")} for n, png in plots.items()]
    return env.get_template("report.html.j2").render(r=result, ok=_ok(result), images=images,
                                                     failed=[c for c in result.configs if c.status == "failed"],
                                                     drop_reasons=DROP_REASONS)


def write_report(result: EvalResult, out_dir: Path) -> ReportFiles:
    """Write ``report.html``, ``report.json`` and ``plots/*.png`` into ``out_dir`` (created if missing).

    Raises:
        NotADirectoryError: ``out_dir`` is a file.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"report folder {out_dir} is a file; give a folder")
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    plots = render_plots(result)
    paths = {}
    for name, png in plots.items():
        paths[name] = out_dir / "plots" / f"{name}.png"
        paths[name].write_bytes(png)
    html = out_dir / "report.html"
    html.write_text(render_html(result, plots), encoding="utf-8")
    json_path = out_dir / "report.json"
    json_path.write_text(result.model_dump_json(indent=2), encoding="utf-8")
    logger.info("wrote the evaluation report to %s", out_dir)
    return ReportFiles(html=html, json=json_path, plots=paths)
