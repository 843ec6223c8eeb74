"""One training loop for the synthetic-task experiments (``experiments/<task>.py``).

A task is a :class:`TaskSpec` (fresh training batches by step, fixed evaluation sets, a metric); a model
is any name the LM's layer pattern accepts (``"attention"``, a registered mixer such as
``"deltanet_negeig"``) or a nonlinear RNN cell (``"lstm"``, ``"slstm"``, ``"gru"``, ``"rnn_tanh"``). The loop
trains with AdamW (warmup + cosine, global-norm clipping), evaluates every ``eval_every`` steps, shows a
progress bar, and appends one JSON line per evaluation to ``out``:

``{"task", "model", "seed", "step", "split", <metric>: value, ...}``

Configs are dataclasses parsed by :func:`parse` (``seqjax.cli``, tyro: ``--help``, ``--key=value``
overrides, errors that name the option); each script has a CPU preset (the default), a ``tiny`` one (what the
tests run) and the paper's (``--preset=paper``), each a dict of field values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seqjax import cli as cli_lib
from seqjax.attention.ngram import NgramHead
from seqjax.models.lm import LM, LMConfig
from seqjax.rnn.wrappers import StackedRNN
from seqjax.tasks import IGNORE, TaskBatch
from seqjax.train.noise import gradient_noise

RNN_MODELS = ("lstm", "slstm", "gru", "rnn_tanh", "rnn_relu")

#: named layer compositions: model name -> (the LM's layer pattern, per-layer options)
HYBRIDS = {
    # Based (Arora et al. 2024) as zoology's 2-layer MQAR model alternates it: a local mixer, then Based's linear
    # attention (2nd-order Taylor feature map, feature dim 16, one head; the JRT layer with no prefix). The local
    # mixer here is sliding-window softmax attention over 3 tokens, where zoology's Based has a short convolution.
    "based": (("swa", "jrt"), {"swa": {"window": 3}, "jrt": {"prefix_len": 0, "feature_dim": 16, "num_heads": 1}}),
}


@dataclasses.dataclass
class RunConfig:
    model: str = "attention"  # layer pattern, HYBRIDS composition (based) or RNN cell (lstm, gru); "<m>+ngram<n>": n-gram head
    d_model: int = 64  # model width
    num_layers: int = 2  # layers (RNN models: stacked RNN layers)
    num_heads: int = 4  # attention heads (LM models)
    steps: int = 1000  # training steps
    batch_size: int = 64  # sequences per step
    lr: float = 1e-3  # peak learning rate (AdamW, linear warmup, then --schedule)
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine decay to lr / 100 at --steps, or constant
    weight_decay: float = 0.0  # AdamW weight decay
    warmup: int = 100  # warmup steps
    clip: float = 1.0  # global-norm gradient clipping
    seed: int = 0  # initialisation and training-data seed
    eval_every: int = 250  # steps between evaluations
    out: str = ""  # append one JSON line per evaluation to this file ("" = none)
    preset: str = "cpu"  # cpu | tiny | paper: the defaults that the other options override
    progress: bool = True  # show a progress bar
    prefix_len: int = 0  # model "jrt": tokens read non-causally at the start of each sequence (JRT-RNN)
    embedding: str = "standard"  # LM models: "standard" or "lexinvariant" (a fresh random table per sequence)
    grad_noise: float = 0.0  # eta of annealed gradient noise, variance eta / (1 + t) ** grad_noise_gamma; 0 = off
    grad_noise_gamma: float = 0.55


@dataclasses.dataclass
class TaskSpec:
    name: str
    vocab_size: int
    #: ``train(step, batch_size, seed) -> TaskBatch``; fresh data per step, deterministic
    train: Callable[[int, int, int], TaskBatch]
    #: ``evals() -> {split: TaskBatch}``
    evals: Callable[[], dict]
    #: ``metric(predictions [n, T], batch) -> {name: value}``
    metric: Callable[[np.ndarray, TaskBatch], dict]


# ----------------------------------------------------------------------------- models


class RNNLM(nnx.Module):
    """Embedding → stacked nonlinear RNN (``seqjax.rnn``) → linear head."""

    def __init__(self, kind: str, vocab_size: int, d_model: int, num_layers: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.rnn = StackedRNN(kind, d_model, d_model, num_layers, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        y, _ = self.rnn(self.embed(tokens))
        return self.head(y)


class _LMAdapter(nnx.Module):
    def __init__(self, lm):
        self.lm = lm

    def __call__(self, tokens):
        return self.lm(tokens)[0]


class NgramLM(nnx.Module):
    """A model plus an n-gram head at its output (Akyürek et al. 2024): the head averages the
    embeddings of the tokens that followed earlier occurrences of the current n-gram
    (``seqjax.attention.ngram.NgramHead`` with ``shift=1``), and its projection is added to the logits.
    """

    def __init__(self, base, vocab_size: int, d_model: int, ngram: int, *, rngs: nnx.Rngs):
        self.base = base
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.head = NgramHead(d_model, ngram=ngram, shift=1, rngs=rngs)
        self.out = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        return self.base(tokens) + self.out(self.head(self.embed(tokens), tokens))


def build_model(cfg: RunConfig, vocab_size: int, *, rngs: nnx.Rngs):
    """``tokens [b, t] -> logits [b, t, vocab]`` for ``cfg.model``; a ``+ngram<n>`` suffix (e.g.
    ``"mamba2+ngram2"``) adds an n-gram head of order ``n``."""
    if "+ngram" in cfg.model:
        base, n = cfg.model.split("+ngram")
        inner = build_model(dataclasses.replace(cfg, model=base), vocab_size, rngs=rngs)
        return NgramLM(inner, vocab_size, cfg.d_model, int(n or 1), rngs=rngs)
    if cfg.model in RNN_MODELS:
        return RNNLM(cfg.model, vocab_size, cfg.d_model, cfg.num_layers, rngs=rngs)
    return _LMAdapter(LM(lm_config(cfg, vocab_size), rngs=rngs))


def lm_config(cfg: RunConfig, vocab_size: int) -> LMConfig:
    """The LM of a layer-pattern model or a :data:`HYBRIDS` composition (its pattern repeated to ``num_layers``)."""
    pattern, kwargs = HYBRIDS.get(cfg.model, ((cfg.model,), {"jrt": {"prefix_len": cfg.prefix_len}} if cfg.model == "jrt" else {}))
    return LMConfig(vocab_size=vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers, pattern=pattern,
                    num_heads=cfg.num_heads, scan_layers=False, embedding=cfg.embedding, mixer_kwargs=kwargs)


def state_size(cfg: RunConfig, vocab_size: int, seq_len: int) -> int | None:
    """Numbers one sequence carries to decode past ``seq_len`` tokens (zoology's "state size"): every array of every
    layer's decode cache — attention's KV cache (``2 d T`` floats, plus ``2 T + 3`` positions and segment ids),
    a sliding window's ring buffer (the same over ``window`` slots), recurrent states, short-conv states.
    ``None`` for the nonlinear RNNs and n-gram heads."""
    if cfg.model in RNN_MODELS or "+ngram" in cfg.model:
        return None
    lm = LM(lm_config(cfg, vocab_size), rngs=nnx.Rngs(0))
    cache = jax.eval_shape(lambda: lm.init_cache(1, seq_len))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves((cache.blocks, cache.tail))))


# ----------------------------------------------------------------------------- training


def masked_xent(logits, targets):
    mask = targets != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


@nnx.jit
def train_step(model, opt, x, y):
    """One optimiser step of ``model`` on the masked cross-entropy of ``tokens x -> labels y``; returns the loss."""
    loss, grads = nnx.value_and_grad(lambda m: masked_xent(m(x), y))(model)
    opt.update(model, grads)
    return loss


def learning_rate(cfg: RunConfig) -> optax.Schedule:
    """Step -> learning rate: linear warmup from 0 to ``cfg.lr`` over ``cfg.warmup`` steps, then cosine decay to
    ``cfg.lr / 100`` at ``cfg.steps`` (``schedule="cosine"``) or ``cfg.lr`` to the end (``"constant"``, the Mamba
    paper's synthetic tasks)."""
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, max(1, cfg.warmup)) if cfg.warmup > 0 else optax.constant_schedule(cfg.lr)
    if cfg.schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.warmup), max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.01)


