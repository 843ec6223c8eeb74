"""Passkey retrieval, state collapse and state capacity (Chen et al. 2024, "Stuffed Mamba").

    python experiments/passkey.py                                      # d_state 16; every mitigation
    python experiments/passkey.py --name=passkey_capacity --d_states=4,8,16,32,64 --mitigation=window
    python experiments/passkey.py --mitigation=forget --forget_shift=0.25
    python experiments/passkey.py --preset=paper

For each state size in ``d_states`` a Mamba-2 LM (head dim ``head_dim``; state ``heads × d_state × head_dim``
per layer) is trained at ``train_len`` on the tokenizer-free passkey task (``seqjax.tasks.passkey``), then
evaluated at ``{1, 2, 4, 8, 16} × train_len`` over 10 needle depths: exact match of all five digits (teacher
forced, which equals greedy decoding's exact match). The same trained weights are evaluated as they are and
with each training-free mitigation (inference only):

- ``forget``: ``dt_bias + forget_shift`` in every head (``Δ`` larger by about ``e^shift``: faster decay *and* a
  larger write ``Δ B x``), the shift the first version of this study used;
- ``decay_cap``: decay only (``A ← λ_h A``, so ``a ← a^λ_h``; the write is unchanged), and only in the heads
  whose memory ``1 / (softplus(dt_bias_h) |A_h|)`` exceeds ``train_len`` tokens, scaled down to ``train_len``;
- ``state_norm``: after each update a head's state is rescaled to norm ``τ_h`` when above it, ``τ_h`` the
  largest norm that head reached on training-length passkey sequences;
- ``window``: the sliding window ``train_len`` realised as the state difference
  ``S_t − (Π a) S_{t−train_len}`` (``seqjax.mixers.mamba2.mamba2_window``).

``recent`` scores only the depths whose needle lies within the last ``train_len`` tokens: state collapse is a
failure there too, and it is what a forgetting mitigation can restore (older needles are gone by design).
Capacity: the longest evaluated length up to which exact match stays >= ``capacity_threshold`` (the paper's
95 %), per state size, fitted as ``log2 capacity = a + b · d_state`` (exponential growth, the paper's claim).
The state-norm probe reads every recurrent state's norm after each ``probe_every`` tokens of filler.

Writes ``experiments/results/<name>/{records.jsonl, table.md, plot.png}`` afresh each run (``--out=<file>.jsonl``
writes ``<file>.{jsonl,md,png}`` instead); every record names the machine, the date, the seed and the paper's
number.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax.mixers.mamba2 import Mamba2
from seqjax.models.lm import LM, LMConfig
from seqjax.tasks import IGNORE, passkey
from seqjax.tasks.runner import RunConfig, machine, masked_xent, parse

#: the paper's numbers (Chen et al. 2024, abstract and §5)
PAPER = ("Mamba-2 collapses beyond its training length when the state is large for it; the training-free "
         "mitigations run Mamba-2 past 1M tokens without collapse; the longest context with 5-digit passkey "
         "retrieval grows exponentially with state size (a 370M model near-perfect at 256K after training long)")

Mitigation = Literal["forget", "decay_cap", "state_norm", "window"]


@dataclasses.dataclass
class Config(RunConfig):
    model: str = "mamba2"
    name: str = "passkey"  # results go to experiments/results/<name>/
    train_len: int = 64
    d_states: tuple[int, ...] = (4, 16, 64)  # one model per state size (the capacity curve)
    head_dim: int = 16
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    depths: int = 10
    eval_per_depth: int = 8
    capacity_threshold: float = 0.95
    probe_len: int = 1024
    probe_every: int = 64
    mitigation: tuple[Mitigation, ...] = ("forget", "decay_cap", "state_norm", "window")
    forget_shift: float = 1.0
    warm_len: int = 0  # with warm_steps: first train at this shorter length, then `steps` at train_len
    warm_steps: int = 0  #   (the paper's continual pre-training on longer sequences)


PRESETS = {
    "cpu": dict(steps=1500, batch_size=32, d_model=64, num_layers=2, lr=3e-3, warmup=100, eval_every=500, d_states=(16,)),
    "tiny": dict(steps=2, batch_size=4, d_model=16, num_layers=1, eval_every=2, train_len=32, multiples=(1, 2),
                 d_states=(4,), head_dim=8, depths=2, eval_per_depth=2, probe_len=64, probe_every=32, progress=False),
    "paper": dict(steps=20000, batch_size=64, d_model=256, num_layers=4, train_len=1024, d_states=(16, 32, 64, 128),
                  head_dim=64, eval_every=2000, eval_per_depth=20, probe_len=65536, probe_every=1024),
}


def exact_match(preds, batch) -> np.ndarray:
    """Per example: all five digits right."""
    mask = batch.targets != IGNORE
    return np.where(mask, preds == batch.targets, True).all(axis=1)


def build(cfg: Config, d_state: int):
    lm = LM(LMConfig(vocab_size=passkey.VOCAB, d_model=cfg.d_model, num_layers=cfg.num_layers, pattern=(cfg.model,),
                     num_heads=cfg.num_heads, scan_layers=False,
                     mixer_kwargs={"mamba2": {"d_state": d_state, "head_dim": cfg.head_dim}}),
            rngs=nnx.Rngs(cfg.seed))
    return lm, [m for _, m in nnx.iter_graph(lm) if isinstance(m, Mamba2)]


def train(lm, cfg: Config, log) -> list[dict]:
    total = cfg.warm_steps + cfg.steps
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.warmup), max(total, cfg.warmup + 1), cfg.lr * 0.01)
    opt = nnx.Optimizer(lm, optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(sched, weight_decay=cfg.weight_decay)),
                        wrt=nnx.Param)

    @nnx.jit
    def step(lm, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: masked_xent(m(x)[0], y))(lm)
        opt.update(lm, grads)
        return loss

    held = passkey.passkey(64, cfg.train_len, seed=10_000 + cfg.seed)
    total = cfg.warm_steps + cfg.steps
    records = []
    for s in range(1, total + 1):
        length = cfg.warm_len if s <= cfg.warm_steps else cfg.train_len
        b = passkey.passkey(cfg.batch_size, length, seed=cfg.seed * 1_000_003 + s)
        loss = float(step(lm, opt, jnp.asarray(b.inputs), jnp.asarray(b.targets)))
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {s}")
        if s % cfg.eval_every == 0 or s in (cfg.warm_steps, total):
            acc = float(exact_match(np.asarray(predict(lm, jnp.asarray(held.inputs))), held).mean())
            records.append({"kind": "train", "step": s, "length": length, "loss": loss, "exact": acc})
            log(f"step {s} (length {length}) loss {loss:.4f} exact@train_len {acc:.3f}")
    return records


@nnx.jit
def predict(lm, x):
    return jnp.argmax(lm(x)[0], -1)


def eval_sets(cfg: Config):
    """``{length: (batch, depth per example)}``: ``depths × eval_per_depth`` sequences per length."""
    out = {}
    for mult in cfg.multiples:
        t = cfg.train_len * mult
        parts = [passkey.passkey(cfg.eval_per_depth, t, depth=(i + 0.5) / cfg.depths, seed=30_000 + i) for i in range(cfg.depths)]
        inputs = np.concatenate([p.inputs for p in parts])
        targets = np.concatenate([p.targets for p in parts])
        depth = np.repeat([(i + 0.5) / cfg.depths for i in range(cfg.depths)], cfg.eval_per_depth)
        out[t] = (passkey.TaskBatch(inputs, targets, num_classes=10, vocab_size=passkey.VOCAB), depth)
    return out


def needle_distance(batch) -> np.ndarray:
    """Tokens from the needle's ``PASS`` to the ``QUERY``."""
    return np.array([int(np.flatnonzero(x == passkey.QUERY)[0]) - int(np.flatnonzero(x == passkey.PASS)[0]) for x in batch.inputs])


