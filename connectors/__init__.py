"""Connectors: bridges between the store and engines or pipelines (transformers, vLLM, the RAG API,
the precompute job, the sidecar client), and the demo."""
