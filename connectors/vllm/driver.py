"""An offline vLLM engine in a child process, driven over a pipe: what the tests and the benchmark share.

`Engine(model, connector=extra_config_or_None, **engine_args).start()` spawns
`python -m connectors.vllm.driver` (the engine's own processes, scheduler and worker, are its children),
and then each call is one JSON line each way on dedicated pipes (vLLM's logs go to `log_path`):
- `generate(prompts, max_tokens)`: greedy outputs, one request after another; per prompt the output
  token ids, `num_cached_tokens` (with vLLM's prefix caching off: the connector's hit) and the seconds
  of the `generate` call (with `max_tokens=1`: the time to first token, lookup and load included);
- `flush()`: every worker waits until its saves are in every tier of its store;
- `metrics()`: the `vllm:kvstore_*` counters of vLLM's stat logger, as {"name|tier": value};
- `stop()`: ends the engine (the connector's shutdown flushes its saves), then the child.
Defaults fit a CPU host: float32 (bfloat16 is ~5x slower on AVX2), eager mode, vLLM's prefix cache
off, a 1 GiB KV cache (`kv_cache_memory_bytes`; vLLM's default share of host memory fails on busy hosts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARGS = {"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 8192,
                "kv_cache_memory_bytes": 1 << 30, "disable_log_stats": False}


@dataclass(slots=True)
class Result:
    tokens: list[int]
    cached: int  # RequestOutput.num_cached_tokens
    seconds: float


class EngineError(RuntimeError):
    pass


class Engine:
    def __init__(self, model: str | os.PathLike, *, connector: dict[str, Any] | None = None,
                 log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 **engine_args: Any) -> None:
        self.spec = {"model": str(model), "connector": connector, "args": {**DEFAULT_ARGS, **engine_args}}
        self.log_path = Path(log_path) if log_path else None
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> "Engine":
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        env = {**os.environ, **self.env, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # flush(): our own callable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "connectors.vllm.driver", str(req_r), str(resp_w)],
                                         pass_fds=(req_r, resp_w), env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, cwd=str(ROOT))
        finally:
            os.close(req_r)
            os.close(resp_w)
            if log is not subprocess.DEVNULL:
                log.close()
        self._req = os.fdopen(req_w, "w", buffering=1)
        self._resp = os.fdopen(resp_r, "r")
        self._call({"op": "start", **self.spec}, timeout)
        return self

    def _call(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if self.proc is None:
            raise EngineError("engine not started")
        try:
            self._req.write(json.dumps(msg) + "\n")
            line = self._readline(timeout)
        except (BrokenPipeError, OSError) as e:
            raise EngineError(f"engine process gone ({e}); see {self.log_path}") from None
        if not line:
            raise EngineError(f"engine process exited (code {self.proc.poll()}); see {self.log_path}")
        reply = json.loads(line)
        if "error" in reply:
            raise EngineError(reply["error"])
        return reply

    def _readline(self, timeout: float | None) -> str:
        if timeout is None:
            return self._resp.readline()
        import select

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise EngineError(f"engine did not answer within {timeout:.0f} s; see {self.log_path}")
            ready, _, _ = select.select([self._resp], [], [], min(left, 1.0))
            if ready:
                return self._resp.readline()
            if self.proc.poll() is not None:
                return ""

    def generate(self, prompts: list[list[int]], max_tokens: int = 8, timeout: float = 900) -> list[Result]:
        reply = self._call({"op": "generate", "prompts": prompts, "max_tokens": max_tokens}, timeout)
        return [Result(**r) for r in reply["results"]]

    def flush(self, timeout: float = 120) -> bool:
        return bool(self._call({"op": "flush"}, timeout)["ok"])

    def metrics(self) -> dict[str, float]:
        return self._call({"op": "metrics"}, 60)["metrics"]

    def stop(self, timeout: float = 120) -> None:
        if self.proc is None:
            return
        try:
            self._call({"op": "exit"}, timeout)
            self.proc.wait(timeout)
        except (EngineError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # its engine processes die with it (vLLM watches its parent)
            self.proc.wait(30)
        self.proc = None

    def __enter__(self) -> "Engine":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the child ----------------------------------------------------------------------------------------


def _flush_worker(worker, timeout: float) -> bool:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return not has_kv_transfer_group() or bool(get_kv_transfer_group().flush(timeout))


def _serve(req, resp) -> None:
    llm = None
    for line in req:
        msg = json.loads(line)
        op = msg["op"]
        try:
            if op == "start":
                llm = _start(msg)
                out: dict[str, Any] = {"ok": True}
            elif op == "generate":
                out = {"results": _generate(llm, msg["prompts"], msg["max_tokens"])}
            elif op == "flush":
                out = {"ok": all(llm.collective_rpc(_flush_worker, args=(60.0,)))}
            elif op == "metrics":
                out = {"metrics": _metrics(llm)}
            elif op == "exit":
                resp.write(json.dumps({"ok": True}) + "\n")
                resp.flush()
                break
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception as e:
            import traceback

            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"}
        resp.write(json.dumps(out) + "\n")
        resp.flush()
    if llm is not None:  # an orderly engine shutdown: the workers' connectors flush their saves
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass


def _start(msg: dict[str, Any]):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    args = dict(msg["args"])
    if msg.get("connector") is not None:
        args["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm.connector", kv_role="kv_both",
            kv_load_failure_policy="recompute", kv_connector_extra_config=msg["connector"])
    return LLM(model=msg["model"], **args)


def _generate(llm, prompts: list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    results = []
    for ids in prompts:
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - t
        results.append({"tokens": list(out.outputs[0].token_ids), "cached": int(out.num_cached_tokens or 0),
                        "seconds": seconds})
    return results


def _metrics(llm) -> dict[str, float]:
    """The connector's counters as vLLM's stat logger recorded them (float values: LLM.get_metrics()
    rounds counters to integers)."""
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.startswith("vllm:kvstore_") and sample.name.endswith("_total"):
                key = f"{sample.name[len('vllm:kvstore_'):-len('_total')]}|{sample.labels.get('tier', '')}"
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


if __name__ == "__main__":
    with os.fdopen(int(sys.argv[1]), "r") as _req, os.fdopen(int(sys.argv[2]), "w") as _resp:
        _serve(_req, _resp)
