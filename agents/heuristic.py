"""``HeuristicChatModel``: the offline, deterministic teacher. It is NOT a language model.

It is a rule-based researcher and writer packaged as a langchain-core chat model, so the campaign
graph, tracing, curation and fine-tuning all run without network or weights (DESIGN.md, "Offline
defaults"). It reads the typed task an agent passes with the call (``core.tasks``; DESIGN.md, "Typed
tasks, one grammar"), never the prompt text; a call without one has its task read back from the
messages by ``agents.legacy_tasks``:

* ``ExtractionTask``: regex rules and lexicons over the numbered sentences pick one best
  sentence per profile field (own-site sources and explicit phrasings first) and answer
  ``{"facts": [{"field", "value", "evidence": "S<i>"}]}`` where ``value`` is an exact span of the
  sentence. A rule says only what its sentence says of the prospect: lexicons match whole words, an
  event's subject is "we" or the company's name, a head count is the company's staff and keeps its
  qualifier, "since 2015" is no founding year, and every value has the shape grounding demands
  (``agents.fact_shapes``). Instruction-like sentences are never used.
* ``WritingTask``: one of several subject and body templates, chosen by a stable SHA-256 hash of the
  task's rendered user message (built from the prospect, profile and offer), filled only with merge tags
  that the task lists, with exactly the offer's call to action and its opt-out line at the end. The
  task's feedback (failed checks, by code) is fixed where a rule can fix it.

Token counts in ``usage_metadata`` are estimates: ``ceil(characters / 4)``, the usual rule of thumb
for English text with BPE tokenizers; there is no tokenizer here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from agents.attribution import CompanyMatcher, company_core_name
from agents.fact_shapes import MAX_PHRASE_WORDS, value_problem
from agents.grounding import host_of, is_instruction
from agents.legacy_tasks import task_from_messages
from agents.prompts import render_writer_user
from agents.prose import GATED_FIELDS, grammatical_number, lower_first, prose_problem, relevant_problem
from agents.schemas import FACT_FIELDS
from core.tasks import ExtractionTask, FailedCheck, WritingTask, load_task

__all__ = ["HEURISTIC_MODEL_NAME", "HeuristicChatModel", "estimate_tokens"]

HEURISTIC_MODEL_NAME = "heuristic"


def estimate_tokens(text: str) -> int:
    """Estimate the token count of ``text`` as ``ceil(len(text) / 4)`` (an estimate, not a tokenizer)."""
    return math.ceil(len(text) / 4)


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

# A rule's pattern names the value ``v``; event and product rules also name the subject ``subj``, which
# must be the prospect ("we", "our team" or the company's name) for the rule to count.
_YEAR = r"(?P<v>19[5-9]\d|20[0-4]\d)(?!\d)"
_MONTH = (r"(?:(?:january|february|march|april|may|june|july|august|september|october|november|december|"
          r"jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)\.?,?\s+(?:of\s+)?)?")
_CAP = r"[A-Z][A-Za-z\u00c0-\u024f'\u2019.-]*"
_PLACE = rf"{_CAP}(?:\s+(?:(?:de|del|la|upon|am|sur)\s+)?{_CAP})*"
_LOC = rf"(?P<v>{_PLACE}(?:,\s*{_PLACE})?)"
_NUM = r"(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d{1,6})(?![\d,.]\d)"
_QUALIFIER = (r"(?:(?i:less than|fewer than|under|below|up to|at most|more than|over|above|at least|about|"
              r"around|approximately|nearly|almost|roughly|some|close to)\s+|~\s?)")
# A head count keeps its qualifier and range: "less than 10", "over 2,000", "10-50", "between 50 and 100".
_COUNT = (rf"(?P<v>{_QUALIFIER}?{_NUM}(?:\s?(?:-|\u2013|(?i:to))\s?{_NUM})?\+?"
          rf"|(?i:between)\s+{_NUM}\s+(?i:and)\s+{_NUM})")
_PNAME = r"(?P<v>[A-Z][A-Za-z0-9]+(?:[ -][A-Z][A-Za-z0-9]*){0,2})"
_SEG = r"(?P<v>[A-Za-z0-9][\w-]*(?:\s+[\w-]+){0,7})"
_PHRASE = r"(?P<v>[^.;:!?,()]{3,110}?)\s*(?:[.;:!?,()]|$)"
_REST = r"(?P<v>.{3,}?)\s*[.!]?\s*$"
_LABEL_VALUE = r"\s*\**\s*:\s*\**\s*(?P<v>[^|;*\n]{2,60}?)\s*\**\s*\|?\s*$"
_LEAD = r"^[\W_]*"
# Whom an event or launch is about: the prospect speaking ("we", "our team") or named (checked in _post).
_WE = r"(?P<subj>(?i:we|our team))"
_WE_AUX = r"(?:['\u2019]ve|\s+(?i:have|has|also|just|recently|now|finally|successfully|already))*"

_INDUSTRIES = (
    "logistics software", "fintech", "healthcare analytics", "cybersecurity", "HR software",
    "e-commerce tooling", "construction technology", "agritech", "legal tech", "edtech", "clean energy",
    "insurance software", "marketing analytics", "developer tools", "supply chain software",
    "property management software", "data analytics", "payments", "proptech", "insurtech", "healthtech",
    "health tech", "biotech", "martech", "adtech", "climate tech", "cleantech", "energy storage",
    "food delivery", "travel software", "real estate", "manufacturing software", "retail analytics",
    "customer support software", "sales software", "accounting software", "procurement software",
    "fleet management software", "restaurant software", "education technology", "financial services",
    "telehealth", "medical devices", "cloud infrastructure", "observability", "devops", "robotics",
    "e-commerce", "ecommerce", "logistics", "construction software", "legal software", "HR tech",
    "hospitality software", "recruiting software", "field service software", "compliance software",
    "security software", "analytics software", "marketing software", "project management software",
    "IoT", "SaaS", "artificial intelligence", "machine learning", "blockchain", "crypto",
)
# Every lexicon entry is matched as whole words: no letter, digit or hyphen on either side, so "iot" is
# not read in "Patriot" nor "edtech" in "medtech".
_INDUSTRY = "(?<![\\w-])(?P<v>" + "|".join(
    re.escape(i) for i in sorted(_INDUSTRIES, key=len, reverse=True)
) + r")(?![\w-])"
# A lexicon word mentioned in passing ("time and logistics for such a sale") is not the company's
# industry; it counts when it names a kind of business: followed by one of these nouns, after "for",
# or when it is itself such a noun phrase (see _SELF_HEADED).
_ORG_NOUNS = (r"company|companies|startup|startups|platform|platforms|app|apps|software|tools?|infrastructure|"
              r"api|apis|provider|providers|solutions?|marketplace|network|services?|business|businesses|"
              r"industry|space|sector|market|firm|firms|brands?|products?|operators?|enablement|vendor|"
              r"specialist")
_SELF_HEADED = re.compile(r"(?:software|technology|tech|tooling|analytics|services|devices|infrastructure|"
                          r"storage|delivery)$", re.IGNORECASE)
_GENERIC_TAGS = {"b2b", "b2c", "saas", "startup", "startups", "ai", "enterprise", "smb", "yc", "remote"}
_ADJECTIVES = {"leading", "growing", "fast-growing", "young", "small", "global", "new", "private",
               "family-owned", "venture-backed", "independent", "the", "our", "your", "this", "that", "big",
               "full", "fully", "remote", "distributed", "focused", "first", "modern", "large", "great",
               "very", "well-funded", "profitable", "bootstrapped", "mission-driven", "technology", "tech",
               "public", "publicly", "holding", "parent", "subsidiary", "real", "good", "better", "different"}
# Words that make "is a ... company" a description rather than a market ("a diverse and inclusive company").
_DESCRIPTIVE = {"diverse", "inclusive", "innovative", "successful", "unique", "fast", "early-stage", "stealth",
                "remote-first", "seed-stage", "funded", "backed", "based", "and", "or", "of", "y", "yc",
                "combinator", "two-sided", "one-stop", "next-generation", "next-gen", "dedicated", "fast-paced",
                "fast-moving", "award-winning", "world-class", "cutting-edge", "leading-edge"}
# Words that head a page section rather than name a market ("#### Solutions", "Our Platform").
_HEADING_WORDS = {"solutions", "solution", "platform", "our", "products", "product", "services", "service",
                  "overview", "about", "us", "home", "news", "blog", "resources", "contact", "careers",
                  "features", "pricing", "customers", "industries", "industry", "company", "team", "partners",
                  "technology", "integrations", "use", "cases", "case", "studies", "why", "who", "we", "are",
                  "what", "do", "how", "it", "works", "markets", "market", "sectors", "sector", "more",
                  "learn", "menu", "docs", "support", "developers", "enterprise", "community", "events"}
_SEG_REJECT = {"its", "their", "those", "these", "them", "it", "his", "her", "our", "your", "my", "any",
               "some", "more", "most", "us", "you", "me", "this", "that", "the", "a", "an", "one", "only",
               "both", "thus", "then", "also", "just", "not", "what", "which", "who", "whom", "everyone",
               "everybody", "anyone", "anybody", "all", "each", "every"}
_SEG_STOP = {"that", "who", "which", "across", "in", "with", "to", "since", "on", "around", "throughout",
             "worldwide", "from", "like", "such", "at", "by", "for", "through", "while", "so", "because",
             "using", "and", "every", "each", "as", "into", "than", "globally", "nationwide", "today"}
# A segment is a group of customers: a plural ("regional banks") or one of these collective nouns.
_SEG_COLLECTIVE = {"people", "children", "women", "men", "staff", "personnel", "workforce", "enterprise"}
_SEG_NOT_PEOPLE = {"analytics", "logistics", "operations", "sales", "payments", "economics", "workflows",
                   "tasks", "processes", "jobs", "purposes", "needs", "use-cases", "basics", "us", "this",
                   "phones", "devices", "desktops", "tablets", "computers", "screens", "browsers", "apis",
                   "its", "his", "yes", "less", "plus", "ecommerce", "news", "series", "access", "success"}
_PRODUCT_STOP = {"the", "we", "our", "it", "this", "today", "meet", "a", "an", "that", "they", "you", "news"}
# What "X is our ..." must go on to call X for X to be a product ("Water is our mission" is not).
_PRODUCT_NOUNS = (r"product|platform|app|application|tool|toolkit|solution|software|service|assistant|engine|"
                  r"api|suite|system|offering|copilot|agent|marketplace|device|sdk|library|framework|"
                  r"dashboard|module|bot|chatbot|model|database|extension|plugin")
_EVENT_VERBS = (r"raised|opened|launched|hired|expanded|acquired|closed|secured|signed|partnered|won|"
                r"released|introduced|completed|appointed|moved|reached|added|named")
_WE_EVENT_VERBS = r"raised|opened|launched|hired|expanded|acquired|closed|secured|signed|partnered|released"

# Sentences about another, earlier company of the founders ("his last startup grew to 500 employees").
_ELSEWHERE = re.compile(
    r"\b(?:previous(?:ly)?|prior (?:company|startup|venture|exit)|former (?:company|startup|employer)|"
    r"(?:his|her|their|my|our) (?:last|first|previous|prior|former|second) (?:company|startup|venture|business)|"
    r"last (?:company|startup|venture))\b", re.IGNORECASE)
# Head counts of someone else: customers' sizes ("SMBs with at least 10 employees", "teams (1-200 employees)").
_OTHER_ORGS = re.compile(
    r"\b(?:companies|businesses|smbs|smes|startups|teams|firms|organi[sz]ations|employers|customers|clients|"
    r"enterprises|brands|merchants|retailers|agencies|hospitals|clinics|schools|partners|users)\b",
    re.IGNORECASE)
# "N people" counts staff only in a sentence about the team, and never people who attend, use or join.
_TEAM_CUE = re.compile(
    r"\b(?:team|employ\w*|staff|headcount|workforce|colleagues|hire[sd]?|hiring|we(?:['\u2019]re| are| have| "
    r"now have| now employ| employ)|company of|people work)\b", re.IGNORECASE)
_NOT_STAFF = re.compile(
    r"\b(?:attend\w*|gather\w*|joined|join|users?|customers?|clients?|members|visitors?|developers|students?|"
    r"participants?|subscribers?|followers?|fans|readers?|audiences?|community|communities|events?|"
    r"conferences?|per|signed up|sign up|use|used|using|serve[sd]?|serving|reach\w*|feed|trust\w*|"
    r"patients?|learners?|citizens?|countries|people (?:who|that|in|across|around|from|with|like)|"
    r"representing|registered|downloads?|installs?)\b", re.IGNORECASE)
_STAFF_NOUN_BEFORE = re.compile(r"(?:\bteam of|\bemploys|\bemploy)\s*$", re.IGNORECASE)
# Second parts of "Based in San Francisco, Newfront is ...": the subject that follows, not a region.
_REGIONS = {"africa", "europe", "asia", "latam", "emea", "apac", "mena", "latin america", "north america",
            "south america", "middle east", "southeast asia", "the world", "worldwide", "online", "remote"}
_FIRST_PERSON = re.compile(r"\b(?:[Ww]e|[Oo]urs?|us|[Mm]y|me)\b")
# Where an event value ends: the first clause boundary ("raised $5M, led by ..." -> "raised $5M"); a comma
# inside a number ("7,000") or before a year ("June, 2007") is not one.
_CLAUSE_END = re.compile(
    r"\s*(?:,(?!\d{3}|\s\d{4}\b)|[;:(\[]|\s[-\u2013\u2014]\s|\s(?:which|where|while|after|before)\s)")
_DANGLING = re.compile(r"\s(?:at|in|on|to|by|for|from|of|with|and|or|the|a|an)$")
# A place's second part followed by one of these is the sentence's subject ("Based in Miami, Papa is ...").
_SUBJECT_VERBS = {"is", "was", "has", "had", "are", "were", "have", "works", "operates", "offers", "provides",
                  "builds", "helps", "customers", "became", "makes", "partners", "uses", "serves", "creates",
                  "develops", "sells", "runs", "delivers", "enables", "empowers", "team", "through"}


@dataclass(frozen=True)
class _Rule:
    field: str
    priority: int
    pattern: re.Pattern[str]
    keywords: tuple[str, ...]
    mention: bool = False  # a lexicon word anywhere: needs an org noun after it (see _ORG_NOUNS)


def _rules() -> list[_Rule]:
    def r(fld: str, prio: int, pattern: str, *keywords: str, flags: int = 0, mention: bool = False) -> _Rule:
        return _Rule(fld, prio, re.compile(pattern, flags), keywords, mention)

    i = re.IGNORECASE
    return [
        # founded_year ("since 2015" alone says nothing about founding: data, a product, a customer)
        r("founded_year", 10, rf"\bfounded in {_MONTH}{_YEAR}", "founded", flags=i),
        r("founded_year", 10, rf"\bestablished in {_MONTH}{_YEAR}", "established", flags=i),
        r("founded_year", 11, rf"\b(?:year )?founded\s*\**\s*:?\s*\**\s*{_YEAR}", "founded", flags=i),
        r("founded_year", 9, rf"foundingDate\s*:\s*{_YEAR}", "foundingdate", flags=i),
        r("founded_year", 8, rf"\b(?:we|they|founders?)\s+(?:first\s+)?started\s+(?:(?:the|this|our)\s+"
          rf"(?:company|business|startup)\s+)?in {_MONTH}{_YEAR}", "started", flags=i),
        r("founded_year", 6, rf"\b(?:in business|operating|trading)\s+since {_YEAR}", "since", flags=i),
        # location
        r("location", 10, rf"(?i:headquartered in|headquarters (?:are|is) (?:located )?in)\s+{_LOC}",
          "headquarter"),
        r("location", 11, rf"\bHQ\s*\**\s*:\s*\**\s*{_LOC}", "hq"),
        r("location", 9, rf"(?i:\bbased in)\s+{_LOC}", "based in"),
        r("location", 9, rf"(?i:visit us at)\s+[^,]{{1,60}},\s*{_LOC}", "visit us"),
        r("location", 11, rf"{_LEAD}(?:location|headquarters|hq|city){_LABEL_VALUE}", "location",
          "headquarters", "hq", "city", flags=i),
        # An office the company opens is news, not where it is based ("opened an office in Boston").
        r("location", 7, rf"(?i:(?<!opened an )(?<!opened a new )(?<!opens an )(?<!opening an )(?<!opening a new )"
          rf"offices? in|located in)\s+{_LOC}", "office", "located"),
        r("location", 5, r"addressLocality\s*:\s*(?P<v>[^\n|;]{2,60}?)\s*$", "addresslocality"),
        r("location", 4, r"addressRegion\s*:\s*(?P<v>[^\n|;]{2,60}?)\s*$", "addressregion"),
        # employee_count (the value keeps its qualifier or range; whose head count it is: see _post)
        r("employee_count", 10, rf"(?i:\bteam of)\s+{_COUNT}\s+(?i:people|employees|staff|engineers|"
          r"professionals|experts|members)\b", "team of"),
        r("employee_count", 10, rf"{_COUNT}\s+(?i:(?:full-time\s+|part-time\s+)?(?:employees|staff members|"
          r"team members|staff))\b", "employee", "member", "staff"),
        r("employee_count", 10, rf"(?i:\bemploys)\s+{_COUNT}(?![\w-])", "employs"),
        r("employee_count", 10, rf"{_COUNT}-(?i:person|people|strong|member) team", "-person", "-people",
          "-strong", "-member"),
        r("employee_count", 11, rf"(?i:team size|employees|headcount|company size|number of employees)"
          rf"\s*\**\s*:\s*\**\s*{_COUNT}", "team size", "employees", "headcount", "company size"),
        r("employee_count", 9, rf"(?i:\bwe(?:['\u2019]re| are)(?:\s+(?:now|currently|just|still))?)\s+{_COUNT}"
          r"\s+(?i:people|strong)\b", " people", " strong"),
        r("employee_count", 8, rf"numberOfEmployees(?:\.value)?\s*:\s*{_COUNT}", "numberofemployees"),
        r("employee_count", 5, rf"{_COUNT}\s+(?i:people)\b", "people"),
        # industry
        r("industry", 10, rf"(?i:\bis an?|we are an?|\ban?)\s+(?:(?i:leading|growing|fast-growing|young|"
          rf"small|global|b2b|venture-backed)\s+)?(?i:{_INDUSTRY})\s+(?i:company|startup|firm|business|provider|"
          r"platform|vendor|specialist)", "company", "startup", "firm", "business", "provider", "platform",
          "vendor", "specialist"),
        r("industry", 11, rf"{_LEAD}(?:industry|sector|market){_LABEL_VALUE}", "industry", "sector", "market",
          flags=i),
        r("industry", 7, r"(?i:\bis an?|we are an?)\s+(?P<v>[a-z][a-z-]*(?:\s[a-z][a-z-]*){0,2})\s+"
          r"(?i:company|startup)\b", "company", "startup"),
        r("industry", 8, rf"{_LEAD}(?:tags|categories|category)\s*\**\s*:\s*\**\s*(?P<v>[^|;*\n]{{2,120}})",
          "tags", "categor", flags=i),
        r("industry", 3, rf"(?i:{_INDUSTRY})", *(x.lower() for x in _INDUSTRIES), mention=True),
        # product
        r("product", 10, rf"(?i:flagship product),?\s+{_PNAME}", "flagship"),
        r("product", 10, rf"{_LEAD}(?:(?i:(?:our\s+)?(?:products?|platform|solutions?))\s+)?{_PNAME}\s+is our\s+"
          rf"(?:[\w-]+\s+){{0,3}}?(?i:{_PRODUCT_NOUNS})s?\b", "is our"),
        r("product", 10, rf"(?i:\bmeet)\s+{_PNAME},?\s+(?i:the|our|a|an)\b", "meet "),
        r("product", 11, rf"{_LEAD}(?:product|flagship product|main product){_LABEL_VALUE}", "product",
          flags=i),
        r("product", 7, rf"(?i:introducing|our product,?)\s+{_PNAME}", "introducing", "our product"),
        r("product", 5, rf"\b{_WE}{_WE_AUX}\s+(?i:launched)\s+{_PNAME}", "launched"),
        # customer_segment
        r("customer_segment", 10, rf"(?i:built for|designed for|made for|purpose-built for)\s+{_SEG}",
          " for "),
        r("customer_segment", 10, rf"(?i:\bwe(?:['\u2019]re| are)?\s+(?:proudly\s+)?serv(?:e|ing)|"
          rf"\b(?:has|have) been serving)\s+(?:{_QUALIFIER}?\d[\d,]*\+?\s+)?{_SEG}", "serv"),
        r("customer_segment", 10, rf"(?i:our customers are|our clients are)\s+{_SEG}", "customers are",
          "clients are"),
        r("customer_segment", 9, rf"(?i:trusted by)\s+(?:{_QUALIFIER}?\d[\d,]*\+?\s+)?{_SEG}",
          "trusted by"),
        # pain_point
        r("pain_point", 10, rf"(?i:struggles? with|struggling with)\s+{_PHRASE}", "struggl"),
        r("pain_point", 10, rf"(?i:biggest challenge we hear about is|biggest challenge (?:is|we see is))\s+"
          rf"{_PHRASE}", "challenge"),
        r("pain_point", 10, rf"(?i:hiring to tackle|to tackle)\s+{_PHRASE}", "tackle"),
        r("pain_point", 10, rf"(?i:our current focus)\s*:\s*{_PHRASE}", "current focus"),
        r("pain_point", 6, rf"(?i:challenges? (?:is|are|of|like))\s+{_PHRASE}", "challenge"),
        r("pain_point", 5, rf"(?i:pain points? (?:is|are|like))\s+{_PHRASE}", "pain point"),
        # recent_event: only when the subject is the prospect (checked in _post) or named in the rule
        r("recent_event", 10, rf"{_LEAD}(?:[^,]{{0,40}},\s*)?(?P<subj>[^\s,;:]+(?:\s+[^\s,;:]+){{0,4}}?)\s+"
          rf"(?:(?i:today|recently|has|just)\s+)*(?i:announced (?:that )?it has|announced that it)\s+{_REST}",
          "announced"),
        r("recent_event", 8, rf"{_LEAD}(?i:this month|this week|this year|last month|last week|recently),?\s+"
          rf"(?P<subj>{_CAP}(?:\s+{_CAP}){{0,3}}|(?i:we|our team))\s+(?:(?i:has|have|just|also)\s+)*"
          rf"(?P<v>(?i:{_EVENT_VERBS})\b.{{3,}}?)\s*[.!]?\s*$", "this ", "last ", "recently"),
        r("recent_event", 5, rf"\b{_WE}{_WE_AUX}\s+"
          rf"(?P<v>(?i:{_WE_EVENT_VERBS})\b.{{3,}}?)\s*[.!]?\s*$", *_WE_EVENT_VERBS.split("|")),
    ]


_RULES = _rules()


def _company_alternatives(company: str) -> str:
    """A regex alternation of the company's name as given and without its legal suffix."""
    names = dict.fromkeys(n for n in (" ".join(company.split()), company_core_name(company)) if n)
    return "(?:" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")"


