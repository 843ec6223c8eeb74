"""Where ``impl="auto"`` takes a Pallas kernel, and which backward it differentiates through.

Two tables, each set from GPU measurements (``benchmarks/gpu_check.sh``, ``benchmarks/gla_gpu.py``,
``benchmarks/delta_gpu.py``; the results, with device and date, in ``benchmarks/results/NVIDIA_H200.md``):

``GPU_TESTED``
    the chunked kernels whose current forward passes the kernel tests compiled on a GPU and beats the XLA
    chunked form there. ``"auto"`` takes no other kernel; GLA with per-channel decays keeps XLA.
``AUTO_BACKWARD``
    per kernel, the backward ``"auto"`` asks for under ``jax.grad``: ``"xla"`` runs the XLA chunked form's
    forward and backward (the kernel's ``custom_vjp`` forward rule), so training costs what XLA costs;
    ``"pallas"`` runs the kernel's own backward (``pallas_kernels/*/backward*.py``). A kernel's entry is
    ``"pallas"`` where its Pallas forward and backward beat "Pallas, XLA bwd" in ``benchmarks/gla_gpu.py`` /
    ``benchmarks/delta_gpu.py``.

The entries were measured on the Triton bodies. The GLA (per-head), delta-rule and mLSTM kernels also have Mosaic GPU
bodies for their serial walks and forward outputs (``pallas_kernels/*/mosaic_gpu.py``), which ``backend=None`` takes
under jax >= 0.11 once they pass their tests compiled on a GPU (``MOSAIC_GPU_DEFAULT`` in each ``kernel.py``, the
choice in ``pallas_kernels/_mosaic_gpu.py``); the GPU check times them beside the Triton bodies.

``impl="pallas"`` always takes the kernel, with its own backward. On a GPU ``"auto"`` takes a kernel in a
one-device process, or under ``seqjax.sharding.use_rules(mesh)`` (the train and eval steps), where
``kernel_call`` runs it inside ``shard_map``; a ``pallas_call`` has no sharding rule, and under a plain
multi-device ``jit`` XLA would replicate its operands on every device. On a TPU ``"auto"`` keeps XLA;
``impl="pallas"`` runs the Mosaic bodies, which libtpu compiles for TPU v4, v5e, v5p and v6e without a TPU
(``tests/test_tpu_compile.py``, ``benchmarks/tpu_compile.py``).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels._util import platform as kernel_platform
from seqjax import sharding

# what impl="auto" differentiates each chunked kernel through (see above)
AUTO_BACKWARD = {"gla": "xla", "delta": "xla", "mlstm": "xla"}
GPU_TESTED = frozenset({"gla"})  # kernels whose current forward passed the GPU tests (see above)


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
