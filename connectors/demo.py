"""`kvstore demo`: context loading end to end with a real model, on the configured store.

Two conversations, each turn answered twice: once through `HFConnector` (reusing stored KV) and once
by plain `model.generate` over the whole prompt (the reference). For every turn it prints the tokens
reused and the tier they came from, the time to first token with and without the store, and whether
the two answers are token-identical.
1. Questions over a long document: the first question computes the document and stores its chunks;
   then the store is reopened on the same directory (memory tier empty, as after a restart), so the
   next question loads the document from disk; the ones after load it from memory (promoted on hit).
2. A multi-turn chat: every turn reuses the KV of all earlier turns.
The default model is SmolLM2-135M-Instruct (converted once into the user's cache on first use; prompts
through its chat template) over Python's license and history text (`assets/demo/python-license.txt`,
~3,000 tokens), the chat about the same document (its first turn reuses the document's chunks).
`--model tiny` runs the project's 4-layer model over its generated facts (`assets/demo/tiny.json`).
The demo's namespace is cleared first, so every run starts cold.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kvstore.config import StoreConfig, build_store

DEMO_NAMESPACE = "demo"
ASSETS = Path(__file__).resolve().parent / "assets" / "demo"


@dataclass(frozen=True, slots=True)
class Script:
    """What the demo asks: a document with questions, then a chat (context + turns)."""

    document: str
    document_title: str
    questions: list[str]
    chat_context: str
    chat_title: str
    chat_turns: list[str]
    max_new_tokens: int


def _license_script() -> Script:
    text = (ASSETS / "python-license.txt").read_text()
    # Sections A (history) and B up to the CNRI agreement: ~2,900 tokens of SmolLM2's tokenizer.
    document = text[: text.index("CNRI LICENSE AGREEMENT FOR PYTHON 1.6.1")].strip()
    return Script(
        document=document, document_title="Python's history and license",
        questions=["Who is the principal author of Python?", "Where is CNRI located?",
                   "What kind of organization is the PSF?", "Who created Python?"],
        chat_context=document, chat_title="A chat about the same document (its first turn reuses the document's chunks)",
        chat_turns=["What kind of organization is the PSF?", "Who is Python's principal author?",
                    "Where is CNRI located?"],
        max_new_tokens=24)


_FACTS = [  # (pattern over a passage, question, the answer's opening the tiny model completes)
    (r"([A-Z]\w+ [A-Z]\w+) was born in \w+\.", "Where was {0} born?", "{0} was born in"),
    (r"([A-Z]\w+ [A-Z]\w+) works as an? \w+\.", "What does {0} work as?", "{0} works as a"),
    (r"The city of ([A-Z]\w+) lies in \w+\.", "In which country is {0}?", "The city of {0} lies in"),
]


def _tiny_questions(passages: list[str], n: int) -> list[str]:
    """Up to `n` questions about facts stated in `passages`, in the format the tiny model was trained on."""
    out = []
    for p in passages:
        for pattern, q, a in _FACTS:
            for m in re.finditer(pattern, p):
                out.append(f"\n\nQ: {q.format(m.group(1))}\nA: {a.format(m.group(1))}")
    step = max(1, len(out) // n)
    return out[::step][:n]


def _tiny_script() -> Script:
    material = json.loads((ASSETS / "tiny.json").read_text())
    doc, chat = material["document"], material["chat"]
    return Script(document="\n\n".join(doc), document_title=f"one document of {len(doc)} passages",
                  questions=_tiny_questions(doc, 4), chat_context="\n\n".join(chat),
                  chat_title="A chat over other passages (every turn reuses the earlier turns)",
                  chat_turns=_tiny_questions(chat, 4), max_new_tokens=12)


def _sentence_end_ids(tok, vocab_size: int) -> list[int]:
    """Ids of the tokens that end a sentence or a line: the tiny model's answers stop there."""
    ids = [i for i in range(vocab_size) if "\n" in (t := tok.decode([i])) or t.rstrip().endswith((".", "?", "!"))]
    return ids or [vocab_size - 1]


def _stop_ids(model, tok, chat: bool) -> list[int]:
    if not chat:
        return _sentence_end_ids(tok, model.config.vocab_size)
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    return sorted(i for i in ids if i is not None)


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "~"