@lru_cache(maxsize=256)
def _company_rules(company: str) -> tuple[_Rule, ...]:
    """Rules that name the company (compiled once per company): recent events, glued headings."""
    if not company.strip():
        return ()
    c = _company_alternatives(company)
    return (
        # A heading glued to the next paragraph by text extraction: "Welcome to Acme Quorvanta is our ..."
        _Rule("product", 10, re.compile(rf"{_LEAD}(?:(?i:welcome to)\s+)?{c}\s+{_PNAME}\s+is our\s+"
                                        rf"(?:[\w-]+\s+){{0,3}}?(?i:{_PRODUCT_NOUNS})s?\b"), ("is our",)),
        _Rule("product", 5, re.compile(rf"\b{c}\s+(?:(?i:has|have|recently|just|also)\s+)*(?i:launched)\s+{_PNAME}"),
              ("launched",)),
        _Rule("founded_year", 8, re.compile(rf"(?i:\bstarted)\s+{c}\s+(?:(?i:back)\s+)?(?i:in)\s+"
                                            rf"(?i:{_MONTH}){_YEAR}"), ("started",)),
        _Rule("recent_event", 10, re.compile(
            rf"{_LEAD}(?i:this month|this week|this year|last month|recently),?\s+{c}\s+{_REST}"),
            ("this ", "last ", "recently")),
        _Rule("recent_event", 10, re.compile(rf"{_LEAD}(?i:news|update|press release)\s*:\s*{c}\s+{_REST}"),
              ("news", "update", "press")),
        _Rule("recent_event", 6, re.compile(
            rf"\b{c}\s+(?:(?i:has|have|recently|just)\s+)*(?P<v>(?i:{_EVENT_VERBS}|was acquired)\b.{{3,}}?)"
            r"\s*[.!]?\s*$"), tuple(dict.fromkeys(n.lower() for n in (company.strip(), company_core_name(company))))),
    )


