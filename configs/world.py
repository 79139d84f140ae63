"""The synthetic world (issue 7): presets for ``train.vae``, ``train.teacher`` and ``train.world``.

    python -m train.world   --config configs/world.py:NAME [--config.a.b=VALUE ...]
    python -m train.teacher --config configs/world.py:NAME [--config.teacher.init=CKPT_ROOT ...]
    python -m train.vae     --config configs/world.py:NAME

Presets:
  ``ci``    seconds on a CPU: 32x32 clips of 9 frames (one causal block), widths of a few
            channels, a handful of steps per stage. It checks the mechanics (losses fall, every stage
            runs, the report and the bundle are written), not quality.
  ``full``  the real run, sized for about 8 minutes on one H100: 96x96 clips of 21 frames
            (6 latent frames = 2 causal blocks of 3), a z16 VAE (base 32, dim_mult 1-2-2-2, trained
            on 48x48 crops of the clips), a 192-wide 6-layer pose + reference teacher (pose
            encoder width 8) and a 3-layer student of the same width. Every training stage stops at
            ``steps`` or after ``max_seconds`` of training, whichever comes first (``max_seconds``
            0: no limit; compilation not counted).

Conventions shared by all stages:
  * Video clips are ``wanjax.data.synthetic`` samples (seeded; train split ``"train"``, held-out
    split ``"val"``); the DiT never sees a held-out clip.
  * Text is a stand-in: one fixed random context ``[text.tokens, text.dim]`` drawn from
    ``text.seed`` (the world has a single prompt, like UniAnimate's fixed "a person is dancing").
    The negative context is the same array, so the teacher's CFG contrasts pose against no pose
    (UniAnimate's asymmetric guidance) and nothing else.
  * No CLIP branch: the DiTs take ``y`` (4 mask + 16 VAE channels of the reference, plus the
    reference-pose features) but have ``i2v = False``; the reference image reaches the model only
    through ``y``. The bundle therefore has no ``clip/``.
  * The student has the teacher's width and ``student.num_layers`` of its blocks (evenly
    spread, first and last kept; ``full``: 3 of 6), starts from the teacher's (EMA) weights
    and runs block-causally (``num_frame_per_block`` latent frames per block, KV cache), 4 steps per
    block against the teacher's 50 CFG steps.
"""
from __future__ import annotations

import ml_collections

