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
from connectors.profile import calibrate_sensitivity, codebook_sensitivity, kv_sensitivity, main  # noqa: E402
from kvstore.store import TieredStore  # noqa: E402
from kvstore.tiers import MemoryTier  # noqa: E402

TEXT = ("The river rose slowly through the night, and by morning the lower fields were under water. "
        "Farmers moved their animals to the hills while the children watched the boats go by. ") * 12


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_codebook_fingerprint_is_the_served_models(tmp_path, dtype):
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXT + "\n" + TEXT.upper() + "\n")
    out = tmp_path / "codebooks"
    # one window each for the sensitivity and its calibration: what this test checks is whose fingerprint
    # the codebook carries (the defaults, 8 + 8 windows, took ~2 min per dtype on 2 cores)
    assert main(["--model", "tiny", "--dtype", dtype, "--texts", str(texts), "--out", str(out), "--chunks", "2",
                 "--sensitivity-contexts", "1", "--calibration-contexts", "1"]) == 0
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


def test_calibration_follows_the_measured_kl():
    """A (layer, K/V) given 10x finer steps than the rest shows less KL through the codec, so calibration
    gives it a smaller factor; the factors are per (layer, K/V) and their geometric mean is 1."""
    model, tok = load_model("tiny", torch.float32)
    cfg = model.config
    channels = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    w = np.ones((cfg.num_hidden_layers * 2, channels))
    w[1] *= 100.0  # layer 0's values: 10x finer steps
    out = calibrate_sensitivity(model, tok, [TEXT * 3], w.reshape(-1), contexts=1, context_tokens=64, continuation=8)
    factor = out.reshape(w.shape) / w
    assert np.allclose(factor, factor[:, :1])  # one factor per (layer, K/V)
    f = factor[:, 0]
    assert np.all(f > 0) and abs(np.log(f).mean()) < 1e-6
    assert f[1] < np.median(f)
    with pytest.raises(ValueError, match="window"):
        calibrate_sensitivity(model, tok, ["too short"], w.reshape(-1), contexts=1)


def test_sensitivity_back_from_a_codebook(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXT * 2 + "\n")
    out = tmp_path / "codebooks"
    args = ["--model", "tiny", "--texts", str(texts), "--out", str(out), "--chunks", "1", "--sensitivity-contexts", "1",
            "--calibration-contexts", "0"]
    assert main(args) == 0
    (path,) = out.glob("*.kvcb")
    w = codebook_sensitivity(path)
    cb = Codebook.load(path)
    assert w.shape == (cb.layers * 2 * cb.channels,) and (w > 0).all()
    # steps remade from it are the codebook's (bfloat16 rounding aside)
    from codec.cachegen_quant import sensitivity_steps
    for lv in LEVELS:
        assert np.allclose(sensitivity_steps(w, LEVELS[lv]), cb.base_steps(lv), rtol=2e-2)
    # and a profile from it, calibrated, writes a codebook too
    again = tmp_path / "again"
    assert main(args[:4] + ["--out", str(again), "--chunks", "1", "--sensitivity-from", str(path), "--calibration-contexts", "1"]) == 0
    assert len(list(again.glob("*.kvcb"))) == 1
    # without --calibration-contexts a profile from a codebook does not calibrate its steps again: on the
    # same texts, every level whose budget is a power-of-2 multiple of the lowest level's comes out the same
    same = tmp_path / "same"
    assert main(args[:4] + ["--out", str(same), "--chunks", "1", "--sensitivity-from", str(path)]) == 0
    (remade,) = (Codebook.load(p) for p in same.glob("*.kvcb"))
    kept = [lv for lv in LEVELS if np.log2(LEVELS[1].budget / LEVELS[lv].budget).is_integer()]
    assert kept == [1, 2, 3]
    for lv in kept:
        assert np.array_equal(remade.step_bits[lv], cb.step_bits[lv]) and np.array_equal(remade.freqs[lv], cb.freqs[lv])
