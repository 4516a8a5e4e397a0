"""The RAG API: precompute the KV of a corpus of passages once (here, or with `kvstore precompute --mode
passages`), then answer questions over any retrieved passages, in any order, with blend.

Modules: `prompt` (`PromptTemplate`: prefix, passages, question; the model's chat template by default),
`passages` (`Passage`, and the passages of a precompute manifest), `pipeline` (`RagPipeline`, `RagConfig`,
`RagAnswer` and where each passage's KV came from), `retriever` (`TfidfRetriever`). See docs/BLEND.md.
"""

from connectors.rag.errors import RagError
from connectors.rag.passages import ManifestLoad, Passage, manifest_passages
from connectors.rag.pipeline import PassageSource, PrecomputeStats, RagAnswer, RagConfig, RagPipeline
from connectors.rag.prompt import PromptTemplate
from connectors.rag.retriever import TfidfRetriever

__all__ = ["ManifestLoad", "Passage", "PassageSource", "PrecomputeStats", "PromptTemplate", "RagAnswer", "RagConfig",
           "RagError", "RagPipeline", "TfidfRetriever", "manifest_passages"]
