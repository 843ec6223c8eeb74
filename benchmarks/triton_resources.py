"""What each Pallas GPU kernel costs an H100/H200 in shared memory and registers, measured without a GPU.

``jax.export(platforms=("cuda",))`` runs the Pallas -> Triton IR lowering on any machine; this script keeps
that IR for every kernel of the chunked mixers (forward and backward, bf16, head dims 128 or ``--dim``, chunk 64;
``--kernels=rnn``: the fused RNN cells of ``pallas_kernels/rnn``), then compiles it for ``sm_90`` with the
``triton`` wheel (``pip install triton``; no GPU or driver needed: Triton bundles ``ptxas``) and prints, per
kernel, the shared memory the launch needs (an H100/H200 block may have at most 227 KiB) and the registers and
spill bytes ``ptxas -v`` reports. A kernel over the shared-memory limit
fails to launch; heavy spills make it slow.

Caveat: XLA compiles the same IR with the Triton inside jaxlib, whose version differs from the wheel's; the
numbers are close, not equal. The IR is captured by wrapping a private jax function
(``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``), so a jax upgrade may need this script
updated. The compile runs in a subprocess (Triton's and jaxlib's LLVMs stay apart), with ``--python``'s
interpreter if the triton wheel lives in another environment.

    python benchmarks/triton_resources.py [--kernels=gla,chan,delta,mlstm|rnn] [--dim=128] [--python=PY] [--out=FILE]
        [--only=RE] [--keep=DIR]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE = "compile-ttir"  # the first argument of the compile subprocess
RNN_CELLS = ("lstm", "gru", "slstm", "rnn_tanh")  # --kernels=rnn: the fused cells (four gates, three, one)
SMEM_LIMIT = 227 * 1024  # the most shared memory one block may opt into on sm_90 (H100, H200)


def dump(kernels: list[str], out: str, dim: int = 128) -> dict[str, tuple[int, int]]:
    """Write ``<out>/<name>.ttir`` for every Triton kernel of ``kernels``' forward and gradient; return
    ``{name: (num_warps, num_stages)}``."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import lowering

    from pallas_kernels.delta_chunk import delta_chunk
    from pallas_kernels.gla_chunk import gla_chunk_pallas
    from pallas_kernels.mlstm_chunk import mlstm_chunk

    real = lowering.lower_jaxpr_to_triton_module
    label = [""]  # a prefix for the kernels of the form being exported (the fused RNN's cell)

    def keep(*a, **kw):
        res = real(*a, **kw)
        asm = res.module.operation.get_asm(enable_debug_info=False)
        name = label[0] + re.search(r"tt\.func public @(\w+)", asm).group(1)
        seen = sum(f.split(".")[0].split("#")[0] == name for f in os.listdir(out))  # a kernel called twice (WY)
        with open(os.path.join(out, name + (f"#{seen + 1}" if seen else "") + ".ttir"), "w") as f:
            f.write(asm)
        return res

    lowering.lower_jaxpr_to_triton_module = keep
    try:
        q = jnp.zeros((2, 256, 2, dim), jnp.bfloat16)
        g = jnp.zeros((2, 256, 2))
        kw = dict(chunk_size=64, interpret=False, backend="triton")
        forms = {"gla": lambda q, v, g: gla_chunk_pallas(q, q, v, g, **kw),
                 "chan": lambda q, v, g: gla_chunk_pallas(q, q, v, jnp.zeros(q.shape, jnp.float32) + g[..., None], **kw),
                 "delta": lambda q, v, g: delta_chunk(q, q, v, g + 1.0, g, **kw),
                 "mlstm": lambda q, v, g: mlstm_chunk(q, q, v, g, g, **kw)}
        args = {name: (q, q, g) for name in forms}
        rnns = [f"rnn_{cell}" for cell in RNN_CELLS]
        for name in rnns:  # the fused RNN (impl="pallas") at the largest head a GPU takes
            forms[name], args[name] = _rnn_form(name[4:])
        params = {}
        for name in [n for k in kernels for n in (rnns if k == "rnn" else [k])]:
            f = forms[name]
            label[0] = name[4:] + "_" if name.startswith("rnn_") else ""
            loss = lambda *a, f=f: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(f(*a)))
            exp = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",),
                                disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args[name])
            for m in re.finditer(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', exp.mlir_module()):
                params[label[0] + m.group(1)] = (int(m.group(3)), int(m.group(2)))
    finally:
        lowering.lower_jaxpr_to_triton_module = real
    return params


def _rnn_form(cell: str):
    """The fused RNN kernels of ``cell`` (``pallas_kernels/rnn``) and their arguments: B = 16, T = 64, G = 2 heads of
    the largest size a GPU block holds (``_max_head``), float32."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.rnn import fused_rnn
    from pallas_kernels.rnn.flashrnn import _max_head
    from seqjax import rnn
    from seqjax.rnn import cells

    c = cells.CELLS[cell]
    k, d = c.num_gates, _max_head(c.num_gates)
    pp = cells.neuron_params(c, rnn.init_params(cell, jax.random.PRNGKey(0), d, 2 * d, heads=2))
    f = lambda R, xp, s0: fused_rnn(c.split, R, pp, xp, s0, interpret=False)
    return f, (jnp.zeros((2, d, k, d)), jnp.zeros((16, 64, 2, k, d)), jnp.zeros((16, c.num_states, 2, d)))


def compile_all(out: str, only: str = "") -> list[dict]:
    """In the triton wheel's process: compile every ``<out>/*.ttir`` for sm_90 and read ``ptxas -v``."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    params = json.load(open(os.path.join(out, "params.json")))
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(p for p in (os.path.join(bindir, "ptxas-blackwell"), os.path.join(bindir, "ptxas")) if os.path.exists(p))
    rows = []
    for file in sorted(f for f in os.listdir(out) if f.endswith(".ttir") and re.search(only, f)):
        name = file[:-len(".ttir")]
        warps, stages = params[name.split("#")[0]]
        path = os.path.join(out, file)
        row = dict(name=name, warps=warps, stages=stages)
        try:
            t0 = time.perf_counter()
            k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
            with open(path + ".ptx", "w") as f:
                f.write(k.asm["ptx"])
            info = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path + ".ptx", "-o", os.devnull],
                                  capture_output=True, text=True).stderr
            row.update(seconds=time.perf_counter() - t0, shared=k.metadata.shared,
                       registers=int(re.search(r"Used (\d+) registers", info).group(1)),
                       spills=int(re.search(r"(\d+) bytes spill stores", info).group(1)))
        except Exception as e:  # noqa: BLE001 — a kernel that does not compile is a finding, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
    return rows


