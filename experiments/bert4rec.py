"""BERT4Rec (Sun et al. 2019) against causal baselines on synthetic user histories: does the bidirectional,
Cloze-trained Transformer beat the left-to-right models at next-item recommendation?

    python experiments/bert4rec.py                                  # cpu preset: every model
    python experiments/bert4rec.py --models=bert4rec,sasrec --steps=1000
    python experiments/bert4rec.py --swap=0.3                        # loosely ordered histories
    python experiments/bert4rec.py --preset=paper

Data: ``seqjax.tasks.recsys.sessions`` (taste clusters, Zipf popularity, cluster Markov chains), split
leave-one-out (last item test, second-to-last validation, the rest training). Models (``seqjax.models.bert4rec``):

- ``bert4rec``: bidirectional Transformer, Cloze objective (mask ``mask_prob`` of the items, plus a fraction
  ``last_frac`` of rows that mask only the last item), queried with ``[mask]`` appended to the history;
- ``sasrec``: the same Transformer with a causal mask, next-item softmax cross-entropy at every position;
- ``sasrec_bce``: the same, with SASRec's own loss (binary cross-entropy, one uniformly sampled negative);
- ``gru4rec``: one ``seqjax.rnn`` GRU, next-item softmax cross-entropy;
- ``pop`` (training popularity) and ``random`` (chance: HR@10 = 10/101).

Evaluation as in the paper: the target ranked among 100 negatives drawn by popularity from the items the user
never took; HR@{1,5,10}, NDCG@{5,10}, MRR. Validation every ``eval_every`` steps picks the checkpoint whose
test metrics are reported. Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` afresh each run; every
record names the machine, the date, the seed and the paper's number.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax.models.bert4rec import Bert4Rec, GRU4Rec, bce_loss, gather_last, softmax_loss
from seqjax.tasks import IGNORE
from seqjax.tasks import recsys as R
from seqjax.tasks.runner import machine, parse, write_results

#: Sun et al. 2019, Table 2, ML-1m (100 popularity-sampled negatives); the finding: BERT4Rec beats SASRec,
#: GRU4Rec+ and the other baselines on every metric and dataset
PAPER = {"bert4rec": {"hr@10": 0.697, "ndcg@10": 0.482}}
FINDING = "the bidirectional Cloze-trained model beats the causal baselines (SASRec, GRU4Rec+) on HR and NDCG"

Model = Literal["bert4rec", "sasrec", "sasrec_bce", "gru4rec", "pop", "random"]
METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")


@dataclasses.dataclass
class Config:
    models: tuple[Model, ...] = ("bert4rec", "sasrec", "sasrec_bce", "gru4rec", "pop", "random")
    num_users: int = 1000
    num_items: int = 300
    clusters: int = 4
    lengths: tuple[int, ...] = (10, 30)  # lo,hi: history length drawn per user
    zipf: float = 1.0
    alpha: float = 0.6  # weight of the cluster Markov chain in each next-item draw
    beta: float = 0.25  # weight of the cluster taste (the rest: global popularity)
    swap: float = 0.0  # probability of swapping each adjacent pair (loosely ordered histories)
    max_len: int = 30
    d: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.1
    mask_prob: float = 0.2  # the Cloze proportion rho
    last_frac: float = 0.1  # rows masking only their last item
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    negatives: int = 100
    eval_every: int = 400
    seed: int = 0
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "bert4rec"  # the results folder
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(models=("bert4rec", "sasrec", "sasrec_bce", "gru4rec", "pop", "random"), num_users=24,
                 num_items=130, clusters=2, lengths=(4, 8), max_len=8, d=8, layers=1, heads=2, steps=2,
                 batch_size=4, eval_every=2),
    "paper": dict(num_users=6040, num_items=3416, clusters=20, lengths=(20, 200), max_len=200, steps=100_000,
                  batch_size=256, lr=1e-4, eval_every=5000),
}


@dataclasses.dataclass
class Data:
    train: list
    queries: dict  # split -> (history list, targets [users])
    candidates: dict  # split -> [users, 1 + negatives]
    counts: dict  # split -> popularity counts of what the model may see


def make_data(cfg: Config) -> Data:
    s = R.sessions(cfg.num_users, cfg.num_items, clusters=cfg.clusters, lengths=tuple(cfg.lengths), zipf=cfg.zipf,
                   alpha=cfg.alpha, beta=cfg.beta, swap=cfg.swap, seed=cfg.seed)
    train, valid, test = R.leave_one_out(s.histories)
    counts_all = R.popularity(s.histories, cfg.num_items)
    queries = {"valid": (train, valid), "test": ([np.append(h, v) for h, v in zip(train, valid)], test)}
    cands, counts = {}, {}
    for i, (split, (hist, target)) in enumerate(queries.items()):
        neg = R.sample_negatives(s.histories, cfg.num_items, num=cfg.negatives, counts=counts_all, seed=cfg.seed + 7 + i)
        cands[split] = np.concatenate([target[:, None], neg], 1)
        counts[split] = R.popularity(hist, cfg.num_items)
    return Data(train, queries, cands, counts)


def build(kind: str, cfg: Config):
    rngs = nnx.Rngs(cfg.seed)
    if kind == "gru4rec":
        return GRU4Rec(cfg.num_items, d=cfg.d, dropout=cfg.dropout, rngs=rngs)
    return Bert4Rec(cfg.num_items, cfg.max_len, d=cfg.d, layers=cfg.layers, heads=cfg.heads,
                    causal=kind != "bert4rec", dropout=cfg.dropout, rngs=rngs)


def batch(kind: str, data: Data, cfg: Config, rng: np.random.Generator):
    """``(inputs, targets, negatives)`` for one training step of ``kind``."""
    users = rng.integers(0, len(data.train), cfg.batch_size)
    seqs = [data.train[u] for u in users]
    if kind == "bert4rec":
        items, _ = R.pack(seqs, cfg.max_len, num_items=cfg.num_items)
        inputs, targets = R.cloze(items, cfg.mask_prob, num_items=cfg.num_items, rng=rng,
                                  last_only=rng.random(len(items)) < cfg.last_frac)
    else:
        items, _ = R.pack(seqs, cfg.max_len + 1, num_items=cfg.num_items)
        inputs, targets = items[:, :-1], np.where(items[:, 1:] == R.PAD, IGNORE, items[:, 1:])
    negatives = rng.integers(1, cfg.num_items + 1, targets.shape).astype(np.int32)
    return inputs, targets.astype(np.int32), negatives


def query(kind: str, hist: list, cfg: Config):
    return R.pack(hist, cfg.max_len, num_items=cfg.num_items, append_mask=kind == "bert4rec")


def evaluate(kind: str, model, data: Data, cfg: Config, score_fn, seed: int) -> dict:
    out = {}
    for split, (hist, _) in data.queries.items():
        cands = data.candidates[split]
        if kind == "pop":
            scores = data.counts[split][cands]
        elif kind == "random":
            scores = np.random.default_rng(seed).random(cands.shape)
        else:
            items, lens = query(kind, hist, cfg)
            scores = np.concatenate([np.asarray(score_fn(model, jnp.asarray(items[i:i + 512]), jnp.asarray(lens[i:i + 512]),
                                                         jnp.asarray(cands[i:i + 512]))) for i in range(0, len(items), 512)])
        out[split] = R.rank_metrics(R.ranks(scores, seed=seed))
    return out


def train_and_test(kind: str, data: Data, cfg: Config, log) -> list[dict]:
    if kind in ("pop", "random"):
        m = evaluate(kind, None, data, cfg, None, cfg.seed)
        return [{"kind": "eval", "model": kind, "step": 0, "split": s, **v} for s, v in m.items()]
    model = build(kind, cfg)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.steps // 20), max(cfg.steps, 2), cfg.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(5.0), optax.adamw(sched, weight_decay=cfg.weight_decay))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m, x, y, neg, key):
        logits = m.logits(m(x, dropout_key=key))
        return bce_loss(logits, y, neg) if kind == "sasrec_bce" else softmax_loss(logits, y)

    @nnx.jit
    def step(m, opt, x, y, neg, key):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x, y, neg, key)
        opt.update(m, grads)
        return loss

    @nnx.jit
    def score(m, items, lens, cands):
        logits = m.logits(gather_last(m(items), lens))
        return jnp.take_along_axis(logits, cands, axis=1)

    rng = np.random.default_rng(cfg.seed + 1)
    key = jax.random.PRNGKey(cfg.seed)
    rows, losses, t0 = [], [], time.time()
    for it in range(1, cfg.steps + 1):
        x, y, neg = batch(kind, data, cfg, rng)
        loss = float(step(model, opt, jnp.asarray(x), jnp.asarray(y), jnp.asarray(neg), jax.random.fold_in(key, it)))
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {it} ({kind})")
        losses.append(loss)
        if it % cfg.eval_every == 0 or it == cfg.steps:
            m = evaluate(kind, model, data, cfg, score, cfg.seed)
            rows += [{"kind": "eval", "model": kind, "step": it, "split": s, "loss": float(np.mean(losses[-100:])),
                      "seconds": round(time.time() - t0, 1), **v} for s, v in m.items()]
            log(f"{kind} step {it}: loss {np.mean(losses[-100:]):.3f} valid ndcg@10 {m['valid']['ndcg@10']:.3f} "
                f"hr@10 {m['valid']['hr@10']:.3f} ({time.time() - t0:.0f}s)")
    return rows


def best(rows: list[dict], model: str) -> dict:
    """The test row at the evaluation step with the best validation NDCG@10."""
    val = [r for r in rows if r["model"] == model and r["split"] == "valid"]
    step = max(val, key=lambda r: (r["ndcg@10"], r["step"]))["step"]
    return next(r for r in rows if r["model"] == model and r["split"] == "test" and r["step"] == step)


def tables(rows: list[dict], cfg: Config) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows if r["kind"] == "eval"))
    res = {m: best(rows, m) for m in models}
    causal = [m for m in models if m in ("sasrec", "sasrec_bce", "gru4rec")]
    out = ["| model | " + " | ".join(METRICS) + " | step | paper (ML-1m) HR@10 / NDCG@10 | finding |",
           "|---" * (len(METRICS) + 4) + "|"]
    for m in models:
        r = res[m]
        paper = PAPER.get(m)
        paper_s = f"{paper['hr@10']:.3f} / {paper['ndcg@10']:.3f}" if paper else "—"
        finding = "—"
        if m == "bert4rec" and causal:
            won = all(r[k] > res[c][k] for c in causal for k in ("hr@10", "ndcg@10"))
            finding = "met" if won else "missed"
        out.append(f"| {m} | " + " | ".join(f"{r[k]:.3f}" for k in METRICS) + f" | {r['step']} | {paper_s} | {finding} |")
    out += ["", f"Test split at the step with the best validation NDCG@10; {cfg.num_users} users, {cfg.num_items} items, "
            f"100 popularity-sampled negatives; chance HR@10 = {10 / (cfg.negatives + 1):.3f}. Finding: {FINDING}."]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for m in dict.fromkeys(r["model"] for r in rows):
        val = [r for r in rows if r["model"] == m and r["split"] == "valid"]
        if len(val) > 1:
            axes[0].plot([r["step"] for r in val], [r["ndcg@10"] for r in val], "o-", label=m)
        else:
            axes[0].axhline(val[0]["ndcg@10"], ls="--", lw=1, label=m, color="gray" if m == "random" else "k")
    axes[0].set(xlabel="step", ylabel="validation NDCG@10", title="training")
    axes[0].legend(fontsize=7)
    models = list(dict.fromkeys(r["model"] for r in rows))
    res = [best(rows, m) for m in models]
    x = np.arange(len(models))
    for j, k in enumerate(("hr@10", "ndcg@10")):
        axes[1].bar(x + 0.4 * j - 0.2, [r[k] for r in res], 0.4, label=k)
    axes[1].set_xticks(x, models, rotation=30, fontsize=7)
    axes[1].set(title="test (best validation step)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    if len(cfg.lengths) != 2 or not 3 <= cfg.lengths[0] <= cfg.lengths[1]:
        raise SystemExit(f"error: --lengths must be lo,hi with 3 <= lo <= hi, got {cfg.lengths}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "bert4rec", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "steps": cfg.steps, "d": cfg.d, "num_users": cfg.num_users,
            "num_items": cfg.num_items, "swap": cfg.swap, "paper": PAPER, "finding": FINDING,
            "command": " ".join(["python experiments/bert4rec.py", *argv])}
    data = make_data(cfg)
    rows = []
    for kind in cfg.models:
        rows += [dict(meta, **r) for r in train_and_test(kind, data, cfg, log)]
    header = f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}, {cfg.steps} steps\n\n"
    md = tables(rows, cfg)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
