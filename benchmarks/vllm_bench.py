"""Time to first token of a real vLLM (CPU backend) with kvstore as its KV cache, vs vLLM recomputing.

    python -m benchmarks.vllm_bench [--quick] [--json PATH] [--repeats N] [--model smollm2-135m]

Contexts of 2K, 4K and 8K tokens (`--quick`: 2K and 4K; chunk-aligned, the largest capped so that the
prompt fits vLLM's `max_model_len`) of real text (`benchmarks.texts.evaluation_text`) followed by a
16-token question. TTFT = the seconds of an offline `LLM.generate` call with `max_tokens=1` (request in,
first token out: the scheduler's lookup, the load into vLLM's blocks and the prefill of the rest included),
median of `--repeats`, each engine in its own process (`connectors.vllm.driver`), one engine at a time,
vLLM's own prefix cache off, float32:
- recompute: vLLM without a connector, the baseline of every ratio;
- memory: the embedded store (memory + disk), the context's chunks in the worker's memory tier;
- disk: the same disk directory, served by the disk tier (the worker's memory tier is 1 MiB, too small
  to hold a chunk), page cache warm, and `disk-cold` with the OS page cache dropped before each repeat
  (needs root; skipped otherwise);
- sidecar: a `kvstore serve` on loopback (raw records in its memory tier), the worker's memory 1 MiB.
Each row says whether the greedy output (8 tokens) equals vLLM's own without a connector, the tokens
vLLM reported cached (`num_cached_tokens`) and the tier that served them (the connector's metrics). A
second table gives each engine's time per decode step on a short prompt (64 steps, median of 5):
decode steps run through the connector's hooks too, and must cost nothing measurable.
JSON: `vllm_ttft_ratio_{memory,disk,disk_cold,sidecar}_<n>k`, `vllm_ttft_s_<row>_<n>k`, `vllm_decode_ms_<engine>`,
`vllm_outputs_identical` (1 when every row reproduced vLLM's tokens), `model`, `model_layers`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import add_model_option, context_sizes, drop_page_cache, print_table, size_label, write_json
from benchmarks.texts import evaluation_text, tokens_of

CHUNK = 256
QUESTION_TOKENS = 16
OUTPUT_TOKENS = 8
DECODE_TOKENS = 64
MAX_MODEL_LEN = 8192


class Bench:
    def __init__(self, model: str, prompts: dict[int, list[int]], repeats: int, workdir: Path) -> None:
        self.model, self.prompts, self.repeats, self.workdir = model, prompts, repeats, workdir
        self.reference: dict[int, list[int]] = {}
        self.rows: list[dict] = []
        self.decode: dict[str, float] = {}  # engine -> seconds per decode step

    def engine(self, name: str, connector: dict | None):
        from connectors.vllm.driver import Engine

        print(f"starting engine: {name}", flush=True)
        engine = Engine(self.model, connector=connector, log_path=self.workdir / f"{name}.log",
                        max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=MAX_MODEL_LEN).start()
        engine.generate([self.prompts[min(self.prompts)][:300]], 1)  # warm-up (first-call costs)
        self.measure_decode(engine, name)
        return engine

    def measure_decode(self, engine, name: str) -> None:
        """Seconds per decode step of a short prompt (nothing to load or save: the connector's hooks run
        and return), from the difference between 1 and DECODE_TOKENS + 1 output tokens, median of 5."""
        prompt = self.prompts[min(self.prompts)][:32]
        steps = []
        for _ in range(5):
            one = engine.generate([prompt], 1)[0].seconds
            many = engine.generate([prompt], DECODE_TOKENS + 1)[0].seconds
            steps.append((many - one) / DECODE_TOKENS)
        self.decode[name] = statistics.median(steps)

    def measure(self, engine, row: str, n: int, before=None) -> None:
        prompt = self.prompts[n]
        tokens = engine.generate([prompt], OUTPUT_TOKENS)[0]
        if row == "recompute":
            self.reference[n] = tokens.tokens
        metrics0 = engine.metrics() if row != "recompute" else {}
        times, cached = [], set()
        for _ in range(self.repeats):
            if before is not None:
                before()
            r = engine.generate([prompt], 1)[0]
            times.append(r.seconds)
            cached.add(r.cached)
        served = ""
        if row != "recompute":
            metrics = engine.metrics()
            loaded = {k.split("|")[1]: v - metrics0.get(k, 0) for k, v in metrics.items() if k.startswith("loaded_tokens|")}
            served = ", ".join(f"{t or '?'} {int(v / self.repeats)}" for t, v in sorted(loaded.items()) if v)
            failures = metrics.get("load_failures|", 0) - metrics0.get("load_failures|", 0)
            if failures:
                served += f" ({int(failures)} chunks failed to load)"
        self.rows.append({"row": row, "n": n, "ttft_s": statistics.median(times), "cached": sorted(cached),
                          "served": served or "-", "identical": tokens.tokens == self.reference.get(n)})
        print(f"  {row:10s} {size_label(n)}: {statistics.median(times):.3f} s, cached {sorted(cached)}, {served}", flush=True)

    def fill(self, engine) -> None:
        """Compute every prompt once (the connector saves its chunks), then wait for the saves."""
        for n in sorted(self.prompts):
            engine.generate([self.prompts[n]], 1)
        engine.flush()


def run(args) -> dict:
    from connectors.models import MODELS, model_path
    from transformers import AutoTokenizer

    folder = str(model_path(args.model))
    tok = AutoTokenizer.from_pretrained(folder)
    text = evaluation_text()
    sizes = context_sizes(args.quick, MAX_MODEL_LEN, QUESTION_TOKENS + OUTPUT_TOKENS, CHUNK)
    prompts = {n: tokens_of(tok, text, n + QUESTION_TOKENS).tolist() for n in sizes}
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="vllm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "kv"
    shutil.rmtree(disk, ignore_errors=True)
    bench = Bench(folder, prompts, args.repeats, workdir)

    with bench.engine("recompute", None) as e:
        for n in sizes:
            bench.measure(e, "recompute", n)
    embedded = {"set": {"disk.path": str(disk), "memory.capacity": "2GiB"}}
    with bench.engine("memory", embedded) as e:
        bench.fill(e)
        for n in sizes:
            bench.measure(e, "memory", n)
    disk_only = {"set": {"disk.path": str(disk), "memory.capacity": "1MiB"}}
    cold = drop_page_cache()
    with bench.engine("disk", disk_only) as e:
        for n in sizes:
            bench.measure(e, "disk", n)
            if cold:
                bench.measure(e, "disk-cold", n, before=drop_page_cache)
    from benchmarks.servers import ServeProcess

    tokens = workdir / "tokens.toml"
    tokens.write_text('[tokens]\n"bench" = ["default"]\n')
    server = ServeProcess({"disk.path": str(workdir / "sidecar"), "disk.codec": "raw", "memory.capacity": "3GiB",
                           "server.tokens_file": str(tokens)}).start()
    try:
        remote = {"set": {"disk.enabled": "false", "memory.capacity": "1MiB", "sidecar.url": server.url,
                          "sidecar.token": "bench", "sidecar.codec": "raw"}}
        with bench.engine("sidecar", remote) as e:
            bench.fill(e)
            for n in sizes:
                bench.measure(e, "sidecar", n)
    finally:
        server.kill()

    base = {r["n"]: r["ttft_s"] for r in bench.rows if r["row"] == "recompute"}
    table = []
    out: dict = {"model": MODELS[args.model].title if args.model in MODELS else args.model,
                 "model_layers": json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"],
                 "vllm_outputs_identical": int(all(r["identical"] for r in bench.rows)), "sizes": sizes,
                 "page_cache_dropped": cold}
    for r in bench.rows:
        ratio = r["ttft_s"] / base[r["n"]]
        key = r["row"].replace("-", "_")
        out[f"vllm_ttft_s_{key}_{size_label(r['n'])}"] = round(r["ttft_s"], 4)
        if r["row"] != "recompute":
            out[f"vllm_ttft_ratio_{key}_{size_label(r['n'])}"] = round(ratio, 4)
        table.append([r["row"], size_label(r["n"]), r["ttft_s"], ratio, "yes" if r["identical"] else "NO",
                      "/".join(map(str, r["cached"])), r["served"]])
    print()
    print_table(["row", "context", "TTFT s", "vs recompute", "identical", "cached tokens", "loaded from (tokens)"], table)
    print()
    print_table(["engine", "decode ms/token", "vs no connector"],
                [[name, 1e3 * sec, sec / bench.decode["recompute"]] for name, sec in bench.decode.items()])
    for name, sec in bench.decode.items():
        out[f"vllm_decode_ms_{name}"] = round(1e3 * sec, 3)
    if not cold:
        print("(disk-cold skipped: dropping the page cache needs root)")
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2K and 4K contexts only")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 5, quick 3)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--dir", help="work directory (kept; default: a temporary one, removed)")
    add_model_option(ap)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    out = run(args)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
