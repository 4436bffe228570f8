"""Traces as OpenAI chat fine-tuning examples (the JSONL format TRL and OpenAI fine-tuning read:
one ``{"messages": [...]}`` object per line, the last message the assistant's answer)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import IO, Any

from store.models import Trace

__all__ = ["trace_to_openai_example", "write_openai_jsonl"]


def trace_to_openai_example(trace: Trace, *, output: str | None = None) -> dict[str, Any]:
    """``{"messages": prompt + [{"role": "assistant", "content": output}]}``; ``output`` replaces the
    recorded answer (a reviewer's edit), else the trace's own output is used."""
    messages = [dict(m) for m in trace.messages]
    messages.append({"role": "assistant", "content": trace.output if output is None else output})
    return {"messages": messages}


def write_openai_jsonl(traces: Iterable[Trace], out: IO[str]) -> int:
    """Write one example per trace that has no error; returns the number written."""
    n = 0
    for trace in traces:
        if trace.error:
            continue
        out.write(json.dumps(trace_to_openai_example(trace), ensure_ascii=False) + "\n")
        n += 1
    return n
