#!/usr/bin/env bash
# GPU check of the real-base paths (issue 14 item 7), under 10 minutes on one CUDA GPU:
#   1. trains a LoRA on a Qwen2-0.5B-shaped stand-in (finetune.standins, random weights) on CUDA in bf16
#      with finetune.train.main (one device, the project's defaults), and registers it;
#   2. generates with the writer's answer grammar in-process (miniatures.local.LocalEngine, bf16 on CUDA)
#      and checks every answer follows it (JSON with subject and body, only the task's merge tags);
#   3. if vLLM is installed (`vllm` on PATH or $VLLM), serves the adapter with the command
#      `outreach serve --engine vllm --print` builds, and checks that answers through the project's vllm:
#      backend (which sends the grammar as structured_outputs) follow the grammar.
# It prints one line per step with its time and the device, and exits non-zero when a check fails.
#
# Usage: bash scripts/gpu_check.sh [WORK_DIR]      (env: PYTHON, VLLM, GPU_CHECK_STEPS=40, VLLM_PORT=8011)
# Nothing is downloaded: the base is built from a config, the data is made up here.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d /tmp/gpu-check-XXXXXX)}"
PYTHON="${PYTHON:-$( [ -x .venv-gpu/bin/python ] && echo .venv-gpu/bin/python || echo .venv/bin/python )}"
VLLM="${VLLM:-$(command -v vllm || true)}"
PORT="${VLLM_PORT:-8011}"
STEPS="${GPU_CHECK_STEPS:-40}"
export WORK PORT STEPS VLLM TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"
echo "gpu_check: work dir $WORK, python $PYTHON, vllm ${VLLM:-none}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 420 "$PYTHON" - <<'PY'
import json, os, sys, time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; install a CUDA torch in .venv-gpu "
             "(or set PYTHON) and rerun")
work = Path(os.environ["WORK"])
device = torch.cuda.get_device_name(0)
print(f"device: {device}, torch {torch.__version__}, bf16 supported: {torch.cuda.is_bf16_supported()}")

from core.tasks import MergeTag, OfferBrief, WritingTask
from finetune.config import TrainConfig
from finetune.standins import build_standin
from finetune.train import main as train
from miniatures.grammar import email_grammar
from miniatures.local import LocalEngine
from miniatures.registry import register_miniature
from store import open_store

# 1. LoRA on the 0.5B shape, bf16 on CUDA.
t0 = time.perf_counter()
base = build_standin("qwen2.5", work / "base", shape="qwen2-0.5b")
data = work / "data"
data.mkdir(exist_ok=True)
rows = []
for i in range(64):
    answer = json.dumps({"subject": f"{{{{company}}}} and route {i}",
                         "body": f"Hi {{{{first_name}}}}, carriers like {{{{company}}}} cut empty miles by {i % 9 + 3}%. "
                                 "Open to a 15-minute call next week?"})
    rows.append({"messages": [{"role": "system", "content": "You write short cold emails with merge tags."},
                              {"role": "user", "content": f"Write to the head of operations (request {i})."},
                              {"role": "assistant", "content": answer}]})
