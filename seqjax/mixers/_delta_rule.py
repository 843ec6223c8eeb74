r"""The delta-rule family's ``impl=`` dispatch (:func:`delta_rule`) and the ``negative_eigen`` reading of
``beta`` (:func:`effective_beta`), shared by DeltaNet (``seqjax.mixers.deltanet``), Gated DeltaNet
(``seqjax.mixers.gated_deltanet``) and DeltaProduct (``seqjax.mixers.deltaproduct``).

The module name starts with ``_`` so the registry does not import it as a mixer family.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels._util import platform as kernel_platform
from pallas_kernels.delta_chunk import delta_chunk
from seqjax import _checks
from seqjax._platform import AUTO_BACKWARD, auto_pallas, kernel_call
from seqjax.mixers._autodiff import primal_by
from seqjax.mixers.delta_chunked import chunk_delta_rule_cpu
from seqjax.ops import delta as E
from seqjax.types import AnyArray, Array, Float, ResetsLike

__all__ = ["IMPLS", "delta_rule", "effective_beta"]

IMPLS = ("auto", "sequential", "chunked", "pallas")


def effective_beta(beta, negative_eigen):
    """The ``beta`` the engine uses: ``2 beta`` with ``negative_eigen=True`` (``beta`` read as the gate
    ``sigma in [0, 1]``, eigenvalues ``1 - 2 sigma in [-1, 1]``), else ``beta``."""
    if not isinstance(negative_eigen, (bool, np.bool_)):
        raise ValueError(f"negative_eigen must be a bool, got {negative_eigen!r}")
    return 2 * beta if negative_eigen else beta


def delta_rule(
    q: Float[AnyArray, "b t h k"],
    k: Float[AnyArray, "b t h k"],
    v: Float[AnyArray, "b t h v"],
    beta: Float[AnyArray, "b t h"],
    log_alpha: Float[AnyArray, "b t h"] | None = None,
    *,
    h0: Float[AnyArray, "b h k v"] | None = None,
    resets: ResetsLike | None = None,
    scale=1.0,
    impl="auto",
    chunk_size=64,
) -> tuple[Float[Array, "b t h v"], Float[Array, "b h k v"]]:
    """Dispatch the (gated) delta rule to an impl (inputs validated by the caller).

    ``"auto"``: the Pallas kernel (``pallas_kernels/delta_chunk``) on a GPU once its current forward has passed
    the GPU tests (``seqjax._platform.GPU_TESTED``; one device, or a ``use_rules`` mesh:
    ``seqjax._platform.kernel_call`` runs it inside ``shard_map``), differentiated
    through the XLA form (``AUTO_BACKWARD``), else the XLA chunked form (``seqjax._platform`` has the
    measurements behind that). On the CPU ``"auto"`` evaluates the ``lax.scan`` reference and differentiates
    through the chunked form (``seqjax.mixers._autodiff.primal_by``): the scan is the faster forward there
    (prefill, evaluation), the chunked form the faster forward+backward (``benchmarks/results/cpu_mixers.md``).
    ``"chunked"`` on the CPU is :func:`seqjax.mixers.delta_chunked.chunk_delta_rule_cpu` (the same algorithm
    in a chunk-major layout with a blocked triangular inverse), elsewhere ``seqjax.ops.delta.chunk_delta_rule``.
    ``"pallas"``: the kernel and its Pallas backward.
    """
    _checks.check_choice("impl", impl, IMPLS)
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    kw = dict(h0=h0, resets=resets, scale=scale)
    if impl == "sequential":
        return E.recurrent_delta_rule(q, k, v, beta, log_alpha, **kw)
    if impl == "pallas" or (impl == "auto" and auto_pallas(kernel="delta")):
        backward = "pallas" if impl == "pallas" else AUTO_BACKWARD["delta"]
        return kernel_call(
            lambda q, k, v, beta, log_alpha, h0, resets: delta_chunk(
                q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=scale, chunk_size=chunk_size, backward=backward),
            q, k, v, beta, log_alpha, h0, resets, layouts="tttttst", out_layouts="ts")
    if kernel_platform() != "cpu":
        return E.chunk_delta_rule(q, k, v, beta, log_alpha, **kw, chunk_size=chunk_size)

    def chunked(q, k, v, beta, log_alpha, h0, resets):
        return chunk_delta_rule_cpu(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=scale, chunk_size=chunk_size)

    if impl == "chunked":
        return chunked(q, k, v, beta, log_alpha, h0, resets)

    def scan(q, k, v, beta, log_alpha, h0, resets):
        return E.recurrent_delta_rule(q, k, v, beta, log_alpha, h0=h0, resets=resets, scale=scale)

    return primal_by(scan, chunked)(q, k, v, beta, log_alpha, h0, resets)
