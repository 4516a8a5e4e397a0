"""Configuration: frozen dataclasses, built once at the edge (CLI, TOML file, environment).

Precedence, lowest first: defaults < TOML file < environment (`KVSTORE_<SECTION>_<FIELD>`, e.g.
`KVSTORE_DISK_PATH`, `KVSTORE_MEMORY_CAPACITY`; top-level fields as `KVSTORE_<FIELD>`) < CLI
`--set section.field=value`. The embedded default is a CPU memory tier and a disk tier under the
user's cache directory: no server, no GPU.

File format:
    chunk_tokens = 256
    [memory]
    capacity = "2GiB"
    [disk]
    path = "~/.cache/kvstore"
    capacity = "20GiB"
    codec = "zstd"
    [redis]                     # optional remote tier, last in the order
    url = "redis://127.0.0.1:6379/0"
    [sidecar]                   # optional remote tier: another `kvstore serve` over HTTP, after [redis]
    url = "http://10.0.0.5:8420"
    token = "..."
    [adaptive]                  # optional: store chunks at several codec levels, load adaptively
    levels = ["cachegen:1", "cachegen:2", "zstd"]   # (kvstore.levels; docs/STORE.md)
    [server]                    # `kvstore serve` (see docs/SERVICE.md)
    port = 8420
    tokens_file = "/etc/kvstore/tokens.toml"

Nothing below the edge reads the environment. Each tier section builds and describes its own tier
(`build(section, records)`, `describe()`); `TIER_KINDS` lists the kinds of tier in the store's order, and
`build_store(config)` builds one tier per configured section in that order (`records=True`: the store
of a record server, whose memory holds records rather than decoded KV).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import platformdirs

from kvstore.errors import ConfigError
from kvstore.keys import DEFAULT_NAMESPACE, validate_namespace
from kvstore.levels import AdaptiveConfig, parse_levels

if TYPE_CHECKING:
    from codec import Codec
    from kvstore.store import TieredStore
    from kvstore.tiers import Tier

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(value: int | str) -> int:
    """`"2GiB"`, `"512 MB"`, `1048576` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"size must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a size: {value!r} (use e.g. 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("kvstore"))