(data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
config = TrainConfig(base_model=str(base), dataset_dir=str(data), output_dir=str(work / "run"), method="lora",
                     max_steps=int(os.environ["STEPS"]), logging_steps=10, save_steps=10_000)
result = train(config)
metrics = getattr(result, "metrics", {}) or {}
print(f"step 1 train: {time.perf_counter() - t0:.0f} s, output {result.output_path}, "
      f"metrics {json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))})[:300]}")
store = open_store(f"sqlite:///{work / 'registry.sqlite'}")
record = register_miniature(store, name="writer-gpu", agent="writer", base_model=str(base),
                            adapter_path=str(result.output_path), training_config={"answer_format": "json"},
                            dataset_hash="gpu-check", metrics={})

# 2. In-process generation with the grammar, bf16 on CUDA.
t0 = time.perf_counter()
task = WritingTask(
    offer=OfferBrief(sender_title="Founder", product="RouteWise", value_proposition="cuts empty miles",
                     call_to_action="a 15-minute call next week", opt_out_line="Reply stop to opt out."),
    prospect_title="Head of Operations",
    merge_tags=(MergeTag(name="first_name", description="the prospect's first name"),
                MergeTag(name="company", description="the prospect's company")))
grammar = email_grammar(task)
engine = LocalEngine(str(base), device="cuda", dtype="bfloat16", max_new_tokens=160)
engine.add_adapter("writer-gpu@1", result.output_path)
chat = rows[0]["messages"][:2]
import asyncio
from miniatures.grammar import llg_tokenizer, matcher
llg = llg_tokenizer(engine.tokenizer)

def follows(text: str, finished: bool) -> str | None:
    """None when text is in the grammar's language (a prefix of it when cut by max tokens), else why not."""
    check = matcher(llg, grammar)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if check.validate_tokens(ids) != len(ids):  # llguidance works on bytes: any tokenisation of valid text passes
        return "left the grammar"
    if finished and not check.consume_tokens(ids) or finished and not check.is_accepting():
        return "stopped before the grammar's end"
    return None

async def answer_all():
    return await asyncio.gather(*[engine.generate("writer-gpu@1", chat, grammar=grammar) for _ in range(8)])
answers = asyncio.run(answer_all())
bad = [f"{a.text[:120]!r}: {why}" for a in answers if (why := follows(a.text, a.finish_reason == "stop"))]
complete = sum(a.finish_reason == "stop" for a in answers)
engine.close()
tokens = sum(a.output_tokens for a in answers)
print(f"step 2 grammar in-process: {len(answers) - len(bad)}/{len(answers)} answers follow the grammar "
      f"({complete} complete, the rest cut at 160 tokens), {tokens} tokens in {time.perf_counter() - t0:.1f} s "
      f"(batch of 8, bf16 on {device})")
if bad:
    sys.exit("gpu_check: in-process answers broke the grammar: " + "; ".join(bad[:3]))
PY

if [ -z "$VLLM" ]; then
  echo "step 3 vllm: skipped (vllm is not installed here; pip install '.[vllm]' in its own environment, set VLLM)"
  echo "gpu_check: passed (steps 1-2)"
  exit 0
fi

CMD="$("$PYTHON" -m outreach serve writer-gpu --engine vllm --print --port "$PORT" \
       --store "sqlite:///$WORK/registry.sqlite")"
CMD="${CMD/#vllm /$VLLM }"
echo "step 3 vllm: $CMD --gpu-memory-utilization 0.5"
T0=$(date +%s)
eval "$CMD --gpu-memory-utilization 0.5" > "$WORK/vllm.log" 2>&1 &
VLLM_PID=$!
trap 'kill $VLLM_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $VLLM_PID 2>/dev/null || { tail -20 "$WORK/vllm.log"; echo "gpu_check: vllm exited"; exit 1; }
  sleep 1
done
echo "vllm up in $(( $(date +%s) - T0 )) s"
timeout 120 "$PYTHON" - <<'PY'
import os, sys, time

from core.tasks import MergeTag, OfferBrief, WritingTask
from miniatures.remote import build_remote_chat_model
from miniatures.specs import parse_backend_spec

task = WritingTask(
    offer=OfferBrief(sender_title="Founder", product="RouteWise", value_proposition="cuts empty miles",
                     call_to_action="a 15-minute call next week", opt_out_line="Reply stop to opt out."),
    prospect_title="Head of Operations",
    merge_tags=(MergeTag(name="first_name", description="the prospect's first name"),
                MergeTag(name="company", description="the prospect's company")))
from pathlib import Path
from transformers import AutoTokenizer
from miniatures.grammar import email_grammar, llg_tokenizer, matcher

model = build_remote_chat_model(parse_backend_spec(f"vllm:writer-gpu@http://127.0.0.1:{os.environ['PORT']}/v1"),
                                max_tokens=160)
tokenizer = AutoTokenizer.from_pretrained(Path(os.environ["WORK"]) / "base")
llg, grammar = llg_tokenizer(tokenizer), email_grammar(task)
messages = [("system", "You write short cold emails with merge tags."),
            ("user", "Write to the head of operations (request 0).")]
t0 = time.perf_counter()
bad = []
for _ in range(4):
    reply = model.invoke(messages, task=task)
    text, finished = reply.text, (reply.response_metadata or {}).get("finish_reason") == "stop"
    check = matcher(llg, grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if check.validate_tokens(ids) != len(ids) or finished and not (check.consume_tokens(ids) and check.is_accepting()):
        bad.append(f"{text[:120]!r}")
print(f"step 3 vllm grammar: {4 - len(bad)}/4 answers follow the grammar in {time.perf_counter() - t0:.1f} s")
if bad:
    sys.exit("gpu_check: vLLM answers broke the grammar: " + "; ".join(bad[:3]))
PY
echo "gpu_check: passed (steps 1-3)"
