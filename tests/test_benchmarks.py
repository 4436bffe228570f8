"""Every script in benchmarks/ runs on its smallest settings (``--smoke``), so none can break silently.

Each runs in its own subprocess (as a user runs it); the test checks the exit status only, never timings.
A script that does not take ``--smoke`` yet is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_runs_with_smoke(script: Path, tmp_path: Path) -> None:
    if "--smoke" not in script.read_text(encoding="utf-8"):
        pytest.skip(f"{script.name} takes no --smoke option yet")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, f"{script.name} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
