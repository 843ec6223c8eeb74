"""ConvS5 against ConvLSTM speed, as ratios measured side by side in one run (Smith et al. 2023 claim ConvS5
trains 3× faster than ConvLSTM, on GPU).

1. Training step: loss, gradients and the AdamW update of ``seqjax.models.convssm.FramePredictor`` with either
   backbone at the same size (encoder → layers → decoder; teacher forcing on ``B × T`` frames), ConvS5 with the
   scan engine's ``sequential`` (``lax.scan``) and ``associative`` (the paper's parallel scan) impls.
2. Sequence layer alone: forward+backward of one ConvS5 layer and one ConvLSTM layer on ``[B, T, h, w, d]``
   latents, for each ``T`` in ``--layer_ts``.
3. Autoregressive sampling: condition on ``--context`` frames, generate ``--horizon`` frames (RNN mode for both);
   the time per generated frame.

Every function is compiled first (a warm-up call), then all are timed in interleaved rounds; the tables give the
median and minimum wall time and the ratio ConvLSTM / ConvS5 (above 1: ConvS5 is faster).

    python benchmarks/convssm.py --out=benchmarks/results/cpu_convssm.md
    python benchmarks/convssm.py --batch=4 --frames=64 --reps=5
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from seqjax import cli
from seqjax.models.convssm import ConvS5, FramePredictor
from seqjax.rnn.conv import ConvLSTM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, time_interleaved, versions


@dataclasses.dataclass
class Args:
    reps: int = 5  # interleaved timing rounds
    batch: int = 8
    frames: int = 12  # training clip length T (the experiment's cpu preset)
    size: int = 16  # frame side (the latent is size / 2)
    d_model: int = 16
    ssm_size: int = 16
    layers: int = 2
    layer_ts: tuple[int, ...] = (16, 128)  # sequence lengths of the layer-alone table
    context: int = 4
    horizon: int = 24
    out: str = ""  # write the run (command, machine, versions, tables) to this markdown file


def _predictor(backbone, a: Args, impl="auto"):
    return nnx.jit(lambda r: FramePredictor(backbone, d_model=a.d_model, ssm_size=a.ssm_size, num_layers=a.layers,
                                            impl=impl, rngs=r))(nnx.Rngs(0))


def _train_step(model):
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    def loss_fn(m, f):
        pred, _ = m(f[:, :-1])
        return jnp.mean((pred - f[:, 1:]) ** 2)

    @nnx.jit
    def step(m, o, f):
        loss, g = nnx.value_and_grad(loss_fn)(m, f)
        o.update(m, g)
        return loss

    return lambda f: jax.block_until_ready(step(model, opt, f))


def _table(title, res, base, unit="ms", scale=1e3) -> list[str]:
    rows = [f"### {title}\n", f"| form | median {unit} | min {unit} | ConvLSTM / this |", "|---|---:|---:|---:|"]
    for name, (med, mn) in res.items():
        rows.append(f"| {name} | {med * scale:.2f} | {mn * scale:.2f} | {res[base][0] / med:.2f} |")
    return rows + [""]


def bench_train(a: Args, frames) -> list[str]:
    fns = {"ConvLSTM": _train_step(_predictor("convlstm", a)),
           "ConvS5 sequential": _train_step(_predictor("convs5", a, "sequential")),
           "ConvS5 associative": _train_step(_predictor("convs5", a, "associative"))}
    res = time_interleaved({k: (lambda f=f: f(frames)) for k, f in fns.items()}, a.reps)
    title = (f"Training step (loss + grads + AdamW), FramePredictor, B = {a.batch}, T = {a.frames - 1} frames of "
             f"{a.size}×{a.size}, d_model = {a.d_model}, P = {a.ssm_size}, {a.layers} layers")
    return _table(title, res, "ConvLSTM")


def bench_layers(a: Args) -> list[str]:
    h = a.size // 2
    rows = []
    for t in a.layer_ts:
        x = jax.random.normal(jax.random.PRNGKey(1), (a.batch, t, h, h, a.d_model))
        fns = {}
        for name, layer in (("ConvLSTM", ConvLSTM(a.d_model, a.d_model, rngs=nnx.Rngs(0))),
                            ("ConvS5 sequential", ConvS5(a.d_model, a.ssm_size, impl="sequential", rngs=nnx.Rngs(0))),
                            ("ConvS5 associative", ConvS5(a.d_model, a.ssm_size, impl="associative", rngs=nnx.Rngs(0)))):
            g = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x)[0] ** 2), argnums=(0, 1)))
            fns[name] = lambda g=g, layer=layer: jax.block_until_ready(g(layer, x))
        res = time_interleaved(fns, a.reps)
        rows += _table(f"One sequence layer fwd+bwd, [B, T, h, w, d] = [{a.batch}, {t}, {h}, {h}, {a.d_model}], "
                       f"P = {a.ssm_size}", res, "ConvLSTM")
    return rows


def bench_generate(a: Args, frames) -> list[str]:
    ctx = frames[:, : a.context]
    fns = {}
    for name, bk in (("ConvLSTM", "convlstm"), ("ConvS5", "convs5")):
        model = _predictor(bk, a)
        gen = nnx.jit(lambda m, c: m.generate(c, a.horizon))
        fns[name] = lambda gen=gen, model=model: jax.block_until_ready(gen(model, ctx))
    res = time_interleaved(fns, a.reps)
    res = {k: (m / a.horizon, n / a.horizon) for k, (m, n) in res.items()}
    return _table(f"Autoregressive sampling, B = {a.batch}, condition on {a.context}, generate {a.horizon} frames: "
                  "time per generated frame", res, "ConvLSTM")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = cli.parse(Args, argv, description=__doc__)
    load0 = os.getloadavg()
    head = [f"## `python benchmarks/convssm.py {' '.join(argv)}`\n",
            f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- machine: {machine()}; backend {jax.default_backend()} ({jax.devices()[0].device_kind})",
            f"- versions: {versions()}",
            f"- timing: {a.reps} interleaved rounds after a warm-up call each, all forms in one process; "
            "median and minimum wall time"]
    print("\n".join(head), flush=True)
    frames = jax.random.uniform(jax.random.PRNGKey(0), (a.batch, a.frames, a.size, a.size, 1))
    rows = []
    for part in (bench_train(a, frames), bench_layers(a), bench_generate(a, frames)):
        print("\n".join(part), flush=True)
        rows += part
    load1 = os.getloadavg()
    head.append(f"- load average (1 min) before / after: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs")
    print(head[-1])
    if a.out:
        with open(a.out, "w") as fh:
            fh.write("# ConvS5 vs ConvLSTM on CPU (`benchmarks/convssm.py`)\n\n" + "\n".join(head + [""] + rows) + "\n")


if __name__ == "__main__":
    main()
