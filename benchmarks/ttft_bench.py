"""Time to first token with the store vs a full prefill, on SmolLM2-135M-Instruct by default.

    python -m benchmarks.ttft_bench [--quick] [--json PATH] [--repeats N] [--dir DIR] [--model tiny]

For contexts of 2K, 4K and 8K tokens (`--quick`: 2K and 4K; chunk-aligned, and capped so the prompt fits
the model's positions) of real text (`benchmarks.texts.evaluation_text`; the tiny model reads its
held-out passages) followed by a 16-token question, TTFT = the time from the prompt's token ids to the
first token's logits:
- full prefill: one `model(prompt)` forward, the baseline of every ratio;
- memory: `HFConnector.prefill` with the context's chunks in the CPU memory tier;
- disk/<codec>: the same from a disk tier only (records decoded with the codec), page cache warm, and
  `disk-cold/<codec>` with the OS page cache dropped before each repeat where the OS lets us.
Median of repeats. Every codec in the registry is measured. Each row also says whether the greedy
output (the first 8 tokens) from the loaded KV equals the full prefill's: lossless codecs must give the
same tokens; a lossy codec may not.
JSON: `ttft_ratio_memory_<n>k`, `ttft_ratio_disk_<n>k` (raw codec), `ttft_ratio_disk_<codec>_<n>k`,
`ttft_ratio_disk_codec_<n>k` (cachegen level 2), the raw milliseconds, `outputs_identical_lossless`
(1 when every lossless row reproduced the full prefill's tokens), `model` and `model_layers`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (add_model_option, context_sizes, drop_page_cache, load_bench_model, median_seconds,
                               print_table, size_label, write_json)
from benchmarks.texts import evaluation_text, tokens_of
from codec import codec_names, make_codec
from connectors.hf import HFConnector, compute_chunks, decode_greedy, model_fingerprint, run_cached
from kvstore.store import TieredStore
from kvstore.tiers import DiskTier, MemoryTier

CHUNK = 256
QUESTION_TOKENS = 16
OUTPUT_TOKENS = 8


def _context_ids(model_name: str, tok, n_tokens: int) -> np.ndarray:
    """[n_tokens + QUESTION_TOKENS] ids of real text (the tiny model reads its held-out passages)."""
    if model_name == "tiny":
        from benchmarks.models.evalset import load_rag

        text = "\n\n".join(p for ex in load_rag()[:40] for p in ex.passages)
    else:
        text = evaluation_text()
    return tokens_of(tok, text, n_tokens + QUESTION_TOKENS)


LEVELS = {"cachegen": (1, 2, 3)}  # codecs measured at each of their quality levels; zstd at its default


def _codec_variants() -> list[tuple[str, int | None]]:
    """Every registered codec, each quality level of a codec that has them."""
    out = []
    for name in codec_names():
        out += [(name, lvl) for lvl in LEVELS[name]] if name in LEVELS else [(name, None)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2K and 4K contexts, fewer repeats")
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--dir", help="directory for the disk tiers (default: a temporary one)")
    add_model_option(ap)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    model, tok, info = load_bench_model(args.model)
    sizes = context_sizes(args.quick, model.config.max_position_embeddings, QUESTION_TOKENS + OUTPUT_TOKENS, CHUNK)
    fp = model_fingerprint(model)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ttft-bench-"))
    can_drop = drop_page_cache()
    variants = _codec_variants()
    results: dict[str, float] = dict(info)
    rows = []
    identical_lossless = True
    print(f"{info['model']} ({info['model_layers']} layers, float32), {torch.get_num_threads()} threads, chunks of "
          f"{CHUNK}, {repeats} repeats; page cache drop "
          f"{'available' if can_drop else 'NOT available (no disk-cold rows)'}")
    with torch.inference_mode():
        model(torch.zeros(1, 1024, dtype=torch.long))  # warm-up
    for n in sizes:
        ids = _context_ids(args.model, tok, n)
        prompt = torch.from_numpy(ids.astype(np.int64)).reshape(1, -1)
        chunks = compute_chunks(model, ids[:n], fingerprint=fp, chunk_tokens=CHUNK)
        kv_bytes = sum(c.nbytes for c in chunks)

        @torch.inference_mode()
        def full():
            return model(prompt, logits_to_keep=1).logits[0, -1]

        with torch.inference_mode():
            out, cache = run_cached(model, prompt, logits_to_keep=1)
            ref_tokens = decode_greedy(model, cache, out.logits[0, -1], OUTPUT_TOKENS)
        del cache
        base = median_seconds(full, repeats, warmup=0)
        rows.append([size_label(n), "full prefill", "-", f"{base * 1e3:.1f}", "1.000", "-", "-", "-"])
        results[f"ttft_full_ms_{size_label(n)}"] = base * 1e3

        stores: list[tuple[str, str, TieredStore, bool]] = [
            ("memory", "-", TieredStore([MemoryTier(kv_bytes + (1 << 20))], chunk_tokens=CHUNK), True)]
        for name, level in variants:
            d = root / f"{n}-{name}-{level}"
            shutil.rmtree(d, ignore_errors=True)
            codec = make_codec(name, level)
            tier = DiskTier(d, 1 << 34, codec)
            label = name if level is None else f"{name}-{level}"
            stores.append((f"disk/{label}", label, TieredStore([tier], chunk_tokens=CHUNK), codec.lossless))
            if can_drop:
                stores.append((f"disk-cold/{label}", label, stores[-1][2], codec.lossless))
        for mode, label, store, lossless in stores:
            if not store.lookup_refs(store.chunk_refs(ids[:n], fingerprint=fp)):
                store.put(chunks)
                store.flush()
            conn = HFConnector(model, store, fingerprint=fp, store_new=False)
            reports = []

            def ours():
                pre = conn.prefill(ids)
                reports.append(pre)
                return pre

            cold = mode.startswith("disk-cold")
            first = ours()  # warm-up, and the output check
            same = decode_greedy(model, first.cache, first.logits, OUTPUT_TOKENS) == ref_tokens
            if lossless and not same:
                identical_lossless = False
            del first
            reports.clear()
            t = median_seconds(ours, repeats, warmup=0, before=drop_page_cache if cold else None)
            rep = [p.report for p in reports]
            assert all(r.reused_tokens == n for r in rep), f"{mode}: expected {n} reused tokens"
            load = statistics.median(r.load_s for r in rep)
            pre_s = statistics.median(r.prefill_s for r in rep)
            ratio = t / base
            rows.append([size_label(n), mode, f"{store.tiers[0].usage().used_bytes / kv_bytes:.3f}" if mode != "memory" else "-",
                         f"{t * 1e3:.1f}", f"{ratio:.3f}", f"{load * 1e3:.1f}", f"{pre_s * 1e3:.1f}",
                         "yes" if same else "NO"])
            key = mode.replace("/", "_").replace("-", "_")
            results[f"ttft_ratio_{key}_{size_label(n)}"] = ratio
            if mode == "memory":
                results[f"ttft_ratio_memory_{size_label(n)}"] = ratio
            elif mode == "disk/raw":
                results[f"ttft_ratio_disk_{size_label(n)}"] = ratio
            elif mode == "disk/cachegen-2":  # the project's codec at its default level
                results[f"ttft_ratio_disk_codec_{size_label(n)}"] = ratio
            conn.close()
        for _, _, store, _ in stores:
            store.close()
        print(f"  {n} tokens done")
    print()
    results["outputs_identical_lossless"] = int(identical_lossless)
    print_table(["context", "mode", "bytes/raw", "TTFT ms", "vs full", "load ms", "prefill ms",
                 f"same {OUTPUT_TOKENS} tokens"], rows)
    print(f"lossless rows reproduce the full prefill's greedy output: {'yes' if identical_lossless else 'NO'}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
