"""Teacher-target generation: run the pose-conditioned teacher on manifest samples and record its
sampling trajectory at the student's sigmas (issue 6, part 1; self_forcing.md 5.9).

Per sample (no batch dim; latents channels-last ``[F, h, w, C]``, h = H/8, w = W/8, C = 16), stored
with :class:`wanjax.data.targets.TargetWriter`:

==============  =========================  =====================================================
key             dtype / shape              meaning
==============  =========================  =====================================================
noise           f32 [F, h, w, C]           initial noise, ``normal(key(seed), [1, F, h, w, C])[0]``
context         f32 [text_len, text_dim]   T5 embedding of the row's prompt (zero-padded)
clip_fea        f32 [N, image_dim]         CLIP tokens of the reference (I2V teachers only; N = 257)
ref_y           f32 [F, h, w, 20]          4 mask channels + VAE latent of (ref, grey, ...): exactly
                                           ``wanjax.pipeline.build_y(..., ref_pose_feat=None)``; no
                                           ref-pose features (add them with ``unianimate.condition_y``)
ref_pose        f32 [H, W, 3]              reference pose drawing in [0, 1]
pose            u8  [num_frames, H, W, 3]  driving pose frames (no repeated leading frames)
pose_trunk      f32 [F, h, w, hidden]      the teacher's pose-stack trunk on those frames
                                           (``PoseConditioner.trunk_features`` of
                                           ``ode.pad_pose_video(pose)``; pose modes only). A student
                                           whose frozen trunk has the same ``pose_trunk_sha256``
                                           (sample meta, ``pose.trunk_fingerprint``) can train on it
                                           instead of the frames (configs/distill.py
                                           ``pose_trunk_cached``)
traj            f32 [S, F, h, w, C]        teacher latent x_sigma at the student's sigmas (S = 4)
traj_sigmas     f32 [S]                    the sigma of each traj entry
x0              f32 [F, h, w, C]           final teacher latent
==============  =========================  =====================================================

Teacher sampling. The model, CFG and schedules are those of :class:`wanjax.pipeline.teacher.
TeacherPipeline` (UniAnimate's asymmetric CFG: the negative branch has the negative prompt and no pose
tokens but the same y and CLIP; FlowMatch Euler on ``euler_sigmas`` with ``1000 sigma`` timesteps, or
Wan's UniPC), driven through :func:`wanjax.sampling.sample_euler` / :func:`wanjax.sampling.sample_unipc`
with a ``model_fn`` that records the states it is called with. Differences from TeacherPipeline: the
latents stay float32 (TeacherPipeline keeps them in the DiT compute dtype; identical for a float32
DiT), a batch of samples is denoised at once, and there are no sliding windows (all F latent frames
in one pass: 81 frames = 21 latents, UniAnimate's training length).

Trajectory at the student's sigmas (``wanjax.sampling.student_schedule``):

* ``euler`` - **exact sigmas**. The Euler path is piecewise linear in sigma: between grid points
  sigma_k >= s > sigma_{k+1} it is ``x(s) = x_k + v_k (s - sigma_k)``, with v_k the guided flow the
  sampler used at step k. ``traj[j]`` is that point for s = student sigma j (for s = sigma_k it is x_k
  itself), so ``traj_sigmas`` equals the student's sigmas and no extra model call is made; the
  trajectory itself is not perturbed.
* ``unipc`` - **nearest step**. UniPC's path is not piecewise linear, so ``traj[j]`` is the latent the
  teacher was evaluated at (x_k entering step k) for the step whose sigma is nearest to the student's,
  and ``traj_sigmas[j]`` is that step's sigma.

Data parallelism. Each host takes the groups of ``rows_per_shard`` consecutive manifest rows whose
group number g satisfies ``g % process_count == process_index``; group g is written as
``shard-{g:05d}.safetensors`` (all rows of a group, skipped rows left out, or an empty shard). Within
a host, the rows of a group run in batches of ``batch_size`` (default: the number of local devices)
with the batch dimension sharded over the local mesh's ``data x fsdp`` axes, the DiT parameters laid
out by the logical rules (FSDP over ``fsdp``, replicated when ``fsdp = 1``) and the small conditioning
encoders (VAE, CLIP, pose) replicated. A last short batch is padded with copies of its last sample,
whose outputs are dropped. T5 runs first (each distinct prompt once) and is freed before the DiT is
loaded, or ``prompt_embeds_path`` replaces it. A group is the unit of resumption:
its shard is written (atomically) once all its rows are done, so a killed run loses at most the group
in flight, and a restarted run recomputes exactly that group with the same batches, seeds and
arithmetic, which makes its shard bytes and index identical to an uninterrupted run's (checked on
CPU by the tests; on GPU this also needs deterministic kernels and autotuning, e.g.
``XLA_FLAGS=--xla_gpu_deterministic_ops=true``, and the same device count and mesh as before).
Multi-host: each host loads the teacher on its own local mesh and works independently (its loads
meet no other host: :func:`wanjax.checkpoint.restore_params` on a host-local mesh has no cross-host
barrier, so hosts may load at different times, or not at all when they have nothing to generate); at
the end every host, busy or not, reports how it finished ("ok" or its error) through the coordination
service's key-value store and waits for the others' reports; then process 0 writes the merged
``index.json``. A host that fails reports its error before it raises, so the others stop at once with
an error naming it (rather than waiting at a barrier until the coordination timeout); their finished
shards stay, and rerunning the same command on every host resumes.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import logging
import math
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from wanjax import sampling
from wanjax.data.manifest import ManifestError, ManifestRow, RowInputs, bad_row, load_manifest, read_row
from wanjax.data.targets import TargetError, TargetWriter, merge_index, shard_name
from wanjax.models import unianimate as ua
from wanjax.models.pose import trunk_fingerprint
from wanjax.pipeline import MODES, PipelineError, Y_CHANNELS
from wanjax.training.distributed import exchange_status

log = logging.getLogger("wanjax.distill.targets")

SAMPLERS = ("euler", "unipc")
TRAJ_MODES = {"euler": "exact_sigma", "unipc": "nearest_step"}


# ----------------------------------------------------------------------------------------------
# Pure helpers: seeds, noise, schedules, trajectory plan, row groups
# ----------------------------------------------------------------------------------------------
def sample_seed(sample_id: str, base_seed: int = 0) -> int:
    """Deterministic seed in [0, 2**31) from the sample id and the run's base seed (sha256)."""
    h = hashlib.sha256(f"{int(base_seed)}:{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def initial_noise(seed: int, shape: Sequence[int]) -> np.ndarray:
    """float32 ``shape`` = [F, h, w, C]: ``normal(key(seed), [1, *shape])[0]``, the noise
    TeacherPipeline.sample draws for ``seed``."""
    return np.asarray(jax.random.normal(jax.random.key(int(seed)), (1, *shape), jnp.float32))[0]


def teacher_schedule(sampler: str, steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """``(sigmas [N+1], timesteps [N])`` float32, as TeacherPipeline.schedule."""
    if sampler == "euler":
        sig = sampling.euler_sigmas(int(steps), float(shift))
        return sig, (sig[:-1] * 1000.0).astype(np.float32)
    if sampler == "unipc":
        return sampling.unipc_schedule(int(steps), float(shift))
    raise PipelineError(f"--config.sampler.name={sampler!r}; choose one of {list(SAMPLERS)}")


@dataclasses.dataclass(frozen=True)
class TrajPlan:
    """Which teacher step gives each trajectory entry. ``steps[j]``: teacher step k whose state (and,
    for exact_sigma, flow) makes traj[j]; ``sigmas[j]``: float32 sigma of traj[j]; ``mode``:
    exact_sigma | nearest_step."""
    steps: tuple[int, ...]
    sigmas: np.ndarray
    mode: str

    def by_step(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j, k in enumerate(self.steps):
            out.setdefault(k, []).append(j)
        return out


def trajectory_plan(sampler: str, sigmas: np.ndarray, student_sigmas: np.ndarray) -> TrajPlan:
    """See the module doc. ``sigmas`` [N+1] (last 0), ``student_sigmas`` [S] in (0, 1]."""
    sig = np.asarray(sigmas, np.float32)
    tgt = np.asarray(student_sigmas, np.float32)
    n = sig.shape[0] - 1
    if tgt.ndim != 1 or tgt.size == 0 or np.any(tgt <= 0) or np.any(tgt > 1):
        raise PipelineError(f"student sigmas {tgt.tolist()} must be a non-empty list in (0, 1] "
                            f"(--config.student.steps)")
    if sampler == "euler":
        steps = []
        for s in tgt:
            if s > sig[0]:
                raise PipelineError(f"student sigma {float(s)} lies above the teacher's first sigma {float(sig[0])}")
            steps.append(int(np.nonzero(sig[:n] >= s)[0].max()))
        return TrajPlan(tuple(steps), tgt.copy(), TRAJ_MODES[sampler])
    if sampler == "unipc":
        steps = [int(np.argmin(np.abs(sig[:n] - s))) for s in tgt]
        return TrajPlan(tuple(steps), sig[list(steps)].astype(np.float32), TRAJ_MODES[sampler])
    raise PipelineError(f"--config.sampler.name={sampler!r}; choose one of {list(SAMPLERS)}")


class TrajectoryRecorder:
    """Wraps a sampler ``model_fn(x, t) -> flow`` and records the trajectory entries of ``plan`` as the
    sampler calls it (call k = teacher step k, evaluated at ``sigmas[k]``): ``x_k + v_k (s_j - sigma_k)``
    for exact_sigma (the Euler path at s_j), ``x_k`` for nearest_step."""

    def __init__(self, plan: TrajPlan, sigmas: np.ndarray):
        self.plan, self.sigmas = plan, np.asarray(sigmas, np.float32)
        self._by_step = plan.by_step()
        self._got: dict[int, jax.Array] = {}
        self._k = 0

    def wrap(self, model_fn: Callable, on_step: Callable[[int, int], None] | None = None) -> Callable:
        total = self.sigmas.shape[0] - 1

        def recording_fn(x, t):
            k = self._k
            v = model_fn(x, t)
            for j in self._by_step.get(k, ()):
                if self.plan.mode == "exact_sigma":
                    self._got[j] = x + v * np.float32(self.plan.sigmas[j] - self.sigmas[k])
                else:
                    self._got[j] = x
            self._k = k + 1
            if on_step is not None:
                jax.block_until_ready(v)
                on_step(k + 1, total)
            return v

        return recording_fn

    def stack(self, axis: int = 0) -> jax.Array:
        """The S recorded entries stacked along ``axis`` (e.g. 1 for a batch: [B, S, ...])."""
        missing = [j for j in range(len(self.plan.steps)) if j not in self._got]
        if missing:
            raise RuntimeError(f"trajectory entries {missing} were not recorded (teacher steps "
                               f"{[self.plan.steps[j] for j in missing]} never ran)")
        return jnp.stack([self._got[j] for j in range(len(self.plan.steps))], axis=axis)


def row_groups(rows: Sequence[ManifestRow], num_rows: int, rows_per_shard: int) -> list[list[ManifestRow]]:
    """Group g = rows with ``index // rows_per_shard == g`` (skipped rows leave holes), for every g."""
    if rows_per_shard < 1:
        raise PipelineError(f"--config.data.rows_per_shard={rows_per_shard} must be >= 1")
    groups: list[list[ManifestRow]] = [[] for _ in range(math.ceil(num_rows / rows_per_shard))]
    for r in rows:
        groups[r.index // rows_per_shard].append(r)
    return groups


def host_groups(num_groups: int, process_index: int, process_count: int) -> list[int]:
    """Groups dealt round-robin to hosts: ``g % process_count == process_index``."""
    return [g for g in range(num_groups) if g % process_count == process_index]


def batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------
# Jitted model pieces (graphdefs are static, so equal models share compiled code across runs)
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 2, 4, 6, 7))
def _conditioning(vae_gd, vae_st, clip_gd, clip_st, pose_gd, pose_st, num_latent: int, mode: str,
                  ref_u8, pose_u8, ref_pose):
    """Batched reference and pose conditioning.

    ref_u8 uint8 [B, H, W, 3]; pose_u8 uint8 [B, T, H, W, 3] (T = 4(F-1)+1); ref_pose f32 [B, H, W, 3].
    Returns ref_y [B, F, h, w, 20] (build_y without ref-pose features), clip_fea [B, N, Di] or None,
    ref-pose features [B, h, w, 20], pose tokens [B, F, H/16, W/16, D] (float32) and the pose trunk's
    features [B, F, h, w, hidden] as the student computes them (``ode.pad_pose_video``), or Nones
    (image mode).
    """
    from wanjax.distill.ode import pad_pose_video
    from wanjax.image import encode_image, to_model_range

    ref = to_model_range(ref_u8)
    B, H, W, _ = ref.shape
    T = 4 * (num_latent - 1) + 1
    video = jnp.zeros((B, T, H, W, 3), jnp.float32).at[:, 0].set(ref)
    lat = nnx.merge(vae_gd, vae_st).encode(video).astype(jnp.float32)
    h, w = lat.shape[2:4]
    mask = jnp.zeros((B, num_latent, h, w, 4), jnp.float32).at[:, 0].set(1.0)
    ref_y = jnp.concatenate([mask, lat], axis=-1)
    clip_fea = None if clip_gd is None else encode_image(nnx.merge(clip_gd, clip_st), ref).astype(jnp.float32)
    feat = tokens = trunk = None
    if mode != "image":
        pose_m = nnx.merge(pose_gd, pose_st)
        feat = pose_m.ref_pose_features(ref_pose)
        padded = jnp.concatenate([jnp.repeat(pose_u8[:, :1], 3, axis=1), pose_u8], axis=1)
        tokens = pose_m.pose_features(padded.astype(jnp.float32) / 255.0)
        trunk = pose_m.trunk_features(pad_pose_video(pose_u8)).astype(jnp.float32)
    return ref_y, clip_fea, feat, tokens, trunk


def teacher_inputs(mode: str, ref_y, clip_fea, feat, tokens):
    """DiT inputs ``(y, clip_fea, pose_tokens)`` for ``mode`` from the raw conditioning (module
    :mod:`wanjax.models.unianimate` semantics): pose+image y = ref_y + feat; image y = ref_y and no
    pose tokens; pose y = 0 + feat and CLIP zeros."""
    if mode == "pose+image":
        return ua.condition_y(ref_y, feat), clip_fea, tokens
    if mode == "image":
        return ref_y, clip_fea, None
    if mode == "pose":
        clip0 = None if clip_fea is None else jnp.zeros_like(clip_fea)
        return ua.condition_y(jnp.zeros_like(ref_y), feat), clip0, tokens
    raise PipelineError(f"--config.conditioning.mode={mode!r}; choose one of {list(MODES)}")


@functools.partial(jax.jit, static_argnums=(0,))
def _context_kv(gd, st, context, clip_fea):
    return nnx.merge(gd, st).context_kv(context, clip_fea)


@functools.partial(jax.jit, static_argnums=(0,))
def _guided_flow(gd, st, x, t, ckv_pos, ckv_neg, y, tokens, scale):
    """UniAnimate CFG flow (float32): ``v_neg + scale (v_pos - v_neg)``; the negative branch drops
    the pose tokens and keeps y / CLIP; ``ckv_neg`` None = no guidance."""
    m = nnx.merge(gd, st)
    cdt = m.cfg.compute_dtype
    tt = jnp.full(x.shape[:2], t, jnp.float32)
    pose = None if tokens is None else tokens.astype(cdt)
    y = y.astype(cdt)
    v_pos = m(x.astype(cdt), tt, ckv=ckv_pos, y=y, pose=pose).astype(jnp.float32)
    if ckv_neg is None:
        return v_pos
    v_neg = m(x.astype(cdt), tt, ckv=ckv_neg, y=y, pose=None).astype(jnp.float32)
    return sampling.cfg(v_neg, v_pos, scale)


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """One sample ready for the teacher: its read inputs, text context [text_len, text_dim], seed."""
    inputs: RowInputs
    context: np.ndarray
    seed: int


def local_mesh(mesh_cfg):
    """``(data, fsdp, tensor)`` mesh over this host's devices (hosts work independently)."""
    from wanjax import sharding as shd

    devs = jax.local_devices()
    try:
        return shd.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor), devices=devs)
    except ValueError as e:
        raise PipelineError(f"--config.mesh: {e} ({len(devs)} local devices)") from None


