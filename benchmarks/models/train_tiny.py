"""Train the tiny Llama model that the project ships (``connectors/assets/tiny-llama``).

Owns the whole recipe: a byte-level BPE tokenizer trained on the offline corpus, a genuine
``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, grouped-query attention, tied embeddings), and a two-phase
curriculum on CPU:

* phase 1, short rows (``seq1`` tokens): half of every batch is ordinary text (docstrings and comments of
  installed packages), the rest copy tasks (random token segments repeated 2-4 times), associative recall
  (``key : value`` lists then queries) and bare fact lists with questions;
* phase 2, long rows (``seq2`` tokens): half text, half RAG documents of 4-8 fact passages with filler,
  followed by 1- and 2-hop questions in the cloze format of ``corpus``.

Loss is next-token cross entropy with per-token weights: 0 on tokens that cannot be predicted (the first
copy of a random segment, random keys/values), ``answer_weight`` on question targets, 1 elsewhere.
AdamW, linear warm-up then cosine decay, gradient clipping. Data order and init follow ``seed``.
The schedule runs on progress ``p = max(step / max_steps, elapsed / budget)``: phase 2 starts at
``p >= phase1_frac``, the cosine follows ``p``, training stops at ``p >= 1``. On an idle machine fast
enough for ``max_steps`` the run is fully step-determined; on a slower or shared one it still finishes
its schedule inside ``minutes`` (the whole run, data preparation and final evaluation included).
Intra-op threads adapt between 1 and 2 by measured speed (``ThreadPicker``), so a rerun draws the same
data and initialisation but is not bit-identical. A checkpoint (bf16 safetensors + tokenizer, HF format)
is written at every evaluation, so a usable model exists at any time. The log goes to
``train_tiny.log`` beside this file. Run: ``python -m benchmarks.models.train_tiny [--minutes N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from benchmarks.models import corpus, evalset

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = REPO / "connectors" / "assets" / "tiny-llama"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    out: str = str(DEFAULT_OUT)
    log: str = str(HERE / "train_tiny.log")
    cache_dir: str = "/tmp/kvstore-tiny-cache"
    minutes: float = 58.0  # wall-clock cap for the whole run, data preparation included
    # tokenizer and text
    vocab_size: int = 4096
    text_chars: int = 30_000_000
    tokenizer_chars: int = 8_000_000
    # model
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 688
    max_positions: int = 2048
    rope_theta: float = 10000.0
    # schedule
    max_steps: int = 8000
    phase1_frac: float = 0.35
    seq1: int = 256
    batch1: int = 8
    seq2: int = 1024
    batch2: int = 2
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    answer_weight: float = 3.0
    eval_every: int = 300
    log_every: int = 25
    threads: int = 0  # 0: adapt between 1 and 2 intra-op threads by measured speed (shared cores)

    def __post_init__(self) -> None:
        if not 0 < self.kv_heads < self.heads or self.heads % self.kv_heads:
            raise ValueError("grouped-query attention needs 0 < kv_heads < heads, heads % kv_heads == 0")
        if self.hidden % self.heads:
            raise ValueError("hidden must be a multiple of heads")


# ----------------------------------------------------------------------------- tokenizer and text


def build_tokenizer(cfg: TrainConfig, texts: list[str]):
    """Byte-level BPE (``cfg.vocab_size``) on a strided sample of the text plus generated fact text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(cfg.seed + 7)
    sample, n = [], 0
    for t in texts[::3]:
        sample.append(t)
        n += len(t)
        if n >= cfg.tokenizer_chars:
            break
    sample += [corpus.fact_training_text(rng, short=i % 2 == 0) for i in range(3000)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=cfg.max_positions)


def prepare(cfg: TrainConfig, log) -> tuple:
    """(tokenizer, text ids [N] int32 with EOS between documents), cached under ``cfg.cache_dir``."""
    from transformers import AutoTokenizer

    key = f"h2-v{cfg.vocab_size}-c{cfg.text_chars}-t{cfg.tokenizer_chars}-s{cfg.seed}"
    cache = Path(cfg.cache_dir) / key
    if (cache / "text_ids.safetensors").exists():
        log(f"cache hit {cache}")
        return AutoTokenizer.from_pretrained(cache / "tokenizer"), load_file(cache / "text_ids.safetensors")["ids"]
    t0 = time.time()
    texts = corpus.harvest_text(cfg.text_chars, heldout=False)
    log(f"harvested {len(texts)} texts, {sum(map(len, texts))} chars in {time.time() - t0:.0f}s")
    tok = build_tokenizer(cfg, texts)
    log(f"tokenizer: {len(tok)} tokens in {time.time() - t0:.0f}s")
    eos = tok.convert_tokens_to_ids(EOS)
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = torch.tensor([i for e in enc for i in (*e.ids, eos)], dtype=torch.int32)  # [N]
    log(f"text: {ids.numel()} tokens ({sum(map(len, texts)) / ids.numel():.2f} chars/token) "
        f"in {time.time() - t0:.0f}s")
    cache.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(cache / "tokenizer")
    save_file({"ids": ids}, cache / "text_ids.safetensors")
    return tok, ids


