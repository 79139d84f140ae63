"""Training losses of the synthetic world, in the shared form ``loss_fn(model, batch, key) -> (loss, aux)``.

* :func:`teacher_flow_loss` - UniAnimate's flow-matching objective for a bidirectional
  :class:`wanjax.models.unianimate.PoseDiT` (unianimate_dit.md section 10.3): one timestep per
  sample drawn uniformly from the 1000-point shift-5 training grid (``FlowMatchGrid``),
  ``x_t = (1 - sigma) x0 + sigma eps``, target flow ``eps - x0``, MSE times the "bsmntw" weight; the
  pose tokens and the reference-pose features are dropped together with probability ``pose_drop``
  (5 %), ``y`` with probability ``image_drop`` (10 %), and the reference pose is added to ``y`` after
  the image dropout so that it survives it (the conditioning code is the distillation's:
  ``wanjax.distill.ode.conditioning_batch`` + ``wanjax.distill.dmd.resolve_cond``). The CFG
  negative branch at inference (no pose tokens, same ``y``) is therefore something the teacher has
  seen the pose-free half of.
  Deviation: the sampled ``t`` is used as is (UniAnimate rounds it to bf16 before the grid lookup).
* :func:`vae_loss` - reconstruction of a :class:`wanjax.models.vae.WanVAE` on pixel clips in [-1, 1]:
  ``mean(w * (|e| + l2_weight e^2))`` with ``e`` = decoded - target and ``w = 1 + marker_weight`` on
  the saturated key-colour marker pixels (channel spread > 0.8 of the range; figure and background
  colours of the synthetic world stay below 0.35) and 1 elsewhere, plus ``mu_weight * mean(mu^2)``.
  The encoder is deterministic (Wan's ``encode`` keeps only ``mu``); in training the decoder sees
  ``mu + noise_frac * std(mu) * eps`` so that it tolerates the small latent errors of a generator.
  The VAE is trained with latent constants mean 0 / std 1; the world then measures the latent
  statistics and stores them in the VAE config (``channel_stats``), so the DiT sees unit-scale
  latents through the ordinary ``encode``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from wanjax import sampling
from wanjax.distill import dmd, ode
from wanjax.world.data import to_m11

MARKER_SPREAD = 1.6   # channel max - min in [-1, 1] units (0.8 of the range)


def teacher_flow_loss(model, batch: dict, key: jax.Array, *, grid: sampling.FlowMatchGrid,
                      pose_drop: float = 0.05, image_drop: float = 0.10) -> tuple[jax.Array, dict[str, Any]]:
    """Flow-matching loss of a bidirectional PoseDiT (see the module docstring).

    batch (the keys of the teacher targets, ``wanjax.distill.ode``): ``x0`` [B, F, h, w, 16] latents;
    ``ref_y`` [B, F, h, w, 20] (mask + reference latents, no reference pose); ``pose`` uint8
    [B, T, H, W, 3]; ``ref_pose`` [B, H, W, 3] (uint8, or float in [0, 1]); ``context`` [B, L, D].
    The conditioning and its dropout are ``wanjax.distill.ode.conditioning_batch`` +
    ``wanjax.distill.dmd.resolve_cond``, the same code the distillation uses for the student.
    """
    x0 = batch["x0"].astype(jnp.float32)
    B, F_ = x0.shape[:2]
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    j = jax.random.randint(k_t, (B,), 0, grid.num_train_timesteps)
    t = jnp.asarray(grid.timesteps)[j]
    sigma = jnp.asarray(grid.sigmas)[j]
    w = jnp.asarray(grid.weights)[j]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    x_t = sampling.renoise(x0, eps, sigma)
    target = eps - x0

    ref_pose = batch["ref_pose"]
    if ref_pose.dtype == jnp.uint8:
        ref_pose = ref_pose.astype(jnp.float32) / 255.0
    cb = ode.conditioning_batch({**batch, "ref_pose": ref_pose}, k_drop, pose_drop=pose_drop, image_drop=image_drop)
    cond = dmd.resolve_cond(model, cb)
    cdt = model.cfg.dit.compute_dtype
    flow = model(x_t.astype(cdt), jnp.broadcast_to(t[:, None], (B, F_)), cond.context.astype(cdt),
                 clip_fea=cond.clip_fea, y=cond.y, pose_tokens=cond.pose_tokens)
    per_sample = jnp.mean(jnp.square(flow.astype(jnp.float32) - target), axis=(1, 2, 3, 4))
    loss = jnp.mean(per_sample * w)
    aux = {"mse": jnp.mean(per_sample)}
    if cb.keep_pose is not None:
        aux.update(pose_kept=jnp.mean(cb.keep_pose), image_kept=jnp.mean(cb.keep_image))
    return loss, aux


def marker_mask(target_m11: jax.Array) -> jax.Array:
    """1.0 where a pixel of ``[..., 3]`` in [-1, 1] is a saturated key colour, else 0.0."""
    spread = jnp.max(target_m11, axis=-1) - jnp.min(target_m11, axis=-1)
    return (spread > MARKER_SPREAD).astype(jnp.float32)


def raw_latents(vae, z: jax.Array) -> jax.Array:
    """Undo the latent normalisation of ``vae.encode``: the raw encoder mean ``mu``."""
    return z * jnp.asarray(vae.cfg.latents_std, jnp.float32) + jnp.asarray(vae.cfg.latents_mean, jnp.float32)


def random_windows(video: jax.Array, frames: int, key: jax.Array, crop: int | None = None) -> jax.Array:
    """A random window of ``frames`` consecutive frames of every clip of ``video`` [B, T, H, W, C], and
    with ``crop`` a random ``crop x crop`` square of it (the same square in every frame of a clip)."""
    B, T, H, W = video.shape[:4]
    if frames > T:
        raise ValueError(f"clip window of {frames} frames is longer than the {T}-frame videos")
    crop = int(crop) if crop else None
    if crop is not None and (crop > min(H, W) or crop % 8):
        raise ValueError(f"vae.crop={crop} must be a multiple of 8 and at most the frame size {H}x{W}")
    ch, cw = (crop, crop) if crop else (H, W)
    kt, ky, kx = jax.random.split(key, 3)
    t0 = jax.random.randint(kt, (B,), 0, T - frames + 1)
    y0 = jax.random.randint(ky, (B,), 0, H - ch + 1)
    x0 = jax.random.randint(kx, (B,), 0, W - cw + 1)
    zero = jnp.zeros((), jnp.int32)
    return jax.vmap(lambda v, t, y, x: jax.lax.dynamic_slice(v, (t, y, x, zero), (frames, ch, cw, v.shape[-1])))(
        video, t0, y0, x0)


def vae_loss(vae, batch: dict, key: jax.Array, *, clip_frames: int | None = None, crop: int | None = None,
             noise_frac: float = 0.05, marker_weight: float = 10.0, l2_weight: float = 1.0, mu_weight: float = 1e-4
             ) -> tuple[jax.Array, dict[str, Any]]:
    """Reconstruction loss of a WanVAE on ``batch["video"]`` uint8 [B, T, H, W, 3], on a random window
    of ``clip_frames`` (1 + 4k; None: the whole clip) frames per sample, optionally a random
    ``crop x crop`` square of it (the VAE is convolutional, so crops train it at a fraction of the
    cost); see the module docstring."""
    k_win, k_noise = jax.random.split(key)
    video = batch["video"]
    frames = video.shape[1] if clip_frames is None else int(clip_frames)
    if (frames - 1) % 4:
        raise ValueError(f"clip_frames={frames} must be 1 + 4k")
    if frames != video.shape[1] or crop:
        video = random_windows(video, frames, k_win, crop)
    target = to_m11(video)
    z = vae.encode(target)  # normalised with the config's constants
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    scale = jax.lax.stop_gradient(jnp.std(z))
    z_in = z + noise_frac * scale * noise
    # the decoder without the final clamp to [-1, 1], so that no pixel loses its gradient
    recon, _ = vae.decoder(vae._pre_decode(z_in))
    err = recon.astype(jnp.float32) - target
    w = 1.0 + marker_weight * marker_mask(target)[..., None]
    rec = jnp.mean(w * (jnp.abs(err) + l2_weight * jnp.square(err)))
    mu = raw_latents(vae, z)
    loss = rec + mu_weight * jnp.mean(jnp.square(mu))
    mse = jnp.mean(jnp.square(jnp.clip(recon.astype(jnp.float32), -1, 1) - target))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))  # peak-to-peak 2 in [-1, 1]
    return loss, {"rec": rec, "psnr": psnr, "latent_std": scale}
