"""Train the synthetic world's VAE (the first stages of ``train.world``).

    python -m train.vae --config configs/world.py:NAME [--config.out_dir=DIR] [--config.vae.steps=N ...]

Renders (or reuses) the training clips, trains Wan's causal VAE at the config's width for
reconstruction (``wanjax.world.losses.vae_loss``), measures the latent statistics and writes the
checkpoint to ``<work_dir>/vae`` (config.json + Orbax params/, loadable with
``wanjax.models.vae.load_vae``), then encodes the training latents for the teacher
(``<work_dir>/latents.npz``). Errors print ``error: ...`` and exit with 2.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from wanjax.world import stages as S

    def body(r):
        S.apply_redo(r)
        train, _ = S.stage_data(r)
        vae = S.stage_vae(r, train)
        S.stage_latents(r, vae, train)
        return f"VAE in {r.p.vae}; training latents in {r.p.latents}; log {r.p.vae_run / 'metrics.jsonl'}"

    return S.stage_cli(sys.argv[1:] if argv is None else list(argv), "python -m train.vae", body)


if __name__ == "__main__":
    sys.exit(main())
