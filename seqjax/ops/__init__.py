"""Engines: the recurrences as pure functions on arrays, below every layer and kernel that uses them.

- :mod:`seqjax.ops.gla` — the chunked GLA / SSD engine (per-head or per-channel decays, signs, resets) and
  its float32 reference;
- :mod:`seqjax.ops.delta` — the (gated) delta rule: reference, WY / UT chunked form, step, operator;
- :mod:`seqjax.ops.mlstm` — the mLSTM: reference, chunked form, step, operator;
- :mod:`seqjax.ops.attention` — softmax attention as a function (mask, reference, backend call);
- :mod:`seqjax.ops.context_parallel` — the time axis split over the mesh axis ``context``.

Names follow one pattern per role: ``check_<name>_inputs``, ``recurrent_<name>`` (the reference),
``chunk_<name>``, ``step_<name>`` (one token), ``materialize_<name>`` (the ``[b, h, T, T]`` operator).
Nothing here imports ``pallas_kernels``, ``seqjax.mixers`` or anything above them.
"""
