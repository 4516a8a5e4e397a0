"""Blend's settings compared on the chat set's dev split: KL(full || blend) and top-1 agreement at the answer
tokens for named `BlendConfig` variants at a few ratios, the full prefill and naive reuse computed once per
example. This is how `BlendConfig`'s defaults were chosen (on `dev` only; `benchmarks.blend_bench` reports
them on `eval`).

    python -m benchmarks.blend_sweep [--examples 20] [--ratios 0.15,0.3] [--variants default,sink4,...]

Variants (each a change from `BlendConfig()`): see `VARIANTS`. Per example and variant it also counts the
examples where the larger ratio was worse than the smaller one (the non-monotonicity the issue reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from benchmarks.blend_bench import Task, load_tasks, target_logits
from benchmarks.common import add_model_option, load_bench_model, print_table, write_json
from benchmarks.fidelity import kl_divergence, top1_agreement
from blend import BlendConfig
from connectors.rag import PromptTemplate, RagConfig, RagPipeline
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier

VARIANTS: dict[str, dict] = {
    "default": {},
    "check0": {"check_layer": 0},
    "check2": {"check_layer": 2},
    "check4": {"check_layer": 4},
    "dev_k": {"deviation": "k"},
    "dev_v": {"deviation": "v"},
    "sink1": {"sink_tokens": 1},
    "sink4": {"sink_tokens": 4},
    "qw0.5": {"question_weight": 0.5},
    "qw1": {"question_weight": 1.0},
    "widen2_f4": {"widen": 2.0, "filter_layers": 4},
    "leading": {"selection": "leading"},
    "random": {"selection": "random"},
}


def measure(pipe: RagPipeline, tok, tasks: list[Task], variants: list[str], ratios: list[float]) -> dict:
    keys = [("naive", 0.0)] + [(v, r) for v in variants for r in ratios]
    kl: dict = {k: [] for k in keys}
    top1: dict = {k: [] for k in keys}
    acc: dict = {k: [] for k in keys + [("full", 1.0)]}
    for i, task in enumerate(tasks):
        target = torch.tensor(tok(task.answer, add_special_tokens=False)["input_ids"])
        passages = list(task.passages)
        pre = pipe.prefill(task.question, passages, answer_prefix=task.lead, full_prefill=True)
        ref = target_logits(pipe.model, pre, target)  # [S, V]
        acc[("full", 1.0)].append(float(bool((ref.argmax(-1) == target).all())))
        for v, r in keys:
            cfg = dataclasses.replace(BlendConfig(), **VARIANTS.get(v, {}), ratio=r)
            pre = pipe.prefill(task.question, passages, answer_prefix=task.lead, blend_config=cfg)
            lg = target_logits(pipe.model, pre, target)
            kl[(v, r)].append(kl_divergence(ref, lg).mean().item())
            top1[(v, r)].append(top1_agreement(ref, lg).float().mean().item())
            acc[(v, r)].append(float(bool((lg.argmax(-1) == target).all())))
        print(f"  {i + 1}/{len(tasks)}", flush=True)
    return {"kl": kl, "top1": top1, "acc": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description="blend settings compared on the dev split")
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--ratios", default="0.15,0.3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    add_model_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    model, tok, info = load_bench_model(args.model)
    tasks, chat = load_tasks(args.model, "dev")
    tasks = tasks[: args.examples]
    store = TieredStore([MemoryTier(4 << 30)])
    template = PromptTemplate.chat(tok) if chat else PromptTemplate.plain()
    pipe = RagPipeline(model, tok, store, RagConfig(namespace="sweep", template=template))
    t = time.perf_counter()
    pipe.precompute({str(i): p for i, p in enumerate(dict.fromkeys(p for task in tasks for p in task.passages))})
    print(f"precomputed in {time.perf_counter() - t:.0f} s", flush=True)
    m = measure(pipe, tok, tasks, variants, ratios)
    kl_naive = statistics.fmean(m["kl"][("naive", 0.0)])
    rows, out = [], {**info, "examples": len(tasks), "split": "dev", "kl_naive": kl_naive,
                     "acc_full": statistics.fmean(m["acc"][("full", 1.0)]), "variants": {}}
    for v in variants:
        rec = {}
        for r in ratios:
            k = statistics.fmean(m["kl"][(v, r)])
            rec[str(r)] = {"kl": k, "kl_vs_naive": k / kl_naive, "top1": statistics.fmean(m["top1"][(v, r)]),
                           "acc": statistics.fmean(m["acc"][(v, r)])}
        lo, hi = ratios[0], ratios[-1]
        worse = sum(a > b for a, b in zip(m["kl"][(v, hi)], m["kl"][(v, lo)])) if len(ratios) > 1 else 0
        rec["worse_hi_than_lo"] = worse
        out["variants"][v] = rec
        rows.append([v] + [f"{rec[str(r)]['kl']:.4f} ({rec[str(r)]['kl_vs_naive']:.2f}x) {rec[str(r)]['top1']:.3f} "
                           f"{rec[str(r)]['acc']:.2f}" for r in ratios] + [f"{worse}/{len(tasks)}"])
    print(f"\n{info['model']}: {len(tasks)} dev examples; naive KL {kl_naive:.4f}, full accuracy {out['acc_full']:.3f}; "
          "cells: KL (x naive) top-1 accuracy")
    print_table(["variant"] + [f"ratio {r}" for r in ratios] + [f"{ratios[-1]} worse than {ratios[0]}"], rows)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
