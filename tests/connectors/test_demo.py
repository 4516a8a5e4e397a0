"""`kvstore demo`, the README's main job, run for real on a temporary disk tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_stores_evicts_restarts_and_reads_back_identical_kv(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(KVSTORE_DISK_PATH=str(tmp_path), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    first = subprocess.run([sys.executable, "-m", "kvstore", "demo"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "evicted" in out and "written back to disk on eviction" in out
    assert "restarting" in out
    n_tokens = int(out.split("document of ")[1].split(" tokens")[0])
    assert f"lookup: {n_tokens} of {n_tokens} tokens stored" in out
    assert "bit-identical to a fresh prefill" in out and "MISSING" not in out
    # A second run finds everything already stored, from disk, and reads it back the same.
    second = subprocess.run([sys.executable, "-m", "kvstore", "demo"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    n_chunks = int(out.split("tokens = ")[1].split(" chunks")[0])
    assert f"({n_chunks} were already stored from an earlier run)" in second.stdout
    verify = subprocess.run([sys.executable, "-m", "kvstore", "verify"], capture_output=True, text=True, env=env, timeout=120)
    assert verify.returncode == 0 and f"checked {n_chunks} records" in verify.stdout
