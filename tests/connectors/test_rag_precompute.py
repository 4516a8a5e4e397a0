"""The precompute job and the RAG pipeline chained as a user chains them: `kvstore precompute --mode passages`
(the job in process) stores a corpus into a sidecar under the default namespace, and a `RagPipeline` built
from its manifest answers from that sidecar without computing any passage again; a chunk lost from the
sidecar is reported as evicted, a manifest of another model as a fingerprint mismatch."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from connectors.models import load_model  # noqa: E402
from connectors.precompute import PrecomputeJob, PrecomputeOptions, read_corpus, read_manifest  # noqa: E402
from connectors.precompute.target import build_target  # noqa: E402
from connectors.rag import RagConfig, RagError, RagPipeline  # noqa: E402
from kvstore.config import ServerConfig, StoreConfig, build_store, load_config  # noqa: E402
from kvstore.keys import DEFAULT_NAMESPACE, ChunkKind  # noqa: E402

CHUNK = 64


def test_one_default_namespace_for_the_job_the_command_line_and_the_pipeline():
    assert PrecomputeOptions().namespace == StoreConfig().namespace == RagConfig().namespace == DEFAULT_NAMESPACE


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A sidecar holding a corpus precomputed as passages (default namespace), its manifest and corpus."""
    from benchmarks.models.evalset import load_rag
    from kvstore.service import TokenTable, make_app
    from tests.support.service import ServiceThread

    tmp = tmp_path_factory.mktemp("chain")
    model, tok = load_model("tiny", torch.float32)
    examples = load_rag()[:2]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"e{i}p{j}", "text": p}) + "\n"
                              for i, ex in enumerate(examples) for j, p in enumerate(ex.passages)))
    server_cfg = load_config(None, {}, {"disk.path": str(tmp / "sidecar"), "memory.enabled": "false",
                                        "chunk_tokens": str(CHUNK)})
    server_store = build_store(server_cfg, records=True)
    table = TokenTable({"s3cret": [DEFAULT_NAMESPACE]})
    svc = ServiceThread(lambda: make_app(server_store, ServerConfig(), table)).start()
    client = {"sidecar.url": svc.url, "sidecar.token": "s3cret", "sidecar.codec": "raw", "chunk_tokens": str(CHUNK)}
    target = build_target(load_config(None, {}, client))
    manifest = tmp / "manifest.jsonl"
    job = PrecomputeJob(model, tok, target, PrecomputeOptions(kind=ChunkKind.STANDALONE, chunk_tokens=CHUNK), manifest)
    summary = job.run(read_corpus(corpus))
    target.close()
    assert summary.ok and summary.chunks_uploaded > 0
    # the user's side: a store of its own (memory in front of the same sidecar, nothing on local disk)
    store = build_store(load_config(None, {}, {**client, "disk.enabled": "false"}))
    try:
        yield model, tok, store, server_store, manifest, corpus, examples
    finally:
        store.close()
        svc.stop()
        server_store.close()


def _passage_rows(pipe: RagPipeline, passages) -> torch.Tensor:
    """[N] int64: the prompt rows of the passages."""
    return torch.cat([torch.arange(r.start, r.stop) for r in pipe.passage_rows(passages)])


def test_pipeline_answers_from_the_precomputed_sidecar_without_computing_a_passage(chain):
    model, tok, store, _, manifest, corpus, examples = chain
    pipe = RagPipeline.from_manifest(model, tok, store, manifest, corpus, RagConfig(max_new_tokens=4))
    assert pipe.config.namespace == DEFAULT_NAMESPACE and pipe.chunk_tokens == CHUNK
    assert pipe.load.passages == pipe.load.usable == sum(len(e.passages) for e in examples)
    ex = examples[1]
    ids = [f"e1p{j}" for j in range(len(ex.passages))]
    ans = pipe.answer(ex.prompt_tail, passage_ids=ids)
    rep = ans.report
    assert ans.passages_from_store == len(ids) and ans.recomputed == [] and rep.recomputed == []
    chosen = [pipe.passages[i] for i in ids]
    rows = _passage_rows(pipe, chosen)
    assert rep.reused == rows.numel() == sum(p.tokens.numel() for p in chosen)
    assert not bool(torch.isin(rows, rep.fresh_rows).any())  # no passage row computed outside the selection
    # every passage row beyond the check layer that was computed is one blend selected, within its ratio
    top = rep.selected[-1]
    assert bool(torch.isin(top, rows).all()) and top.numel() <= round(pipe.config.blend.ratio * rows.numel())
    # the same answer as a full prefill would give through the same KV path at ratio 1.0
    full = pipe.prefill(ex.prompt_tail, passage_ids=ids, full_prefill=True)
    exact = pipe.prefill(ex.prompt_tail, passage_ids=ids, ratio=1.0)
    assert ((exact.logits - full.logits).abs().max() / full.logits.abs().max()).item() <= 1e-4


def test_a_chunk_lost_from_the_sidecar_is_reported_as_evicted(chain):
    model, tok, store, server_store, manifest, corpus, examples = chain
    pipe = RagPipeline.from_manifest(model, tok, store, manifest, corpus, RagConfig(max_new_tokens=2))
    rec = read_manifest(manifest).records["e0p1"]
    server_store.delete(rec.keys()[:1])
    store.delete(rec.keys()[:1])  # the client's memory tier may hold it from an earlier answer
    ids = [f"e0p{j}" for j in range(len(examples[0].passages))]
    ans = pipe.answer(examples[0].prompt_tail, passage_ids=ids)
    assert ans.passages_from_store == len(ids) - 1
    assert [(s.id, s.reason) for s in ans.recomputed] == [("e0p1", "evicted")]
    assert [r.reason for r in ans.report.recomputed] == ["evicted"]


def test_a_manifest_of_another_model_is_a_fingerprint_mismatch(chain, tmp_path):
    model, tok, store, _, manifest, corpus, examples = chain
    other = tmp_path / "other.jsonl"
    rows = [{**json.loads(line), "model": "another-model"}  # the fingerprint, in the header and in every record
            for line in manifest.read_text().splitlines()]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = RagPipeline.from_manifest(model, tok, store, other, corpus, RagConfig(max_new_tokens=2))
    assert pipe.load.fingerprint_mismatch == pipe.load.passages > 0 and pipe.load.usable == 0
    ans = pipe.answer(examples[1].prompt_tail, passage_ids=["e1p0", "e1p1"])
    assert ans.passages_from_store == 0
    assert {s.reason for s in ans.recomputed} == {"fingerprint mismatch"}


def test_a_manifest_for_another_namespace_is_refused(chain):
    model, tok, store, _, manifest, corpus, _ = chain
    pipe = RagPipeline(model, tok, store, RagConfig(namespace="elsewhere", chunk_tokens=CHUNK))
    with pytest.raises(RagError, match="namespace"):
        pipe.add_manifest(manifest, corpus)
    pipe = RagPipeline(model, tok, store, dataclasses.replace(RagConfig(), chunk_tokens=2 * CHUNK))
    with pytest.raises(RagError, match="chunks hold"):
        pipe.add_manifest(manifest, corpus)
