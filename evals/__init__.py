"""Layer 4: evaluation. The demo world (a seeded fictional market with websites and gold profiles),
field-level extraction scores, and loaders for the real company data in ``../shared/realdata``."""

from evals.abtest import (
    EVENT_TYPES,
    ABReport,
    Comparison,
    EventsImport,
    Rate,
    SampleSize,
    VariantCounts,
    ab_report,
    compare_rates,
    count_variants,
    import_events,
    load_events,
    read_events,
    sample_size,
    wilson_interval,
)
from evals.costs import DEFAULT_INSTANCE_PRICES, CostFigures, cost_figures, instance_price_for, percentile
from evals.judge import JudgeItem, LLMJudge, PairwiseResult, RubricJudge, combine_orders, judge_pairs
from evals.realdata import (
    YC_COLUMNS,
    YC_GOLD_FIELDS,
    YcCompany,
    load_yc_companies,
    website_host,
    yc_gold,
    yc_prospects,
)
from evals.rubric import RUBRIC_CHECKS, RubricResult, RubricSummary, score_email, summarize_rubric, unsupported_names
from evals.scoring import (
    STOP_WORDS,
    ExtractionScores,
    FieldScore,
    Mismatch,
    parse_int,
    profile_values,
    score_profiles,
    text_tokens,
    token_f1,
    value_matches,
)
from evals.world import (
    LAYOUTS,
    PAGE_KINDS,
    PROSPECT_COLUMNS,
    GoldCompany,
    WorldManifest,
    generate_world,
    gold_by_host,
    iter_site_pages,
    load_gold,
    load_world_prospects,
    page_url,
)

__all__ = [
    "LAYOUTS",
    "PAGE_KINDS",
    "PROSPECT_COLUMNS",
    "STOP_WORDS",
    "YC_COLUMNS",
    "YC_GOLD_FIELDS",
    "ExtractionScores",
    "FieldScore",
    "GoldCompany",
    "Mismatch",
    "WorldManifest",
    "YcCompany",
    "generate_world",
    "gold_by_host",
    "iter_site_pages",
    "load_gold",
    "load_world_prospects",
    "load_yc_companies",
    "page_url",
    "parse_int",
    "profile_values",
    "score_profiles",
    "text_tokens",
    "token_f1",
    "value_matches",
    "website_host",
    "yc_gold",
    "yc_prospects",
    "EVENT_TYPES",
    "ABReport",
    "Comparison",
    "EventsImport",
    "Rate",
    "SampleSize",
    "VariantCounts",
    "ab_report",
    "compare_rates",
    "count_variants",
    "import_events",
    "load_events",
    "read_events",
    "sample_size",
    "wilson_interval",
    "DEFAULT_INSTANCE_PRICES",
    "CostFigures",
    "cost_figures",
    "instance_price_for",
    "percentile",
    "JudgeItem",
    "LLMJudge",
    "PairwiseResult",
    "RubricJudge",
    "combine_orders",
    "judge_pairs",
    "RUBRIC_CHECKS",
    "RubricResult",
    "RubricSummary",
    "score_email",
    "summarize_rubric",
    "unsupported_names",
    "EvalConfig",
    "EvalResult",
    "EvalSet",
    "EvalSpecError",
    "load_eval_plan",
    "parse_config",
    "run_eval",
    "world_eval_set",
    "yc_eval_set",
    "write_report",
    "render_html",
    "render_plots",
]


#: Names of ``evals.runner`` and ``evals.report``, imported on first use: they pull in LangGraph (via
#: ``graphs.runner``) and matplotlib, which ``import evals`` should not pay for.
_LAZY = {
    "EvalConfig": "evals.runner", "EvalResult": "evals.runner", "EvalSet": "evals.runner",
    "EvalSpecError": "evals.runner", "load_eval_plan": "evals.runner", "parse_config": "evals.runner",
    "run_eval": "evals.runner", "world_eval_set": "evals.runner", "yc_eval_set": "evals.runner",
    "write_report": "evals.report", "render_html": "evals.report", "render_plots": "evals.report",
}


def __getattr__(name: str) -> object:
    """Import the evaluation runner's and report's names lazily (see ``_LAZY``)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evals' has no attribute {name!r}")
