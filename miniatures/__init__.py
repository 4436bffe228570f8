"""Layer 1: backend specs -> langchain-core chat models (OpenAI-compatible, Ollama, vLLM, local miniatures),
and the answer grammars every engine enforces."""

from typing import TYPE_CHECKING

from miniatures.pricing import DEFAULT_PRICES, Price, call_cost_usd, price_for
from miniatures.remote import OLLAMA_DEFAULT_URL, build_remote_chat_model
from miniatures.specs import BACKEND_KINDS, BackendSpec, BackendSpecError, parse_backend_spec

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from miniatures.grammar import GrammarError, GrammarLogitsProcessor, answer_grammar, json_schema, tag_grammar
    from miniatures.local import (
        BASE_ADAPTER,
        AdapterPathError,
        Generation,
        LocalEngine,
        LocalMiniatureChatModel,
        build_miniature_chat_model,
        repair_json,
    )
    from miniatures.registry import (
        MINIATURE_METHODS,
        MiniatureInUseError,
        MiniatureNotFoundError,
        get_miniature,
        lineage,
        list_miniatures,
        register_miniature,
        remove_miniature,
    )
    from miniatures.server import (
        InsecureBindError,
        RunningServer,
        ServedModel,
        check_bind,
        create_app,
        load_served_models,
        run_server,
        select_records,
        serve_in_thread,
    )
    from miniatures.vllm_cmd import (
        VLLM_LORA_RANKS,
        VllmCommand,
        VllmCommandError,
        adapter_rank,
        build_vllm_commands,
        vllm_lora_rank,
    )

# Loaded on first use (PEP 562) so that importing the package stays cheap for the CLI's start-up:
# miniatures.local pulls in langchain-core, miniatures.registry the store.
_LAZY = {
    "GrammarError": "miniatures.grammar",
    "GrammarLogitsProcessor": "miniatures.grammar",
    "answer_grammar": "miniatures.grammar",
    "json_schema": "miniatures.grammar",
    "tag_grammar": "miniatures.grammar",
    "BASE_ADAPTER": "miniatures.local",
    "AdapterPathError": "miniatures.local",
    "Generation": "miniatures.local",
    "LocalEngine": "miniatures.local",
    "LocalMiniatureChatModel": "miniatures.local",
    "build_miniature_chat_model": "miniatures.local",
    "repair_json": "miniatures.local",
    "MINIATURE_METHODS": "miniatures.registry",
    "MiniatureInUseError": "miniatures.registry",
    "MiniatureNotFoundError": "miniatures.registry",
    "get_miniature": "miniatures.registry",
    "lineage": "miniatures.registry",
    "list_miniatures": "miniatures.registry",
    "register_miniature": "miniatures.registry",
    "remove_miniature": "miniatures.registry",
    "InsecureBindError": "miniatures.server",
    "RunningServer": "miniatures.server",
    "ServedModel": "miniatures.server",
    "check_bind": "miniatures.server",
    "create_app": "miniatures.server",
    "load_served_models": "miniatures.server",
    "run_server": "miniatures.server",
    "select_records": "miniatures.server",
    "serve_in_thread": "miniatures.server",
    "VLLM_LORA_RANKS": "miniatures.vllm_cmd",
    "VllmCommand": "miniatures.vllm_cmd",
    "VllmCommandError": "miniatures.vllm_cmd",
    "adapter_rank": "miniatures.vllm_cmd",
    "build_vllm_commands": "miniatures.vllm_cmd",
    "vllm_lora_rank": "miniatures.vllm_cmd",
}


def __getattr__(name: str) -> object:
    """Import the lazily exported names of ``miniatures.local`` and ``miniatures.registry`` on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'miniatures' has no attribute {name!r}")

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
    "GrammarError",
    "GrammarLogitsProcessor",
    "answer_grammar",
    "json_schema",
    "tag_grammar",
    "BASE_ADAPTER",
    "AdapterPathError",
    "Generation",
    "LocalEngine",
    "LocalMiniatureChatModel",
    "build_miniature_chat_model",
    "repair_json",
    "MINIATURE_METHODS",
    "MiniatureInUseError",
    "MiniatureNotFoundError",
    "get_miniature",
    "lineage",
    "list_miniatures",
    "register_miniature",
    "remove_miniature",
    "InsecureBindError",
    "RunningServer",
    "ServedModel",
    "check_bind",
    "create_app",
    "load_served_models",
    "run_server",
    "select_records",
    "serve_in_thread",
    "VLLM_LORA_RANKS",
    "VllmCommand",
    "VllmCommandError",
    "adapter_rank",
    "build_vllm_commands",
    "vllm_lora_rank",
]
