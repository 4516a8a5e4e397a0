"""Connectors: bridges between the store and engines or pipelines (Hugging Face transformers, the RAG
API, the precompute job, the sidecar client), and the demo."""
