"""`python -m connectors.profile`: the codebook is written under the fingerprint of the model as it will be
served (its dtype included), which is the fingerprint the connectors compute, so cachegen then finds it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from codec.cachegen import LEVELS  # noqa: E402
from codec.codebook import Codebook, CodebookRegistry  # noqa: E402
from connectors.hf import HFConnector, model_fingerprint  # noqa: E402
from connectors.models import load_model  # noqa: E402
from connectors.profile import kv_sensitivity, main  # noqa: E402
from kvstore.store import TieredStore  # noqa: E402
from kvstore.tiers import MemoryTier  # noqa: E402

TEXT = ("The river rose slowly through the night, and by morning the lower fields were under water. "
        "Farmers moved their animals to the hills while the children watched the boats go by. ") * 12


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_codebook_fingerprint_is_the_served_models(tmp_path, dtype):
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXT + "\n" + TEXT.upper() + "\n")
    out = tmp_path / "codebooks"
    assert main(["--model", "tiny", "--dtype", dtype, "--texts", str(texts), "--out", str(out), "--chunks", "2"]) == 0
    (path,) = out.glob("*.kvcb")
    cb = Codebook.load(path)
    served, _ = load_model("tiny", getattr(torch, dtype))
    connector = HFConnector(served, TieredStore([MemoryTier(1 << 20)], chunk_tokens=32))
    assert cb.fingerprint == model_fingerprint(served) == connector.fingerprint
    assert f"-{dtype}-" in cb.fingerprint
    assert sorted(cb.step_bits) == sorted(LEVELS)  # steps from the measured sensitivity, every level
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    assert cb.fingerprint != model_fingerprint(load_model("tiny", getattr(torch, other))[0])
    # the registry cachegen binds through finds it under the fingerprint the connector stores with
    found = CodebookRegistry([out]).for_fingerprint(connector.fingerprint)
    assert found is not None and found.digest == cb.digest


def test_sensitivity_of_the_tiny_model():
    model, tok = load_model("tiny", torch.float32)
    w = kv_sensitivity(model, tok, [TEXT * 3], contexts=2, draws=1)
    cfg = model.config
    channels = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert w.shape == (cfg.num_hidden_layers * 2 * channels,)
    assert np.isfinite(w).all() and (w >= 0).all() and w.max() > 0
    assert all(p.requires_grad for p in model.parameters())  # left as it was
    with pytest.raises(ValueError, match="window"):
        kv_sensitivity(model, tok, ["too short"], contexts=2)


def test_codebook_under_another_engines_fingerprint(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXT + "\n")
    out = tmp_path / "codebooks"
    fp = "llama-bfloat16-vllm-0123456789abcdef"  # the shape of the vLLM connector's fingerprints
    args = ["--model", "tiny", "--texts", str(texts), "--out", str(out), "--chunks", "1", "--sensitivity-contexts", "0"]
    assert main(args + ["--dtype", "bfloat16", "--fingerprint", fp]) == 0
    assert CodebookRegistry([out]).for_fingerprint(fp) is not None
    with pytest.raises(SystemExit):  # a float32 profile cannot serve a bfloat16 engine's chunks
        main(args + ["--dtype", "float32", "--fingerprint", fp])
