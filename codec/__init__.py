"""KV compression: the `Codec` contract, its registry, and the codecs registered in it."""

from codec.base import Codec, CodecError, codec_class, codec_from_params, codec_names, register
from codec import lossless as _lossless  # noqa: F401  (registers raw and zstd)


def make_codec(name: str, level: int | None = None) -> Codec:
    """A codec by registry name, at `level` where the codec has levels (zstd: its compression level)."""
    cls = codec_class(name)
    if level is None:
        return cls()
    if name == "zstd":
        return cls(level=level)
    raise CodecError(f"codec {name!r} takes no level")


__all__ = ["Codec", "CodecError", "codec_class", "codec_from_params", "codec_names", "make_codec", "register"]
