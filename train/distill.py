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
        from wanjax.training.distributed import init_distributed, set_deterministic
        set_deterministic(cfg.deterministic)  # before anything starts JAX's backends
        init_distributed(cfg.distributed)
        result = run(cfg)
    except (DistillError, CheckpointMismatch, DataError, TargetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result.status} at step {int(result.state.step)}: {cfg.workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
