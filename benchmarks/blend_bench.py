"""Blend benchmark: fidelity and time to first token of blend against full prefill and naive reuse.

On SmolLM2-135M-Instruct by default (`--model tiny`: the project's 4-layer model), over the held-out RAG set (benchmarks/models/heldout/rag.jsonl) every passage is
precomputed as standalone chunks in a memory-tier `TieredStore` through the RAG API; each example's prompt
(`passages SEP ... question`) is then prefilled by each method:
- full prefill (the reference), naive reuse (ratio 0: cached KV concatenated, only separators and the
  question computed), blend at ratios 0.05/0.10/0.15/0.30 (highest-deviation selection), and random
  selection at the same ratios (the baseline a selection has to beat);
- for each: greedy exact match of the target (teacher forced over the prefilled KV), KL(full || method)
  and top-1 agreement on the target positions.
TTFT: a ~4K-token context built from held-out passages (for the tiny model beyond the 1024 tokens it
was trained on: timing only), each method's time to the last logits (store fetch + blend, or the model's own
prefill), median of repeats, methods interleaved round-robin; reported as method / full prefill.

    python -m benchmarks.blend_bench [--quick] [--json PATH] [--model tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from benchmarks.common import add_model_option, load_bench_model, print_table, write_json
from benchmarks.fidelity import kl_divergence, top1_agreement
from benchmarks.models.evalset import load_rag
from blend import BlendConfig
from connectors.hf import kv_to_cache, run_cached
from connectors.rag import RagConfig, RagPipeline
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier

RATIOS = (0.05, 0.10, 0.15, 0.30)


def methods() -> list[tuple[str, float | None, str]]:
    """(name, ratio or None for full prefill, selection)."""
    out: list[tuple[str, float | None, str]] = [("full", None, "deviation"), ("naive", 0.0, "deviation")]
    out += [(f"blend_{round(r * 100):02d}", r, "deviation") for r in RATIOS]
    out += [(f"random_{round(r * 100):02d}", r, "random") for r in RATIOS]
    return out


def _prefill(pipe: RagPipeline, base: BlendConfig, question: str, passages, ratio, selection):
    if ratio is None:
        return pipe.prefill(question, passages, full_prefill=True)
    return pipe.prefill(question, passages, blend_config=dataclasses.replace(base, ratio=ratio, selection=selection))


@torch.inference_mode()
def target_logits(model, pre, target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [len(target), V] of the target over the prefilled KV."""
    rows = [pre.logits[None].float()]
    if target.numel() > 1:
        cache = kv_to_cache(pre.kv.clone(), model)
        out, _ = run_cached(model, target[None, :-1], cache)
        rows.append(out.logits[0].float())
    return torch.cat(rows)


def fidelity(pipe: RagPipeline, tok, examples, base: BlendConfig) -> dict:
    per: dict[str, dict[str, list[float]]] = {m: {"acc": [], "kl": [], "top1": [], "frac": []} for m, _, _ in methods()}
    for ex in examples:
        target = torch.tensor(tok(ex.target, add_special_tokens=False)["input_ids"])
        ref = None
        for name, ratio, selection in methods():
            pre = _prefill(pipe, base, ex.prompt_tail, list(ex.passages), ratio, selection)
            lg = target_logits(pipe.model, pre, target)  # [S, V]
            if ref is None:
                ref = lg
            rec = per[name]
            rec["acc"].append(float(bool((lg.argmax(-1) == target).all())))
            rec["kl"].append(kl_divergence(ref, lg).mean().item())
            rec["top1"].append(top1_agreement(ref, lg).float().mean().item())
            rec["frac"].append(1.0 if pre.report is None else pre.report.recompute_fraction)
    return {m: {k: statistics.fmean(v) for k, v in rec.items()} for m, rec in per.items()}


def long_context(examples, tok, target_tokens: int) -> list[str]:
    """Distinct held-out passages, in order, until they hold ~target_tokens tokens."""
    out, seen, n = [], set(), 0
    for ex in examples:
        for p in ex.passages:
            if p in seen:
                continue
            seen.add(p)
            out.append(p)
            n += len(tok(p, add_special_tokens=False)["input_ids"]) + 1
            if n >= target_tokens:
                return out
    return out


