"""Layer 1: backend specs -> langchain-core chat models (OpenAI-compatible, Ollama, vLLM, local miniatures)."""

from miniatures.pricing import DEFAULT_PRICES, Price, call_cost_usd, price_for
from miniatures.remote import OLLAMA_DEFAULT_URL, build_remote_chat_model
from miniatures.specs import BACKEND_KINDS, BackendSpec, BackendSpecError, parse_backend_spec

__all__ = [
    "BACKEND_KINDS",
    "DEFAULT_PRICES",
    "OLLAMA_DEFAULT_URL",
    "BackendSpec",
    "BackendSpecError",
    "Price",
    "build_remote_chat_model",
    "call_cost_usd",
    "parse_backend_spec",
    "price_for",
]
