"""The connector's configuration: `kv_connector_extra_config` -> `ConnectorConfig`, and the stores it builds.

Every store setting has one home, the store's own configuration (docs/STORE.md: TOML file, `KVSTORE_*`
environment variables, `section.field` overrides); the extra config only points at it and adds the
connector's few keys (docs/VLLM.md has the table):

    {"config": "/etc/kvstore.toml",                 # TOML file (default: $KVSTORE_CONFIG, else none)
     "set": {"disk.path": "/data/kv", "memory.capacity": "4GiB"},   # overrides, highest precedence
     "namespace": "default",                        # shortcut for set.namespace
     "fingerprint": null,                           # name the model yourself (default: derived, see fingerprint.py)
     "load": true, "save": true,                    # read-only / write-only
     "max_pending_save_bytes": "1GiB"}              # saves queued beyond this are dropped (a future miss)

Stores:
- `worker_store(cfg)`: the configured store (memory read cache, then disk / Redis / sidecar), in each worker;
- `lookup_store(cfg)`: the same persistent tiers only, in the scheduler, which cannot see the worker's
  memory: what the scheduler counts as stored is what any process can load.
A configuration without a persistent tier, or with `write_through = false`, is refused: the scheduler
would never see what the workers save. A slow Redis or sidecar costs at most its `timeout` per call (1 s
by default), then misses for `retry_after` seconds: the engine recomputes instead of waiting.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from kvstore.config import MemoryConfig, StoreConfig, build_store, load_config, parse_flag, parse_size
from kvstore.errors import ConfigError
from kvstore.store import TieredStore

_KEYS = ("config", "set", "namespace", "fingerprint", "load", "save", "max_pending_save_bytes")
_LOOKUP_MEMORY = 64 << 10  # build_store wants a first tier; the scheduler's stays empty


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    store: StoreConfig
    fingerprint: str | None = None  # None: derived from the model folder (fingerprint.vllm_fingerprint)
    load: bool = True
    save: bool = True
    max_pending_save_bytes: int = 1 << 30

    @property
    def namespace(self) -> str:
        return self.store.namespace

    @property
    def chunk_tokens(self) -> int:
        return self.store.chunk_tokens

    def check_block_size(self, block_size: int) -> None:
        """Chunks must cover whole vLLM blocks: loads and saves move whole pages."""
        if block_size <= 0 or self.chunk_tokens % block_size:
            raise ConfigError(
                f"kvstore chunk_tokens ({self.chunk_tokens}) must be a multiple of vLLM's block size ({block_size}): "
                f"set chunk_tokens to a multiple of {block_size} (e.g. kv_connector_extra_config "
                f'{{"set": {{"chunk_tokens": {max(block_size, block_size * (256 // block_size or 1))}}}}}) '
                f"or start vLLM with --block-size dividing {self.chunk_tokens}")


def connector_config(extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> ConnectorConfig:
    """Parse `kv_connector_extra_config` (and the environment, `env`, default `os.environ`)."""
    extra = dict(extra or {})
    env = dict(os.environ if env is None else env)
    unknown = set(extra) - set(_KEYS)
    if unknown:
        raise ConfigError(f"unknown kv_connector_extra_config key(s): {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(_KEYS)}; store settings go under \"set\", see docs/VLLM.md)")
    overrides = extra.get("set") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError('kv_connector_extra_config.set must be an object of "section.field": value')
    overrides = {str(k): (str(v).lower() if isinstance(v, bool) else v) for k, v in overrides.items()}
    if extra.get("namespace") is not None:
        overrides["namespace"] = str(extra["namespace"])
    store = load_config(extra.get("config") or env.get("KVSTORE_CONFIG"), env, overrides)
    fingerprint = extra.get("fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
        raise ConfigError("kv_connector_extra_config.fingerprint must be a non-empty string")
    load, save = (parse_flag(f"kv_connector_extra_config.{k}", extra.get(k, True)) for k in ("load", "save"))
    cfg = ConnectorConfig(store, fingerprint, load, save, parse_size(extra.get("max_pending_save_bytes", 1 << 30)))
    check_persistent(cfg.store)
    return cfg


def check_persistent(store: StoreConfig) -> None:
    if store.disk is None and store.redis is None and store.sidecar is None:
        raise ConfigError("the vLLM connector needs a persistent tier (disk, redis or sidecar): vLLM's scheduler "
                          "process cannot see the worker's memory tier, so it looks chunks up there")
    if not store.write_through:
        raise ConfigError("the vLLM connector needs write_through = true: the scheduler finds saved chunks in the "
                          "persistent tiers, which only write-through fills")


def worker_store(cfg: ConnectorConfig) -> TieredStore:
    return build_store(cfg.store)


def lookup_store(cfg: ConnectorConfig) -> TieredStore:
    """The persistent tiers, behind an empty first tier that is never written (no puts, no promotions)."""
    store = dataclasses.replace(cfg.store, memory=MemoryConfig(capacity=_LOOKUP_MEMORY), gpu=None,
                                promote_on_hit=False)
    return build_store(store)
