"""Nonlinear RNNs: cells (Elman, leaky/τ, LSTM, GRU, sLSTM, shPLRNN; head-wise), the functional
``rnn(kind, params, x, ...)``, parallel-in-time evaluation (DEER / quasi-DEER / quasi-ELK), NNX layers and
wrappers (stacked, bidirectional, seq2seq with attention), and the convolutional LSTM (``conv``). See ``README.md`` § "Nonlinear RNNs".
"""

from seqjax.rnn import conv, deer, layers, seq2seq, wrappers
from seqjax.rnn.cells import CELLS, KINDS, Cell, diag_jacobian, get_cell, init_params, project, step
from seqjax.rnn.functional import IMPLS, rnn, rnn_scan
from seqjax.rnn.layers import RNN
from seqjax.rnn.seq2seq import Seq2Seq
from seqjax.rnn.wrappers import Bidirectional, StackedRNN, bidirectional, stacked

__all__ = [
    "CELLS", "KINDS", "Cell", "IMPLS", "RNN", "Bidirectional", "StackedRNN", "Seq2Seq", "bidirectional", "conv",
    "deer", "diag_jacobian", "get_cell", "init_params", "layers", "project", "rnn", "rnn_scan", "seq2seq",
    "stacked", "step", "wrappers",
]
