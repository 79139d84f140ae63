"""Train the synthetic world's VAE (the first stages of ``train.world``).

    python -m train.vae --config configs/world.py:NAME [--config.out_dir=DIR] [--config.vae.steps=N ...]

Renders (or reuses) the training clips, trains Wan's causal VAE at the config's width for
reconstruction (``wanjax.world.losses.vae_loss``), measures the latent statistics and writes the
checkpoint to ``<work_dir>/vae`` (config.json + Orbax params/, loadable with
``wanjax.models.vae.load_vae``), then encodes the training latents for the teacher
(``<work_dir>/latents.npz``). Errors print ``error: ...`` and exit with 2.
"""
from __future__ import annotations

import logging
import sys


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("wanjax").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    from infer.generate import UsageError
    from wanjax.world import stages as S
    from wanjax.world.fit import Preempted

    try:
        cfg = S.parse_args(argv, "python -m train.vae")
        S.setup_jax(cfg)
        r = S.Run(cfg, " ".join(["python -m train.vae"] + argv))
        S.apply_redo(r)
        train, _ = S.stage_data(r)
        vae = S.stage_vae(r, train)
        S.stage_latents(r, vae, train)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 0
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"VAE in {r.p.vae}; training latents in {r.p.latents}; log {r.p.vae_run / 'metrics.jsonl'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
