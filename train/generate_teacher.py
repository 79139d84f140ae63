"""Generate teacher targets (noise, conditioning, trajectory at the student sigmas, x0) for distillation.

    python -m train.generate_teacher --config configs/teacher.py:NAME \
        --config.data.manifest=DATA/manifest.jsonl --config.out_dir=OUT [--config.a.b=VALUE ...]

NAME: teacher_14b or tiny (configs/teacher.py). Every host of a multi-host job runs the same command
(``jax.distributed.initialize`` runs first: ``--distributed``, or ``--config.distributed.*`` as in
``train.distill``, e.g. ``coordinator_address``, ``num_processes``, ``process_id`` on plain machines);
each takes its share of the manifest and works on its own devices. The run is resumable: rerun the
same command after a kill and finished shards are skipped. Output format: wanjax/data/targets.py;
generation: wanjax/distill/targets.py. Progress (samples/hour) and logs go to stderr; an error prints
one ``error: ...`` line and exits with 2.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import wanjax  # noqa: F401


class UsageError(ValueError):
    pass


def parse_config(argv: list[str]):
    """ml_collections config_flags on a private FlagValues (re-entrant: main() may run many times).
    Returns ``(config, remaining argv)``."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    spec = next((a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
                 for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if not spec:
        raise UsageError("--config FILE.py:NAME is required (e.g. configs/teacher.py:tiny)")
    path = spec.split(":", 1)[0]
    if not Path(path).is_file():
        raise UsageError(f"--config {spec}: no such file {path}")
    fv = flags.FlagValues()
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host; same as "
                      "--config.distributed.initialize=yes, see --config.distributed.*)", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "FILE.py:NAME", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        rest = fv(argv)
    except flags.Error as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if len(lines) > 1:  # an exception inside get_config: absl wraps its traceback; keep the message
            raise UsageError(f"--config {spec}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', lines[-1])}") from None
        raise UsageError(str(e)) from None
    except (AttributeError, KeyError) as e:
        raise UsageError(f"--config override names an unknown field {e}; see {path}") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; use --config.FIELD=VALUE")
    return fv.config, fv.distributed


def run(cfg, *, progress: bool = True, on_batch=None) -> dict:
    from wanjax.distill.targets import generate_targets

    return generate_targets(cfg, progress=progress and bool(cfg.progress), on_batch=on_batch)


def error_types():
    from wanjax.checkpoint import CheckpointError
    from wanjax.data.manifest import ManifestError
    from wanjax.data.targets import TargetError
    from wanjax.pipeline import PipelineError
    from wanjax.text import TextEncoderError

    return (UsageError, PipelineError, CheckpointError, ManifestError, TargetError, TextEncoderError,
            FileNotFoundError)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every restore at INFO
    argv = ["generate_teacher"] + (sys.argv[1:] if argv is None else list(argv))
    try:
        cfg, distributed = parse_config(argv)
        from wanjax.training.distributed import init_distributed, set_deterministic

        set_deterministic(cfg.deterministic)  # before anything starts JAX's backends
        if distributed:  # --distributed: the same as --config.distributed.initialize=yes
            cfg.distributed.initialize = "yes"
        init_distributed(cfg.distributed)
        res = run(cfg)
    except error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"teacher targets in {res['out_dir']}: {res['samples']} new samples, {res['skipped']} rows skipped, "
          f"{res['groups_done_before']} of {res['groups']} shards were already done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
