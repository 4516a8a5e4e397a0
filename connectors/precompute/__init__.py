"""The precompute-and-upload job: compute the KV of a corpus once, offline, and upload it to a shared store.

Modules: `corpus` (reading JSONL or a folder: documents and bad entries), `compute` (units, keys, batched
prefill), `manifest` (the versioned, kill-safe record of uploaded keys per unit), `target` (the tier a
job writes to), `job` (`PrecomputeJob`: the pipeline), `command` (the `kvstore precompute` edge).

    from connectors.precompute import PrecomputeJob, PrecomputeOptions, read_corpus
    job = PrecomputeJob(model, tokenizer, target_tier, PrecomputeOptions(), "corpus.manifest.jsonl")
    summary = job.run(read_corpus("corpus.jsonl"))
"""

from connectors.precompute.corpus import BadEntry, Document, count_entries, read_corpus
from connectors.precompute.errors import CorpusError, ManifestError, PrecomputeError
from connectors.precompute.job import Failure, PrecomputeJob, PrecomputeOptions, PrecomputeSummary
from connectors.precompute.manifest import (Manifest, ManifestChunk, ManifestHeader, ManifestRecord, ManifestWriter,
                                            read_manifest)
from connectors.precompute.target import build_target, target_section

__all__ = ["BadEntry", "CorpusError", "Document", "Failure", "Manifest", "ManifestChunk", "ManifestError",
           "ManifestHeader", "ManifestRecord", "ManifestWriter", "PrecomputeError", "PrecomputeJob",
           "PrecomputeOptions", "PrecomputeSummary", "build_target", "count_entries", "read_corpus",
           "read_manifest", "target_section"]
