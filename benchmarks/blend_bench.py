"""Blend benchmark: fidelity and time to first token of blend against full prefill and naive reuse.

On SmolLM2-135M-Instruct by default: the held-out multi-passage questions of `benchmarks.models.chatset`
(`--split eval`; settings were chosen on `--split dev`), asked through the model's chat template (the
RAG API's default `PromptTemplate`: the template's prefix, the passages, the question, then the assistant's
answer opening). `--model tiny`: the project's 4-layer model on its own cloze set (`benchmarks/models/
heldout/rag.jsonl`, plain `passages SEP question` prompts), as before. Every passage (and the template's
prefix) is precomputed as standalone chunks in a memory-tier `TieredStore` through the RAG API; each
example's prompt is then prefilled by each method:
- full prefill (the reference), naive reuse (ratio 0: cached KV concatenated, only separators, the question
  and the answer opening computed), blend at ratios 0.05-0.5 (`BlendConfig`'s defaults otherwise), and
  random selection at the same ratios (the baseline a selection has to beat);
- for each: accuracy (greedy exact match of the answer, teacher forced), KL(full || method) and top-1
  agreement at the answer tokens, the share of row-layers recomputed, and the relative error of the whole
  KV against the full prefill's (a measure that holds with any weights); per example, whether blend got
  worse with more recompute (0.30 vs 0.15) or was worse than naive reuse.
TTFT: a ~4K-token prompt of held-out passages, each method's time to the last logits (store fetch + blend,
or the model's own prefill), median of repeats, methods interleaved round-robin, one torch thread by default;
reported as method / full (random selection does blend's work at the same ratio and is not timed).

    python -m benchmarks.blend_bench [--quick] [--json PATH] [--model tiny] [--split dev]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.common import add_model_option, load_bench_model, print_table, write_json
from benchmarks.fidelity import kl_divergence, top1_agreement
from blend import BlendConfig
from connectors.hf import kv_to_cache, run_cached
from connectors.rag import PromptTemplate, RagConfig, RagPipeline
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier

RATIOS = (0.05, 0.10, 0.15, 0.20, 0.30, 0.50)


@dataclass(frozen=True)
class Task:
    passages: tuple[str, ...]
    question: str
    lead: str  # the answer's opening, part of the prompt
    answer: str  # what the model should continue with
    chance: float


def load_tasks(model_name: str, split: str) -> tuple[list[Task], bool]:
    """(tasks, use the chat template): the chat set for instruct models, the cloze set for the tiny model."""
    if model_name == "tiny":
        from benchmarks.models.evalset import load_rag

        return [Task(e.passages, e.prompt_tail, "", e.target, e.chance) for e in load_rag()], False
    from benchmarks.models.chatset import load_chat

    return [Task(e.passages, e.question, e.lead, e.answer, e.chance) for e in load_chat(split)], True


def methods() -> list[tuple[str, float | None, str | None]]:
    """(name, ratio or None for full prefill, selection: None for the configured one)."""
    out: list[tuple[str, float | None, str | None]] = [("full", None, None), ("naive", 0.0, None)]
    out += [(f"blend_{round(r * 100):02d}", r, None) for r in RATIOS]
    out += [(f"random_{round(r * 100):02d}", r, "random") for r in RATIOS]
    return out


def _prefill(pipe: RagPipeline, base: BlendConfig, task: Task, passages, ratio, selection):
    if ratio is None:
        return pipe.prefill(task.question, passages, answer_prefix=task.lead, full_prefill=True)
    cfg = dataclasses.replace(base, ratio=ratio, selection=selection or base.selection)
    if selection == "random":  # the plain baseline: no rows forced in
        cfg = dataclasses.replace(cfg, sink_tokens=0)
    return pipe.prefill(task.question, passages, answer_prefix=task.lead, blend_config=cfg)


@torch.inference_mode()
def target_logits(model, pre, target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [len(target), V] of the target over the prefilled KV."""
    rows = [pre.logits[None].float()]
    if target.numel() > 1:
        cache = kv_to_cache(pre.kv.clone(), model)
        out, _ = run_cached(model, target[None, :-1], cache)
        rows.append(out.logits[0].float())
    return torch.cat(rows)


def kv_error(kv: torch.Tensor, ref: torch.Tensor) -> float:
    """||kv - ref|| / ||ref|| over the whole prompt's KV [L, 2, T, H, D]."""
    return ((kv.float() - ref.float()).norm() / ref.float().norm()).item()


