"""The model fingerprint of the vLLM connector's keys (`connectors.vllm.fingerprint`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import connectors.vllm.fingerprint as fpmod
from connectors.vllm.fingerprint import vllm_fingerprint
from kvstore.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "_name_or_path": "/a",
                                               "transformers_version": "5.0"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(range(16)) * 4096)
    fpmod._MEMO.clear()
    return d


def test_format_and_what_it_covers(folder):
    fp = vllm_fingerprint(folder, kv_dtype="float32")
    assert fp.startswith("llama-float32-vllm-") and len(fp.rsplit("-", 1)[1]) == 16
    assert vllm_fingerprint(folder, kv_dtype="bfloat16") != fp
    assert vllm_fingerprint(folder, kv_dtype="float32", runtime={"quantization": "fp8"}) != fp
    assert vllm_fingerprint(folder, kv_dtype="float32", tp_size=2, tp_rank=1) == fp + "-tp2r1"
    # The name of the folder and the library version do not matter; any weight byte does.
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(_name_or_path="/elsewhere", transformers_version="9.9")
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))
    assert vllm_fingerprint(folder, kv_dtype="float32") == fp
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert vllm_fingerprint(folder, kv_dtype="float32") != fp


def test_large_models_hash_headers_and_samples(folder, monkeypatch):
    monkeypatch.setattr(fpmod, "FULL_HASH_LIMIT", 0)
    fp = vllm_fingerprint(folder, kv_dtype="float32")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1  # inside a sampled block (the first sample of the second half)
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert vllm_fingerprint(folder, kv_dtype="float32") != fp


def test_same_in_another_process(folder):
    here = vllm_fingerprint(folder, kv_dtype="float32", tp_size=2, tp_rank=0)
    code = ("from connectors.vllm.fingerprint import vllm_fingerprint;"
            f"print(vllm_fingerprint({str(folder)!r}, kv_dtype='float32', tp_size=2, tp_rank=0))")
    there = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": ROOT}).stdout.strip()
    assert there == here


def test_clear_errors(tmp_path, folder):
    with pytest.raises(ConfigError, match="config.json"):
        vllm_fingerprint(tmp_path, kv_dtype="float32")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weight files"):
        vllm_fingerprint(folder, kv_dtype="float32")
