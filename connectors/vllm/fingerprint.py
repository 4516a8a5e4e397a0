"""The model fingerprint of the chunk keys the vLLM connector reads and writes.

vLLM's scheduler process holds no model, so the fingerprint comes from the model folder and the engine
settings, never from a module: `vllm_fingerprint(folder, kv_dtype=..)` ->
`<model_type>-<kv dtype>-vllm-<16 hex>[-tp<size>r<rank>]`.

The digest covers:
- `config.json`, parsed and re-serialized with sorted keys, without the fields that name a file or a
  library version (`_name_or_path`, `transformers_version`, `_commit_hash`);
- the weights: xxh3-128 of every byte of every weight file when they total <= `FULL_HASH_LIMIT`
  (4 GiB), else of each file's size, its safetensors header and `SAMPLES` evenly spaced 1 MiB blocks;
- the KV dtype vLLM runs in and the runtime settings that change the KV (`quantization`,
  `hf_overrides`), and the engine name: KV of transformers or of another model, dtype or checkpoint
  never matches.
Tensor-parallel ranks hold different KV heads, so with `tp_size > 1` the rank and size are appended.
Deterministic across processes (the scheduler and every worker compute the same string: tested), and
memoized per process on the folder's file names, sizes and mtimes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash

from kvstore.errors import ConfigError

FULL_HASH_LIMIT = 4 << 30
SAMPLES = 64
_BLOCK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DROPPED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")
_MEMO: dict[tuple, str] = {}


def weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise ConfigError(f"no weight files (*.safetensors, *.bin, ...) in {folder}: cannot fingerprint the model; "
                          f"set kv_connector_extra_config.fingerprint to name it yourself")
    return files


def _hash_file(h, path: Path, size: int, full: bool) -> None:
    h.update(path.name.encode() + b"\0" + size.to_bytes(8, "little"))
    with open(path, "rb", buffering=0) as f:
        if full:
            buf = bytearray(16 << 20)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
            return
        if path.suffix == ".safetensors":
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(min(n, 100 << 20)))
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            h.update(f.read(_BLOCK))


def _config_bytes(folder: Path) -> tuple[bytes, str]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {folder / 'config.json'} to fingerprint the model: {e}") from None
    for k in _DROPPED_CONFIG_KEYS:
        config.pop(k, None)
    model_type = str(config.get("model_type") or "model")
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode(), model_type


def vllm_fingerprint(folder: str | os.PathLike, *, kv_dtype: str, tp_size: int = 1, tp_rank: int = 0,
                     runtime: dict[str, Any] | None = None) -> str:
    """The fingerprint of the KV that vLLM computes for the model in `folder` (see the module doc)."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a model folder (no config.json): set kv_connector_extra_config."
                          f"fingerprint to name the model yourself")
    files = weight_files(folder)
    stats = [(p.name, *(lambda s: (s.st_size, s.st_mtime_ns))(p.stat())) for p in files]
    runtime_bytes = json.dumps(runtime or {}, sort_keys=True, default=str).encode()
    memo_key = (str(folder.resolve()), tuple(stats), kv_dtype, runtime_bytes)
    digest = _MEMO.get(memo_key)
    if digest is None:
        config, model_type = _config_bytes(folder)
        h = xxhash.xxh3_128()
        for part in (b"kvstore-vllm-fingerprint-v1", config, kv_dtype.encode(), runtime_bytes):
            h.update(len(part).to_bytes(8, "little") + part)
        full = sum(s[1] for s in stats) <= FULL_HASH_LIMIT
        for path, (_, size, _) in zip(files, stats):
            _hash_file(h, path, size, full)
        digest = f"{_safe(model_type)}-{_safe(kv_dtype)}-vllm-{h.hexdigest()[:16]}"
        _MEMO[memo_key] = digest
    if tp_size > 1:
        return f"{digest}-tp{tp_size}r{tp_rank}"
    return digest


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in s)[:48]
