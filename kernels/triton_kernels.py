"""Triton kernels of the ops, registered as their "triton" implementations. Imported by `kernels.dispatch`
on first use of the Triton path only, so the package works without triton.

Both kernels move tiles `[BLOCK_T tokens, BLOCK_H heads, BLOCK_D dims]`, addressed through the strides
of each side (nothing assumed contiguous; a unit stride is specialized by Triton, which is what lets
the loads vectorize on the usual layouts). Rows whose index is -1 are masked: neither read nor written.

- `_paged_kernel`: grid (token tiles, head tiles, 2 * layers). Layer l's cache lives at
  `cache_ptr + layer_offsets[l]` (element offsets from layer 0's storage), so one launch covers all
  layers whatever the allocations; pure moves run on integer views, so they copy bit patterns.
- `_rows_kernel`: grid (row tiles, head tiles, B). Optional indices on either side, and an optional
  rotate-half re-rotation in fp32 (the partner dim of each element is loaded as a second, cached read;
  cos/sin lower to libdevice's `__nv_cosf`/`__nv_sinf`, accurate at any angle, not `cos.approx`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import as_bits, require
from kernels.dispatch import register
from kernels.paged import PagedCaches
from kernels.rows import Rotation

TILE_BYTES = 16384  # bytes moved per program
MAX_BLOCK_T = 256
MAX_GRID_Z = 65535  # CUDA's limit on the third grid dimension


def _tiles(num_rows: int, num_heads: int, head_dim: int, itemsize: int) -> tuple[int, int, int]:
    elems = TILE_BYTES // itemsize
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, elems // block_d))
    block_t = max(1, min(MAX_BLOCK_T, elems // (block_h * block_d), triton.next_power_of_2(num_rows)))
    return block_t, block_h, block_d


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else _NullGuard()


class _NullGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@triton.jit
def _tile(num_rows, num_heads, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """This program's tile of the grid (row tiles, head tiles, ...): row numbers [BT] (int32, as the index
    loads want them) and which of them exist, head indices [BH] (int64), dims [BD], and which (head, dim)
    pairs exist [BH, BD]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    return rows, rows < num_rows, h, d, (h[:, None] < num_heads) & (d[None, :] < HEAD_DIM)


# ---- paged <-> chunk -------------------------------------------------------------------------------


