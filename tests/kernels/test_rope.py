"""rerotate_keys against keys computed fresh at the new positions by transformers' own rotary embedding
(default, linear, llama3, yarn with its attention scaling, partial rotary through Phi), in fp32 within
1e-3 relative; rope_from_config against the models' inverse frequencies; the backends against each
other on fp32/fp16/bf16 keys with non-contiguous views and in place."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, PhiConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding  # noqa: E402

from kernels import KernelInputError, RopeSpec, rerotate_keys, rope_from_config  # noqa: E402

HEAD_DIM, HEADS, T = 64, 2, 24
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def llama(rope_parameters: dict, max_pos: int = 131072) -> LlamaConfig:
    return LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, num_key_value_heads=HEADS,
                       head_dim=HEAD_DIM, max_position_embeddings=max_pos, rope_parameters=rope_parameters)


CONFIGS = {
    "default": lambda: llama({"rope_type": "default", "rope_theta": 10000.0}),
    "linear": lambda: llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama3": lambda: llama({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "yarn": lambda: llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 2048}, max_pos=8192),
    "partial": lambda: PhiConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, partial_rotary_factor=0.5,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5}),
}


def model_rope(config) -> tuple[torch.nn.Module, int]:
    """The model's own rotary embedding and how many leading dims of a head it rotates."""
    if isinstance(config, PhiConfig):
        emb = PhiRotaryEmbedding(config)
        return emb, 2 * emb.inv_freq.numel()
    return LlamaRotaryEmbedding(config), HEAD_DIM


def apply_model_rope(config, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Keys [1, T, H, D] fp32 rotated as the model does at positions pos [T]."""
    emb, rot = model_rope(config)
    cos, sin = emb(k, pos[None])  # [1, T, rot]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    _, k_rot = apply_rotary_pos_emb(k_rot, k_rot, cos, sin, unsqueeze_dim=2)
    return torch.cat([k_rot, k_pass], dim=-1)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest per-row relative error ||got - want|| / ||want|| over the head vectors."""
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inv_freq_matches_the_model(name):
    config = CONFIGS[name]()
    spec = rope_from_config(config)
    emb, rot = model_rope(config)
    assert torch.equal(spec.inv_freq, emb.inv_freq.float())
    assert spec.rotary_dim == rot and spec.head_dim == HEAD_DIM and spec.rope_type == name.replace("partial", "default")
    assert spec.attention_scaling == pytest.approx(emb.attention_scaling)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rerotated_keys_match_fresh_keys(target, name):
    device, backend = target
    config = CONFIGS[name]()
    spec = rope_from_config(config)
    if name == "yarn":
        assert spec.attention_scaling > 1.05  # the case where re-applying the scaling would show
    gen = torch.Generator().manual_seed(len(name))
    k = torch.randn(1, T, HEADS, HEAD_DIM, generator=gen)
    old = torch.randint(0, 4096, (T,), generator=gen)
    new = torch.randint(0, 8192, (T,), generator=gen)
    new[:3] = old[:3]  # zero deltas too
    stored = apply_model_rope(config, k, old)
    fresh = apply_model_rope(config, k, new)
    got = rerotate_keys(stored.to(device), old.to(device), new.to(device), spec, backend=backend).cpu()
    assert rel_error(got, fresh) <= 1e-3
    assert torch.equal(got[:, :3], stored[:, :3])  # delta 0 is the identity, bit for bit
    if spec.rotary_dim < HEAD_DIM:
        assert torch.equal(got[..., spec.rotary_dim :], stored[..., spec.rotary_dim :])  # pass-through dims


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_matches_fp32_reference(target, dtype):
    """Half-precision keys are rotated in fp32 and rounded once: within one rounding of the fp32 result."""
    device, backend = target
    gen = torch.Generator().manual_seed(3)
    spec = RopeSpec.default(HEAD_DIM, theta=10000.0, rotary_dim=48)
    # A chunk [L, 2, T, H, D] stored head-major ([L, 2, H, T, D] physically): keys are a strided view.
    chunk = torch.randn(3, 2, HEADS, T, HEAD_DIM, generator=gen).to(dtype).transpose(2, 3).to(device)
    k = chunk[:, 0]  # [L, T, H, D]
    old = torch.randint(0, 100_000, (T,), generator=gen).to(device)
    new = torch.randint(0, 100_000, (T,), generator=gen).to(device)
    ref = rerotate_keys(k.float(), old, new, spec, backend="torch")
    got = rerotate_keys(k, old, new, spec, backend=backend)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_error(got.float().cpu(), ref.cpu()) <= tol
    before = chunk.clone()
    assert rerotate_keys(k, old, new, spec, out=k, backend=backend) is k  # in place, through the view
    assert torch.equal(k, got)
    assert torch.equal(chunk[:, 1], before[:, 1])  # values untouched


def test_backend_matches_reference_on_wide_heads(target):
    """40 heads x 256 dims in fp32: several head tiles per token, partner dims far apart, in place."""
    device, backend = target
    gen = torch.Generator().manual_seed(5)
    spec = RopeSpec.default(256, theta=1e6)
    k = torch.randn(1, 5, 40, 256, generator=gen).to(device)
    old, new = torch.arange(5).to(device), torch.randint(0, 1 << 20, (5,), generator=gen).to(device)
    ref = rerotate_keys(k, old, new, spec, backend="torch")
    rerotate_keys(k, old, new, spec, out=k, backend=backend)
    assert rel_error(k.cpu(), ref.cpu()) <= 1e-5


def test_rejects_what_cannot_be_rerotated():
    dynamic = llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(KernelInputError, match="dynamic"):
        rope_from_config(dynamic)
    spec = RopeSpec.default(HEAD_DIM)
    k = torch.zeros(1, T, HEADS, HEAD_DIM)
    pos = torch.arange(T)
    with pytest.raises(KernelInputError, match="int64"):
        rerotate_keys(k, pos.int(), pos, spec)
    with pytest.raises(KernelInputError, match="head_dim"):
        rerotate_keys(k[..., :32], pos, pos, spec)
    with pytest.raises(KernelInputError, match=r"\[24\]"):
        rerotate_keys(k, pos[:-1], pos, spec)
    with pytest.raises(KernelInputError, match="4-D"):
        rerotate_keys(k[0], pos, pos, spec)
    with pytest.raises(KernelInputError, match="dtype"):
        rerotate_keys(k.to(torch.uint8), pos, pos, spec)
    with pytest.raises(KernelInputError, match="rotary_dim"):
        RopeSpec(torch.ones(40), HEAD_DIM)
