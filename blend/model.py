"""Drive a Hugging Face Llama-family causal LM one layer at a time, for any subset of the prompt's rows.

Blend recomputes a different set of tokens at every layer, attending over a KV cache that mixes cached
and fresh rows. transformers' own forward cannot do that, so this module calls the model's modules itself
(no patching): `embed_tokens`, `rotary_emb`, and per decoder layer `input_layernorm`,
`self_attn.{q,k,v,o}_proj` (biases as the modules have them; `q_norm`/`k_norm` where present),
`post_attention_layernorm`, `mlp`; then the final `norm` and `lm_head`.

Primitives of `LayerDriver` (one per model; rows are prompt positions 0..T-1):
- `embed(ids)`: hidden states `[N, E]` of token ids `[N]`;
- `rope(rows)`: cos, sin `[N, 1, D]` of those positions, from the model's own rotary embedding;
- `qkv(layer, hidden, cos, sin)`: post-RoPE queries `[N, Hq, D]`, keys and values `[N, H, D]`;
- `attend_mlp(layer, hidden, q, rows, kv)`: the rest of the layer for query rows `rows` `[N]` (sorted)
  against the merged KV `kv` `[2, T, H, D]`, with the exact mask of the model: row p attends to every row
  <= p (and > p - window on sliding-window layers);
- `attention_to(layer, q, rows, k)`: the attention `[T]` that query rows `rows` pay to each row of keys `k`
  `[T, H, D]` (softmax over the rows each may see, mean over heads and query rows);
- `logits(hidden)`: final norm + lm_head `[N, V]`.

Supported: `model_type` llama, mistral, qwen2, qwen3 (grouped-query attention, any rope type that
transformers' rotary embedding computes from positions alone). Anything else raises `BlendModelError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blend.errors import BlendModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
QUERY_BLOCK = 512  # queries per attention call: keys stop at the block's last row, skipping most of the causal half


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LayerDriver:
    """Layer-by-layer access to one model; holds no per-prompt state."""

    def __init__(self, model) -> None:
        cfg = model.config
        mtype = getattr(cfg, "model_type", None)
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise BlendModelError(f"blend supports model types {SUPPORTED_MODEL_TYPES}, got {mtype!r}")
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise BlendModelError(f"{type(model).__name__} is not a *ForCausalLM with .model.layers and .lm_head")
        self.model = model
        self.inner = inner
        self.layers = list(inner.layers)
        self.num_layers = len(self.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.windows = [self._window(cfg, i) for i in range(self.num_layers)]

    @staticmethod
    def _window(cfg, i: int) -> int | None:
        """Sliding window of layer i (None: full causal), as the model's mask builder reads it."""
        window = getattr(cfg, "sliding_window", None)
        if window is None:
            return None
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return int(window) if types[i] == "sliding_attention" else None
        if getattr(cfg, "model_type", None) in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
            return None
        return int(window)

    # -- pieces of a forward ---------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [N] int64 -> hidden [N, E] in the model's dtype."""
        return self.inner.embed_tokens(ids.to(self.device))

    def rope(self, rows: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows: [N] int64 positions -> cos, sin [N, 1, D] in `like`'s dtype (the model's own rotary embedding)."""
        cos, sin = self.inner.rotary_emb(like[None], rows.to(self.device)[None])  # [1, N, D]
        return cos[0, :, None, :], sin[0, :, None, :]

    def qkv(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden: [N, E] (input of the layer) -> q [N, Hq, D], k [N, H, D] (post-RoPE), v [N, H, D]."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        n, d = x.shape[0], self.head_dim
        q = attn.q_proj(x).view(n, -1, d)
        k = attn.k_proj(x).view(n, -1, d)
        v = attn.v_proj(x).view(n, -1, d)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def attend_mlp(self, layer: int, hidden: torch.Tensor, q: torch.Tensor, rows: torch.Tensor,
                   kv: torch.Tensor) -> torch.Tensor:
        """The layer's output for query rows. hidden: [N, E] (layer input); q: [N, Hq, D]; rows: [N] int64
        sorted ascending; kv: [2, T, H, D] the merged KV of this layer (row r at position r).
        Returns hidden [N, E] (the next layer's input)."""
        block = self.layers[layer]
        attn = block.self_attn
        window = self.windows[layer]
        n = rows.numel()
        end = int(rows[-1]) + 1  # no query attends past the last row
        group = self.num_heads // self.num_kv_heads
        # [1, Hq, end, D]: K/V repeated per query head (the CPU fused kernel is much slower with enable_gqa)
        k_all = kv[0, :end].transpose(0, 1).repeat_interleave(group, dim=0)[None]
        v_all = kv[1, :end].transpose(0, 1).repeat_interleave(group, dim=0)[None]
        q_all = q.transpose(0, 1)[None]  # [1, Hq, N, D]
        if n == end and (window is None or window >= end):  # every row 0..end-1: the plain causal prefill
            out = F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True, scale=attn.scaling)
        else:
            out = torch.empty_like(q_all)
            rows_dev = rows.to(self.device)
            for s in range(0, n, QUERY_BLOCK):
                r = rows_dev[s : s + QUERY_BLOCK]  # [b]
                last = int(rows[min(s + QUERY_BLOCK, n) - 1]) + 1
                first = 0 if window is None else max(0, int(rows[s]) - window + 1)
                kpos = torch.arange(first, last, device=self.device)  # [Tk]
                mask = kpos[None, :] <= r[:, None]  # [b, Tk]
                if window is not None:
                    mask &= kpos[None, :] > r[:, None] - window
                out[:, :, s : s + QUERY_BLOCK] = F.scaled_dot_product_attention(
                    q_all[:, :, s : s + QUERY_BLOCK], k_all[:, :, first:last], v_all[:, :, first:last],
                    attn_mask=mask, scale=attn.scaling)  # [1, Hq, b, D]
        out = out[0].transpose(0, 1)  # [N, Hq, D]
        hidden = hidden + attn.o_proj(out.reshape(out.shape[0], -1))
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def attention_to(self, layer: int, q: torch.Tensor, rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: [N, Hq, D] post-RoPE queries of rows `rows` [N] int64; k: [T, H, D] post-RoPE keys of rows 0..T-1.
        Returns [T] fp32: each key row's attention weight, mean over the N rows and the Hq heads (0 where
        no query row sees it)."""
        group = self.num_heads // self.num_kv_heads
        kk = k.float().repeat_interleave(group, dim=1)  # [T, Hq, D]
        scores = torch.einsum("nhd,thd->hnt", q.float(), kk) * self.layers[layer].self_attn.scaling  # [Hq, N, T]
        kpos = torch.arange(k.shape[0], device=k.device)
        r = rows.to(k.device)
        visible = kpos[None, :] <= r[:, None]  # [N, T]
        window = self.windows[layer]
        if window is not None:
            visible &= kpos[None, :] > r[:, None] - window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)  # [Hq, N, T]
        return probs.mean((0, 1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, E] output of the last layer -> logits [N, V]."""
        return self.model.lm_head(self.inner.norm(hidden))
