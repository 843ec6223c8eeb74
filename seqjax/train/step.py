"""The sharded train step: state, optimizer, gradient accumulation, NaN guard, AOT compile.

Train state (a plain pytree of global ``jax.Array``s, what orbax saves)::

    {"params": pure dict of float32 nnx.Param values (sharded by the logical rules),
     "opt": optax state (moments sharded like the params), "step": int32 [], "rng": uint32 [2]}

Loss: token-weighted cross entropy ``sum_i w_i * nll_i / sum_i w_i`` over the *global* batch, where
``w`` masks document boundaries (``data.split_row``). Gradient accumulation splits the batch into
``accum`` strided microbatches (rows ``i, i+n, i+2n, ...``, so every device keeps its own rows),
sums ``(sum w*nll, grad of it, sum w)`` over them with ``lax.scan`` in the parameter sharding and
divides once at the end: the result is independent of ``accum`` and of the mesh (up to float
summation order).

Optimizer: ``clip_by_global_norm -> [add_noise] -> adamw(warmup + cosine)``; weight decay on matrices
only. ``add_noise`` is ``seqjax.train.noise.gradient_noise`` (Neelakantan et al. 2015): Gaussian noise of
variance ``eta / (1 + t) ** gamma``.

NaN guard: a step whose loss or gradient norm is not finite leaves params and optimizer state
unchanged (a ``where`` on device) and reports ``finite=0``; the host loop then raises
:class:`NonFiniteError` (``nan_policy="raise"``) or counts and skips it (``"skip"``). A NaN is never
written into the state.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from seqjax import sharding as shd
from seqjax.train.noise import gradient_noise

__all__ = ["NonFiniteError", "check_finite", "make_optimizer", "Trainer", "cross_entropy", "batch_spec"]

log = logging.getLogger("seqjax.train")


class NonFiniteError(FloatingPointError):
    pass


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """``clip -> [gradient noise] -> AdamW`` with linear warmup then cosine decay to ``min_lr_ratio``."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=max(1, min(optim.warmup, total_steps - 1)),
        decay_steps=max(total_steps, 2),
        end_value=optim.lr * optim.min_lr_ratio,
    )
    parts = [optax.clip_by_global_norm(optim.clip)] if optim.clip > 0 else []
    if optim.grad_noise > 0:
        parts.append(gradient_noise(optim.grad_noise, optim.grad_noise_gamma))
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def cross_entropy(logits, targets, weights):
    """``(sum w * nll, sum w)`` in float32; logits ``[b, t, v]``, targets/weights ``[b, t]``."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return jnp.sum((lse - tgt) * w), jnp.sum(w)


def batch_spec() -> PartitionSpec:
    """``[batch, length]`` inputs: rows over ``(data, fsdp)``, time over ``context``."""
    return PartitionSpec(("data", "fsdp"), "context")


@dataclasses.dataclass
class Trainer:
    """Builds the sharded state and the compiled step for one model on one mesh.

    ``make_model()`` returns a fresh ``nnx.Module`` with ``logits, _ = model(tokens,
    segment_ids=..., positions=...)``; ``optim`` is an ``OptimConfig``.
    """

    make_model: Callable[[], nnx.Module]
    mesh: jax.sharding.Mesh
    optim: Any
    total_steps: int
    accum: int = 1
    rules: shd.Rules = shd.DEFAULT_RULES
    seed: int = 0

    def __post_init__(self):
        self.graphdef, abs_params, abs_rest = shd.abstract_params(self.make_model)
        self.abstract_params = nnx.to_pure_dict(abs_params)
        self.param_shardings = shd.param_shardings(abs_params, self.mesh, self.rules)
        self.report = shd.validate(abs_params, self.mesh, self.rules)
        self.tx, self.schedule = make_optimizer(self.optim, self.total_steps)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        abs_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_shard = optax.tree_map_params(
            self.tx, lambda _, s: s, abs_opt, self.param_shardings, transform_non_params=lambda _: self.replicated
        )
        self.state_shardings = {
            "params": self.param_shardings,
            "opt": opt_shard,
            "step": self.replicated,
            "rng": self.replicated,
        }
        self.batch_sharding = NamedSharding(self.mesh, batch_spec())
        # non-parameter variables (e.g. RNG streams): constants of the run, replicated
        if jax.tree.leaves(abs_rest):
            only_rest = lambda: nnx.to_pure_dict(nnx.split(self.make_model(), nnx.Param, ...)[2])
            self._rest_now = jax.jit(only_rest, out_shardings=self.replicated)()
        else:
            self._rest_now = nnx.to_pure_dict(abs_rest)

    # ---------------------------------------------------------------------------------- state
    def abstract_state(self):
        """The state as ``ShapeDtypeStruct``s carrying this mesh's shardings (the restore target)."""
        shapes = jax.eval_shape(self._init_state_from, self.abstract_params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.state_shardings)

    def _init_state_from(self, params):
        return {
            "params": params,
            "opt": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(self.seed + 1),
        }

    def init_state(self):
        """Fresh state, created directly into its shardings (never whole on one device)."""
        _, params, _, _ = shd.sharded_init(self.make_model, self.mesh, self.rules)
        init = jax.jit(self._init_state_from, out_shardings=self.state_shardings, donate_argnums=0)
        return init(params)

    # ---------------------------------------------------------------------------------- model
    def model(self, params):
        """The ``nnx.Module`` holding ``params`` (e.g. for sampling)."""
        return nnx.merge(self.graphdef, params, self._rest_now)

    def loss_sums(self, params, batch):
        model = nnx.merge(self.graphdef, params, self._rest_now)
        logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        return cross_entropy(logits, batch["targets"], batch["weights"])

    # ---------------------------------------------------------------------------------- step
    def _grads(self, params, batch):
        """Token-weighted ``(loss_sum, grad of loss_sum, weight_sum)`` over ``accum`` microbatches."""
        grad_fn = jax.value_and_grad(lambda p, b: self.loss_sums(p, b), has_aux=True)
        n = self.accum
        if n == 1:
            (ls, ws), g = grad_fn(params, batch)
            return ls, g, ws

        def split(x):  # [B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, ...
            x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro = jax.tree.map(split, batch)
        zeros = jax.tree.map(jnp.zeros_like, params)
        zeros = jax.lax.with_sharding_constraint(zeros, self.param_shardings)

        def body(carry, mb):
            ls, g, ws = carry
            mb = jax.lax.with_sharding_constraint(mb, {k: self.batch_sharding for k in mb})
            (l_i, w_i), g_i = grad_fn(params, mb)
            g = jax.tree.map(jnp.add, g, g_i)
            g = jax.lax.with_sharding_constraint(g, self.param_shardings)
            return (ls + l_i, g, ws + w_i), None

        (ls, g, ws), _ = jax.lax.scan(body, (jnp.zeros(()), zeros, jnp.zeros(())), micro)
        return ls, g, ws

    def train_step(self, state, batch):
        params = state["params"]
        ls, g, ws = self._grads(params, batch)
        denom = jnp.maximum(ws, 1.0)
        loss = ls / denom
        grads = jax.tree.map(lambda x: x / denom, g)
        gnorm = optax.tree.norm(grads)
        updates, opt = self.tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt": keep(opt, state["opt"]),
            "step": state["step"] + 1,
            "rng": jax.random.fold_in(state["rng"], state["step"]),
        }
        metrics = {
            "loss": loss,
            "tokens": ws,
            "grad_norm": gnorm,
            "param_norm": optax.tree.norm(new_state["params"]),
            "lr": self.schedule(state["step"]),
            "finite": finite.astype(jnp.int32),
        }
        return new_state, metrics

    def eval_step(self, params, batch):
        ls, ws = self.loss_sums(params, batch)
        return ls, ws

    def abstract_batch(self, global_batch: int, seq_len: int):
        i32 = lambda: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=self.batch_sharding)
        f32 = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32, sharding=self.batch_sharding)
        return {"inputs": i32(), "targets": i32(), "segment_ids": i32(), "positions": i32(), "weights": f32}

    def compile(self, global_batch: int, seq_len: int, *, with_eval: bool = True):
        """AOT-compile the train (and eval) steps; returns ``(train, eval or None, info)``.

        ``info`` has the compiled per-device memory (bytes) and XLA's FLOP count of one step.
        """
        if global_batch % self.accum:
            raise ValueError(f"global_batch={global_batch} not divisible by accum={self.accum}")
        ab_state, ab_batch = self.abstract_state(), self.abstract_batch(global_batch, seq_len)
        metric_sh = self.replicated
        step = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, metric_sh),
            donate_argnums=0,
        )
        ev = jax.jit(self.eval_step, in_shardings=(self.param_shardings, self.batch_sharding), out_shardings=metric_sh)
        with shd.use_rules(self.mesh, self.rules):
            train_c = step.lower(ab_state, ab_batch).compile()
            eval_c = ev.lower(ab_state["params"], ab_batch).compile() if with_eval else None
        info = compiled_info(train_c)
        return train_c, eval_c, info


