"""`kvstore demo`: context loading end to end with the shipped model, on the configured store.

Two conversations, each turn answered twice: once through `HFConnector` (reusing stored KV) and once
by plain `model.generate` over the whole prompt (the reference). For every turn it prints the tokens
reused and the tier they came from, the time to first token with and without the store, and whether
the two answers are identical.
1. Questions over a long document: the first question computes the document and stores its chunks;
   then the store is reopened on the same directory (memory tier empty, as after a restart), so the
   next question loads the document from disk; the ones after load it from memory (promoted on hit).
2. A multi-turn chat over other passages: every turn reuses the KV of all earlier turns.
The demo's namespace is cleared first, so every run starts cold. Without the shipped model's files it
uses a seeded random-weight Llama (answers are then gibberish, but still identical).
"""

from __future__ import annotations

import re
import time
from typing import Callable

import numpy as np
import torch

from kvstore.config import StoreConfig, build_store

DEMO_NAMESPACE = "demo"
MAX_NEW_TOKENS = 12


class _ByteTokenizer:
    """Token ids = UTF-8 bytes: enough to feed real text to the stand-in model below."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode())}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


def _stand_in_model():
    """A seeded, randomly initialized Llama (4 layers, GQA), used only when the shipped model's files
    are not in the checkout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval(), _ByteTokenizer(), "random-llama (stand-in)"


def _load_model():
    from connectors.shipped_model import load_shipped_model, shipped_model_path

    try:
        model, tok = load_shipped_model(torch.float32)
    except FileNotFoundError:
        return _stand_in_model()
    return model, tok, shipped_model_path().name


_FACTS = [  # (pattern over a passage, question, the answer's opening the model completes)
    (r"([A-Z]\w+ [A-Z]\w+) was born in \w+\.", "Where was {0} born?", "{0} was born in"),
    (r"([A-Z]\w+ [A-Z]\w+) works as an? \w+\.", "What does {0} work as?", "{0} works as a"),
    (r"The city of ([A-Z]\w+) lies in \w+\.", "In which country is {0}?", "The city of {0} lies in"),
]


