"""Pointer Networks (Vinyals, Fortunato & Jaitly 2015): planar convex hull, TSP and Delaunay triangulation.

    python experiments/pointer.py --task=hull                 # train on n = 5–20, test at n = 10 and 50
    python experiments/pointer.py --task=tsp                  # train and test at n = 10 (Held–Karp labels)
    python experiments/pointer.py --task=delaunay             # n = 5
    python experiments/pointer.py --task=hull --preset=paper  # the paper's size: LSTM 512, 1M examples

Trains the pointer network (``seqjax.models.pointer``, LSTM encoder–decoder, the output a pointer to an input
point) and the baselines ``seqjax.rnn.Seq2Seq`` with attention (``s2s_att``) and without (``s2s``: the decoder
sees one fixed context, the encoder's last output), whose output vocabulary is the position index, on the
same examples (``seqjax.tasks.geometry``). Tests at every ``--test_n``: pointer decoding greedy and by beam
search (``--beam``), both under the validity masks (no repeated point; the hull closes); the seq2seq
baselines decode greedily with no masks. Metrics: exact-sequence accuracy, area coverage and valid polygons
(hull); tour length against the label's, valid tours (TSP, beside a nearest-neighbour and a random tour);
triangle coverage (Delaunay).

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``pointer_<task>``) afresh each
run; every record names the machine, the date, the seed and the paper's number.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax.models.pointer import IGNORE, PointerNet, sequence_nll
from seqjax.rnn import Seq2Seq
from seqjax.tasks import geometry
from seqjax.tasks.runner import machine, parse, write_results

MODELS = ("ptr", "s2s_att", "s2s")

#: the paper's numbers beside ours (Vinyals et al. 2015, Tables 1–2)
PAPER = {
    ("hull", 5): "Ptr-Net trained n=5–50: 92.0 % exact",
    ("hull", 10): "Ptr-Net trained n=5–50: 87.0 % exact",
    ("hull", 50): "Ptr-Net trained n=5–50: 69.6 % exact; trained n=50: 72.6 % / 99.9 % area (seq2seq+att 38.9 %, seq2seq 1.9 %)",
    ("hull", 100): "Ptr-Net trained n=5–50: 50.3 % exact",
    ("hull", 200): "Ptr-Net trained n=5–50: 22.1 % exact",
    ("hull", 500): "Ptr-Net trained n=5–50: 1.3 % exact",
    ("tsp", 5): "optimal 2.12, Ptr-Net 2.12",
    ("tsp", 10): "optimal 2.87, Ptr-Net 2.88",
    ("tsp", 20): "optimal 3.82, Ptr-Net 3.88 (trained n=5–20)",
    ("delaunay", 5): "Ptr-Net 80.7 % exact, 93.0 % triangle coverage",
    ("delaunay", 50): "Ptr-Net 0 % exact, 52.8 % triangle coverage",
}


@dataclasses.dataclass
class Config:
    task: Literal["hull", "tsp", "delaunay"] = "hull"
    models: tuple[Literal["ptr", "s2s_att", "s2s"], ...] = ()  # default: all (hull, tsp), ptr (delaunay)
    train_n: tuple[int, ...] = ()  # one size, or lo,hi drawn per example; default hull 5,20, tsp 10
    test_n: tuple[int, ...] = ()  # default hull 10,50, tsp 10,20
    hidden: int = 128
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    clip: float = 2.0
    train_size: int = 100_000  # examples generated once, sampled with replacement
    eval_size: int = 500
    beam: int = 4  # beam width of the second pointer decoding (1: greedy only)
    eval_every: int = 1000
    buckets: int = 2  # training batches drawn from one of this many set-size ranges, padded to its largest
    seed: int = 0
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = ""  # the results folder; default pointer_<task>
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(train_n=(5, 6), test_n=(6,), hidden=8, steps=2, batch_size=4, train_size=16, eval_size=4, beam=2,
                 eval_every=2),
    "paper": dict(hidden=512, steps=100_000, lr=1e-3,
                  train_size=1_000_000, eval_size=1000, beam=8, eval_every=10_000),
}

#: (train_n, test_n) when not given; the paper preset trains the hull on n = 5–50
SIZES = {"hull": ((5, 20), (10, 50)), "tsp": ((10,), (10, 20)), "delaunay": ((5,), (5, 10)),
         "paper hull": ((5, 50), (5, 10, 50, 100, 200, 500))}


def generate(task: str, num: int, n, seed: int) -> geometry.PointerBatch:
    n = n[0] if len(n) == 1 else tuple(n)
    if task == "hull":
        return geometry.convex_hull(num, n, seed=seed)
    if task == "tsp":
        return geometry.tsp(num, n, seed=seed)
    return geometry.delaunay(num, n, seed=seed)


# ----------------------------------------------------------------------------- models


class S2S(nnx.Module):
    """``seqjax.rnn.Seq2Seq`` with the position index as its output vocabulary (``bos`` = ``vocab − 1``);
    ``attention=False`` masks its attention to the encoder's last real output (one fixed context)."""

    def __init__(self, hidden: int, vocab: int, attention: bool, *, rngs: nnx.Rngs):
        self.net = Seq2Seq(2, vocab, hidden=hidden, d_emb=hidden // 2, bidirectional=False, kind="lstm", rngs=rngs)
        self.attention, self.bos = attention, vocab - 1

    def src_mask(self, mask):
        if self.attention:
            return mask
        return jax.nn.one_hot(jnp.sum(mask, -1) - 1, mask.shape[1], dtype=bool)

    def __call__(self, x, targets, mask):
        safe = jnp.where(targets == IGNORE, 0, targets)
        tgt_in = jnp.concatenate([jnp.full_like(safe[:, :1], self.bos), safe[:, :-1]], 1)
        return self.net(x, tgt_in, self.src_mask(mask))

    def decode(self, x, mask, max_len):
        return self.net.generate(x, max_len, self.bos, self.src_mask(mask))[0]


def build(name: str, cfg: Config, vocab: int):
    rngs = nnx.Rngs(cfg.seed)
    if name == "ptr":
        return PointerNet(2, cfg.hidden, rngs=rngs)
    return S2S(cfg.hidden, vocab, attention=name == "s2s_att", rngs=rngs)


def mode_of(task: str) -> str:
    return {"hull": "cycle", "tsp": "tour", "delaunay": "triangles"}[task]


def cut(task: str, seqs, mask) -> np.ndarray:
    """Unmasked decodings as the masked ones end: a hull at the first return to its first index, a tour after
    ``n`` pointers; ``IGNORE`` after."""
    seqs = np.array(seqs)
    for i, row in enumerate(seqs):
        if task == "hull":
            back = [j for j in range(1, len(row)) if row[j] == row[0]]
            end = back[0] + 1 if back else len(row)
        elif task == "tsp":
            end = int(mask[i].sum())
        else:
            end = len(row)
        row[end:] = IGNORE
    return seqs


def size_buckets(data: geometry.PointerBatch, count: int) -> list[tuple[np.ndarray, int, int]]:
    """Training examples split by set size into ``count`` ranges, each padded only to its own largest set:
    ``(members, points, steps)``."""
    sizes = data.mask.sum(1)
    edges = np.unique(np.quantile(sizes, np.linspace(0, 1, count + 1)[1:], method="higher"))
    out, lo = [], 0
    for hi in edges:
        members = np.flatnonzero((sizes > lo) & (sizes <= hi))
        if len(members):
            out.append((members, int(hi), int((data.targets[members] != IGNORE).sum(1).max())))
        lo = hi
    return out


def train(model, name: str, cfg: Config, data: geometry.PointerBatch, log) -> list[dict]:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip),
                     optax.adam(optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1), 0.05)))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    mode = mode_of(cfg.task)

    def loss_fn(m, x, y, mask):
        logits = m(x, y, mask, mode=mode) if name == "ptr" else m(x, y, mask)
        return sequence_nll(logits, y)

    @nnx.jit
    def step(m, opt, x, y, mask):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x, y, mask)
        opt.update(m, grads)
        return loss

    rng = np.random.default_rng(cfg.seed + 1)
    buckets = size_buckets(data, cfg.buckets)
    weights = np.array([len(b[0]) for b in buckets], float) / len(data)
    rows, t0, losses = [], time.time(), []
    for it in range(1, cfg.steps + 1):
        members, width, steps = buckets[rng.choice(len(buckets), p=weights)]
        idx = rng.choice(members, cfg.batch_size)
        targets = data.targets[idx, :steps]
        targets = np.where(targets == data.points.shape[1], width, targets)  # the end slot moves with the width
        loss = float(step(model, opt, jnp.asarray(data.points[idx, :width]), jnp.asarray(targets),
                          jnp.asarray(data.mask[idx, :width])))
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {it} ({name})")
        losses.append(loss)
        if it % cfg.eval_every == 0 or it == cfg.steps:
            rows.append({"kind": "train", "model": name, "step": it, "loss": float(np.mean(losses)),
                         "seconds": round(time.time() - t0, 1)})
            losses = []
            log(f"{name} step {it} loss {rows[-1]['loss']:.4f} ({rows[-1]['seconds']:.0f}s)")
    return rows


