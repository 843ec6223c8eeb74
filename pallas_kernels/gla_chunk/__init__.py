"""Chunked gated linear attention (per-head or per-channel decay) as a Pallas kernel; see ``kernel.py``."""

from pallas_kernels.gla_chunk.kernel import gla_chunk_pallas

__all__ = ["gla_chunk_pallas"]
