"""`kvstore precompute` as a real subprocess, interrupted midway (SIGINT, SIGKILL) and run again.

Each case compares the final store and manifest with those of an uninterrupted run into a fresh store,
and checks from the rerun's JSON summary that it computed exactly the chunks the interrupted run had not
stored. The uninterrupted reference runs in process through the library (same code, same model).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402

from codec import make_codec  # noqa: E402
from connectors.precompute import PrecomputeJob, PrecomputeOptions, read_corpus, read_manifest  # noqa: E402
from connectors.models import load_model  # noqa: E402
from kvstore.tiers import DiskTier, RedisTier  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 128
N_DOCS = 14
KILL_AFTER = 3  # manifest records seen before the signal
WORDS = "the of and river stone tower library festival map city harbor market garden bridge lantern".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(42)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(N_DOCS):
            f.write(json.dumps({"id": f"d{i:02d}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 260)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run into a fresh disk store: (store contents, manifest records, summary)."""
    model, tok = load_model("tiny", torch.float32)
    root = tmp_path_factory.mktemp("reference")
    tier = DiskTier(root / "store", 1 << 30, make_codec("zstd"))
    job = PrecomputeJob(model, tok, tier, PrecomputeOptions(chunk_tokens=CHUNK, namespace="kill"), root / "m.jsonl")
    summary = job.run(read_corpus(corpus))
    assert summary.ok and summary.units_uploaded == N_DOCS
    records = read_manifest(root / "m.jsonl").records
    contents = snapshot(tier, records)
    assert tier.usage().entries == len(contents) == summary.chunks_computed
    tier.close()
    return contents, records, summary


def snapshot(tier, records) -> dict:
    """key -> (token ids, KV bytes) of every chunk the manifest names, read back through the tier."""
    keys = [k for r in records.values() for k in r.keys()]
    out = {}
    for k, c in zip(keys, tier.get(keys)):
        assert c is not None, f"{k} is missing"
        out[k] = (c.tokens.tobytes(), c.kv.contiguous().view(torch.uint8).numpy().tobytes(), c.start_pos)
    return out


def cli(corpus: Path, manifest: Path, summary: Path, *args: str, store: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    sets = ["--set", f"chunk_tokens={CHUNK}", "--set", "namespace=kill"]
    if store is not None:
        sets += ["--set", f"disk.path={store}"]
    cmd = [sys.executable, "-m", "connectors", *sets, "precompute", str(corpus), "--manifest", str(manifest),
           "--summary", str(summary), "--no-progress", "--model", "tiny", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records_in(manifest: Path) -> int:
    try:
        return max(manifest.read_bytes().count(b"\n") - 1, 0)
    except FileNotFoundError:
        return 0


def interrupt_midway(proc: subprocess.Popen, manifest: Path, sig: signal.Signals) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while records_in(manifest) < KILL_AFTER:
        assert proc.poll() is None, f"job ended before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def run_to_end(corpus, manifest, summary, *args, store: Path | None = None) -> dict:
    proc = cli(corpus, manifest, summary, *args, store=store)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    return json.loads(summary.read_text())


def check_rerun(second: dict, present_before: int, reference) -> None:
    contents, records, ref = reference
    total = len(contents)
    assert 0 < present_before < total, "the interruption was not midway"
    assert second["chunks_computed"] == total - present_before  # only what was missing
    assert second["chunks_skipped"] == present_before
    assert second["failed"] == 0 and not second["interrupted"]


def assert_disk_equals_reference(store, manifest, records, contents) -> None:
    """The manifest and the disk store's records are those of the uninterrupted run, and nothing more."""
    tier = DiskTier(store, 1 << 30, make_codec("zstd"))
    assert read_manifest(manifest).records == records
    assert snapshot(tier, records) == contents and tier.usage().entries == len(contents)
    tier.close()


@pytest.mark.slow
def test_sigint_stops_cleanly_and_a_rerun_finishes_the_rest(tmp_path, corpus, reference):
    contents, records, _ = reference
    manifest, store = tmp_path / "m.jsonl", tmp_path / "store"
    proc = cli(corpus, manifest, tmp_path / "s1.json", store=store)
    rc, output = interrupt_midway(proc, manifest, signal.SIGINT)
    assert rc == 130, output
    first = json.loads((tmp_path / "s1.json").read_text())
    assert first["interrupted"] and first["units_uploaded"] < N_DOCS
    # Graceful: whatever was computed was uploaded, verified and recorded before exiting.
    assert first["chunks_uploaded"] == first["chunks_computed"]
    assert len(read_manifest(manifest).records) == first["units_uploaded"]
    tier = DiskTier(store, 1 << 30, make_codec("zstd"))
    present = tier.usage().entries
    tier.close()
    assert present == first["chunks_uploaded"]
    second = run_to_end(corpus, manifest, tmp_path / "s2.json", store=store)
    check_rerun(second, present, reference)
    assert_disk_equals_reference(store, manifest, records, contents)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tmp_path, corpus, reference):
    contents, records, _ = reference
    manifest, store = tmp_path / "m.jsonl", tmp_path / "store"
    proc = cli(corpus, manifest, tmp_path / "s1.json", store=store)
    rc, _ = interrupt_midway(proc, manifest, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    tier = DiskTier(store, 1 << 30, make_codec("zstd"))  # also cleans up temp files of a torn put
    present = sum(tier.contains(list(contents)))
    assert tier.usage().entries == present  # nothing but the expected keys, and no partial records
    tier.close()
    second = run_to_end(corpus, manifest, tmp_path / "s2.json", store=store)
    check_rerun(second, present, reference)
    assert_disk_equals_reference(store, manifest, records, contents)


@pytest.mark.slow
def test_sigkill_midway_into_redis_then_rerun_equals_an_uninterrupted_run(tmp_path, corpus, reference):
    from benchmarks.servers import RedisServer

    contents, records, _ = reference
    manifest = tmp_path / "m.jsonl"
    server = RedisServer(tmp_path / "redis").start()
    try:
        proc = cli(corpus, manifest, tmp_path / "s1.json", "--to", server.url, "--codec", "zstd")
        rc, _ = interrupt_midway(proc, manifest, signal.SIGKILL)
        assert rc == -signal.SIGKILL
        tier = RedisTier(server.url, make_codec("zstd"))
        present = sum(tier.contains(list(contents)))
        second = run_to_end(corpus, manifest, tmp_path / "s2.json", "--to", server.url, "--codec", "zstd")
        check_rerun(second, present, reference)
        assert read_manifest(manifest).records == records
        assert snapshot(tier, records) == contents
        assert redis.Redis.from_url(server.url).dbsize() == len(contents)  # no stray keys
        tier.close()
    finally:
        server.kill()
