"""Every Pallas TPU kernel compiled for several TPU generations on a machine without a TPU.

libtpu compiles for a TPU *topology* with no TPU attached (``jax.experimental.topologies``, as MaxText's
``train_compile``; ``pip install 'jax[tpu]'``, Linux x86-64). ``.compile()`` runs libtpu's own Mosaic compiler
on each ``pallas_call``, so a kernel that would not compile on that generation (an op it lacks, a layout it
cannot prove, too much VMEM) fails here with the compiler's message. Nothing runs: values are checked in
interpret mode (``tests/test_pallas_*.py``), and speed needs a TPU.

For each generation (``--gens``) and shape (``--shapes``) the script compiles each kernel family's gradient,
which holds its forward and backward ``pallas_call``s, and prints one row: compiled or not, the number of
kernels, the compile seconds on this CPU, and the compiler's message where it refused.

    python benchmarks/tpu_compile.py [--gens=v4,v5e,v5p,v6e] [--shapes=NAMES] [--families=...] [--out=FILE]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from typing import Literal

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from pallas_kernels.delta_chunk import delta_chunk
from pallas_kernels.gla_chunk import gla_chunk_pallas
from pallas_kernels.linear_scan.kernel import linear_scan_pallas
from pallas_kernels.mlstm_chunk import mlstm_chunk
from seqjax import cli
from seqjax import sharding as shd

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
# name: (B, T, H, K, V, dtype, chunk)
SHAPES = {
    "bf16-d128": (2, 512, 2, 128, 128, jnp.bfloat16, 64),  # the GPU benchmark's head dims
    "bf16-d256": (2, 512, 2, 256, 256, jnp.bfloat16, 64),
    "bf16-d64-c128": (2, 512, 2, 64, 64, jnp.bfloat16, 128),
    "f32-d128": (2, 512, 2, 128, 128, jnp.float32, 64),
    "f32-odd": (2, 257, 2, 20, 9, jnp.float32, 64),  # padded inside; a ragged last chunk
}


def families(chunk):
    kw = dict(chunk_size=chunk, interpret=False, backend="mosaic_tpu")
    return {
        "gla": lambda q, k, v, g: gla_chunk_pallas(q, k, v, g, **kw),
        "gla_channel": lambda q, k, v, g: gla_chunk_pallas(q, k, v, jnp.zeros(k.shape, jnp.float32) + g[..., None], **kw),
        "delta": lambda q, k, v, g: delta_chunk(q, k, v, g + 1.0, g, **kw),
        "mlstm": lambda q, k, v, g: mlstm_chunk(q, k, v, g, g, **kw),
        "linear_scan": lambda q, k, v, g: linear_scan_pallas(jax.nn.sigmoid(g), g, g[:, 0] * 0.0, interpret=False)[0],
    }


def _grad(f):
    def loss(*a):
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(f(*a)))

    return jax.grad(loss, argnums=(0, 1, 2, 3))


def compile_one(fn, args):
    """Compile ``fn`` for the TPU that ``args`` carry, under a one-chip mesh of it (so the kernels that ask
    ``pallas_kernels._util.platform()`` see a TPU); the number of Mosaic kernels in the program."""
    dev = next(iter(args[0].sharding.device_set))
    with shd.use_rules(shd.make_mesh((1, 1, 1, 1), devices=[dev])):
        low = jax.jit(fn).lower(*args)
    return low.compile().as_text().count('custom_call_target="tpu_custom_call"')


Gen = Literal[tuple(TOPOLOGIES)]  # type: ignore[valid-type]
Shape = Literal[tuple(SHAPES)]  # type: ignore[valid-type]


@dataclasses.dataclass
class Args:
    gens: tuple[Gen, ...] = tuple(TOPOLOGIES)  # TPU generations
    shapes: tuple[Shape, ...] = tuple(SHAPES)  # shapes, named as in the table's header
    families: tuple[str, ...] = ("gla", "gla_channel", "delta", "mlstm", "linear_scan")  # kernel families
    out: str = ""  # also write the table to this markdown file


def main(argv=None):
    a = cli.parse(Args, argv, description=__doc__)
    if importlib.util.find_spec("libtpu") is None:
        sys.exit("compiling for a TPU needs libtpu: pip install 'jax[tpu]' (Linux x86-64)")

    lines = [f"# Pallas TPU kernels compiled without a TPU (jax {jax.__version__}, libtpu {_libtpu_version()})", "",
             "Each row: one kernel family's gradient (its forward and backward `pallas_call`s) compiled by libtpu",
             "for one chip of the generation (`python benchmarks/tpu_compile.py`). Compile seconds are this CPU's.",
             "Shapes (`B, T, H, K, V`, dtype, chunk): "
             + "; ".join(f"{n} = {b}, {t}, {h}, {k}, {v}, {jnp.dtype(d).name}, {c}"
                         for n, (b, t, h, k, v, d, c) in SHAPES.items() if n in a.shapes) + ".",
             "", "| generation | shape | family | compiled | kernels | compile s | note |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for gen in a.gens:
        dev = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[gen]).devices[0]
        sh = SingleDeviceSharding(dev)
        for shape in a.shapes:
            b, t, h, dk, dv, dt, c = SHAPES[shape]
            q = jax.ShapeDtypeStruct((b, t, h, dk), dt, sharding=sh)
            v = jax.ShapeDtypeStruct((b, t, h, dv), dt, sharding=sh)
            g = jax.ShapeDtypeStruct((b, t, h), jnp.float32, sharding=sh)
            for fam in a.families:
                args = (q, q, v, g)
                if fam == "linear_scan":
                    if dt != jnp.float32:
                        continue  # the linear scan runs in float32 / complex64
                    args = (q, q, v, jax.ShapeDtypeStruct((b, t, h * dk), jnp.float32, sharding=sh))
                fn = _grad(families(c)[fam])
                t0 = time.perf_counter()
                ok, note, n = "yes", "", 0
                try:
                    n = compile_one(fn, args)
                except Exception as e:  # noqa: BLE001 — a kernel that does not compile is a finding
                    ok, note = "**no**", " ".join(str(e).split())[:300].replace("|", "/")
                row = f"| {gen} | {shape} | {fam} | {ok} | {n} | {time.perf_counter() - t0:.1f} | {note} |"
                lines.append(row)
                print(row, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def _libtpu_version() -> str:
    from importlib import metadata

    return metadata.version("libtpu")


if __name__ == "__main__":
    main()
