"""kvstore: content-addressed, tiered storage of LLM KV caches.

Public API: `TieredStore`, `Chunk`, `ChunkKey`, `ChunkRef`, `chunk_refs`, `load_config`, `build_store`.
"""

from kvstore.chunk import Chunk, KVLayout
from kvstore.config import StoreConfig, build_store, load_config
from kvstore.errors import KVStoreError
from kvstore.keys import ChunkKey, ChunkKind, ChunkRef, chunk_refs
from kvstore.store import TieredStore

__all__ = ["Chunk", "ChunkKey", "ChunkKind", "ChunkRef", "KVLayout", "KVStoreError", "StoreConfig", "TieredStore",
           "build_store", "chunk_refs", "load_config"]