def score(task: str, batch: geometry.PointerBatch, preds) -> dict:
    if task == "hull":
        return geometry.hull_scores(batch, preds)
    if task == "delaunay":
        return geometry.delaunay_scores(batch, preds)
    lengths, valid = geometry.tour_lengths(batch, preds)
    opt = batch.extras["length"]
    out = {"valid": float(valid.mean()), "exact": float(np.mean([geometry.decoded_sequence(p) == geometry.decoded_sequence(t)
                                                                 for p, t in zip(np.asarray(preds), batch.targets)]))}
    if valid.any():
        out.update(tour_length=float(np.mean(lengths[valid])), label_length=float(np.mean(opt[valid])),
                   gap=float(np.mean(lengths[valid]) / np.mean(opt[valid]) - 1.0))
    return out


def evaluate(model, name: str, cfg: Config, tests: dict) -> list[dict]:
    rows = []
    mode = mode_of(cfg.task)
    for n, batch in tests.items():
        x, mask = jnp.asarray(batch.points), jnp.asarray(batch.mask)
        chunks = lambda f: np.concatenate([np.asarray(f(x[i : i + 250], mask[i : i + 250]))
                                           for i in range(0, len(batch), 250)])
        if name == "ptr":
            kinds = ["greedy"] + ([f"beam{cfg.beam}"] if cfg.beam > 1 else [])
            for kind in kinds:
                width = 1 if kind == "greedy" else cfg.beam
                dec = nnx.jit(lambda m, x, mk, w=width: m.decode(x, mk, mode=mode, beam=w)[0])
                preds = chunks(lambda x_, m_: dec(model, x_, m_))
                rows.append({"model": name, "decode": kind, "n": n, **score(cfg.task, batch, preds)})
        else:
            if n >= model.net.vocab:  # the output vocabulary cannot name a position this large
                rows.append({"model": name, "decode": "greedy", "n": n, "note": "n beyond the output vocabulary"})
                continue
            dec = nnx.jit(lambda m, x, mk: m.decode(x, mk, batch.targets.shape[1]))
            preds = cut(cfg.task, chunks(lambda x_, m_: dec(model, x_, m_)), batch.mask)
            rows.append({"model": name, "decode": "greedy", "n": n, **score(cfg.task, batch, preds)})
    return rows


