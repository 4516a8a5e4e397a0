"""Connectors: bridges between the store and engines or pipelines (Hugging Face transformers, the RAG
API, the precompute job), the demo, the codebook profiling tool, and the command line that composes
every package (`cli`, `commands`)."""
