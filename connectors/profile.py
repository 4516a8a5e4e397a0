"""`python -m connectors.profile`: profile a cachegen codebook for a Hugging Face causal LM and save it.

    python -m connectors.profile --texts FILE --out ~/.cache/kvstore/codebooks [--model NAME|DIR] [--dtype D]
        [--fingerprint FP] [--chunks 48] [--sensitivity-contexts 8]

`--model` is a registered model (`smollm2-135m`, the default; `tiny`) or a local transformers model folder,
loaded in `--dtype` (the dtype it will be served in: the fingerprint, and so the codebook, depends on it);
the codebook is written under the transformers connector's fingerprint of that model, or under
`--fingerprint` (another engine's name for the same model's KV, e.g. the vLLM connector's, which hashes
the folder rather than the module: the missing-codebook warning and metric name it; its dtype field must
be `--dtype`);
`--texts` a file with
one text per line, or a .jsonl whose objects have a "text" field or "passages" (texts like the ones the
model will serve; never the set you measure on).

Two measurements, then the codebook (`codec.profile.profile_kv`), written as `<fingerprint>.kvcb` into
`--out`, where `codec.codebook.codebooks` finds it (see docs/CODEC.md):
- the model's sensitivity to each (layer, K/V, channel) of its KV (`kv_sensitivity`): over
  `--sensitivity-contexts` windows of the texts (512 context tokens, 64 continuation tokens), the Fisher
  information of the continuation's next-token distributions with respect to the context's KV (the
  squared gradient of the log-probability of tokens drawn from the model itself), averaged over tokens;
  the first token of each window, the attention sink, is left out (the codec keeps sink tokens apart).
  This sets each level's step per (layer, K/V, channel); 0 contexts keeps the layer-RMS steps;
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


def kv_sensitivity(model, tokenizer, texts: list[str], contexts: int, context_tokens: int = 2 * CHUNK,
                   continuation: int = 64, draws: int = 2, seed: int = 0) -> np.ndarray:
    """[L * 2 * H * D] float64: E[(d log p(y) / d kv)**2] per (layer, K/V, channel), y drawn from the model's
    own next-token distributions over `continuation` tokens after `context_tokens` of context, averaged
    over `contexts` windows of the concatenated texts, `draws` draws each and the context's tokens but its
    first (the attention sink). `ValueError` when the texts are too short for one window."""
    span = context_tokens + continuation
    ids = torch.tensor([t for text in texts for t in tokenizer.encode(text)], dtype=torch.long)
    n_win = min(contexts, len(ids) // span)
    if n_win < 1:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {span}")
    stride = len(ids) // n_win
    gen = torch.Generator().manual_seed(seed)
    total = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients w.r.t. the KV only
        p.requires_grad_(False)
    try:
        for i in range(n_win):
            window = ids[i * stride : i * stride + span].to(model.device)
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
    args = ap.parse_args(argv)
    if args.chunks < 1 or args.sensitivity_contexts < 0:
        ap.error("--chunks must be >= 1 and --sensitivity-contexts >= 0")
    from connectors.models import load_model

    if args.fingerprint is not None and args.fingerprint.split("-")[1:2] != [args.dtype]:
        ap.error(f"fingerprint {args.fingerprint!r} is not of a model served in {args.dtype}: "
                 f"profile with the --dtype its second field names")
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    texts = read_texts(args.texts)
    sensitivity = None
    if args.sensitivity_contexts:
        t0 = time.perf_counter()
        try:
            sensitivity = kv_sensitivity(model, tokenizer, texts, args.sensitivity_contexts)
        except ValueError as e:
            ap.error(str(e))
        print(f"sensitivity over {args.sensitivity_contexts} contexts: {time.perf_counter() - t0:.1f} s")
    fingerprint = args.fingerprint or model_fingerprint(model)
    cb = profile_kv(fingerprint, sample_chunks(model, tokenizer, texts, args.chunks), sensitivity)
    path = cb.save(args.out)
    print(f"codebook for {cb.fingerprint}: {path} ({path.stat().st_size} bytes, levels {sorted(cb.freqs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