def check_finite(metrics: dict, step: int, policy: str = "raise") -> bool:
    """Host side of the NaN guard: ``True`` if the step was applied; raise or ``False`` if not."""
    if int(metrics["finite"]):
        return True
    msg = (
        f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}); params and optimizer state were left unchanged"
    )
    if policy == "raise":
        raise NonFiniteError(msg + "; lower --optim.lr, or pass --nan_policy=skip to skip such steps")
    if policy != "skip":
        raise ValueError(f"nan_policy must be 'raise' or 'skip', got {policy!r}")
    log.warning(msg + " (skipped)")
    return False


def compiled_info(compiled) -> dict:
    """Per-device memory (bytes) and FLOPs of a compiled computation (``None`` where unavailable)."""
    info: dict = {}
    try:
        mem = compiled.memory_analysis()
        info.update(
            argument_bytes=mem.argument_size_in_bytes,
            output_bytes=mem.output_size_in_bytes,
            temp_bytes=mem.temp_size_in_bytes,
            alias_bytes=mem.alias_size_in_bytes,
            generated_code_bytes=mem.generated_code_size_in_bytes,
        )
        info["total_bytes"] = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        )
    except (NotImplementedError, AttributeError, RuntimeError) as e:  # some backends have no memory analysis
        log.info("no memory analysis: %s", e)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["flops"] = float(cost.get("flops", 0.0))
    except (NotImplementedError, AttributeError, RuntimeError) as e:  # nor a cost analysis
        log.info("no cost analysis: %s", e)
    return info