def set_mitigation(layers, cfg: Config, mitigation: str, base: dict, tau) -> dict:
    """Put the weights back to ``base``, then apply ``mitigation`` (inference only). Returns what it set."""
    for m, (dt_bias, a_log) in zip(layers, base["params"]):
        m.dt_bias[...], m.A_log[...] = dt_bias, a_log
        m.window = None
        m.state_norm = nnx.Variable(jnp.full((m.nheads,), jnp.inf))  # the recurrent form for every variant
    info = {}
    if mitigation == "forget":
        for m in layers:
            m.dt_bias[...] = m.dt_bias[...] + cfg.forget_shift
        info["forget_shift"] = cfg.forget_shift
    elif mitigation == "decay_cap":
        scaled = 0
        for m in layers:
            lam = jnp.maximum(1.0, jnp.asarray(horizons(m)) / cfg.train_len)
            m.A_log[...] = m.A_log[...] + jnp.log(lam)
            scaled += int(jnp.sum(lam > 1))
        info["heads_scaled"] = scaled
    elif mitigation == "state_norm":
        for m, t in zip(layers, tau):
            m.state_norm[...] = t
    elif mitigation == "window":
        for m in layers:
            m.state_norm = None
            m.window = cfg.train_len
        info["window"] = cfg.train_len
    elif mitigation != "none":
        raise ValueError(f"--mitigation: unknown {mitigation!r}")
    return info