@triton.jit
def _paged_kernel(
    cache_ptr,  # layer 0's storage; layer l at + layer_off[l]
    layer_off_ptr,  # [L] int64 element offsets
    chunk_ptr,  # [L, 2, T, H, D]
    slot_ptr,  # [T] int64, -1 = skip
    num_tokens,
    block_size,
    num_heads,
    c_kv, c_blk, c_off, c_h, c_d,  # cache strides (elements) of (kv, block, offset, head, dim)
    o_l, o_kv, o_t, o_h, o_d,  # chunk strides
    HEAD_DIM: tl.constexpr,
    TO_CHUNK: tl.constexpr,
    LAYER_ALIGN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # the tile: tokens x heads x dims
):
    t, in_range, h, d, inner_ok = _tile(num_tokens, num_heads, HEAD_DIM, BLOCK_T, BLOCK_H, BLOCK_D)
    pid_lk = tl.program_id(2)
    layer = (pid_lk // 2).to(tl.int64)
    kv = (pid_lk % 2).to(tl.int64)

    slot = tl.load(slot_ptr + t, mask=in_range, other=-1)  # [BT] int64
    ok = slot >= 0
    blk = slot // block_size
    off = slot - blk * block_size
    layer_off = tl.multiple_of(tl.load(layer_off_ptr + layer), LAYER_ALIGN)
    cache_row = layer_off + kv * c_kv + blk * c_blk + off * c_off  # [BT] int64
    chunk_row = layer * o_l + kv * o_kv + t.to(tl.int64) * o_t  # [BT] int64

    cache_in = h[:, None] * c_h + d[None, :] * c_d  # [BH, BD]
    chunk_in = h[:, None] * o_h + d[None, :] * o_d
    mask = ok[:, None, None] & inner_ok[None, :, :]  # [BT, BH, BD]
    cache_offs = cache_row[:, None, None] + cache_in[None, :, :]
    chunk_offs = chunk_row[:, None, None] + chunk_in[None, :, :]
    if TO_CHUNK:
        x = tl.load(cache_ptr + cache_offs, mask=mask)
        tl.store(chunk_ptr + chunk_offs, x, mask=mask)
    else:
        x = tl.load(chunk_ptr + chunk_offs, mask=mask)
        tl.store(cache_ptr + cache_offs, x, mask=mask)


_LAYER_OFFSETS: dict[tuple, tuple[torch.Tensor, int]] = {}


def _layer_offsets(caches: PagedCaches) -> tuple[torch.Tensor, int]:
    """[L] int64 element offsets of each layer from layer 0 (on the device, cached by pointers), and the
    largest element alignment (up to 16 bytes) that all of them share."""
    itemsize = caches.dtype.itemsize
    ptrs = tuple(t.data_ptr() for t in caches.tensors)
    key = (caches.device, ptrs, itemsize)
    hit = _LAYER_OFFSETS.get(key)
    if hit is not None:
        return hit
    diffs = [p - ptrs[0] for p in ptrs]
    require(all(x % itemsize == 0 for x in diffs), "kv_caches storages are not aligned to their element size")
    elems = [x // itemsize for x in diffs]
    align = max(1, 16 // itemsize)
    while align > 1 and any(e % align for e in elems):
        align //= 2
    if len(_LAYER_OFFSETS) >= 64:
        _LAYER_OFFSETS.clear()
    hit = (torch.tensor(elems, dtype=torch.int64, device=caches.device), align)
    _LAYER_OFFSETS[key] = hit
    return hit


def _launch_paged(caches: PagedCaches, slot_mapping: torch.Tensor, chunk: torch.Tensor, to_chunk: bool) -> None:
    cache0 = as_bits(caches.tensors[0])
    chunk_i = as_bits(chunk)
    offsets, align = _layer_offsets(caches)
    n = slot_mapping.numel()
    require(2 * caches.num_layers <= MAX_GRID_Z, f"{caches.num_layers} layers exceed one launch: split the call")
    bt, bh, bd = _tiles(n, caches.num_heads, caches.head_dim, caches.dtype.itemsize)
    grid = (triton.cdiv(n, bt), triton.cdiv(caches.num_heads, bh), 2 * caches.num_layers)
    with _device_guard(caches.device):
        _paged_kernel[grid](
            cache0, offsets, chunk_i, slot_mapping,
            n, caches.block_size, caches.num_heads,
            *caches.strides, *chunk.stride(),
            HEAD_DIM=caches.head_dim, TO_CHUNK=to_chunk, LAYER_ALIGN=align,
            BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=bd,
            num_warps=4,
        )


@register("gather_paged", "triton")
def _gather_paged_triton(caches: PagedCaches, slot_mapping: torch.Tensor, out: torch.Tensor) -> None:
    _launch_paged(caches, slot_mapping, out, to_chunk=True)


@register("scatter_paged", "triton")
def _scatter_paged_triton(caches: PagedCaches, slot_mapping: torch.Tensor, chunk: torch.Tensor) -> None:
    _launch_paged(caches, slot_mapping, chunk, to_chunk=False)


# ---- rows (+ re-rotation) --------------------------------------------------------------------------


@triton.jit
def _rows_kernel(
    src_ptr,  # [B, Ts, H, D]
    dst_ptr,  # [B, Td, H, D]
    src_idx_ptr,  # [N] int64 or None
    dst_idx_ptr,  # [N] int64 or None
    old_ptr,  # [N] int64 or None
    new_ptr,  # [N] int64 or None
    inv_freq_ptr,  # [HALF] fp32 or None
    num_rows,
    num_heads,
    s_b, s_t, s_h, s_d,
    o_b, o_t, o_h, o_d,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,  # the tile: rows x heads x dims
    HEAD_DIM: tl.constexpr,
    SRC_INDEXED: tl.constexpr,
    DST_INDEXED: tl.constexpr,
    ROTATE: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    IN_PLACE: tl.constexpr,
):
    i, ok, h, d, inner_ok = _tile(num_rows, num_heads, HEAD_DIM, BLOCK_T, BLOCK_H, BLOCK_D)  # i: [BT] row numbers
    b = tl.program_id(2).to(tl.int64)

    if SRC_INDEXED:
        st = tl.load(src_idx_ptr + i, mask=ok, other=-1)
    else:
        st = i.to(tl.int64)
    if DST_INDEXED:
        dt = tl.load(dst_idx_ptr + i, mask=ok, other=-1)
    else:
        dt = i.to(tl.int64)
    ok = ok & (st >= 0) & (dt >= 0)
    src_row = b * s_b + st * s_t  # [BT] int64
    dst_row = b * o_b + dt * o_t

    mask = ok[:, None, None] & inner_ok[None, :, :]
    src_head = src_row[:, None, None] + (h * s_h)[None, :, None]  # [BT, BH, 1]
    dst_offs = dst_row[:, None, None] + (h[:, None] * o_h + d[None, :] * o_d)[None, :, :]
    x = tl.load(src_ptr + src_head + (d * s_d)[None, None, :], mask=mask)
    if ROTATE:
        rotated = d < 2 * HALF  # [BD]
        partner = tl.where(d < HALF, d + HALF, tl.where(rotated, d - HALF, d))
        xp = tl.load(src_ptr + src_head + (partner * s_d)[None, None, :], mask=mask)
        freq = tl.load(inv_freq_ptr + tl.where(d < HALF, d, d - HALF), mask=rotated, other=0.0)  # [BD]
        old = tl.load(old_ptr + i, mask=ok, other=0)
        new = tl.load(new_ptr + i, mask=ok, other=0)
        # The same fp32 angle as the model computes; tl.cos/sin are libdevice's, accurate at any angle.
        angle = (new - old).to(tl.float32)[:, None] * freq[None, :]  # [BT, BD]
        cos = tl.cos(angle)
        sin = tl.sin(angle) * tl.where(d < HALF, -1.0, 1.0)[None, :]
        xf = x.to(tl.float32)
        y = xf * cos[:, None, :] + xp.to(tl.float32) * sin[:, None, :]
        y = tl.where(rotated[None, None, :], y, xf)
        if IN_PLACE:
            tl.debug_barrier()  # every partner is read before any element is overwritten
        tl.store(dst_ptr + dst_offs, y.to(dst_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dst_ptr + dst_offs, x, mask=mask)


@register("move_rows", "triton")
def _move_rows_triton(src: torch.Tensor, dst: torch.Tensor, src_index: torch.Tensor | None,
                      dst_index: torch.Tensor | None, rotation: Rotation | None) -> None:
    b, ts, h, d = src.shape
    n = ts if src_index is None else src_index.numel()
    if rotation is None:  # pure move: bit patterns
        src, dst = as_bits(src), as_bits(dst)
    require(b <= MAX_GRID_Z, f"B = {b} exceeds the launch grid's limit {MAX_GRID_Z}: split the call")
    bt, bh, bd = _tiles(n, h, d, src.dtype.itemsize)
    grid = (triton.cdiv(n, bt), triton.cdiv(h, bh), b)
    rot = rotation
    with _device_guard(src.device):
        _rows_kernel[grid](
            src, dst, src_index, dst_index,
            rot.old_pos if rot else None, rot.new_pos if rot else None, rot.inv_freq if rot else None,
            n, h, *src.stride(), *dst.stride(),
            HEAD_DIM=d, SRC_INDEXED=src_index is not None, DST_INDEXED=dst_index is not None,
            ROTATE=rot is not None, HALF=rot.inv_freq.numel() if rot else 1,
            IN_PLACE=rot is not None and src.data_ptr() == dst.data_ptr(),
            BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=bd,
            num_warps=4,
        )
