"""Row moves along the token axis, optionally re-rotating keys on the way: the op behind blend's token
selection and behind `rerotate_keys`.

Primitives (tensors are `[B, T, H, D]`, B leading groups such as layers, any strides):
- `gather_rows(src, index, out)`: `out[:, i] = src[:, index[i]]`;
- `scatter_rows(src, index, dst)`: `dst[:, index[i]] = src[:, i]`, no destination twice;
- `move_rows(src, dst, src_index, dst_index, rotation)`: the general op both use, one launch.
`-1` in an index skips that row: its destination stays untouched. Without rotation moves are bit-exact;
with a `Rotation` each moved row is rotated (rotate-half RoPE, see `kernels.rope`) by
`new_pos[i] - old_pos[i]`, computed in fp32 and written back in the destination's dtype.
A chunk `[L, 2, T, H, D]` moves as two calls: keys `chunk[:, 0]` (with rotation) and values `chunk[:, 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.checks import MOVE_DTYPES, ROTATE_DTYPES, as_bits, check_index, check_tensor, check_writable, require
from kernels.dispatch import Backend, implementation, register

if TYPE_CHECKING:
    from kernels.rope import RopeSpec


@dataclass(frozen=True, slots=True)
class Rotation:
    """Per-row re-rotation: row i turns by `new_pos[i] - old_pos[i]` positions at frequencies `inv_freq`."""

    inv_freq: torch.Tensor  # [rotary_dim // 2] fp32, on the rows' device
    old_pos: torch.Tensor  # [N] int64
    new_pos: torch.Tensor  # [N] int64

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()


def make_rotation(rope: RopeSpec | None, old_pos: torch.Tensor | None, new_pos: torch.Tensor | None,
                  num_rows: int, head_dim: int, device: torch.device) -> Rotation | None:
    """Validate the (rope, old_pos, new_pos) triple of the public ops: all None, or all given."""
    if rope is None and old_pos is None and new_pos is None:
        return None
    require(rope is not None and old_pos is not None and new_pos is not None,
            "re-rotation needs rope, old_pos and new_pos together")
    assert rope is not None and old_pos is not None and new_pos is not None
    require(rope.head_dim == head_dim, f"rope is for head_dim {rope.head_dim}, tensors have head_dim {head_dim}")
    for name, pos in (("old_pos", old_pos), ("new_pos", new_pos)):
        require(isinstance(pos, torch.Tensor) and pos.dim() == 1 and pos.numel() == num_rows,
                f"{name} must be a 1-D tensor [{num_rows}]")
        require(pos.dtype == torch.int64, f"{name} must be int64, got {pos.dtype}")
        require(pos.device == device, f"{name} is on {pos.device}, expected {device}")
    return Rotation(rope.inv_freq_on(device), old_pos, new_pos)


def move_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_index: torch.Tensor | None,
    dst_index: torch.Tensor | None,
    rotation: Rotation | None,
    *,
    backend: Backend = "auto",
    check_indices: bool = True,
) -> None:
    """For each row i < N: `dst[:, dst_index[i]] = rotate_i(src[:, src_index[i]])` (an absent index is the
    identity). src: [B, Ts, H, D]; dst: [B, Td, H, D]; indices [N] int64 with -1 = skip."""
    check_tensor("src", src, 4, "[B, T, H, D]")
    check_tensor("dst", dst, 4, "[B, T, H, D]")
    b, ts, h, d = src.shape
    td = dst.shape[1]
    require((dst.shape[0], dst.shape[2], dst.shape[3]) == (b, h, d),
            f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ outside the token axis")
    require(src.dtype == dst.dtype, f"src is {src.dtype}, dst is {dst.dtype}: dtypes must match")
    require(src.device == dst.device, f"src is on {src.device}, dst on {dst.device}")
    dtypes = ROTATE_DTYPES if rotation is not None else MOVE_DTYPES
    require(src.dtype in dtypes, f"dtype {src.dtype} is not one of {dtypes}")
    device = src.device
    n = ts if src_index is None else src_index.numel()
    if src_index is not None:
        check_index("index", src_index, ts, device, check_range=check_indices)
    else:
        require(dst_index is not None or ts == td, f"src has {ts} rows, dst has {td}")
    if dst_index is not None:
        check_index("index", dst_index, td, device, check_range=check_indices, unique=True)
        require(dst_index.numel() == n, f"index has {dst_index.numel()} entries for {n} source rows")
    elif src_index is not None:
        require(td == n, f"out has {td} rows for {n} index entries")
    check_writable("dst", dst)
    if rotation is not None:
        f = rotation.inv_freq
        require(f.dim() == 1 and f.dtype == torch.float32 and f.device == device,
                f"inv_freq must be 1-D float32 on {device}, got {f.dtype} {tuple(f.shape)} on {f.device}")
        require(rotation.rotary_dim <= d, f"rotary_dim {rotation.rotary_dim} > head_dim {d}")
        for name, pos in (("old_pos", rotation.old_pos), ("new_pos", rotation.new_pos)):
            require(pos.dim() == 1 and pos.numel() == n and pos.dtype == torch.int64 and pos.device == device,
                    f"{name} must be [{n}] int64 on {device}, got {pos.dtype} {tuple(pos.shape)} on {pos.device}")
        if dst.data_ptr() == src.data_ptr():
            require(src_index is None and dst_index is None and dst.stride() == src.stride(),
                    "in-place re-rotation needs dst to be src itself (same view, no indices)")
    if n > 0 and b > 0:
        implementation("move_rows", backend, device)(src, dst, src_index, dst_index, rotation)


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, *, rope: RopeSpec | None = None,
                old_pos: torch.Tensor | None = None, new_pos: torch.Tensor | None = None, backend: Backend = "auto",
                check_indices: bool = True) -> torch.Tensor:
    """out[:, i] = src[:, index[i]] (skipped where index[i] == -1). src: [B, T, H, D]; index: [N] int64;
    out: [B, N, H, D]. With rope/old_pos/new_pos ([N] int64 each, per output row) the rows are
    re-rotated from old_pos[i] to new_pos[i]. Returns `out`."""
    check_tensor("out", out, 4, "[B, N, H, D]")
    rotation = make_rotation(rope, old_pos, new_pos, out.shape[1], out.shape[3], out.device)
    move_rows(src, out, index, None, rotation, backend=backend, check_indices=check_indices)
    return out


def scatter_rows(src: torch.Tensor, index: torch.Tensor, dst: torch.Tensor, *, rope: RopeSpec | None = None,
                 old_pos: torch.Tensor | None = None, new_pos: torch.Tensor | None = None, backend: Backend = "auto",
                 check_indices: bool = True) -> None:
    """dst[:, index[i]] = src[:, i] (skipped where index[i] == -1; no destination twice). src: [B, N, H, D];
    index: [N] int64; dst: [B, T, H, D]. With rope/old_pos/new_pos ([N] int64 each, per source row)
    the rows are re-rotated from old_pos[i] to new_pos[i]."""
    check_tensor("src", src, 4, "[B, N, H, D]")
    rotation = make_rotation(rope, old_pos, new_pos, src.shape[1], src.shape[3], src.device)
    move_rows(src, dst, None, index, rotation, backend=backend, check_indices=check_indices)


# ---- torch reference -------------------------------------------------------------------------------


def rotate_half_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in place. x: [B, N, H, D] fp32; cos, sin: [N, 1, R/2] fp32 (dims R.. of D
    untouched). Returns x."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    x1_sin = x1 * sin
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)  # x1 cos - x2 sin
    x2.mul_(cos).add_(x1_sin)  # x2 cos + x1 sin
    return x


@register("move_rows", "torch")
def _move_rows_torch(src: torch.Tensor, dst: torch.Tensor, src_index: torch.Tensor | None,
                     dst_index: torch.Tensor | None, rotation: Rotation | None) -> None:
    n = src.shape[1] if src_index is None else src_index.numel()
    keep = torch.ones(n, dtype=torch.bool, device=src.device)
    for idx in (src_index, dst_index):
        if idx is not None:
            keep &= idx >= 0
    rows = None if bool(keep.all()) else keep.nonzero().squeeze(1)  # [n'] row numbers i, None = all
    s = src_index if rows is None else (rows if src_index is None else src_index[rows])
    d = dst_index if rows is None else (rows if dst_index is None else dst_index[rows])
    if rotation is not None:
        old, new = (rotation.old_pos, rotation.new_pos) if rows is None else (rotation.old_pos[rows], rotation.new_pos[rows])
        angle = (new - old).to(torch.float32)[:, None] * rotation.inv_freq[None, :]  # [n', R/2], as the model
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # [n', 1, R/2]
    if rotation is None:
        src, dst = as_bits(src), as_bits(dst)
    # Groups of ~1M elements along B: temporaries stay small (no page faults), calls stay few.
    b_all, _, h, hd = src.shape
    group = max(1, (1 << 20) // max(1, (n if rows is None else rows.numel()) * h * hd))
    for b in range(0, b_all, group):
        part = src[b : b + group]
        x = part if s is None else part[:, s]  # [g, n', H, D] (advanced indexing: index_select is slow when strided)
        if rotation is not None:
            # An fp32 copy, also when src is fp32 and dst is src: in-place rotation reads before it writes.
            x = rotate_half_(x.to(torch.float32, copy=True), cos, sin)
        if d is None:
            dst[b : b + group].copy_(x)
        else:
            dst[b : b + group].index_copy_(1, d, x.to(dst.dtype))
