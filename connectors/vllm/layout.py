"""Moving whole blocks between vLLM's paged KV caches (all layers) and contiguous chunks `[L, 2, T, H, D]`.

Two movers, one interface (`PagedKV`: `gather(block_ids, out)`, `scatter(chunk, block_ids)`; block ids
`[m]` int64, chunk / out `[L, 2, m * block_size, H, D]` contiguous, token j of the chunk in block
`block_ids[j // block_size]` at offset `j % block_size`):

- `CpuPages`: vLLM's CPU attention backend. Each layer is `[num_blocks, H, block_size, 2 * D]`, but that
  shape hides the page layout: each (block, head) page is `2 * block_size * D` elements that the
  kernel arranges by ISA (on AVX2/AVX-512, "vec": K transposed `[D][N]`, then V `[N][D]`; AMX packs
  pairs). `probe_page_layout` learns the layout once, by writing known bit patterns (token-major K and
  V whose integer views encode their element index, starting at the dtype's smallest normal number so
  that no pattern is a subnormal or NaN) through the kernel's own write op into a scratch page and
  reading back where each element went. An affine layout (vec, vec16) moves by strided copies, two
  per block for all layers at once; any other permutation by index gathers. Tested both ways against
  vLLM's own `pack_kv_cache`.
- `DevicePages`: the CUDA layouts (flash-attention `(2, num_blocks, B, H, D)`, flashinfer
  `(num_blocks, 2, B, H, D)`, any strides) through `kernels.gather_paged` / `scatter_paged`: one launch
  moves all layers (Triton on CUDA, the torch reference elsewhere).
Moves copy bit patterns; nothing is converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from kernels import gather_paged, scatter_paged
from kvstore.errors import ConfigError

# write(key [N, H, D], value [N, H, D], key_cache [1, H, N, D], value_cache [1, H, N, D], slot_mapping [N])
PageWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

_INT = {2: torch.int16, 4: torch.int32}
# (smallest positive normal, largest positive normal) bit patterns: probe codes stay in between.
_NORMAL_BITS = {torch.float32: (0x00800000, 0x7F7FFFFF), torch.float16: (0x0400, 0x7BFF),
                torch.bfloat16: (0x0080, 0x7F7F)}


class PagedKV(Protocol):
    block_size: int
    device: torch.device  # where the blocks live: gather buffers are allocated there

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None: ...

    def scatter(self, chunk: torch.Tensor, block_ids: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class PageLayout:
    """Where each element of a token-major K||V block lives inside one (block, head) page."""

    block_size: int
    head_dim: int
    pos: torch.Tensor  # [2, N, D] int64: page offset of (kv, token, dim)
    code: torch.Tensor  # [2 * N * D] int64: flat (kv, token, dim) index held at each page offset (inverse of pos)
    affine: tuple[tuple[int, int, int], tuple[int, int, int]] | None  # per kv: (base, token stride, dim stride)

    @classmethod
    def from_code(cls, code: torch.Tensor, block_size: int, head_dim: int) -> "PageLayout":
        n = 2 * block_size * head_dim
        if code.shape != (n,) or not torch.equal(torch.bincount(code, minlength=n), torch.ones(n, dtype=torch.long)):
            raise ConfigError("the attention kernel's page layout is not a permutation of the K/V elements "
                              "(does its write op convert values?): the connector cannot move this KV cache")
        pos = torch.empty(n, dtype=torch.long)
        pos[code] = torch.arange(n)
        pos = pos.view(2, block_size, head_dim)
        return cls(block_size, head_dim, pos, code, _affine(pos))


def _affine(pos: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    out = []
    n, d = pos.shape[1], pos.shape[2]
    tok, dim = torch.arange(n).view(n, 1), torch.arange(d).view(1, d)
    for kv in range(2):
        p = pos[kv]
        base = int(p[0, 0])
        sn = int(p[1, 0]) - base if n > 1 else 0
        sd = int(p[0, 1]) - base if d > 1 else 0
        if not torch.equal(p, base + sn * tok + sd * dim):
            return None
        out.append((base, sn, sd))
    return out[0], out[1]


def probe_page_layout(write: PageWrite, block_size: int, head_dim: int, dtype: torch.dtype) -> PageLayout:
    """Learn the page layout of a kernel's write op (see the module doc). Codes wider than the dtype's
    normal range are written in several passes, one base-`radix` digit at a time."""
    if dtype not in _NORMAL_BITS:
        raise ConfigError(f"the connector moves float32/float16/bfloat16 KV caches, not {dtype}")
    lo, hi = _NORMAL_BITS[dtype]
    radix = min(hi - lo, 1 << 30) if dtype == torch.float32 else 1 << 14
    n = 2 * block_size * head_dim
    flat = torch.arange(n, dtype=torch.long)
    code = torch.zeros(n, dtype=torch.long)
    ity = _INT[torch.empty(0, dtype=dtype).element_size()]
    scale = 1
    while True:
        digits = (flat // scale) % radix + lo
        src = digits.to(ity).view(dtype).view(2, block_size, 1, head_dim)  # [kv, N, H=1, D] token-major
        page = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
        kc, vc = page.chunk(2, dim=2)
        write(src[0].contiguous(), src[1].contiguous(), kc, vc, torch.arange(block_size, dtype=torch.long))
        got = page.reshape(-1).view(ity).to(torch.long) - lo
        if bool((got < 0).any()) or bool((got >= radix).any()):
            raise ConfigError("the attention kernel's write op left page positions unwritten or changed values: "
                              "the connector cannot learn its page layout")
        code += got * scale
        scale *= radix
        if scale >= n:
            break
    return PageLayout.from_code(code, block_size, head_dim)


def vllm_cpu_page_write(isa: str) -> PageWrite:
    """vLLM's own CPU write op (`cpu_attn_reshape_and_cache`) for `isa` ("vec", "vec16", "amx", "neon", ...)."""
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    def write(key, value, key_cache, value_cache, slot_mapping) -> None:
        cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)

    return write


