"""Profiling a `cachegen` codebook from sample KV: `profile_kv(fingerprint, chunks)`.

Each sample chunk's KV is quantized at every cachegen level and its symbols counted; the counts become
one frequency table per (layer, K/V, channel) and level (`codebook.profile_codebook`). Given the model's
sensitivity per (layer, K/V, channel), each level's steps come from it (`sensitivity_steps`) and are
stored in the codebook. Where the sample
KV comes from is not this package's business: `python -m connectors.profile` prefills texts with a
transformers model and hands its chunks here.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from codec.base import CodecError
from codec.cachegen_quant import LEVELS, _bf16_to_f32, _bf16_up
from codec.cachegen_quant import count_symbols, sensitivity_steps
from codec.codebook import Codebook, profile_codebook


def profile_kv(fingerprint: str, chunks: Iterable[torch.Tensor], sensitivity: np.ndarray | None = None) -> Codebook:
    """Sample chunks' KV, each [L, 2, T, H, D] on the CPU, and the model's sensitivity [L * 2 * C] (expected
    KL per squared unit of error of each (layer, K/V, channel) element; None: the layer-RMS steps) -> the
    codebook of the model `fingerprint` names, with steps (from the sensitivity) and tables for every
    level. `CodecError` when there is no chunk or the sensitivity does not fit the chunks."""
    base = None
    if sensitivity is not None:
        # bfloat16 now, as the codebook stores them, so the counts are those of the steps encoders use
        base = {lv: _bf16_to_f32(_bf16_up(sensitivity_steps(sensitivity, spec))) for lv, spec in LEVELS.items()}
    counts: dict[int, np.ndarray | None] = {lv: None for lv in LEVELS}
    shape = None
    for kv in chunks:
        rows = kv.shape[0] * 2 * kv.shape[3] * kv.shape[4]
        if base is not None and base[1].size != rows:
            raise CodecError(f"sensitivity has {base[1].size} entries, chunks of shape {tuple(kv.shape)} need {rows}")
        for lv, spec in LEVELS.items():
            counts[lv] = count_symbols(kv, spec, counts[lv], None if base is None else base[lv])
        shape = tuple(kv.shape)
    if shape is None:
        raise CodecError("no sample chunk: nothing to profile")
    return profile_codebook(fingerprint, counts, shape[0], shape[3] * shape[4], base)
