"""The precompute-and-upload job: corpus -> model KV -> codec -> target tier, resumable and idempotent.

`PrecomputeJob(model, tokenizer, target, options, manifest_path).run(corpus)` -> `PrecomputeSummary`.

Pipeline (control in the calling thread, bytes in the upload workers):
1. plan a window of documents: tokenize, cut into units, key their chunks (content hashes, no model),
   ask the target which keys it holds (one batch call per window);
2. compute the missing chunks, batch by batch, on the model's device (`compute.compute_missing`);
3. hand each unit's chunks to `upload_workers` threads through a `BoundedWriter` (`max_pending_bytes`
   in flight): the model computes the next batch while the workers encode (the target's codec) and
   upload; when the workers fall behind the compute waits, so memory stays flat;
4. a worker puts the chunks straight into the target tier (no write-behind queue that could drop
   them), checks with `contains` that every chunk of the unit is there, retrying with backoff, and only
   then appends the unit's manifest record (fsynced). With `levels` (the store's `[adaptive] levels`), each
chunk is also stored at every one of those codec levels under its level key (`kvstore.levels`), and a
chunk counts as present, and as uploaded, only once the target holds every copy.

Guarantees: a unit whose chunks are all in the target is never computed again (keys are content
hashes); a unit is in the manifest only once its chunks were verified in the target; a kill at any
point loses at most the units in flight, which the next run computes (nothing else). `request_stop()`
(the first Ctrl-C) stops taking documents and lets the uploads in flight finish.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from connectors.hf import model_fingerprint
from connectors.precompute.compute import Unit, Work, compute_missing, plan_batches, split_units
from connectors.precompute.corpus import BadEntry, CorpusItem, Document
from connectors.precompute.errors import PrecomputeError
from connectors.precompute.manifest import ManifestChunk, ManifestHeader, ManifestRecord, ManifestWriter
from kvstore.adaptive import AdaptiveLoading
from kvstore.chunk import Chunk
from kvstore.keys import DEFAULT_NAMESPACE, TOKEN_DTYPE, ChunkKey, ChunkKind, validate_namespace
from kvstore.levels import AdaptiveConfig
from kvstore.tiers.byte_tier import ByteTier
from kvstore.tiers.base import Tier
from kvstore.writer import BoundedWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrecomputeOptions:
    kind: ChunkKind = ChunkKind.PREFIX  # PREFIX: whole documents; STANDALONE: passages for blend/RAG
    namespace: str = DEFAULT_NAMESPACE
    chunk_tokens: int = 256
    passage_tokens: int | None = None  # STANDALONE only: split documents into passages of this many tokens
    add_special_tokens: bool = False  # let the tokenizer add BOS etc. (must match how prompts are tokenized)
    max_tokens: int | None = None  # longest unit; None: the model's max_position_embeddings
    batch_size: int = 1  # units per forward
    batch_tokens: int = 16384  # bound on batch_size * longest unit of a forward (padded tokens)
    window_docs: int = 64  # documents planned (tokenized, looked up) at once
    upload_workers: int = 2
    max_pending_bytes: int = 256 << 20  # KV computed but not yet uploaded
    upload_attempts: int = 5
    retry_backoff_s: float = 0.2  # first wait between attempts, doubling
    dry_run: bool = False
    levels: tuple[str, ...] = ()  # codec levels each chunk is also stored at (adaptive loading)

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        if self.levels:
            AdaptiveConfig(levels=tuple(self.levels))  # names the registry knows, each once: ConfigError
        if not isinstance(self.kind, ChunkKind):
            raise PrecomputeError(f"kind must be a ChunkKind, got {self.kind!r}")
        if not 1 <= self.chunk_tokens <= 1 << 16:
            raise PrecomputeError(f"chunk_tokens must be in [1, 65536], got {self.chunk_tokens}")
        if self.passage_tokens is not None:
            if self.kind is not ChunkKind.STANDALONE:
                raise PrecomputeError("passage_tokens applies to standalone (passage) mode only")
            if self.passage_tokens <= 0:
                raise PrecomputeError(f"passage_tokens must be positive, got {self.passage_tokens}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise PrecomputeError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.batch_size < 1 or self.batch_tokens < 1 or self.window_docs < 1 or self.upload_workers < 1:
            raise PrecomputeError("batch_size, batch_tokens, window_docs and upload_workers must be >= 1")
        if self.max_pending_bytes <= 0 or self.upload_attempts < 1 or self.retry_backoff_s < 0:
            raise PrecomputeError("max_pending_bytes and upload_attempts must be positive, retry_backoff_s >= 0")


@dataclass(slots=True)
class Failure:
    id: str
    source: str
    reason: str


@dataclass(slots=True)
class PrecomputeSummary:
    """What one run did. `units_*` count units (documents, or passages when split)."""

    documents: int = 0  # corpus entries read (bad ones included)
    units: int = 0  # units planned
    units_present: int = 0  # all chunks already in the target: nothing computed
    units_uploaded: int = 0  # computed, uploaded and verified by this run
    units_failed: int = 0  # too long, empty after tokenizing, or the upload failed
    units_without_chunks: int = 0  # prefix mode, shorter than one chunk: recorded, nothing to store
    bad_entries: int = 0  # unreadable lines or files, entries without id/text, empty documents
    chunks_computed: int = 0
    chunks_skipped: int = 0  # already in the target when planned
    chunks_uploaded: int = 0  # verified in the target after this run's put
    tokens: int = 0  # tokens of all planned units
    tokens_computed: int = 0  # tokens prefilled by the model (a prefix up to its last missing chunk)
    kv_bytes: int = 0  # uncompressed KV of the uploaded chunks
    stored_bytes: int = 0  # bytes the target reports written for them (records: header + encoded payload)
    target_evictions: int = 0  # entries the target evicted during the run (a full disk tier)
    compute_s: float = 0.0  # time in the model's forward
    wall_s: float = 0.0
    interrupted: bool = False
    dry_run: bool = False
    failures: list[Failure] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.bad_entries + self.units_failed

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.interrupted

    def to_json(self) -> dict:
        d = asdict(self)
        d["failed"] = self.failed
        d["tokens_per_s"] = self.tokens_computed / self.wall_s if self.wall_s else 0.0
        d["compression_ratio"] = self.kv_bytes / self.stored_bytes if self.stored_bytes else None
        return d


@dataclass(slots=True)
class _Upload:
    unit: Unit
    chunks: list[Chunk]  # the computed (missing) chunks, KV on the CPU
    nbytes: int


class PrecomputeJob:
    """One run of the job over a corpus into `target` (see the module docstring)."""

    def __init__(self, model, tokenizer, target: Tier, options: PrecomputeOptions,
                 manifest_path: str | Path | None = None, *, fingerprint: str | None = None,
                 progress=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.target = target
        self.options = options
        self.manifest_path = Path(manifest_path) if manifest_path is not None else None
        self.fingerprint = fingerprint or model_fingerprint(model)
        context = getattr(model.config, "max_position_embeddings", None)
        self.max_tokens = options.max_tokens or context
        if not self.max_tokens:
            raise PrecomputeError("the model's config has no max_position_embeddings: set max_tokens")
        if context and self.max_tokens > context:
            raise PrecomputeError(f"max_tokens {self.max_tokens} exceeds the model's context of {context} tokens")
        if options.passage_tokens and options.passage_tokens > self.max_tokens:
            raise PrecomputeError(f"passage_tokens {options.passage_tokens} exceeds max_tokens {self.max_tokens}")
        self.progress = progress  # a tqdm-like bar (update(n), set_postfix_str(s)) or None
        self.summary = PrecomputeSummary(dry_run=options.dry_run)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards summary counters touched by upload workers
        self._manifest: ManifestWriter | None = None
        self._copies = None
        if options.levels:
            if not isinstance(target, ByteTier):
                raise PrecomputeError(f"levels need a byte tier as the target, not {type(target).__name__}")
            self._copies = AdaptiveLoading(AdaptiveConfig(levels=tuple(options.levels)), target)

    @property
    def header(self) -> ManifestHeader:
        o = self.options
        return ManifestHeader(self.fingerprint, o.namespace, o.kind, o.chunk_tokens, o.passage_tokens, o.add_special_tokens)

    def request_stop(self) -> None:
        """Stop taking new documents; units already computed are still uploaded. Thread- and signal-safe."""
        self._stop.set()

    # -- the run ------------------------------------------------------------------------------------

    def run(self, corpus: Iterable[CorpusItem]) -> PrecomputeSummary:
        t0 = time.perf_counter()
        stats0 = self.target.stats.snapshot()
        s = self.summary
        if not self.options.dry_run and self.manifest_path is not None:
            self._manifest = ManifestWriter(self.manifest_path, self.header)
            if self._manifest.dropped_torn_line:
                log.warning("manifest %s ended in a torn line (an interrupted run); dropped it", self.manifest_path)
        o = self.options
        uploader = None if o.dry_run else BoundedWriter("precompute-upload", max_pending_bytes=o.max_pending_bytes,
                                                       workers=o.upload_workers)
        finished = False
        try:
            for window in _windows(corpus, self.options.window_docs):
                if self._stop.is_set():
                    break
                self._process_window(window, uploader)
            s.interrupted = self._stop.is_set()
            finished = True
        finally:
            # On an abort (an exception, a second Ctrl-C) the uploads in progress get a moment, not a
            # drain; the manifest stays valid whatever they do (at worst a torn last line).
            idle = uploader.close(abort=not finished, timeout=None if finished else 5.0) if uploader is not None else True
            if self._manifest is not None and idle:
                self._manifest.close()
            stats1 = self.target.stats.snapshot()
            s.stored_bytes = int(stats1["bytes_written"] - stats0["bytes_written"])
            s.target_evictions = int(stats1["evictions"] - stats0["evictions"])
            s.wall_s = time.perf_counter() - t0
        return s

    def _process_window(self, window: list[CorpusItem], uploader: BoundedWriter | None) -> None:
        s = self.summary
        o = self.options
        docs = [d for d in window if isinstance(d, Document)]
        s.documents += len(window)
        for bad in window:
            if isinstance(bad, BadEntry):
                self._fail_entry(bad.id, bad.source, bad.reason)
        encoded = self.tokenizer([d.text for d in docs], add_special_tokens=o.add_special_tokens,
                                 verbose=False)["input_ids"] if docs else []
        units: list[Unit] = []
        for doc, ids in zip(docs, encoded):
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size == 0:
                self._fail_entry(doc.id, doc.source, "empty document (no tokens)")
                continue
            if o.passage_tokens is None and arr.size > self.max_tokens:
                self._fail_entry(doc.id, doc.source, f"{arr.size} tokens: longer than the model's context of "
                                 f"{self.max_tokens} tokens")
                continue
            units += split_units(doc.id, arr.astype(TOKEN_DTYPE), kind=o.kind, passage_tokens=o.passage_tokens,
                                 namespace=o.namespace, fingerprint=self.fingerprint, chunk_tokens=o.chunk_tokens)
        s.units += len(units)
        s.tokens += sum(len(u.tokens) for u in units)
        keys = [k for u in units for k in u.keys]
        if keys:
            self._wait_available()  # a remote tier that is down would answer "nothing stored"
        present = self._present(keys) if keys else []
        work: list[Work] = []
        pos = 0
        for u in units:
            flags = present[pos : pos + len(u.refs)]
            pos += len(u.refs)
            missing = tuple(i for i, f in enumerate(flags) if not f)
            with self._lock:
                s.chunks_skipped += len(u.refs) - len(missing)
            if missing:
                work.append(Work(u, missing))
                continue
            with self._lock:
                if u.refs:
                    s.units_present += 1
                else:
                    s.units_without_chunks += 1
            if not o.dry_run:
                self._record(u)
        if o.dry_run:
            s.chunks_computed += sum(len(w.missing) for w in work)
            s.tokens_computed += sum(w.end for w in work)
            self._advance(len(window))
            return
        # Progress counts documents: one is done when its last unit's chunks are computed and queued.
        pending_docs: dict[str, int] = {}
        for w in work:
            pending_docs[w.unit.doc] = pending_docs.get(w.unit.doc, 0) + 1
        self._advance(len(window) - len(pending_docs))
        for batch in plan_batches(work, o.batch_size, o.batch_tokens):
            if self._stop.is_set():
                break
            t = time.perf_counter()
            try:
                results = compute_missing(self.model, batch, fingerprint=self.fingerprint, namespace=o.namespace,
                                          chunk_tokens=o.chunk_tokens, kind=o.kind)
            except (RuntimeError, ValueError) as e:  # e.g. out of device memory: these units fail, the rest goes on
                for w in batch:
                    self._unit_failed(w.unit, f"forward failed: {e}")
                    pending_docs[w.unit.doc] -= 1
                self._advance(len({w.unit.doc for w in batch if pending_docs[w.unit.doc] == 0}))
                continue
            dt = time.perf_counter() - t
            with self._lock:
                s.compute_s += dt
                s.tokens_computed += sum(w.end for w in batch)
                s.chunks_computed += sum(len(c) for c in results)
            finished_docs = 0
            for w, chunks in zip(batch, results):
                item = _Upload(w.unit, chunks, sum(c.nbytes for c in chunks))
                uploader.submit(lambda item=item: self._upload_or_fail(item), item.nbytes)
                pending_docs[w.unit.doc] -= 1
                finished_docs += pending_docs[w.unit.doc] == 0
            self._advance(finished_docs)

    # -- upload workers -----------------------------------------------------------------------------

    def _upload_or_fail(self, item: _Upload) -> None:
        try:
            self._upload(item)
        except Exception as e:  # the unit fails, the job goes on
            log.exception("upload of %s failed", item.unit.id)
            self._unit_failed(item.unit, f"upload failed: {e}")

    def _upload(self, item: _Upload) -> None:
        o = self.options
        unit_keys = item.unit.keys
        todo = item.chunks
        delay = o.retry_backoff_s
        for attempt in range(o.upload_attempts):
            if attempt:
                time.sleep(delay)
                delay *= 2
            self._wait_available()
            try:
                self.target.put(todo)
                if self._copies is not None:
                    self._copies.store_levels(todo)
                # Verified, not trusted: a remote tier drops puts while it counts as down.
                there = self._present(unit_keys)
            except Exception as e:
                log.warning("upload of %s: attempt %d failed: %s", item.unit.id, attempt + 1, e)
                continue
            missing = {k for k, ok in zip(unit_keys, there) if not ok}
            if not missing:
                with self._lock:
                    self.summary.units_uploaded += 1
                    self.summary.chunks_uploaded += len(item.chunks)
                    self.summary.kv_bytes += item.nbytes
                self._record(item.unit)
                return
            todo = [c for c in item.chunks if c.key in missing]
            if len(todo) < len(missing):
                self._unit_failed(item.unit, "chunks that were in the target when planned are gone (evicted?)")
                return
        self._unit_failed(item.unit, f"{len(todo)} chunk(s) not in the target after {o.upload_attempts} attempts")

    def _present(self, keys: list[ChunkKey]) -> list[bool]:
        """Per key, whether the target holds the chunk and every one of its level copies."""
        present = self.target.contains(keys)
        if self._copies is None:
            return present
        return [p and c for p, c in zip(present, self._copies.holds_every_copy(keys))]

    def _wait_available(self) -> None:
        """A remote tier that counts as down answers at once with nothing: wait out its pause instead."""
        available = getattr(self.target, "available", None)
        if available is None:
            return
        deadline = time.monotonic() + max(getattr(self.target, "retry_after", 0.0), 0.0) + 1.0
        while not available() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _record(self, unit: Unit) -> None:
        if self._manifest is None:
            return
        chunks = tuple(ManifestChunk(r.key.chunk_hash, r.start, len(r.tokens)) for r in unit.refs)
        old = self._manifest.get(unit.id)
        if old is not None and old.chunks == chunks and old.tokens == len(unit.tokens) and old.doc_start == unit.doc_start:
            return  # rerun-safe: never a duplicate record
        stored = unit.refs[-1].end if unit.refs else 0
        self._manifest.append(ManifestRecord(unit.id, unit.doc, unit.doc_start, self.options.kind, len(unit.tokens),
                                             stored, chunks, self.fingerprint, self.options.namespace))

    # -- reporting ----------------------------------------------------------------------------------

    def _fail_entry(self, entry_id: str, source: str, reason: str) -> None:
        log.warning("skipping %s (%s): %s", entry_id, source, reason)
        with self._lock:
            self.summary.bad_entries += 1
            self.summary.failures.append(Failure(entry_id, source, reason))

    def _unit_failed(self, unit: Unit, reason: str) -> None:
        log.warning("unit %s failed: %s", unit.id, reason)
        with self._lock:
            self.summary.units_failed += 1
            self.summary.failures.append(Failure(unit.id, unit.doc, reason))

    def _advance(self, n: int) -> None:
        if self.progress is not None and n:
            self.progress.update(n)
            self._postfix()

    def _postfix(self) -> None:
        if self.progress is None:
            return
        s = self.summary
        rate = s.tokens_computed / s.compute_s if s.compute_s else 0.0
        self.progress.set_postfix_str(f"{rate:,.0f} tok/s computing, {s.chunks_computed} chunks computed, "
                                      f"{s.chunks_skipped} present, {s.failed} failed", refresh=False)


def _windows(items: Iterable[CorpusItem], n: int) -> Iterator[list[CorpusItem]]:
    window: list[CorpusItem] = []
    for item in items:
        window.append(item)
        if len(window) >= n:
            yield window
            window = []
    if window:
        yield window
