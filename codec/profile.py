"""Profiling a `cachegen` codebook from sample KV: `profile_kv(fingerprint, chunks)`.

Each sample chunk's KV is quantized at every cachegen level and its symbols counted; the counts become
one frequency table per (layer, K/V, channel) and level (`codebook.profile_codebook`). Where the sample
KV comes from is not this package's business: `python -m connectors.profile` prefills texts with a
transformers model and hands its chunks here.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from codec.base import CodecError
from codec.cachegen_quant import LEVELS, count_symbols
from codec.codebook import Codebook, profile_codebook


def profile_kv(fingerprint: str, chunks: Iterable[torch.Tensor]) -> Codebook:
    """Sample chunks' KV, each [L, 2, T, H, D] on the CPU -> the codebook of the model `fingerprint`
    names, with tables for every level. `CodecError` when there is no chunk."""
    counts: dict[int, np.ndarray | None] = {lv: None for lv in LEVELS}
    shape = None
    for kv in chunks:
        for lv, spec in LEVELS.items():
            counts[lv] = count_symbols(kv, spec, counts[lv])
        shape = tuple(kv.shape)
    if shape is None:
        raise CodecError("no sample chunk: nothing to profile")
    return profile_codebook(fingerprint, counts, shape[0], shape[3] * shape[4])
