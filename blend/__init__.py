"""Blend: selective recompute so that the KV of chunks stored standalone can be reused at any position
(CacheBlend-style). Builds on `kernels` (RoPE re-rotation, row scatter) and `kvstore` (standalone keys).
"""
