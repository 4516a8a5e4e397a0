"""gather_paged / scatter_paged against a per-token loop on fresh random bit patterns: both layouts, NHD
and HND physical orders, padded views, layers in one tensor or apart, permuted chunks, -1 slots, three
dtypes; every element of every storage involved is checked, written or untouched as it should be."""

from __future__ import annotations

import zlib

import pytest
import torch

from kernels import KernelInputError, PagedLayout, gather_paged, scatter_paged

L, NB, BS, H, D, T = 3, 5, 4, 3, 12, 9  # H, D not powers of two: the kernels' masks are exercised
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def seed_of(*parts: object) -> int:
    """A seed per test case, stable across runs (fresh data per case, reproducible failures)."""
    return zlib.crc32(repr(parts).encode())


def logical_shape(layout: PagedLayout) -> tuple[int, ...]:
    return (2, NB, BS, H, D) if layout is PagedLayout.KV_FIRST else (NB, 2, BS, H, D)


# Physical arrangements of the per-layer caches: backing storages, and the layer views made of them.
def cache_backings(arrangement: str, layout: PagedLayout, make) -> list[torch.Tensor]:
    lead = logical_shape(layout)[:2]
    if arrangement == "nhd":
        return [make(lead + (BS, H, D)) for _ in range(L)]
    if arrangement == "hnd":
        return [make(lead + (H, BS, D)) for _ in range(L)]
    if arrangement == "padded":
        return [make(lead + (BS + 1, H + 1, D + 4)) for _ in range(L)]
    if arrangement == "one_tensor":
        return [make((L,) + lead + (BS, H, D))]
    raise AssertionError(arrangement)


def cache_views(arrangement: str, backings: list[torch.Tensor]) -> list[torch.Tensor]:
    if arrangement == "hnd":
        return [b.transpose(2, 3) for b in backings]
    if arrangement == "padded":
        return [b[:, :, 1:, :H, 2 : D + 2] for b in backings]
    if arrangement == "one_tensor":
        return list(backings[0])
    return list(backings)


def chunk_backing(arrangement: str, make) -> torch.Tensor:
    return make((L, 2, T, H, D) if arrangement == "contiguous" else (L, 2, H, T, D))


def chunk_view(arrangement: str, backing: torch.Tensor) -> torch.Tensor:
    return backing if arrangement == "contiguous" else backing.transpose(2, 3)


def kv_first(cache: torch.Tensor, layout: PagedLayout) -> torch.Tensor:
    return cache if layout is PagedLayout.KV_FIRST else cache.transpose(0, 1)


def random_slots(gen: torch.Generator, device: torch.device) -> torch.Tensor:
    slots = torch.randperm(NB * BS, generator=gen)[:T]
    skip = torch.randperm(T, generator=gen)[:2]
    slots[skip] = -1
    return slots.to(device)


