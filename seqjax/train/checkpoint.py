"""Checkpoints with orbax: async saves every N steps, keep the last K, a final save on SIGTERM,
exact resume (params, optimizer state, RNG, step = data position) onto any mesh.

Layout (orbax ``CheckpointManager``)::

    <run>/checkpoints/<step>/state/   the train state: every leaf a global jax.Array
    <run>/checkpoints/<step>/meta/    JSON: config, mesh shape, rules, data fingerprint

A save is written to a temporary directory, renamed when complete and marked with
``commit_success.txt``. :meth:`Checkpointer.latest` only returns steps that carry the marker, and at
start-up a step directory without it (a save cut short) is renamed ``<step>.partial-<time>`` and
ignored: a partial checkpoint is never loaded.

Restoring always goes through an abstract target that carries the *current* mesh's shardings
(``Trainer.abstract_state()``), so a checkpoint written on ``fsdp=8`` restores onto ``(data=2,
tensor=4)`` or onto one device. The data position is the step (batches are a pure function of it).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "PreemptionFlag"]

log = logging.getLogger("seqjax.train")

COMMIT_MARKER = "commit_success.txt"


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` (so an orbax v1 migration stays local)."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            # exactly every N steps (orbax's default would also save the first step)
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(1, every)),
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._quarantine_partial()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def _complete(self, step: int) -> bool:
        return os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER))

    def _quarantine_partial(self):
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.isdigit() and not self._complete(int(name)):
                dst = os.path.join(self.directory, f"{name}.partial-{int(time.time())}")
                log.warning("ignoring incomplete checkpoint %s (moved to %s)", name, dst)
                os.rename(os.path.join(self.directory, name), dst)

    def all_steps(self) -> list[int]:
        """Steps of *complete* checkpoints (partial ones, without the commit marker, are not listed)."""
        self.manager.reload()
        return sorted(s for s in self.manager.all_steps() if self._complete(s))

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict | None = None, *, force: bool = False) -> bool:
        """Save (asynchronously) if ``step`` is on the interval or ``force``; returns whether it did."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return saved

    def restore(self, abstract_state, step: int | None = None):
        """``(state, meta)`` of ``step`` (default: latest), laid out like ``abstract_state``."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (and SIGINT); the train loop polls it, saves a final checkpoint and exits."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        log.warning("signal %d: saving a checkpoint and stopping", signum)
        self._event.set()

    def __bool__(self):
        return self._event.is_set()

    def set(self):
        self._event.set()

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
