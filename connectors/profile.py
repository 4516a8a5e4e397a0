"""`python -m connectors.profile`: profile a cachegen codebook for a Hugging Face causal LM and save it.

    python -m connectors.profile --texts FILE --out ~/.cache/kvstore/codebooks [--model NAME|DIR] [--dtype D]

`--model` is a registered model (`smollm2-135m`, the default; `tiny`) or a local transformers model folder,
loaded in `--dtype` (the dtype it will be served in: the fingerprint, and so the codebook, depends on it);
`--texts` a file with
one text per line, or a .jsonl whose objects have a "text" field or "passages" (texts like the ones the
model will serve; never the set you measure on). The KV of each text's full 256-token chunks is profiled
(`codec.profile.profile_kv`) and the codebook written as `<fingerprint>.kvcb` into `--out`, where
`codec.codebook.codebooks` finds it (see docs/CODEC.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import torch

from codec.profile import profile_kv
from connectors.hf import model_fingerprint, prefill_kv

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
    for text in texts:
        ids = torch.tensor(tokenizer.encode(text))
        full = (len(ids) // CHUNK) * CHUNK
        if full == 0:
            continue
        kv = prefill_kv(model, ids[:full]).cpu()  # [L, 2, T, H, D]
        for s in range(0, full, CHUNK):
            yield kv[:, :, s : s + CHUNK]
            n += 1
            if n >= max_chunks:
                return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m connectors.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write <fingerprint>.kvcb into")
    ap.add_argument("--texts", type=Path, required=True, help="texts to profile on (.txt lines or .jsonl)")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), tiny or a Hugging Face folder")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="the dtype the model will be served in: part of the fingerprint the codebook is for")
    ap.add_argument("--chunks", type=int, default=48, help="256-token chunks to profile (default 48)")
    args = ap.parse_args(argv)
    from connectors.models import load_model

    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    cb = profile_kv(model_fingerprint(model), sample_chunks(model, tokenizer, read_texts(args.texts), args.chunks))
    path = cb.save(args.out)
    print(f"codebook for {cb.fingerprint}: {path} ({path.stat().st_size} bytes, levels {sorted(cb.freqs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
