"""Moves between an engine's paged KV blocks and contiguous chunks, all layers in one launch.

Primitives:
- `gather_paged(kv_caches, slot_mapping, out)`: paged -> chunk, `out[l, kv, t] = kv_caches[l][kv, slot t]`;
- `scatter_paged(chunk, kv_caches, slot_mapping)`: chunk -> paged, the reverse.

Layouts, per layer, as vLLM hands them to connectors (`PagedLayout`):
- `KV_FIRST`: `(2, num_blocks, block_size, H, D)` (flash-attention backends);
- `BLOCKS_FIRST`: `(num_blocks, 2, block_size, H, D)` (flashinfer).
Strides are read, never assumed: any physical order works (HND, where heads sit outside the block
offset, included), as do views. All layers share shape, strides, dtype and device.

`slot_mapping[t] = block_id * block_size + offset` (int64) names the paged slot of chunk token t;
`-1` skips the token: its destination (the chunk row on gather, the slot on scatter) stays untouched.
Moves are bit-exact (bit patterns are copied, NaN payloads included). Repeated slots are rejected on
scatter (no defined result) and allowed on gather.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import torch

from kernels.checks import MOVE_DTYPES, as_bits, check_index, check_tensor, check_writable, require
from kernels.dispatch import Backend, KernelInputError, implementation, register


class PagedLayout(enum.Enum):
    KV_FIRST = "kv_first"  # per layer (2, num_blocks, block_size, H, D)
    BLOCKS_FIRST = "blocks_first"  # per layer (num_blocks, 2, block_size, H, D)


@dataclass(frozen=True, slots=True)
class PagedCaches:
    """Validated per-layer paged caches, described in KV-first terms whatever their layout."""

    tensors: tuple[torch.Tensor, ...]  # L x per `layout`
    layout: PagedLayout
    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    # Element strides of (kv, block, offset, head, dim), shared by every layer.
    strides: tuple[int, int, int, int, int]

    @property
    def num_layers(self) -> int:
        return len(self.tensors)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def kv_first(self, layer: int) -> torch.Tensor:
        """Layer `layer` as a view [2, num_blocks, block_size, H, D]."""
        t = self.tensors[layer]
        return t if self.layout is PagedLayout.KV_FIRST else t.transpose(0, 1)


def infer_layout(shape: Sequence[int]) -> PagedLayout:
    """The layout a per-layer cache shape implies; an error when it is ambiguous (num_blocks == 2)."""
    if shape[0] == 2 and shape[1] == 2:
        raise KernelInputError("kv_caches have shape (2, 2, ...): the layout is ambiguous, pass layout=PagedLayout.*")
    if shape[0] == 2:
        return PagedLayout.KV_FIRST
    if shape[1] == 2:
        return PagedLayout.BLOCKS_FIRST
    raise KernelInputError(
        f"kv_caches must be (2, num_blocks, block_size, H, D) or (num_blocks, 2, block_size, H, D), got {tuple(shape)}"
    )


def paged_caches(kv_caches: Sequence[torch.Tensor], layout: PagedLayout | None) -> PagedCaches:
    """Validate the per-layer caches and describe them: same shape, strides, dtype and device throughout."""
    require(
        isinstance(kv_caches, (list, tuple)) and len(kv_caches) > 0,
        "kv_caches must be a non-empty list of per-layer tensors",
    )
    first = check_tensor("kv_caches[0]", kv_caches[0], 5, "(2, num_blocks, block_size, H, D) or (num_blocks, 2, ...)")
    shape, stride, dtype, device = first.shape, first.stride(), first.dtype, first.device
    for i, t in enumerate(kv_caches):
        if isinstance(t, torch.Tensor) and t.shape == shape and t.stride() == stride and t.dtype == dtype \
                and t.device == device:
            continue  # the common case, without building messages
        check_tensor(f"kv_caches[{i}]", t, 5, "")
        require(
            t.shape == shape and t.stride() == stride,
            f"kv_caches[{i}] has shape {tuple(t.shape)} / strides {t.stride()}, layer 0 has "
            f"{tuple(shape)} / {stride}: all layers must match",
        )
        require(t.dtype == dtype, f"kv_caches[{i}] is {t.dtype}, layer 0 is {dtype}")
        require(t.device == device, f"kv_caches[{i}] is on {t.device}, layer 0 on {device}")
    require(first.dtype in MOVE_DTYPES, f"kv_caches dtype {first.dtype} is not one of {MOVE_DTYPES}")
    if layout is None:
        layout = infer_layout(first.shape)
    require(isinstance(layout, PagedLayout), f"layout must be a PagedLayout, got {layout!r}")
    s = first.stride()
    if layout is PagedLayout.KV_FIRST:
        two, nb, bs, h, d = first.shape
        strides = (s[0], s[1], s[2], s[3], s[4])
    else:
        nb, two, bs, h, d = first.shape
        strides = (s[1], s[0], s[2], s[3], s[4])
    require(two == 2, f"kv_caches have {two} in the K/V dimension of layout {layout.name}, expected 2")
    require(min(nb, bs, h, d) > 0, f"kv_caches have an empty dimension: {tuple(first.shape)}")
    check_writable("kv_caches[0]", first)  # the others share its shape and strides
    return PagedCaches(tuple(kv_caches), layout, nb, bs, h, d, strides)


def _check_chunk(name: str, chunk: torch.Tensor, caches: PagedCaches, num_tokens: int) -> None:
    check_tensor(name, chunk, 5, "[L, 2, T, H, D]")
    want = (caches.num_layers, 2, num_tokens, caches.num_heads, caches.head_dim)
    if tuple(chunk.shape) != want:
        raise KernelInputError(f"{name} must have shape {want} [L, 2, T, H, D], got {tuple(chunk.shape)}")
    if chunk.dtype != caches.dtype:
        raise KernelInputError(f"{name} is {chunk.dtype}, kv_caches are {caches.dtype}")
    if chunk.device != caches.device:
        raise KernelInputError(f"{name} is on {chunk.device}, kv_caches on {caches.device}")


def gather_paged(
    kv_caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    out: torch.Tensor,
    *,
    layout: PagedLayout | None = None,
    backend: Backend = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Paged -> chunk for all layers. kv_caches: L tensors per `layout` (inferred when None);
    slot_mapping: [T] int64; out: [L, 2, T, H, D], written where the slot is not -1. Returns `out`."""
    caches = paged_caches(kv_caches, layout)
    check_index("slot_mapping", slot_mapping, caches.num_slots, caches.device, check_range=check_indices)
    _check_chunk("out", out, caches, slot_mapping.numel())
    check_writable("out", out)
    if slot_mapping.numel() > 0:
        implementation("gather_paged", backend, caches.device)(caches, slot_mapping, out)
    return out