# ----------------------------------------------------------------------------- rows
# Every row builder returns (ids [T] int64, weights [T] float32); weights[t] scales the loss of
# predicting ids[t] from ids[:t].


class Rows:
    def __init__(self, cfg: TrainConfig, tok, text_ids: torch.Tensor):
        self.cfg, self.tok, self.text = cfg, tok, text_ids
        self.rng = random.Random(cfg.seed)
        self.eos = tok.convert_tokens_to_ids(EOS)
        self.colon = tok(" :", add_special_tokens=False)["input_ids"]
        self.nl = tok("\n", add_special_tokens=False)["input_ids"]

    def _enc(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def text_row(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.rng.randrange(0, self.text.numel() - T)
        return self.text[start:start + T].long(), torch.ones(T)

    def _rand(self, n: int) -> list[int]:
        return [self.rng.randrange(256, self.cfg.vocab_size) for _ in range(n)]

    def copy_row(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random segments of 8-40 tokens, each repeated 2-4 times; only the repeats are scored."""
        ids, w = [], []
        while len(ids) < T:
            seg = self._rand(self.rng.randint(8, 40))
            for r in range(self.rng.randint(2, 4)):
                ids += seg + self.nl
                w += [0.0 if r == 0 else 1.0] * len(seg) + [1.0] * len(self.nl)
        return torch.tensor(ids[:T]), torch.tensor(w[:T])

    def recall_row(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Associative recall: ``k : v`` pairs (keys of 1-2 tokens), then ``k : ?`` queries."""
        ids, w = [], []
        while len(ids) < T:
            pairs = [(self._rand(self.rng.randint(1, 2)), self._rand(1)) for _ in range(self.rng.randint(6, 16))]
            for k, v in pairs:
                ids += k + self.colon + v + self.nl
                w += [0.0] * len(k) + [1.0] * len(self.colon) + [0.0] + [1.0] * len(self.nl)
            for k, v in self.rng.sample(pairs, min(len(pairs), 8)):
                ids += k + self.colon + v + self.nl
                w += [0.0] * len(k) + [1.0] * len(self.colon) + [1.0] + [1.0] * len(self.nl)
        return torch.tensor(ids[:T]), torch.tensor(w[:T])

    def fact_row(self, T: int, short: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole fact documents (never cut), then ordinary text to fill the row."""
        aw = self.cfg.answer_weight
        ids, w = [], []
        while True:
            body, qs = corpus.fact_training_doc(self.rng, short)
            d_ids = self._enc(body + "\n\n")
            d_w = [1.0] * len(d_ids)
            for q in qs:
                a, b = self._enc(q.prompt_tail), self._enc(q.target) + self.nl
                d_ids += a + b
                d_w += [1.0] * len(a) + [aw] * len(b)
            d_ids.append(self.eos)
            d_w.append(1.0)
            if len(ids) + len(d_ids) > T:
                break
            ids += d_ids
            w += d_w
        fill, _ = self.text_row(T - len(ids)) if len(ids) < T else (torch.zeros(0, dtype=torch.long), None)
        ids_t = torch.cat([torch.tensor(ids, dtype=torch.long), fill])  # [T]
        return ids_t, torch.cat([torch.tensor(w), torch.ones(len(fill))])  # [T], [T]

    def batch(self, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, T] int64, weights [B, T] float32); at least half of the rows are ordinary text."""
        cfg = self.cfg
        if phase == 1:
            T, B = cfg.seq1, cfg.batch1
            kinds = ["text"] * (B // 2) + ["copy", "fact_short", "recall", "fact_short"] * B
        else:
            T, B = cfg.seq2, cfg.batch2
            kinds = ["text"] * (B // 2) + ["fact_long"] * B
        rows = []
        for kind in kinds[:B]:
            if kind == "text":
                rows.append(self.text_row(T))
            elif kind == "copy":
                rows.append(self.copy_row(T))
            elif kind == "recall":
                rows.append(self.recall_row(T))
            else:
                rows.append(self.fact_row(T, short=kind == "fact_short"))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# ----------------------------------------------------------------------------- training


def make_model(cfg: TrainConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tok.convert_tokens_to_ids(EOS)
    mc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
                     rope_theta=cfg.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return LlamaForCausalLM(mc)


def weighted_loss(logits: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], ids [B, T], w [B, T] -> scalar: sum(w * nll) / sum(w) over positions 1..T-1."""
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # [B, T-1]
    ww = w[:, 1:]
    return (nll * ww).sum() / ww.sum().clamp_min(1.0)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine on progress down to ``min_lr_frac``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    c = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * c)


def save(model, tok, out: Path) -> None:
    """HF format, weights in bf16 (the fixture must stay under 16 MB); loads back in any dtype."""
    out.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.generation_config.do_sample = False
    m.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def quick_eval(model, tok, rag, conts) -> dict:
    """In-training progress: induction, held-out 1/2-hop accuracy (subset), held-out text loss."""
    model.eval()
    ind = evalset.induction_score(model, model.config.vocab_size)
    acc = evalset.rag_accuracy(model, tok, rag)
    tl = evalset.text_loss(model, tok, [c.prefix + c.continuation for c in conts])
    model.train()
    return {"induction": round(ind["score"], 3), "ind_loss2": round(ind["loss_second"], 3),
            **{f"acc{h}": round(v["accuracy"], 3) for h, v in acc.items()},
            **{f"chance{h}": round(v["chance"], 3) for h, v in acc.items()},
            **{f"nll{h}": round(v["target_nll"], 3) for h, v in acc.items()},
            "text_loss": round(tl, 3)}


class ThreadPicker:
    """Intra-op thread count by measured speed: the 2 cores are shared, and 2 threads stall badly
    when another process takes a core (each step waits for the preempted thread), while 1 thread
    runs steadily. Blocks of ``block`` steps; every fifth block probes the other setting."""

    def __init__(self, fixed: int, block: int = 20):
        self.fixed, self.block = fixed, block
        self.rate: dict[int, float] = {}
        self.current, self._t, self._tokens = 2, 0.0, 0

    def before(self, step: int) -> None:
        if self.fixed:
            self.current = self.fixed
        elif step % self.block == 0:
            blk = step // self.block
            if blk < 2:
                self.current = 2 - blk % 2
            else:
                best = max(self.rate, key=self.rate.get)
                self.current = (3 - best) if blk % 5 == 0 else best
            self._t, self._tokens = time.time(), 0
        torch.set_num_threads(self.current)

    def after(self, step: int, tokens: int) -> None:
        self._tokens += tokens
        if not self.fixed and (step + 1) % self.block == 0:
            r = self._tokens / max(time.time() - self._t, 1e-6)
            old = self.rate.get(self.current)
            self.rate[self.current] = r if old is None else 0.5 * old + 0.5 * r


def train(cfg: TrainConfig) -> None:
    t0 = time.time()
    deadline = t0 + cfg.minutes * 60
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    logf = open(cfg.log, "w")

    def log(msg: str) -> None:
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    log(f"config {json.dumps(asdict(cfg))}")
    tok, text_ids = prepare(cfg, log)
    evalset.write_heldout(tok)
    rag = evalset.load_rag()
    quick_rag = [e for e in rag if e.hops == 1][:24] + [e for e in rag if e.hops == 2][:12]
    conts = evalset.load_continuations()[:10]
    log(f"held-out set written: {len(rag)} RAG examples, {len(evalset.load_continuations())} continuations")

    model = make_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters, {json.dumps(model.config.to_diff_dict())}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rows = Rows(cfg, tok, text_ids)
    threads = ThreadPicker(cfg.threads)
    out = Path(cfg.out)
    tokens, t_train, ema = 0, time.time(), None
    reserve = 150.0  # seconds kept for the last save and the full evaluation
    budget = deadline - reserve - t_train
    log(f"training budget {budget:.0f}s, at most {cfg.max_steps} steps")
    step, progress = 0, 0.0
    for step in range(cfg.max_steps):
        progress = max(step / cfg.max_steps, (time.time() - t_train) / budget)
        if progress >= 1.0:
            break
        phase = 1 if progress < cfg.phase1_frac else 2
        ids, w = rows.batch(phase)  # [B, T], [B, T]
        threads.before(step)
        lr = lr_at(cfg, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = weighted_loss(model(input_ids=ids).logits, ids, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        tokens += ids.numel()
        threads.after(step, ids.numel())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % cfg.log_every == 0:
            el = time.time() - t_train
            log(f"step {step} phase {phase} progress {progress:.3f} lr {lr:.2e} loss {loss.item():.3f} "
                f"ema {ema:.3f} gnorm {gnorm:.2f} tokens {tokens} tok/s {tokens / el:.0f} threads {threads.current}")
        if (step + 1) % cfg.eval_every == 0:
            log(f"eval step {step + 1} tokens {tokens} {json.dumps(quick_eval(model, tok, quick_rag, conts))}")
            save(model, tok, out)
    else:
        step += 1
    save(model, tok, out)
    log(f"done: {step} steps (progress {progress:.3f}), {tokens} tokens seen, train wall {time.time() - t_train:.0f}s, "
        f"final loss ema {ema:.3f}")
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # what ships, bf16 -> fp32
    log(f"final eval (shipped weights, full held-out set) "
        f"{json.dumps(evalset.evaluate(final, tok, rag, evalset.load_continuations()))}")
    log(f"total wall {time.time() - t0:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(TrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    cfg = TrainConfig(**vars(ap.parse_args()))
    train(cfg)


if __name__ == "__main__":
    main()
