"""One-model training on the shared loop (:mod:`wanjax.training`), with a wall-clock budget.

Thin adapter: :func:`fit` builds a one-phase :class:`~wanjax.training.Trainer` on a one-device mesh,
a seeded :class:`~wanjax.training.BatchIterator` over a map-style dataset and runs
:func:`~wanjax.training.train` (JSONL metrics, progress bar, optional Orbax checkpoints with
resume and SIGTERM handling). What the shared loop has no notion of is a time limit: the world's
stages must fit a fixed budget on whatever accelerator runs them, so :class:`TimeBudget` acts as the
loop's stop guard; it asks the loop to stop once ``max_seconds`` of training (counted from the end
of the first step, i.e. without compilation) have passed, or on SIGTERM.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax

log = logging.getLogger("wanjax.world")


class Preempted(RuntimeError):
    """A stage's training loop was stopped by SIGTERM: its checkpoint is saved, the run must stop
    (rerunning the same command resumes from the checkpoint)."""


class TimeBudget:
    """Stop guard for :func:`wanjax.training.train`: SIGTERM (via ``PreemptionGuard``) or time out."""

    def __init__(self, max_seconds: float = 0.0):
        from wanjax.training import PreemptionGuard

        self.max_seconds = float(max_seconds or 0.0)
        self.inner = PreemptionGuard()
        self.t0: float | None = None
        self.timed_out = False

    def install(self) -> "TimeBudget":
        self.inner.install()
        return self

    def uninstall(self) -> None:
        self.inner.uninstall()

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0

    def should_stop(self) -> bool:
        if self.inner.should_stop():
            return True
        if self.max_seconds > 0 and self.t0 is not None and self.elapsed >= self.max_seconds:
            self.timed_out = True
            return True
        return False


@dataclasses.dataclass
class FitResult:
    model: Any                 # nnx model with the final parameters
    ema_model: Any             # nnx model with the EMA parameters (None without EMA)
    history: list              # metric records (one per log_every steps)
    steps: int                 # total iterations done (including resumed ones)
    train_seconds: float       # wall time after the first (compiling) step
    status: str                # "done" | "time_budget" | "preempted"


def fit(model, loss_fn: Callable, dataset, *, name: str, opt, batch: int, steps: int, max_seconds: float = 0.0,
        seed: int = 0, ema_decay: float | None = None, log_every: int = 50, workdir: str | Path | None = None,
        ckpt_every: int = 0, progress: bool = True, collate: Callable | None = None) -> FitResult:
    """Train ``model`` with ``loss_fn(model, batch, key) -> (loss, aux)`` on ``dataset``.

    ``opt``: a config section with ``lr, warmup, b1, b2, weight_decay, grad_clip``. ``workdir``:
    ``metrics.jsonl`` goes there, and with ``ckpt_every >= 0`` an Orbax checkpoint directory
    ``ckpt/`` from which an interrupted run resumes (``ckpt_every = 0``: save at the end or on
    SIGTERM only; ``-1``: no checkpoints). ``collate``: how the BatchIterator stacks samples.
    """
    from wanjax import sharding as shd
    from wanjax.training import (BatchIterator, Checkpointer, EMAConfig, LoopConfig, Phase, Trainer, make_optimizer,
                                 phase_batches, train)

    mesh = shd.make_mesh(devices=jax.devices()[:1])
    tx = make_optimizer(float(opt.lr), b1=float(opt.b1), b2=float(opt.b2), weight_decay=float(opt.weight_decay),
                        max_grad_norm=float(opt.grad_clip) or None, warmup_steps=int(opt.warmup))
    ema = {name: EMAConfig(float(ema_decay), 0)} if ema_decay else None
    trainer = Trainer({name: model}, {name: tx}, [Phase(name, name, loss_fn)], mesh, ema=ema, seed=seed)
    workdir = Path(workdir) if workdir is not None else None
    ckpt = None
    if workdir is not None and ckpt_every >= 0:
        ckpt = Checkpointer(workdir / "ckpt", keep=1)
    budget = TimeBudget(max_seconds)
    first = {}

    def on_step(step_done: int, metrics: dict) -> None:
        if not first:
            jax.block_until_ready(metrics)
            first["step"] = step_done
            budget.start()

    data = phase_batches(trainer, lambda pos: BatchIterator(dataset, batch, seed=seed, start=pos, collate=collate))
    budget.install()
    try:
        res = train(trainer, data, LoopConfig(total_steps=int(steps), log_every=max(1, int(log_every)),
                                              ckpt_every=max(0, int(ckpt_every)), progress=progress),
                    checkpointer=ckpt, meta={"stage": name},
                    metrics_path=None if workdir is None else workdir / "metrics.jsonl",
                    on_step=on_step, guard=budget)
    finally:
        budget.uninstall()
        if ckpt is not None:
            ckpt.close()
    status = res.status
    if budget.inner.requested:
        raise Preempted(f"{name}: stopped by SIGTERM at step {int(jax.device_get(res.state.step))}; the checkpoint "
                        f"is saved in {workdir}; rerun the same command to resume")
    if status == "preempted" and budget.timed_out:
        status = "time_budget"
    steps_done = int(jax.device_get(res.state.step))
    log.info("%s: %d steps (%s) in %.1f s of training", name, steps_done, status, budget.elapsed)
    ema_model = trainer.model(res.state, name, ema=True) if ema else None
    return FitResult(model=trainer.model(res.state, name), ema_model=ema_model, history=res.history,
                     steps=steps_done, train_seconds=budget.elapsed, status=status)
