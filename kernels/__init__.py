"""Kernels: gather/scatter between an engine's paged KV blocks and contiguous chunks, RoPE re-rotation,
row gather/scatter for blend. Triton on CUDA, a torch reference everywhere; imports nothing of ours.

Public ops (each takes `backend="auto" | "torch" | "triton"`, see `kernels.dispatch`):
- `gather_paged` / `scatter_paged` (`kernels.paged`): paged blocks <-> chunk `[L, 2, T, H, D]`, all layers
  in one launch, `-1` slots skipped;
- `rerotate_keys` (`kernels.rope`): post-RoPE keys `[B, T, H, D]` moved to new positions, with
  `rope_from_config` / `RopeSpec` describing the model's RoPE;
- `gather_rows` / `scatter_rows` (`kernels.rows`): token rows `[B, T, H, D]` by index, optionally re-rotated.
Bad input raises `KernelInputError` (a `ValueError`); an impossible backend `BackendUnavailableError`.
"""

from kernels.dispatch import BACKENDS, Backend, BackendUnavailableError, KernelError, KernelInputError
from kernels.paged import PagedLayout, gather_paged, scatter_paged
from kernels.rope import ROPE_TYPES, RopeSpec, rerotate_keys, rope_from_config
from kernels.rows import Rotation, gather_rows, move_rows, scatter_rows

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "KernelError",
    "KernelInputError",
    "PagedLayout",
    "ROPE_TYPES",
    "RopeSpec",
    "Rotation",
    "gather_paged",
    "gather_rows",
    "move_rows",
    "rerotate_keys",
    "rope_from_config",
    "scatter_paged",
    "scatter_rows",
]
