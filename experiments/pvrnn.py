"""PV-RNN (Ahmadi & Tani 2019): the meta-prior w sweep on stochastic sequences with a deterministic skeleton.

    python experiments/pvrnn.py                       # w in {1e-4, …, 1}, CPU scale
    python experiments/pvrnn.py --ws=0.001,0.1 --steps=3000
    python experiments/pvrnn.py --preset=paper

Data: 2-D sequences made of one-period Lissajous primitives (``patterns`` of them, ``period`` steps each); the next
primitive is drawn from a fixed Markov transition matrix, plus Gaussian observation noise. ``seqjax.models.pvrnn``
(MTRNN layers with fast and slow time constants, adaptive-vector posteriors per training sequence) is trained with
Adam on weights and adaptive vectors jointly, once per meta-prior ``w``. Metrics: the training reconstruction error
and KL; then a long sequence generated from the prior is cut into periods, each period labelled with its nearest
primitive, and the empirical transition matrix compared with the true one (mean row KL, true ‖ generated, add-one
smoothed) — the uniform matrix's KL is the trivial baseline; the mean distance of a generated period to its nearest
primitive measures how far generation strays from the skeleton.

Prediction by error regression (the paper's test-time inference): for ``test_seq`` held-out sequences, the
adaptive vectors of the first ``obs_periods`` periods start from the prior (``extend_adaptive``), those of the last
``er_window`` observed steps are optimised for ``er_iters`` Adam steps with the weights frozen
(``error_regression``), and the next ``horizon`` steps are predicted from the prior means. Reported: its MSE
against the held-out continuation, the same prediction without error regression, and the trivial baselines
"repeat the last observed period" and "predict zero" (the data mean).

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``pvrnn``) afresh each run; every record
names the machine, the date, the seed and the paper's finding.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.models import pvrnn as P
from seqjax.tasks.runner import machine, parse, write_results

#: the paper's finding (Ahmadi & Tani 2019, abstract); its numbers are not reproduced here
PAPER = ("high w: deterministic chaos imitating the randomness; low w: a random process; intermediate w "
         "generalises best and captures the latent probabilistic structure")


@dataclasses.dataclass
class Config:
    ws: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0)  # the meta-prior sweep (same w for every layer)
    patterns: int = 3
    period: int = 20
    segments: int = 8  # primitives per training sequence
    n_seq: int = 8
    noise: float = 0.03
    d_sizes: tuple[int, ...] = (30, 10)
    z_sizes: tuple[int, ...] = (2, 1)
    taus: tuple[float, ...] = (2.0, 10.0)
    steps: int = 6000
    lr: float = 1e-3
    lr_a: float = 0.05  # the adaptive vectors' learning rate
    gen_segments: int = 200  # periods generated from the prior for the transition statistics
    test_seq: int = 16  # held-out sequences for the error-regression prediction
    obs_periods: int = 3  # observed periods before predicting
    er_window: int = 20  # steps whose adaptive vectors error regression optimises (the last observed ones)
    er_iters: int = 100
    er_lr: float = 0.09
    horizon: int = 20  # predicted steps after the observed ones
    seed: int = 0
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "pvrnn"
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(ws=(0.01, 1.0), patterns=2, period=4, segments=2, n_seq=2, d_sizes=(6, 4), z_sizes=(1, 1), steps=2,
                 gen_segments=6, test_seq=2, obs_periods=1, er_window=2, er_iters=2, horizon=4),
    "paper": dict(ws=(0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0), n_seq=24, segments=12, d_sizes=(60, 20),
                  z_sizes=(4, 2), taus=(2.0, 20.0), steps=20_000, gen_segments=1000),
}


def primitives(cfg: Config) -> np.ndarray:
    """``[patterns, period, 2]`` one-period Lissajous curves (frequency ratios 1:1, 1:2, 2:1, …)."""
    t = np.arange(cfg.period) / cfg.period * 2 * np.pi
    out = [np.stack([0.8 * np.sin(a * t), 0.8 * np.sin(b * t + np.pi / (1 + k))], -1)
           for k, (a, b) in enumerate([(1, 1), (1, 2), (2, 1), (2, 3), (3, 2)][: cfg.patterns])]
    return np.stack(out).astype(np.float32)


def transition_matrix(cfg: Config) -> np.ndarray:
    """Each primitive repeats with probability 0.2; the rest goes mostly (0.6) to the next one."""
    k = cfg.patterns
    m = np.full((k, k), 0.2 / max(k - 2, 1) if k > 2 else 0.0)
    for i in range(k):
        m[i, i], m[i, (i + 1) % k] = 0.2, 0.6 if k > 2 else 0.8
    return m / m.sum(1, keepdims=True)


def sequences(cfg: Config, prims: np.ndarray, trans: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s, segs = rng.integers(cfg.patterns), []
        for _ in range(cfg.segments):
            segs.append(prims[s])
            s = rng.choice(cfg.patterns, p=trans[s])
        out.append(np.concatenate(segs))
    x = np.stack(out)
    return (x + cfg.noise * rng.normal(size=x.shape)).astype(np.float32)


def transition_kl(gen: np.ndarray, prims: np.ndarray, trans: np.ndarray) -> tuple[float, float]:
    """Nearest-primitive labels of each generated period → (mean row KL(true ‖ empirical), mean distance)."""
    chunks = gen.reshape(-1, prims.shape[1], prims.shape[2])
    dist = np.sqrt(np.mean((chunks[:, None] - prims[None]) ** 2, axis=(2, 3)))
    labels = dist.argmin(1)
    counts = np.ones_like(trans)
    np.add.at(counts, (labels[:-1], labels[1:]), 1)
    emp = counts / counts.sum(1, keepdims=True)
    kl = float(np.mean(np.sum(np.where(trans > 0, trans * np.log(np.maximum(trans, 1e-12) / emp), 0), 1)))
    return kl, float(dist.min(1).mean())


def er_prediction(cfg: Config, tree: dict, w: float, x_test: np.ndarray) -> dict:
    """Error regression over the observed steps' window, then a prior-mean prediction: MSEs of the prediction with
    and without error regression against the held-out continuation."""
    obs = cfg.obs_periods * cfg.period
    seen, future = jnp.asarray(x_test[:, :obs]), x_test[:, obs: obs + cfg.horizon]
    params = tree["w"]
    A0 = P.extend_adaptive(params, P.init_adaptive(x_test.shape[0], 0, cfg.z_sizes), cfg.taus, obs)
    A, losses = P.error_regression(params, A0, seen, jax.random.key(cfg.seed + 2), cfg.taus, w, window=cfg.er_window,
                                   iters=cfg.er_iters, lr=cfg.er_lr)
    key = jax.random.key(cfg.seed + 3)
    mse = lambda a: float(np.mean(np.square(np.asarray(a) - future)))
    return {"er_mse": mse(P.predict(params, A, key, cfg.taus, cfg.horizon)),
            "no_er_mse": mse(P.predict(params, A0, key, cfg.taus, cfg.horizon)),
            "er_window_loss": [float(losses[0]), float(losses[-1])]}


def train(cfg: Config, w: float, x: np.ndarray, log) -> tuple[dict, dict]:
    key = jax.random.key(cfg.seed)
    params = P.init_params(key, x.shape[2], cfg.d_sizes, cfg.z_sizes)
    A = P.init_adaptive(x.shape[0], x.shape[1], cfg.z_sizes)
    tx = optax.multi_transform({"w": optax.adam(cfg.lr), "a": optax.adam(cfg.lr_a)}, {"w": "w", "a": "a"})
    state = tx.init({"w": params, "a": A})
    xj = jnp.asarray(x)

    @jax.jit
    def step(tree, state, k):
        (value, aux), g = jax.value_and_grad(lambda t: P.loss(t["w"], t["a"], xj, k, cfg.taus, w), has_aux=True)(tree)
        upd, state = tx.update(g, state, tree)
        return optax.apply_updates(tree, upd), state, value, jnp.mean(aux["rec"]), jnp.mean(aux["kl"])

    tree, t0 = {"w": params, "a": A}, time.time()
    for it in range(cfg.steps):
        tree, state, value, rec, kl = step(tree, state, jax.random.fold_in(key, it))
        if not np.isfinite(float(value)):
            raise FloatingPointError(f"non-finite loss at step {it} (w={w})")
    log(f"w={w}: loss {float(value):.4f} rec {float(rec):.4f} ({time.time() - t0:.0f}s)")
    return tree, {"rec": float(rec), "kl_weighted": float(kl), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if any(w < 0 for w in cfg.ws):
        raise SystemExit(f"error: --ws must be >= 0, got {cfg.ws}")
    if not 1 <= cfg.er_window <= cfg.obs_periods * cfg.period:
        raise SystemExit(f"error: --er_window must be in [1, obs_periods * period = {cfg.obs_periods * cfg.period}], "
                         f"got {cfg.er_window}")
    if cfg.obs_periods * cfg.period + cfg.horizon > cfg.segments * cfg.period:
        raise SystemExit(f"error: --obs_periods * --period + --horizon must fit in a sequence of --segments * --period "
                         f"= {cfg.segments * cfg.period} steps")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "pvrnn", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "steps": cfg.steps, "paper": PAPER,
            "command": " ".join(["python experiments/pvrnn.py", *argv])}
    prims, trans = primitives(cfg), transition_matrix(cfg)
    x = sequences(cfg, prims, trans, cfg.n_seq, cfg.seed)
    x_test = sequences(cfg, prims, trans, cfg.test_seq, cfg.seed + 1000)
    obs = cfg.obs_periods * cfg.period
    future = x_test[:, obs: obs + cfg.horizon]
    last = np.concatenate([x_test[:, obs - cfg.period: obs]] * (cfg.horizon // cfg.period + 1), 1)[:, : cfg.horizon]
    baselines = {"repeat_last_period_mse": float(np.mean(np.square(last - future))),
                 "zero_mse": float(np.mean(np.square(future)))}
    uniform = np.full_like(trans, 1.0 / cfg.patterns)
    base = float(np.mean(np.sum(np.where(trans > 0, trans * np.log(np.maximum(trans, 1e-12) / uniform), 0), 1)))
    rows, gens = [], {}
    for w in cfg.ws:
        tree, stats = train(cfg, w, x, log)
        gen = np.asarray(P.generate(tree["w"], jax.random.key(cfg.seed + 1), cfg.taus, cfg.gen_segments * cfg.period))[0]
        kl, dist = transition_kl(gen, prims, trans)
        gens[w] = gen
        rows.append(dict(meta, w=w, **stats, transition_kl=kl, uniform_kl=base, distance=dist,
                         **er_prediction(cfg, tree, w, x_test), **baselines))
    best = min(rows, key=lambda r: r["transition_kl"])["w"] if rows else None
    met = len(cfg.ws) >= 3 and best not in (min(cfg.ws), max(cfg.ws))
    lines = [f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}, {cfg.steps} steps", "",
             f"Paper: {PAPER}.", "",
             "| w | train rec | w·KL | transition KL (gen) | uniform KL | distance to skeleton |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['w']:g} | {r['rec']:.4f} | {r['kl_weighted']:.4f} | {r['transition_kl']:.3f} | {r['uniform_kl']:.3f} "
              f"| {r['distance']:.3f} |" for r in rows]
    lines += ["", f"Best transition statistics at w = {best:g}: intermediate w best — {'met' if met else 'missed'}."]
    if rows:
        best_er = min(rows, key=lambda r: r["er_mse"])["w"]
        met_er = len(cfg.ws) >= 3 and best_er not in (min(cfg.ws), max(cfg.ws))
        lines += ["", f"Prediction of the next {cfg.horizon} steps after {obs} observed, by error regression over the last "
                  f"{cfg.er_window} ({cfg.er_iters} Adam steps, {cfg.test_seq} held-out sequences):", "",
                  "| w | MSE with error regression | MSE without | repeat last period | predict zero |", "|---|---|---|---|---|"]
        lines += [f"| {r['w']:g} | {r['er_mse']:.4f} | {r['no_er_mse']:.4f} | {r['repeat_last_period_mse']:.4f} "
                  f"| {r['zero_mse']:.4f} |" for r in rows]
        lines += ["", f"Best prediction at w = {best_er:g}: intermediate w best — {'met' if met_er else 'missed'}."]
    md = "\n".join(lines)
    write_results(os.path.join(cfg.out, cfg.name), rows, md + "\n", lambda png: plot(gens, cfg, png))
    print(md)
    return rows


def plot(gens: dict, cfg: Config, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(gens), figsize=(3 * len(gens), 3), squeeze=False)
    for ax, (w, gen) in zip(axes[0], gens.items()):
        seg = gen[: 6 * cfg.period]
        ax.plot(seg[:, 0], seg[:, 1], lw=0.8)
        ax.set(title=f"generated, w = {w:g}", xlim=(-1.5, 1.5), ylim=(-1.5, 1.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
