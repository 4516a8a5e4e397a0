"""What the scheduler side tells the workers each step: plain, picklable data (it crosses processes).

- `ChunkMove`: one chunk (its `ChunkRef`: key, token ids, start) and the vLLM block ids that hold its
  tokens, `chunk_tokens / block_size` of them in order; `-1` marks a block not to write (on loads, the
  blocks of vLLM's own local hit before a mid-chunk start).
- `RequestLoad` / `RequestSave`: a request's chunks to load before this step's forward, or to save
  after it (only chunks whose every token is computed by the end of the step).
- `StepPlan`: all of a step's loads and saves (empty on decode steps, so the load and save hooks return
  at once), and how many tokens the step's forward computes (`scheduled_tokens`: the workers time the
  forwards that prefill at least a chunk, which gives adaptive loading the engine's prefill speed).
Keys in the plan carry the scheduler's fingerprint (tensor-parallel rank 0); each worker re-keys them
with its own rank's fingerprint (`rekey`): the chunk hash depends on the tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.keys import ChunkKey, ChunkRef

try:  # the metadata vLLM carries must be a KVConnectorMetadata; the plan itself needs no vLLM
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata as _Metadata
except ImportError:  # pragma: no cover - without vLLM, for the scheduler-side unit tests
    _Metadata = object


@dataclass(slots=True)
class ChunkMove:
    ref: ChunkRef
    block_ids: list[int]  # [chunk_tokens / block_size]; -1: leave this block alone


@dataclass(slots=True)
class RequestLoad:
    req_id: str
    chunks: list[ChunkMove]  # consecutive chunks of the prompt, in order

    @property
    def num_tokens(self) -> int:
        return sum(len(c.ref.tokens) for c in self.chunks)


@dataclass(slots=True)
class RequestSave:
    req_id: str
    chunks: list[ChunkMove]


@dataclass
class StepPlan(_Metadata):
    loads: list[RequestLoad] = field(default_factory=list)
    saves: list[RequestSave] = field(default_factory=list)
    scheduled_tokens: int = 0  # tokens this step's forward computes, every request together

    def is_empty(self) -> bool:
        return not self.loads and not self.saves


def rekey(ref: ChunkRef, fingerprint: str) -> ChunkRef:
    """`ref` under another model fingerprint (another tensor-parallel rank's heads)."""
    if ref.key.fingerprint == fingerprint:
        return ref
    return ChunkRef(ChunkKey(ref.key.namespace, fingerprint, ref.key.chunk_hash), ref.tokens, ref.start)
