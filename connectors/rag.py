"""The RAG API: precompute the KV of a corpus of passages once, then answer questions over any retrieved
passages, in any order, with blend (or with a full prefill, for comparison).

Primitives of `RagPipeline(model, tokenizer, store, config)`:
- `precompute(passages)`: each passage (a dict id -> text, or a list of texts) tokenized on its own,
  prefilled alone from position 0 and stored as standalone chunks (`connectors.hf.compute_chunks` with
  `ChunkKind.STANDALONE, include_partial=True`: the same keys as `kvstore precompute`); passages already
  stored are skipped. Ids are remembered for `answer(passage_ids=...)`.
- `prefill(question, passages | passage_ids, ratio=, full_prefill=)` -> `connectors.hf.Prefill`: the
  prompt's cache and the last logits.
  The prompt is `passage_1 SEP passage_2 SEP ... passage_n SEP question` (SEP = `config.separator`);
  passages are looked up in the store (a chunk that is missing is computed, not an error), the
  separators and the question are always computed.
- `answer(...)`: `prefill` + greedy decoding -> `RagAnswer` (text, token ids, time to first token, report).
- `TfidfRetriever(corpus)`: scikit-learn TF-IDF retrieval over the same corpus (`search(query, k)` -> ids).

Bad input (unknown passage ids, an empty question, a ratio outside [0, 1]) raises `RagError` (a
`ValueError`) or `blend.BlendError`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from blend import BlendConfig, BlendReport, LayerDriver, Part, blend, passage_refs, store_segments
from connectors.hf import Prefill, compute_chunks, decode_greedy, kv_to_cache, model_fingerprint, run_cached
from kvstore.keys import ChunkKind


class RagError(ValueError):
    """Bad input to the RAG API."""


@dataclass(frozen=True, slots=True)
class RagConfig:
    namespace: str = "rag"
    separator: str = "\n\n"  # between passages, and between the last passage and the question
    max_new_tokens: int = 16
    blend: BlendConfig = field(default_factory=BlendConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise RagError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not isinstance(self.blend, BlendConfig):
            raise RagError("blend must be a BlendConfig")


@dataclass(frozen=True, slots=True)
class PrecomputeStats:
    passages: int
    chunks_computed: int
    passages_already_stored: int
    seconds: float


@dataclass(slots=True)
class RagAnswer:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    ttft_seconds: float
    report: BlendReport | None


class RagPipeline:
    def __init__(self, model, tokenizer, store, config: RagConfig = RagConfig()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.config = config
        self.fingerprint = model_fingerprint(model)
        self.driver = LayerDriver(model)
        self.passages: dict[str, str] = {}
        self._sep = self.tokens(config.separator)

    def tokens(self, text: str) -> torch.Tensor:
        """A text's own token ids [T] int64 (no special tokens): how passages are keyed."""
        if not isinstance(text, str):
            raise RagError(f"expected text, got {type(text).__name__}")
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    # -- corpus -----------------------------------------------------------------------------------------

    def precompute(self, passages: Mapping[str, str] | Sequence[str]) -> PrecomputeStats:
        """Store the standalone KV of every passage not stored yet; remember ids (a list: "0", "1", ...)."""
        items = passages.items() if isinstance(passages, Mapping) else ((str(i), p) for i, p in enumerate(passages))
        t = time.perf_counter()
        n = computed = already = 0
        for pid, text in items:
            ids = self.tokens(text)
            if ids.numel() == 0:
                raise RagError(f"passage {pid!r} has no tokens")
            self.passages[str(pid)] = text
            n += 1
            refs = passage_refs(self.store, ids, fingerprint=self.fingerprint, namespace=self.config.namespace)
            if all(self.store.contains([r.key for r in refs])):
                already += 1
                continue
            chunks = compute_chunks(self.model, ids, fingerprint=self.fingerprint, namespace=self.config.namespace,
                                    chunk_tokens=self.store.chunk_tokens, kind=ChunkKind.STANDALONE,
                                    include_partial=True)
            self.store.put(chunks)
            computed += len(chunks)
        return PrecomputeStats(n, computed, already, time.perf_counter() - t)

    def _texts(self, passages: Sequence[str], passage_ids: Sequence[str]) -> list[str]:
        if isinstance(passages, str) or isinstance(passage_ids, str):
            raise RagError("passages and passage_ids must be sequences, not one string")
        if passages and passage_ids:
            raise RagError("give passages or passage_ids, not both")
        if passage_ids:
            missing = [p for p in passage_ids if str(p) not in self.passages]
            if missing:
                raise RagError(f"unknown passage ids (not precomputed): {missing[:5]}")
            return [self.passages[str(p)] for p in passage_ids]
        return list(passages)

    def parts(self, question: str, passages: Sequence[str]) -> list[Part]:
        """The prompt as blend parts: each passage (looked up), a separator after each, the question."""
        q = self.tokens(question)
        if q.numel() == 0:
            raise RagError("the question has no tokens")
        out: list[Part] = []
        for text in passages:
            out += [Part.passage(self.tokens(text)), Part.fresh(self._sep)]
        return out + [Part.fresh(q)]

    # -- query ------------------------------------------------------------------------------------------

    def prefill(self, question: str, passages: Sequence[str] = (), *, passage_ids: Sequence[str] = (),
                ratio: float | None = None, full_prefill: bool = False,
                blend_config: BlendConfig | None = None) -> Prefill:
        """The prompt's KV and last logits, by blend or a full prefill. Blend runs with `blend_config`
        (default: the pipeline's), its ratio replaced by `ratio` where given."""
        parts = self.parts(question, self._texts(passages, passage_ids))
        ids = torch.cat([p.tokens for p in parts])  # [T]
        t = time.perf_counter()
        if full_prefill:
            with torch.inference_mode():
                out, cache = run_cached(self.model, ids[None].to(self.driver.device), logits_to_keep=1)
            return Prefill(ids, cache, out.logits[0, -1], time.perf_counter() - t, None)
        cfg = self.config.blend if blend_config is None else blend_config
        if not isinstance(cfg, BlendConfig):
            raise RagError(f"blend_config must be a BlendConfig, got {type(cfg).__name__}")
        cfg = cfg if ratio is None else dataclasses.replace(cfg, ratio=ratio)
        segs = store_segments(self.store, parts, fingerprint=self.fingerprint, namespace=self.config.namespace)
        res = blend(self.model, segs, cfg, driver=self.driver)
        seconds = time.perf_counter() - t
        return Prefill(ids, kv_to_cache(res.kv, self.model), res.logits, seconds, res.report)

    def answer(self, question: str, passages: Sequence[str] = (), *, passage_ids: Sequence[str] = (),
               ratio: float | None = None, full_prefill: bool = False,
               max_new_tokens: int | None = None) -> RagAnswer:
        """Greedy answer to `question` over the passages (texts, or ids given to `precompute`)."""
        pre = self.prefill(question, passages, passage_ids=passage_ids, ratio=ratio, full_prefill=full_prefill)
        n = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if n <= 0:
            raise RagError(f"max_new_tokens must be positive, got {n}")
        new = decode_greedy(self.model, pre.cache, pre.logits, n, getattr(self.tokenizer, "eos_token_id", None))
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return RagAnswer(text, new, pre.ids.numel(), pre.seconds, pre.report)


class TfidfRetriever:
    """TF-IDF retrieval (scikit-learn) over a corpus id -> text: `search(query, k)` -> the k best ids."""

    def __init__(self, corpus: Mapping[str, str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not corpus:
            raise RagError("the corpus is empty")
        self.ids = [str(k) for k in corpus]
        self.vectorizer = TfidfVectorizer(sublinear_tf=True)
        self.matrix = self.vectorizer.fit_transform(list(corpus.values()))  # [N, vocab] sparse, rows L2-normed

    def search(self, query: str, k: int) -> list[str]:
        if k <= 0:
            raise RagError(f"k must be positive, got {k}")
        scores = (self.matrix @ self.vectorizer.transform([query]).T).toarray()[:, 0]  # [N]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [self.ids[i] for i in order[:k]]
