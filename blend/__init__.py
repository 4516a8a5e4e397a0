"""Blend: selective recompute so that the KV of chunks stored standalone can be reused at any position
(CacheBlend-style). Builds on `kernels` (RoPE re-rotation, row scatter) and `kvstore` (standalone keys).

Public API:
- `blend(model, segments, config) -> BlendResult`: the prompt's KV `[L, 2, T, H, D]`, the last position's
  logits `[V]`, and a `BlendReport` (rows reused / recomputed per layer, the check layer's deviations and
  selection, per-layer time, and `Recomputed` rows: passages computed in full, with why, one of
  `RECOMPUTE_REASONS`);
- `Segment.cached(tokens, kv, start_pos)` / `Segment.fresh(tokens)`, `SegmentFetch` (KV fetched in the
  background), `BlendConfig`;
- `store_segments(store, parts, fingerprint=..)` with `Part.passage(tokens)` / `Part.fresh(tokens)`: segments
  whose passages are looked up in a `TieredStore` under standalone keys;
- `LayerDriver`: the layer-by-layer access to a transformers Llama/Mistral/Qwen2/Qwen3 model.
Errors: `BlendError` (a `ValueError`) and its subclasses. See docs/BLEND.md.
"""

from blend.blend import blend
from blend.errors import BlendError, BlendInputError, BlendModelError
from blend.model import SUPPORTED_MODEL_TYPES, LayerDriver
from blend.select import SELECTIONS, kv_deviation
from blend.store import Part, passage_refs, store_segments
from blend.types import RECOMPUTE_REASONS, BlendConfig, BlendReport, BlendResult, Recomputed, Segment, SegmentFetch

__all__ = [
    "RECOMPUTE_REASONS",
    "SELECTIONS",
    "SUPPORTED_MODEL_TYPES",
    "BlendConfig",
    "BlendError",
    "BlendInputError",
    "BlendModelError",
    "BlendReport",
    "BlendResult",
    "LayerDriver",
    "Part",
    "Recomputed",
    "Segment",
    "SegmentFetch",
    "blend",
    "kv_deviation",
    "passage_refs",
    "store_segments",
]
