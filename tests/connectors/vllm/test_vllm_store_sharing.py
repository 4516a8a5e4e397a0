"""The store as vLLM's processes share it: a disk tier sees records that another process wrote after it
started (the scheduler looks up what its worker saves), and the connector's stores and configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from codec import make_codec
from connectors.vllm.config import connector_config, lookup_store, worker_store
from kvstore.chunk import Chunk
from kvstore.errors import ConfigError
from kvstore.keys import chunk_refs
from kvstore.tiers import DiskTier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _chunks(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    refs = chunk_refs(list(range(seed, seed + 16 * n)), namespace="ns", fingerprint="m", chunk_tokens=16)
    return [Chunk.from_ref(r, torch.randn(2, 2, 16, 2, 4, generator=g)) for r in refs]


def test_disk_tier_sees_records_written_by_another_process(tmp_path):
    reader = DiskTier(tmp_path, 1 << 30, make_codec("raw"))  # indexed before the writer writes
    chunks = _chunks()
    keys = [c.key for c in chunks]
    assert reader.contains(keys) == [False, False]
    code = textwrap.dedent(f"""
        import torch
        from codec import make_codec
        from kvstore.chunk import Chunk
        from kvstore.keys import chunk_refs
        from kvstore.tiers import DiskTier
        g = torch.Generator().manual_seed(0)
        refs = chunk_refs(list(range(0, 32)), namespace="ns", fingerprint="m", chunk_tokens=16)
        DiskTier({str(tmp_path)!r}, 1 << 30, make_codec("raw")).put(
            [Chunk.from_ref(refs[0], torch.randn(2, 2, 16, 2, 4, generator=g))])
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert reader.contains(keys) == [True, False]
    got = reader.get(keys)
    assert got[1] is None and torch.equal(got[0].kv, chunks[0].kv)
    # A key deleted here while a reader holds it is not brought back from its file.
    other = DiskTier(tmp_path, 1 << 30, make_codec("raw"))
    other.pin([keys[0]])
    other.delete([keys[0]])
    assert other.contains([keys[0]]) == [False]
    reader.close(), other.close()


def test_adopted_records_do_not_trigger_eviction(tmp_path):
    small = DiskTier(tmp_path, 1, make_codec("raw"))  # capacity below any record
    DiskTier(tmp_path, 1 << 30, make_codec("raw")).put(_chunks(3))
    keys = [c.key for c in _chunks(3)]
    assert small.contains(keys) == [True] * 3  # indexed, nothing deleted: a reader never evicts a writer's files
    assert DiskTier(tmp_path, 1 << 30, make_codec("raw")).contains(keys) == [True] * 3


def test_connector_config_and_stores(tmp_path):
    cfg = connector_config({"set": {"disk.path": str(tmp_path), "memory.capacity": "64MiB", "chunk_tokens": 512},
                            "namespace": "tenant", "save": "false"}, env={})
    assert cfg.namespace == "tenant" and cfg.chunk_tokens == 512 and cfg.save is False and cfg.load is True
    worker, lookup = worker_store(cfg), lookup_store(cfg)
    assert [t.name for t in worker.tiers] == ["cpu", "disk"]
    assert [t.name for t in lookup.tiers] == ["cpu", "disk"] and lookup.tiers[0].arena.capacity <= 1 << 16
    chunks = _chunks()
    worker.put(chunks)
    worker.flush()
    refs = chunk_refs(list(range(32)), namespace="ns", fingerprint="m", chunk_tokens=16)
    assert lookup.lookup_refs(refs) == 2  # what the worker wrote through, the scheduler's store finds
    worker.close(), lookup.close()


def test_connector_config_refuses_what_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="persistent tier"):
        connector_config({"set": {"disk.enabled": "false"}}, env={})
    with pytest.raises(ConfigError, match="write_through"):
        connector_config({"set": {"disk.path": str(tmp_path), "write_through": "false"}}, env={})
    with pytest.raises(ConfigError, match="unknown kv_connector_extra_config key"):
        connector_config({"sett": {}}, env={})
    cfg = connector_config({"set": {"disk.path": str(tmp_path), "chunk_tokens": 200}}, env={})
    with pytest.raises(ConfigError, match=r"chunk_tokens \(200\).*block size \(128\)"):
        cfg.check_block_size(128)
    cfg.check_block_size(100)


def test_store_settings_come_from_file_environment_and_set(tmp_path):
    toml = tmp_path / "kv.toml"
    toml.write_text(f'chunk_tokens = 512\n[disk]\npath = "{tmp_path / "a"}"\n[redis]\nurl = "redis://127.0.0.1:1/0"\n')
    cfg = connector_config({"config": str(toml), "set": {"redis.timeout": 0.25}}, env={"KVSTORE_MEMORY_CAPACITY": "1GiB"})
    assert cfg.chunk_tokens == 512 and cfg.store.disk.path == tmp_path / "a" and cfg.store.memory.capacity == 1 << 30
    assert cfg.store.redis.timeout == 0.25
    env_cfg = connector_config(None, env={"KVSTORE_CONFIG": str(toml)})
    assert env_cfg.store.redis.url == "redis://127.0.0.1:1/0"
