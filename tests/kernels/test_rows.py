"""gather_rows / scatter_rows against a per-row loop on fresh random bit patterns (poisoned destinations,
-1 rows, strided views, three dtypes), and fused with re-rotation against gather-then-rotate."""

from __future__ import annotations

import pytest
import torch

from kernels import KernelInputError, RopeSpec, gather_rows, rerotate_keys, scatter_rows

B, T, N, H, D = 2, 13, 6, 3, 12
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def hf_layout(backing: torch.Tensor) -> torch.Tensor:
    """A transformers cache tensor [B, H, T, D] seen as [B, T, H, D]."""
    return backing.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows(target, dtype, random_bits, poison, same_bits_as):
    device, backend = target
    gen = torch.Generator().manual_seed(21)
    src = hf_layout(random_bits((B, H, T, D), dtype, gen).to(device))
    index = torch.tensor([5, -1, 0, 12, 5, 7], device=device)  # -1 skips, a row read twice
    out_backing = poison((B, H, N, D), dtype).to(device)
    out = hf_layout(out_backing)
    want_backing = out_backing.clone()
    for i, s in enumerate(index.tolist()):
        if s >= 0:
            hf_layout(want_backing)[:, i] = src[:, s]
    assert gather_rows(src, index, out, backend=backend) is out
    same_bits_as(out_backing, want_backing)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_rows(target, dtype, random_bits, same_bits_as):
    device, backend = target
    gen = torch.Generator().manual_seed(22)
    src = random_bits((B, N, H, D), dtype, gen).to(device)
    dst_backing = random_bits((B, H, T, D), dtype, gen).to(device)
    index = torch.tensor([4, 11, -1, 0, 9, 2], device=device)
    want_backing = dst_backing.clone()
    for i, d in enumerate(index.tolist()):
        if d >= 0:
            hf_layout(want_backing)[:, d] = src[:, i]
    scatter_rows(src, index, hf_layout(dst_backing), backend=backend)
    same_bits_as(dst_backing, want_backing)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_rerotation(target, dtype, poison, same_bits_as):
    device, backend = target
    gen = torch.Generator().manual_seed(23)
    spec = RopeSpec.default(D, theta=10000.0, rotary_dim=8)
    keys = torch.randn(B, T, H, D, generator=gen).to(dtype).to(device)
    index = torch.tensor([5, -1, 0, 12, 3, 7], device=device)
    old = torch.randint(0, 5000, (N,), generator=gen).to(device)
    new = torch.randint(0, 5000, (N,), generator=gen).to(device)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]

    # gather + rotate in one launch == gather, then rotate in fp32
    out = poison((B, N, H, D), dtype).to(device)
    gather_rows(keys, index, out, rope=spec, old_pos=old, new_pos=new, backend=backend)
    keep = index >= 0
    plain = keys.float()[:, index[keep]]
    want = rerotate_keys(plain, old[keep], new[keep], spec, backend="torch")
    assert float((out[:, keep].float() - want).norm(dim=-1).div(want.norm(dim=-1)).max()) <= tol
    same_bits_as(out[:, 1], poison((B, H, D), dtype).to(device))  # the -1 row untouched

    # scatter + rotate back lands the original rows where they came from
    dst = keys.clone()
    scatter_rows(want.to(dtype), index[keep], dst, rope=spec, old_pos=new[keep], new_pos=old[keep], backend=backend)
    rows = index[keep]
    back_tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    got, orig = dst[:, rows].float(), keys[:, rows].float()
    assert float((got - orig).norm(dim=-1).div(orig.norm(dim=-1)).max()) <= back_tol
    untouched = torch.ones(T, dtype=torch.bool, device=device)
    untouched[rows] = False
    same_bits_as(dst[:, untouched], keys[:, untouched])


def test_rows_reject_bad_input(target):
    device, backend = target
    src = torch.zeros(B, T, H, D, device=device)
    out = torch.zeros(B, N, H, D, device=device)
    idx = torch.arange(N, device=device)
    with pytest.raises(KernelInputError, match="out of range"):
        gather_rows(src, idx + T, out, backend=backend)
    with pytest.raises(KernelInputError, match="repeats"):
        scatter_rows(out, torch.tensor([1, 1, 2, 3, 4, 5], device=device), src, backend=backend)
    with pytest.raises(KernelInputError, match="dtypes must match"):
        gather_rows(src, idx, out.half(), backend=backend)
    with pytest.raises(KernelInputError, match="differ outside the token axis"):
        gather_rows(src, idx, out[:, :, :2], backend=backend)
    with pytest.raises(KernelInputError, match="rows for"):
        gather_rows(src, idx[:-1], out, backend=backend)
    with pytest.raises(KernelInputError, match="together"):
        gather_rows(src, idx, out, rope=RopeSpec.default(D), backend=backend)
    with pytest.raises(KernelInputError, match="int64"):
        gather_rows(src, idx.int(), out, backend=backend)