class TeacherTargets:
    """A loaded teacher (``PoseDiT`` adapter + VAE + CLIP) that turns batches of :class:`Item` into
    target dicts (see the module doc for keys and shapes)."""

    def __init__(self, model, vae, clip, *, mesh, negative: np.ndarray | None, num_frames: int,
                 height: int, width: int, mode: str = "pose+image", sampler: str = "euler", steps: int = 50,
                 shift: float = 5.0, cfg_scale: float = 1.5, student_sigmas: np.ndarray | None = None,
                 batch_size: int | None = None):
        from wanjax.pipeline import PoseDiT, check_mode, latent_frames

        self.model = PoseDiT.wrap(model)
        check_mode(mode, self.model)
        if not self.model.uses_y:
            raise PipelineError(f"the teacher DiT has in_dim={self.model.cfg.in_dim}: teacher targets need an I2V "
                                f"DiT with y input (in_dim = out_dim + {Y_CHANNELS}), e.g. preset teacher_14b")
        if vae is None:
            raise PipelineError("teacher targets need the VAE (--config.vae_dir or ckpt_dir/vae)")
        if self.model.uses_clip and clip is None:
            raise PipelineError("this teacher is I2V and needs CLIP weights: set --config.clip_dir")
        if height % 16 or width % 16:
            raise PipelineError(f"--config.height/width {height}x{width} must be multiples of 16")
        self.num_frames, self.F = int(num_frames), latent_frames(int(num_frames))
        self.H, self.W = int(height), int(width)
        self.mode, self.sampler = mode, sampler
        self.cfg_scale = float(cfg_scale)
        if self.cfg_scale != 1.0 and negative is None:
            raise PipelineError("cfg_scale != 1 needs the negative prompt context")
        self.negative = None if self.cfg_scale == 1.0 else np.asarray(negative, np.float32).reshape(
            1, *np.shape(negative)[-2:])
        self.mesh = mesh
        self.batch_size = int(batch_size or (len(mesh.devices.flat) if mesh is not None else 1))
        self.sigmas, self.timesteps = teacher_schedule(sampler, steps, shift)
        if student_sigmas is None:
            student_sigmas = sampling.student_schedule()[1]
        self.plan = trajectory_plan(sampler, self.sigmas, student_sigmas)
        self._dit = nnx.split(self.model.dit)
        self._vae = nnx.split(vae)
        self._clip = nnx.split(clip) if self.model.uses_clip else (None, None)
        self._pose = nnx.split(self.model.pose) if mode != "image" else (None, None)
        # which trunk the stored pose_trunk features belong to (None: image mode stores none)
        self.pose_trunk_sha256 = trunk_fingerprint(self.model.pose) if mode != "image" else None
        dcfg = self.model.cfg
        self.latent_shape = (self.F, self.H // 8, self.W // 8, dcfg.out_dim)
        self.text_shape = (dcfg.text_len, dcfg.text_dim)

    def _place(self, a):
        a = jnp.asarray(a)
        if self.mesh is None:
            return a
        from wanjax.sharding import named_sharding

        return jax.device_put(a, named_sharding(self.mesh, "batch", *(None,) * (a.ndim - 1), shape=a.shape))

    def _pad_context(self, ctx: np.ndarray, what: str) -> np.ndarray:
        L, D = self.text_shape
        ctx = np.asarray(ctx, np.float32)
        if ctx.ndim != 2 or ctx.shape[1] != D or ctx.shape[0] > L:
            raise PipelineError(f"{what}: text context of shape {ctx.shape}, expected [n <= {L}, {D}]")
        out = np.zeros((L, D), np.float32)
        out[:ctx.shape[0]] = ctx
        return out

    def run(self, items: Sequence[Item], progress: Callable[[int, int], None] | None = None
            ) -> list[dict[str, np.ndarray]]:
        """Denoise one batch (``len(items) <= batch_size``; padded internally). Returns one target
        dict per item, in order."""
        n = len(items)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"run() takes 1..{self.batch_size} items, got {n}")
        full = list(items) + [items[-1]] * (self.batch_size - n)
        want_pose, want_ref = (self.num_frames, self.H, self.W, 3), (self.H, self.W, 3)
        for it in full:
            if it.inputs.pose.shape != want_pose or it.inputs.ref.shape != want_ref:
                raise PipelineError(f"{it.inputs.row.where()}: inputs of shape ref {it.inputs.ref.shape}, pose "
                                    f"{it.inputs.pose.shape}; expected the config size {self.H}x{self.W}, "
                                    f"{self.num_frames} frames")
        ctx = np.stack([self._pad_context(it.context, it.inputs.row.where("prompt")) for it in full])
        noise = np.stack([initial_noise(it.seed, self.latent_shape) for it in full])
        ref_y, clip_fea, feat, tokens, trunk = _conditioning(
            self._vae[0], self._vae[1], self._clip[0], self._clip[1], self._pose[0], self._pose[1], self.F,
            self.mode, self._place(np.stack([it.inputs.ref for it in full])),
            self._place(np.stack([it.inputs.pose for it in full])),
            self._place(np.stack([it.inputs.ref_pose for it in full]).astype(np.float32)))
        y, clip_in, pose_in = teacher_inputs(self.mode, ref_y, clip_fea, feat, tokens)
        gd, st = self._dit
        cdt = self.model.cfg.compute_dtype
        ckv_pos = _context_kv(gd, st, self._place(ctx).astype(cdt), clip_in)
        ckv_neg = None
        if self.negative is not None:
            neg = np.broadcast_to(self._pad_context(self.negative[0], "negative prompt"), ctx.shape)
            ckv_neg = _context_kv(gd, st, self._place(np.ascontiguousarray(neg)).astype(cdt), clip_in)
        scale = jnp.float32(self.cfg_scale)
        rec = TrajectoryRecorder(self.plan, self.sigmas)
        model_fn = rec.wrap(lambda x, t: _guided_flow(gd, st, x, t, ckv_pos, ckv_neg, y, pose_in, scale), progress)
        x = self._place(noise)
        if self.sampler == "euler":
            x0 = sampling.sample_euler(model_fn, x, self.sigmas, self.timesteps)
        else:
            x0 = sampling.sample_unipc(model_fn, x, self.sigmas, self.timesteps)
        traj_b = rec.stack(axis=1)
        host = jax.device_get({"ref_y": ref_y, "clip_fea": clip_fea, "traj": traj_b, "x0": x0, "trunk": trunk})
        out = []
        for i, it in enumerate(items):
            d = {"noise": noise[i], "context": ctx[i]}
            if host["clip_fea"] is not None:
                d["clip_fea"] = np.asarray(host["clip_fea"][i], np.float32)
            d.update(ref_y=np.asarray(host["ref_y"][i], np.float32),
                     ref_pose=np.asarray(it.inputs.ref_pose, np.float32),
                     pose=np.asarray(it.inputs.pose, np.uint8),
                     traj=np.asarray(host["traj"][i], np.float32),
                     traj_sigmas=np.asarray(self.plan.sigmas, np.float32),
                     x0=np.asarray(host["x0"][i], np.float32))
            if host["trunk"] is not None:
                d["pose_trunk"] = np.asarray(host["trunk"][i], np.float32)
            out.append(d)
        return out


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
def _trim(ctx: np.ndarray) -> np.ndarray:
    """Drop the zero padding rows at the end of a [text_len, D] context."""
    nz = np.nonzero(np.any(ctx != 0, axis=1))[0]
    return ctx[:nz.max() + 1] if nz.size else ctx[:0]


