"""What a local worker process needs loaded before its first run, imported once by the fork server.

``graphs.executors`` starts local workers by forking them from a ``multiprocessing`` fork server that
imports this module first, so each worker starts with the libraries and lazily built tables below already
in memory instead of loading them itself (seconds per worker, all at once, on the machine's cores):

- the OpenAI-compatible client stack (``langchain-openai``, ``openai``, the HTTP transport, which a client
  loads when built), used by every remote backend spec; skipped when not installed;
- the research path's data: the phone-number metadata (``phonenumbers``), the English word frequencies
  (``wordfreq``), the Public Suffix List (``tldextract``) and the legal suffixes of company names
  (``cleanco``), each loaded on first use by ``agents``.

Importing it has no other effect: nothing is read from a store or the network. ``warm()`` does the work
(it is idempotent) and is called on import.
"""

from __future__ import annotations

import logging
import time

__all__ = ["warm"]

logger = logging.getLogger(__name__)


def warm() -> float:
    """Load the libraries and tables listed in the module docstring; return the seconds it took."""
    started = time.perf_counter()
    import graphs.runner  # noqa: F401 - the campaign graph, agents and store
    from agents.attribution import company_core_name, registrable_domain
    from agents.contacts import find_contacts
    from agents.prose import content_stems

    try:
        from langchain_openai import ChatOpenAI
    except ModuleNotFoundError:  # pragma: no cover - the remote client stack is an optional install
        logger.debug("langchain-openai is not installed; remote backends load nothing in advance")
    else:
        # A client loads its HTTP transport's modules when built (no connection is opened).
        ChatOpenAI(model="preload", api_key="not-needed", base_url="http://127.0.0.1:9/v1")  # type: ignore[arg-type]
    from wordfreq import zipf_frequency

    zipf_frequency("company", "en")
    registrable_domain("https://www.example.com/about")
    company_core_name("Example Holdings Inc.")
    find_contacts("Call +1 415 555 0132 or write to team@example.com")
    content_stems("Example builds software.")
    return time.perf_counter() - started


warm()