ARRANGEMENTS = ["nhd", "hnd", "padded", "one_tensor"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_arr", ["contiguous", "hnd"])
@pytest.mark.parametrize("cache_arr", ARRANGEMENTS)
@pytest.mark.parametrize("layout", list(PagedLayout), ids=lambda x: x.name)
def test_gather(target, layout, cache_arr, chunk_arr, dtype, random_bits, poison, same_bits_as):
    device, backend = target
    gen = torch.Generator().manual_seed(seed_of("gather", layout, cache_arr, chunk_arr, dtype))
    backings = [b.to(device) for b in cache_backings(cache_arr, layout, lambda s: random_bits(s, dtype, gen))]
    caches = cache_views(cache_arr, backings)
    slots = random_slots(gen, device)
    out_backing = poison(chunk_backing(chunk_arr, lambda s: torch.empty(s)).shape, dtype).to(device)
    out = chunk_view(chunk_arr, out_backing)
    want_backing = out_backing.clone()
    want = chunk_view(chunk_arr, want_backing)
    for layer, cache in enumerate(caches):
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                want[layer, :, t] = kv_first(cache, layout)[:, s // BS, s % BS]
    snapshot = [b.clone() for b in backings]

    assert gather_paged(caches, slots, out, backend=backend) is out
    same_bits_as(out_backing, want_backing)  # rows written, -1 rows still poisoned
    for b, before in zip(backings, snapshot):
        same_bits_as(b, before)  # the source is only read


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_arr", ["contiguous", "hnd"])
@pytest.mark.parametrize("cache_arr", ARRANGEMENTS)
@pytest.mark.parametrize("layout", list(PagedLayout), ids=lambda x: x.name)
def test_scatter(target, layout, cache_arr, chunk_arr, dtype, random_bits, same_bits_as):
    device, backend = target
    gen = torch.Generator().manual_seed(seed_of("scatter", layout, cache_arr, chunk_arr, dtype))
    backings = [b.to(device) for b in cache_backings(cache_arr, layout, lambda s: random_bits(s, dtype, gen))]
    caches = cache_views(cache_arr, backings)
    chunk = chunk_view(chunk_arr, chunk_backing(chunk_arr, lambda s: random_bits(s, dtype, gen)).to(device))
    slots = random_slots(gen, device)
    want_backings = [b.clone() for b in backings]
    for layer, cache in enumerate(cache_views(cache_arr, want_backings)):
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                kv_first(cache, layout)[:, s // BS, s % BS] = chunk[layer, :, t]

    scatter_paged(chunk, caches, slots, backend=backend)
    for got, want in zip(backings, want_backings):
        same_bits_as(got, want)  # mapped slots written; other slots, padding and skipped tokens untouched


@pytest.mark.parametrize("heads, head_dim, tokens", [(3, 12, 150), (8, 128, 40), (64, 256, 12)])
def test_backend_matches_torch_reference(target, heads, head_dim, tokens, random_bits, same_bits_as):
    """Both backends on the same fresh inputs at model-sized heads: several token tiles, and (64 x 256)
    several head tiles per token."""
    device, backend = target
    gen = torch.Generator().manual_seed(heads)
    nb = 2 * tokens // BS + 1
    caches = [random_bits((nb, 2, heads, BS, head_dim), torch.bfloat16, gen).to(device).transpose(2, 3)
              for _ in range(2)]
    slots = torch.randperm(nb * BS, generator=gen)[:tokens].to(device)
    ref = torch.empty(2, 2, tokens, heads, head_dim, dtype=torch.bfloat16, device=device)
    got = torch.empty_like(ref)
    gather_paged(caches, slots, ref, backend="torch")
    gather_paged(caches, slots, got, backend=backend)
    same_bits_as(got, ref)
    fresh_ref = [torch.zeros_like(c) for c in caches]
    fresh_got = [torch.zeros_like(c) for c in caches]
    scatter_paged(ref, fresh_ref, slots, backend="torch")
    scatter_paged(ref, fresh_got, slots, backend=backend)
    for a, b in zip(fresh_got, fresh_ref):
        same_bits_as(a, b)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint8], ids=str)
def test_one_byte_dtypes(target, dtype, random_bits, same_bits_as):
    """fp8 caches (vLLM's kv_cache_dtype=fp8, or their uint8 views) move bit for bit like the rest."""
    device, backend = target
    gen = torch.Generator().manual_seed(13)
    caches = [random_bits((NB, 2, H, BS, D), dtype, gen).to(device).transpose(2, 3) for _ in range(L)]
    slots = random_slots(gen, device)
    out = torch.zeros(L, 2, T, H, D, dtype=dtype, device=device)
    gather_paged(caches, slots, out, backend=backend)
    fresh = [torch.zeros_like(c) for c in caches]
    scatter_paged(out, fresh, slots, backend=backend)
    for cache, back in zip(caches, fresh):
        for s in slots.tolist():
            if s >= 0:
                same_bits_as(back[s // BS, :, s % BS], cache[s // BS, :, s % BS])
    assert int((out.view(torch.uint8)[:, :, slots < 0] != 0).sum()) == 0  # skipped rows untouched


def test_gather_repeated_slots_and_round_trip(target, random_bits, same_bits_as):
    device, backend = target
    gen = torch.Generator().manual_seed(11)
    caches = [random_bits((2, NB, BS, H, D), torch.float16, gen).to(device) for _ in range(L)]
    slots = torch.tensor([3, 3, -1, 0, 19, 3, 7, 8, 9], device=device)  # gather may read a slot twice
    out = torch.zeros(L, 2, T, H, D, dtype=torch.float16, device=device)
    gather_paged(caches, slots, out, backend=backend)
    same_bits_as(out[:, :, 0], out[:, :, 1])
    # Round trip through fresh caches: what was gathered scatters back to the same slots.
    fresh = [torch.zeros_like(c) for c in caches]
    unique = torch.tensor([3, -1, -1, 0, 19, -1, 7, 8, 9], device=device)
    scatter_paged(out, fresh, unique, backend=backend)
    back = torch.zeros_like(out)
    gather_paged(fresh, unique, back, backend=backend)
    keep = unique >= 0
    same_bits_as(back[:, :, keep], out[:, :, keep])


def test_empty_slot_mapping_is_a_no_op(target):
    device, backend = target
    caches = [torch.ones(2, NB, BS, H, D, device=device)]
    out = torch.zeros(1, 2, 0, H, D, device=device)
    gather_paged(caches, torch.empty(0, dtype=torch.int64, device=device), out, backend=backend)
    scatter_paged(out, caches, torch.empty(0, dtype=torch.int64, device=device), backend=backend)
    assert bool((caches[0] == 1).all())


# ---- errors ----------------------------------------------------------------------------------------


def _inputs(device: torch.device, dtype=torch.float16):
    caches = [torch.zeros(2, NB, BS, H, D, dtype=dtype, device=device) for _ in range(L)]
    slots = torch.arange(T, device=device)
    out = torch.zeros(L, 2, T, H, D, dtype=dtype, device=device)
    return caches, slots, out


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda c, s, o: (c, s.clone().fill_(NB * BS), o), "out of range"),
        (lambda c, s, o: (c, s.clone().fill_(-2), o), "< -1"),
        (lambda c, s, o: (c, s.to(torch.int32), o), "int64"),
        (lambda c, s, o: (c, s, o.to(torch.float32)), "float32"),
        (lambda c, s, o: (c, s, o[:, :, :-1]), "shape"),
        (lambda c, s, o: (c, s, o[:2]), "shape"),
        (lambda c, s, o: (c[:-1] + [c[-1].to(torch.bfloat16)], s, o), "bfloat16"),
        (lambda c, s, o: (c[:-1] + [c[-1].transpose(2, 3).contiguous().transpose(2, 3)], s, o), "strides"),
        (lambda c, s, o: (c[:-1] + [c[-1][:, :, :, :, :-1]], s, o), "all layers must match"),
        (lambda c, s, o: ([], s, o), "non-empty"),
        (lambda c, s, o: ([x[0] for x in c], s, o), "5-D"),
        (lambda c, s, o: ([x.transpose(0, 4) for x in c], s, o), "kv_caches must be"),
        (lambda c, s, o: (c, s, o[:, :1].expand(L, 2, T, H, D)), "overlapping"),
    ],
)
def test_gather_rejects_bad_input(target, bad, match):
    device, backend = target
    caches, slots, out = bad(*_inputs(device))
    with pytest.raises(KernelInputError, match=match):
        gather_paged(caches, slots, out, backend=backend)


def test_scatter_rejects_bad_input(target):
    device, backend = target
    caches, slots, chunk = _inputs(device)
    with pytest.raises(KernelInputError, match="repeats"):
        scatter_paged(chunk, caches, torch.tensor([1, 2, 1, 3, 4, 5, 6, 7, 8], device=device), backend=backend)
    with pytest.raises(KernelInputError, match="out of range"):
        scatter_paged(chunk, caches, slots + NB * BS, backend=backend)
    with pytest.raises(KernelInputError, match="float32"):
        scatter_paged(chunk.float(), caches, slots, backend=backend)


def test_layout_inference_and_ambiguity():
    two_blocks = [torch.zeros(2, 2, BS, H, D)]
    slots = torch.arange(4)
    out = torch.zeros(1, 2, 4, H, D)
    with pytest.raises(KernelInputError, match="ambiguous"):
        gather_paged(two_blocks, slots, out)
    gather_paged(two_blocks, slots, out, layout=PagedLayout.BLOCKS_FIRST, backend="torch")
    with pytest.raises(KernelInputError, match="PagedLayout"):
        gather_paged(two_blocks, slots, out, layout="kv_first")  # type: ignore[arg-type]