def run_demo(config: StoreConfig, model_name: str = "smollm2-135m", echo: Callable[[str], None] = print) -> int:
    from connectors.hf import ChatSession, DocumentQA, HFConnector
    from connectors.models import MODELS, load_model

    t_start = time.perf_counter()
    if config.disk is None:
        echo("the demo needs a disk tier; configure [disk]")
        return 2
    spec = MODELS.get(model_name)
    title = spec.title if spec else str(model_name)
    echo(f"loading {title} ...")
    model, tok = load_model(model_name, torch.float32)
    chat = bool(getattr(tok, "chat_template", None))
    script = _license_script() if chat else _tiny_script()
    stop_ids = _stop_ids(model, tok, chat)
    tiers = f"disk {config.disk.path} ({config.disk.codec})"
    if config.memory:
        tiers = f"cpu memory {config.memory.capacity / 2**20:.0f} MiB -> {tiers}"
    params = sum(p.numel() for p in model.parameters())
    echo(f"model: {title} ({model.config.num_hidden_layers} layers, {params / 1e6:.0f}M parameters, float32, "
         f"{torch.get_num_threads()} threads); store: {tiers}; chunks of {config.chunk_tokens} tokens")
    if chat:
        echo("(a 135M-parameter model: its answers can be wrong; what the demo checks is that they are the same "
             "with the store as without it)")

    store = build_store(config)
    store.clear(namespace=DEMO_NAMESPACE)
    conn = HFConnector(model, store, namespace=DEMO_NAMESPACE)
    with torch.inference_mode():  # warm-up, so the first timings are not cold starts
        for n in (512, 16):
            model(torch.zeros(1, n, dtype=torch.long))

    rows: list[tuple] = []
    header = (f"  {'#':>2}  {'question':40s} {'prompt':>6s} {'reused (tier)':>16s}  {'TTFT store':>10s} "
              f"{'full':>8s} {'same':>5s}")

    def show(i: int, turn) -> None:
        conn.wait_stored()  # the background write of new chunks must not slow the reference's timing
        ref, full_s = _reference(model, turn.prompt_ids, stop_ids, script.max_new_tokens)
        same = ref == turn.answer_ids
        r = turn.report
        tier = f"{r.reused_tokens} ({'+'.join(r.tokens_by_tier)})" if r.reused_tokens else "0"
        q = turn.message.split("Q: ")[-1].split("\n")[0]
        echo(f"  {i:>2}  {_cell(q, 40):40s} {r.prompt_tokens:>6d} {tier:>16s}  {_ms(r.ttft_s):>10s} "
             f"{_ms(full_s):>8s} {'yes' if same else 'NO':>5s}")
        echo(f"      -> {_cell(turn.answer, 96)}")
        if r.fallback:
            echo(f"      note: {r.fallback}")
        rows.append((r, full_s, same))

    n_doc = len(tok(script.document, add_special_tokens=False)["input_ids"])
    echo(f"\n1. Questions over {script.document_title} ({n_doc} tokens)")
    echo(header)
    qa = DocumentQA(conn, tok, script.document, max_new_tokens=script.max_new_tokens, stop_ids=stop_ids)
    for i, q in enumerate(script.questions, 1):
        show(i, qa.ask(q))
        if i == 1:
            conn.close()
            store.close()
            echo("      -- store reopened on the same directory (memory tier empty, as after a restart) --")
            store = build_store(config)
            conn = HFConnector(model, store, namespace=DEMO_NAMESPACE, fingerprint=conn.fingerprint)
            qa.connector = conn

    n_ctx = len(tok(script.chat_context, add_special_tokens=False)["input_ids"])
    echo(f"\n2. {script.chat_title}: {n_ctx} tokens of context")
    echo(header)
    session = ChatSession(conn, tok, script.chat_context, max_new_tokens=script.max_new_tokens, stop_ids=stop_ids)
    for i, q in enumerate(script.chat_turns, 1):
        show(i, session.ask(q))
    conn.close()
    store.close()

    reused = [(r, full) for r, full, _ in rows if r.reused_tokens]
    speedups = [full / r.ttft_s for r, full in reused]
    identical = sum(same for _, _, same in rows)
    echo(f"\n{identical} of {len(rows)} answers token-identical to plain generation; turns with reused KV: "
         f"{len(reused)}, median TTFT {np.median(speedups) if speedups else float('nan'):.1f}x faster than "
         f"a full prefill; {time.perf_counter() - t_start:.0f} s in all")
    return 0 if identical == len(rows) else 1


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}ms" if seconds >= 1 else f"{seconds * 1e3:.1f}ms"


@torch.inference_mode()
def _reference(model, prompt_ids: np.ndarray, stop_ids, max_new_tokens: int) -> tuple[list[int], float]:
    """(answer of plain `model.generate` over the whole prompt, time of its prefill to first logits)."""
    ids = torch.from_numpy(prompt_ids.astype(np.int64)).reshape(1, -1)
    t = time.perf_counter()
    logits = model(ids, logits_to_keep=1).logits[0, -1]
    int(torch.argmax(logits))
    full_s = time.perf_counter() - t
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(stop_ids), pad_token_id=list(stop_ids)[0])
    return out[0, ids.shape[1]:].tolist(), full_s