def horizons(m: Mamba2) -> np.ndarray:
    """Per head, the memory ``1 / (softplus(dt_bias) |A|)`` in tokens (``a = e^{−1}`` after that many tokens
    at the bias's step size; the input-dependent part of ``Δ`` is left out)."""
    return np.asarray(1.0 / (jax.nn.softplus(m.dt_bias[...]) * jnp.exp(m.A_log[...])))


def calibrate_state_norm(lm, layers, cfg: Config):
    """Per layer, per head: the largest state norm reached over training-length passkey sequences."""
    b = passkey.passkey(32, cfg.train_len, seed=50_000 + cfg.seed)
    cache = lm.init_cache(len(b.inputs), cfg.train_len)
    taus = [jnp.zeros((m.nheads,)) for m in layers]
    step = nnx.jit(lambda m, x, c: m(x, cache=c)[1])
    for s in range(cfg.train_len):  # token by token: the largest norm along the way, not only the last
        cache = step(lm, jnp.asarray(b.inputs[:, s : s + 1]), cache)
        shape = (layers[0].nheads, layers[0].d_state, layers[0].head_dim)
        states = [x for x in jax.tree.leaves(cache) if x.ndim == 4 and x.shape[1:] == shape]
        taus = [jnp.maximum(t, jnp.max(jnp.sqrt(jnp.sum(jnp.square(st), axis=(2, 3))), axis=0)) for t, st in zip(taus, states)]
    return taus