def scatter_paged(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    *,
    layout: PagedLayout | None = None,
    backend: Backend = "auto",
    check_indices: bool = True,
) -> None:
    """Chunk -> paged for all layers. chunk: [L, 2, T, H, D]; slot_mapping: [T] int64, no slot twice;
    kv_caches: L tensors per `layout`, written at the mapped slots only."""
    caches = paged_caches(kv_caches, layout)
    check_index("slot_mapping", slot_mapping, caches.num_slots, caches.device, check_range=check_indices, unique=True)
    _check_chunk("chunk", chunk, caches, slot_mapping.numel())
    if slot_mapping.numel() > 0:
        implementation("scatter_paged", backend, caches.device)(caches, slot_mapping, chunk)


# ---- torch reference -------------------------------------------------------------------------------
# Whole-row copies (index_select / index_copy_ of H*D rows) where blocks and offsets merge into one slot
# axis (NHD: block stride == block_size * offset stride); element-wise advanced indexing otherwise (HND).


def _slot_view(caches: PagedCaches, layer: int) -> torch.Tensor | None:
    """Layer `layer`'s bits as a view [2, num_slots, H, D] when its blocks and offsets merge, else None."""
    kv, blk, off, h, d = caches.strides
    if blk != caches.block_size * off:
        return None
    shape = (2, caches.num_slots, caches.num_heads, caches.head_dim)
    return as_bits(caches.kv_first(layer)).as_strided(shape, (kv, off, h, d))


def _kept(caches: PagedCaches, slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chunk token indices kept, or None for all; their slots; the slots' blocks and offsets)."""
    keep = slot_mapping >= 0
    if bool(keep.all()):
        rows, slots = None, slot_mapping
    else:
        rows = keep.nonzero().squeeze(1)
        slots = slot_mapping[rows]
    return rows, slots, slots // caches.block_size, slots % caches.block_size


@register("gather_paged", "torch")
def _gather_paged_torch(caches: PagedCaches, slot_mapping: torch.Tensor, out: torch.Tensor) -> None:
    keep, slots, block, offset = _kept(caches, slot_mapping)
    out = as_bits(out)
    for layer in range(caches.num_layers):
        flat = _slot_view(caches, layer)
        rows = flat.index_select(1, slots) if flat is not None else as_bits(caches.kv_first(layer))[:, block, offset]
        if keep is None:
            out[layer].copy_(rows)  # rows: [2, n, H, D]
        else:
            out[layer][:, keep] = rows


@register("scatter_paged", "torch")
def _scatter_paged_torch(caches: PagedCaches, slot_mapping: torch.Tensor, chunk: torch.Tensor) -> None:
    keep, slots, block, offset = _kept(caches, slot_mapping)
    chunk = as_bits(chunk)
    for layer in range(caches.num_layers):
        rows = chunk[layer] if keep is None else chunk[layer][:, keep]  # [2, n, H, D]
        flat = _slot_view(caches, layer)
        if flat is not None:
            flat.index_copy_(1, slots, rows)
        else:
            as_bits(caches.kv_first(layer))[:, block, offset] = rows