def run(task: TaskSpec, cfg: RunConfig, keep_model: dict | None = None) -> list[dict]:
    """Train ``cfg.model`` on ``task``; return (and append to ``cfg.out``) the evaluation records.

    ``keep_model``: a dict that receives the trained model under ``"model"``.
    """
    model = build_model(cfg, task.vocab_size, rngs=nnx.Rngs(cfg.seed))
    if keep_model is not None:
        keep_model["model"] = model
    sched = learning_rate(cfg)
    noise = [gradient_noise(cfg.grad_noise, cfg.grad_noise_gamma, cfg.seed)] if cfg.grad_noise > 0 else []
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), *noise, optax.adamw(sched, weight_decay=cfg.weight_decay))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def predict(model, x):
        return jnp.argmax(model(x), axis=-1)

    evals = task.evals()
    records = []

    def evaluate(step):
        for split, batch in evals.items():
            preds = np.concatenate([np.asarray(predict(model, jnp.asarray(batch.inputs[i : i + 256]))) for i in range(0, len(batch), 256)])
            rec = {"task": task.name, "model": cfg.model, "seed": cfg.seed, "step": step, "split": split}
            rec.update({k: float(v) for k, v in task.metric(preds, batch).items()})
            records.append(rec)
            if cfg.out:
                os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
                with open(cfg.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")

    bar = _progress(cfg.steps, cfg.progress, f"{task.name}/{cfg.model}")
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        b = task.train(step, cfg.batch_size, cfg.seed)
        loss = float(train_step(model, opt, jnp.asarray(b.inputs), jnp.asarray(b.targets)))
        if not np.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {step} ({task.name}/{cfg.model})")
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
            scores = " ".join(f"{r['split']}:{_headline(r)}" for r in records[-len(evals):])
            bar.write(f"step {step} loss {loss:.4f} {scores} ({time.time() - t0:.0f}s)")
    bar.close()
    return records


def _headline(rec) -> str:
    keys = [k for k in rec if k not in ("task", "model", "seed", "step", "split")]
    return ",".join(f"{k}={rec[k]:.3f}" for k in keys)


def _progress(total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, file=sys.stderr, mininterval=2.0)


# ----------------------------------------------------------------------------- results


def write_results(out: str, records: list[dict], table_md: str, plot: Callable[[str], object] | None = None) -> dict[str, str]:
    """Write one run's results afresh (nothing appended across runs): ``records`` as JSON lines, ``table_md`` as
    given, and the figure by calling ``plot(png_path)`` (matplotlib stays in the caller).

    ``out`` is a folder, written as ``<out>/{records.jsonl, table.md, plot.png}``, or a ``<stem>.jsonl`` file,
    written as ``<stem>.{jsonl, md, png}``. Returns the paths written: ``{"records", "table"[, "plot"]}``.
    """
    if out.endswith(".jsonl"):
        stem = out[: -len(".jsonl")]
        paths = {"records": out, "table": stem + ".md", "plot": stem + ".png"}
    else:
        paths = {"records": os.path.join(out, "records.jsonl"), "table": os.path.join(out, "table.md"),
                 "plot": os.path.join(out, "plot.png")}
    os.makedirs(os.path.dirname(os.path.abspath(paths["records"])), exist_ok=True)
    with open(paths["records"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(paths["table"], "w") as f:
        f.write(table_md)
    if plot is None:
        del paths["plot"]
    else:
        plot(paths["plot"])
    return paths


# ----------------------------------------------------------------------------- command line


def machine() -> str:
    """The device the results come from, as the records name it: ``"x86_64 CPU, 2 cores (cpu)"`` or the
    accelerator's kind."""
    dev = jax.devices()[0]
    kind = f"{platform.machine()} CPU, {os.cpu_count()} cores" if dev.platform == "cpu" else dev.device_kind
    return f"{kind} ({dev.platform})"


def parse(config_cls, presets: dict, argv: list[str] | None = None):
    """``config_cls`` from a command line: ``--preset=<name>`` picks ``presets[name]`` (a dict of field values,
    default preset ``"cpu"``) over the class defaults, then ``--key=value`` options override (``seqjax.cli``).
    ``--help`` shows the docstring of the module that defines ``config_cls`` (the script)."""
    factories = {name: (lambda name=name, kw=kw: dataclasses.replace(config_cls(), preset=name, **kw))
                 for name, kw in presets.items()}
    doc = getattr(sys.modules.get(config_cls.__module__), "__doc__", None)
    return cli_lib.parse(config_cls, argv, presets=factories, description=doc)


def cli(config_cls, presets: dict, make_task: Callable, argv: list[str] | None = None) -> list[dict]:
    """Parse the command line (:func:`parse`), then :func:`run` the task ``make_task(cfg)``."""
    cfg = parse(config_cls, presets, argv)
    return run(make_task(cfg), cfg)
