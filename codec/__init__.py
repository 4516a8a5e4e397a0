"""KV compression: the `Codec` contract, its registry, and the codecs registered in it.

Registered: `raw`, `zstd` (lossless), `int8`, `kivi2`, `kivi4` (baselines), `cachegen` (levels 1-4).
"""

from codec.base import Codec, CodecError, codec_class, codec_from_params, codec_names, register
from codec import lossless as _lossless  # noqa: F401  (registers raw and zstd)
from codec import quant as _quant  # noqa: F401  (registers int8, kivi2, kivi4)
from codec import cachegen as _cachegen  # noqa: F401  (registers cachegen)


def make_codec(name: str, level: int | None = None) -> Codec:
    """A codec by registry name, at `level` where the codec has levels (zstd: its compression level;
    cachegen: 1 smallest .. 4 most faithful, default 2); `CodecError` for a codec without levels."""
    cls = codec_class(name)
    return cls() if level is None else cls.at_level(level)


__all__ = ["Codec", "CodecError", "codec_class", "codec_from_params", "codec_names", "make_codec", "register"]
