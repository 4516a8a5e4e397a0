"""Models and prompts for the blend tests: the shipped model and small random Llama / Mistral / Qwen2
models (GQA, scaled RoPE) built in-process, and a helper that turns passages into segments."""

from __future__ import annotations

import pytest
import torch

from blend import Segment
from connectors.hf import prefill_kv


def _small(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed({"llama": 1, "mistral": 2, "qwen2": 3}[kind])
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if kind == "llama":
        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 128})
        model = LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = MistralConfig(**common, sliding_window=48,
                            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
        model = MistralForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # Qwen2 has q/k/v biases; HF initializes them to zero, so make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="session")
def small_models():
    """kind -> a small random model (fp32, eval)."""
    return {k: _small(k) for k in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def shipped():
    from connectors.models import load_model

    return load_model("tiny", torch.float32)


def passage_segments(model, passages: list[torch.Tensor], question: torch.Tensor,
                     sep: torch.Tensor | None = None) -> list[Segment]:
    """Each passage prefilled alone from position 0 (cached), a separator after each (fresh), the question."""
    segs = []
    for p in passages:
        segs.append(Segment.cached(p, prefill_kv(model, p)))
        if sep is not None:
            segs.append(Segment.fresh(sep))
    segs.append(Segment.fresh(question))
    return segs


def random_prompt(vocab: int, lengths: list[int], q_len: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randint(1, vocab, (n,), generator=g) for n in lengths],
            torch.randint(1, vocab, (q_len,), generator=g))


@pytest.fixture(scope="session")
def make_segments():
    return passage_segments


@pytest.fixture(scope="session")
def make_prompt():
    return random_prompt