def trivial_tours(tests: dict, seed: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(seed)
    for n, batch in tests.items():
        for name, fn in (("nearest_neighbour", geometry.nearest_neighbour_tour),
                         ("random", lambda p: geometry.random_tour(p, rng))):
            tours = np.full(batch.targets.shape, IGNORE, np.int32)
            for i in range(len(batch)):
                t = fn(batch.points[i, : int(batch.mask[i].sum())])
                tours[i, : len(t)] = t
            rows.append({"model": name, "decode": "-", "n": n, **score("tsp", batch, tours)})
        rows.append({"model": "label", "decode": "-", "n": n, **score("tsp", batch, batch.targets)})
    return rows


# ----------------------------------------------------------------------------- report


def table(rows: list[dict], task: str) -> str:
    cols = {"hull": ["exact", "area_coverage", "valid"], "tsp": ["tour_length", "label_length", "gap", "valid"],
            "delaunay": ["exact", "triangle_coverage"]}[task]
    lines = ["| model | decode | n | " + " | ".join(cols) + " | paper |", "|---" * (len(cols) + 4) + "|"]
    for r in rows:
        if r.get("kind", "test") != "test":
            continue
        cells = [("—" if c not in r else f"{r[c]:.3f}") for c in cols]
        lines.append(f"| {r['model']} | {r['decode']} | {r['n']} | " + " | ".join(cells) + f" | {r.get('paper', '')} |")
    return "\n".join(lines)


def plot(rows: list[dict], task: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = {"hull": "exact", "tsp": "gap", "delaunay": "triangle_coverage"}[task]
    tests = [r for r in rows if r.get("kind") == "test" and metric in r]
    labels = [f"{r['model']} {r['decode']} n={r['n']}" for r in tests]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(labels), 3.4))
    ax.bar(np.arange(len(labels)), [r[metric] for r in tests])
    ax.set_xticks(np.arange(len(labels)), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(metric + (" (tour / label − 1)" if metric == "gap" else ""))
    ax.set_title(f"pointer networks: {task}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    sizes = SIZES.get(f"{cfg.preset} {cfg.task}", SIZES[cfg.task])
    cfg.train_n, cfg.test_n = cfg.train_n or sizes[0], cfg.test_n or sizes[1]
    cfg.models = cfg.models or (("ptr",) if cfg.task == "delaunay" else MODELS)
    if cfg.task == "delaunay" and set(cfg.models) != {"ptr"}:
        raise SystemExit("error: --models for delaunay is ptr only (the seq2seq baselines have no end token)")
    if not 1 <= len(cfg.train_n) <= 2:
        raise SystemExit(f"error: --train_n must be one size or lo,hi, got {cfg.train_n}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    t0 = time.time()
    data = generate(cfg.task, cfg.train_size, cfg.train_n, cfg.seed)
    tests = {n: generate(cfg.task, cfg.eval_size, (n,), 10_000 + 97 * n + cfg.seed) for n in cfg.test_n}
    log(f"generated {cfg.train_size} training and {len(tests)} × {cfg.eval_size} test examples ({time.time() - t0:.0f}s)")
    vocab = max(max(cfg.train_n), max(cfg.test_n)) + 1
    meta = {"system": "pointer", "task": cfg.task, "seed": cfg.seed, "machine": machine(),
            "date": datetime.date.today().isoformat(), "train_n": list(cfg.train_n), "steps": cfg.steps,
            "hidden": cfg.hidden, "train_size": cfg.train_size, "preset": cfg.preset,
            "command": " ".join(["python experiments/pointer.py", *argv])}
    rows = []
    for name in cfg.models:
        model = build(name, cfg, vocab)
        rows += [dict(meta, **r) for r in train(model, name, cfg, data, log)]
        for r in evaluate(model, name, cfg, tests):
            rows.append(dict(meta, kind="test", paper=PAPER.get((cfg.task, r["n"]), ""), **r))
            log(json.dumps({k: v for k, v in r.items()}))
    if cfg.task == "tsp":
        rows += [dict(meta, kind="test", paper=PAPER.get(("tsp", r["n"]), ""), **r) for r in trivial_tours(tests, cfg.seed)]
    md = table(rows, cfg.task)
    header = f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}, {cfg.steps} steps\n\n"
    write_results(os.path.join(cfg.out, cfg.name or f"pointer_{cfg.task}"), rows, header + md + "\n", lambda png: plot(rows, cfg.task, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
