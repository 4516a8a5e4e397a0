"""`python -m codec.profile`: profile a cachegen codebook for a Hugging Face causal LM and save it.

    python -m codec.profile --out ~/.cache/kvstore/codebooks [--model DIR] [--texts FILE] [--chunks 48]

`--model` is a local transformers model folder (default: the shipped tiny Llama); `--texts` a file with
one text per line, or a .jsonl whose objects have a "text" field or "passages" (default: training-style
texts from the corpus generator, never the held-out set the benchmark measures on). The KV of
each text's full 256-token chunks is quantized at every level and counted; the codebook is written as
`<fingerprint>.kvcb` into `--out`, where `codec.codebook.codebooks` finds it (see docs/CODEC.md).

This is an edge tool: unlike the rest of `codec`, it imports the model bridge of `connectors`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from codec.base import CodecError
from codec.cachegen import LEVELS, count_symbols
from codec.codebook import Codebook, profile_codebook

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


def profile_model(model, tokenizer, texts: list[str], max_chunks: int) -> Codebook:
    """KV of up to `max_chunks` full 256-token chunks of `texts` -> the model's codebook."""
    from connectors.hf import kv_layout, model_fingerprint, prefill_kv

    layout = kv_layout(model)
    counts: dict[int, object] = {lv: None for lv in LEVELS}
    n = 0
    for text in texts:
        ids = torch.tensor(tokenizer.encode(text))
        full = (len(ids) // CHUNK) * CHUNK
        if full == 0:
            continue
        kv = prefill_kv(model, ids[:full])  # [L, 2, T, H, D]
        for s in range(0, full, CHUNK):
            for lv, spec in LEVELS.items():
                counts[lv] = count_symbols(kv[:, :, s : s + CHUNK], spec, counts[lv])
            n += 1
            if n >= max_chunks:
                break
        if n >= max_chunks:
            break
    if n == 0:
        raise CodecError(f"no text is {CHUNK} tokens long: nothing to profile")
    return profile_codebook(model_fingerprint(model), counts, layout.num_layers, layout.num_kv_heads * layout.head_dim)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m codec.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write <fingerprint>.kvcb into")
    ap.add_argument("--model", type=Path, default=None, help="local transformers model folder (default: shipped)")
    ap.add_argument("--texts", type=Path, default=None, help="texts to profile on (.txt lines or .jsonl)")
    ap.add_argument("--chunks", type=int, default=48, help="256-token chunks to profile (default 48)")
    args = ap.parse_args(argv)
    if args.model is None:
        from connectors.shipped_model import load_shipped_model

        model, tokenizer = load_shipped_model(torch.float32)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.texts is not None:
        texts = read_texts(args.texts)
    else:
        import random

        from benchmarks.models.corpus import fact_training_text

        rng = random.Random(0)
        texts = [fact_training_text(rng, short=False) for _ in range(4 * args.chunks)]
    cb = profile_model(model, tokenizer, texts, args.chunks)
    path = cb.save(args.out)
    print(f"codebook for {cb.fingerprint}: {path} ({path.stat().st_size} bytes, levels {sorted(cb.freqs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
