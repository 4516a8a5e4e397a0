"""`kvstore demo`, the README's main job, run for real on the tiny model (`--model tiny`, CPU memory + a temporary
disk tier); test_smollm2.py checks the same connector paths on SmolLM2, the demo's default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_answers_identically_reusing_memory_and_disk(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(KVSTORE_DISK_PATH=str(tmp_path), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for run in range(2):  # the second run starts cold too: the demo clears its namespace
        res = subprocess.run([sys.executable, "-m", "connectors", "demo", "--model", "tiny"], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout
        assert "model: tiny-llama" in out
        assert "1. Questions over one document" in out and "2. A chat over other passages" in out
        rows = re.findall(r"^\s+(\d+)\s+(.+?)\s+(\d+)\s+(\d+(?: \([a-z+]+\))?)\s+([\d.]+)ms\s+([\d.]+)ms\s+(yes|NO)$", out, re.M)
        assert len(rows) == 8, out
        assert len(re.findall(r"^      -> \S", out, re.M)) == 8, out  # each answer on its own line
        assert all(r[-1] == "yes" for r in rows)
        reused = [r[3] for r in rows]
        assert reused[0] == "0" and reused[1].endswith("(disk)") and reused[2].endswith("(cpu)")
        assert reused[4] == "0" and all(r.endswith("(cpu)") for r in reused[5:])
        assert "8 of 8 answers token-identical to plain generation" in out
    verify = subprocess.run([sys.executable, "-m", "kvstore", "verify"], capture_output=True, text=True, env=env, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
