"""Codec benchmark: size, error, model fidelity and speed of every codec and cachegen level.

    python -m benchmarks.codec_bench [--quick] [--json PATH] [--model tiny]

On SmolLM2-135M-Instruct's KV by default (contexts of 512 tokens from `benchmarks.texts.evaluation_text`,
256-token chunks; its codebook was profiled on other text, the Python language reference; `--model tiny`:
the tiny model on its held-out RAG prompts): bits per element with all metadata
(payload + codec params), relative reconstruction error per layer, and next-token fidelity: the context's
KV goes through the codec and the continuation is run on the decoded KV, against the unquantized KV
(KL and top-1 agreement). Speed on random 32 layers x 8 KV heads x 128 chunks (fp16, 2 threads), in MB/s
of fp16 input/output, beside a plain copy of the same tensor measured in the same run; and the cachegen
levels again on 256-token chunks of the model's own KV (fp16) with its codebook. Each speed row rotates
through three distinct chunks (median of 6 repeats with --quick, 15 without). Also: the
anchor-delta measurement (ideal code length of the same symbols with and without delta coding).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

from benchmarks.common import add_model_option, load_bench_model, print_table, write_json
from benchmarks.fidelity import mean_kl, mean_top1_agreement
from benchmarks.models.evalset import load_rag
from codec import make_codec
from codec import rans
from codec.cachegen import LEVELS, CacheGenCodec, quantize
from codec.codebook import codebooks

CHUNK = 256
CONT = 64


def codecs_under_test(model_fp: str):
    out = [("zstd", make_codec("zstd")), ("int8", make_codec("int8")), ("kivi4", make_codec("kivi4")),
           ("kivi2", make_codec("kivi2"))]
    for lv in sorted(LEVELS):
        out.append((f"cachegen-{lv}", CacheGenCodec(lv).bind(model_fp)))
    out.append(("cachegen-2 per-chunk table", CacheGenCodec(2)))
    return out


def lmcache_packing_bytes(kv: torch.Tensor, level: int) -> int:
    """The same quantization and streams, with the tables packed as LMCache does: an int16 CDF of A + 1
    entries per (layer, K/V, channel) in every chunk (pickle's own overhead not counted)."""
    c = CacheGenCodec(level)
    sym, _ = quantize(kv, c.spec)
    n_tab = sym.shape[0] * sym.shape[2]
    ours_fallback = len(c.encode(kv))
    blob = len(c._table_blob(sym)) + 4
    return ours_fallback - blob + n_tab * (c.spec.alphabet + 1) * 2


def _token_windows(model_name: str, tok) -> list[torch.Tensor]:
    """Token ids of candidate contexts: consecutive windows of the evaluation text, or for the tiny model
    its held-out RAG prompts."""
    span = 2 * CHUNK + CONT
    if model_name == "tiny":
        return [torch.tensor(tok.encode(ex.prompt())) for ex in load_rag()]
    from benchmarks.texts import evaluation_text

    ids = torch.tensor(tok(evaluation_text(), add_special_tokens=False, verbose=False)["input_ids"])
    return [ids[s : s + span] for s in range(0, len(ids) - span + 1, span)]


def fidelity_data(model_name: str, model, tok, n: int):
    """Up to n (KV of a 512-token context [L, 2, 512, H, D], its next CONT token ids)."""
    from connectors.hf import prefill_kv

    data = []
    for ids in _token_windows(model_name, tok):
        if len(ids) < 2 * CHUNK + CONT:
            continue
        ctx, cont = ids[: 2 * CHUNK], ids[2 * CHUNK : 2 * CHUNK + CONT]
        data.append((prefill_kv(model, ctx), cont))
        if len(data) >= n:
            break
    return data


@torch.inference_mode()
def continuation_logits(model, kv, cont):
    from connectors.hf import kv_to_cache, run_cached

    return run_cached(model, cont.reshape(1, -1), kv_to_cache(kv, model))[0].logits[0]  # [CONT, V]


def through(codec, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """kv [L, 2, T, H, D] -> (decoded, bytes incl. params), chunk by chunk."""
    out = torch.empty_like(kv)
    total = 0
    for s in range(0, kv.shape[2], CHUNK):
        ch = kv[:, :, s : s + CHUNK].contiguous()
        p = codec.encode(ch)
        o = torch.empty_like(ch)
        codec.decode(memoryview(p), o)
        out[:, :, s : s + CHUNK] = o
        total += len(p) + len(codec.params())
    return out, total


def delta_measurement(chunks: list[torch.Tensor], train: list[torch.Tensor]) -> dict:
    """Ideal code length (bits/element) of level-2 symbols coded plain, as anchor deltas (groups of 10,
    CacheGen) and as previous-token deltas, with per-(layer, K/V, channel) distributions from `train`."""
    spec = LEVELS[2]

    def syms(kv, how):
        q = quantize(kv, spec)[0].astype(np.int64) - spec.m  # [LK, T, C]
        if how == "anchor":
            a = q[:, (np.arange(q.shape[1]) // 10) * 10]
            q = np.where((np.arange(q.shape[1]) % 10 == 0)[None, :, None], q, q - a)
        elif how == "previous":
            q = np.concatenate([q[:, :1], q[:, 1:] - q[:, :-1]], axis=1)
        return q + 4 * spec.m

    res = {}
    for how in ("plain", "anchor", "previous"):
        tr = np.stack([syms(k, how) for k in train])  # [N, LK, T, C]
        te = np.stack([syms(k, how) for k in chunks])
        nbins = 8 * spec.m + 1
        bits = []
        for lk in range(tr.shape[1]):
            for c in range(tr.shape[3]):
                h = np.bincount(tr[:, lk, :, c].ravel(), minlength=nbins) + 0.05
                p = h / h.sum()
                bits.append(-np.log2(p[te[:, lk, :, c].ravel()]).mean())
        res[how] = float(np.mean(bits))
    return res


SPEED_CHUNKS = 3  # distinct chunks each speed row rotates through


def speed(codecs, repeats: int, kvs: list[torch.Tensor] | None = None) -> list[dict]:
    """Encode / decode MB/s of fp16 KV beside a copy of it, 2 threads: on the chunks `kvs` (each
    [L, 2, T, H, D] fp16) with the codecs as given, or (None) on `SPEED_CHUNKS` random 32 x 8 x 128 chunks
    with random codebooks for cachegen. Each repeat encodes, decodes and copies the next chunk in turn,
    as a loader meets a stream of distinct chunks (a decoder keeps per-thread tables that follow the
    chunk's steps); one round over the chunks warms up first."""
    rans.set_threads(2)
    torch.set_num_threads(2)
    real = kvs is not None
    if not real:
        kvs = [torch.randn(32, 2, CHUNK, 8, 128).to(torch.float16) for _ in range(SPEED_CHUNKS)]
    mb = kvs[0].numel() * 2 / 1e6
    dst = torch.empty_like(kvs[0])
    rows = []
    for name, codec in codecs:
        if not real and name.startswith("cachegen") and codec.codebook is not None:
            codec = CacheGenCodec(codec.level, _random_codebook(kvs[0], codec.level))
        ps = [codec.encode(kv) for kv in kvs]
        for p in ps:
            codec.decode(memoryview(p), dst)
        enc, dec, cp = [], [], []
        for r in range(repeats):
            kv, p = kvs[r % len(kvs)], ps[r % len(kvs)]
            t = time.perf_counter(); codec.encode(kv); enc.append(time.perf_counter() - t)
            t = time.perf_counter(); codec.decode(memoryview(p), dst); dec.append(time.perf_counter() - t)
            t = time.perf_counter(); dst.copy_(kv); cp.append(time.perf_counter() - t)
        e, d, c = statistics.median(enc), statistics.median(dec), statistics.median(cp)
        rows.append({"codec": name, "encode_mb_s": mb / e, "decode_mb_s": mb / d, "copy_mb_s": mb / c,
                     "bits": sum(len(p) for p in ps) * 8 / (kvs[0].numel() * len(ps))})
    return rows


_RANDOM_CB = {}


def _random_codebook(kv: torch.Tensor, level: int):
    """A codebook for kv's shape [L, 2, T, H, D] (profiled on one other random chunk of it), so the speed
    row of a codebook level decodes like the real thing."""
    from codec.cachegen import count_symbols
    from codec.codebook import profile_codebook

    layers, channels = kv.shape[0], kv.shape[3] * kv.shape[4]
    key = (layers, channels, level)
    if key not in _RANDOM_CB:
        other = torch.randn_like(kv, dtype=torch.float32)
        _RANDOM_CB[key] = profile_codebook(f"random-{layers}x{kv.shape[3]}x{kv.shape[4]}",
                                           {level: count_symbols(other, LEVELS[level])}, layers, channels)
    return _RANDOM_CB[key]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    add_model_option(ap)
    args = ap.parse_args(argv)
    from connectors.hf import model_fingerprint

    torch.manual_seed(0)
    random.seed(0)
    model, tok, info = load_bench_model(args.model)
    fp = model_fingerprint(model)
    cb = codebooks.for_fingerprint(fp)
    print(f"{info['model']} ({info['model_layers']} layers), fingerprint {fp}; codebook: "
          f"{'shipped, ' + str(len(cb.to_bytes())) + ' bytes raw' if cb else 'none (per-chunk tables)'}")
    n_ex = 8 if args.quick else (40 if args.model == "tiny" else 20)  # the tiny model keeps its old run
    data = fidelity_data(args.model, model, tok, n_ex)
    refs = [continuation_logits(model, kv, cont) for kv, cont in data]
    codecs = codecs_under_test(fp)
    rows, report = [], {**info, "fingerprint": fp, "examples": len(data), "chunk_tokens": CHUNK}
    int8_bytes = None
    per_codec = {}
    for name, codec in codecs:
        kls, t1s, nbytes, nel, lerr = [], [], 0, 0, []
        for (kv, cont), ref in zip(data, refs):
            dec, b = through(codec, kv)
            nbytes += b
            nel += kv.numel()
            lerr.append(((dec - kv).flatten(1).norm(dim=1) / kv.flatten(1).norm(dim=1)).numpy())
            logits = continuation_logits(model, dec, cont)
            kls.append(mean_kl(ref, logits))
            t1s.append(mean_top1_agreement(ref, logits))
        per_layer = np.mean(lerr, axis=0)
        per_codec[name] = {"bits_per_element": nbytes * 8 / nel, "kl": float(np.mean(kls)), "top1": float(np.mean(t1s)),
                           "rel_err_per_layer": [float(x) for x in per_layer], "bytes": nbytes}
        if name == "int8":
            int8_bytes = nbytes
        print(f"  {name}: done", flush=True)
    chunks = [kv[:, :, s : s + CHUNK].contiguous() for kv, _ in data for s in range(0, kv.shape[2], CHUNK)]
    lm = sum(lmcache_packing_bytes(ch, 2) + 2 for ch in chunks)
    l2 = per_codec["cachegen-2"]
    for name, r in per_codec.items():
        rows.append([name, r["bits_per_element"], int8_bytes / r["bytes"], " ".join(f"{e:.3f}" for e in r["rel_err_per_layer"]),
                     f"{r['kl']:.5f}", f"{100 * r['top1']:.2f}%"])
    print_table(["codec", "bits/elem", "x smaller than int8", "rel. error per layer", "KL", "top-1"], rows)
    print(f"LMCache-style packing (same quantization, int16 CDF per chunk) at level 2: {lm * 8 / sum(c.numel() for c in chunks):.3f} "
          f"bits/elem; ours {l2['bits_per_element']:.3f}: {lm / l2['bytes']:.2f}x smaller")
    # delta coding: train distributions on half the chunks, measure on the other half
    half = len(chunks) // 2
    delta = delta_measurement(chunks[half:], chunks[:half])
    print("anchor-delta measurement (ideal bits/elem, level-2 symbols, same error): " + ", ".join(f"{k} {v:.3f}" for k, v in delta.items()))
    timed = [(n, c) for n, c in codecs if n in ("zstd", "int8", "kivi2", "cachegen-2 per-chunk table") or n[:9] == "cachegen-"]
    repeats = 2 * SPEED_CHUNKS if args.quick else 5 * SPEED_CHUNKS
    sp = speed(timed, repeats)
    print_table(["codec (32x8x128 fp16, 2 threads)", "encode MB/s", "decode MB/s", "copy MB/s", "decode / copy"],
                [[r["codec"], r["encode_mb_s"], r["decode_mb_s"], r["copy_mb_s"], r["decode_mb_s"] / r["copy_mb_s"]] for r in sp])
    # the same on chunks of the model's own KV, with its codebook (the sink section included where it has one)
    sp_model = speed([(n, c) for n, c in timed if n.startswith("cachegen")], repeats,
                     [ch.to(torch.float16).contiguous() for ch in chunks[:SPEED_CHUNKS]])
    print_table([f"codec ({info['model']} chunk, fp16, 2 threads)", "encode MB/s", "decode MB/s", "copy MB/s", "decode / copy"],
                [[r["codec"], r["encode_mb_s"], r["decode_mb_s"], r["copy_mb_s"], r["decode_mb_s"] / r["copy_mb_s"]] for r in sp_model])
    cg2 = next(r for r in sp if r["codec"] == "cachegen-2")
    cg2_model = next(r for r in sp_model if r["codec"] == "cachegen-2")
    report.update({
        "codecs": per_codec, "speed": sp, "delta_measurement": delta,
        "bits_per_element_l2": l2["bits_per_element"], "kl_l2": l2["kl"], "top1_l2": l2["top1"],
        "ratio_vs_int8_l2": int8_bytes / l2["bytes"], "ratio_vs_per_chunk_cdf_l2": lm / l2["bytes"],
        "decode_mb_s": cg2["decode_mb_s"], "encode_mb_s": cg2["encode_mb_s"], "gpu_decode_gb_s": None,
        "speed_model_chunk": sp_model, "decode_mb_s_model_chunk": cg2_model["decode_mb_s"],
        "encode_mb_s_model_chunk": cg2_model["encode_mb_s"], "copy_mb_s": cg2["copy_mb_s"],
    })
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
