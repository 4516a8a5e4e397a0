"""RoPE parameters of a model, and re-rotation of post-RoPE keys to new positions.

Primitives:
- `RopeSpec`: inverse frequencies `[rotary_dim / 2]` (fp32), head_dim, rotary_dim, attention_scaling;
- `rope_from_config(config)`: a `RopeSpec` from a transformers config, the inverse frequencies computed by
  transformers' own `ROPE_INIT_FUNCTIONS` so that scaled variants match the model bit for bit;
- `rerotate_keys(k, old_pos, new_pos, rope)`: keys `[B, T, H, D]` stored at `old_pos` as if computed at
  `new_pos`.

Convention (Llama family in transformers): rotate-half on the first `rotary_dim` dims of each head,
frequency j pairing dims j and j + rotary_dim/2; the remaining dims are not rotated. A stored key is
`s * R(p) k` on the rotated dims (s = attention_scaling, 1 except yarn-style scaling). Since
`R(q) R(p)^-1 = R(q - p)`, moving it to q applies `R(q - p)` alone: s is already in the key and is not
applied again. Angles are `delta * inv_freq` in fp32, whatever the keys' dtype.

Supported rope types (a registry, `ROPE_TYPES`): default, linear, llama3, yarn, with partial rotary dims
(`partial_rotary_factor`). Rejected: dynamic and longrope, whose frequencies depend on the sequence length
at compute time, so stored keys cannot be re-rotated exactly; and per-layer-type rope parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kernels.checks import check_tensor, require
from kernels.dispatch import Backend, KernelInputError
from kernels.rows import make_rotation, move_rows


@dataclass(frozen=True, slots=True, eq=False)
class RopeSpec:
    """What re-rotation needs to know of a model's RoPE."""

    inv_freq: torch.Tensor  # [rotary_dim // 2] fp32, CPU
    head_dim: int
    attention_scaling: float = 1.0  # applied by the model to cos/sin; never re-applied here
    rope_type: str = "default"
    _on_device: dict = field(default_factory=dict, init=False, repr=False)  # device -> inv_freq there

    def __post_init__(self) -> None:
        f = self.inv_freq
        require(isinstance(f, torch.Tensor) and f.dim() == 1 and f.numel() > 0, "inv_freq must be a non-empty 1-D tensor")
        require(f.dtype == torch.float32, f"inv_freq must be float32, got {f.dtype}")
        require(2 * f.numel() <= self.head_dim, f"rotary_dim {2 * f.numel()} exceeds head_dim {self.head_dim}")
        object.__setattr__(self, "inv_freq", f.detach().to("cpu").contiguous())

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def default(cls, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None) -> "RopeSpec":
        """Unscaled RoPE, `inv_freq[j] = theta ** (-2j / rotary_dim)` (rotary_dim defaults to head_dim)."""
        return cls(_default_inv_freq(theta, rotary_dim or head_dim), head_dim)

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """inv_freq [rotary_dim // 2] fp32 on `device` (copied once per device)."""
        t = self._on_device.get(device)
        if t is None:
            t = self._on_device[device] = self.inv_freq.to(device)
        return t


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    require(dim >= 2 and dim % 2 == 0, f"rotary_dim must be even and >= 2, got {dim}")
    # As transformers computes it (int64 arange, then float), so the frequencies are the model's own.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _rope_parameters(config: Any) -> dict:
    """The config's rope parameters as one flat dict (rope_type, rope_theta, scaling fields)."""
    if hasattr(config, "standardize_rope_params"):  # transformers >= 5: rope_parameters
        config.standardize_rope_params()
        params = dict(getattr(config, "rope_parameters", None) or {})
    else:  # transformers 4.x: rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        params.setdefault("rope_type", params.get("type", "default"))
        if getattr(config, "partial_rotary_factor", None) is not None:
            params.setdefault("partial_rotary_factor", config.partial_rotary_factor)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise KernelInputError(f"per-layer-type rope parameters ({sorted(params)}) are not supported")
    require("rope_theta" in params, "the config has no RoPE parameters (rope_theta)")
    return params


def _default(config: Any, params: dict) -> tuple[torch.Tensor, float]:
    factor = params.get("partial_rotary_factor", None) or 1.0
    return _default_inv_freq(float(params["rope_theta"]), int(_head_dim(config) * factor)), 1.0


def _transformers(rope_type: str) -> Callable[[Any, dict], tuple[torch.Tensor, float]]:
    def init(config: Any, params: dict) -> tuple[torch.Tensor, float]:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        return inv_freq.to(torch.float32), float(scaling)

    return init


# rope_type -> (config, params) -> (inv_freq [rotary_dim / 2] fp32, attention_scaling)
ROPE_TYPES: dict[str, Callable[[Any, dict], tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _transformers("linear"),
    "llama3": _transformers("llama3"),
    "yarn": _transformers("yarn"),
}
_NOT_REROTATABLE = {
    "dynamic": "its frequencies change with the sequence length at compute time",
    "longrope": "its frequencies switch with the sequence length at compute time",
}


def rope_from_config(config: Any) -> RopeSpec:
    """RopeSpec of a transformers model config (Llama, Mistral, Qwen2, Phi, ... rotate-half RoPE)."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _NOT_REROTATABLE:
        raise KernelInputError(f"rope_type {rope_type!r} cannot be re-rotated exactly: {_NOT_REROTATABLE[rope_type]}")
    init = ROPE_TYPES.get(rope_type)
    if init is None:
        raise KernelInputError(f"rope_type {rope_type!r} is not supported (supported: {sorted(ROPE_TYPES)})")
    inv_freq, scaling = init(config, params)
    return RopeSpec(inv_freq, _head_dim(config), scaling, rope_type)


def rerotate_keys(
    k: torch.Tensor,
    old_pos: torch.Tensor,
    new_pos: torch.Tensor,
    rope: RopeSpec,
    *,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Post-RoPE keys moved from their stored positions to new ones. k: [B, T, H, D] (fp32/fp16/bf16,
    any strides); old_pos, new_pos: [T] int64; out: [B, T, H, D] or None (a new tensor); `out=k`
    rotates in place. Returns `out`."""
    check_tensor("k", k, 4, "[B, T, H, D]")
    require(isinstance(rope, RopeSpec), f"rope must be a RopeSpec, got {type(rope).__name__}")
    if out is None:
        out = torch.empty_like(k)
    check_tensor("out", out, 4, "[B, T, H, D]")
    require(out.shape == k.shape, f"out has shape {tuple(out.shape)}, k has {tuple(k.shape)}")
    rotation = make_rotation(rope, old_pos, new_pos, k.shape[1], k.shape[3], k.device)
    move_rows(k, out, None, None, rotation, backend=backend)
    return out
