"""Held-out evaluation set of the shipped tiny model, and the scores computed on it.

Owns:

* ``build_rag_examples``: RAG-style examples from the *held-out* entity pool of ``corpus`` (names
  disjoint from training): 4-8 passages of 100-300 tokens, a question, the prompt tail the answer
  continues, the ``target`` greedy decoding must produce, the final ``answer``, hops (1 or 2), and the
  chance level (1 / distinct candidates of the answer's type in the prompt).
* ``build_continuations``: natural-text continuations (128-token prefix, 64-token continuation) from
  docstrings/comments of files held out of training.
* ``write_heldout`` / ``load_rag`` / ``load_continuations``: the committed JSONL files under
  ``benchmarks/models/heldout/``.
* scoring: ``rag_accuracy`` (teacher-forced greedy exact match of the whole target, which equals greedy
  decoding of ``len(target)`` tokens), ``choice_accuracy`` (multiple choice among the candidates of
  the answer's type stated in the prompt: chance is 1 / candidates), ``text_loss``, ``induction_score``; ``python -m
  benchmarks.models.evalset --model DIR`` prints them all as JSON.

Everything is deterministic given the seed and the tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.models import corpus
from connectors.hf import run_cached

HELDOUT_DIR = Path(__file__).resolve().parent / "heldout"
RAG_FILE = "rag.jsonl"
CONT_FILE = "continuations.jsonl"
EVAL_SEED = 20241121
MAX_PROMPT_TOKENS = 1000


@dataclass(frozen=True)
class RagExample:
    id: int
    passages: tuple[str, ...]
    question: str
    prompt_tail: str  # "Q: <question>\nA: <restated subject>"; the target continues it
    target: str  # what greedy decoding must produce, e.g. " Varnhold."
    answer: str  # the final entity, e.g. " Varnhold"
    hops: int
    relation: str
    chance: float  # 1 / distinct values of the answer's type stated in the prompt
    candidates: tuple[str, ...] = ()  # plausible targets (one is ``target``), for multiple choice

    def prompt(self) -> str:
        """Passages, a blank line between each, then the question and the answer's opening words."""
        return "\n\n".join(self.passages) + "\n\n" + self.prompt_tail


@dataclass(frozen=True)
class Continuation:
    id: int
    prefix: str
    continuation: str


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _passage(rng: random.Random, tokenizer, make) -> str:
    """A passage of 100-300 tokens: grow the filler count until it is long enough."""
    for n_filler in range(1, 30):
        text = make(n_filler)
        if _ntok(tokenizer, text) >= 100:
            break
    assert 100 <= _ntok(tokenizer, text) <= 300, text
    return text


def build_rag_examples(tokenizer, n_one_hop: int, n_two_hop: int, seed: int = EVAL_SEED) -> list[RagExample]:
    """RAG examples over held-out entities; 1-hop relations cycle born/profession/city_country."""
    rng = random.Random(seed)
    out: list[RagExample] = []
    wanted = ["country"] * n_two_hop + [corpus.RELATIONS_1HOP[i % 3] for i in range(n_one_hop)]
    random.Random(seed + 1).shuffle(wanted)
    for relation in wanted:
        while True:
            world = corpus.make_world(rng, rng.randint(3, 6), rng.randint(3, 4), heldout=True)
            passages = [_passage(rng, tokenizer, lambda k, g=g: corpus.person_passage(rng, g, k))
                        for g in corpus.person_groups(rng, world)]
            passages += [_passage(rng, tokenizer, lambda k, c=c, cc=cc: corpus.city_passage(rng, c, cc, k))
                         for c, cc in world.city_country]
            rng.shuffle(passages)
            q = corpus.make_question(rng.choice(world.people), world, relation)
            ex = RagExample(len(out), tuple(passages), q.question, q.prompt_tail, q.target, q.answer,
                            q.hops, q.relation, corpus.chance_level(world, q),
                            corpus.candidate_targets(world, q))
            if 4 <= len(passages) <= 8 and _ntok(tokenizer, ex.prompt()) <= MAX_PROMPT_TOKENS:
                out.append(ex)
                break
    return out


def build_continuations(tokenizer, n: int, prefix_tokens: int = 128, cont_tokens: int = 64) -> list[Continuation]:
    """Prefix/continuation pairs cut from held-out docstrings and comments (files never trained on)."""
    texts = corpus.harvest_text(4_000_000, heldout=True)
    rng = random.Random(EVAL_SEED)
    rng.shuffle(texts)
    out: list[Continuation] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) < prefix_tokens + cont_tokens:
            continue
        out.append(Continuation(len(out), tokenizer.decode(ids[:prefix_tokens]),
                                tokenizer.decode(ids[prefix_tokens:prefix_tokens + cont_tokens])))
        if len(out) == n:
            break
    return out


def write_heldout(tokenizer, out_dir: Path = HELDOUT_DIR, n_one_hop: int = 120, n_two_hop: int = 60,
                  n_cont: int = 50) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / RAG_FILE, "w") as f:
        for ex in build_rag_examples(tokenizer, n_one_hop, n_two_hop):
            f.write(json.dumps(asdict(ex)) + "\n")
    with open(out_dir / CONT_FILE, "w") as f:
        for c in build_continuations(tokenizer, n_cont):
            f.write(json.dumps(asdict(c)) + "\n")


def load_rag(path: Path = HELDOUT_DIR / RAG_FILE) -> list[RagExample]:
    rows = [json.loads(line) for line in open(path)]
    return [RagExample(**{**r, "passages": tuple(r["passages"]), "candidates": tuple(r.get("candidates", ()))})
            for r in rows]


