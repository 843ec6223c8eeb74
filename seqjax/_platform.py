"""Where ``impl="auto"`` takes a Pallas kernel.

Measured on an NVIDIA H200, jax 0.11.2 (``benchmarks/results/NVIDIA_H200.md``), at B=8, H=16, D=128, bf16,
forward against the XLA chunked form: per-head-decay GLA (Mamba-2/SSD, RetNet, linear attention) 3.0-3.5x;
the earlier delta-rule and mLSTM forwards (since restructured, see below) 2.0x and 1.9x; the first
per-channel-decay GLA kernel 0.33x (so GLA proper keeps XLA). Under
``jax.grad`` the kernels that ``"auto"`` takes run the XLA form's forward and backward (their ``custom_vjp``
forward rule), so training costs the same either way: per-head GLA, the delta rule and the mLSTM have Pallas
backward kernels (``pallas_kernels/*/backward.py``, what ``impl="pallas"`` differentiates through),
but they have not yet been compiled or timed on a GPU, so ``"auto"`` asks for
``backward=AUTO_BACKWARD[kernel] = "xla"`` until they have (per kernel: set one to ``"pallas"`` once its
Pallas fwd+bwd beats "Pallas, XLA bwd" in ``benchmarks/gla_gpu.py`` / ``delta_gpu.py``).

``"auto"`` takes a kernel only where its *current* forward has been compiled and tested on a GPU
(``GPU_TESTED``): the delta-rule and mLSTM forwards were split into a serial state pass and a chunk-parallel
output kernel after the last GPU session (2026-11-27); they lower to Triton on a CPU
(``tests/test_pallas_lowering.py``) but Triton's own compile has not run them, so ``"auto"`` keeps XLA for
them until ``benchmarks/gpu_check.sh`` has passed on a GPU. ``impl="pallas"`` always takes the kernel.

So ``"auto"`` takes the kernels on a GPU, where they were compiled and tested: in a one-device process, or
under ``seqjax.sharding.use_rules(mesh)`` (the train and eval steps), where ``kernel_call`` runs them inside
``shard_map``; a ``pallas_call`` has no sharding rule, and under a plain multi-device ``jit`` XLA would
replicate its operands on every device. TPU: libtpu compiles every kernel for TPU v4, v5e, v5p and v6e
(``tests/test_tpu_compile.py``, ``benchmarks/tpu_compile.py``; no TPU needed), but none has run or been
timed on one, so XLA.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels._util import platform as kernel_platform
from seqjax import sharding

# what impl="auto" differentiates each chunked kernel through (see above)
AUTO_BACKWARD = {"gla": "xla", "delta": "xla", "mlstm": "xla"}
GPU_TESTED = frozenset({"gla"})  # kernels whose current forward passed the GPU tests; "delta", "mlstm" pending


def auto_pallas(chunk_size: int | None = None, kernel: str = "gla") -> bool:
    """True where ``impl="auto"`` should run the chunked Pallas ``kernel`` (``"gla"``, ``"delta"``,
    ``"mlstm"``; see the module docstring): one in ``GPU_TESTED``, on a GPU, in a one-device process or under
    ``seqjax.sharding.use_rules(mesh)`` (where :func:`kernel_call` runs the kernel inside ``shard_map``);
    with ``chunk_size``, also only if the kernel takes it (a power of two >= 16)."""
    if kernel not in GPU_TESTED:
        return False

    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return False
    return kernel_platform() == "gpu" and (jax.device_count() == 1 or sharding.current()[0] is not None)


def kernel_call(fn, *args, layouts, out_layouts):
    """``fn(*args)`` — a Pallas kernel on ``[batch, time, heads, …]`` activations — run per device inside
    ``jax.shard_map`` over the mesh of the innermost ``seqjax.sharding.use_rules``: batch on ``data``/``fsdp``
    and heads on ``tensor`` (an axis that does not divide its dim is left out, that dim replicated), time
    whole. A ``pallas_call`` has no sharding rule: under a plain multi-device ``jit`` XLA would gather its
    operands onto every device; inside ``shard_map`` each device runs the kernel on its own rows and heads.
    Without a mesh (or on one device) it is just ``fn(*args)``.

    Time is never split here (a ``context`` axis > 1 recomputes the whole sequence on each of its devices):
    the layers take ``seqjax.ops.context_parallel`` for that, whose local forms already run per device.

    ``layouts``: one per argument, applied to each of its leaves: ``"t"`` for ``[b, t, h, …]`` (and resets
    ``[b, t]``), ``"s"`` for states ``[b, h, …]``; ``None`` arguments pass through. ``out_layouts`` likewise
    for the outputs' top level."""
    mesh, _ = sharding.current()
    if mesh is None or mesh.size == 1 or jax.sharding.get_abstract_mesh().manual_axes:
        return fn(*args)  # no mesh, one device, or already per-device (inside a shard_map, e.g. context parallel)
    sizes = dict(mesh.shape)
    q = args[0]
    b = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1) or None
    if b is not None and q.shape[0] % int(np.prod([sizes[a] for a in b])):
        b = None
    h = "tensor" if sizes.get("tensor", 1) > 1 and q.shape[2] % sizes["tensor"] == 0 else None

    def spec(layout):
        if layout == "s":
            return lambda x: P(b, h, *([None] * (x.ndim - 2)))
        return lambda x: P(b, None) if x.ndim == 2 else P(b, None, h, *([None] * (x.ndim - 3)))

    live = [i for i, a in enumerate(args) if a is not None]
    in_specs = tuple(jax.tree.map(spec(layouts[i]), args[i]) for i in live)

    def local(*xs):
        full = list(args)
        for i, x in zip(live, xs):
            full[i] = x
        return fn(*full)

    out_shapes = jax.eval_shape(fn, *args)
    out_specs = tuple(jax.tree.map(spec(lay), o) for lay, o in zip(out_layouts, out_shapes))
    run = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return run(*(args[i] for i in live))
