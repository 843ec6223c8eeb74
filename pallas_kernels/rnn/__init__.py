"""FlashRNN-style fused Pallas kernels for nonlinear RNNs (see ``flashrnn.py``)."""

from pallas_kernels.rnn.flashrnn import fused_rnn

__all__ = ["fused_rnn"]
