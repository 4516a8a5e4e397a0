"""Helpers shared by the benchmark scripts: the model option, timing medians, tables and the JSON report."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

DEFAULT_MODEL = "smollm2-135m"


def add_model_option(ap) -> None:
    ap.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default: SmolLM2-135M-Instruct, "
                    "converted once on first use), tiny (the project's 4-layer model) or a Hugging Face folder")


def load_bench_model(name: str, dtype=None):
    """(model, tokenizer, {"model": name, "model_layers": L}): the fields every benchmark's JSON carries."""
    import torch

    from connectors.models import MODELS, load_model

    model, tok = load_model(name, dtype or torch.float32)
    title = MODELS[name].title if name in MODELS else str(name)
    return model, tok, {"model": title, "model_layers": model.config.num_hidden_layers}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1,
                   before: Callable[[], object] | None = None) -> float:
    """Median seconds of `fn` over `repeats` calls; `before` (untimed) runs ahead of each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired(ours: Callable[[], object], ceiling: Callable[[], object], repeats: int,
           *others: Callable[[], object]) -> tuple[float, ...]:
    """Median seconds of `ours`, `ceiling` (and of each of `others`), run in turn so that all see the
    same machine state."""
    fns = (ours, ceiling, *others)
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return tuple(statistics.median(ts) for ts in times)


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        print(f"wrote {path}")


def context_sizes(quick: bool, max_positions: int, reserve: int, chunk: int) -> list[int]:
    """2K, 4K (and 8K unless quick) context tokens, each capped to the longest chunk-aligned context that
    leaves `reserve` positions (question and output) within the model's `max_positions`."""
    fit = (max_positions - reserve) // chunk * chunk
    return sorted({min(n, fit) for n in ([2048, 4096] if quick else [2048, 4096, 8192])})


def size_label(n: int) -> str:
    """A context size as the tables and JSON keys name it: 2k, 4k, 8k."""
    return f"{round(n / 1024)}k"


def drop_page_cache() -> bool:
    """Drop the OS page cache (root only) so that the next read comes from the disk; False if not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
