"""Hugging Face transformers connector: context loading from the store for a Llama-family causal LM.

- `attention`: `use_gqa_attention(model)`, transformers' SDPA attention without copying a grouped-query
  model's KV heads per query head (what the connectors run their models with; the same results).
- `bridge`: primitives between transformers and the store's layout (layout, fingerprint, cache <-> KV,
  prefill, chunking a context, greedy decoding) and `Prefill`, a prefilled prompt.
- `loader`: `HFConnector`, prefix reuse for one model: lookup, load, prefill the rest, store the new chunks.
- `sessions`: `ChatSession` (every turn reuses the previous turns) and `DocumentQA` (many questions over
  one long document).
"""

from connectors.hf.attention import use_gqa_attention
from connectors.hf.bridge import (Prefill, append_kv, cache_layers, cache_to_kv, compute_chunks, decode_greedy,
                                  kv_from_layers, kv_layout, kv_to_cache, model_fingerprint, prefill_kv,
                                  reserved_cache, run_cached)
from connectors.hf.loader import Generation, HFConnector, LoadReport
from connectors.hf.sessions import ChatSession, DocumentQA, Turn

__all__ = ["ChatSession", "DocumentQA", "Generation", "HFConnector", "LoadReport", "Prefill", "Turn", "append_kv",
           "cache_layers", "cache_to_kv", "compute_chunks", "decode_greedy", "kv_from_layers", "kv_layout",
           "kv_to_cache", "model_fingerprint", "prefill_kv", "reserved_cache", "run_cached", "use_gqa_attention"]
