"""Chunkwise mLSTM (stabilised exponential gating) as a Pallas kernel; see ``kernel.py``."""

from pallas_kernels.mlstm_chunk.kernel import mlstm_chunk

__all__ = ["mlstm_chunk"]
