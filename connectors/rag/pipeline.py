"""`RagPipeline`: answer questions over retrieved passages whose KV was computed once, with blend (or with a
full prefill, for comparison).

Primitives of `RagPipeline(model, tokenizer, store, config)`:
- `precompute(passages)`: each passage (a dict id -> text, or a list of texts) tokenized on its own,
  prefilled alone from position 0 and stored as standalone chunks (`connectors.hf.compute_chunks` with
  `ChunkKind.STANDALONE, include_partial=True`: the same keys as `kvstore precompute --mode passages`);
  passages already stored are skipped. Ids are remembered for `answer(passage_ids=...)`.
- `add_manifest(manifest, documents)` / `RagPipeline.from_manifest(...)`: the passages a precompute job
  stored (`connectors.rag.passages`), answered from without computing them again.
- `prefill(question, passages | passage_ids, answer_prefix=, ratio=, full_prefill=)` ->
  `connectors.hf.Prefill`: the prompt's cache and the last logits. The prompt is laid out by
  `config.template` (`connectors.rag.prompt`; default: the tokenizer's chat template): the prefix and the
  passages are looked up in the store (a chunk that is missing is computed, not an error, and the report
  says why), the separators, the question, the template's suffix and the answer's opening are computed.
- `answer(...)`: `prefill` + greedy decoding -> `RagAnswer` (text, token ids, time to first token, the blend
  report, and where each passage's KV came from: `passages_from_store`, `recomputed`);
- `passage_rows(passages)`: the prompt rows of each passage (what `sources` reads the blend report by).

Bad input (unknown passage ids, an empty question, a ratio outside [0, 1], a manifest for another namespace
or chunk size) raises `RagError` (a `ValueError`) or `blend.BlendError`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from blend import BlendConfig, BlendReport, LayerDriver, Part, blend, passage_refs, store_segments
from connectors.hf import (Prefill, compute_chunks, decode_greedy, kv_to_cache, model_fingerprint, run_cached,
                           use_gqa_attention)
from connectors.precompute import Manifest
from connectors.rag.errors import RagError
from connectors.rag.passages import ManifestLoad, Passage, manifest_passages
from connectors.rag.prompt import PromptTemplate
from kvstore.keys import DEFAULT_NAMESPACE, ChunkKind


@dataclass(frozen=True, slots=True)
class RagConfig:
    namespace: str = DEFAULT_NAMESPACE  # where the passages are keyed: `kvstore precompute`'s default too
    template: PromptTemplate | None = None  # None: the tokenizer's chat template where it has one, else plain
    chunk_tokens: int | None = None  # chunk size of the passages' keys; None: the store's
    max_new_tokens: int = 16
    blend: BlendConfig = field(default_factory=BlendConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise RagError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not isinstance(self.blend, BlendConfig):
            raise RagError("blend must be a BlendConfig")
        if self.template is not None and not isinstance(self.template, PromptTemplate):
            raise RagError("template must be a PromptTemplate")
        if self.chunk_tokens is not None and self.chunk_tokens <= 0:
            raise RagError(f"chunk_tokens must be positive, got {self.chunk_tokens}")


@dataclass(frozen=True, slots=True)
class PrecomputeStats:
    passages: int
    chunks_computed: int
    passages_already_stored: int
    seconds: float


@dataclass(frozen=True, slots=True)
class PassageSource:
    """Where one passage of a prompt got its KV."""

    id: str | None  # the passage id; None for a passage given as text
    from_store: bool  # every token's KV was loaded (blend then recomputes its share of them)
    reason: str | None = None  # why (some of) it was computed instead: "missing", "evicted", "fingerprint mismatch"


@dataclass(slots=True)
class RagAnswer:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    ttft_seconds: float
    report: BlendReport | None  # None for a full prefill
    passages: list[PassageSource] = field(default_factory=list)  # in prompt order

    @property
    def passages_from_store(self) -> int:
        return sum(p.from_store for p in self.passages)

    @property
    def recomputed(self) -> list[PassageSource]:
        """The passages computed (in full or in part) because their stored KV could not be used."""
        return [p for p in self.passages if p.reason is not None]


class RagPipeline:
    def __init__(self, model, tokenizer, store, config: RagConfig = RagConfig()) -> None:
        self.model = model
        use_gqa_attention(model)  # the same results; a grouped-query model's KV heads are not copied per query head
        self.tokenizer = tokenizer
        self.store = store
        self.config = config
        self.template = config.template or PromptTemplate.for_tokenizer(tokenizer)
        self.chunk_tokens = config.chunk_tokens or store.chunk_tokens
        self.fingerprint = model_fingerprint(model)
        self.driver = LayerDriver(model)
        self.passages: dict[str, Passage] = {}
        self.load: ManifestLoad | None = None  # what the last `add_manifest` found
        self._sep = self.tokens(self.template.separator)
        self._prefix = self.tokens(self.template.prefix)  # [P], may be empty
        self._prefix_checked = False

    @classmethod
    def from_manifest(cls, model, tokenizer, store, manifest: Manifest | str | os.PathLike,
                      documents: Mapping[str, str] | str | os.PathLike, config: RagConfig = RagConfig()
                      ) -> RagPipeline:
        """A pipeline over the passages a precompute job stored: the config's namespace and chunk size are
        the manifest's. `documents`: the corpus the job read (its path, or id -> text)."""
        from connectors.precompute import read_manifest

        m = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
        if m.header is None:
            raise RagError("the manifest has no header (the precompute job never started writing it)")
        pipe = cls(model, tokenizer, store, dataclasses.replace(config, namespace=m.header.namespace,
                                                                 chunk_tokens=m.header.chunk_tokens))
        pipe.add_manifest(m, documents)
        return pipe

    def tokens(self, text: str) -> torch.Tensor:
        """A text's own token ids [T] int64 (no special tokens): how passages are keyed."""
        if not isinstance(text, str):
            raise RagError(f"expected text, got {type(text).__name__}")
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def texts(self) -> dict[str, str]:
        """id -> text of every known passage (what a retriever indexes)."""
        return {pid: p.text for pid, p in self.passages.items()}

    # -- corpus -----------------------------------------------------------------------------------------

    def _store_standalone(self, ids: torch.Tensor) -> int:
        """Store a passage's standalone chunks unless all are stored; the number computed."""
        refs = passage_refs(self.store, ids, fingerprint=self.fingerprint, namespace=self.config.namespace,
                            chunk_tokens=self.chunk_tokens)
        if all(self.store.contains([r.key for r in refs])):
            return 0
        chunks = compute_chunks(self.model, ids, fingerprint=self.fingerprint, namespace=self.config.namespace,
                                chunk_tokens=self.chunk_tokens, kind=ChunkKind.STANDALONE, include_partial=True)
        self.store.put(chunks)
        return len(chunks)

    def _ensure_prefix(self) -> None:
        """The template's prefix opens every prompt: stored once, like a passage (exact: it starts at 0)."""
        if not self._prefix_checked and self._prefix.numel():
            self._store_standalone(self._prefix)
        self._prefix_checked = True

    def precompute(self, passages: Mapping[str, str] | Sequence[str]) -> PrecomputeStats:
        """Store the standalone KV of every passage not stored yet (and the template's prefix); remember ids
        (a list: "0", "1", ...)."""
        items = passages.items() if isinstance(passages, Mapping) else ((str(i), p) for i, p in enumerate(passages))
        t = time.perf_counter()
        self._ensure_prefix()
        n = computed = already = 0
        for pid, text in items:
            ids = self.tokens(text)
            if ids.numel() == 0:
                raise RagError(f"passage {pid!r} has no tokens")
            self.passages[str(pid)] = Passage(str(pid), ids, text, stored=True)
            n += 1
            new = self._store_standalone(ids)
            computed += new
            already += new == 0
        return PrecomputeStats(n, computed, already, time.perf_counter() - t)

    def add_manifest(self, manifest: Manifest | str | os.PathLike,
                     documents: Mapping[str, str] | str | os.PathLike) -> ManifestLoad:
        """Register the passages of a precompute manifest (`kvstore precompute --mode passages`): their ids,
        token ids and texts, and that their chunks were stored. Nothing is computed."""
        m, passages, load = manifest_passages(manifest, documents, self.tokenizer, fingerprint=self.fingerprint)
        if m.header.namespace != self.config.namespace:
            raise RagError(f"the manifest's passages are in namespace {m.header.namespace!r}, this pipeline reads "
                           f"{self.config.namespace!r} (RagPipeline.from_manifest takes the manifest's)")
        if m.header.chunk_tokens != self.chunk_tokens:
            raise RagError(f"the manifest's chunks hold {m.header.chunk_tokens} tokens, this pipeline keys "
                           f"{self.chunk_tokens} (RagConfig.chunk_tokens)")
        self.passages.update((p.id, p) for p in passages)
        self.load = load
        return load

    # -- query ------------------------------------------------------------------------------------------

    def _passages(self, passages: Sequence[str], passage_ids: Sequence[str]) -> list[Passage]:
        if isinstance(passages, str) or isinstance(passage_ids, str):
            raise RagError("passages and passage_ids must be sequences, not one string")
        if passages and passage_ids:
            raise RagError("give passages or passage_ids, not both")
        if passage_ids:
            missing = [p for p in passage_ids if str(p) not in self.passages]
            if missing:
                raise RagError(f"unknown passage ids (not precomputed): {missing[:5]}")
            return [self.passages[str(p)] for p in passage_ids]
        return [Passage(None, self.tokens(t), t) for t in passages]

    def parts(self, question: str, passages: Sequence[Passage], answer_prefix: str = "") -> list[Part]:
        """The prompt as blend parts: the template's prefix (looked up), each passage (looked up, or computed
        with its reason) and a separator after it, then the question, the suffix and the answer's opening."""
        if not isinstance(question, str) or not question.strip():
            raise RagError("the question has no tokens")
        out: list[Part] = [Part.passage(self._prefix)] if self._prefix.numel() else []
        for p in passages:
            if p.tokens.numel() == 0:
                raise RagError(f"passage {p.id!r} has no tokens")
            part = Part.fresh(p.tokens, p.reason) if p.reason else Part.passage(p.tokens, stored=p.stored)
            out += [part, Part.fresh(self._sep)]
        return out + [Part.fresh(self.tokens(self.template.tail(question, answer_prefix)))]

    def prefill(self, question: str, passages: Sequence[str] = (), *, passage_ids: Sequence[str] = (),
                answer_prefix: str = "", ratio: float | None = None, full_prefill: bool = False,
                blend_config: BlendConfig | None = None) -> Prefill:
        """The prompt's KV and last logits, by blend or a full prefill. Blend runs with `blend_config`
        (default: the pipeline's), its ratio replaced by `ratio` where given."""
        return self._prefill(question, self._passages(passages, passage_ids), answer_prefix, ratio, full_prefill,
                             blend_config)

    def _prefill(self, question: str, passages: list[Passage], answer_prefix: str, ratio: float | None,
                 full_prefill: bool, blend_config: BlendConfig | None) -> Prefill:
        parts = self.parts(question, passages, answer_prefix)
        ids = torch.cat([p.tokens for p in parts])  # [T]
        if full_prefill:
            t = time.perf_counter()
            with torch.inference_mode():
                out, cache = run_cached(self.model, ids[None].to(self.driver.device), logits_to_keep=1)
            return Prefill(ids, cache, out.logits[0, -1], time.perf_counter() - t, None)
        cfg = self.config.blend if blend_config is None else blend_config
        if not isinstance(cfg, BlendConfig):
            raise RagError(f"blend_config must be a BlendConfig, got {type(cfg).__name__}")
        cfg = cfg if ratio is None else dataclasses.replace(cfg, ratio=ratio)
        self._ensure_prefix()
        t = time.perf_counter()
        segs = store_segments(self.store, parts, fingerprint=self.fingerprint, namespace=self.config.namespace,
                              chunk_tokens=self.chunk_tokens)
        res = blend(self.model, segs, cfg, driver=self.driver)
        seconds = time.perf_counter() - t
        return Prefill(ids, kv_to_cache(res.kv, self.model), res.logits, seconds, res.report)

    def passage_rows(self, passages: Sequence[Passage]) -> list[range]:
        """The prompt rows of each passage, in the layout of `parts` (after the prefix, a separator after each)."""
        out, row = [], self._prefix.numel()
        for p in passages:
            out.append(range(row, row + p.tokens.numel()))
            row += p.tokens.numel() + self._sep.numel()
        return out

    def sources(self, passages: Sequence[Passage], report: BlendReport | None) -> list[PassageSource]:
        """Where each passage's KV came from, by its rows in the prompt."""
        if report is None:  # a full prefill loads nothing
            return [PassageSource(p.id, False) for p in passages]
        fresh = torch.zeros(report.num_tokens, dtype=torch.bool)
        fresh[report.fresh_rows] = True
        out = []
        for p, rows in zip(passages, self.passage_rows(passages)):
            why = [r.reason for r in report.recomputed if r.row < rows.stop and r.row + r.tokens > rows.start]
            out.append(PassageSource(p.id, not bool(fresh[rows.start : rows.stop].any()), why[0] if why else p.reason))
        return out

    def answer(self, question: str, passages: Sequence[str] = (), *, passage_ids: Sequence[str] = (),
               answer_prefix: str = "", ratio: float | None = None, full_prefill: bool = False,
               max_new_tokens: int | None = None) -> RagAnswer:
        """Greedy answer to `question` over the passages (texts, or ids given to `precompute` or read from a
        manifest); `answer_prefix` opens the answer (it is part of the prompt, not of the returned text)."""
        n = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if n <= 0:
            raise RagError(f"max_new_tokens must be positive, got {n}")
        chosen = self._passages(passages, passage_ids)
        pre = self._prefill(question, chosen, answer_prefix, ratio, full_prefill, None)
        new = decode_greedy(self.model, pre.cache, pre.logits, n, getattr(self.tokenizer, "eos_token_id", None))
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return RagAnswer(text, new, pre.ids.numel(), pre.seconds, pre.report, self.sources(chosen, pre.report))
