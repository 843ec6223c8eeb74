"""Recurrent Relational Networks (Palm, Paquet & Winther 2018) on Sudoku: the fraction of puzzles solved exactly,
by number of givens and by number of message-passing steps.

    python experiments/sudoku.py                                   # 4×4 Shidoku, 4–6 givens at test
    python experiments/sudoku.py --size=6 --train_givens=10,20 --test_givens=10,12,14 --pool=1000 --steps=300 \\
        --batch_size=32 --test_mp_steps=32 --eval_size=200                    # 6×6
    python experiments/sudoku.py --size=9 --train_givens=30,36 --test_givens=30,33,36 --pool=1000 --d=48 \\
        --steps=1200 --batch_size=16 --test_mp_steps=32 --eval_size=200       # 9×9 at CPU scale
    python experiments/sudoku.py --preset=paper                    # the paper's network and steps, 9×9 (accelerator)

``seqjax.models.rrn.RRN`` reads one graph node per cell (an embedding of its digit, 0 = blank), passes messages
along the Sudoku graph (cells sharing a row, column or box; ``seqjax.tasks.sudoku.edges``) for ``mp_steps`` steps
with an LSTM node update, and is trained on the cross-entropy of the solution digits at every step. Training
puzzles: a pool of ``pool`` puzzles with ``train_givens[0]`` givens (unique solution, ``seqjax.tasks.sudoku``),
each batch revealing solution cells up to a number drawn in ``train_givens`` and relabelling the digits (the
paper's augmentation). Test: fresh puzzles with each of ``test_givens`` givens, run for ``test_mp_steps`` steps;
a puzzle counts as solved at step ``t`` when every cell of the step-``t`` output is right. Baseline in the same
table: naked singles (fill every cell with one candidate left, repeat), the constraint propagation a network
must at least learn.

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``sudoku<size>``) afresh each run;
every record names the machine, the date, the seed, the paper's number and the target.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from typing import Literal

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax.models.rrn import RRN, rrn_loss
from seqjax.tasks import sudoku
from seqjax.tasks.runner import machine, parse, write_results

#: the paper's number (Palm, Paquet & Winther 2018, §3.1): 17-given puzzles, network trained at 32 steps
PAPER = "96.6% of 17-given 9x9 puzzles solved at 64 steps"
#: the CPU targets: (size, givens range, message-passing steps, fraction solved)
TARGETS = {4: ((4, 6), None, 1.0), 9: ((30, 36), 32, 0.9)}


@dataclasses.dataclass
class Config:
    size: Literal[4, 6, 9] = 4  # 4 (Shidoku), 6 (2x3 boxes) or 9
    train_givens: tuple[int, ...] = (4, 10)  # lo,hi: the pool has lo givens; batches reveal up to a draw in [lo, hi]
    test_givens: tuple[int, ...] = (4, 5, 6)
    pool: int = 2000  # training puzzles generated (each batch relabels their digits)
    d: int = 64  # node state and MLP width
    d_embed: int = 16
    mlp_layers: int = 3  # linear layers of the input and node-update MLPs (the paper: 4)
    msg_layers: int = 2  # linear layers of the message MLP f(h_i, h_j) (the paper: 4)
    mp_steps: int = 8  # message-passing steps in training
    test_mp_steps: int = 16  # message-passing steps at test
    steps: int = 300  # optimizer steps
    batch_size: int = 64
    lr: float = 1e-3
    l2: float = 1e-4  # weight decay added to the gradient (the paper's L2 of 1e-4)
    remat: bool = False  # recompute each message-passing step in the backward pass (less memory)
    eval_size: int = 500  # test puzzles per number of givens
    log_every: int = 50
    cache: bool = False  # keep the generated puzzle sets under <out>/<name>/cache/ and reuse them
    seed: int = 0
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = ""  # the results folder (default sudoku<size>)
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(train_givens=(6, 8), test_givens=(6,), pool=8, d=8, d_embed=4, mlp_layers=1, msg_layers=2,
                 mp_steps=2, test_mp_steps=3, steps=2, batch_size=4, eval_size=4, log_every=1),
    # the paper's network, steps and optimiser; 17-given puzzles are impractical to generate, so 24 givens
    "paper": dict(size=9, train_givens=(24, 34), test_givens=(24, 28, 32, 36), pool=20_000, d=96, mlp_layers=4,
                  msg_layers=4, mp_steps=32, test_mp_steps=64, steps=100_000, batch_size=64, lr=2e-4,
                  eval_size=1000, log_every=1000, cache=True),
}


def puzzles(cfg: Config, num: int, givens, seed: int, cache_dir: str | None) -> sudoku.SudokuBatch:
    path = cache_dir and os.path.join(cache_dir, f"{cfg.size}_{givens}_{num}_{seed}.npz".replace(" ", ""))
    if path and os.path.exists(path):
        z = np.load(path)
        return sudoku.SudokuBatch(z["puzzles"], z["solutions"], z["givens"], cfg.size)
    b = sudoku.generate(num, cfg.size, givens, seed=seed)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez_compressed(path, puzzles=b.puzzles, solutions=b.solutions, givens=b.givens)
    return b


def naked_singles(batch: sudoku.SudokuBatch) -> np.ndarray:
    """Per puzzle: whether filling cells with a single candidate, repeated, solves it."""
    n = batch.size
    rows, cols, boxes = (np.arange(n * n) // n, np.arange(n * n) % n,
                         (np.arange(n * n) // n // sudoku.BOXES[n][0]) * (n // sudoku.BOXES[n][1])
                         + np.arange(n * n) % n // sudoku.BOXES[n][1])
    grid = batch.puzzles.copy()
    for _ in range(n * n):
        onehot = np.eye(n + 1, dtype=bool)[grid][..., 1:]  # [b, cells, digit]
        used = np.zeros((len(grid), n * n, n), bool)
        for unit in (rows, cols, boxes):
            per_unit = np.zeros((len(grid), n, n), bool)
            np.logical_or.at(per_unit, (slice(None), unit), onehot)
            used |= per_unit[:, unit]
        single = (grid == 0) & (used.sum(-1) == n - 1)
        if not single.any():
            break
        grid = np.where(single, 1 + np.argmin(used, -1), grid)
    return (grid == batch.solutions).all(1)


def checkpoints(t: int) -> list[int]:
    return sorted({1, t} | {2**k for k in range(1, 8) if 2**k < t})


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if len(cfg.train_givens) != 2 or not cfg.train_givens[0] <= cfg.train_givens[1]:
        raise SystemExit(f"error: --train_givens must be lo,hi with lo <= hi, got {cfg.train_givens}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    name = cfg.name or f"sudoku{cfg.size}"
    out_dir = os.path.join(cfg.out, name)
    cache_dir = os.path.join(out_dir, "cache") if cfg.cache else None
    target = TARGETS.get(cfg.size)
    meta = {"system": "rrn", "task": f"sudoku{cfg.size}", "seed": cfg.seed, "machine": machine(),
            "date": datetime.date.today().isoformat(), "preset": cfg.preset, "steps": cfg.steps,
            "mp_steps": cfg.mp_steps, "d": cfg.d, "train_givens": list(cfg.train_givens), "paper": PAPER,
            "target": None if target is None else {"givens": list(target[0]), "mp_steps": target[1], "solved": target[2]},
            "command": " ".join(["python experiments/sudoku.py", *argv])}

    t0 = time.time()
    pool = puzzles(cfg, cfg.pool, cfg.train_givens[0], cfg.seed, cache_dir)
    tests = {g: puzzles(cfg, cfg.eval_size, g, 10_000 + 131 * g + cfg.seed, cache_dir) for g in cfg.test_givens}
    log(f"generated {cfg.pool} training and {cfg.eval_size}×{len(tests)} test puzzles ({time.time() - t0:.0f}s)")

    senders, receivers = (jnp.asarray(a) for a in sudoku.edges(cfg.size))
    model = RRN(cfg.size + 1, cfg.size, d=cfg.d, d_embed=cfg.d_embed, mlp_layers=cfg.mlp_layers,
                msg_layers=cfg.msg_layers, remat=cfg.remat, rngs=nnx.Rngs(cfg.seed))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(cfg.l2), optax.adam(cfg.lr))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt, x, y):
        (loss, per_step), grads = nnx.value_and_grad(
            lambda m: rrn_loss(m(x, senders, receivers, steps=cfg.mp_steps), y), has_aux=True)(m)
        opt.update(m, grads)
        return loss, per_step

    predict = nnx.jit(lambda m, x: jnp.argmax(m(x, senders, receivers, steps=cfg.test_mp_steps), -1) + 1)

    rows, rng, t0 = [], np.random.default_rng(cfg.seed), time.time()
    for it in range(1, cfg.steps + 1):
        idx = rng.integers(0, len(pool), cfg.batch_size)
        b = sudoku.SudokuBatch(pool.puzzles[idx], pool.solutions[idx], pool.givens[idx], cfg.size)
        b = sudoku.permute_digits(sudoku.add_givens(b, tuple(cfg.train_givens), seed=2 * it + cfg.seed * 7919),
                                  seed=2 * it + 1 + cfg.seed * 7919)
        loss, per_step = train_step(model, opt, jnp.asarray(b.puzzles), jnp.asarray(b.solutions - 1))
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {it}")
        if it % cfg.log_every == 0 or it == cfg.steps:
            rows.append(dict(meta, kind="train", step=it, loss=loss, loss_last_mp_step=float(per_step[-1]),
                             seconds=round(time.time() - t0, 1)))
            log(f"step {it} loss {loss:.4f} (last message-passing step {float(per_step[-1]):.4f}) "
                f"({time.time() - t0:.0f}s)")

    marks = checkpoints(cfg.test_mp_steps)
    for g, tb in tests.items():
        preds = np.concatenate([np.asarray(predict(model, jnp.asarray(tb.puzzles[i : i + 250])))
                                for i in range(0, len(tb), 250)], axis=1)  # [T, b, cells]
        right = preds == tb.solutions[None]
        solved, cells = right.all(-1).mean(-1), right.mean((1, 2))
        singles = float(naked_singles(tb).mean())
        for t in marks:
            rows.append(dict(meta, kind="test", givens=g, mp=t, solved=float(solved[t - 1]),
                             cell_acc=float(cells[t - 1]), naked_singles=singles, n=len(tb)))
        log(f"givens {g}: solved " + " ".join(f"t={t}:{solved[t - 1]:.3f}" for t in marks)
            + f" (naked singles {singles:.3f})")

    header = (f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}, {cfg.steps} steps "
              f"of batch {cfg.batch_size}, {cfg.mp_steps} message-passing steps in training\n\n")
    md = table(rows, cfg)
    write_results(out_dir, rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


def table(rows: list[dict], cfg: Config) -> str:
    tests = [r for r in rows if r["kind"] == "test"]
    if not tests:
        return ""
    marks = list(dict.fromkeys(r["mp"] for r in tests))
    out = [f"Fraction of {cfg.size}×{cfg.size} puzzles solved exactly ({tests[0]['n']} per row) after t "
           "message-passing steps; naked singles: the same puzzles by constraint propagation alone.", "",
           "| givens | " + " | ".join(f"t = {t}" for t in marks) + " | cell acc. | naked singles | target | met |",
           "|---" * (len(marks) + 5) + "|"]
    target = TARGETS.get(cfg.size)
    for g in dict.fromkeys(r["givens"] for r in tests):
        sel = {r["mp"]: r for r in tests if r["givens"] == g}
        want, met = "—", "—"
        if target is not None and target[0][0] <= g <= target[0][1]:
            at = target[1] or marks[-1]
            want = f"≥ {target[2]:.0%} at t = {at}"
            met = "—" if at not in sel else ("met" if sel[at]["solved"] >= target[2] else "missed")
        out.append(f"| {g} | " + " | ".join(f"{sel[t]['solved']:.3f}" for t in marks)
                   + f" | {sel[marks[-1]]['cell_acc']:.3f} | {sel[marks[-1]]['naked_singles']:.3f} | {want} | {met} |")
    out += ["", f"The paper: {PAPER} (trained at 32 steps; 17 givens, Royle's puzzles)."]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [r for r in rows if r["kind"] == "test"]
    train = [r for r in rows if r["kind"] == "train"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for g in dict.fromkeys(r["givens"] for r in tests):
        sel = [r for r in tests if r["givens"] == g]
        axes[0].plot([r["mp"] for r in sel], [r["solved"] for r in sel], "o-", label=f"{g} givens")
    axes[0].set(xscale="log", xlabel="message-passing steps", ylabel="fraction solved", ylim=(-0.02, 1.02),
                title="puzzles solved")
    axes[0].set_xscale("log", base=2)
    if tests:
        axes[0].legend(fontsize=7)
    axes[1].plot([r["step"] for r in train], [r["loss"] for r in train], "o-")
    axes[1].set(xlabel="optimizer step", ylabel="loss (mean over message-passing steps)", yscale="log", title="training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
