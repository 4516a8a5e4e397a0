"""What blend takes and gives: segments, its configuration, its result and report.

- `Segment`: consecutive prompt tokens, with stored KV (`cached`) or without (`fresh`: always computed).
  Cached KV is `[L, 2, T, H, D]` with post-RoPE keys computed at positions `start_pos .. start_pos+T-1`
  (a standalone chunk: its offset inside its passage); blend re-rotates them to the segment's place.
- `SegmentFetch`: segments whose token ids are known now and whose KV arrives later (`fetch()`, run in a
  background thread while blend computes what does not need it).
- `BlendConfig`: recompute ratio, check layer, gradual filtering, deviation measure, selection strategy.
- `BlendResult`: the merged KV `[L, 2, T, H, D]`, the last position's logits `[V]`, and a `BlendReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from blend.errors import BlendInputError
from kvstore.errors import InvalidTokensError
from kvstore.keys import as_token_array

Deviation = Literal["k", "v", "kv"]
DEVIATIONS = ("k", "v", "kv")
# Why a passage's chunk is computed in full instead of loaded: never stored (or not under these keys), stored
# once but gone (a manifest lists it: evicted or lost), or stored for another model (fingerprint mismatch).
RECOMPUTE_REASONS = ("missing", "evicted", "fingerprint mismatch")


def as_ids(tokens) -> torch.Tensor:
    """Token ids (list, numpy array, tensor) -> [T] int64 CPU tensor, checked as the store checks them
    (`kvstore.keys.as_token_array`); `BlendInputError` for anything else."""
    try:
        arr = as_token_array(tokens)  # [T] uint32
    except InvalidTokensError as e:
        raise BlendInputError(str(e)) from None
    return torch.from_numpy(arr.astype(np.int64))


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """Prompt tokens with stored KV (`kv` given) or to be computed (`kv` None)."""

    tokens: torch.Tensor  # [T] int64
    kv: torch.Tensor | None = None  # [L, 2, T, H, D], keys post-RoPE at start_pos + j
    start_pos: int = 0
    reason: str | None = None  # a fresh segment standing in for stored KV: why it is computed (`RECOMPUTE_REASONS`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", as_ids(self.tokens))
        if self.tokens.numel() == 0:
            raise BlendInputError("a segment needs at least one token")
        if self.kv is not None:
            kv = self.kv
            if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
                raise BlendInputError("segment KV must be a tensor [L, 2, T, H, D]")
            if kv.shape[2] != self.tokens.numel():
                raise BlendInputError(f"segment has {self.tokens.numel()} tokens but KV for {kv.shape[2]}")
            if not kv.dtype.is_floating_point:
                raise BlendInputError(f"segment KV must be floating point, got {kv.dtype}")
        if not isinstance(self.start_pos, int) or self.start_pos < 0:
            raise BlendInputError(f"start_pos must be an int >= 0, got {self.start_pos!r}")
        if self.reason is not None and (self.kv is not None or self.reason not in RECOMPUTE_REASONS):
            raise BlendInputError(f"reason is for fresh segments, one of {RECOMPUTE_REASONS}, got {self.reason!r}")

    @classmethod
    def fresh(cls, tokens, reason: str | None = None) -> "Segment":
        """Tokens to compute; `reason` where they stand in for stored KV that could not be used."""
        return cls(tokens, None, 0, reason)

    @classmethod
    def cached(cls, tokens, kv: torch.Tensor, start_pos: int = 0) -> "Segment":
        return cls(tokens, kv, int(start_pos))

    @property
    def is_cached(self) -> bool:
        return self.kv is not None


@dataclass(frozen=True, slots=True, eq=False)
class SegmentFetch:
    """Segments to be fetched: `tokens[i]` ([T_i] int64) now, `fetch()` -> segments with those same tokens
    later (called once, in blend's loader thread)."""

    tokens: Sequence[torch.Tensor]
    fetch: Callable[[], list[Segment]]


@dataclass(frozen=True, slots=True)
class BlendConfig:
    """How much to recompute and how to choose it.

    ratio: share of the reused (cached) tokens recomputed at the last layers. 0.0 = plain concatenation of
      the cached KV (only fresh tokens computed); 1.0 = full prefill.
    check_layer: layers below it are computed for every token, and at it the fresh KV of every token is
      compared with the cached KV to choose the tokens to recompute (CacheBlend uses layer 1).
    widen: the check layer keeps `min(1, ratio * widen)` of the reused tokens; the selection then narrows
      linearly over `filter_layers` layers down to `ratio` (gradual filtering; 1.0 / 0 = no filtering).
    deviation: what is compared: keys "k", values "v", or both "kv" (L2 over heads and dims, per token).
    selection: "deviation" (highest deviation first), "leading" (each passage's first tokens first, by the
      position their KV was computed at: where a passage computed alone differs most from it in the prompt,
      its own attention sink and the tokens that saw nothing before them), or "random" (the baseline), see
      `blend.select`.
    sink_tokens: the first `sink_tokens` tokens of every cached passage (those stored at positions below it)
      are always among the recomputed ones (counted in the ratio): computed alone, a passage's first tokens
      are its attention sinks, which they are not in the whole prompt.
    question_weight: with "deviation" selection, rank reused tokens by `deviation * attention **
      question_weight`, the attention being the question's (the fresh rows after the last cached one) at
      the check layer, mean over heads and rows; 0 ranks by deviation alone.
    seed: random selection's seed.
    overlap: assemble the cached KV (fetch, re-rotation) in a background thread, layer i+1 while layer i
      computes; False does it inline, first.
    """

    ratio: float = 0.15
    check_layer: int = 1
    widen: float = 1.0
    filter_layers: int = 0
    deviation: Deviation = "kv"
    selection: str = "leading"
    sink_tokens: int = 0
    question_weight: float = 0.0
    seed: int = 0
    overlap: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) <= 1.0:
            raise BlendInputError(f"ratio must be in [0, 1], got {self.ratio!r}")
        if not isinstance(self.check_layer, int) or self.check_layer < 0:
            raise BlendInputError(f"check_layer must be an int >= 0, got {self.check_layer!r}")
        if not isinstance(self.widen, (int, float)) or self.widen < 1.0:
            raise BlendInputError(f"widen must be >= 1, got {self.widen!r}")
        if not isinstance(self.filter_layers, int) or self.filter_layers < 0:
            raise BlendInputError(f"filter_layers must be an int >= 0, got {self.filter_layers!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise BlendInputError(f"sink_tokens must be an int >= 0, got {self.sink_tokens!r}")
        if not isinstance(self.question_weight, (int, float)) or not 0.0 <= self.question_weight <= 4.0:
            raise BlendInputError(f"question_weight must be in [0, 4], got {self.question_weight!r}")
        if self.deviation not in DEVIATIONS:
            raise BlendInputError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        from blend.select import SELECTIONS

        if self.selection not in SELECTIONS:
            raise BlendInputError(f"selection must be one of {sorted(SELECTIONS)}, got {self.selection!r}")

    def layer_ratios(self, num_layers: int) -> list[float]:
        """Share of the reused tokens recomputed at each layer (1.0 below the check layer when 0 < ratio < 1)."""
        r = float(self.ratio)
        if r in (0.0, 1.0):
            return [r] * num_layers
        top = min(1.0, r * self.widen)
        out = []
        for layer in range(num_layers):
            if layer < self.check_layer:
                out.append(1.0)
            elif self.filter_layers == 0:
                out.append(top)
            else:
                t = min(1.0, (layer - self.check_layer) / self.filter_layers)
                out.append(top + (r - top) * t)
        return out


@dataclass(frozen=True, slots=True)
class Recomputed:
    """Rows of a passage computed in full because their stored KV could not be used."""

    row: int  # first row in the prompt
    tokens: int
    reason: str  # one of RECOMPUTE_REASONS


@dataclass(slots=True)
class BlendReport:
    """What blend did. Rows are prompt positions; "reused" rows are those with cached KV."""

    num_tokens: int
    reused: int  # rows that had cached KV
    fresh: int  # rows without (missing chunks, the question, the last row): computed at every layer
    kv_fresh: list[int]  # per layer: rows whose KV is freshly computed (the rest is cached KV)
    computed: list[int]  # per layer: rows that ran attention + MLP
    selected: list[torch.Tensor]  # per layer: [n_l] int64 sorted reused rows whose KV was recomputed
    fresh_rows: torch.Tensor  # [fresh] int64 sorted
    deviation: torch.Tensor | None  # [T] fp32 at the check layer, NaN where no cached KV; None: no check
    recomputed: list[Recomputed] = field(default_factory=list)  # fresh segments standing in for stored KV, with why
    layer_seconds: list[float] = field(default_factory=list)
    load_wait_seconds: float = 0.0  # time the compute waited for cached KV
    total_seconds: float = 0.0

    @property
    def recompute_fraction(self) -> float:
        """Share of the row-layers that ran attention + MLP (1.0 = a full prefill's work)."""
        return sum(self.computed) / max(1, self.num_tokens * len(self.computed))

    def summary(self) -> dict:
        return {"num_tokens": self.num_tokens, "reused": self.reused, "fresh": self.fresh,
                "kv_fresh": list(self.kv_fresh), "computed": list(self.computed),
                "recompute_fraction": round(self.recompute_fraction, 4),
                "recomputed": [{"row": r.row, "tokens": r.tokens, "reason": r.reason} for r in self.recomputed],
                "layer_ms": [round(s * 1e3, 3) for s in self.layer_seconds],
                "load_wait_ms": round(self.load_wait_seconds * 1e3, 3),
                "total_ms": round(self.total_seconds * 1e3, 3)}


@dataclass(slots=True)
class BlendResult:
    kv: torch.Tensor  # [L, 2, T, H, D] the prompt's KV, ready for decoding (model dtype, device)
    logits: torch.Tensor  # [V] of the last position
    report: BlendReport