class _Encoded:
    """What the sections of byte tiers share: records encoded with `codec` at `codec_level`."""

    __slots__ = ()
    SECTION: ClassVar[str]

    def make_codec(self) -> "Codec":
        """The section's codec at its level; `ConfigError` for a level the codec does not take."""
        from codec import CodecError, make_codec

        try:
            return make_codec(self.codec, self.codec_level)
        except CodecError as e:
            raise ConfigError(f"{self.SECTION}.codec {self.codec!r} at level {self.codec_level}: {e}") from None

    def _check_codec(self) -> None:
        from codec import codec_names

        if self.codec not in codec_names():
            raise ConfigError(f"{self.SECTION}.codec {self.codec!r} is not one of {', '.join(codec_names())}")

    def _codec_text(self) -> str:
        return self.codec + (f" level {self.codec_level}" if self.codec_level is not None else "")


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    capacity: int = 2 << 30
    device: str = "cpu"  # "cpu" (host memory, pinned where CUDA exists) or "cuda[:N]" (GPU tier)

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ConfigError("memory.capacity must be positive (remove the [memory] section to disable)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"memory.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def build(self, section: str, records: bool = False) -> "Tier":
        """Decoded KV on its device, where an engine reads it; records (bytes in host memory) for a record
        server, which has no engine: a GPU tier makes no sense there and is refused."""
        from kvstore.tiers import MemoryTier, RecordMemoryTier

        name = "gpu" if section == "gpu" else ("cpu" if self.device == "cpu" else "device")
        if records:
            if section == "gpu" or self.device != "cpu":
                raise ConfigError(f"[{section}] on {self.device}: a record server holds records in host memory; "
                                  "remove the GPU tier (memory.device must be cpu)")
            return RecordMemoryTier(self.capacity, name=name)
        return MemoryTier(self.capacity, self.device, name=name)

    def describe(self) -> str:
        return f"{self.device} memory {self.capacity / 2**20:.0f} MiB"


@dataclass(frozen=True, slots=True)
class DiskConfig(_Encoded):
    SECTION: ClassVar[str] = "disk"
    path: Path = field(default_factory=default_cache_dir)
    capacity: int = 20 << 30
    codec: str = "zstd"
    codec_level: int | None = None
    # Durability of an acknowledged put: true fsyncs each record and its directory first ("power-loss");
    # false acknowledges once the record is in the page cache ("process-crash") and syncs the filesystem
    # every sync_interval_s in the background (Redis's appendfsync everysec). See docs/SERVICE.md.
    fsync: bool = False
    sync_interval_s: float = 1.0  # 0: leave it to the OS

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ConfigError("disk.capacity must be positive")
        if self.sync_interval_s < 0:
            raise ConfigError("disk.sync_interval_s must be >= 0")
        self._check_codec()

    def build(self, section: str = "disk", records: bool = False) -> "Tier":
        from kvstore.tiers import DiskTier

        return DiskTier(self.path, self.capacity, self.make_codec(), fsync=self.fsync, sync_interval_s=self.sync_interval_s)

    def describe(self) -> str:
        return f"disk {self.path} (codec {self._codec_text()}, puts survive a {'power loss' if self.fsync else 'process crash'})"


@dataclass(frozen=True, slots=True)
class RedisConfig(_Encoded):
    SECTION: ClassVar[str] = "redis"
    url: str = ""  # redis://host:port/db (a cluster: any node's URL with cluster = true)
    cluster: bool = False
    prefix: str = "kvs:"
    ttl_seconds: int = 0  # 0: no expiry (Redis's maxmemory-policy evicts)
    codec: str = "zstd"
    codec_level: int | None = None
    timeout: float = 1.0  # seconds per call before the tier counts as down
    retry_after: float = 2.0  # seconds a down tier answers misses before trying again

    def __post_init__(self) -> None:
        if not re.match(r"^(redis|rediss|unix)://", self.url):
            raise ConfigError(f"redis.url must be a redis:// (or rediss://, unix://) URL, got {self.url!r}")
        if self.timeout <= 0 or self.retry_after < 0 or self.ttl_seconds < 0:
            raise ConfigError("redis.timeout must be > 0, redis.retry_after and redis.ttl_seconds >= 0")
        self._check_codec()

    def build(self, section: str = "redis", records: bool = False) -> "Tier":
        from kvstore.tiers import RedisTier

        return RedisTier(self.url, self.make_codec(), cluster=self.cluster, prefix=self.prefix,
                         ttl_seconds=self.ttl_seconds or None, timeout=self.timeout, retry_after=self.retry_after)

    def describe(self) -> str:
        return f"redis{' cluster' if self.cluster else ''} {self.url} (codec {self._codec_text()})"


@dataclass(frozen=True, slots=True)
class SidecarConfig(_Encoded):
    SECTION: ClassVar[str] = "sidecar"
    url: str = ""  # http(s)://host:port of a `kvstore serve`
    token: str = field(default="", repr=False)  # bearer token; KVSTORE_SIDECAR_TOKEN keeps it out of files
    codec: str = "zstd"  # how puts travel; the sidecar stores them with its own disk codec
    codec_level: int | None = None
    timeout: float = 1.0  # seconds per request before the tier counts as down
    retry_after: float = 2.0  # seconds a down tier answers misses before trying again
    max_batch_keys: int = 256  # keys per request; keep <= the server's max_batch_keys

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise ConfigError(f"sidecar.url must be an http:// or https:// URL, got {self.url!r}")
        if self.timeout <= 0 or self.retry_after < 0 or self.max_batch_keys <= 0:
            raise ConfigError("sidecar.timeout and sidecar.max_batch_keys must be > 0, sidecar.retry_after >= 0")
        self._check_codec()

    def build(self, section: str = "sidecar", records: bool = False) -> "Tier":
        from kvstore.tiers import SidecarTier

        return SidecarTier(self.url, self.token, self.make_codec(), timeout=self.timeout,
                           retry_after=self.retry_after, max_batch_keys=self.max_batch_keys)

    def describe(self) -> str:
        return f"sidecar {self.url} (codec {self._codec_text()})"


TierSection = Union[MemoryConfig, DiskConfig, RedisConfig, SidecarConfig]


@dataclass(frozen=True, slots=True)
class TierKind:
    """One kind of tier the configuration knows: its section, the dataclass that builds and describes
    it, the settings a section must give (with an example), and whether a precompute job may write to it."""

    section: str
    config: type
    defaults: tuple[tuple[str, str], ...] = ()
    required: tuple[str, str] | None = None  # (setting, example value)
    persistent: bool = False


# In the store's order, fastest first: the one list of tier kinds (build_store, precompute targets).
TIER_KINDS: dict[str, TierKind] = {k.section: k for k in (
    TierKind("gpu", MemoryConfig, defaults=(("device", "cuda"),)),
    TierKind("memory", MemoryConfig),
    TierKind("disk", DiskConfig, persistent=True),
    TierKind("redis", RedisConfig, required=("url", "redis://127.0.0.1:6379/0"), persistent=True),
    TierKind("sidecar", SidecarConfig, required=("url", "http://127.0.0.1:8420"), persistent=True),
)}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """`kvstore serve`: where it listens, who may call it, and the bounds on every request."""

    host: str = "127.0.0.1"
    port: int = 8420
    tokens_file: Path | None = None  # TOML or JSON: bearer token -> namespaces (see docs/SERVICE.md)
    max_body_bytes: int = 256 << 20  # one record (in a batch: each record)
    max_kv_bytes: int = 0  # KV a record may decode to; 0: max_body_bytes (no record expands past a raw one)
    max_json_bytes: int = 8 << 20  # one JSON body (keys, lookups); parsed off the event loop
    max_batch_keys: int = 1024  # keys (or records) in one batch request
    request_timeout_s: float = 30.0  # a request still running after this answers 503
    max_connections: int = 1024  # open connections (and never more than half the file descriptors)
    idle_timeout_s: float = 15.0  # a connection with no request in flight (or half a header) is closed after this

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        if min(self.max_body_bytes, self.max_json_bytes, self.max_batch_keys, self.request_timeout_s,
               self.max_connections, self.idle_timeout_s) <= 0 or self.max_kv_bytes < 0:
            raise ConfigError("server.max_body_bytes, max_json_bytes, max_batch_keys, request_timeout_s, "
                              "max_connections and idle_timeout_s must be > 0 (max_kv_bytes >= 0)")

    @property
    def kv_limit(self) -> int:
        """The most KV bytes a record the server takes in may decode to."""
        return self.max_kv_bytes or self.max_body_bytes


@dataclass(frozen=True, slots=True)
class StoreConfig:
    chunk_tokens: int = 256
    namespace: str = DEFAULT_NAMESPACE
    write_through: bool = True
    promote_on_hit: bool = True
    max_pending_bytes: int = 1 << 30
    memory: MemoryConfig | None = field(default_factory=MemoryConfig)
    gpu: MemoryConfig | None = None
    disk: DiskConfig | None = field(default_factory=DiskConfig)
    redis: RedisConfig | None = None
    sidecar: SidecarConfig | None = None
    server: ServerConfig = field(default_factory=ServerConfig)  # used by `kvstore serve` only
    adaptive: AdaptiveConfig | None = None  # copies at several codec levels, loaded adaptively (off: None)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_tokens <= 1 << 16:
            raise ConfigError(f"chunk_tokens must be in [1, 65536], got {self.chunk_tokens}")
        validate_namespace(self.namespace)
        if self.memory is None and self.gpu is None and self.disk is None:
            raise ConfigError("at least one tier must be configured")

    def tier_sections(self) -> list[tuple[str, TierSection]]:
        """(section, its config) of every configured tier, in the store's order."""
        return [(name, getattr(self, name)) for name in TIER_KINDS if getattr(self, name) is not None]


_SECTIONS = {**{name: kind.config for name, kind in TIER_KINDS.items()}, "server": ServerConfig,
             "adaptive": AdaptiveConfig}
_SIZE_FIELDS = {"capacity", "max_pending_bytes", "max_body_bytes", "max_kv_bytes", "max_json_bytes"}
_PATH_FIELDS = {"path", "tokens_file"}


def parse_flag(name: str, value: Any) -> bool:
    """A boolean setting from a bool or its text (1/true/yes/on, 0/false/no/off); `ConfigError` otherwise."""
    if isinstance(value, bool):
        return value
    s = str(value).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _coerce(name: str, value: Any, default: Any) -> Any:
    if name in _SIZE_FIELDS:
        return parse_size(value)
    if name in _PATH_FIELDS:
        if name == "tokens_file" and value in (None, ""):
            return None
        return Path(str(value)).expanduser()
    if name == "levels":
        return parse_levels(value)
    if name == "codec_level":
        if value in (None, "", "none"):
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"codec_level must be an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(default, bool):
        return parse_flag(name, value)
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    return str(value)


def _build(cls, values: Mapping[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(sorted(unknown))}")
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in known.values()}
    kwargs = {k: _coerce(k, v, defaults[k]) for k, v in values.items()}
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None) -> StoreConfig:
    """Defaults < TOML file at `path` (or `$KVSTORE_CONFIG`) < `env` < `overrides` ("section.field")."""
    env = {} if env is None else env
    tree: dict[str, Any] = {}
    path = path or env.get("KVSTORE_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                tree = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            if k not in _SECTIONS:
                raise ConfigError(f"unknown section [{k}] in {path}")
            for kk, vv in v.items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[k] = v
    for k, v in env.items():
        if not k.startswith("KVSTORE_") or k == "KVSTORE_CONFIG":
            continue
        rest = k[len("KVSTORE_"):].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        flat[f"{section}.{rest[len(section) + 1:]}" if section else rest] = v
    for k, v in (overrides or {}).items():
        flat[k] = v
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any] | None] = {}
    for k, v in flat.items():
        if "." in k:
            s, name = k.split(".", 1)
            if s not in _SECTIONS:
                raise ConfigError(f"unknown section {s!r} in setting {k!r}")
            if name == "enabled":
                if not _coerce("enabled", v, True):
                    sections[s] = None
                else:
                    sections.setdefault(s, {})
                continue
            if sections.get(s, {}) is None:
                continue
            sections.setdefault(s, {})[name] = v
        elif k in _SECTIONS:  # e.g. `memory = 5` or KVSTORE_MEMORY=5: would become a non-config tier value
            raise ConfigError(f"{k!r} is a section: set {k}.<field>, or {k}.enabled = false to remove it")
        else:
            top[k] = v
    defaults = StoreConfig()
    for s, values in sections.items():
        if values is None and s == "server":
            raise ConfigError("[server] cannot be disabled (it only applies to `kvstore serve`)")
        kind = TIER_KINDS.get(s)
        if values is None:
            top[s] = None
        elif kind is None:
            top[s] = _build(_SECTIONS[s], values, f"[{s}]")
        else:
            if kind.required is not None and kind.required[0] not in values:
                raise ConfigError(f"[{s}] needs a {kind.required[0]} (e.g. {kind.required[1]})")
            top[s] = _build(kind.config, {**dict(kind.defaults), **values}, f"[{s}]")
    known = {f.name for f in dataclasses.fields(StoreConfig)}
    unknown = set(top) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    kwargs = {k: (v if k in _SECTIONS else _coerce(k, v, getattr(defaults, k))) for k, v in top.items()}
    return StoreConfig(**kwargs)


def build_store(config: StoreConfig, *, records: bool = False) -> "TieredStore":
    """The `TieredStore` a config describes: one tier per configured section, in `TIER_KINDS` order.
    `records`: the store of a record server (`kvstore serve`): memory holds records, not decoded KV."""
    from kvstore.adaptive import AdaptiveLoading
    from kvstore.store import TieredStore

    tiers = [section.build(name, records) for name, section in config.tier_sections()]
    adaptive = AdaptiveLoading.for_tiers(config.adaptive, tiers) if config.adaptive and not records else None
    return TieredStore(
        tiers,
        chunk_tokens=config.chunk_tokens,
        write_through=config.write_through,
        promote_on_hit=config.promote_on_hit,
        max_pending_bytes=config.max_pending_bytes,
        adaptive=adaptive,
    )
