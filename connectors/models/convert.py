"""GGUF (Llama architecture) -> a plain Hugging Face folder that transformers and vLLM load.

`convert_gguf(gguf_path, out_dir, progress)` writes config.json (`LlamaForCausalLM`, no
`quantization_config`), generation_config.json, model.safetensors and the tokenizer with its chat
template. Weights are dequantized with the `gguf` package alone (numpy; ~2 s for 135M parameters on
2 cores, where transformers' own GGUF load takes ~25 s and needs `accelerate`) and stored in float32:
Q4_1 and Q8_0 values are exact in float32 and not in 16-bit floats, so the folder holds exactly the
weights the GGUF describes. llama.cpp stores the rows of the Q and K projections permuted for its RoPE
kernel; they are permuted back here. The tokenizer is rebuilt from the GGUF's vocabulary and merges by
transformers' GGUF tokenizer converter (which needs only `gguf`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from connectors.models.source import ModelSourceError

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama parameter name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a Q or K projection: w [heads * head_dim, hidden]."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_TENSORS:
        raise ModelSourceError(f"unexpected tensor {gguf_name!r} in the GGUF (only Llama models are converted)")
    return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"


def _config(reader, tied: bool):
    from transformers import GenerationConfig, LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelSourceError(f"the GGUF's architecture is {arch!r}; only 'llama' is converted")
    p = f"{arch}."
    heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    ids = {k: int(_field(reader, f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos")}
    pad = _field(reader, "tokenizer.ggml.padding_token_id", ids["eos"])
    config = LlamaConfig(
        vocab_size=int(_field(reader, p + "vocab_size", len(_field(reader, "tokenizer.ggml.tokens")))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, p + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, p + "rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, p + "context_length")),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=int(pad),
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = torch.float32
    generation = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=int(pad))
    return config, generation


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Callable[[int, int], None] | None = None) -> None:
    """Write the Hugging Face folder of `gguf_path` into `out_dir` (which must exist and be empty).
    `progress(done, total)` is called as tensors are converted."""
    import gguf
    from safetensors.torch import save_file

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError, IndexError) as e:  # the file was verified; this is a reader limit
        raise ModelSourceError(f"{gguf_path} could not be read as GGUF: {e}") from None
    names = [t.name for t in reader.tensors]
    config, generation = _config(reader, tied="output.weight" not in names)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    total = len(reader.tensors) + 1
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        # A new writable float32 array per tensor (F32 tensors come back as read-only views of the file).
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            w = _unpermute(w, heads[kind])
        tensors[_hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
        if progress:
            progress(i + 1, total)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)  # safetensors creates it private; the rest of the folder is 0644
    config.save_pretrained(out_dir)
    generation.save_pretrained(out_dir)
    _save_tokenizer(gguf_path, out_dir, config.max_position_embeddings)
    if progress:
        progress(total, total)


def _save_tokenizer(gguf_path: Path, out_dir: Path, max_length: int) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its GGUF reader announces itself; the caller shows progress
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    finally:
        hf_logging.set_verbosity(level)
    tok.model_max_length = max_length
    tok.save_pretrained(out_dir)
    # The template is also kept inside tokenizer_config.json, where readers of any version look for it.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if tok.chat_template and "chat_template" not in cfg:
        cfg["chat_template"] = tok.chat_template
    cfg.pop("is_local", None)
    cfg.pop("local_files_only", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    logging.getLogger(__name__).debug("tokenizer written to %s", out_dir)