def fidelity(pipe: RagPipeline, tok, tasks: list[Task], base: BlendConfig) -> tuple[dict, dict]:
    keys = ("acc", "kl", "top1", "frac", "kv_err")
    per: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m, _, _ in methods()}
    for i, task in enumerate(tasks):
        target = torch.tensor(tok(task.answer, add_special_tokens=False)["input_ids"])
        ref = ref_kv = None
        for name, ratio, selection in methods():
            pre = _prefill(pipe, base, task, list(task.passages), ratio, selection)
            lg = target_logits(pipe.model, pre, target)  # [S, V]
            kv = pre.kv
            if ref is None:
                ref, ref_kv = lg, kv
            rec = per[name]
            rec["acc"].append(float(bool((lg.argmax(-1) == target).all())))
            rec["kl"].append(kl_divergence(ref, lg).mean().item())
            rec["top1"].append(top1_agreement(ref, lg).float().mean().item())
            rec["frac"].append(1.0 if pre.report is None else pre.report.recompute_fraction)
            rec["kv_err"].append(kv_error(kv, ref_kv))
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{len(tasks)} examples: KL naive {statistics.fmean(per['naive']['kl']):.4f}, "
                  f"blend_15 {statistics.fmean(per['blend_15']['kl']):.4f}", flush=True)
    return {m: {k: statistics.fmean(v) for k, v in rec.items()} for m, rec in per.items()}, monotonicity(per)


def monotonicity(per: dict) -> dict:
    """Per example, where more recompute did worse: counts, and the mean KL step up on those examples beside
    the mean step down on the others (random selection's counts are the baseline: it recomputes a superset
    of rows at the larger ratio too, chosen blindly)."""
    kl = {m: per[m]["kl"] for m in per}
    out = {}
    for kind in ("blend", "random"):
        for hi, lo in (("30", "15"), ("50", "30")):
            steps = [a - b for a, b in zip(kl[f"{kind}_{hi}"], kl[f"{kind}_{lo}"])]
            up, down = [d for d in steps if d > 0], [-d for d in steps if d <= 0]
            tag = "" if kind == "blend" else "random_"
            out[f"{tag}worse_{hi}_than_{lo}"] = len(up)
            out[f"{tag}worse_{hi}_than_{lo}_mean_up"] = statistics.fmean(up) if up else 0.0
            out[f"{tag}worse_{hi}_than_{lo}_mean_down"] = statistics.fmean(down) if down else 0.0
    out["worse_15_than_naive"] = sum(a > b for a, b in zip(kl["blend_15"], kl["naive"]))
    return out


def long_context(tasks: list[Task], tok, target_tokens: int) -> list[str]:
    """Distinct held-out passages, in order, until they hold ~target_tokens tokens."""
    out, seen, n = [], set(), 0
    for task in tasks:
        for p in task.passages:
            if p in seen:
                continue
            seen.add(p)
            out.append(p)
            n += len(tok(p, add_special_tokens=False)["input_ids"]) + 1
            if n >= target_tokens:
                return out
    return out


def ttft(pipe: RagPipeline, base: BlendConfig, task: Task, passages: list[str], repeats: int) -> dict:
    """Median seconds to the last logits of full prefill, naive reuse and blend at each ratio (random selection
    does the same work as blend at the same ratio, so it is not timed), methods interleaved round-robin."""
    timed = [m for m in methods() if m[2] != "random"]
    times: dict[str, list[float]] = {m: [] for m, _, _ in timed}
    tokens = None
    for rep in range(repeats + 1):  # the first round warms up
        for name, ratio, selection in timed:
            t = time.perf_counter()
            pre = _prefill(pipe, base, task, passages, ratio, selection)
            dt = time.perf_counter() - t
            tokens = pre.ids.numel()
            if rep:
                times[name].append(dt)
    full = statistics.median(times["full"])
    return {"tokens": tokens, "full_s": full,
            **{m: {"s": statistics.median(v), "ratio": statistics.median(v) / full} for m, v in times.items()}}


def fidelity_summary(fid: dict, shape: dict, tasks: list[Task]) -> dict:
    """The JSON fields of the fidelity part: `kl_naive`, `kl_blend_15`, `top1_random_30`, ..."""
    out = {"examples": len(tasks), "chance": statistics.fmean(t.chance for t in tasks), "acc_full": fid["full"]["acc"],
           **{f"{k}_naive": fid["naive"][k] for k in ("kl", "acc", "top1", "kv_err")}, **shape}
    for r in RATIOS:
        p = round(r * 100)
        for kind in ("blend", "random"):
            f = fid[f"{kind}_{p:02d}"]
            out.update({f"kl_{kind}_{p}": f["kl"], f"top1_{kind}_{p}": f["top1"], f"acc_{kind}_{p}": f["acc"],
                        f"kv_err_{kind}_{p}": f["kv_err"], f"recompute_{kind}_{p}": f["frac"]})
    out["kl_ratio_blend_15_vs_naive"] = out["kl_blend_15"] / out["kl_naive"] if out["kl_naive"] else float("nan")
    return out


