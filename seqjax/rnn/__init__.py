"""Nonlinear RNNs: cells (Elman, leaky/τ, LSTM, GRU, sLSTM, shPLRNN; head-wise), the functional
``rnn(kind, params, x, ...)``, parallel-in-time evaluation (DEER / quasi-DEER / quasi-ELK), NNX layers and
wrappers (stacked, bidirectional, seq2seq with attention). See ``README.md`` § "Nonlinear RNNs".
"""

from seqjax.rnn.cells import CELLS, KINDS, Cell, diag_jacobian, get_cell, init_params, project, step
from seqjax.rnn.functional import IMPLS, rnn, rnn_scan

__all__ = [
    "CELLS", "KINDS", "Cell", "IMPLS", "diag_jacobian", "get_cell", "init_params", "project", "rnn",
    "rnn_scan", "step",
]
