"""The small Llama model shipped with the project: the default model of the demo and the benchmarks.

Owns the location of the fixture ``connectors/assets/tiny-llama/`` (Hugging Face format: config.json,
generation_config.json, model.safetensors in bf16, tokenizer.json/tokenizer_config.json) and a loader.
The model is a genuine ``LlamaForCausalLM`` (RoPE, RMSNorm, grouped-query attention) trained on this
machine class by ``benchmarks/models/train_tiny.py``; see docs/MODEL.md for its recipe and scores.
Loading never touches the network: the path is local and ``local_files_only`` is set.
"""

from __future__ import annotations

from pathlib import Path

import torch

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny-llama"


def shipped_model_path() -> Path:
    """Directory of the shipped model, loadable with ``AutoModelForCausalLM.from_pretrained(path)``."""
    return ASSET_DIR


def load_shipped_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) of the shipped model; weights are stored in bf16 and cast to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shipped_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"shipped model missing at {path}; train it: python -m benchmarks.models.train_tiny")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    return model, tokenizer