def print_report(info: dict, out: dict, fid: dict, shape: dict, tt: dict) -> None:
    rows = []
    for name, _, _ in methods():
        f, s = fid.get(name), tt.get(name)
        rows.append([name] + ([f"{f['acc']:.3f}", f"{f['kl']:.4f}", f"{f['top1']:.3f}", f"{f['kv_err']:.3f}",
                               f"{f['frac']:.3f}"] if f else ["-"] * 5) +
                    ([f"{s['s'] * 1e3:.0f}", f"{s['ratio']:.3f}"] if s else ["-", "-"]))
    print(f"\n{info['model']} ({info['model_layers']} layers); "
          + (f"{out['examples']} held-out examples ({out['split']}), chance {out['chance']:.3f}; " if fid else "")
          + (f"TTFT at {out['ttft_tokens']} tokens, median of {out['ttft_repeats']}, {out['threads']} thread(s)" if tt else ""))
    print_table(["method", "accuracy", "KL vs full", "top-1 vs full", "KV error", "recompute", "TTFT ms", "TTFT / full"], rows)
    if fid:
        n = out["examples"]
        for tag, label in (("", "blend"), ("random_", "random")):
            for hi, lo in (("30", "15"), ("50", "30")):
                k = f"{tag}worse_{hi}_than_{lo}"
                print(f"per example: {label}_{hi} worse than {label}_{lo} on {shape[k]}/{n} (mean KL up "
                      f"{shape[k + '_mean_up']:.4f} there, down {shape[k + '_mean_down']:.4f} on the others)")
        print(f"per example: blend_15 worse than naive on {shape['worse_15_than_naive']}/{n}")
        print(f"\ntargets at ratio 0.15: KL <= 0.25 x naive: {out['kl_ratio_blend_15_vs_naive']:.3f} x; top-1 >= 0.90: "
              f"{out['top1_blend_15']:.3f}; accuracy within 1 point of full ({out['acc_full']:.3f}, chance "
              f"{out['chance']:.3f}): {100 * (out['acc_blend_15'] - out['acc_full']):+.1f} points")
    if tt:
        print(f"target: TTFT <= 0.30 of full at {out['ttft_tokens']} tokens: {out['ttft_ratio_blend_15']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description="blend vs full prefill and naive reuse on held-out RAG questions")
    ap.add_argument("--quick", action="store_true", help="30 examples, 3 timing repeats")
    ap.add_argument("--json", default=None)
    ap.add_argument("--split", default="eval", choices=("eval", "dev"), help="the chat set's split (instruct models)")
    ap.add_argument("--examples", type=int, default=None, help="held-out examples (default: all; quick 30)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5; quick 3)")
    ap.add_argument("--context", type=int, default=4096, help="tokens of context for TTFT")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: TTFT ratios of one core)")
    ap.add_argument("--part", default="all", choices=("all", "fidelity", "ttft"),
                    help="run one part only (e.g. the two side by side in two processes on a busy machine)")
    d = BlendConfig()
    ap.add_argument("--selection", default=d.selection, choices=("deviation", "leading"),
                    help="how blend's rows choose the tokens to recompute (random selection has its own rows)")
    ap.add_argument("--deviation", default=d.deviation, choices=("k", "v", "kv"))
    ap.add_argument("--check-layer", type=int, default=d.check_layer)
    ap.add_argument("--widen", type=float, default=d.widen)
    ap.add_argument("--filter-layers", type=int, default=d.filter_layers)
    ap.add_argument("--sink-tokens", type=int, default=d.sink_tokens)
    ap.add_argument("--question-weight", type=float, default=d.question_weight)
    add_model_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_ex = args.examples or (30 if args.quick else None)
    repeats = args.repeats or (3 if args.quick else 5)
    base = dataclasses.replace(d, check_layer=args.check_layer, widen=args.widen, filter_layers=args.filter_layers,
                               deviation=args.deviation, selection=args.selection, sink_tokens=args.sink_tokens,
                               question_weight=args.question_weight)

    model, tok, info = load_bench_model(args.model)
    tasks, chat = load_tasks(args.model, args.split)
    fid_tasks = (tasks[:n_ex] if n_ex else tasks) if args.part != "ttft" else []
    store = TieredStore([MemoryTier(4 << 30)])
    template = PromptTemplate.chat(tok) if chat else PromptTemplate.plain()
    pipe = RagPipeline(model, tok, store, RagConfig(namespace="bench", template=template))
    context = long_context(tasks, tok, args.context) if args.part != "fidelity" else []
    t = time.perf_counter()
    stats = pipe.precompute({str(i): p for i, p in enumerate(dict.fromkeys(
        [p for task in fid_tasks for p in task.passages] + context))})
    config = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name not in ("ratio", "seed", "overlap")}
    print(f"precomputed {stats.passages} passages ({stats.chunks_computed} chunks) in {time.perf_counter() - t:.1f} s; "
          f"prompt: {'chat template' if chat else 'plain'}; blend config: {config}", flush=True)

    fid, shape = fidelity(pipe, tok, fid_tasks, base) if fid_tasks else ({}, {})
    tt = ttft(pipe, base, tasks[0], context, repeats) if context else {}
    out = {**info, "split": args.split if chat else "cloze", "config": config, "threads": args.threads}
    if tt:
        out.update(ttft_tokens=tt["tokens"], ttft_full_s=tt["full_s"], ttft_repeats=repeats,
                   **{f"ttft_ratio_{m}": v["ratio"] for m, v in tt.items() if isinstance(v, dict)})
    if fid:
        out.update(fidelity_summary(fid, shape, fid_tasks))
    print_report(info, out, fid, shape, tt)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
