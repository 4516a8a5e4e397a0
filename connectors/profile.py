"""`python -m connectors.profile`: profile a cachegen codebook for a Hugging Face causal LM and save it.

    python -m connectors.profile --texts FILE --out ~/.cache/kvstore/codebooks [--model NAME|DIR] [--dtype D]
        [--fingerprint FP] [--chunks 48] [--sensitivity-contexts 8 | --sensitivity-from CODEBOOK]
        [--calibration-contexts N (8; 0 with --sensitivity-from)] [--calibration-layers-per-group 1]

`--model` is a registered model (`smollm2-135m`, the default; `tiny`) or a local transformers model folder,
loaded in `--dtype` (the dtype it will be served in: the fingerprint, and so the codebook, depends on it);
the codebook is written under the transformers connector's fingerprint of that model, or under
`--fingerprint` (another engine's name for the same model's KV, e.g. the vLLM connector's, which hashes
the folder rather than the module: the missing-codebook warning and metric name it; its dtype field must
be `--dtype`);
`--texts` a file with
one text per line, or a .jsonl whose objects have a "text" field or "passages" (texts like the ones the
model will serve; never the set you measure on).

Three steps, then the codebook (`codec.profile.profile_kv`), written as `<fingerprint>.kvcb` into
`--out`, where `codec.codebook.codebooks` finds it (see docs/CODEC.md):
- the model's sensitivity to each (layer, K/V, channel) of its KV (`kv_sensitivity`): over
  `--sensitivity-contexts` windows of the texts (512 context tokens, 64 continuation tokens), the Fisher
  information of the continuation's next-token distributions with respect to the context's KV (the
  squared gradient of the log-probability of tokens drawn from the model itself), averaged over tokens;
  the first token of each window, the attention sink, is left out (the codec keeps sink tokens apart).
  This sets each level's step per (layer, K/V, channel); 0 contexts keeps the layer-RMS steps;
  `--sensitivity-from` takes it back from an existing codebook's steps instead (`codebook_sensitivity`);
- its calibration (`calibrate_sensitivity`): over `--calibration-contexts` windows, the KL measured when
  one (layer, K/V) (or group of layers) alone goes through the codec at level 2 rescales that
  (layer, K/V)'s sensitivity, since the Fisher information's prediction (the same KL from each) is off
  by up to 10x between layers on SmolLM2. Default 8 windows for a measured sensitivity, none for one
  taken `--sensitivity-from` a codebook: its steps already carry the calibration it was made with, and
  calibrating again would apply a second set of factors on top of the first. A re-profile on the same
  texts then keeps, bit for bit, the steps and tables of every level whose budget is a power-of-2
  multiple of the lowest level's (levels 1-3; level 4's steps can move by one bfloat16 rounding, the
  sensitivity being taken back from level 1's rounded steps); pass `--calibration-contexts N` to
  calibrate an uncalibrated codebook's steps;
- the symbol statistics of the texts' full 256-token chunks at those steps (`--chunks` of them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from codec.profile import profile_kv
from connectors.hf import kv_to_cache, model_fingerprint, prefill_kv, run_cached

CHUNK = 256


def read_texts(path: Path) -> list[str]:
    texts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            obj = json.loads(line)
            texts.append(obj["text"] if "text" in obj else "\n\n".join(obj.get("passages", [])))
        else:
            texts.append(line)
    return texts


def sample_chunks(model, tokenizer, texts: list[str], max_chunks: int) -> Iterator[torch.Tensor]:
    """KV [L, 2, 256, H, D] of up to `max_chunks` full 256-token chunks of `texts`, prefilled by `model`."""
    n = 0
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    for text in texts:
        ids = torch.tensor(tokenizer.encode(text))
        # whole chunks, within the model's positions and no more than are still wanted
        full = min(len(ids), limit, (max_chunks - n) * CHUNK) // CHUNK * CHUNK
        if full == 0:
            continue
        kv = prefill_kv(model, ids[:full]).cpu()  # [L, 2, T, H, D]
        for s in range(0, full, CHUNK):
            yield kv[:, :, s : s + CHUNK]
            n += 1
            if n >= max_chunks:
                return


def _windows(tokenizer, texts: list[str], contexts: int, span: int) -> list[torch.Tensor]:
    """Up to `contexts` windows of `span` token ids, spread evenly over the concatenated texts;
    `ValueError` when the texts are too short for one."""
    ids = torch.tensor([t for text in texts for t in tokenizer.encode(text)], dtype=torch.long)
    n_win = min(contexts, len(ids) // span)
    if n_win < 1:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {span}")
    stride = len(ids) // n_win
    return [ids[i * stride : i * stride + span] for i in range(n_win)]


def kv_sensitivity(model, tokenizer, texts: list[str], contexts: int, context_tokens: int = 2 * CHUNK,
                   continuation: int = 64, draws: int = 2, seed: int = 0) -> np.ndarray:
    """[L * 2 * H * D] float64: E[(d log p(y) / d kv)**2] per (layer, K/V, channel), y drawn from the model's
    own next-token distributions over `continuation` tokens after `context_tokens` of context, averaged
    over `contexts` windows of the concatenated texts, `draws` draws each and the context's tokens but its
    first (the attention sink). `ValueError` when the texts are too short for one window."""
    windows = _windows(tokenizer, texts, contexts, context_tokens + continuation)
    n_win = len(windows)
    gen = torch.Generator().manual_seed(seed)
    total = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients w.r.t. the KV only
        p.requires_grad_(False)
    try:
        for i in range(n_win):
            window = windows[i].to(model.device)
            cont = window[context_tokens:].reshape(1, -1)
            with torch.no_grad():
                kv = prefill_kv(model, window[:context_tokens])  # [L, 2, T, H, D]
            for _ in range(draws):
                x = kv.clone().requires_grad_(True)
                logits = run_cached(model, cont, kv_to_cache(x, model))[0].logits[0].float()  # [continuation, V]
                y = torch.multinomial(torch.softmax(logits.detach(), -1).cpu(), 1, generator=gen).to(logits.device)
                (grad,) = torch.autograd.grad(torch.log_softmax(logits, -1).gather(1, y).sum(), x)
                g2 = grad[:, :, 1:].float().pow(2).sum(dim=2)  # [L, 2, H, D]
                total = g2 if total is None else total + g2
    finally:
        for p in trainable:
            p.requires_grad_(True)
    count = n_win * draws * (context_tokens - 1)
    return (total / count).reshape(-1).double().cpu().numpy()


@torch.inference_mode()
def calibrate_sensitivity(model, tokenizer, texts: list[str], sensitivity: np.ndarray, contexts: int, level: int = 2,
                          context_tokens: int = 2 * CHUNK, continuation: int = 64, clip: float = 100.0,
                          layers_per_group: int = 1) -> np.ndarray:
    """The Fisher sensitivity [L * 2 * C] rescaled per (layer, K/V) by what the model measurably does.

    The Fisher information predicts the same KL from every (layer, K/V) at its steps; the KL measured when
    only that (layer, K/V) of a context goes through the codec (at `level`'s steps, 256-token chunks,
    sink tokens kept) is not: on SmolLM2 the keys and the first layers weigh several times more than
    predicted. Each (layer, K/V)'s sensitivity is multiplied by its measured KL over their geometric mean
    (clipped to [1 / clip, clip]), so steps shrink where the model reacts more than predicted and the
    bits stay about the same. `layers_per_group` consecutive layers share one factor per K/V (fewer passes).
    Over `contexts` windows of the texts; 2 * ceil(L / layers_per_group) + 1 forward passes of
    `continuation` tokens each. `ValueError` when the texts are too short for one window."""
    from codec.cachegen_quant import LEVELS, _bf16_to_f32, _bf16_up, reconstruct, sensitivity_steps

    spec = LEVELS[level]
    base = _bf16_to_f32(_bf16_up(sensitivity_steps(sensitivity, spec)))
    kl = None

    def logprobs(kv, cont):
        return torch.log_softmax(run_cached(model, cont, kv_to_cache(kv.to(model.device), model))[0].logits[0].float(), -1)

    for window in _windows(tokenizer, texts, contexts, context_tokens + continuation):
        window = window.to(model.device)
        cont = window[context_tokens:].reshape(1, -1)
        kv = prefill_kv(model, window[:context_tokens]).cpu()  # [L, 2, T, H, D]
        ref = logprobs(kv, cont)
        rec = torch.cat([reconstruct(kv[:, :, s : s + CHUNK], spec, base) for s in range(0, context_tokens, CHUNK)], 2)
        layers = kv.shape[0]
        starts = range(0, layers, max(1, layers_per_group))
        if kl is None:
            kl = np.zeros((len(starts), 2))
        for g, first in enumerate(starts):
            for kvi in (0, 1):
                x = kv.clone()
                x[first : first + layers_per_group, kvi] = rec[first : first + layers_per_group, kvi].to(kv.dtype)
                lp = logprobs(x, cont)
                kl[g, kvi] += (ref.exp() * (ref - lp)).sum(-1).mean().item()
    kl = np.maximum(kl, kl.max() * 1e-6)
    factor = np.clip(kl / np.exp(np.log(kl).mean()), 1 / clip, clip)
    factor = np.repeat(factor, max(1, layers_per_group), axis=0)[:layers]  # [L, 2]
    return (np.asarray(sensitivity, dtype=np.float64).reshape(factor.size, -1) * factor.reshape(-1, 1)).reshape(-1)


def codebook_sensitivity(path: Path) -> np.ndarray:
    """The sensitivity [L * 2 * C] a codebook's steps were made from (`budget / sqrt(w)` inverted, at the
    lowest level with steps), to re-calibrate or re-profile without measuring the Fisher information again."""
    from codec.base import CodecError
    from codec.cachegen_quant import LEVELS
    from codec.codebook import Codebook

    cb = Codebook.load(path)
    levels = sorted(lv for lv in cb.step_bits if lv in LEVELS)
    if not levels:
        raise CodecError(f"codebook {path} has no steps to take a sensitivity from")
    return (LEVELS[levels[0]].budget / cb.base_steps(levels[0]).astype(np.float64)) ** 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m connectors.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write <fingerprint>.kvcb into")
    ap.add_argument("--texts", type=Path, required=True, help="texts to profile on (.txt lines or .jsonl)")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny or a Hugging Face folder")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="the dtype the model will be served in: part of the fingerprint the codebook is for")
    ap.add_argument("--fingerprint", default=None,
                    help="write the codebook under this model fingerprint (default: the transformers connector's "
                         "for the loaded model); for another engine's, e.g. the vLLM connector's "
                         "`<type>-<dtype>-vllm-<hex>`, as its missing-codebook warning or metric names it")
    ap.add_argument("--chunks", type=int, default=48, help="256-token chunks to profile (default 48)")
    ap.add_argument("--sensitivity-contexts", type=int, default=8,
                    help="576-token windows to measure the model's sensitivity on (default 8; 0: layer-RMS steps)")
    ap.add_argument("--sensitivity-from", type=Path, default=None,
                    help="take the sensitivity from this codebook's steps instead of measuring it")
    ap.add_argument("--calibration-contexts", type=int, default=None,
                    help="576-token windows to calibrate the sensitivity per (layer, K/V) on, by the KL measured "
                         "through the codec (default 8, or 0 with --sensitivity-from: a codebook's steps already "
                         "carry their calibration; 0: the sensitivity as measured or taken)")
    ap.add_argument("--calibration-layers-per-group", type=int, default=1,
                    help="consecutive layers that share one calibration factor per K/V (default 1; more: fewer passes)")
    args = ap.parse_args(argv)
    if args.calibration_contexts is None:
        args.calibration_contexts = 0 if args.sensitivity_from is not None else 8
    if args.chunks < 1 or args.sensitivity_contexts < 0 or args.calibration_contexts < 0:
        ap.error("--chunks must be >= 1, --sensitivity-contexts and --calibration-contexts >= 0")
    from connectors.models import load_model

    if args.fingerprint is not None and args.fingerprint.split("-")[1:2] != [args.dtype]:
        ap.error(f"fingerprint {args.fingerprint!r} is not of a model served in {args.dtype}: "
                 f"profile with the --dtype its second field names")
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    texts = read_texts(args.texts)
    sensitivity = None
    if args.sensitivity_from is not None:
        sensitivity = codebook_sensitivity(args.sensitivity_from)
    elif args.sensitivity_contexts:
        t0 = time.perf_counter()
        try:
            sensitivity = kv_sensitivity(model, tokenizer, texts, args.sensitivity_contexts)
        except ValueError as e:
            ap.error(str(e))
        print(f"sensitivity over {args.sensitivity_contexts} contexts: {time.perf_counter() - t0:.1f} s")
    if sensitivity is not None and args.calibration_contexts:
        t0 = time.perf_counter()
        try:
            sensitivity = calibrate_sensitivity(model, tokenizer, texts, sensitivity, args.calibration_contexts,
                                                layers_per_group=args.calibration_layers_per_group)
        except ValueError as e:
            ap.error(str(e))
        print(f"calibration over {args.calibration_contexts} contexts: {time.perf_counter() - t0:.1f} s")
    fingerprint = args.fingerprint or model_fingerprint(model)
    cb = profile_kv(fingerprint, sample_chunks(model, tokenizer, texts, args.chunks), sensitivity)
    path = cb.save(args.out)
    print(f"codebook for {cb.fingerprint}: {path} ({path.stat().st_size} bytes, levels {sorted(cb.freqs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
