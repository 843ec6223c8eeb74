"""The pretraining loop behind ``experiments/pretrain.py``: ``train(cfg) -> summary``.

One run: (multi-process init) -> mesh -> data -> sharded state (fresh, or restored from the latest
complete checkpoint onto this mesh) -> AOT-compiled step (memory and FLOPs logged) -> loop with a
progress bar, TensorBoard scalars, periodic eval in bits per byte, async checkpoints, SIGTERM ->
final checkpoint -> loss-curve PNG and a generated sample.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax import sharding as shd
from seqjax.models.generate import generate
from seqjax.models.lm import LM, LMConfig
from seqjax.train import checkpoint as ckpt_lib
from seqjax.train import config as config_lib
from seqjax.train import data as data_lib
from seqjax.train import metrics as metrics_lib
from seqjax.train.step import Trainer, check_finite

__all__ = ["train", "compile_for_topology", "build_model_fn"]

log = logging.getLogger("seqjax.train")


def build_model_fn(model: LMConfig, seed: int = 0):
    """``() -> LM`` for ``model`` (the trainer calls it under the mesh, possibly inside ``nnx.eval_shape``)."""
    return lambda: LM(model, rngs=nnx.Rngs(seed))


def _setup_logging():
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _is_main() -> bool:
    return jax.process_index() == 0


def _evaluate(eval_fn, params, batches: data_lib.Batches, n: int, sharding, seq_len: int) -> float:
    ls = ws = 0.0
    for i in range(n):
        b = batches.global_batch(i, sharding, seq_len)
        l_i, w_i = eval_fn(params, b)
        ls, ws = ls + float(l_i), ws + float(w_i)
    return ls / max(ws, 1.0)


def _sample(trainer, params, cfg) -> str:
    """``cfg.sample_len`` bytes after ``cfg.sample_prompt``, sampled at ``cfg.sample_temperature`` with nucleus
    ``cfg.sample_top_p`` (greedy at temperature 0, which makes a small model repeat itself)."""
    model = trainer.model(jax.device_get(params))
    toks = jnp.asarray([list(cfg.sample_prompt.encode())], jnp.int32)
    out = generate(model, toks, cfg.sample_len, key=jax.random.PRNGKey(cfg.seed),
                   temperature=cfg.sample_temperature, top_p=cfg.sample_top_p if cfg.sample_temperature > 0 else None)
    return cfg.sample_prompt + bytes(np.asarray(out[0]).astype(np.uint8)).decode("utf-8", errors="replace")


def _plot(history: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["train_bpb"]) for h in history if "train_bpb" in h]
    ev = [(h["step"], h["eval_bpb"]) for h in history if "eval_bpb" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read_history(path: str, upto: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def score_buffers(hlo: str, seq_len: int) -> list[str]:
    """The float32 array shapes in compiled ``hlo`` with two dims of ``seq_len``: an attention layer's
    ``[.., T, T]`` scores, which a flash / splash kernel in the step never materialises. By shape alone: where a
    feature width equals ``seq_len`` a ``[b, T, width]`` activation is listed too (:func:`step_score_buffers`)."""
    shapes = set(re.findall(r"f32\[([0-9,]*)\]", hlo))
    return sorted(s for s in shapes if s.split(",").count(str(seq_len)) >= 2)


def jaxpr_score_arrays(jaxpr, seq_len: int) -> list[str]:
    """The float32 shapes with two dims of ``seq_len`` among the values ``jaxpr`` (a ``ClosedJaxpr``) computes,
    those of its sub-jaxprs (scan and remat bodies, Pallas kernels) included."""
    shapes, todo = set(), [jaxpr.jaxpr]
    while todo:
        jx = todo.pop()
        for eqn in jx.eqns:
            for v in eqn.outvars:
                shape, dtype = getattr(v.aval, "shape", ()), getattr(v.aval, "dtype", None)
                if dtype == jnp.float32 and list(shape).count(seq_len) >= 2:
                    shapes.add(",".join(map(str, shape)))
            todo.extend(jax_core.jaxprs_in_params(eqn.params))
    return sorted(shapes)


def step_score_buffers(trainer: Trainer, hlo: str, global_batch: int, seq_len: int) -> dict:
    """``f32_score_buffers`` of ``trainer``'s train step compiled to ``hlo``: :func:`score_buffers`, unless a
    parameter has a dim of ``seq_len`` (Mamba-2's ``d_inner = 2 d_model`` is 8192 = T in the 8b preset), where a
    ``[b, T, width]`` activation has the shape of a ``[b, T, T]`` matrix. Then the step is traced again (not
    compiled) at the first multiple of ``seq_len`` that no parameter dim equals, and the compiled shapes are
    score buffers only if that trace computes a float32 array with two dims of its length; ``f32_square_shapes``
    keeps what the HLO showed and ``score_check_len`` the length of the second trace."""
    found = score_buffers(hlo, seq_len)
    widths = {d for a in jax.tree.leaves(trainer.abstract_params) for d in a.shape}
    if not found or seq_len not in widths:
        return {"f32_score_buffers": found}
    t2 = next(k * seq_len for k in range(2, len(widths) + 3) if k * seq_len not in widths)
    with shd.use_rules(trainer.mesh, trainer.rules):
        jaxpr = jax.make_jaxpr(trainer.train_step)(trainer.abstract_state(), trainer.abstract_batch(global_batch, t2))
    real = jaxpr_score_arrays(jaxpr, t2)
    return {"f32_score_buffers": found if real else [], "f32_square_shapes": found, "score_check_len": t2}


def compile_for_topology(cfg: config_lib.TrainConfig, make_model=None) -> dict:
    """Compile ``cfg``'s train and eval steps for the TPU slice ``cfg.compile_topology`` (e.g. ``"v5e:4x4"``,
    ``"v5p:2x2x2"``) on this host, which needs no TPU: libtpu (``pip install 'jax[tpu]'``) compiles for the
    topology's abstract devices (``jax.experimental.topologies``), as MaxText's ``train_compile``. It answers
    "does this model, mesh and batch fit, and how much memory per chip" before a slice is booked; the Pallas
    kernels take their TPU bodies from the mesh (``pallas_kernels._util.platform``). No data is read and
    nothing runs. Returns ``fits`` and the compiled train step's per-chip memory (bytes), XLA's FLOPs per
    step and chip, and the number of Pallas (Mosaic) kernels in it; where the step does not fit in a chip's
    HBM, ``fits=False`` and the compiler's ``error`` (how much it needed). ``f32_score_buffers``: the float32
    ``[.., T, T]`` shapes in the step (:func:`step_score_buffers`; none where attention runs the splash kernel)."""
    from jax.experimental import topologies  # lazy: only this path asks jax for TPU topologies (libtpu)

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"compile_topology={cfg.compile_topology!r} needs libtpu: pip install 'jax[tpu]' "
                           "(Linux x86-64; no TPU needed)")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=cfg.compile_topology).devices
    except Exception as e:
        raise ValueError(f"compile_topology={cfg.compile_topology!r} is not a TPU topology libtpu knows "
                         f"(e.g. 'v5e:2x2', 'v5e:4x4', 'v5p:2x2x2', 'v6e:4x4'): {e}") from e
    mesh = shd.make_mesh(cfg.mesh, devices)
    trainer = Trainer(make_model or build_model_fn(cfg.model, cfg.seed), mesh, cfg.optim, cfg.steps,
                      accum=cfg.accum, seed=cfg.seed)
    t0 = time.perf_counter()
    head = {"topology": cfg.compile_topology, "chips": len(devices), "device_kind": devices[0].device_kind,
            "mesh": dict(mesh.shape)}
    try:
        step, _, info = trainer.compile(cfg.data.global_batch, cfg.data.seq_len)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        log.info("does not fit %s: %s", cfg.compile_topology, str(e).splitlines()[0])
        return {**head, "fits": False, "error": str(e).splitlines()[0]}
    hlo = step.as_text()
    info = {**head, "fits": True, "compile_s": round(time.perf_counter() - t0, 1),
            "pallas_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
            **step_score_buffers(trainer, hlo, cfg.data.global_batch, cfg.data.seq_len), **info}
    log.info("compiled for %s (%d x %s), mesh %s: per-chip memory %.1f MB (args %.1f, temp %.1f)",
             cfg.compile_topology, len(devices), info["device_kind"], info["mesh"], info.get("total_bytes", 0) / 2**20,
             info.get("argument_bytes", 0) / 2**20, info.get("temp_bytes", 0) / 2**20)
    return info


def train(cfg: config_lib.TrainConfig, *, progress: bool = True, make_model=None) -> dict:
    """Run (or resume) the pretraining described by ``cfg``; returns a summary dict. With
    ``cfg.compile_topology`` set, only :func:`compile_for_topology`."""
    if cfg.compile_topology:
        _setup_logging()
        return {"compile": compile_for_topology(cfg, make_model)}
    if cfg.coordinator:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    _setup_logging()
    main = _is_main()
    os.makedirs(cfg.run_dir, exist_ok=True)
    if main:
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))

    mesh = shd.make_mesh(cfg.mesh)
    d = cfg.data
    t0 = time.perf_counter()
    src = data_lib.load_source(d.data, d.seq_len, d.data_dir, d.seed, d.max_files)
    train_b = data_lib.Batches(src["train"], d.global_batch, seed=d.seed)
    eval_b = data_lib.Batches(src["validation"], d.global_batch, shuffle=False, prefetch=0)
    log.info("data %s: %d train rows, %d held-out rows of %d bytes (%.1fs)", d.data, len(src["train"]),
             len(src["validation"]), d.seq_len + 1, time.perf_counter() - t0)

    make_model = make_model or build_model_fn(cfg.model, cfg.seed)
    trainer = Trainer(make_model, mesh, cfg.optim, cfg.steps, accum=cfg.accum, seed=cfg.seed)
    log.info("mesh %s; params: %s", dict(mesh.shape), trainer.report)
    t0 = time.perf_counter()
    step_fn, eval_fn, info = trainer.compile(d.global_batch, d.seq_len)
    abstract_model = nnx.eval_shape(make_model)
    fpt = metrics_lib.flops_per_token(abstract_model, trainer.abstract_params, d.seq_len,
                                      tied_embedding=cfg.model.tie_embeddings)
    flops_step = fpt["total"] * cfg.tokens_per_step
    log.info("compiled in %.1fs: per-device memory %.1f MB (args %.1f, temp %.1f); FLOPs/step analytic %.3g, XLA %.3g",
             time.perf_counter() - t0, info.get("total_bytes", 0) / 2**20, info.get("argument_bytes", 0) / 2**20,
             info.get("temp_bytes", 0) / 2**20, flops_step, info.get("flops", float("nan")) * jax.device_count())

    ck = ckpt_lib.Checkpointer(os.path.join(cfg.run_dir, "checkpoints"), every=cfg.ckpt_every, keep=cfg.keep)
    latest = ck.latest() if cfg.resume else None
    if latest is not None:
        state, meta = ck.restore(trainer.abstract_state(), latest)
        log.info("resumed from step %d (saved on mesh %s)", latest, meta.get("mesh"))
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state["step"]))
    meta = {"config": config_lib.to_dict(cfg), "mesh": dict(mesh.shape), "rules": repr(trainer.rules),
            "data": {"name": d.data, "rows": len(src["train"]), "seq_len": d.seq_len, "seed": d.seed}}

    writer = None
    if main:
        try:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(os.path.join(cfg.run_dir, "tb"))
        except ImportError:
            log.warning("tensorboardX not installed: no TensorBoard logs")
    hist_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    history = _read_history(hist_path, start) if main else []
    if main:
        with open(hist_path, "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)

    peak = cfg.peak_flops or metrics_lib.peak_flops() or metrics_lib.measured_peak_flops()
    meter = metrics_lib.Throughput(cfg.tokens_per_step, flops_step, jax.device_count(), peak)
    stop = ckpt_lib.PreemptionFlag()
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, dynamic_ncols=True, desc="pretrain")

    skipped, last_saved, reason = 0, None, "done"
    pending = None  # (step, metrics) fetched one step late so dispatch never waits on the host
    wall0 = time.perf_counter()
    eval_bpb = float("nan")

    def handle(step_done, m):
        nonlocal skipped
        m = jax.device_get(m)
        if not check_finite(m, step_done, cfg.nan_policy):
            skipped += 1
            return
        bpb = metrics_lib.bits_per_byte(m["loss"])
        row = {"step": step_done, "loss": float(m["loss"]), "train_bpb": bpb, "grad_norm": float(m["grad_norm"]),
               "lr": float(m["lr"]), "tokens_per_s": meter.tokens_per_s, "mfu": meter.mfu}
        if writer is not None:
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    writer.add_scalar(f"train/{k}", v, step_done)
        if main and (step_done % cfg.log_every == 0 or step_done == cfg.steps):
            history.append(row)
            with open(hist_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.set_postfix(bpb=f"{bpb:.3f}", eval="-" if math.isnan(eval_bpb) else f"{eval_bpb:.3f}", tok_s=f"{meter.tokens_per_s:.0f}",
                            mfu=f"{100 * meter.mfu:.1f}%", refresh=False)

    step = start
    meter.reset_clock()
    try:
        while step < cfg.steps:
            batch = train_b.global_batch(step, trainer.batch_sharding, d.seq_len)
            state, m = step_fn(state, batch)
            step += 1
            if pending is not None:
                handle(*pending)
            pending = (step, m)
            meter.tick()
            if bar is not None:
                bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                handle(*pending)
                pending = None
                eval_bpb = metrics_lib.bits_per_byte(
                    _evaluate(eval_fn, state["params"], eval_b, d.eval_batches, trainer.batch_sharding, d.seq_len))
                if main:
                    row = {"step": step, "eval_bpb": eval_bpb}
                    history.append(row)
                    with open(hist_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if writer is not None:
                        writer.add_scalar("eval/bpb", eval_bpb, step)
                    log.info("step %d: held-out %.4f bits/byte", step, eval_bpb)
                meter.reset_clock()
            if ck.save(step, state, meta):
                last_saved = step
            if stop:
                reason = "preempted"
                break
            if cfg.max_seconds and time.perf_counter() - wall0 > cfg.max_seconds:
                reason = "time limit"
                if step % cfg.eval_every:
                    eval_bpb = metrics_lib.bits_per_byte(
                        _evaluate(eval_fn, state["params"], eval_b, d.eval_batches, trainer.batch_sharding, d.seq_len))
                    log.info("time limit (%.0fs) at step %d: held-out %.4f bits/byte; rerun to continue",
                             cfg.max_seconds, step, eval_bpb)
                break
        if pending is not None:
            handle(*pending)
    finally:
        if bar is not None:
            bar.close()
        stop.restore()
        train_b.close()
    if last_saved != step:
        ck.save(step, state, meta, force=True)
    ck.wait()
    saved_steps = ck.all_steps()
    ck.close()

    summary = {"steps": step, "stopped": reason, "skipped_steps": skipped, "eval_bpb": eval_bpb,
               "tokens_per_s": meter.tokens_per_s, "mfu": meter.mfu, "compile": info,
               "flops_per_step_analytic": flops_step, "checkpoints": saved_steps}
    if history:
        last_train = [h for h in history if "train_bpb" in h]
        if last_train:
            summary["train_bpb"] = last_train[-1]["train_bpb"]
    if main and reason != "preempted":
        _plot(history, os.path.join(cfg.run_dir, "loss.png"))
        if cfg.sample_len > 0 and jax.process_count() == 1:
            summary["sample"] = _sample(trainer, state["params"], cfg)
    if writer is not None:
        writer.close()
    return summary