def state_norms(lm, cfg: Config) -> list[dict]:
    """Norm of every recurrent state in the decode cache along a long filler sequence."""
    toks = np.tile(passkey.FILLER, -(-cfg.probe_len // len(passkey.FILLER)))[: cfg.probe_len][None].astype(np.int32)
    cache = lm.init_cache(1, cfg.probe_len)
    step = nnx.jit(lambda m, x, c: m(x, cache=c)[1])
    rows = []
    for s in range(0, cfg.probe_len, cfg.probe_every):
        cache = step(lm, jnp.asarray(toks[:, s : s + cfg.probe_every]), cache)
        leaves = [x for x in jax.tree.leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 3]
        norm = float(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves) ** 0.5)
        rows.append({"kind": "state_norm", "position": s + cfg.probe_every, "norm": norm})
    return rows


def capacity(rows, d_state, mitigation, threshold) -> int:
    """The longest evaluated length up to which every length scores >= threshold (0 if none)."""
    best = 0
    for t in sorted({r["length"] for r in rows if r["kind"] == "passkey"}):
        sel = [r for r in rows if r["kind"] == "passkey" and r["d_state"] == d_state and r["mitigation"] == mitigation and r["length"] == t]
        if not sel or np.mean([r["exact"] for r in sel]) < threshold:
            break
        best = t
    return best


def fit_capacity(caps: dict) -> dict:
    """``log2 capacity = a + b · d_state`` and ``capacity = c + k · d_state`` by least squares (caps > 0)."""
    pts = [(n, c) for n, c in caps.items() if c > 0]
    if len(pts) < 2:
        return {}
    n, c = np.array(pts, float).T
    b, a = np.polyfit(n, np.log2(c), 1)
    k, c0 = np.polyfit(n, c, 1)
    return {"log2_slope": float(b), "log2_intercept": float(a), "lin_slope": float(k), "lin_intercept": float(c0)}


def main(argv=None):
    cfg = parse(Config, PRESETS, argv)
    if cfg.warm_steps < 0 or (cfg.warm_steps > 0) != (cfg.warm_len > 0):
        raise SystemExit(f"error: --warm_len and --warm_steps go together (both > 0, or both 0), got {cfg.warm_len} and {cfg.warm_steps}")
    if cfg.out:
        stem = os.path.splitext(cfg.out)[0]
        paths = {"records": cfg.out, "table": stem + ".md", "plot": stem + ".png"}
    else:
        d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", cfg.name)
        paths = {"records": os.path.join(d, "records.jsonl"), "table": os.path.join(d, "table.md"), "plot": os.path.join(d, "plot.png")}
    os.makedirs(os.path.dirname(os.path.abspath(paths["records"])), exist_ok=True)
    open(paths["records"], "w").close()  # afresh: one run, one records file
    meta = {"machine": machine(), "date": datetime.date.today().isoformat(), "seed": cfg.seed, "model": cfg.model,
            "train_len": cfg.train_len, "steps": cfg.steps, "warm_len": cfg.warm_len, "warm_steps": cfg.warm_steps, "paper": PAPER}
    log = print if cfg.progress else (lambda *_: None)
    mitigations = list(dict.fromkeys(["none", *cfg.mitigation]))
    sets = eval_sets(cfg)
    rows = []
    for d_state in cfg.d_states:
        lm, layers = build(cfg, d_state)
        if not layers and mitigations != ["none"]:
            raise ValueError(f"--mitigation needs Mamba-2 layers; --model={cfg.model} has none")
        state_size = sum(m.nheads * m.d_state * m.head_dim for m in layers) // max(1, len(layers))
        tag = dict(meta, d_state=d_state, state_size=state_size)
        part = [dict(r, **tag, mitigation="none") for r in train(lm, cfg, lambda s: log(f"[d_state {d_state}] {s}"))]
        base = {"params": [(m.dt_bias[...], m.A_log[...]) for m in layers]}
        tau = calibrate_state_norm(lm, layers, cfg) if "state_norm" in mitigations else None
        for mitigation in mitigations:
            info = set_mitigation(layers, cfg, mitigation, base, tau)
            for t, (b, depth) in sets.items():
                ok = exact_match(np.asarray(predict(lm, jnp.asarray(b.inputs))), b)
                recent = needle_distance(b) <= cfg.train_len
                for dep in sorted(set(depth)):
                    sel = depth == dep
                    part.append(dict(tag, kind="passkey", mitigation=mitigation, length=t, depth=float(dep),
                                     exact=float(ok[sel].mean()), recent=bool(recent[sel].all()), **info))
                log(f"[d_state {d_state}] {mitigation:10s} length {t:5d}: exact {ok.mean():.3f}"
                    f" recent {ok[recent].mean() if recent.any() else float('nan'):.3f}")
            if mitigation in ("none", "forget", "decay_cap"):
                part += [dict(tag, kind="horizon", mitigation=mitigation, layer=i, head=h, tokens=float(v), **info)
                         for i, m in enumerate(layers) for h, v in enumerate(horizons(m))]
            if mitigation != "window" and cfg.model == "mamba2":
                part += [dict(r, **tag, mitigation=mitigation, **info) for r in state_norms(lm, cfg)]
        rows += part
        with open(paths["records"], "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        write_table(rows, cfg, paths["table"])
        plot(rows, cfg, paths["plot"])
    return rows


def summary(rows, cfg: Config):
    lengths = sorted({r["length"] for r in rows if r["kind"] == "passkey"})
    out = []
    for n in dict.fromkeys(r["d_state"] for r in rows):
        for m in dict.fromkeys(r["mitigation"] for r in rows if r["kind"] == "passkey"):
            sel = [r for r in rows if r["kind"] == "passkey" and r["d_state"] == n and r["mitigation"] == m]
            acc = [float(np.mean([r["exact"] for r in sel if r["length"] == t])) for t in lengths]
            rec = [r["exact"] for r in sel if r["recent"] and r["length"] > cfg.train_len]
            out.append((n, sel[0]["state_size"], m, acc, float(np.mean(rec)) if rec else float("nan"),
                        capacity(rows, n, m, cfg.capacity_threshold)))
    return lengths, out


def write_table(rows, cfg: Config, path):
    lengths, summ = summary(rows, cfg)
    r0 = rows[0]
    warm = f"{cfg.warm_steps} steps at {cfg.warm_len}, then " if cfg.warm_steps else ""
    lines = [f"Passkey exact match, Mamba-2 trained {warm}at {cfg.train_len} for {cfg.steps} steps ({cfg.num_layers} layers, "
             f"d_model {cfg.d_model}, head_dim {cfg.head_dim}), {cfg.depths} depths × {cfg.eval_per_depth} per length; "
             f"{r0['machine']}, seed {cfg.seed}, {r0['date']}. `recent`: needles within the last {cfg.train_len} tokens, "
             f"lengths > {cfg.train_len}. Capacity: longest length with exact >= {cfg.capacity_threshold:.2f} at it and below.",
             "", "| d_state | state / layer | mitigation | " + " | ".join(str(t) for t in lengths) + " | recent | capacity |",
             "|---|---|---|" + "---|" * len(lengths) + "---|---|"]
    for n, size, m, acc, rec, cap in summ:
        lines.append(f"| {n} | {size} | {m} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {rec:.3f} | {cap} |")
    lines.append("| – | – | chance (5 digits) | " + " | ".join("0.000" for _ in lengths) + " | 0.000 | – |")
    hz = [r for r in rows if r["kind"] == "horizon"]
    if hz:
        lines += ["", "Per-head memory 1 / (softplus(dt_bias) |A|) in tokens (median; heads above the training length):"]
        for n in dict.fromkeys(r["d_state"] for r in hz):
            parts = []
            for m in dict.fromkeys(r["mitigation"] for r in hz):
                v = np.array([r["tokens"] for r in hz if r["d_state"] == n and r["mitigation"] == m])
                parts.append(f"{m} {np.median(v):.1f} ({int(np.sum(v > cfg.train_len))} of {len(v)} above {cfg.train_len})")
            lines.append(f"- d_state {n}: " + "; ".join(parts))
    caps = {n: cap for n, _, m, _, _, cap in summ if m == "none"}
    fit = fit_capacity(caps)
    lines += ["", "Capacity vs state size (no mitigation): " + ", ".join(f"d_state {n}: {c}" for n, c in caps.items())
              + (f"; fit log2 capacity = {fit['log2_intercept']:.2f} + {fit['log2_slope']:.3f} · d_state" if fit else ""),
              "", f"Paper: {PAPER}."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot(rows, cfg: Config, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, summ = summary(rows, cfg)
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.4))
    for n, _, m, acc, _, _ in summ:
        a1.plot(lengths, acc, "o-" if m == "none" else ".--", label=f"N={n} {m}")
    a1.axvline(cfg.train_len, color="gray", lw=0.8)
    a1.set_xscale("log", base=2)
    a1.set(xlabel="context length", ylabel="passkey exact match", ylim=(-0.05, 1.05), title="collapse and mitigations")
    a1.legend(fontsize=6, ncol=2)
    for n in dict.fromkeys(r["d_state"] for r in rows):
        for m in ("none", "state_norm"):
            pr = [r for r in rows if r["kind"] == "state_norm" and r["d_state"] == n and r["mitigation"] == m]
            if pr:
                a2.plot([r["position"] for r in pr], [r["norm"] for r in pr], label=f"N={n} {m}")
    a2.axvline(cfg.train_len, color="gray", lw=0.8)
    a2.set(xlabel="position (filler)", ylabel="state norm", title="state norm probe")
    a2.legend(fontsize=6)
    caps = {n: cap for n, _, m, _, _, cap in summ if m == "none"}
    learned = {n: c for n, c in caps.items() if c > 0}
    a3.plot(list(learned), list(learned.values()), "o-", label="measured (none)")
    failed = [n for n, c in caps.items() if c == 0]
    if failed:  # below the threshold at the training length itself: the model did not learn the task
        a3.plot(failed, [cfg.train_len / 2] * len(failed), "x", color="red", label=f"not learned at {cfg.train_len}")
    fit = fit_capacity(caps)
    if fit:
        xs = np.linspace(min(caps), max(caps), 50)
        a3.plot(xs, 2 ** (fit["log2_intercept"] + fit["log2_slope"] * xs), "--", label="fit 2^(a + b N)")
    a3.set_yscale("log", base=2)
    a3.set(xlabel="d_state N", ylabel=f"capacity (exact >= {cfg.capacity_threshold:.2f})", title="capacity vs state size")
    a3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
