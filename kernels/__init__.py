"""Kernels: gather/scatter between an engine's paged KV blocks and contiguous chunks, RoPE re-rotation,
row gather/scatter for blend. Triton on CUDA, a torch reference everywhere; imports nothing of ours.
"""