@lru_cache(maxsize=256)
def _matcher(company: str, website: str) -> CompanyMatcher:
    return CompanyMatcher(company, website)


_STRIP_TRAIL = " \t.,;:!?*_-\u2013\u2014"


def _clean_span(sentence: str, start: int, end: int) -> tuple[int, int]:
    while end > start and sentence[end - 1] in _STRIP_TRAIL:
        end -= 1
    while start < end and sentence[start] in " \t*_":
        start += 1
    return start, end


def _names_prospect(subject: str, matcher: CompanyMatcher) -> bool:
    """True when ``subject`` (the words before an event verb) is the prospect: "we", "our team", or the
    company's name with at most two more words ("The Acme team"), not "Acme's partner Globex"."""
    words = subject.split()
    if " ".join(words).lower() in ("we", "our team", "the company", "the team"):
        return True
    return matcher.names(subject) and "'" not in subject and "\u2019" not in subject and \
        len(words) <= len(company_core_name(matcher.company).split()) + 2


@lru_cache(maxsize=4096)
def _hostile_sentence(sentence: str, own_domain: str) -> bool:
    """True when ``sentence`` carries what no fact may (a URL, e-mail address, phone number, credential
    word, a line to the reader: ``value_problem``) in any window of ``MAX_PHRASE_WORDS`` words."""
    words = sentence.split()
    step = max(1, MAX_PHRASE_WORDS // 2)
    return any(value_problem("recent_event", " ".join(words[k:k + MAX_PHRASE_WORDS]), sentence,
                             own_domain=own_domain) is not None
               for k in range(0, max(1, len(words)), step))


def _post_employees(sentence: str, start: int, end: int) -> bool:
    """Whether the count at ``sentence[start:end]`` is the company's own head count: not an earlier
    company's (``_ELSEWHERE``), not customers' sizes (``_OTHER_ORGS``), and "N people" only in a sentence
    about the team (``_TEAM_CUE``) that counts no attendees, users or members (``_NOT_STAFF``)."""
    before, after = sentence[:start], sentence[end:]
    if _ELSEWHERE.search(sentence):
        return False
    staff_noun_before = _STAFF_NOUN_BEFORE.search(before) is not None
    # A fragment ("with 20 to 1000+ employees.") does not say whose employees they are.
    if re.fullmatch(r"[\W_]*(?i:with|for|of|from|to)\s+", before):
        return False
    if _OTHER_ORGS.search(before[-60:]) and not staff_noun_before:
        return False
    if re.match(r"\s*(?:people|persons)\b", after, re.IGNORECASE) and not staff_noun_before:
        return _TEAM_CUE.search(sentence) is not None and _NOT_STAFF.search(sentence) is None
    return True


def _post_location(sentence: str, start: int, end: int, matcher: CompanyMatcher) -> int | None:
    """The end of the place at ``sentence[start:end]`` once a trailing subject or list is cut, or None."""
    value = sentence[start:end]
    if "," in value:
        first, second = value.split(",", 1)
        after = sentence[end:]
        nxt = re.match(r"\s+([a-z]+)", after)
        follows_subject = nxt is not None and nxt.group(1) in _SUBJECT_VERBS
        # "offices in San Francisco, Istanbul and London": a list of places, of which the first is kept.
        in_list = re.match(rf"\s*(?:,\s*{_PLACE}\s*(?:,|\band\b)|\s+and\s+[A-Z])", after) is not None
        if matcher.names(second) or follows_subject or in_list:
            end = start + len(first.rstrip())
    if sentence[start:end].strip().lower() in _REGIONS:
        return None
    return end


def _post_industry(rule: _Rule, sentence: str, start: int, end: int) -> tuple[int, int] | None:
    value = sentence[start:end]
    low = value.lower()
    if "," in value:  # a tag list: take the first tag that names a market
        offset = start
        for tag in value.split(","):
            t = tag.strip()
            if t and t.lower() not in _GENERIC_TAGS and not set(t.lower().split()) <= _HEADING_WORDS:
                s = sentence.index(t, offset)
                return s, s + len(t)
            offset += len(tag) + 1
        return None
    words = low.split()
    labelled = re.search(r":\s*\**\s*$", sentence[:start]) is not None  # "Industry: Connected devices"
    if (words[0] in _ADJECTIVES or low in _GENERIC_TAGS or set(words) <= _HEADING_WORDS
            or any(w in _DESCRIPTIVE or (not labelled and len(w) > 4 and w.endswith("ed")) for w in words)):
        return None
    # A heading ("#### Developer Tools", "**Fintech**") is a section of the page, not the company's market.
    if sentence.strip(" \t#*_>-:.").lower() == low:
        return None
    if rule.mention:
        if _ELSEWHERE.search(sentence):
            return None
        after, before = sentence[end:], sentence[:start]
        if not (_SELF_HEADED.search(value) or re.match(rf"\s+(?i:{_ORG_NOUNS})\b", after)
                or re.search(r"\bfor\s+(?:the\s+)?$", before, re.IGNORECASE)):
            return None
    return start, end


def _post_segment(sentence: str, start: int, end: int) -> tuple[int, int] | None:
    keep: list[str] = []
    for w in sentence[start:end].split():
        if keep and w.lower() in _SEG_STOP and (w.lower() != "and" or len(keep) >= 2):
            break
        keep.append(w)
    keep = keep[:6]
    while keep and keep[-1].lower() == "and":
        keep.pop()
    if not keep or keep[0].lower() in _SEG_REJECT or keep[0].lower() in _SEG_STOP:
        return None
    value = " ".join(keep).rstrip(_STRIP_TRAIL)
    last = value.split()[-1].lower() if value else ""
    # A segment is a group of customers, never a number ("9" of "serving 9,000 async tasks").
    if not value or value[0].isdigit():
        return None
    plural = last.endswith("s") and not last.endswith(("ss", "us", "is")) and last not in _SEG_NOT_PEOPLE
    if not (plural or last in _SEG_COLLECTIVE):
        return None
    return start, start + len(value)


def _bound_penalty(field_name: str, value: str) -> int:
    """1 for a head count given as a bound ("more than 49"): an exact count of the same standing wins."""
    return 1 if field_name == "employee_count" and re.match(_QUALIFIER, value) else 0


def _post(rule: _Rule, match: re.Match[str], sentence: str, matcher: CompanyMatcher) -> tuple[int, int] | None:
    """Field-specific trimming and checks on a rule's match; the span of the value, or None to reject.

    The value must say what the sentence says about the prospect: its subject is the company where the
    rule names one, the count is the company's staff, the year its founding, and the value has the shape
    grounding demands (``agents.fact_shapes.value_problem``).
    """
    field_name = rule.field
    start, end = _clean_span(sentence, match.start("v"), match.end("v"))
    if "subj" in match.re.groupindex and match.group("subj") is not None \
            and not _names_prospect(match.group("subj"), matcher):
        return None
    if start >= end or end - start > 120:
        return None
    value = sentence[start:end]
    low = value.lower()
    if field_name == "founded_year":  # four digits by the rules' pattern: only the range is left to check
        year = int(value)
        return (start, end) if 1950 <= year <= datetime.now(UTC).year and not _ELSEWHERE.search(sentence) \
            else None
    elif field_name == "employee_count":
        digits = int(re.sub(r"\D", "", re.split(r"\s*(?:-|\u2013|to|and)\s*", value)[0]) or 0)
        if not 1 <= digits <= 2_000_000 or not _post_employees(sentence, start, end):
            return None
    elif field_name == "location":
        new_end = _post_location(sentence, start, end, matcher)
        if new_end is None:
            return None
        start, end = _clean_span(sentence, start, new_end)
    elif field_name == "product":
        company = matcher.company.strip()
        if (len(value) < 3 or low in _PRODUCT_STOP or low.split()[0] in _PRODUCT_STOP
                or (company and low == company.lower()) or (matcher.names(value) and " " not in value)
                # "Opalspire Digital Lumanta is our ...": a glued heading, not a product named after a
                # multi-word company (single-word companies do name products so: "Pellixo Route").
                or (" " in company and low.startswith(company.lower() + " "))):
            return None
    elif field_name == "industry":
        span = _post_industry(rule, sentence, start, end)
        if span is None:
            return None
        start, end = span
    elif field_name == "customer_segment":
        span = _post_segment(sentence, start, end)
        if span is None:
            return None
        start, end = span
    elif field_name == "pain_point":
        if len(value.split()) > 12:
            return None
    elif field_name == "recent_event":
        if _ELSEWHERE.search(sentence) or _hostile_sentence(sentence, matcher.own_domain):
            return None
        cut = _CLAUSE_END.search(sentence, start, end)
        if cut is not None:
            end = cut.start()
        start, end = _clean_span(sentence, start, end)
        event = sentence[start:end]
        if len(event.split()) < 2 or _FIRST_PERSON.search(event) or _DANGLING.search(event):
            return None
    value = sentence[start:end]
    if not value or value_problem(field_name, value, sentence, own_domain=matcher.own_domain) is not None:
        return None
    return start, end


@dataclass
class _Numbered:
    sid: str
    text: str
    source: int
    url: str
    order: int


def _numbered(task: ExtractionTask) -> list[_Numbered]:
    """The task's sentences with their source numbers (runs of consecutive sentences of one page, from 1,
    as the prompt numbers them)."""
    out: list[_Numbered] = []
    source, url = 0, None
    for s in task.sentences:
        if s.source_url != url or not source:
            source, url = source + 1, s.source_url
        out.append(_Numbered(s.id, s.text.strip(), source, s.source_url, len(out)))
    return out


def extract_facts(task: ExtractionTask) -> dict[str, list[dict[str, str]]]:
    """Answer an extraction task by rules.

    Returns:
        ``{"facts": [{"field", "value", "evidence"}]}``, at most one fact per field of the task, in
        ``FACT_FIELDS`` order; ``value`` is an exact span of the sentence cited in ``evidence``.
    """
    wanted = set(task.field_names)
    sentences = _numbered(task)
    if not sentences:
        return {"facts": []}
    matcher = _matcher(task.company, task.website)
    own_host = host_of(task.website)
    source_own: dict[int, int] = {}
    for s in sentences:
        if s.source not in source_own:
            source_own[s.source] = 1 if own_host and host_of(s.url) == own_host else 0
    own = [source_own[s.source] for s in sentences]
    # Rank: own site first, then earlier sources, then earlier sentences.
    rank = {i: r for r, i in enumerate(sorted(range(len(sentences)),
                                              key=lambda i: (-own[i], sentences[i].source, i)))}
    # Keyword index over the whole text at once (str.find runs in C): keyword -> sentence indices.
    lows = [s.text.lower() for s in sentences]
    starts: list[int] = []
    pos = 0
    for low in lows:
        starts.append(pos)
        pos += len(low) + 1
    text = "\n".join(lows)
    hits: dict[str, set[int]] = {}

    def sentences_with(keyword: str) -> set[int]:
        found = hits.get(keyword)
        if found is None:
            found = set()
            at = text.find(keyword)
            while at != -1:
                idx = bisect_right(starts, at) - 1
                found.add(idx)
                nxt = idx + 1
                at = text.find(keyword, starts[nxt]) if nxt < len(starts) else -1
            hits[keyword] = found
        return found

    instruction: dict[int, bool] = {}
    best: dict[str, tuple[tuple[int, int, int, int], str, str]] = {}
    # Strongest rules first, so that weaker ones are skipped once an own-site fact outranks them.
    for rule in sorted((*_RULES, *_company_rules(task.company)), key=lambda r: -r.priority):
        if rule.field not in wanted:
            continue
        current = best.get(rule.field)
        if current is not None and current[0][:2] >= (1, rule.priority):
            continue
        candidates: set[int] = set()
        for keyword in rule.keywords:
            candidates |= sentences_with(keyword)
        for i in sorted(candidates, key=rank.__getitem__):
            s = sentences[i]
            if current is not None and (own[i], rule.priority) < current[0][:2]:
                break
            m = rule.pattern.search(s.text)
            if m is None:
                continue
            span = _post(rule, m, s.text, matcher)
            if span is None:
                continue
            if i not in instruction:
                instruction[i] = is_instruction(s.text)
            if instruction[i]:
                continue
            value = s.text[span[0]:span[1]]
            key = (own[i], rule.priority - _bound_penalty(rule.field, value), -s.source, -i)
            if current is None or key > current[0]:
                best[rule.field] = current = (key, value, s.sid)
            if key[1] == rule.priority:  # a bound keeps looking for an exact count under the same rule
                break
    facts = [
        {"field": f, "evidence": best[f][2], "value": best[f][1]} for f in FACT_FIELDS if f in best and f in wanted
    ]
    return {"facts": facts}


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

_BAD_TAGS = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
#: Failures after which the email leaves out the offer's own texts (value proposition, proof point): a spam
#: phrase or an unsourced mention may come from them.
_OFFER_TEXT_CODES = frozenset({"spam", "no_fact", "ungrounded"})
_WORDS = re.compile(r"\S+")
#: ``<plural form|singular form>`` in a template: the verb agrees with the slot's noun phrase.
_AGREE = re.compile(r"<([^<>|]+)\|([^<>|]+)>")
#: Assumed word counts of name tags whose values the prompt does not show.
_TAG_WORDS = {"first_name": 1, "last_name": 1, "company": 2, "title": 2, "sender_name": 2,
              "sender_company": 2, "product": 2}
#: Words from the greeting to the call to action the templates aim for (the rubric's band is 50 to 90;
#: the margin covers company names longer than the two words assumed).
_BAND = (56, 84)
_SUBJECT_WORDS = 5

# Each piece is a template using merge tags and, in angle brackets, offer text (<problem>, <pred>, <np>,
# <sentence>, <proof>) or agreement (<are|is>); a piece is only used when all its tags are available.
_GREETINGS = ("Hi {{first_name}},", "Hello {{first_name}},")
_SUBJECTS = ("Idea for {{company}}", "A thought for {{company}}", "Question for {{company}}", "Quick question",
             "For the {{company}} team", "A short note", "Worth a look")
_FIELD_SUBJECTS: dict[str, tuple[str, ...]] = {
    "recent_event": ("Congrats on the news", "The news at {{company}}", "After the big news"),
    "pain_point": ("About {{fact.pain_point}}",),
    "location": ("Teams in {{fact.location}}",),
    "customer_segment": ("Selling to {{fact.customer_segment}}",),
}
#: The first sentence: an observation about the prospect's world through one fact (never about the sender).
_OPENERS: dict[str, tuple[str, ...]] = {
    "recent_event": (
        "Now that {{company}} {{fact.recent_event}}, the next few months are probably busy.",
        "Congratulations on the news: {{company}} {{fact.recent_event}}.",
        "News travels fast: {{company}} {{fact.recent_event}}, which is a real milestone.",
        "The news that {{company}} {{fact.recent_event}} caught my eye.",
        "Word is that {{company}} {{fact.recent_event}}; congratulations to the team.",
        "{{company}} {{fact.recent_event}}, and that tends to reset the plan for the year.",
        "Good to see that {{company}} {{fact.recent_event}}.",
        "Big step: {{company}} {{fact.recent_event}}.",
    ),
    "pain_point": (
        "It sounds like {{fact.pain_point}} <are|is> on the agenda at {{company}}.",
        "From the outside, {{fact.pain_point}} <look|looks> like one of the harder problems at {{company}}.",
        "Teams dealing with {{fact.pain_point}} rarely have hours to spare, and {{company}} is likely no "
        "exception.",
        "{{company}} seems to be working through {{fact.pain_point}}, like many teams in its space.",
        "Few problems eat a week the way {{fact.pain_point}} <do|does>, and {{company}} seems to know it.",
    ),
    "product": (
        "The way {{company}} positions {{fact.product}} caught my eye.",
        "{{fact.product}} looks like a thoughtful piece of work from {{company}}.",
        "From what I can see, {{fact.product}} is at the centre of what {{company}} does.",
        "Building something like {{fact.product}} is no small job, and {{company}} seems to be doing it well.",
    ),
    "customer_segment": (
        "Selling to {{fact.customer_segment}} is demanding work, and {{company}} seems to do it well.",
        "{{company}} works with {{fact.customer_segment}}, a group with very specific expectations.",
        "Teams that serve {{fact.customer_segment}} tend to live and die by their follow-up.",
        "Not many teams focus on {{fact.customer_segment}} the way {{company}} does.",
    ),
    "location": (
        "Teams in {{fact.location}} are moving quickly, and {{company}} stands out among them.",
        "{{company}} is one of the more interesting teams based in {{fact.location}}.",
        "Being based in {{fact.location}} gives {{company}} a strong local network to sell into.",
        "Out of the teams in {{fact.location}}, {{company}} is one that stands out.",
        "{{company}} works out of {{fact.location}}, one of the busier places to build a company right now.",
        "Building a company in {{fact.location}}, as {{company}} does, means a crowded field of competitors.",
    ),
    "industry": (
        "Few corners of {{fact.industry}} move as fast as the one {{company}} works in.",
        "{{company}} is building in {{fact.industry}}, where buyers have little time to spare.",
        "Selling in {{fact.industry}} is a crowded game, and {{company}} seems to play it well.",
    ),
    "employee_count": (
        "With {{fact.employee_count}} people on the team, {{company}} is at the stage where good processes "
        "start to matter.",
        "{{company}} has {{fact.employee_count}} people, about the point where informal habits stop scaling.",
        "At {{fact.employee_count}} people, every hour at {{company}} counts.",
        "{{company}} runs with {{fact.employee_count}} people, so every process has to earn its place.",
        "Running {{company}} with {{fact.employee_count}} people means every week counts.",
    ),
    "founded_year": (
        "{{company}} has been at it since {{fact.founded_year}}, long enough to know what works.",
        "A company founded in {{fact.founded_year}} usually has a few habits worth revisiting, and "
        "{{company}} may be no different.",
        "Since {{fact.founded_year}}, {{company}} has had time to find out what slows a team down.",
        "{{company}} started in {{fact.founded_year}}, and the early years decide a lot about how a team sells.",
        "Starting a company in {{fact.founded_year}}, as {{company}} did, means building the sales motion from "
        "scratch.",
    ),
}
_NO_FACT_OPENERS = (
    "Most teams in your position are busy, so this note is short.",
    "Plenty of teams like {{company}} are juggling more than they planned for this year.",
    "Teams like {{company}} tend to have more on their plate than their headcount suggests.",
)
#: After an event: how it connects to the problem of the offer that it shares words with.
_EVENT_BRIDGES = (
    "That tends to put <problem> on the agenda.",
    "In my experience, the hard part after that is <problem>.",
    "Moments like that usually make <problem> more pressing.",
    "The teams I talk to say the tricky part from there is <problem>.",
    "From there, <problem> usually <become|becomes> the real work.",
    "That is usually when <problem> <start|starts> to matter.",
    "What tends to follow is a push on <problem>.",
)
#: After any other fact: a problem of the offer that teams in that position often have.
_BRIDGES = (
    "Teams like that often tell me <problem> <take|takes> more of the week than planned.",
    "That often makes <problem> a bigger job than it looks.",
    "For teams like that, <problem> <tend|tends> to land on a few busy people.",
    "A common thread for teams like that is <problem>.",
    "Teams in that spot usually wrestle with <problem>.",
)
#: After a head count or a founding year: the same, about the company's stage.
_STAGE_BRIDGES = (
    "At that stage, <problem> <are|is> often where the hours go.",
    "That is about when <problem> <start|starts> to eat into the week.",
    "Teams at that stage often tell me <problem> <take|takes> more time than planned.",
    "A common thread at that stage is <problem>.",
    "That is usually the point where <problem> <need|needs> a better answer.",
)
#: The prospect's role, after a sentence it can refer to (a bridge or a pain point).
_TITLE_LINES = (
    "As {{title}}, you probably see this up close.",
    "As {{title}}, you may be the one who feels it first.",
    "I would guess that lands with you as {{title}}.",
    "That is likely on your desk as {{title}}.",
    "In your seat as {{title}}, that is hard to ignore.",
)
#: The product, named once, with what it does (<pred>: a third-person predicate from the value proposition).
_PREDICATE_PITCHES = (
    "{{product}} <pred>.",
    "That is the job {{product}} does: it <pred>.",
    "We built {{product}} for this; it <pred>.",
    "Our answer is {{product}}, which <pred>.",
    "Here is where {{product}} fits: it <pred>.",
    "In short, {{product}} <pred>.",
    "That is why we made {{product}}: it <pred>.",
    "{{product}} was made for this: it <pred>.",
)
_PROBLEM_PITCHES = (
    "{{product}} takes <problem> off your plate.",
    "We built {{product}} to make <problem> simpler.",
    "{{product}} exists to help with <problem>.",
    "Our team made {{product}} for <problem>.",
)
_PHRASE_PITCHES = (
    "{{product}} is built for one thing: <np>.",
    "What {{product}} offers is simple: <np>.",
    "{{product}} comes down to this: <np>.",
)
_SENTENCE_PITCHES = (
    "That is what {{product}} is for. <sentence>",
    "We built {{product}} for this. <sentence>",
    "{{product}} is our answer. <sentence>",
)
_PLAIN_PITCHES = (
    "{{product}} was built for exactly this.",
    "That is what {{product}} is for.",
    "This is the problem {{product}} was built for.",
)
_PROOFS = (
    "One recent example: <proof>",
    "To give you a sense of it, <proof>",
    "For context, <proof>",
    "A result I can share: <proof>",
    "For what it is worth, <proof>",
    "One data point: <proof>",
    "To put a number on it, <proof>",
    "A recent case: <proof>",
)
_FILLERS = (
    "It usually takes one short conversation to see whether there is a fit.",
    "There is no pressure either way.",
    "Happy to share what has worked for similar teams.",
    "Most teams start small and expand once they see results.",
)
_SIGNOFFS = ("Best,", "Thanks,", "Cheers,", "All the best,")
#: Where a value proposition's first clause ends ("spots the accounts ..., so your team ...").
_CLAUSE = re.compile(r",?\s+(?:so that|so|which|and then|while)\s+|[;:]\s+|\s+[-\u2013\u2014]\s+|,\s+and\s+")
_MAX_PREDICATE_WORDS = 24


@dataclass
class _WritingTask:
    product: str = ""
    value_proposition: str = ""
    problems: list[str] = field(default_factory=list)
    proof_point: str = ""
    call_to_action: str = ""
    opt_out_line: str = ""
    title: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def _writing(task: WritingTask) -> _WritingTask:
    """The parts of ``task`` the templates use (texts stripped; a fact tag maps to its value, a name tag to
    its description)."""
    offer = task.offer
    return _WritingTask(
        product=offer.product.strip(), value_proposition=offer.value_proposition.strip(),
        problems=[p.strip() for p in offer.problems_solved if p.strip()], proof_point=offer.proof_point.strip(),
        call_to_action=offer.call_to_action.strip(), opt_out_line=offer.opt_out_line.strip(),
        title=task.prospect_title.strip(),
        tags={t.name: (t.value if t.is_fact else t.description).strip() for t in task.merge_tags},
    )


@dataclass
class _Feedback:
    rounds: int = 0
    codes: set[str] = field(default_factory=set)
    too_long: bool = False
    too_short: bool = False
    subject_too_long: bool = False
    bad_tags: set[str] = field(default_factory=set)
    spam: set[str] = field(default_factory=set)


def _feedback(failed: Sequence[FailedCheck]) -> _Feedback:
    """What the templates must change after ``failed`` (read by code and subject, never by wording)."""
    codes = {c.code for c in failed}
    return _Feedback(
        rounds=1 if failed else 0, codes=codes, too_long="too_long" in codes, too_short="too_short" in codes,
        subject_too_long="subject_too_long" in codes,
        bad_tags={c.subject for c in failed if c.code == "unknown_merge_tag"},
        spam={c.subject.lower() for c in failed if c.code == "spam" and c.subject},
    )


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


def _third_person(predicate: str) -> str:
    """``predicate`` of "we" turned into one of "it": its first verb in the third person singular."""
    verb, _, rest = predicate.partition(" ")
    irregular = {"are": "is", "have": "has", "do": "does", "go": "goes", "were": "was"}
    if verb in irregular:
        verb = irregular[verb]
    elif re.search(r"(?:s|sh|ch|x|z|o)$", verb):
        verb += "es"
    elif re.search(r"[^aeiou]y$", verb):
        verb = verb[:-1] + "ies"
    elif not verb.endswith("ed"):
        verb += "s"
    return f"{verb} {rest}".strip()


def _pitch_parts(value_proposition: str, product: str) -> tuple[str, str]:
    """Read the value proposition as ``(kind, text)``: ``("predicate", "spots the accounts ...")`` when it
    can follow the product's name (it starts with the product's name, "It" or "We", or is a verb phrase in
    the third person such as "cuts month-end close time"), ``("sentence", ...)`` for a sentence with another
    subject, ``("phrase", ...)`` for any other fragment; ``("", "")`` when empty."""
    text = " ".join(value_proposition.split())
    core = text.rstrip(".!? ")
    if not core:
        return "", ""
    first, _, rest = core.partition(" ")
    if product and core.lower().startswith(product.lower() + " "):
        return "predicate", core[len(product) + 1:].strip()
    if re.fullmatch(r"(?i)it(?:'s|\u2019s)", first) and rest:
        return "predicate", f"is {rest}"
    if first.lower() == "it" and rest:
        return "predicate", rest
    if first.lower() == "we" and rest and rest.split()[0].isalpha():
        return "predicate", _third_person(rest)
    if first.isalpha() and first.islower() and first.endswith("s") and not first.endswith("ss") and rest:
        return "predicate", core
    if first[:1].isupper() and text[-1:] in ".!?" and len(core.split()) >= 4:
        return "sentence", text
    return "phrase", lower_first(core)


def _short_predicate(predicate: str) -> str:
    """The first clause of ``predicate`` ("spots the accounts that are ready to buy")."""
    return _CLAUSE.split(predicate, maxsplit=1)[0].strip(" ,")


class _Composer:
    """Chooses template pieces deterministically from a seed, using only available tags."""

    def __init__(self, task: _WritingTask, seed: int, fb: _Feedback) -> None:
        self.values = {k: v for k, v in task.tags.items() if k not in fb.bad_tags}
        self.known = {"product": task.product, "title": task.title}
        self.seed = seed
        self.spam = fb.spam

    def usable(self, template: str) -> bool:
        return (all(t in self.values for t in _BAD_TAGS.findall(template))
                and not any(p in template.lower() for p in self.spam))

    def pick(self, options: Sequence[str], salt: int) -> str | None:
        ok = [o for o in options if self.usable(o)]
        if not ok:
            return None
        digest = hashlib.sha256(f"{self.seed}:{salt}".encode()).digest()
        return ok[int.from_bytes(digest[:4], "big") % len(ok)]

    def words(self, text: str) -> int:
        def tag_words(name: str) -> int:
            value = self.values.get(name, "") if name.startswith("fact.") else self.known.get(name, "")
            return len(_WORDS.findall(value)) or _TAG_WORDS.get(name, 1)

        count = len(_WORDS.findall(_BAD_TAGS.sub("", text)))
        return count + sum(tag_words(t) for t in _BAD_TAGS.findall(text))


def _fill(template: str, number: str, **texts: str) -> str:
    """Put offer texts into ``template``'s ``<name>`` slots and make ``<plural|singular>`` agree."""
    for name, text in texts.items():
        template = template.replace(f"<{name}>", text)
    return _AGREE.sub(lambda m: m.group(1) if number == "plural" else m.group(2), template)


def _observation(comp: _Composer, task: _WritingTask, facts: list[str]) -> tuple[str, str, str | None]:
    """Pick the fact to open with and its problem: ``(field, opener, problem)``.

    A relevant event or pain point comes first (it ties the email to a problem the offer solves); else a
    fact chosen by the seed among those that read as prose in their role.
    """
    def relevant(name: str) -> tuple[bool, str | None]:
        return relevant_problem(comp.values[f"fact.{name}"], task.problems, task.value_proposition)

    gated = [f for f in facts if f in GATED_FIELDS and relevant(f)[0]]
    prose = [f for f in facts if prose_problem(f, comp.values[f"fact.{f}"]) is None] or facts
    pool = gated or [f for f in prose if f not in GATED_FIELDS] or prose
    name = pool[int.from_bytes(hashlib.sha256(f"{comp.seed}:fact".encode()).digest()[:4], "big") % len(pool)]
    number = grammatical_number(comp.values[f"fact.{name}"])
    opener = _fill(comp.pick(_OPENERS[name], 3) or _OPENERS[name][0], number)
    problem = relevant(name)[1] if name in GATED_FIELDS else None
    return name, opener, problem


def write_email(task: WritingTask) -> dict[str, str]:
    """Answer a writing task with templates.

    The email follows the writer's rules of craft (``agents.prompts.WRITER_SYSTEM_PROMPT``): an opener
    about the prospect through one listed fact (a relevant event or pain point first), a sentence tying
    it to a problem of ``Problems solved`` (the one it shares words with, ``agents.prose``), the
    prospect's role when known, the product named once with what it does (from the value proposition,
    read as a predicate, a sentence or a phrase), the proof point when there is one, the call to action
    and a sign-off; 56 to 84 words from greeting to call to action; a subject of at most five words with
    no product or first name. Verbs agree with plural noun phrases; every piece has several variants,
    chosen by a stable SHA-256 hash of the task's user message (``agents.prompts.render_writer_user``, which
    holds the prospect, the facts and the offer), so sentences vary across a campaign.

    Args:
        task: The writing task; its ``feedback`` (the checks an earlier draft failed) is fixed by rule
            where possible, read by code: a longer (``too_short``) or shorter (``too_long``) body, a short
            subject (``subject_too_long``), no offer text after ``spam``, ``no_fact`` or ``ungrounded``,
            no phrase named by ``spam`` and no tag named by ``unknown_merge_tag``.

    Returns:
        ``{"subject": ..., "body": ...}`` written with merge tags.
    """
    fb = _feedback(task.feedback)
    user = render_writer_user(task)  # the first user message, without the feedback
    seed = int.from_bytes(hashlib.sha256(user.encode("utf-8")).digest()[:8], "big") + 7919 * fb.rounds
    brief = _writing(task)
    comp = _Composer(brief, seed, fb)
    facts = [f for f in FACT_FIELDS if f"fact.{f}" in comp.values]
    problems = brief.problems

    if facts:
        name, opener, problem = _observation(comp, brief, facts)
    else:
        name, problem = "", None
        opener = comp.pick(_NO_FACT_OPENERS, 3) or "Most teams in your position are busy, so this note is short."
    if problem is None and problems and name != "pain_point":
        problem = problems[seed % len(problems)]
    bridge = ""
    if problem and name != "pain_point":
        bridges = (_EVENT_BRIDGES if name == "recent_event"
                   else _STAGE_BRIDGES if name in ("employee_count", "founded_year") else _BRIDGES)
        bridge = _fill(comp.pick(bridges, 4) or bridges[0], grammatical_number(problem), problem=problem)
    refers = bool(bridge) or name == "pain_point"
    title_line = (comp.pick(_TITLE_LINES, 5) or "") if refers else ""

    offer_text_ok = not fb.codes & _OFFER_TEXT_CODES
    kind, text = _pitch_parts(brief.value_proposition, brief.product) if offer_text_ok else ("", "")
    proof = _sentence(brief.proof_point) if brief.proof_point and offer_text_ok else ""
    if proof:
        frame = comp.pick(_PROOFS, 6) or _PROOFS[0]
        proof = _fill(frame, "singular", proof=lower_first(proof) if "," in frame else proof)

    # The pitch names a problem other than the bridge's, when the offer has another.
    others = [p for p in problems if p != problem or not bridge]
    pitch_problem = others[(seed >> 7) % len(others)] if others else ""
    # A quarter of the emails (and every one whose value proposition does not fit) pitch through the
    # problem, so the value proposition's words do not repeat in every email of a campaign.
    by_problem = bool(pitch_problem) and seed % 4 == 0

    def pitch(short: bool) -> str:
        if kind == "predicate" and not by_problem:
            pred = _short_predicate(text) if short or len(text.split()) > _MAX_PREDICATE_WORDS else text
            if len(pred.split()) <= _MAX_PREDICATE_WORDS:
                return _fill(comp.pick(_PREDICATE_PITCHES, 7) or _PREDICATE_PITCHES[0], "singular", pred=pred)
        fits = not short and len(text.split()) <= _MAX_PREDICATE_WORDS and not by_problem
        if kind == "phrase" and fits:
            return _fill(comp.pick(_PHRASE_PITCHES, 9) or _PHRASE_PITCHES[0], "singular", np=text)
        if kind == "sentence" and fits:
            return _fill(comp.pick(_SENTENCE_PITCHES, 9) or _SENTENCE_PITCHES[0], "singular", sentence=text)
        if pitch_problem:
            return _fill(comp.pick(_PROBLEM_PITCHES, 8) or _PROBLEM_PITCHES[0], "singular", problem=pitch_problem)
        return comp.pick(_PLAIN_PITCHES, 9) or _PLAIN_PITCHES[0]

    subject = _subject(comp, name, fb)
    greeting = comp.pick(_GREETINGS, 2) or "Hello,"
    cta = _sentence(brief.call_to_action) if brief.call_to_action else ""
    signoff = comp.pick(_SIGNOFFS, 10) or "Best,"
    sender = "\n".join(x for x in ("{{sender_name}}", "{{sender_company}}") if comp.usable(x))
    low, high = (50, 70) if fb.too_long else ((80, 95) if fb.too_short else _BAND)

    def assemble(parts: dict[str, str], fill: list[str]) -> tuple[str, int]:
        para1 = " ".join(x for x in (opener, parts["bridge"], parts["title"]) if x)
        para2 = " ".join(x for x in (parts["pitch"], proof, *fill) if x)
        head = [greeting, para1, para2, cta]
        body = "\n\n".join(p for p in [*head, "\n".join(x for x in (signoff, sender) if x),
                                       brief.opt_out_line.strip()] if p)
        return body, comp.words(" ".join(head))

    # Half of the emails say only the first clause of the value proposition, and any email that is too
    # long; then a too-long email drops the role line, then the bridge.
    parts = {"bridge": bridge, "title": title_line, "pitch": pitch(short=bool(seed >> 5 & 1))}
    body, words = assemble(parts, [])
    for step in ("pitch", "title", "bridge"):
        if words <= high:
            break
        parts[step] = pitch(short=True) if step == "pitch" else ""
        body, words = assemble(parts, [])
    if words < low:  # too short: the whole value proposition first, then fillers
        longer = {**parts, "pitch": pitch(short=False)}
        body_longer, words_longer = assemble(longer, [])
        if words_longer <= high:
            parts, body, words = longer, body_longer, words_longer
    fill: list[str] = []
    start = (seed >> 11) % len(_FILLERS)
    for filler in (f for f in _FILLERS[start:] + _FILLERS[:start] if comp.usable(f)):
        if words >= low:
            break
        fill.append(filler)
        body, words = assemble(parts, fill)
    return {"subject": subject, "body": body}


def _subject(comp: _Composer, name: str, fb: _Feedback) -> str:
    """Two to five plain words about the prospect's situation (no product, no first name)."""
    if fb.subject_too_long:
        return "Quick question"
    options = [s for s in (*_FIELD_SUBJECTS.get(name, ()), *_SUBJECTS) if comp.words(s) <= _SUBJECT_WORDS]
    return comp.pick(options, 1) or "Quick question"


# --------------------------------------------------------------------------------------------------
# The chat model
# --------------------------------------------------------------------------------------------------

class HeuristicChatModel(BaseChatModel):
    """A deterministic, rule-based researcher and writer behind the chat-model interface. NOT an LLM.

    Answers the typed task an agent passes as ``task=`` (``invoke(messages, task=task)``: a
    ``core.tasks.ExtractionTask`` or ``WritingTask``, or its ``dump_task`` JSON) with the JSON the agent
    expects (see the module docstring); the messages are not read then. Called without a task (a stored
    call replayed, a raw call), it reads the task back from the messages with the one legacy parser
    (``agents.legacy_tasks.task_from_messages``).
    Each call takes well under 2 ms for a typical prompt; ``_agenerate`` runs inline (no thread pool).

    The returned ``AIMessage`` carries ``usage_metadata`` with token counts estimated as
    ``ceil(characters / 4)`` (not a tokenizer count) and ``response_metadata={"model_name": "heuristic"}``.

    Raises (from ``invoke``/``ainvoke``):
        ValueError: no task is given and the messages are not an agent's prompt.
        pydantic.ValidationError: ``task`` is a mapping that is not a stored task.
    """

    @property
    def _llm_type(self) -> str:
        return "heuristic"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": HEURISTIC_MODEL_NAME}

    def _answer(self, messages: list[BaseMessage], task: Any) -> dict[str, Any]:
        if task is None:
            task = task_from_messages(messages)
        elif isinstance(task, Mapping):
            task = load_task(task)
        if isinstance(task, ExtractionTask):
            return extract_facts(task)
        if isinstance(task, WritingTask):
            return write_email(task)
        system = next((m.text for m in messages if isinstance(m, SystemMessage)), "")
        raise ValueError(
            "HeuristicChatModel is a rule-based stand-in, not an LLM: it only answers the researcher's and the "
            "writer's tasks (core.tasks.ExtractionTask, WritingTask, passed as task=, or their prompts from "
            "agents.prompts); got "
            + (f"task={type(task).__name__}" if task is not None else f"a system message starting {system[:80]!r}")
            + ". Use an LLM backend (openai:..., ollama:...) for other prompts."
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        content = json.dumps(self._answer(messages, kwargs.get("task")), ensure_ascii=False)
        input_tokens = estimate_tokens("".join(m.text for m in messages))
        output_tokens = estimate_tokens(content)
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                 "total_tokens": input_tokens + output_tokens}
        message = AIMessage(content=content, usage_metadata=usage,  # type: ignore[arg-type]
                            response_metadata={"model_name": HEURISTIC_MODEL_NAME})
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": HEURISTIC_MODEL_NAME, "token_usage": usage})

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop=stop, **kwargs)
