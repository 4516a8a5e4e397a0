"""The `kvstore` command line, run as a real subprocess against a real disk tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from codec import make_codec
from kvstore.chunk import Chunk
from kvstore.keys import chunk_refs
from kvstore.tiers import DiskTier

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, disk: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update({"KVSTORE_DISK_PATH": str(disk), "PYTHONPATH": str(ROOT)}, **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, env=env, timeout=120)


def fill(disk: Path, namespace: str, n: int, offset: int = 0) -> list[Chunk]:
    tier = DiskTier(disk, 1 << 30, make_codec("zstd"))
    refs = chunk_refs(np.arange(n * 16) + offset, namespace=namespace, fingerprint="m", chunk_tokens=16)
    chunks = [Chunk.from_ref(r, torch.randn(2, 2, 16, 2, 4).to(torch.float16)) for r in refs]
    assert all(tier.put(chunks))
    tier.close()
    return chunks


def test_stats_reports_usage_and_lifetime_hits(tmp_path):
    chunks = fill(tmp_path, "a", 3)
    tier = DiskTier(tmp_path, 1 << 30, make_codec("raw"))
    assert all(c is not None for c in tier.get([c.key for c in chunks]))
    tier.close()  # saves lifetime counters
    r = run_cli("stats", disk=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "disk" in r.stdout and "3 chunks" in r.stdout
    assert "3 hits" in r.stdout and "hit rate 100.0%" in r.stdout


def test_verify_quarantines_a_corrupted_record_and_fails(tmp_path):
    fill(tmp_path, "a", 4)
    assert run_cli("verify", disk=tmp_path).returncode == 0
    victim = sorted((tmp_path / "records").rglob("*.kvr"))[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40
    victim.write_bytes(data)
    r = run_cli("verify", disk=tmp_path)
    assert r.returncode == 1
    assert "checked 4 records" in r.stdout and "1 bad" in r.stdout and "checksum" in r.stdout
    assert not victim.exists()
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    r = run_cli("verify", disk=tmp_path)  # the bad record is gone from the tier: clean again
    assert r.returncode == 0 and "checked 3 records" in r.stdout


def test_clear_by_namespace_keeps_other_namespaces(tmp_path):
    fill(tmp_path, "a", 3)
    kept = fill(tmp_path, "b", 2, offset=1000)
    r = run_cli("clear", "--namespace", "a", disk=tmp_path)
    assert r.returncode == 0 and "removed 3" in r.stdout
    tier = DiskTier(tmp_path, 1 << 30, make_codec("raw"))
    assert tier.usage().entries == 2
    assert all(c is not None for c in tier.get([c.key for c in kept]))
    tier.close()
    assert "removed 2" in run_cli("clear", disk=tmp_path).stdout


def test_bad_configuration_is_a_clear_error(tmp_path):
    r = run_cli("--set", "disk.codec=nope", "stats", disk=tmp_path)
    assert r.returncode == 2 and "disk.codec" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--set", "memory.capacity=lots", "stats", disk=tmp_path)
    assert r.returncode == 2 and "not a size" in r.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[disk]\npath = 3\nunknown_field = 1\n")
    r = run_cli("--config", str(cfg), "stats", disk=tmp_path)
    assert r.returncode == 2 and "unknown_field" in r.stderr
    r = run_cli("--set", "nonsense", "stats", disk=tmp_path)
    assert r.returncode == 2 and "section.field=value" in r.stderr
