"""LRCN (Donahue et al. 2015): a per-frame CNN feeding an LSTM, trained end to end, against the same CNN with no
recurrence, on moving digits: clip classification (digit, direction of the first motion) and description.

    python experiments/lrcn.py                       # cpu preset: LRCN and the single-frame baseline
    python experiments/lrcn.py --steps=3000 --n_frames=12
    python experiments/lrcn.py --preset=paper        # 64x64 frames, two digits, a larger model

Data (``seqjax.tasks.moving_digits``, ``turn=True``): one sklearn digit moving in a compass direction (8
classes) at one of 3 speeds, reflecting at the walls, turning to a new direction halfway through the clip; the
caption reads "digit 3 moves left then up". Train and test clips use disjoint source images; every training
step draws fresh clips. ``seqjax.models.lrcn.LRCN`` with ``recurrent=True`` (LRCN) and ``recurrent=False`` (the
single-frame baseline: step predictions from one frame each, the caption decoder conditioned on the frame-feature
average) are trained on the same loss: cross-entropy of every step's prediction for each head, plus the
teacher-forced caption cross-entropy. Metrics on held-out clips: clip accuracy (the average of the step
predictions) for digit and direction, and caption exact match (greedy decoding, every token right), beside
chance and the training-majority baselines.

Writes ``<out>/<name>/{records.jsonl, table.md, plot.png}`` (``name`` default ``lrcn``) afresh each run; every
record names the machine, the date, the seed and the paper's number.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax.models.lrcn import LRCN
from seqjax.tasks.moving_digits import moving_digits
from seqjax.tasks.runner import machine, parse, write_results

#: the paper's number (Donahue et al., TPAMI version, Table 1: UCF-101 split 1, RGB input) and claim
PAPER = {"lrcn": 71.1, "single_frame": 69.0,
         "claim": "LRCN (CNN + LSTM, averaged step predictions) beats the single-frame CNN baseline: UCF-101 RGB 71.1 % vs 69.0 %"}
MODELS = {"lrcn": True, "single_frame": False}  # name -> recurrent
HEADS = ("digit", "direction")


@dataclasses.dataclass
class Config:
    models: tuple[str, ...] = ("lrcn", "single_frame")
    n_frames: int = 8
    size: int = 32
    digit_size: int = 16
    n_digits: int = 1
    conv: tuple[int, ...] = (8, 16, 32)
    features: int = 64
    hidden: int = 64
    d_emb: int = 32
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    caption_weight: float = 1.0
    eval_size: int = 1000
    log_every: int = 50
    seed: int = 0
    out: str = "experiments/results"  # writes <out>/<name>/
    name: str = "lrcn"  # the results folder
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override


PRESETS = {
    "cpu": {},
    "tiny": dict(n_frames=4, size=24, conv=(4,), features=8, hidden=8, d_emb=4, steps=2, batch_size=4, eval_size=8,
                 log_every=1),
    "paper": dict(n_frames=16, size=64, n_digits=2, conv=(32, 64, 64, 64), features=256, hidden=256, d_emb=64,
                  steps=20_000, batch_size=64, eval_size=5000),
}


def clips(cfg: Config, n: int, split: str, seed: int) -> dict:
    return moving_digits(n, cfg.n_frames, size=cfg.size, n_digits=cfg.n_digits, digit_size=cfg.digit_size, split=split,
                         turn=True, seed=seed)


def build(cfg: Config, name: str, vocab: int) -> LRCN:
    return LRCN((10, 8), vocab=vocab, size=cfg.size, conv=cfg.conv, features=cfg.features, hidden=cfg.hidden,
                d_emb=cfg.d_emb, recurrent=MODELS[name], rngs=nnx.Rngs(cfg.seed))


def _tgt_in(caption):
    return np.concatenate([np.ones_like(caption[:, :1]), caption[:, :-1]], 1)  # <bos> = 1, then the caption shifted


def train_and_test(name: str, cfg: Config, test: dict, log) -> list[dict]:
    vocab = len(test["caption_vocab"])
    model = build(cfg, name, vocab)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps, 0.05)))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m, x, labels, tgt_in, caption):
        steps = m(x)
        cls = sum(optax.softmax_cross_entropy_with_integer_labels(z, y[:, None]).mean() for z, y in zip(steps, labels))
        cap = optax.softmax_cross_entropy_with_integer_labels(m.caption_logits(x, tgt_in), caption).mean()
        return cls / len(steps) + cfg.caption_weight * cap, (cls / len(steps), cap)

    @nnx.jit
    def step(m, opt, x, labels, tgt_in, caption):
        (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m, x, labels, tgt_in, caption)
        opt.update(m, grads)
        return loss, parts

    @nnx.jit
    def predict(m, x):
        clip = m.clip_logits(x)
        toks, _ = m.generate(x, test["caption"].shape[1], 1)
        return tuple(jnp.argmax(z, -1) for z in clip), toks

    rows, t0, recent = [], time.time(), []
    for it in range(1, cfg.steps + 1):
        b = clips(cfg, cfg.batch_size, "train", cfg.seed * 1_000_003 + it)
        loss, (cls, cap) = step(model, opt, jnp.asarray(b["frames"]), tuple(jnp.asarray(b[h]) for h in HEADS),
                                jnp.asarray(_tgt_in(b["caption"])), jnp.asarray(b["caption"]))
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"non-finite loss at step {it} ({name})")
        recent.append((float(loss), float(cls), float(cap)))
        if it % cfg.log_every == 0 or it == cfg.steps:
            m = np.mean(recent, 0)
            rows.append({"kind": "train", "model": name, "step": it, "loss": m[0], "class_loss": m[1], "caption_loss": m[2],
                         "seconds": round(time.time() - t0, 1)})
            log(f"{name} step {it}: loss {m[0]:.3f} (classes {m[1]:.3f}, caption {m[2]:.3f}), {rows[-1]['seconds']:.0f}s")
            recent = []
    preds = {h: [] for h in HEADS}
    toks = []
    for i in range(0, cfg.eval_size, 500):
        (pd, pr), tk = predict(model, jnp.asarray(test["frames"][i:i + 500]))
        preds["digit"].append(np.asarray(pd))
        preds["direction"].append(np.asarray(pr))
        toks.append(np.asarray(tk))
    toks = np.concatenate(toks)
    res = {f"{h}_acc": float((np.concatenate(preds[h]) == test[h]).mean()) for h in HEADS}
    res["caption_exact"] = float(np.all(toks == test["caption"], 1).mean())
    res["caption_token_acc"] = float((toks == test["caption"]).mean())
    rows.append({"kind": "test", "model": name, **res, "seconds": round(time.time() - t0, 1), "paper": PAPER.get(name)})
    log(f"{name}: loss {rows[-2]['loss']:.3f} ({rows[-1]['seconds']:.0f}s) "
        + " ".join(f"{k}={v:.3f}" for k, v in res.items()))
    return rows


def baselines(cfg: Config, test: dict) -> list[dict]:
    """Chance and the training-majority answer (class and whole caption), scored on the test clips."""
    train = clips(cfg, max(cfg.eval_size, 100), "train", cfg.seed + 777)
    n_dirs = len(test["direction_names"])
    chance = {"digit_acc": 0.1, "direction_acc": 1 / n_dirs, "caption_exact": 1 / (10 * n_dirs * (n_dirs - 1))}
    major = {f"{h}_acc": float((test[h] == np.bincount(train[h]).argmax()).mean()) for h in HEADS}
    caps, counts = np.unique(train["caption"], axis=0, return_counts=True)
    major["caption_exact"] = float(np.all(test["caption"] == caps[counts.argmax()], 1).mean())
    return [{"kind": "test", "model": "chance", **chance}, {"kind": "test", "model": "majority", **major}]


def tables(rows: list[dict], cfg: Config) -> str:
    tests = {r["model"]: r for r in rows if r["kind"] == "test"}
    out = [f"**Held-out moving digits** ({cfg.eval_size} clips of {cfg.n_frames} frames, {cfg.size}×{cfg.size}, "
           f"{cfg.n_digits} digit(s), a turn at frame {cfg.n_frames // 2}; clip accuracy = average of step predictions)", "",
           "| model | digit clip acc | direction clip acc | caption exact match |", "|---|---|---|---|"]
    for name, r in tests.items():
        out.append(f"| {name} | {r['digit_acc']:.3f} | {r['direction_acc']:.3f} | {r['caption_exact']:.3f} |")
    if "lrcn" in tests and "single_frame" in tests:
        a, b = tests["lrcn"], tests["single_frame"]
        out += ["", "| claim | paper (UCF-101 RGB, clip acc) | ours (direction clip acc; caption exact) | met |", "|---|---|---|---|",
                f"| LRCN beats the single-frame baseline | {PAPER['lrcn']} % vs {PAPER['single_frame']} % | "
                f"{a['direction_acc']:.3f} vs {b['direction_acc']:.3f}; {a['caption_exact']:.3f} vs {b['caption_exact']:.3f} | "
                f"{'met' if a['direction_acc'] > b['direction_acc'] and a['caption_exact'] > b['caption_exact'] else 'missed'} |"]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name in dict.fromkeys(r["model"] for r in rows if r["kind"] == "train"):
        sel = [r for r in rows if r["kind"] == "train" and r["model"] == name]
        ax0.plot([r["step"] for r in sel], [r["loss"] for r in sel], label=name)
    ax0.set(yscale="log", xlabel="step", ylabel="training loss", title="loss (classes + caption)")
    ax0.legend(fontsize=7)
    tests = [r for r in rows if r["kind"] == "test"]
    metrics = ("digit_acc", "direction_acc", "caption_exact")
    width = 0.8 / max(len(tests), 1)
    for i, r in enumerate(tests):
        ax1.bar(np.arange(len(metrics)) + i * width, [r[m] for m in metrics], width, label=r["model"])
    ax1.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, ["digit", "direction", "caption EM"])
    ax1.set(ylim=(0, 1.02), title="held-out clips")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(Config, PRESETS, argv)
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"error: --models must name some of {tuple(MODELS)}, got {unknown}")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    meta = {"system": "lrcn", "seed": cfg.seed, "machine": machine(), "date": datetime.date.today().isoformat(),
            "preset": cfg.preset, "steps": cfg.steps, "n_frames": cfg.n_frames, "size": cfg.size, "n_digits": cfg.n_digits,
            "hidden": cfg.hidden, "paper_claim": PAPER["claim"], "command": " ".join(["python experiments/lrcn.py", *argv])}
    test = clips(cfg, cfg.eval_size, "test", cfg.seed + 12_345)
    rows = []
    for name in cfg.models:
        rows += [dict(meta, **r) for r in train_and_test(name, cfg, test, log)]
    rows += [dict(meta, **r) for r in baselines(cfg, test)]
    header = f"`{meta['command']}` — {meta['machine']}, seed {cfg.seed}, preset {cfg.preset}, {cfg.steps} steps\n\n"
    md = tables(rows, cfg)
    write_results(os.path.join(cfg.out, cfg.name), rows, header + md + "\n", lambda png: plot(rows, png))
    print(header + md)
    return rows


if __name__ == "__main__":
    main()
