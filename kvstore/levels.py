"""Codec levels for adaptive loading: which copies of a chunk are stored, and which a load may use.

A *level* is an opaque name of the codec registry: `"<codec>"` or `"<codec>:<level>"` (`"zstd"`,
`"cachegen:2"`, `"int8"`); `make_level_codec` builds it, nothing here knows what a codec does.

Where a level copy lives (the decision): each copy is its own record under `kvstore.keys.level_key(key,
level)`, a key derived from the chunk's content key and the level's name. So a copy is found from the
content key alone (no index, no second lookup), every byte tier (disk, Redis, the sidecar) stores it with
no change to its format, and the plain content key keeps meaning what it meant before: the tier's own
copy, which the ordinary load path reads. The level is also in the record's codec name and params (the
record decodes with the codec it was written with); the key only makes it findable.

`AdaptiveConfig` is the `[adaptive]` section of the store's configuration (absent: the feature is off):

    [adaptive]
    levels = ["cachegen:1", "cachegen:2", "zstd"]  # stored copies, listed from least to most faithful
    floor = "cachegen:2"      # least faithful level a load may use; "lossless": lossless codecs only
    tier = "disk"             # the byte tier holding the copies (default: the slowest configured one)
    recompute = true          # the planner may recompute chunks from their tokens
    replan_threshold = 0.25   # re-plan when a chunk's measured bandwidth differs from the plan's by this
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvstore.errors import ConfigError

LOSSLESS_FLOOR = "lossless"


def split_level(level: str) -> tuple[str, int | None]:
    """`"cachegen:2"` -> ("cachegen", 2); `"zstd"` -> ("zstd", None); `ConfigError` for anything else."""
    name, sep, num = str(level).partition(":")
    if not name or (sep and not num.lstrip("-").isdigit()):
        raise ConfigError(f"adaptive level {level!r} must be <codec> or <codec>:<integer level>")
    return name, int(num) if sep else None


def make_level_codec(level: str):
    """The registry's codec for `level`; `ConfigError` for a codec or level the registry does not have."""
    from codec import CodecError, codec_names, make_codec

    name, num = split_level(level)
    if name not in codec_names():
        raise ConfigError(f"adaptive level {level!r}: codec {name!r} is not one of {', '.join(codec_names())}")
    try:
        return make_codec(name, num)
    except CodecError as e:
        raise ConfigError(f"adaptive level {level!r}: {e}") from None


def parse_levels(value: Any) -> tuple[str, ...]:
    """A TOML list, or text of comma-separated names (environment, `--set`) -> level names."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"adaptive.levels must be a list of codec levels, got {value!r}")
    return tuple(str(i).strip() for i in items if str(i).strip())


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    SECTION: ClassVar[str] = "adaptive"
    levels: tuple[str, ...] = ()  # least faithful first
    floor: str = ""  # "": the first level; a level of `levels`; or "lossless"
    tier: str = ""  # "": the slowest byte tier of the store
    recompute: bool = True
    replan_threshold: float = 0.25

    def __post_init__(self) -> None:
        if not self.levels:
            raise ConfigError("adaptive.levels must name at least one codec level (e.g. [\"cachegen:2\", \"zstd\"])")
        if len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"adaptive.levels lists a level twice: {list(self.levels)}")
        codecs = [make_level_codec(level) for level in self.levels]
        if self.floor and self.floor != LOSSLESS_FLOOR and self.floor not in self.levels:
            raise ConfigError(f"adaptive.floor {self.floor!r} must be one of adaptive.levels {list(self.levels)} "
                              f"or {LOSSLESS_FLOOR!r}")
        if self.floor == LOSSLESS_FLOOR and not any(c.lossless for c in codecs):
            raise ConfigError("adaptive.floor is 'lossless' but no level of adaptive.levels is a lossless codec")
        if not self.replan_threshold > 0:
            raise ConfigError(f"adaptive.replan_threshold must be > 0, got {self.replan_threshold}")

    @property
    def allowed(self) -> tuple[str, ...]:
        """The levels a load may use: the floor and the levels listed after it (or the lossless ones)."""
        if self.floor == LOSSLESS_FLOOR:
            return tuple(level for level in self.levels if make_level_codec(level).lossless)
        return self.levels[self.levels.index(self.floor):] if self.floor else self.levels

    def describe(self) -> str:
        return (f"adaptive loading over {', '.join(self.levels)} (floor {self.floor or self.levels[0]}, "
                f"recompute {'on' if self.recompute else 'off'})")
