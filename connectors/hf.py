"""Hugging Face transformers bridge: a model's KV in the store's chunk layout, and its fingerprint.

- `kv_layout(model)`: the `KVLayout` of a Llama-family causal LM.
- `model_fingerprint(model)`: architecture, dtype and a digest of every weight, so KV of another model,
  dtype or version can never match.
- `prefill_kv(model, input_ids)`: run a prefill and return its KV as `[L, 2, T, H, D]` (post-RoPE keys).
"""

from __future__ import annotations

import json

import torch
import xxhash

from kvstore.chunk import KVLayout


def kv_layout(model) -> KVLayout:
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return KVLayout(cfg.num_hidden_layers, kv_heads, head_dim, model.dtype)


def model_fingerprint(model) -> str:
    """`<model_type>-<dtype>-<16 hex digits>` over the config and every parameter's bytes."""
    h = xxhash.xxh3_128()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            t = t.detach().to("cpu").contiguous()
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    dtype = str(model.dtype).removeprefix("torch.")
    return f"{cfg.get('model_type', 'model')}-{dtype}-{h.hexdigest()[:16]}"


def cache_to_kv(past_key_values, num_layers: int) -> torch.Tensor:
    """A transformers cache (batch 1) -> `[L, 2, T, H, D]`."""
    layers = []
    for i in range(num_layers):
        layer = past_key_values.layers[i]
        # keys/values: [B=1, H, T, D] -> [T, H, D]
        layers.append(torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]))
    return torch.stack(layers).contiguous()


@torch.inference_mode()
def prefill_kv(model, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids: [T] -> KV [L, 2, T, H, D] of a full prefill."""
    out = model(input_ids.reshape(1, -1).to(model.device), use_cache=True)
    return cache_to_kv(out.past_key_values, model.config.num_hidden_layers)