def ttft(pipe: RagPipeline, base: BlendConfig, question: str, passages: list[str], repeats: int) -> dict:
    times: dict[str, list[float]] = {m: [] for m, _, _ in methods()}
    tokens = None
    for rep in range(repeats + 1):  # the first round warms up
        for name, ratio, selection in methods():
            t = time.perf_counter()
            pre = _prefill(pipe, base, question, passages, ratio, selection)
            dt = time.perf_counter() - t
            tokens = pre.ids.numel()
            if rep:
                times[name].append(dt)
    full = statistics.median(times["full"])
    return {"tokens": tokens, "full_s": full,
            **{m: {"s": statistics.median(v), "ratio": statistics.median(v) / full} for m, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description="blend vs full prefill and naive reuse on the held-out RAG set")
    ap.add_argument("--quick", action="store_true", help="30 examples, 3 timing repeats")
    ap.add_argument("--json", default=None)
    ap.add_argument("--examples", type=int, default=None, help="held-out examples (default: all 180; quick 30)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (default 7; quick 3)")
    ap.add_argument("--context", type=int, default=4096, help="tokens of context for TTFT")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deviation", default=getattr(BlendConfig(), 'deviation'), choices=("k", "v", "kv"))
    ap.add_argument("--check-layer", type=int, default=getattr(BlendConfig(), 'check_layer'))
    ap.add_argument("--widen", type=float, default=getattr(BlendConfig(), 'widen'))
    ap.add_argument("--filter-layers", type=int, default=getattr(BlendConfig(), 'filter_layers'))
    add_model_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_ex = args.examples or (30 if args.quick else None)
    repeats = args.repeats or (3 if args.quick else 7)
    base = BlendConfig(check_layer=args.check_layer, widen=args.widen, filter_layers=args.filter_layers,
                       deviation=args.deviation)

    model, tok, info = load_bench_model(args.model)
    examples = load_rag()
    fid_examples = examples[:n_ex] if n_ex else examples
    store = TieredStore([MemoryTier(4 << 30)])
    pipe = RagPipeline(model, tok, store, RagConfig(namespace="bench"))
    context = long_context(examples, tok, args.context)
    t = time.perf_counter()
    stats = pipe.precompute({str(i): p for i, p in enumerate(dict.fromkeys(
        [p for ex in fid_examples for p in ex.passages] + context))})
    print(f"precomputed {stats.passages} passages ({stats.chunks_computed} chunks) in {time.perf_counter() - t:.1f} s; "
          f"config: check_layer {base.check_layer}, widen {base.widen}, filter_layers {base.filter_layers}, "
          f"deviation {base.deviation}")

    fid = fidelity(pipe, tok, fid_examples, base)
    tt = ttft(pipe, base, examples[0].prompt_tail, context, repeats)
    rows = []
    for name, _, _ in methods():
        f, s = fid[name], tt[name]
        rows.append([name, f"{f['acc']:.3f}", f"{f['kl']:.4f}", f"{f['top1']:.3f}", f"{f['frac']:.3f}",
                     f"{s['s'] * 1e3:.0f}", f"{s['ratio']:.3f}"])
    print(f"\n{info['model']} ({info['model_layers']} layers); {len(fid_examples)} held-out examples; TTFT at {tt['tokens']} tokens of context, median of {repeats}")
    print_table(["method", "accuracy", "KL vs full", "top-1 vs full", "recompute", "TTFT ms", "TTFT / full"], rows)
    kl_naive = fid["naive"]["kl"]
    out = {
        **info, "examples": len(fid_examples), "ttft_tokens": tt["tokens"], "ttft_full_s": tt["full_s"],
        "config": {"check_layer": base.check_layer, "widen": base.widen, "filter_layers": base.filter_layers,
                   "deviation": base.deviation},
        "acc_full": fid["full"]["acc"], "kl_naive": kl_naive, "acc_naive": fid["naive"]["acc"],
        "ttft_ratio_naive": tt["naive"]["ratio"],
    }
    for r in RATIOS:
        p = round(r * 100)
        for kind in ("blend", "random"):
            name = f"{kind}_{p:02d}"
            out[f"kl_{kind}_{p}"] = fid[name]["kl"]
            out[f"top1_{kind}_{p}"] = fid[name]["top1"]
            out[f"acc_{kind}_{p}"] = fid[name]["acc"]
            out[f"ttft_ratio_{kind}_{p}"] = tt[name]["ratio"]
            out[f"recompute_{kind}_{p}"] = fid[name]["frac"]
    out["kl_ratio_blend_15_vs_naive"] = out["kl_blend_15"] / kl_naive if kl_naive else float("nan")
    print(f"\ntargets at ratio 0.15: KL <= 0.25 x naive: {out['kl_ratio_blend_15_vs_naive']:.3f} x; "
          f"accuracy within 1 point of full: {100 * (out['acc_blend_15'] - out['acc_full']):+.1f} points; "
          f"TTFT <= 0.35 of full: {out['ttft_ratio_blend_15']:.3f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
