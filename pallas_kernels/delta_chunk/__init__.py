"""Chunked (gated) delta-rule Pallas kernel (DeltaNet, Gated DeltaNet, DeltaProduct, beta up to 2)."""

from pallas_kernels.delta_chunk.kernel import delta_chunk

__all__ = ["delta_chunk"]
