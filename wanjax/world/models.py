"""The world's models, built from a ``configs/world.py`` config with the project's own classes:
:class:`wanjax.models.vae.WanVAE` and :class:`wanjax.models.unianimate.PoseDiT` (no new model code).

* VAE: Wan's causal 3-D VAE at a small width (``vae.base_dim``, ``vae.dim_mult``,
  ``vae.num_res_blocks``; z_dim 16 as the DiT's y layout needs), trained with latent constants
  mean 0 / std 1, then given the measured per-channel statistics (:func:`with_latent_stats`).
* DiT: a PoseDiT whose WanDiT takes ``in_dim = 16 + 20`` (noise + y) without the CLIP branch
  (``i2v = False``), text of ``text.tokens x text.dim``, and a UniAnimate pose conditioner whose
  tokens have the DiT width. The student has the teacher's width and ``student.num_layers`` of its
  layers (Self-Forcing's student is a smaller model than its teacher; here it is the same model with
  fewer blocks), plus the causal settings (``num_frame_per_block``, ``max_frames`` = the clip's
  latent frames, full cache). :func:`student_from_teacher` initialises it from the teacher: every
  parameter is copied, the transformer blocks from the layers ``student_layers`` picks (first and
  last kept, the rest spread evenly).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401  (flax config)
from wanjax.world.data import latent_frames


def vae_config(vcfg, mean=None, std=None):
    from wanjax.models.vae import VAEConfig

    z = int(vcfg.z_dim)
    if z != 16:
        raise ValueError(f"vae.z_dim={z}: the DiT's y layout (4 mask + 16 latent channels) needs z_dim 16")
    mean = tuple(float(m) for m in (np.zeros(z) if mean is None else mean))
    std = tuple(float(s) for s in (np.ones(z) if std is None else std))
    return VAEConfig(base_dim=int(vcfg.base_dim), z_dim=z, dim_mult=tuple(int(d) for d in vcfg.dim_mult),
                     num_res_blocks=int(vcfg.num_res_blocks), latents_mean=mean, latents_std=std)


def build_vae(vcfg, seed: int = 0):
    """A freshly initialised WanVAE (float32 parameters, ``vae.dtype`` compute, ``vae.conv_impl``)."""
    from wanjax.models.vae import init_vae, set_conv_impl

    vae = init_vae(vae_config(vcfg), seed, dtype=jnp.dtype(vcfg.dtype), param_dtype=jnp.float32)
    return set_conv_impl(vae, str(vcfg.conv_impl))


def with_latent_stats(vae, mean, std, *, dtype=jnp.float32, conv_impl: str = "3d"):
    """The same VAE (same parameters) whose config holds the latent normalisation ``mean``/``std``,
    computing in ``dtype`` (float32: the latents the DiT trains on are encoded as inference encodes
    the reference)."""
    import dataclasses

    from wanjax.models.vae import WanVAE, set_conv_impl

    cfg = dataclasses.replace(vae.cfg, latents_mean=tuple(float(m) for m in mean),
                              latents_std=tuple(float(s) for s in std))
    out = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32))
    nnx.update(out, nnx.state(vae))
    return set_conv_impl(out, conv_impl)


def pose_dit_config(cfg, *, causal: bool = False, num_layers: int | None = None):
    """PoseDiTConfig of the world's teacher; ``causal`` (the student) also checks the block settings
    and takes ``student.num_layers`` layers (or ``num_layers``)."""
    from wanjax.models.dit import WanDiTConfig
    from wanjax.models.pose import PoseConfig
    from wanjax.models.unianimate import PoseDiTConfig

    t = cfg.teacher
    F = latent_frames(int(cfg.data.num_frames))
    layers = int(num_layers or (cfg.student.num_layers if causal else t.num_layers))
    dit = WanDiTConfig(dim=int(t.dim), ffn_dim=int(t.ffn_dim), num_heads=int(t.num_heads), num_layers=layers,
                       in_dim=16 + 20, out_dim=16, text_dim=int(cfg.text.dim), text_len=int(cfg.text.tokens),
                       freq_dim=int(t.freq_dim), i2v=False, dtype=str(t.dtype), param_dtype="float32",
                       attention=str(t.attention), num_frame_per_block=int(cfg.sample.num_frame_per_block),
                       max_frames=F)
    if causal and F % dit.num_frame_per_block:
        raise ValueError(f"{F} latent frames (data.num_frames={cfg.data.num_frames}) are not a multiple of "
                         f"sample.num_frame_per_block={dit.num_frame_per_block}")
    pose = PoseConfig(hidden=int(t.pose_hidden), out_dim=int(t.dim), ref_dim=20, remat=False)
    return PoseDiTConfig(dit=dit, pose=pose)


def build_pose_dit(pcfg, seed: int = 0):
    """A freshly initialised PoseDiT, its initialisation compiled as one program with the ``rbg``
    PRNG (compiles several times faster than threefry on a CPU)."""
    from wanjax.models.unianimate import PoseDiT

    make = lambda: PoseDiT(pcfg, rngs=nnx.Rngs(jax.random.key(int(seed), impl="rbg")))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()))()
    return nnx.merge(graphdef, state)


def read_pose_dit_config(root: str | Path):
    """PoseDiTConfig of an inference root (``dit/config.json`` + ``pose/config.json``)."""
    from wanjax.models.dit import WanDiTConfig
    from wanjax.models.pose import PoseConfig
    from wanjax.models.unianimate import PoseDiTConfig

    root = Path(root)
    for sub in ("dit", "pose"):
        if not (root / sub / "config.json").is_file():
            raise FileNotFoundError(f"{root}: not a pose DiT checkpoint root (no {sub}/config.json); expected the "
                                    f"dit/ + pose/ layout written by train.teacher / export_inference")
    dit = WanDiTConfig.from_dict(json.loads((root / "dit" / "config.json").read_text()))
    pose = PoseConfig.from_dict(json.loads((root / "pose" / "config.json").read_text()))
    return PoseDiTConfig(dit=dit, pose=pose)


def load_pose_dit(root: str | Path, pcfg=None):
    """Load ``root/dit`` + ``root/pose`` into a PoseDiT (``pcfg`` defaults to the checkpoint's own
    config; pass one to change dtype or causal settings, the parameter shapes must match)."""
    from wanjax.checkpoint import restore_params
    from wanjax.models.unianimate import PoseDiT

    root = Path(root)
    pcfg = pcfg or read_pose_dit_config(root)
    model = nnx.eval_shape(lambda: PoseDiT(pcfg, rngs=nnx.Rngs(0)))
    restore_params(model.dit, root / "dit", dtype=jnp.float32)
    restore_params(model.pose, root / "pose", dtype=jnp.float32)
    return model


def student_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher block indices a student of ``student_layers`` blocks starts from: evenly spread,
    first and last included (8 -> 4: [0, 2, 5, 7])."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student.num_layers={student_layers} must be in [1, teacher layers {teacher_layers}]")
    return sorted(set(int(round(x)) for x in np.linspace(0, teacher_layers - 1, student_layers)))


def student_from_teacher(teacher, scfg):
    """A PoseDiT of config ``scfg`` (the teacher's width, fewer or equal layers) holding the teacher's
    parameters, with the blocks of :func:`student_layers` (blocks are stacked on axis 0)."""
    from wanjax.checkpoint import flatten_params
    from wanjax.models.unianimate import PoseDiT, _rebuild

    L_t, L_s = teacher.cfg.dit.num_layers, scfg.dit.num_layers
    pick = np.asarray(student_layers(L_t, L_s))
    src = flatten_params(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
    out = {k: (v[pick] if k.startswith("dit/blocks/") else v) for k, v in src.items()}
    student = nnx.eval_shape(lambda: PoseDiT(scfg, rngs=nnx.Rngs(0)))
    state = nnx.state(student, nnx.Param)
    want = flatten_params(nnx.to_pure_dict(state))
    bad = [f"{k}: teacher {tuple(out[k].shape) if k in out else None}, student {tuple(v.shape)}"
           for k, v in want.items() if k not in out or tuple(out[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError("student_from_teacher: shapes differ (the student must have the teacher's width):\n  "
                         + "\n  ".join(bad[:10]))
    nnx.replace_by_pure_dict(state, _rebuild(nnx.to_pure_dict(state), {k: jnp.asarray(out[k], jnp.float32)
                                                                      for k in want}))
    nnx.update(student, state)
    return student
