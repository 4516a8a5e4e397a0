"""Attention for the models the connectors run, on CPU: transformers' SDPA without repeating the KV heads.

For a grouped-query model (SmolLM2: 9 query heads over 3 KV heads) transformers' "sdpa" attention copies
every layer's keys and values once per query head of the group (`repeat_kv`) whenever it passes a mask,
which it does for every forward of more than one token over a cache: the question after a 4K-token load
copied ~570 MB of KV, about 60% of that forward. torch's SDPA takes the KV heads as they are
(`enable_gqa`), with the same kernel and the same results (bit for bit on CPU); transformers enables that
only without a mask, because CUDA's fast kernels need it so.

- `ATTENTION`: its name, registered with transformers' `AttentionInterface` on import (and its mask
  format, sdpa's, with `AttentionMaskInterface`).
- `use_gqa_attention(model)`: switches a model that runs transformers' "sdpa" to it (other
  implementations are left as they are); idempotent. The connectors call it on the model they are given.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

ATTENTION = "kvstore_sdpa"


def _gqa_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa_attention_forward`, but a masked grouped-query attention on CPU keeps its KV heads."""
    if (attention_mask is not None and query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) > 1
            and key.shape[-1] == value.shape[-1] and kwargs.get("position_bias") is None
            and kwargs.get("cache") is None and not kwargs.get("output_attentions", False)):
        # With a mask, transformers' own forward passes is_causal=False: the mask carries causality.
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(ATTENTION, _gqa_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_gqa_attention(model) -> None:
    """Run `model`'s attention through `ATTENTION` where it runs transformers' "sdpa"."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    model.set_attn_implementation(ATTENTION)
    log.debug("%s: attention %s", type(model).__name__, ATTENTION)
