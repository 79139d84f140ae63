"""Self-Forcing DMD math: the training rollout with exit-step gradient truncation, the DMD generator
loss and the critic (fake-score) flow loss, for pose-conditioned :class:`~wanjax.models.unianimate.PoseDiT`
models. Spec: /work/shared/docs/self_forcing.md sections 4.3, 5.3-5.5 and 9; UniAnimate CFG:
/work/shared/docs/unianimate_dit.md section 6.

Everything here is a pure function of nnx modules (or graphdef + state merged by the caller) and
explicit PRNG keys; all of it traces under ``jax.jit`` / ``jax.grad`` with static shapes.

Roles (self_forcing.md 5.2):

* **student** (generator): a causal PoseDiT, run block by block against its static-shape KV cache.
* **teacher** (real score): a bidirectional PoseDiT (``causal=False``), frozen; DMD guidance on x0,
  ``x0_real = x0_cond + g (x0_cond - x0_uncond)`` (:func:`wanjax.sampling.cfg_x0_dmd`) with
  UniAnimate's asymmetric negative branch: negative prompt, *no pose tokens*, same CLIP and ``y``
  (the reference pose stays in ``y``).
* **critic** (fake score): a bidirectional PoseDiT, trainable with :func:`critic_flow_loss`. In
  Self-Forcing it is a 1.3B Wan (the student's backbone size) initialised from the base Wan weights.
  Here it is any PoseDiT the caller builds; the intended choice is a PoseDiT with the **student's
  config and the student's initial weights** (the ODE-initialised student, called with
  ``causal=False``): same shapes as the generator, cheap, and it starts close to the generator's
  distribution, as the 1.3B base does for Self-Forcing. Nothing here depends on that choice.

Timestep grids (self_forcing.md 4.3): DMD/critic timesteps are drawn as
``t = clamp(1000 * shift(u / 1000), 20, 980)`` with ``u ~ UniformInt[0, 1000)`` and the generator
shift (5); the noising sigma is looked up on the **generator's** 1000-point grid (shift 5); the
teacher and critic convert their flow to x0 with their **own** grid (shift 8); the critic's x0 is
turned back into a flow with the generator grid's sigma. ``score_shift = shift`` makes both lookups
identical.

Conditioning. :class:`Cond` is what one model needs (text context, CLIP tokens, ``y`` with that
model's reference-pose features added, that model's pose tokens). :class:`DMDBatch` holds the raw
per-video inputs shared by all three models; :func:`resolve_cond` turns it into a model's
:class:`Cond` (each PoseDiT has its own pose / reference-pose encoders and token width), applying
UniAnimate's training-time dropout flags (pose tokens + reference pose together; CLIP + ``y``
together) identically for student, teacher and critic.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import wanjax  # noqa: F401  (flax config)
from wanjax import sampling
from wanjax.models.dit import CrossKV, KVCache, WanDiT, remat, unpatchify
from wanjax.models.unianimate import frame_slice

F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Conditioning containers
# ----------------------------------------------------------------------------------------------
class Cond(NamedTuple):
    """The conditioning one PoseDiT sees.

    context:     [B, Lc, text_dim] text embedding (zero-padded to the model's text_len).
    clip_fea:    [B, N, 1280] CLIP tokens of the reference image, or None (T2V model).
    y:           [B, F, h, w, 20] mask + reference latent + *this model's* reference-pose
                 features, or None (a DiT without y channels).
    pose_tokens: [B, F, h/2, w/2, D] *this model's* pose tokens (D = its dit.dim), or None.
    """
    context: jax.Array
    clip_fea: jax.Array | None
    y: jax.Array | None
    pose_tokens: jax.Array | None


class DMDBatch(NamedTuple):
    """Raw per-video conditioning shared by student, teacher and critic.

    context:      [B, Lc, text_dim] positive prompt embedding.
    neg_context:  [B, Lc, text_dim] negative prompt embedding (teacher CFG branch only).
    clip_fea:     [B, N, 1280] or None.
    ref_latent_y: [B, F, h, w, 20] mask (4) + VAE latent (16) of the reference, **without** the
                  reference-pose features (each model adds its own), or None.
    pose_video:   [B, 4F, H, W, 3] driving pose in [0, 1], frame 0 already repeated 3x, or None.
    ref_pose:     [B, H, W, 3] pose drawing of the reference in [0, 1], or None.
    pose_trunk:   [B, F, H/8, W/8, hidden] the pose video's precomputed trunk features
                  (``PoseConditioner.trunk_features``; models with a frozen trunk only), used
                  instead of ``pose_video``, or None.
    keep_pose:    [B] float 1/0 (UniAnimate pose dropout: pose tokens and ref pose dropped
                  together), or None = keep.
    keep_image:   [B] float 1/0 (image dropout: CLIP and ref latent y zeroed together, the ref pose
                  survives in y), or None = keep.
    """
    context: jax.Array
    neg_context: jax.Array
    clip_fea: jax.Array | None = None
    ref_latent_y: jax.Array | None = None
    pose_video: jax.Array | None = None
    ref_pose: jax.Array | None = None
    keep_pose: jax.Array | None = None
    keep_image: jax.Array | None = None
    pose_trunk: jax.Array | None = None


def _per_sample(keep: jax.Array | None, a: jax.Array | None) -> jax.Array | None:
    """a [B, ...] * keep [B] broadcast over the trailing axes (None passes through)."""
    if a is None or keep is None:
        return a
    k = jnp.asarray(keep, F32).reshape((a.shape[0],) + (1,) * (a.ndim - 1))
    return (a.astype(F32) * k).astype(a.dtype)


def resolve_cond(model, batch: DMDBatch, *, negative: bool = False) -> Cond:
    """``model``'s :class:`Cond` for ``batch`` (its own pose tokens and reference-pose features).

    ``negative=True`` is UniAnimate's CFG negative branch: ``neg_context``, no pose tokens, the same
    CLIP and ``y`` (reference pose kept). Dropout flags apply to both branches.
    """
    dcfg = model.cfg.dit
    B = batch.context.shape[0]
    clip = _per_sample(batch.keep_image, batch.clip_fea) if dcfg.i2v else None
    y = None
    if dcfg.in_dim != dcfg.out_dim:
        ref_y = batch.ref_latent_y
        if ref_y is None:
            raise ValueError("this PoseDiT takes y: DMDBatch.ref_latent_y [B, F, h, w, 20] is required")
        y = _per_sample(batch.keep_image, ref_y)
        if batch.ref_pose is not None:
            feat = _per_sample(batch.keep_pose, model.encode_ref_pose(batch.ref_pose))
            y = model.condition_y(y, feat)
    pose = None
    if batch.pose_trunk is not None and not negative:
        pose = _per_sample(batch.keep_pose, model.encode_pose_from_trunk(batch.pose_trunk))
    elif batch.pose_video is not None and not negative:
        pose = _per_sample(batch.keep_pose, model.encode_pose(batch.pose_video))
    ctx = batch.neg_context if negative else batch.context
    if ctx.shape[0] != B:
        raise ValueError(f"neg_context has batch {ctx.shape[0]}, context has {B}")
    return Cond(ctx, clip, y, pose)


def latent_shape(batch: DMDBatch) -> tuple[int, int, int]:
    """(F, h, w) latent frames and size implied by the batch (from y, else from the pose video)."""
    if batch.ref_latent_y is not None:
        return tuple(batch.ref_latent_y.shape[1:4])
    if batch.pose_video is not None:
        _, t, H, W, _ = batch.pose_video.shape
        return t // 4, H // 8, W // 8
    if batch.pose_trunk is not None:
        return tuple(batch.pose_trunk.shape[1:4])
    raise ValueError("DMDBatch needs ref_latent_y, pose_video or pose_trunk to define the latent shape")


# ----------------------------------------------------------------------------------------------
# Config and random draws
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DMDConfig:
    """DMD hyperparameters (self_forcing.md 5.7; the defaults are the released Self-Forcing values).

    steps / shift:      student few-step list, warped on the shift-``shift`` grid ([1000, 937.5,
                        833.3, 625] for shift 5); ``shift`` is also the DMD timestep shift and the
                        generator grid used for noising.
    score_shift:        grid of the teacher and critic x0 conversion (8 in Self-Forcing).
    guidance_scale:     g of ``cond + g (cond - uncond)`` on x0 (3.0 = standard CFG 4.0; UniAnimate's
                        own teacher CFG 1.5 would be g = 0.5). 0 skips the negative teacher pass.
    min_step_ratio / max_step_ratio: clamp of the DMD / critic timestep: [int(0.02 * 1000),
                        int(0.98 * 1000)] = [20, 980].
    num_frame_per_block: latent frames per causal block.
    context_t:          timestep of the KV-cache context pass (0).
    context_sigma:      noise added to the block output before the context pass. 0 (default) feeds
                        the clean x0 as inference does; Self-Forcing's training rollout effectively
                        uses the grid's last sigma, 0.00498 at shift 5 (self_forcing.md 3.4, pitfall 7).
    last_step_only:     always exit at the last step (released: False).
    """
    steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    score_shift: float = 8.0
    guidance_scale: float = 3.0
    min_step_ratio: float = 0.02
    max_step_ratio: float = 0.98
    num_train_timesteps: int = 1000
    num_frame_per_block: int = 3
    context_t: float = 0.0
    context_sigma: float = 0.0
    last_step_only: bool = False

    def schedule(self):
        """(timesteps [S], sigmas [S]) of the student, float32 numpy."""
        return sampling.student_schedule(self.shift, tuple(self.steps))

    @property
    def min_step(self) -> int:
        return int(self.min_step_ratio * self.num_train_timesteps)

    @property
    def max_step(self) -> int:
        return int(self.max_step_ratio * self.num_train_timesteps)

    def grid(self) -> sampling.FlowMatchGrid:
        return sampling.FlowMatchGrid(shift=self.shift, num_train_timesteps=self.num_train_timesteps)

    def score_grid(self) -> sampling.FlowMatchGrid:
        return sampling.FlowMatchGrid(shift=self.score_shift, num_train_timesteps=self.num_train_timesteps)


def sample_dmd_timestep(key: jax.Array, batch: int, *, shift: float = 5.0, num_train_timesteps: int = 1000,
                        min_step: int = 20, max_step: int = 980) -> jax.Array:
    """DMD / critic timestep, one per sample (self_forcing.md 5.4 step 1): ``u ~ UniformInt[0, N)``
    (``jax.random.randint(key, (batch,), 0, N)``), ``t = N * shift(u / N)`` in float32, clamped to
    ``[min_step, max_step]``. Returns float32 [batch]."""
    n = num_train_timesteps
    u = jax.random.randint(key, (batch,), 0, n).astype(F32)
    x = u / F32(n)
    t = F32(shift) * x / (F32(1) + F32(shift - 1) * x) * F32(n)
    return jnp.clip(t, F32(min_step), F32(max_step))


def sample_exit_step(key: jax.Array, num_steps: int, last_step_only: bool = False) -> jax.Array:
    """The exit step shared by all blocks (and every replica, given a replicated key): int32 scalar,
    uniform over 0..num_steps-1, or num_steps-1 with ``last_step_only``."""
    if last_step_only:
        return jnp.asarray(num_steps - 1, jnp.int32)
    return jax.random.randint(key, (), 0, num_steps).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------
def exit_forward(dit: WanDiT, x: jax.Array, t: jax.Array, ckv: CrossKV, cache: KVCache, start_frame, *,
                 y: jax.Array | None = None, pose: jax.Array | None = None) -> jax.Array:
    """``dit.forward_cached`` for differentiation: the same math, but the cache is **read-only** and
    enters the layer scan as per-layer inputs instead of a carry updated in place.

    Under ``jax.grad`` the in-place form would keep, per layer (and, with remat, per layer *and*
    scan iteration), a copy of the whole cache as a residual. Here the layer body only writes this
    block's K/V into its own layer's slice; with ``cfg.remat`` the body is checkpointed, so a
    layer's residual is just its input activations.

    Args: x [B, nf, H, W, C], t [B, nf]; ckv stacked per layer; cache as written by the preceding
    blocks (frames >= start_frame + nf are masked by the valid length; this block's slots are
    overwritten by its own K/V); y / pose already sliced to the block.
    Returns: flow [B, nf, H, W, out_dim] float32 (the cache is not returned).
    """
    cfg = dit.cfg
    backend = cfg.backend()
    tok, grid, e, e0, cos, sin, slots, kv_len = dit.block_inputs(x, t, start_frame, y=y, pose=pose)
    nf = grid[0]
    gdef, state = nnx.split(dit.blocks)

    def body(h, xs):
        layer_state, layer_ckv, ck, cv = xs
        blk = nnx.merge(gdef, layer_state)
        h, _, _ = blk.cached(h, e0, layer_ckv, cos, sin, ck[None], cv[None], 0, slots, kv_len, backend)
        return h, None

    body = remat(body, cfg)
    tok, _ = jax.lax.scan(body, tok, (state, ckv, cache.k, cache.v))
    return unpatchify(dit.head(tok, e, nf), grid, cfg.patch, cfg.out_dim)


def rollout(student, noise: jax.Array, cond: Cond, key: jax.Array, *, exit_step, sigmas: Sequence[float],
            timesteps: Sequence[float], nfb: int = 3, context_t: float = 0.0,
            context_sigma: float = 0.0, with_grad: bool = True) -> jax.Array:
    """Self-Forcing training rollout with exit-step gradient truncation (self_forcing.md 5.3).

    Args:
      student: causal PoseDiT (``dit.forward_cached``, ``init_cache``, ``context_kv``).
      noise: [B, F, h, w, C] initial noise, F a multiple of ``nfb`` and at most the KV-cache
        capacity (``max_frames``, or ``local_attn_size`` for a rolling cache: no frame is evicted
        during a training rollout).
      cond: the student's :class:`Cond` (y and pose tokens cover all F frames; sliced per block
        with ``frame_slice``, in the denoising passes and in the context pass).
      key: PRNG key. Block b uses ``kb = fold_in(key, b)``; the fresh noise of the re-noising after
        step j is ``normal(fold_in(kb, j + 1), [B, nfb, h, w, C], float32)`` cast to the noise dtype
        (the draws of :class:`wanjax.pipeline.student.StudentPipeline`, whose block noise is
        ``fold_in(kb, 0)``); the context-pass noise (``context_sigma > 0``) is ``fold_in(kb, S + 1)``.
      exit_step: int32 scalar (may be traced), shared by all blocks, clipped to [0, S-1].
      sigmas, timesteps: [S] student schedule (:func:`wanjax.sampling.student_schedule`).
      nfb: latent frames per block.
      context_t, context_sigma: the KV-cache context pass runs on ``renoise(x0, eps, context_sigma)``
        (the clean x0 when 0) at timestep ``context_t``.
      with_grad: False skips step 2 below and returns the stop-gradient x0 of step 1 (the critic's
        rollout: same values, one student forward per block less).

    Semantics, per block b: steps j < exit_step run without gradient (``x0_j = x_j - sigma_j
    G(x_j, t_j)``, ``x_{j+1} = renoise(x0_j, eps_j, sigma_{j+1})``; later steps are never computed);
    the exit step's x0 is the block's output and the **only** gradient path (live parameters and
    conditioning, on a stop-gradient input and a stop-gradient cache prefix; the block's own K/V
    written inside it are the only grad-carrying cache entries); a stop-gradient context pass then
    rewrites the block's cache slots from the output. No gradient crosses blocks or steps.

    Implementation (static shapes, one traceable function):
      1. a ``lax.scan`` over blocks carrying the KV cache, everything under ``stop_gradient``: a
         ``lax.while_loop`` of ``exit_step + 2`` ``forward_cached`` passes (the denoising steps, the
         exit step, the context pass; one call site, so one compiled forward); it records each
         block's exit-step input;
      2. a ``lax.scan`` over blocks of the exit forwards with gradient (:func:`exit_forward`), all
         against the **final** cache. No frame is evicted, so the slots before a block hold exactly
         what that block saw, later slots are masked out and its own slots are rewritten by itself.
         The cache is loop-invariant here, so the backward pass keeps no per-block cache copies;
         the price is one extra (no-grad) student forward per block.

    Returns:
      x0 [B, F, h, w, C] in the noise dtype.
    """
    B, F_, h, w, C = noise.shape
    if F_ % nfb:
        raise ValueError(f"{F_} latent frames are not a multiple of the block size nfb={nfb}")
    if F_ > student.dit.cache_capacity():
        raise ValueError(f"{F_} latent frames exceed the student's KV cache of {student.dit.cache_capacity()} "
                         f"frames (max_frames / local_attn_size); a training rollout must not evict frames")
    ts = jnp.asarray(timesteps, F32)
    sig = jnp.asarray(sigmas, F32)
    S = ts.shape[0]
    if ts.ndim != 1 or sig.shape != (S,):
        raise ValueError(f"timesteps and sigmas must both be [S], got {ts.shape} and {sig.shape}")
    exit_step = jnp.clip(jnp.asarray(exit_step, jnp.int32), 0, S - 1)
    num_blocks = F_ // nfb
    sg = jax.lax.stop_gradient
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * nfb

    gdef, state = nnx.split(student)
    ckv = student.context_kv(cond.context, cond.clip_fea)
    _, ph, pw = student.cfg.dit.patch
    cache0 = student.init_cache(B, (h // ph) * (w // pw))
    noise, ckv_sg, y_sg, pose_sg, state_sg = sg((noise, ckv, cond.y, cond.pose_tokens, state))
    tfull = lambda t: jnp.full((B, nfb), t, F32)

    # 1. the rollout without gradient: caches, exit-step inputs and outputs. One forward_cached call
    #    site serves the exit_step + 2 passes of a block: iterations j < exit_step are denoising
    #    steps (re-noise to sigma_{j+1}), j = exit_step is the exit step (its input and x0 are
    #    recorded, the next input is the context input), j = exit_step + 1 is the context pass.
    def no_grad_block(cache, xs):
        b, start = xs
        kb = jax.random.fold_in(key, b)
        model = nnx.merge(gdef, state_sg)
        y_b, pose_b = frame_slice(y_sg, start, nfb), frame_slice(pose_sg, start, nfb)

        def step(carry):
            j, x, c, x_rec, x0_rec = carry
            denoise = j <= exit_step
            jj = jnp.minimum(j, S - 1)
            t = jnp.where(denoise, ts[jj], F32(context_t))
            flow, c = model.forward_cached(x, tfull(t), ckv_sg, c, start, y=y_b, pose_tokens=pose_b)
            x0 = sampling.x0_from_flow(x, flow, sig[jj])
            eps = jax.random.normal(jax.random.fold_in(kb, j + 1), x.shape, F32).astype(x.dtype)
            ctx_in = x0
            if context_sigma:
                ctx_eps = jax.random.normal(jax.random.fold_in(kb, S + 1), x.shape, F32).astype(x.dtype)
                ctx_in = sampling.renoise(x0, ctx_eps, context_sigma)
            at_exit = j == exit_step
            x_next = jnp.where(at_exit, ctx_in, sampling.renoise(x0, eps, sig[jnp.minimum(j + 1, S - 1)]))
            return (j + 1, x_next, c, jnp.where(at_exit, x, x_rec), jnp.where(at_exit, x0, x0_rec))

        x_first = jax.lax.dynamic_slice_in_dim(noise, start, nfb, axis=1)
        init = (jnp.int32(0), x_first, cache, x_first, x_first)
        _, _, cache, x, x0 = jax.lax.while_loop(lambda c: c[0] <= exit_step + 1, step, init)
        return cache, (x, x0)

    to_video = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, F_, h, w, C)  # [blocks, B, nfb, ...] -> [B, F, ...]
    cache, (x_exit, x0_no_grad) = jax.lax.scan(no_grad_block, cache0,
                                               (jnp.arange(num_blocks, dtype=jnp.int32), starts))
    if not with_grad:
        return sg(to_video(x0_no_grad))
    cache, x_exit = sg((cache, x_exit))

    # 2. the exit forwards with gradient, against the final (loop-invariant) cache
    def grad_block(_, xs):
        x, start = xs
        live = nnx.merge(gdef, state)
        flow = exit_forward(live.dit, x, tfull(ts[exit_step]), ckv, cache, start,
                            y=frame_slice(cond.y, start, nfb), pose=frame_slice(cond.pose_tokens, start, nfb))
        return None, sampling.x0_from_flow(x, flow, sig[exit_step])

    _, x0s = jax.lax.scan(grad_block, None, (x_exit, starts))
    return to_video(x0s)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def dmd_grad_loss(x0: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> tuple[jax.Array, dict]:
    """DMD distribution-matching loss (self_forcing.md 5.4 steps 5-6), float32.

    ``grad = nan_to_num((x0_fake - x0_real) / mean_{non-batch}(|x0 - x0_real|))`` (normaliser per
    sample, everything stop-gradient) and ``loss = 0.5 mean((x0 - sg(x0 - grad))^2)``, whose value is
    ``0.5 mean(grad^2)`` and whose gradient w.r.t. x0 is ``grad / x0.size``.

    Args: x0 [B, ...] generated sample (carries the generator's gradient); x0_real, x0_fake [B, ...]
    teacher (with CFG) and critic x0 predictions at the same noised point.
    Returns: (loss scalar, aux with ``dmd_grad_norm`` = mean|grad| and ``dmd_normalizer``).
    """
    if not (x0.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(f"shapes differ: x0 {x0.shape}, real {x0_real.shape}, fake {x0_fake.shape}")
    sg = jax.lax.stop_gradient
    x = x0.astype(F32)
    real, fake = sg(x0_real).astype(F32), sg(x0_fake).astype(F32)
    axes = tuple(range(1, x.ndim))
    norm = jnp.mean(jnp.abs(sg(x) - real), axis=axes, keepdims=True)
    grad = sg(jnp.nan_to_num((fake - real) / norm))
    loss = 0.5 * jnp.mean(jnp.square(x - sg(x - grad)))
    aux = {"dmd_loss": loss, "dmd_grad_norm": jnp.mean(jnp.abs(grad)), "dmd_normalizer": jnp.mean(norm)}
    return loss, aux


def _x0_bidirectional(model, x_t: jax.Array, t: jax.Array, cond: Cond, grid: sampling.FlowMatchGrid
                      ) -> tuple[jax.Array, jax.Array]:
    """Full bidirectional forward at per-sample timesteps t [B]: (flow, x0) float32, the x0 with
    sigma looked up on ``grid`` (the model's own grid)."""
    B, F_ = x_t.shape[:2]
    tb = jnp.broadcast_to(t.astype(F32)[:, None], (B, F_))
    flow = model(x_t, tb, cond.context, clip_fea=cond.clip_fea, y=cond.y, pose_tokens=cond.pose_tokens,
                 causal=False).astype(F32)
    x0 = sampling.x0_from_flow(x_t.astype(F32), flow, grid.lookup_sigma(t))
    return flow, x0


def critic_flow_loss(critic, x0: jax.Array, cond: Cond, key: jax.Array, grid: sampling.FlowMatchGrid, *,
                     score_grid: sampling.FlowMatchGrid | None = None, min_step: int = 20,
                     max_step: int = 980) -> tuple[jax.Array, dict]:
    """The fake score's flow-matching loss on generated samples (self_forcing.md 5.5).

    ``k_t, k_eps = jax.random.split(key)``; ``t = sample_dmd_timestep(k_t, B, shift=grid.shift, ...)``;
    ``eps = normal(k_eps, x0.shape, float32)``; ``x_t = (1 - s_g) sg(x0) + s_g eps`` with ``s_g`` the
    generator grid's sigma at t; ``x0_hat = x_t - s_c * v_critic(x_t, t)`` with ``s_c`` from
    ``score_grid`` (the critic's own, default = ``grid``); ``v_hat = (x_t - x0_hat) / s_g``;
    ``loss = mean((v_hat - (eps - x0))^2)``, unweighted (``denoising_loss_type: flow``).

    Args: critic (bidirectional PoseDiT), x0 [B, F, h, w, C] generated sample (stop-gradient),
    cond the critic's :class:`Cond`, grid the generator's :class:`FlowMatchGrid`.
    Returns: (loss, aux with ``critic_loss`` and the drawn ``t`` [B]).
    """
    score_grid = grid if score_grid is None else score_grid
    k_t, k_eps = jax.random.split(key)
    x = jax.lax.stop_gradient(x0).astype(F32)
    B = x.shape[0]
    t = sample_dmd_timestep(k_t, B, shift=grid.shift, num_train_timesteps=grid.num_train_timesteps,
                            min_step=min_step, max_step=max_step)
    eps = jax.random.normal(k_eps, x.shape, F32)
    s_g = grid.lookup_sigma(t)
    x_t = sampling.renoise(x, eps, s_g)
    _, x0_hat = _x0_bidirectional(critic, x_t, t, cond, score_grid)
    v_hat = sampling.flow_from_x0(x_t, x0_hat, s_g)
    loss = jnp.mean(jnp.square(v_hat - (eps - x)))
    return loss, {"critic_loss": loss, "critic_t": t}


def _concat_conds(a: Cond, b: Cond) -> Cond:
    """Two conditionings stacked on the batch axis; a field None in one is zeros there."""
    def cat(u, v):
        if u is None and v is None:
            return None
        u = jnp.zeros_like(v) if u is None else u
        v = jnp.zeros_like(u) if v is None else v
        return jnp.concatenate([u, v.astype(u.dtype)])
    return Cond(*(cat(u, v) for u, v in zip(a, b)))


def _split_keys(key: jax.Array) -> dict[str, jax.Array]:
    k = jax.random.split(key, 4)
    return {"noise": k[0], "rollout": k[1], "exit": k[2], "score": k[3]}


def _generate(student, batch: DMDBatch, keys: dict, cfg: DMDConfig, cond: Cond, with_grad: bool
              ) -> tuple[jax.Array, jax.Array]:
    F_, h, w = latent_shape(batch)
    B = batch.context.shape[0]
    dcfg = student.cfg.dit
    noise = jax.random.normal(keys["noise"], (B, F_, h, w, dcfg.out_dim), F32).astype(dcfg.compute_dtype)
    ts, sig = cfg.schedule()
    exit_step = sample_exit_step(keys["exit"], len(ts), cfg.last_step_only)
    x0 = rollout(student, noise, cond, keys["rollout"], exit_step=exit_step, sigmas=sig, timesteps=ts,
                 nfb=cfg.num_frame_per_block, context_t=cfg.context_t, context_sigma=cfg.context_sigma,
                 with_grad=with_grad)
    return x0, exit_step


def generator_loss(student, teacher, critic, batch_cond: DMDBatch, key: jax.Array, cfg: DMDConfig
                   ) -> tuple[jax.Array, dict]:
    """DMD generator objective (self_forcing.md 5.4): rollout -> noise at a DMD timestep -> teacher
    (CFG) and critic x0 -> :func:`dmd_grad_loss`. Only the student gets gradient (its pose
    encoders included: its conditioning is resolved inside); teacher and critic outputs are
    stop-gradient.

    Keys: ``split(key, 4)`` = (initial noise, rollout, exit step, score); the score key splits into
    (t, eps) as in :func:`critic_flow_loss`.
    Returns: (loss, aux: dmd_loss, dmd_grad_norm, dmd_normalizer, exit_step, t [B]).
    """
    sg = jax.lax.stop_gradient
    keys = _split_keys(key)
    x0, exit_step = _generate(student, batch_cond, keys, cfg, resolve_cond(student, batch_cond), True)
    grid, score_grid = cfg.grid(), cfg.score_grid()
    k_t, k_eps = jax.random.split(keys["score"])
    B = x0.shape[0]
    t = sample_dmd_timestep(k_t, B, shift=cfg.shift, num_train_timesteps=cfg.num_train_timesteps,
                            min_step=cfg.min_step, max_step=cfg.max_step)
    eps = jax.random.normal(k_eps, x0.shape, F32)
    x_t = sg(sampling.renoise(x0.astype(F32), eps, grid.lookup_sigma(t)))
    _, x0_fake = _x0_bidirectional(critic, x_t, t, sg(resolve_cond(critic, batch_cond)), score_grid)
    pos = sg(resolve_cond(teacher, batch_cond))
    g = cfg.guidance_scale
    if isinstance(g, (int, float)) and float(g) == 0.0:
        _, x0_real = _x0_bidirectional(teacher, x_t, t, pos, score_grid)
    else:
        # both CFG branches in one teacher call of batch 2B (the negative's missing pose tokens are
        # zeros: adding zero tokens is exactly adding none)
        neg = pos._replace(context=batch_cond.neg_context, pose_tokens=None)  # resolve_cond(negative=True)
        both = _concat_conds(pos, neg)
        _, x0_both = _x0_bidirectional(teacher, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both,
                                       score_grid)
        x0_real = sampling.cfg_x0_dmd(x0_both[:B], x0_both[B:], g)
    loss, aux = dmd_grad_loss(x0, sg(x0_real), sg(x0_fake))
    aux.update(exit_step=exit_step, t=t)
    return loss, aux


def critic_loss(critic, student, batch_cond: DMDBatch, key: jax.Array, cfg: DMDConfig) -> tuple[jax.Array, dict]:
    """Critic (fake score) objective (self_forcing.md 5.5): a stop-gradient rollout of the student
    (same key derivation as :func:`generator_loss`), then :func:`critic_flow_loss` with the critic's
    own conditioning (its pose encoders get gradient) and the score key.
    Returns: (loss, aux: critic_loss, critic_t [B], exit_step)."""
    sg = jax.lax.stop_gradient
    keys = _split_keys(key)
    x0, exit_step = _generate(student, batch_cond, keys, cfg, sg(resolve_cond(student, batch_cond)), False)
    loss, aux = critic_flow_loss(critic, sg(x0), resolve_cond(critic, batch_cond), keys["score"], cfg.grid(),
                                 score_grid=cfg.score_grid(), min_step=cfg.min_step, max_step=cfg.max_step)
    aux["exit_step"] = exit_step
    return loss, aux


__all__ = ["Cond", "DMDBatch", "DMDConfig", "resolve_cond", "latent_shape", "sample_dmd_timestep",
           "sample_exit_step", "exit_forward", "rollout", "dmd_grad_loss", "critic_flow_loss", "generator_loss",
           "critic_loss"]