def text_contexts(cfg, prompts: Sequence[str], text_len: int, text_dim: int, *, need_negative: bool,
                  mesh=None, chunk: int = 8) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``({prompt: context [n, text_dim]}, negative [text_len, text_dim] or None)`` as host arrays.

    ``cfg.prompt_embeds_path`` (an .npz with ``prompt`` and ``negative``, see
    :func:`wanjax.pipeline.encode_prompts`) replaces T5, and then every row must share one prompt.
    Otherwise T5 encodes each distinct prompt once and is freed before returning (before the DiT is
    loaded).
    """
    from wanjax import pipeline as P

    unique = list(dict.fromkeys(prompts))
    if cfg.prompt_embeds_path:
        if len(unique) > 1:
            raise PipelineError(f"--config.prompt_embeds_path={cfg.prompt_embeds_path} holds one prompt embedding "
                                f"but the manifest rows have {len(unique)} different prompts (e.g. {unique[0]!r}, "
                                f"{unique[1]!r}); unset prompt_embeds_path to encode them with T5")
        pos, neg = P.encode_prompts(cfg, text_len, text_dim, need_negative=need_negative)
        return {p: _trim(pos[0]) for p in unique}, (None if neg is None else neg[0])
    from wanjax.text import load_text_encoder

    t5_dir, tok_dir = P.resolve_dir(cfg, "t5_dir", "t5"), P.resolve_dir(cfg, "tokenizer_dir", "tokenizer")
    te = load_text_encoder(t5_dir, tok_dir, mesh=mesh, dtype=jnp.dtype(cfg.t5_dtype), text_len=text_len)
    if te.cfg.dim != text_dim:
        raise PipelineError(f"T5 checkpoint {t5_dir} has dim {te.cfg.dim}, the DiT expects text_dim={text_dim}")
    out: dict[str, np.ndarray] = {}
    for part in batches(unique, chunk):
        ctx = np.asarray(jax.device_get(te.encode(part)), np.float32)
        out.update({p: _trim(c) for p, c in zip(part, ctx)})
    neg = None
    if need_negative:
        neg = np.asarray(jax.device_get(te.encode([cfg.negative_prompt])), np.float32)[0]
    del te
    gc.collect()
    return out, neg


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def check_config(cfg) -> None:
    """Fail fast (before anything is loaded) on a bad config, naming the flag."""
    from wanjax.data.manifest import check_on_bad_row
    from wanjax.pipeline import latent_frames

    if not cfg.data.manifest:
        raise PipelineError("--config.data.manifest=FILE.jsonl is required")
    if not cfg.out_dir:
        raise PipelineError("--config.out_dir=DIR is required (the target shards go there)")
    try:
        check_on_bad_row(cfg.data.on_bad_row)
    except ManifestError as e:
        raise PipelineError(f"--config.data.{e}") from None
    if cfg.conditioning.mode not in MODES:
        raise PipelineError(f"--config.conditioning.mode={cfg.conditioning.mode!r}; choose one of {list(MODES)}")
    if cfg.sampler.name not in SAMPLERS:
        raise PipelineError(f"--config.sampler.name={cfg.sampler.name!r}; choose one of {list(SAMPLERS)}")
    if int(cfg.data.rows_per_shard) < 1:
        raise PipelineError(f"--config.data.rows_per_shard={cfg.data.rows_per_shard} must be >= 1")
    if int(cfg.batch_size) < 0:
        raise PipelineError(f"--config.batch_size={cfg.batch_size} must be >= 0 (0 = one per local device)")
    latent_frames(int(cfg.num_frames))
    if int(cfg.height) % 16 or int(cfg.width) % 16:
        raise PipelineError(f"--config.height/width {cfg.height}x{cfg.width} must be multiples of 16")


def sample_meta(cfg, item: Item, plan: TrajPlan, student_t: np.ndarray,
                pose_trunk_sha256: str | None = None) -> dict[str, Any]:
    r = item.inputs.row
    return {"id": r.id, "prompt": r.prompt, "seed": int(item.seed), "num_frames": int(cfg.num_frames),
            "H": int(cfg.height), "W": int(cfg.width), "teacher_preset": cfg.preset,
            "sampler": cfg.sampler.name, "steps": int(cfg.sampler.steps), "cfg_scale": float(cfg.sampler.cfg_scale),
            "shift": float(cfg.sampler.shift), "conditioning_mode": cfg.conditioning.mode,
            "dtype": cfg.dtype, "student_timesteps": [float(t) for t in student_t],
            "traj_mode": plan.mode, "traj_teacher_steps": list(plan.steps), "manifest_line": r.line,
            "manifest_row": r.index, "source": dict(r.raw), "ref_pose_source": item.inputs.ref_pose_source,
            "pose_trunk_sha256": pose_trunk_sha256}


def replicate(module, mesh):
    """Place every variable of ``module`` (in place) fully replicated over ``mesh``."""
    from jax.sharding import NamedSharding, PartitionSpec

    if module is not None and mesh is not None:
        nnx.update(module, jax.device_put(nnx.state(module), NamedSharding(mesh, PartitionSpec())))
    return module


def load_teacher(cfg, mesh):
    """DiT + pose + VAE + CLIP through the :mod:`wanjax.pipeline` loaders (call after the text step).

    The DiT is laid out over ``mesh`` by the logical rules (FSDP / tensor per ``cfg.mesh``); the
    conditioning encoders (VAE, CLIP, pose conditioner: small next to the DiT) are replicated, so their
    batch-sharded convolutions run without communication (and compile much faster than FSDP-sharded).
    """
    from wanjax import pipeline as P

    dit = P.load_dit(cfg, mesh)
    pose = replicate(P.load_pose(cfg), mesh) if cfg.conditioning.mode != "image" else None
    model = P.PoseDiT(dit, pose)
    P.check_mode(cfg.conditioning.mode, model)
    vae = replicate(P.load_vae(cfg), mesh)
    clip = replicate(P.load_clip(cfg), mesh) if model.uses_clip else None
    return model, vae, clip


# hosts report how they finished under this key (one per job, not per path: hosts may mount the
# output directory at different paths)
_STATUS_KEY = "wanjax_teacher_targets_status"


def generate_targets(cfg, *, progress: bool = True, on_batch: Callable[[int], None] | None = None) -> dict:
    """Run the teacher over this host's share of the manifest and write target shards to
    ``cfg.out_dir`` (see the module doc). ``on_batch(n)`` is called after every finished batch (n
    counts from 1; a test hook that may raise to simulate a kill). Returns a summary dict.

    Multi-host: a host that fails reports its error to the others (``exchange_status``) before it
    raises; the others, once done, raise a :class:`TargetError` that names it instead of waiting."""
    try:
        summary = _generate(cfg, progress=progress, on_batch=on_batch)
    except BaseException as e:
        if jax.process_count() > 1:
            exchange_status(_STATUS_KEY, f"{type(e).__name__}: {e}"[:2000], wait=False)
        raise
    _finish(cfg.out_dir, jax.process_count())
    return summary


def _generate(cfg, *, progress: bool, on_batch) -> dict:
    from tqdm import tqdm

    from wanjax import pipeline as P
    from wanjax.checkpoint import read_config

    check_config(cfg)
    t_start = time.perf_counter()
    manifest = load_manifest(cfg.data.manifest, on_bad_row=cfg.data.on_bad_row)
    proc, nproc = jax.process_index(), jax.process_count()
    groups = row_groups(manifest.rows, manifest.num_rows, int(cfg.data.rows_per_shard))
    mine = host_groups(len(groups), proc, nproc)
    writer = TargetWriter(cfg.out_dir, process_index=proc, process_count=nproc)
    done = writer.done_shards()
    todo = [g for g in mine if shard_name(g) not in done]
    summary = {"groups": len(mine), "groups_done_before": len(mine) - len(todo), "samples": 0, "skipped": 0,
               "out_dir": str(cfg.out_dir), "manifest_skipped": len(manifest.skipped)}
    log.info("host %d/%d: %d of its %d shards already written, %d to generate", proc, nproc,
             summary["groups_done_before"], len(mine), len(todo))
    if not todo:
        writer.close()
        return summary

    mesh = local_mesh(cfg.mesh)
    dit_dir = P.resolve_dir(cfg, "model_dir", "dit")
    raw = read_config(dit_dir)
    need_neg = float(cfg.sampler.cfg_scale) != 1.0
    prompts = [r.prompt for g in todo for r in groups[g]]
    contexts, negative = text_contexts(cfg, prompts, int(raw.get("text_len", 512)), int(raw["text_dim"]),
                                       need_negative=need_neg, mesh=mesh)
    model, vae, clip = load_teacher(cfg, mesh)
    gen = TeacherTargets(model, vae, clip, mesh=mesh, negative=negative, num_frames=int(cfg.num_frames),
                         height=int(cfg.height), width=int(cfg.width), mode=cfg.conditioning.mode,
                         sampler=cfg.sampler.name, steps=int(cfg.sampler.steps), shift=float(cfg.sampler.shift),
                         cfg_scale=float(cfg.sampler.cfg_scale),
                         student_sigmas=sampling.student_schedule(float(cfg.student.shift),
                                                                  tuple(cfg.student.steps))[1],
                         batch_size=int(cfg.batch_size) or None)
    student_t = sampling.student_schedule(float(cfg.student.shift), tuple(cfg.student.steps))[0]
    log.info("teacher loaded in %.1fs; batch %d on a %s mesh", time.perf_counter() - t_start, gen.batch_size,
             dict(mesh.shape))
    bar = tqdm(total=sum(len(groups[g]) for g in todo), unit="sample", desc="teacher targets", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    n_batches = 0
    try:
        for g in todo:
            items = []
            for row in groups[g]:
                try:
                    inputs = read_row(row, gen.H, gen.W, gen.num_frames, pad_last=bool(cfg.pose.pad_last),
                                      start=int(cfg.pose.start))
                except ManifestError as e:
                    bad_row(str(e), cfg.data.on_bad_row)
                    summary["skipped"] += 1
                    bar.update(1)
                    continue
                seed = row.seed if row.seed is not None else sample_seed(row.id, int(cfg.seed))
                items.append(Item(inputs, contexts[row.prompt], seed))
            for chunk in batches(items, gen.batch_size):
                step_cb = (lambda k, n: bar.set_postfix_str(f"step {k}/{n}", refresh=True)) if progress else None
                for it, arrays in zip(chunk, gen.run(chunk, progress=step_cb)):
                    writer.add(it.inputs.row.id, arrays,
                               sample_meta(cfg, it, gen.plan, student_t, gen.pose_trunk_sha256))
                summary["samples"] += len(chunk)
                bar.update(len(chunk))
                rate = summary["samples"] / max(time.perf_counter() - t0, 1e-9) * 3600.0
                bar.set_postfix_str(f"{rate:.1f} samples/h", refresh=False)
                n_batches += 1
                if on_batch is not None:
                    on_batch(n_batches)
            writer.flush(shard=g)
    except BaseException:
        writer.abort()  # the group in flight is lost, as in a kill; its shard is redone on resume
        bar.close()
        raise
    bar.close()
    writer.close()
    elapsed = time.perf_counter() - t0
    summary.update(seconds=elapsed, samples_per_hour=summary["samples"] / max(elapsed, 1e-9) * 3600.0)
    return summary


def _finish(out_dir, process_count: int) -> None:
    """Multi-host: wait for every host to report; if one failed, raise naming it (this host's shards
    are complete); else process 0 writes the merged index.json."""
    if process_count > 1:
        seen = exchange_status(_STATUS_KEY, "ok")
        failed = {p: s for p, s in sorted(seen.items()) if s != "ok"}
        if failed:
            raise TargetError(f"{out_dir}: host(s) {', '.join(map(str, failed))} of {process_count} failed ("
                              + "; ".join(f"host {p}: {s}" for p, s in failed.items()) + "). This host's shards "
                              "are complete; fix the cause and rerun the same command on every host to resume.")
        if jax.process_index() == 0:
            merge_index(out_dir)


__all__ = ["TeacherTargets", "Item", "TrajPlan", "TrajectoryRecorder", "generate_targets", "trajectory_plan", "teacher_schedule",
           "sample_seed", "initial_noise", "row_groups", "host_groups", "text_contexts", "teacher_inputs",
           "local_mesh", "load_teacher", "replicate", "check_config", "sample_meta"]
