"""`kvstore demo`: the store's own demonstration on real KV from a real model.

It prefills a document with the project's shipped model (a seeded random-weight Llama when the model's
files are absent), stores the KV chunks in the configured store
(with a memory tier deliberately too small, so chunks are evicted and written back to disk), "restarts"
by opening a fresh store on the same directory, looks the document up again, reads every chunk back,
and checks each one against a fresh prefill, bit for bit where the codec is lossless.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from kvstore.config import MemoryConfig, StoreConfig, build_store
from kvstore.chunk import Chunk

DEMO_NAMESPACE = "demo"


def _document_text() -> str:
    """Real prose: the docstrings of this project's modules, in a fixed order."""
    import codec.lossless, kvstore.keys, kvstore.record, kvstore.store, kvstore.tiers.disk, kvstore.tiers.memory

    mods = [kvstore.store, kvstore.keys, kvstore.record, kvstore.tiers.disk, kvstore.tiers.memory, codec.lossless]
    return "\n\n".join(m.__doc__.strip() for m in mods) * 2


class _ByteTokenizer:
    """Token ids = UTF-8 bytes: enough to feed real text to the stand-in model below."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(text.encode())}


def _stand_in_model():
    """A seeded, randomly initialized Llama (4 layers, GQA): real KV from a real transformers model,
    used only when the shipped model's files are not in the checkout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval(), _ByteTokenizer(), "random-llama (stand-in)"


def _load_model():
    """The project's shipped model; a seeded stand-in when its files are absent."""
    from connectors.shipped_model import load_shipped_model, shipped_model_path

    try:
        model, tok = load_shipped_model(torch.float32)
    except FileNotFoundError:
        return _stand_in_model()
    return model, tok, shipped_model_path().name


def run_demo(config: StoreConfig, echo: Callable[[str], None] = print) -> int:
    from connectors.hf import kv_layout, model_fingerprint, prefill_kv

    t0 = time.perf_counter()
    echo("[1/5] loading the model ...")
    model, tokenizer, model_name = _load_model()
    fingerprint = model_fingerprint(model)
    text = _document_text()
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    max_len = getattr(model.config, "max_position_embeddings", 2048)
    ids = ids[: (min(len(ids), max_len) // config.chunk_tokens) * config.chunk_tokens]
    layout = kv_layout(model)
    chunk_bytes = layout.nbytes(config.chunk_tokens)
    n_chunks = len(ids) // config.chunk_tokens
    echo(f"      model {model_name} ({fingerprint}), document of {len(ids)} tokens = {n_chunks} chunks of "
         f"{config.chunk_tokens} tokens, {chunk_bytes / 2**20:.2f} MiB of KV each")

    # A memory tier that holds only half of the chunks, so the demo shows eviction and write-back.
    small = MemoryConfig(capacity=max(chunk_bytes, chunk_bytes * n_chunks // 2 + 4096), device="cpu")
    cfg = dataclasses.replace(config, memory=small)
    if cfg.disk is None:
        echo("the demo needs a disk tier; configure [disk]")
        return 2

    echo("[2/5] prefilling and storing the document's KV ...")
    t = time.perf_counter()
    kv = prefill_kv(model, ids)  # [L, 2, T, H, D]
    prefill_s = time.perf_counter() - t
    store = build_store(cfg)
    refs = store.chunk_refs(ids, model=fingerprint, namespace=DEMO_NAMESPACE)
    already = store.lookup_refs(refs)
    chunks = [Chunk.from_ref(r, kv[:, :, r.start : r.end]) for r in refs]
    t = time.perf_counter()
    store.put(chunks)
    store.flush()
    put_s = time.perf_counter() - t
    s = store.stats()
    mem, disk = s["tiers"]["cpu"], s["tiers"]["disk"]
    echo(f"      prefill {prefill_s * 1e3:.0f} ms; put {len(chunks)} chunks in {put_s * 1e3:.0f} ms "
         f"({already} were already stored from an earlier run)")
    echo(f"      memory tier: {mem['usage'].entries} chunks, {mem['usage'].used_bytes / 2**20:.1f} of "
         f"{mem['usage'].capacity_bytes / 2**20:.1f} MiB, {mem['stats']['evictions']} evicted "
         f"({s['store']['demotions']} written back to disk on eviction)")
    echo(f"      disk tier:   {disk['usage'].entries} records, {disk['usage'].used_bytes / 2**20:.1f} MiB "
         f"under {cfg.disk.path} (codec {cfg.disk.codec})")
    store.close()

    echo("[3/5] restarting: a new store on the same directory (memory tier empty) ...")
    store = build_store(cfg)
    stored = store.lookup(ids, model=fingerprint, namespace=DEMO_NAMESPACE)
    echo(f"      lookup: {stored} of {len(ids)} tokens stored")
    changed = ids.clone()
    k = n_chunks // 2
    changed[k * config.chunk_tokens + 3] = (int(changed[k * config.chunk_tokens + 3]) + 1) % model.config.vocab_size
    echo(f"      lookup of the same document with one token changed in chunk {k}: "
         f"{store.lookup(changed, model=fingerprint, namespace=DEMO_NAMESPACE)} tokens (prefix semantics)")

    echo("[4/5] reading every chunk back and checking it against a fresh prefill ...")
    t = time.perf_counter()
    got = store.get(refs)
    get_s = time.perf_counter() - t
    fresh = prefill_kv(model, ids)
    lossless = cfg.disk.codec in ("raw", "zstd")
    bad = 0
    worst = 0.0
    for r, c in zip(refs, got):
        if c is None:
            bad += 1
            continue
        ref = fresh[:, :, r.start : r.end]
        if lossless and not torch.equal(c.kv, ref):
            bad += 1
        worst = max(worst, (c.kv.float() - ref.float()).abs().max().item())
    echo(f"      read {sum(c is not None for c in got)} chunks in {get_s * 1e3:.0f} ms; "
         f"{'bit-identical' if lossless and not bad else f'max abs error {worst:.2e}'} to a fresh prefill"
         + (f"; {bad} chunks MISSING OR DIFFERENT" if bad else ""))
    s = store.stats()
    echo("[5/5] counters of this run:")
    for name, tier in s["tiers"].items():
        st = tier["stats"]
        echo(f"      {name:5s} hits {st['hits']:4d}  misses {st['misses']:4d}  read {st['bytes_read'] / 2**20:7.1f} MiB"
             f"  written {st['bytes_written'] / 2**20:7.1f} MiB  corrupt {st['corrupt']}")
    echo(f"      promotions to memory on hit: {s['store']['promotions']}")
    store.close()
    echo(f"done in {time.perf_counter() - t0:.1f} s")
    return 1 if bad else 0