def load_continuations(path: Path = HELDOUT_DIR / CONT_FILE) -> list[Continuation]:
    return [Continuation(**json.loads(line)) for line in open(path)]


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def target_match(model, tokenizer, ex: RagExample) -> tuple[bool, float]:
    """(greedy exact match of the whole target, mean NLL of the target tokens), one forward pass.

    Teacher forcing with argmax at every target position equals greedy decoding of the target, since
    greedy decoding only ever conditions on its own (here: correct) previous tokens.
    """
    p = tokenizer(ex.prompt(), add_special_tokens=False)["input_ids"]
    t = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])  # [1, P+T]
    logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()  # [T, V]
    tgt = torch.tensor(t)
    nll = torch.nn.functional.cross_entropy(logits, tgt).item()
    return bool((logits.argmax(-1) == tgt).all()), nll


@torch.no_grad()
def choose_candidate(model, tokenizer, ex: RagExample) -> tuple[bool, list[float]]:
    """Multiple choice: (the most likely of ``ex.candidates`` is the target, summed log-prob of each).

    The prompt is run once; each candidate is scored on a copy of its KV cache.
    """
    p = tokenizer(ex.prompt(), add_special_tokens=False)["input_ids"]
    out, prompt_cache = run_cached(model, torch.tensor([p]))
    last = out.logits[0, -1].float().log_softmax(-1)  # [V]
    scores = []
    for cand in ex.candidates:
        c = tokenizer(cand, add_special_tokens=False)["input_ids"]
        lp = last[c[0]].item()
        if len(c) > 1:
            lg = run_cached(model, torch.tensor([c[:-1]]), copy.deepcopy(prompt_cache))[0].logits[0]
            lp += lg.float().log_softmax(-1).gather(1, torch.tensor(c[1:])[:, None]).sum().item()  # [C-1, V]
        scores.append(lp)
    best = max(range(len(scores)), key=scores.__getitem__)
    return ex.candidates[best] == ex.target, scores


def choice_accuracy(model, tokenizer, examples: list[RagExample]) -> dict:
    """Multiple-choice accuracy and its chance (1 / number of candidates) per hop count."""
    by: dict[int, list] = {}
    for ex in examples:
        ok, _ = choose_candidate(model, tokenizer, ex)
        by.setdefault(ex.hops, []).append((ok, 1.0 / len(ex.candidates)))
    return {str(h): {"n": len(v), "accuracy": sum(o for o, _ in v) / len(v), "chance": sum(c for _, c in v) / len(v)}
            for h, v in sorted(by.items())}


def rag_accuracy(model, tokenizer, examples: list[RagExample]) -> dict:
    """Accuracy, mean chance and mean target NLL per hop count ('1', '2')."""
    by: dict[int, list] = {}
    for ex in examples:
        ok, nll = target_match(model, tokenizer, ex)
        by.setdefault(ex.hops, []).append((ok, nll, ex.chance))
    return {str(h): {"n": len(v), "accuracy": sum(o for o, _, _ in v) / len(v),
                     "chance": sum(c for _, _, c in v) / len(v),
                     "target_nll": sum(n for _, n, _ in v) / len(v)} for h, v in sorted(by.items())}


@torch.no_grad()
def text_loss(model, tokenizer, texts: list[str], max_tokens: int = 1024) -> float:
    """Mean next-token NLL (nats/token) over ``texts``, each truncated to ``max_tokens``."""
    tot, n = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]])
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].float()  # [S-1, V]
        tot += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return tot / max(n, 1)


@torch.no_grad()
def induction_score(model, vocab_size: int, n: int = 16, length: int = 50, seed: int = 0) -> dict:
    """Loss on the first and second copy of a random token sequence repeated twice.

    A model with induction heads predicts the second copy far better: ``score = loss1 - loss2`` (nats).
    """
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(256, vocab_size, (n, length), generator=g)
    ids = torch.cat([seq, seq], dim=1)  # [n, 2L]
    logits = model(input_ids=ids).logits[:, :-1].float()  # [n, 2L-1, V]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [n, 2L-1]
    l1 = nll[:, : length - 1].mean().item()
    l2 = nll[:, length:].mean().item()
    return {"loss_first": l1, "loss_second": l2, "score": l1 - l2}


def evaluate(model, tokenizer, rag: list[RagExample], conts: list[Continuation]) -> dict:
    model.eval()
    passages = [p for ex in rag[:40] for p in ex.passages[:1]]
    out = {
        "rag": rag_accuracy(model, tokenizer, rag),
        "rag_choice": choice_accuracy(model, tokenizer, rag),
        "loss_heldout_text": text_loss(model, tokenizer, [c.prefix + c.continuation for c in conts]),
        "loss_heldout_passages": text_loss(model, tokenizer, passages),
        "induction": induction_score(model, model.config.vocab_size),
    }
    out["ppl_heldout_text"] = math.exp(out["loss_heldout_text"])
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF model dir (default: the shipped model)")
    ap.add_argument("--write", action="store_true", help="(re)generate the held-out JSONL with its tokenizer")
    args = ap.parse_args()
    if args.model is None:
        from connectors.models import model_path
        args.model = model_path("tiny")
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model)
    if args.write:
        write_heldout(tok)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    print(json.dumps(evaluate(model, tok, load_rag(), load_continuations()), indent=2))


if __name__ == "__main__":
    main()