class CpuPages:
    """Block moves for vLLM's CPU KV caches: per layer `[num_blocks, H, block_size, 2 * D]`."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], layout: PageLayout, *, use_affine: bool = True) -> None:
        first = kv_caches[0]
        if first.dim() != 4 or first.shape[3] != 2 * layout.head_dim or first.shape[2] != layout.block_size:
            raise ConfigError(f"CPU KV cache of shape {tuple(first.shape)} is not [num_blocks, H, "
                              f"{layout.block_size}, {2 * layout.head_dim}]")
        for t in kv_caches:
            if t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride():
                raise ConfigError("the per-layer CPU KV caches differ in shape, dtype or strides")
        nb, h, b, d2 = first.shape
        if first.stride()[1:] != (b * d2, d2, 1):
            raise ConfigError(f"CPU KV cache pages are not contiguous (strides {first.stride()})")
        self.block_size, self.num_heads, self.head_dim = b, h, d2 // 2
        self.num_layers = len(kv_caches)
        self.dtype, self.device = first.dtype, first.device
        self.layout = layout
        self.affine = layout.affine if use_affine else None
        page = b * d2
        # One view of every layer when they sit at equal distances in one buffer (vLLM allocates them so):
        # then each move below covers all layers at once.
        delta = _uniform_delta(kv_caches)
        if delta is not None:
            self._layers = [first.as_strided((self.num_layers, nb, h, page), (delta, first.stride(0), page, 1))]
        else:
            self._layers = [t.view(nb, 1, h, page).transpose(0, 1) for t in kv_caches]  # each [1, nb, H, page]

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Blocks -> out [L, 2, m * B, H, D] (contiguous)."""
        l0 = 0
        for pages in self._layers:  # pages: [l, num_blocks, H, 2 * B * D]
            dst = out[l0:l0 + pages.shape[0]]
            l0 += pages.shape[0]
            if self.affine is not None:
                for j, blk in enumerate(block_ids.tolist()):
                    for kv in range(2):
                        dst[:, kv, j * self.block_size:(j + 1) * self.block_size].copy_(self._strided(pages, blk, kv))
            else:
                m = block_ids.numel()
                arranged = pages.index_select(1, block_ids).index_select(3, self.layout.pos.view(-1))
                b, h, d = self.block_size, self.num_heads, self.head_dim
                dst.view(-1, 2, m, b, h, d).copy_(arranged.view(-1, m, h, 2, b, d).permute(0, 3, 1, 4, 2, 5))

    def scatter(self, chunk: torch.Tensor, block_ids: torch.Tensor) -> None:
        """chunk [L, 2, m * B, H, D] (contiguous) -> blocks; blocks numbered -1 are left alone."""
        keep = (block_ids >= 0).nonzero().view(-1)
        if keep.numel() == 0:
            return
        l0 = 0
        for pages in self._layers:
            src = chunk[l0:l0 + pages.shape[0]]
            l0 += pages.shape[0]
            if self.affine is not None:
                for j, blk in enumerate(block_ids.tolist()):
                    if blk >= 0:
                        for kv in range(2):
                            self._strided(pages, blk, kv).copy_(src[:, kv, j * self.block_size:(j + 1) * self.block_size])
            else:
                m = block_ids.numel()
                b, h, d = self.block_size, self.num_heads, self.head_dim
                arranged = src.view(-1, 2, m, b, h, d).permute(0, 2, 4, 1, 3, 5).index_select(1, keep)
                arranged = arranged.reshape(-1, keep.numel(), h, 2 * b * d)
                pages.index_copy_(1, block_ids[keep], arranged.index_select(3, self.layout.code))

    def _strided(self, pages: torch.Tensor, block: int, kv: int) -> torch.Tensor:
        """Block `block`'s K (kv=0) or V (kv=1) of every layer as a view [l, B, H, D]."""
        base, sn, sd = self.affine[kv]
        page = pages[:, block]  # [l, H, 2 * B * D]
        s = page.stride()
        return page.as_strided((page.shape[0], self.block_size, self.num_heads, self.head_dim),
                               (s[0], sn, s[1], sd), page.storage_offset() + base)


