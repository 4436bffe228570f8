"""kill -9 in the middle of a campaign, then run it again: nothing lost, nothing duplicated."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from evals.world import generate_world


def _count_done(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("select count(*) from runs where status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_minus_nine_then_resume(tmp_path):
    world = tmp_path / "world"
    generate_world(world, n_companies=120, seed=5, heldout_fraction=0.0)
    db = tmp_path / "store.sqlite"
    common = ["--store", f"sqlite:///{db}", "--corpus", str(tmp_path / "corpus.sqlite")]
    env = {**os.environ, "OUTREACH_CONFIG": str(tmp_path / "none.toml")}
    cli = [sys.executable, "-m", "outreach"]
    subprocess.run([*cli, "world", "generate", "--out", str(world), "--companies", "120", "--seed", "5",
                    "--heldout", "0", *common[2:]], check=True, env=env, capture_output=True, timeout=120)
    run = [*cli, "run", str(world / "prospects_train.csv"), "--offer", str(world / "offer.toml"),
           "--campaign", "k", "--concurrency", "2", *common]
    proc = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count_done(db) < 15 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = _count_done(db)
    assert 15 <= done_at_kill < 120, f"the kill should land mid-campaign (done={done_at_kill})"

    finished = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]

    with sqlite3.connect(db) as conn:
        statuses = Counter(s for (s,) in conn.execute("select status from runs"))
        assert statuses == {"done": 120}
        emails_per_run = Counter(r for (r,) in conn.execute("select run_id from emails"))
        assert len(emails_per_run) == 120 and set(emails_per_run.values()) == {1}
        traces = Counter((r, a) for r, a in conn.execute("select run_id, agent from traces"))
        assert all(run_id is not None for run_id, _ in traces)
        assert len(traces) == 240 and set(traces.values()) == {1}  # one researcher + one writer call per run
        assert conn.execute("select count(*) from prospects").fetchone()[0] == 120
