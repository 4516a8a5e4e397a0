"""Choosing the tokens to recompute: KV deviation per token, and the selection strategies (a registry).

- `kv_deviation(k_new, v_new, k_old, v_old, kind)`: per-row L2 distance `[N]` fp32 between freshly
  computed and cached KV of the same rows (keys "k", values "v", or both "kv": sqrt of the summed squares).
- `SELECTIONS[name](score, count, generator)`: indices `[count]` into the candidates, sorted ascending.
  "deviation" takes the highest scores (ties broken by lower index, deterministic), the score being the
  KV deviation; "leading" takes the highest scores too, the score being how early the row's KV sits in
  its passage (`leading_score`: each passage's opening tokens first); "random" draws uniformly (the
  baseline a selection has to beat).
- `leading_score(offsets, rows)`: that positional score.
"""

from __future__ import annotations

from typing import Callable

import torch


def kv_deviation(k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor,
                 kind: str) -> torch.Tensor:
    """k_*, v_*: [N, H, D] (any float dtype, same device) -> [N] fp32 L2 deviation per row."""
    parts = []
    if kind in ("k", "kv"):
        parts.append((k_new.float() - k_old.float()).square().flatten(1).sum(1))
    if kind in ("v", "kv"):
        parts.append((v_new.float() - v_old.float()).square().flatten(1).sum(1))
    return torch.stack(parts).sum(0).sqrt()


def leading_score(offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[N] fp32 score of reused rows for "leading" selection: minus the position each row's KV was computed
    at (`offsets` [N] int64, its place in its passage), so that every passage's first tokens come first;
    rows in place (offset == row, `rows` [N] int64: the KV of the prompt's own opening, computed where it
    stands) come last, since they have nothing to catch up on."""
    score = -offsets.float()
    return score.masked_fill(offsets == rows, float("-inf"))


def _top_score(score: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    # A stable descending sort: equal scores keep their order, so the choice is deterministic.
    order = torch.sort(score.float().cpu(), descending=True, stable=True).indices
    return order[:count].sort().values


def _random(deviation: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(deviation.numel(), generator=generator)[:count].sort().values


# name -> (deviation [N] fp32, count, generator) -> [count] int64 CPU indices into the N candidates, sorted
SELECTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "deviation": _top_score,
    "leading": _top_score,
    "random": _random,
}


def select(name: str, score: torch.Tensor, count: int, generator: torch.Generator,
           forced: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [min(count, N)] int64 (CPU, sorted) of the candidates to keep. score: [N] (higher: keep
    first); forced: [N] bool, candidates kept before any other (the lowest indices first when they alone
    exceed `count`)."""
    count = max(0, min(int(count), score.numel()))
    if forced is None or not bool(forced.any()):
        return SELECTIONS[name](score, count, generator)
    must = forced.nonzero().squeeze(1)[:count]  # [F]
    rest = (~forced).nonzero().squeeze(1)  # [N - F]
    more = SELECTIONS[name](score[rest], count - must.numel(), generator)
    return torch.cat([must, rest[more]]).sort().values