@dataclasses.dataclass
class Args:
    kernels: tuple[str, ...] = ("gla", "chan", "delta", "mlstm")  # or "rnn": the fused LSTM, GRU and sLSTM cells
    dim: int = 128  # the key and value head dim
    python: str = sys.executable  # an interpreter with the triton wheel
    out: str = ""  # also write the table to this markdown file
    only: str = ""  # compile only the kernels whose name matches this regex
    keep: str = ""  # keep each kernel's .ttir and .ptx in this (new) folder


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [COMPILE]:  # the compile subprocess: `COMPILE <folder> <only>`
        import triton

        print(json.dumps({"triton": triton.__version__, "rows": compile_all(argv[1], argv[2])}))
        return
    # imported here, not at the top: the compile subprocess runs this file in the triton wheel's interpreter,
    # which need not have seqjax's dependencies (jax, tyro)
    sys.path.insert(0, ROOT)
    from seqjax import cli

    a = cli.parse(Args, argv, description=__doc__)
    if a.keep:
        os.makedirs(a.keep)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = a.keep or tmp
        params = dump(list(a.kernels), tmp, a.dim)
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f)
        res = subprocess.run([a.python, os.path.abspath(__file__), COMPILE, tmp, a.only],
                             capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"the triton compile failed (is the triton wheel installed for {a.python}?):\n{res.stderr[-2000:]}")
        found = json.loads(res.stdout.strip().splitlines()[-1])
    import jax

    lines = [f"# Pallas GPU kernels compiled for sm_90 without a GPU (jax {jax.__version__}, triton {found['triton']})", "",
             f"B=2, T=256, H=2, D={a.dim}, bf16, chunk 64; forward and backward kernels (`#2`: a kernel's second call, e.g.",
             "the WY factors again with the inverse in the backward). Limit: 227 KiB shared memory per block on an",
             "H100/H200. Spills: bytes of register spill stores per thread (`ptxas -v`). Compile: seconds for",
             "Triton IR -> PTX -> SASS on this machine's one core (the device pays it again for every new shape).",
             *(["Fused RNN cells (`<cell>_fused_rnn_*`): B = 16, T = 64, two heads of the largest size a GPU block takes",
                "(64 at three or four gates, 128 at one), float32."] if "rnn" in a.kernels else []), "",
             "| kernel | warps | stages | shared KiB | registers | spill stores B | compile s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in found["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['warps']} | {r['stages']} | | | | | compile failed: {r['error']} |")
            continue
        note = "**over the shared-memory limit**" if r["shared"] > SMEM_LIMIT else ("heavy spills" if r["spills"] > 4096 else "")
        lines.append(f"| {r['name']} | {r['warps']} | {r['stages']} | {r['shared'] / 1024:.0f} | {r['registers']} | "
                     f"{r['spills']} | {r['seconds']:.1f} | {note} |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
