"""Training checkpoints (Orbax ``CheckpointManager``), preemption handling and inference export.

* :class:`Checkpointer` - ``<dir>/<step>/{state,meta}``: the whole :class:`~wanjax.training.state.TrainState`
  (params, optimizer, EMA, step, RNG, data position) through ``StandardSave`` plus a JSON ``meta``
  item (run config, data position, wall time). Saves are asynchronous (the train loop goes on while
  the arrays are written), the newest ``keep`` checkpoints are kept. Orbax writes every step into a
  temporary directory and renames it only when complete, so a crash or kill mid-save leaves the
  previous (finished) checkpoints untouched and the half-written one is ignored on restore.
  Restores are sharded: pass an abstract state whose leaves carry the target ``NamedSharding``.
* :class:`PreemptionGuard` - SIGTERM (a preempted TPU VM, ``scancel``, Kubernetes eviction) only sets
  a flag; the loop sees it after the current step, saves synchronously and returns cleanly. On
  several hosts the flag is OR-ed across processes so that everyone saves the same step.
* :func:`export_inference` - the (EMA) student as an inference checkpoint root (``dit/`` + ``pose/``,
  each ``config.json`` + Orbax ``params/`` written by ``wanjax.checkpoint.save_model``) that
  ``infer.generate --config configs/infer.py:student_1_3b --config.ckpt_dir=ROOT`` loads.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

log = logging.getLogger("wanjax.training")

__all__ = ["Checkpointer", "CheckpointMismatch", "PreemptionGuard", "export_inference"]


class CheckpointMismatch(ValueError):
    """The checkpoint in the run directory belongs to a different model / objective."""


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` (see the module docstring).

    Args:
      directory: run checkpoint directory (created if missing).
      keep: number of newest checkpoints kept (``max_to_keep``).
      async_save: write arrays in a background thread (``wait()`` blocks until done).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        """Newest *finished* checkpoint step (temporary, unfinished directories are ignored)."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: Mapping[str, Any], *, wait: bool = False) -> None:
        """Save ``state`` (a TrainState) and ``meta`` (JSON-able) as checkpoint ``step``."""
        ocp = self._ocp
        if step in self.manager.all_steps():
            log.info("checkpoint %d already exists in %s; not overwriting it", step, self.directory)
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(dict(meta))), force=True)
        if wait:
            self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no finished checkpoint")
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` (default: the newest finished one) into the shapes, dtypes and
        shardings of ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``).
        Returns ``(state, meta)``."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no finished checkpoint to resume from")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatch(
                f"{self.directory}/{step}: the checkpoint does not fit this run's model/optimizer ({e}); "
                f"use a fresh --config.workdir or the config it was written with") from None
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_meta_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Refuse to resume when the fingerprint keys differ (model presets, objective, mesh-independent)."""
    bad = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in current.items()
           if k in saved and saved.get(k) != v]
    if bad:
        raise CheckpointMismatch(f"{where}: cannot resume, the run config changed (" + "; ".join(bad)
                                 + "); use a fresh --config.workdir or restore the original settings")


class PreemptionGuard:
    """Context manager: SIGTERM sets :attr:`requested` instead of killing the process.

    A second SIGTERM restores the previous handler and re-delivers the signal (hard stop). Only the
    main thread can install signal handlers; elsewhere the guard is inert (``installed`` False).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._flag = threading.Event()
        self._prev: dict = {}
        self.installed = False

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def request(self) -> None:
        """What the handler does; also callable directly (tests, custom schedulers)."""
        self._flag.set()

    def _handler(self, signum, frame):
        if self._flag.is_set():
            self.uninstall()
            signal.raise_signal(signum)
            return
        log.warning("received signal %d: saving a checkpoint after this step and exiting", signum)
        self._flag.set()

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._prev[s] = signal.signal(s, self._handler)
            self.installed = True
        return self

    def uninstall(self) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._prev.clear()
        self.installed = False

    def should_stop(self) -> bool:
        """``requested`` OR-ed over all processes (every host stops at the same step)."""
        flag = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))
        return flag

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.uninstall()
        return False


# How a trained DiT spent memory on its backward pass: no effect on its function, so an inference
# checkpoint carries the defaults (an unrolled layer loop would only double a full forward's compile time)
TRAINING_ONLY_DIT_FIELDS = dict(remat=False, remat_policy="full", remat_dots_layers=0, unroll_layers=False)


def export_inference(model: nnx.Module, out_dir: str | os.PathLike, *, provenance: Mapping[str, Any] | None = None,
                     link_from: str | os.PathLike | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` (a ``wanjax.models.unianimate.PoseDiT`` or a plain ``WanDiT``) as an inference
    checkpoint root: ``out_dir/dit`` (its config with ``TRAINING_ONLY_DIT_FIELDS`` reset) and, for a
    PoseDiT, ``out_dir/pose``. Each is atomic (``wanjax.checkpoint.save_model``). ``link_from`` (a
    converted checkpoint root) symlinks its ``vae/ clip/ t5/ tokenizer/`` next to them so that
    ``--config.ckpt_dir=out_dir`` is complete."""
    from wanjax.checkpoint import save_model
    from wanjax.models.dit import WanDiT

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    prov = dict(provenance or {})
    dit = model if isinstance(model, WanDiT) else model.dit
    dit_cfg = dit.cfg.replace(**TRAINING_ONLY_DIT_FIELDS).to_dict()
    save_model(dit, out / "dit", {"model": "dit", **dit_cfg, "source": prov}, overwrite=overwrite)
    pose = getattr(model, "pose", None)
    if pose is not None:
        save_model(pose, out / "pose", {"model": "pose_conditioner", **pose.cfg.to_dict(), "source": prov},
                   overwrite=overwrite)
    if link_from:
        src = Path(link_from).absolute()
        for sub in ("vae", "clip", "t5", "tokenizer"):
            if (src / sub).exists() and not (out / sub).exists():
                os.symlink(src / sub, out / sub)
    (out / "export.json").write_text(json.dumps(prov, indent=2, sort_keys=True, default=str))
    return out
