"""Train (or fine-tune) a pose + reference teacher with UniAnimate's flow-matching recipe.

    python -m train.teacher --config configs/world.py:NAME [--config.teacher.init=ROOT]
                            [--config.out_dir=DIR] [--config.teacher.steps=N] [--config.teacher.lr=LR ...]

The model is a bidirectional :class:`wanjax.models.unianimate.PoseDiT` (the config's ``teacher``
section: width, layers, pose-encoder width), trained on the world's clips with
``wanjax.world.losses.teacher_flow_loss``: timesteps from the shift-5 1000-point grid, flow target
``eps - x0``, "bsmntw" weights, pose tokens + reference pose dropped together 5 %, the reference
latent ``y`` 10 %. ``--config.teacher.init=ROOT`` starts from an inference root with ``dit/`` and
``pose/`` (e.g. a previous run's ``<work_dir>/teacher``) instead of from scratch; its
architecture then wins over the config's. The VAE must exist (``python -m train.vae`` with the same
config); the data and latents are reused or made. Training runs on the shared loop
(``wanjax.training``): AdamW with warm-up, EMA, JSONL metrics in ``<work_dir>/teacher_run``, an Orbax
checkpoint there from which an interrupted run resumes (SIGTERM saves and exits). Output: the EMA
teacher as an inference root ``<work_dir>/teacher`` (dit/, pose/, vae -> the world's VAE, text.npz,
world.json), loadable with ``infer.generate`` through ``wanjax.world.bundle.infer_config(root,
"teacher")``. A finished teacher is reused; ``--config.redo=teacher`` trains it again (and drops the
world's later stages). Errors print ``error: ...`` and exit with 2.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from infer.generate import UsageError
    from wanjax.world import stages as S

    def body(r):
        if not (r.p.vae / "config.json").is_file():
            raise UsageError(f"no trained VAE in {r.p.vae}: run python -m train.vae with the same --config first")
        S.apply_redo(r)
        train, _ = S.stage_data(r)
        vae = S.stage_vae(r, train)
        x0, ref_y = S.stage_latents(r, vae, train)
        root = S.stage_teacher(r, train, x0, ref_y)
        return f"teacher in {root}; log {r.p.teacher_run / 'metrics.jsonl'}"

    return S.stage_cli(sys.argv[1:] if argv is None else list(argv), "python -m train.teacher", body)


if __name__ == "__main__":
    sys.exit(main())
