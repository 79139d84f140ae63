"""ODE-regression initialisation of the causal student (self_forcing.md 5.9) with UniAnimate pose
conditioning and pose dropout (unianimate_dit.md 10.3 step 3).

Teacher targets (``wanjax.data.targets``, one sample, channels-last latents)::

    noise [F, h, w, C]   traj [S, F, h, w, C] (teacher latents at the student sigmas)   traj_sigmas [S]
    x0 [F, h, w, C]      context [Lt, text_dim]   clip_fea [257, image_dim]   ref_y [F, h, w, 20]
    ref_pose [H, W, 3] in [0, 1]   pose uint8 [4(F-1)+1, H, W, 3]

Objective, per sample (:func:`ode_loss`):

1. Per causal block b a trajectory index i_b ~ UniformInt{0..S} is drawn (index S = the teacher's
   clean x0 at t = 0, when ``clean_context``; Self-Forcing stores t = 0 as the 5th entry). The
   student input is ``x_t = entries[i_b]`` for the frames of block b, the per-frame timestep
   ``t = 1000 sigma_{i_b}`` (sigma = traj_sigmas, 0 for the clean entry).
2. One full-sequence forward with the block-causal mask (``causal=True``): every block attends to
   itself and to the teacher's latents of the earlier blocks (teacher forcing: the context is the
   teacher's trajectory, clean with probability 1/(S+1), never the student's own samples).
3. ``x0_hat = x_t - sigma * flow``; loss = mean squared error to the teacher's x0 over the frames
   whose index is not the clean entry (the clean blocks only serve as context).

Conditioning (:func:`conditioning_batch` -> ``wanjax.distill.dmd.resolve_cond``): the student's own
pose encoder on the padded pose video (frame 0 repeated 3x, /255), or, when the batch carries
``pose_trunk`` (the targets' precomputed trunk features; frozen trunks only), its pose head on those,
its own reference-pose features
added to ``ref_y``, CLIP tokens; UniAnimate's dropout per sample: with probability ``pose_drop``
(5%) pose tokens and reference pose together, independently with ``image_drop`` (10%) CLIP and the
reference latent ``y`` together (the reference pose survives in y). Text is never dropped.

:func:`student_sample` is the 4-step causal sampler used by validation (the rollout of
``wanjax.distill.dmd`` with every block exiting at the last step, i.e. StudentPipeline's math and
noise draws, with an explicit initial noise).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wanjax import sampling
from wanjax.distill import dmd

F32 = jnp.float32

__all__ = ["ODEConfig", "pad_pose_video", "conditioning_batch", "draw_block_indices", "ode_inputs", "ode_loss",
           "ode_eval_loss", "student_sample", "pipeline_noise", "collate", "SAMPLE_KEYS"]

SAMPLE_KEYS = ("noise", "context", "clip_fea", "ref_y", "ref_pose", "pose", "traj", "traj_sigmas", "x0")


@dataclasses.dataclass(frozen=True)
class ODEConfig:
    """``clean_context``: the per-block index may pick the teacher's clean x0 (t = 0, excluded from
    the loss). ``pose_drop`` / ``image_drop``: UniAnimate dropout probabilities."""
    clean_context: bool = True
    pose_drop: float = 0.05
    image_drop: float = 0.10


# ----------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------
def pad_pose_video(pose_u8: jax.Array) -> jax.Array:
    """uint8 [B, T, H, W, 3] -> float32 [B, T + 3, H, W, 3] in [0, 1] with frame 0 repeated 3x in
    front (``wanjax.pipeline.pad_pose`` per sample, on device)."""
    p = jnp.asarray(pose_u8)
    if p.dtype != jnp.uint8:
        raise TypeError(f"pose frames must be uint8 [B, T, H, W, 3], got {p.dtype}")
    p = jnp.concatenate([jnp.repeat(p[:, :1], 3, axis=1), p], axis=1)
    # a table of numpy's v / 255 (XLA would turn the division into a multiplication, 1 ulp off)
    return jnp.asarray(np.arange(256, dtype=np.float32) / np.float32(255.0))[p]


def conditioning_batch(batch: Mapping[str, jax.Array], key: jax.Array | None, *, pose_drop: float = 0.0,
                       image_drop: float = 0.0) -> dmd.DMDBatch:
    """A data batch -> the raw conditioning shared by student, teacher and critic, with UniAnimate's
    dropout flags drawn per sample from ``key`` (None: keep everything). ``neg_context`` comes from
    ``batch["neg_context"]`` when present (DMD), else it is the positive context (unused)."""
    ctx = batch["context"]
    B = ctx.shape[0]
    keep_pose = keep_image = None
    if key is not None and (pose_drop > 0 or image_drop > 0):
        kp, ki = jax.random.split(key)
        keep_pose = (jax.random.uniform(kp, (B,)) >= pose_drop).astype(F32)
        keep_image = (jax.random.uniform(ki, (B,)) >= image_drop).astype(F32)
    return dmd.DMDBatch(context=ctx, neg_context=batch.get("neg_context", ctx), clip_fea=batch.get("clip_fea"),
                        ref_latent_y=batch.get("ref_y"),
                        pose_video=pad_pose_video(batch["pose"]) if "pose" in batch else None,
                        ref_pose=batch.get("ref_pose"), keep_pose=keep_pose, keep_image=keep_image,
                        pose_trunk=batch.get("pose_trunk"))


# ----------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------
def draw_block_indices(key: jax.Array, batch: int, frames: int, nfb: int, num_entries: int) -> jax.Array:
    """Per-block trajectory index, repeated over the block's frames: int32 [batch, frames]."""
    if frames % nfb:
        raise ValueError(f"{frames} latent frames are not a multiple of num_frame_per_block={nfb}")
    idx = jax.random.randint(key, (batch, frames // nfb), 0, num_entries)
    return jnp.repeat(idx, nfb, axis=1).astype(jnp.int32)


def ode_inputs(traj: jax.Array, traj_sigmas: jax.Array, x0: jax.Array, idx: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Gather the student input per frame. traj [B, S, F, h, w, C], traj_sigmas [B, S], x0
    [B, F, h, w, C], idx [B, F] in 0..S (S = clean x0) -> (x_t [B, F, h, w, C], sigma [B, F])."""
    B, S = traj.shape[:2]
    entries = jnp.concatenate([traj, x0[:, None].astype(traj.dtype)], axis=1)   # [B, S+1, F, ...]
    x_t = jnp.take_along_axis(entries, idx[:, None, :, None, None, None], axis=1)[:, 0]
    sig = jnp.concatenate([traj_sigmas.astype(F32), jnp.zeros((B, 1), F32)], axis=1)
    return x_t, jnp.take_along_axis(sig, idx, axis=1)


def _x0_error(student, batch, idx, cond: dmd.Cond) -> jax.Array:
    """Per-frame squared error [B, F] of the student's x0 prediction at the gathered inputs."""
    x0 = batch["x0"].astype(F32)
    x_t, sigma = ode_inputs(batch["traj"], batch["traj_sigmas"], x0, idx)
    t = sigma * F32(1000.0)  # = the warped student timesteps (FlowMatchGrid: timesteps = 1000 * sigmas)
    cdt = student.cfg.dit.compute_dtype
    flow = student(x_t.astype(cdt), t, cond.context, clip_fea=cond.clip_fea, y=cond.y,
                   pose_tokens=cond.pose_tokens, causal=True)
    x0_hat = sampling.x0_from_flow(x_t.astype(F32), flow.astype(F32), sigma)
    return jnp.mean(jnp.square(x0_hat - x0), axis=(2, 3, 4))


def ode_loss(student, batch: Mapping[str, jax.Array], key: jax.Array, *, cfg: ODEConfig = ODEConfig()
             ) -> tuple[jax.Array, dict]:
    """ODE regression loss of a causal PoseDiT ``student`` on a batch of teacher targets (see the
    module docstring). Returns (loss, aux: ``x0_mse_i`` per trajectory index i (NaN-free: 0 when
    the index was not drawn), ``clean_frac``, ``pose_kept``, ``image_kept``)."""
    k_idx, k_drop = jax.random.split(key)
    cb = conditioning_batch(batch, k_drop, pose_drop=cfg.pose_drop, image_drop=cfg.image_drop)
    cond = dmd.resolve_cond(student, cb)
    B, S, F_ = batch["traj"].shape[:3]
    nfb = student.cfg.dit.num_frame_per_block
    idx = draw_block_indices(k_idx, B, F_, nfb, S + 1 if cfg.clean_context else S)
    err = _x0_error(student, batch, idx, cond)
    w = (idx < S).astype(F32)
    loss = jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)
    aux = {"clean_frac": jnp.mean((idx == S).astype(F32))}
    for i in range(S):
        m = (idx == i).astype(F32)
        aux[f"x0_mse_{i}"] = jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)
    if cb.keep_pose is not None:
        aux["pose_kept"] = jnp.mean(cb.keep_pose)
        aux["image_kept"] = jnp.mean(cb.keep_image)
    return loss, aux


def ode_eval_loss(student, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Deterministic ODE loss: no dropout; for each trajectory index i every block takes entry i;
    the mean over the S indices of the x0 MSE. Returns float32 [S] (per index)."""
    cond = dmd.resolve_cond(student, conditioning_batch(batch, None))
    B, S, F_ = batch["traj"].shape[:3]
    return jnp.stack([jnp.mean(_x0_error(student, batch, jnp.full((B, F_), i, jnp.int32), cond))
                      for i in range(S)])


# ----------------------------------------------------------------------------------------------
# Sampling (validation)
# ----------------------------------------------------------------------------------------------
def pipeline_noise(key: jax.Array, shape: tuple[int, ...], nfb: int, dtype=F32) -> jax.Array:
    """The initial noise StudentPipeline draws for seed key ``key``: block b's frames are
    ``normal(fold_in(fold_in(key, b), 0), [B, nfb, h, w, C])``. shape = [B, F, h, w, C]."""
    B, F_ = shape[:2]
    blocks = [jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, b), 0), (B, nfb) + tuple(shape[2:]), F32)
              for b in range(F_ // nfb)]
    return jnp.concatenate(blocks, axis=1).astype(dtype)


def student_sample(student, batch: Mapping[str, jax.Array], noise: jax.Array, key: jax.Array, *,
                   shift: float = 5.0, steps=(1000, 750, 500, 250)) -> jax.Array:
    """Few-step causal sample from ``noise`` [B, F, h, w, C] with the batch's full conditioning
    (no dropout): per block the S-step loop with fresh re-noising (keys ``fold_in(fold_in(key, b),
    j + 1)``) and a clean context pass, i.e. StudentPipeline. Returns x0 [B, F, h, w, C]."""
    ts, sig = sampling.student_schedule(shift, tuple(steps))
    cond = dmd.resolve_cond(student, conditioning_batch(batch, None))
    cdt = student.cfg.dit.compute_dtype
    return dmd.rollout(student, noise.astype(cdt), cond, key, exit_step=len(ts) - 1, sigmas=sig, timesteps=ts,
                       nfb=student.cfg.dit.num_frame_per_block, with_grad=False)


# ----------------------------------------------------------------------------------------------
# Host-side batching
# ----------------------------------------------------------------------------------------------
def collate(samples: list[Mapping[str, np.ndarray]], *, text_len: int, keys=SAMPLE_KEYS,
            extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Stack target records into a batch: ``keys`` only (missing optional ones are dropped when
    absent from every sample), ``context`` zero-padded to ``text_len`` rows, pose kept uint8.
    ``extra`` arrays (no batch axis, e.g. a negative prompt) are broadcast to every sample."""
    out = {}
    for k in keys:
        have = [k in s for s in samples]
        if not any(have):
            continue
        if not all(have):
            raise KeyError(f"target key {k!r} is missing from some samples of the batch")
        arrs = [np.asarray(s[k]) for s in samples]
        if k == "context":
            arrs = [_pad_rows(a, text_len, "context") for a in arrs]
        out[k] = np.stack(arrs)
    for k, a in (extra or {}).items():
        a = np.asarray(a)
        if k.endswith("context"):
            a = _pad_rows(a, text_len, k)
        out[k] = np.broadcast_to(a, (len(samples),) + a.shape).copy()
    if "pose" in out and out["pose"].dtype != np.uint8:
        raise TypeError(f"target key 'pose' must be uint8 [T, H, W, 3], got {out['pose'].dtype}")
    return out


def _pad_rows(a: np.ndarray, n: int, what: str) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if a.ndim != 2 or a.shape[0] > n:
        raise ValueError(f"{what}: shape {a.shape}, expected [rows <= {n}, text_dim]")
    if a.shape[0] == n:
        return a
    return np.concatenate([a, np.zeros((n - a.shape[0], a.shape[1]), np.float32)])
