"""Block moves of the vLLM connector (`connectors.vllm.layout`).

CPU: the page layout probed through vLLM's own write op, checked both ways against vLLM's own
`pack_kv_cache` on random data ("vec" with the default block size, "vec16" with a block size that is not
a multiple of 32, bfloat16 and float16 through the multi-pass probe), on the affine fast path and on the
generic permutation path. Any permutation, with a synthetic write op. CUDA layouts through `kernels`
(torch reference here; the `gpu` twins run the Triton kernels).
"""

from __future__ import annotations

import pytest
import torch

from connectors.vllm.layout import CpuPages, DevicePages, PageLayout, probe_page_layout
from kvstore.errors import ConfigError
from tests.support.engines import require_vllm

CUDA = torch.cuda.is_available()


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.fixture(scope="module")
def vllm_cpu():
    require_vllm()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's CPU backend is not the current platform")
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from connectors.vllm.layout import vllm_cpu_page_write

    return CpuPlatform, _get_attn_isa, vllm_cpu_page_write


CASES = [(128, 64, torch.float32), (16, 64, torch.float32), (32, 48, torch.float32), (128, 128, torch.bfloat16),
         (16, 64, torch.float16)]


@pytest.mark.parametrize("separate", [False, True], ids=["one-buffer", "separate-layers"])
@pytest.mark.parametrize("use_affine", [True, False], ids=["affine", "permutation"])
@pytest.mark.parametrize("block,head_dim,dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_cpu_pages_match_vllm_pack_kv_cache(vllm_cpu, block, head_dim, dtype, use_affine, separate):
    CpuPlatform, get_isa, page_write = vllm_cpu
    isa = get_isa(dtype, block, head_dim)
    layout = probe_page_layout(page_write(isa), block, head_dim, dtype)
    assert layout.affine is not None  # vec and vec16 are strided; the permutation path is forced below
    L, nb, H = 3, 7, 2
    k, v = _random((L, nb, H, block, head_dim), dtype, 1), _random((L, nb, H, block, head_dim), dtype, 2)

    def caches():
        if separate:
            return [torch.zeros(nb, H, block, 2 * head_dim, dtype=dtype) for _ in range(L)]
        buf = torch.zeros(L, nb, H, block, 2 * head_dim, dtype=dtype)
        return [buf[i] for i in range(L)]

    packed = caches()  # vLLM's own conversion of token-major K||V blocks, the reference
    for i in range(L):
        packed[i][..., :head_dim], packed[i][..., head_dim:] = k[i], v[i]
        CpuPlatform.pack_kv_cache(packed[i], torch.arange(nb))
    blocks = torch.tensor([5, 1, 2, 6])
    m = len(blocks)
    out = torch.full((L, 2, m * block, H, head_dim), float("nan"), dtype=dtype)
    CpuPages(packed, layout, use_affine=use_affine).gather(blocks, out)
    want_k = k[:, blocks].permute(0, 1, 3, 2, 4).reshape(L, m * block, H, head_dim)  # [L, T, H, D]
    want_v = v[:, blocks].permute(0, 1, 3, 2, 4).reshape(L, m * block, H, head_dim)
    assert torch.equal(_int_view(out[:, 0]), _int_view(want_k))
    assert torch.equal(_int_view(out[:, 1]), _int_view(want_v))

    fresh = caches()
    CpuPages(fresh, layout, use_affine=use_affine).scatter(out, blocks)
    for i in range(L):
        assert torch.equal(_int_view(fresh[i][blocks]), _int_view(packed[i][blocks]))
        others = [b for b in range(nb) if b not in blocks.tolist()]
        assert not fresh[i][others].any()  # nothing else written


def _permuting_write(code: torch.Tensor, block: int, head_dim: int):
    """A fake kernel write op: page offset p holds token-major element code[p] of the block's K||V."""

    def write(key, value, key_cache, value_cache, slot_mapping):
        src = torch.stack([key, value])  # [2, N, H, D]
        assert key_cache.shape[2] == block
        for h in range(key.shape[1]):
            flat = src[:, :, h].reshape(-1)
            page = torch.cat([key_cache[0, h].reshape(-1), value_cache[0, h].reshape(-1)])
            page[:] = flat[code]
            key_cache[0, h].view(-1).copy_(page[: block * head_dim])
            value_cache[0, h].view(-1).copy_(page[block * head_dim:])

    return write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_permutation_round_trips(dtype):
    block, head_dim = 8, 16
    g = torch.Generator().manual_seed(3)
    code = torch.randperm(2 * block * head_dim, generator=g)
    layout = probe_page_layout(_permuting_write(code, block, head_dim), block, head_dim, dtype)
    assert torch.equal(layout.code, code) and layout.affine is None
    L, nb, H = 2, 5, 3
    buf = torch.zeros(L, nb, H, block, 2 * head_dim, dtype=dtype)
    caches = [buf[i] for i in range(L)]
    chunk = _random((L, 2, 3 * block, H, head_dim), dtype, 4)
    blocks = torch.tensor([3, 0, 4])
    pages = CpuPages(caches, layout)
    pages.scatter(chunk, blocks)
    # The reference: each page, flattened, holds the token-major elements in `code` order.
    for j, b in enumerate(blocks.tolist()):
        for h in range(H):
            tm = chunk[:, :, j * block:(j + 1) * block, h].reshape(L, -1)  # [L, 2 * N * D] token-major
            assert torch.equal(buf[:, b, h].reshape(L, -1), tm[:, code])
    back = torch.empty_like(chunk)
    pages.gather(blocks, back)
    assert torch.equal(back, chunk)


@pytest.mark.parametrize("use_affine", [True, False])
def test_scatter_leaves_blocks_marked_minus_one(use_affine):
    block, head_dim, dtype = 4, 8, torch.float32
    code = torch.arange(2 * block * head_dim)  # token-major pages: affine
    layout = probe_page_layout(_permuting_write(code, block, head_dim), block, head_dim, dtype)
    buf = torch.zeros(2, 6, 1, block, 2 * head_dim)
    pages = CpuPages([buf[0], buf[1]], layout, use_affine=use_affine)
    chunk = _random((2, 2, 3 * block, 1, head_dim), dtype, 5)
    pages.scatter(chunk, torch.tensor([-1, 2, -1]))
    assert not buf[:, [0, 1, 3, 4, 5]].any()
    got = torch.empty(2, 2, block, 1, head_dim)
    pages.gather(torch.tensor([2]), got)
    assert torch.equal(got, chunk[:, :, block:2 * block])


def test_probe_rejects_a_write_that_changes_values():
    def halving(key, value, key_cache, value_cache, slot_mapping):
        key_cache[0].copy_(key.transpose(0, 1) * 0.5)
        value_cache[0].copy_(value.transpose(0, 1))

    with pytest.raises(ConfigError, match="page layout"):
        probe_page_layout(halving, 4, 8, torch.float32)


def test_layout_from_code_rejects_non_permutations():
    with pytest.raises(ConfigError, match="permutation"):
        PageLayout.from_code(torch.zeros(2 * 4 * 2, dtype=torch.long), 4, 2)


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["kv_first", "blocks_first", "kv_first_hnd"])
def test_device_pages_move_whole_blocks(device, layout):
    L, nb, B, H, D = 3, 9, 16, 2, 8
    g = torch.Generator().manual_seed(6)
    if layout == "blocks_first":
        base = [torch.randn(nb, 2, B, H, D, generator=g) for _ in range(L)]
        kvf = [t.transpose(0, 1) for t in base]  # [2, nb, B, H, D] views for the reference
    elif layout == "kv_first":
        base = [torch.randn(2, nb, B, H, D, generator=g) for _ in range(L)]
        kvf = base
    else:  # HND: heads outside the block offset in memory
        base = [torch.randn(2, nb, H, B, D, generator=g).transpose(2, 3) for _ in range(L)]
        kvf = base
    caches = [t.to(device) for t in base]
    pages = DevicePages(caches, B)
    blocks = torch.tensor([7, 2, 5])
    out = torch.empty(L, 2, 3 * B, H, D, device=device)
    pages.gather(blocks, out)
    for i in range(L):
        want = kvf[i][:, blocks].reshape(2, 3 * B, H, D)
        assert torch.equal(out[i].cpu(), want)
    chunk = torch.randn(L, 2, 3 * B, H, D, generator=g).to(device)
    before = [t.clone() for t in caches]
    pages.scatter(chunk, torch.tensor([4, -1, 0]))
    for i in range(L):
        now = caches[i].transpose(0, 1) if layout == "blocks_first" else caches[i]
        old = before[i].transpose(0, 1) if layout == "blocks_first" else before[i]
        assert torch.equal(now[:, 4].cpu(), chunk[i, :, :B].cpu())
        assert torch.equal(now[:, 0].cpu(), chunk[i, :, 2 * B:].cpu())
        untouched = [b for b in range(nb) if b not in (4, 0)]
        assert torch.equal(now[:, untouched].cpu(), old[:, untouched].cpu())