def _questions(passages: list[str], n: int) -> list[str]:
    """Up to `n` questions about facts stated in `passages`, in the held-out set's Q/A format."""
    out = []
    for p in passages:
        for pattern, q, a in _FACTS:
            for m in re.finditer(pattern, p):
                out.append(f"\n\nQ: {q.format(m.group(1))}\nA: {a.format(m.group(1))}")
    step = max(1, len(out) // n)
    return out[::step][:n]


def _material() -> tuple[list[str], list[str]]:
    """Two disjoint sets of passages from the held-out RAG set (its data file, read as data: the library
    imports no benchmark code): a long document and a chat context."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "heldout" / "rag.jsonl"
    examples = [json.loads(line)["passages"] for line in path.read_text().splitlines() if line.strip()]
    examples.sort(key=lambda passages: -sum(len(p) for p in passages))
    return list(examples[0]), list(examples[1])


def _sentence_end_ids(tok, vocab_size: int) -> list[int]:
    """Ids of the tokens that end a sentence or a line: answers stop there."""
    ids = [i for i in range(vocab_size) if "\n" in (t := tok.decode([i])) or t.rstrip().endswith((".", "?", "!"))]
    return ids or [vocab_size - 1]


def _cell(text: str, width: int) -> str:
    text = text.strip().replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "~"


def run_demo(config: StoreConfig, echo: Callable[[str], None] = print) -> int:
    from connectors.hf import ChatSession, DocumentQA, HFConnector

    t_start = time.perf_counter()
    if config.disk is None:
        echo("the demo needs a disk tier; configure [disk]")
        return 2
    echo("loading the model ...")
    model, tok, model_name = _load_model()
    stop_ids = _sentence_end_ids(tok, model.config.vocab_size)
    tiers = f"disk {config.disk.path} ({config.disk.codec})"
    if config.memory:
        tiers = f"cpu memory {config.memory.capacity / 2**20:.0f} MiB -> {tiers}"
    echo(f"model: {model_name}; store: {tiers}; chunks of {config.chunk_tokens} tokens")

    doc_passages, chat_passages = _material()
    store = build_store(config)
    store.clear(namespace=DEMO_NAMESPACE)
    conn = HFConnector(model, store, namespace=DEMO_NAMESPACE)
    with torch.inference_mode():  # warm-up at full size, so the first timings are not cold starts
        for n in (1024, 256, 16):
            model(torch.zeros(1, n, dtype=torch.long))

    rows: list[tuple] = []
    header = f"  {'#':>2}  {'question':34s} {'answer':14s} {'prompt':>6s} {'reused (tier)':>16s}  {'TTFT store':>10s} {'full':>8s} {'same':>5s}"

    def show(i: int, turn) -> None:
        conn.wait_stored()  # the background write of new chunks must not slow the reference's timing
        ref, full_s = _reference(model, turn.prompt_ids, stop_ids)
        same = ref == turn.answer_ids
        r = turn.report
        tier = f"{r.reused_tokens} ({'+'.join(r.tokens_by_tier)})" if r.reused_tokens else "0"
        q = turn.message.split("Q: ")[-1].split("\n")[0]
        echo(f"  {i:>2}  {_cell(q, 34):34s} {_cell(turn.answer, 14):14s} {r.prompt_tokens:>6d} {tier:>16s}  "
             f"{r.ttft_s * 1e3:8.1f}ms {full_s * 1e3:6.1f}ms {'yes' if same else 'NO':>5s}")
        if r.fallback:
            echo(f"      note: {r.fallback}")
        rows.append((r, full_s, same))

    doc = "\n\n".join(doc_passages)
    questions = _questions(doc_passages, 4)
    n_doc = len(tok(doc, add_special_tokens=False)["input_ids"])
    echo(f"\n1. Questions over one document ({n_doc} tokens, {len(doc_passages)} passages)")
    echo(header)
    qa = DocumentQA(conn, tok, doc, max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids)
    for i, q in enumerate(questions, 1):
        show(i, qa.ask(q))
        if i == 1:
            conn.close()
            store.close()
            echo("      -- store reopened on the same directory (memory tier empty, as after a restart) --")
            store = build_store(config)
            conn = HFConnector(model, store, namespace=DEMO_NAMESPACE, fingerprint=conn.fingerprint)
            qa.connector = conn

    context = "\n\n".join(chat_passages)
    echo(f"\n2. A chat over other passages ({len(tok(context, add_special_tokens=False)['input_ids'])} tokens); "
         "every turn reuses the earlier turns")
    echo(header)
    chat = ChatSession(conn, tok, context, max_new_tokens=MAX_NEW_TOKENS, stop_ids=stop_ids)
    for i, q in enumerate(_questions(chat_passages, 4), 1):
        show(i, chat.ask(q))
    conn.close()
    store.close()

    reused = [(r, full) for r, full, _ in rows if r.reused_tokens]
    speedups = [full / r.ttft_s for r, full in reused]
    identical = sum(same for _, _, same in rows)
    echo(f"\n{identical} of {len(rows)} answers identical to plain generation; turns with reused KV: "
         f"{len(reused)}, median TTFT {np.median(speedups) if speedups else float('nan'):.1f}x faster than "
         f"a full prefill; {time.perf_counter() - t_start:.1f} s in all")
    return 0 if identical == len(rows) else 1


@torch.inference_mode()
def _reference(model, prompt_ids: np.ndarray, stop_ids) -> tuple[list[int], float]:
    """(answer of plain `model.generate` over the whole prompt, time of its prefill to first logits)."""
    ids = torch.from_numpy(prompt_ids.astype(np.int64)).reshape(1, -1)
    t = time.perf_counter()
    logits = model(ids).logits[0, -1]
    int(torch.argmax(logits))
    full_s = time.perf_counter() - t
    out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=list(stop_ids),
                         pad_token_id=list(stop_ids)[0])
    return out[0, ids.shape[1]:].tolist(), full_s