PRESETS = ("ci", "full")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = ""
    c.out_dir = "out/world"
    c.work_dir = ""                    # large intermediates; "" = <out_dir>/work
    c.redo = ""                        # data | vae | teacher | targets | distill: recompute it and what follows
    c.seed = 0
    c.jax_cache = True                 # persistent XLA compilation cache in <out_dir>/jax_cache
    c.data = ml_collections.ConfigDict(dict(
        height=96, width=96, num_frames=21, fps=8.0, supersample=2,
        n_train=1024, n_val=32, seed=0, workers=0))      # workers 0: one per CPU core (max 16)
    c.text = ml_collections.ConfigDict(dict(tokens=8, dim=32, seed=1234))
    c.vae = ml_collections.ConfigDict(dict(
        base_dim=32, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=2,
        clip_frames=21,                # training clips: random 1+4k-frame windows of the videos (the
                                       # full length: the causal convs then see inference-length history)
        crop=48,                       # ... and random crop x crop squares of them (0: whole frames)
        batch=16, lr=8e-4, warmup=100, weight_decay=0.0, b1=0.9, b2=0.99, grad_clip=1.0,
        steps=6000, max_seconds=60.0,
        noise_frac=0.05,               # latent noise (fraction of the batch latent std) in training
        marker_weight=10.0,            # extra pixel weight on the saturated key-colour markers
        l2_weight=1.0,                 # loss = weight * (|e| + l2_weight * e^2) on [-1, 1] pixels
        mu_weight=1e-4,                # keeps the (deterministic) latent scale bounded
        dtype="bfloat16", conv_impl="3d", log_every=50))
    c.teacher = ml_collections.ConfigDict(dict(
        dim=192, ffn_dim=768, num_heads=3, num_layers=6, freq_dim=256, pose_hidden=8,
        init="",                       # "" = from scratch; else an inference root with dit/ + pose/
        batch=32, lr=3e-4, warmup=200, weight_decay=0.01, b1=0.9, b2=0.99, grad_clip=1.0,
        ema_decay=0.999,
        steps=12000, max_seconds=125.0,
        shift=5.0,                     # FlowMatchGrid shift of the training timesteps (UniAnimate: 5)
        pose_drop=0.05,                # UniAnimate: pose tokens + reference pose dropped together
        image_drop=0.10,               # UniAnimate: y (reference latent) dropped
        dtype="bfloat16", attention="xla", log_every=50))
    # <= teacher.num_layers (same width). 3 of the teacher's 6 (blocks 0, 2, 5). On the CPU the pose encoder
    # (the same work as the teacher's) is a fixed ~0.05 s per clip, so the student's speed-up is set by
    # its DiT depth: on the 16-core host of the H100, teacher 1.23 s per clip vs students (from the
    # teacher's layers, before distillation) of 6 layers 0.161 s (7.6x), 4: 0.108 s (11.4x), 3: 0.087 s
    # (14.1x). 3 keeps a margin on the >= 10x check; its pose fidelity is measured like the others'.
    c.student = ml_collections.ConfigDict(dict(num_layers=3))
    c.sample = ml_collections.ConfigDict(dict(
        teacher_steps=50, teacher_shift=5.0, cfg_scale=1.5, sampler="euler",
        student_steps=(1000, 750, 500, 250), student_shift=5.0, num_frame_per_block=3))
    c.targets = ml_collections.ConfigDict(dict(n=1024, batch=64, seed=7))
    c.distill = ml_collections.ConfigDict(dict(
        ode=ml_collections.ConfigDict(dict(batch=32, lr=2e-4, warmup=50, weight_decay=0.01, b1=0.9, b2=0.99,
                                           grad_clip=1.0, ema_decay=0.0, steps=6000, max_seconds=40.0,
                                           log_every=25)),
        # Self-Forcing DMD after the ODE stage (off by default: the ODE student is the shipped one).
        # guidance = sample.cfg_scale - 1 on x0; shift / score shift = the student / teacher shifts.
        dmd=ml_collections.ConfigDict(dict(enabled=False, batch=8, steps=2000, max_seconds=60.0, log_every=10,
                                           gen_update_ratio=5, lr=2e-5, lr_critic=2e-5, b1=0.0, b2=0.999,
                                           weight_decay=0.01, grad_clip=10.0, warmup=0, ema_decay=0.99,
                                           ema_start=0))))
    c.eval = ml_collections.ConfigDict(dict(n=24, seed=100, alpha=0.1, workers=0, timing_clips=8,
                                            cpu_timing_clips=5,   # also time both models on the host CPU
                                            vae_check=True))
    c.export = ml_collections.ConfigDict(dict(dtype="float16", max_mb=20.0))
    return c


def get_config(name: str = "ci") -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown world preset {name!r}; choose one of {list(PRESETS)} "
                         f"(--config configs/world.py:NAME)")
    c = _base()
    c.name = name
    c.out_dir = f"out/world/{name}"
    if name == "ci":
        c.jax_cache = False
        c.data.update(height=32, width=32, num_frames=9, n_train=16, n_val=2, workers=1)
        c.text.update(tokens=4, dim=16)
        c.vae.update(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, clip_frames=5, crop=0, batch=4, lr=2e-3,
                     warmup=0, steps=12, max_seconds=0.0, dtype="float32", log_every=1)
        c.student.update(num_layers=1)
        c.teacher.update(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, pose_hidden=4, batch=4,
                         lr=2e-3, warmup=0, steps=12, max_seconds=0.0, ema_decay=0.5, dtype="float32",
                         log_every=1)
        c.sample.update(teacher_steps=3, cfg_scale=1.5)
        c.targets.update(n=4, batch=2)
        c.distill.ode.update(batch=2, lr=1e-3, warmup=0, steps=3, max_seconds=0.0, log_every=1)
        c.distill.dmd.update(enabled=False, batch=2, steps=2, max_seconds=0.0, log_every=1)
        c.eval.update(n=2, workers=1, timing_clips=1, vae_check=False)
    return c