def _uniform_delta(kv_caches: Sequence[torch.Tensor]) -> int | None:
    """Element distance between consecutive layers when all are views of one storage at equal steps."""
    if len(kv_caches) == 1:
        return kv_caches[0].numel()
    storage = kv_caches[0].untyped_storage().data_ptr()
    offsets = [t.storage_offset() for t in kv_caches]
    if any(t.untyped_storage().data_ptr() != storage for t in kv_caches):
        return None
    delta = offsets[1] - offsets[0]
    if delta <= 0 or any(b - a != delta for a, b in zip(offsets, offsets[1:])):
        return None
    return delta


class DevicePages:
    """Block moves for the CUDA layouts through `kernels` (flash-attention or flashinfer, any strides)."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], block_size: int) -> None:
        first = kv_caches[0]
        if first.dim() != 5:
            raise ConfigError(f"KV cache of shape {tuple(first.shape)} is not a (2, num_blocks, B, H, D) or "
                              f"(num_blocks, 2, B, H, D) layout (MLA and other layouts are not supported)")
        self.kv_caches = list(kv_caches)
        self.block_size = block_size
        self.device = first.device
        self._offsets = torch.arange(block_size, dtype=torch.long, device=first.device)

    def _slots(self, block_ids: torch.Tensor) -> torch.Tensor:
        """[m * B] slots; -1 for every token of a block numbered -1 (the kernels skip them)."""
        blocks = block_ids.to(self._offsets.device).view(-1, 1)
        slots = blocks * self.block_size + self._offsets
        return torch.where(blocks >= 0, slots, -1).view(-1)

    def gather(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        gather_paged(self.kv_caches, self._slots(block_ids), out, check_indices=False)

    def scatter(self, chunk: torch.Tensor, block_ids: torch.Tensor) -> None:
        scatter_paged(chunk, self.kv_caches, self._slots(block_ids), check_indices=False)
