"""Distil the pose-conditioned teacher into the causal few-step student.

    python -m train.distill --config configs/distill.py:NAME --config.workdir=RUN --config.data.dir=TARGETS \
        [--config.objective=ode|dmd] [--config.a.b=VALUE ...]

NAME: tiny, tiny_dmd, student_1_3b, student_1_3b_dmd (configs/distill.py). The run resumes from
``RUN/ckpt`` when it holds a checkpoint; SIGTERM saves and exits with status 0 (restart the same
command to continue). Multi-host: every host runs the same command; ``jax.distributed.initialize``
is called first (``--config.distributed.initialize=auto`` does so when a cluster environment is
detected; see README "Distillation"). Errors print one ``error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import logging
import os
import sys

# Training wants the whole accelerator: JAX's default lets a process use 75% of GPU memory (60 GiB
# of an 80 GB H100: a 1.3B ODE-step variant failed allocating 30 GiB of temporaries next to 24 GiB of
# training state). Set before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/distill.py:NAME", lock_config=True)

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _want_distributed(d) -> bool:
    if d.initialize == "yes" or d.coordinator_address:
        return True
    if d.initialize == "no":
        return False
    if d.initialize != "auto":
        raise ValueError(f"--config.distributed.initialize={d.initialize!r}: choose auto, yes or no")
    if any(os.environ.get(k) for k in _CLUSTER_ENV):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:          # multi-node GPU job (srun)
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")          # TPU pod slice, one process per host
    return "," in hosts


def init_distributed(d) -> None:
    """``jax.distributed.initialize`` (before any other JAX call) when configured or detected."""
    import jax

    if not _want_distributed(d):
        return
    kw = {}
    if d.coordinator_address:
        kw["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kw["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kw["process_id"] = d.process_id
    jax.distributed.initialize(**kw)
    logging.info("jax.distributed: process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 len(jax.devices()))


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; everything goes through --config.*", file=sys.stderr)
        return 2
    cfg = _CONFIG.value
    if cfg is None:
        print("error: --config configs/distill.py:NAME is required", file=sys.stderr)
        return 2
    logging.getLogger("wanjax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every save step at INFO
    from wanjax.checkpoint import CheckpointError
    from wanjax.data.targets import TargetError
    from wanjax.distill.objectives import DistillError, run
    from wanjax.training import CheckpointMismatch, DataError

    try:
        init_distributed(cfg.distributed)
        result = run(cfg)
    except (DistillError, CheckpointMismatch, DataError, TargetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result.status} at step {int(result.state.step)}: {cfg.workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
