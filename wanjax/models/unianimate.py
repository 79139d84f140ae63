"""UniAnimate-DiT: a Wan DiT plus the pose conditioner, as one Flax NNX model (:class:`PoseDiT`).

Spec: /work/shared/docs/unianimate_dit.md sections 1, 3.4, 4, 5, 6, 12.2.

Parameter tree (``/``-joined, used by ``converters/unianimate.py`` and ``converters/merge_lora.py``)::

    dit/...    a :class:`wanjax.models.dit.WanDiT` (I2V: in_dim 36, img_emb, k_img / v_img)
    pose/...   a :class:`wanjax.models.pose.PoseConditioner` (dwpose_embedding, randomref_embedding_pose,
               optional pose_proj)

Data flow (UA ``model_fn_wan_video``, spec 3.4 and 4)::

    pose_tokens = encode_pose(pose_video)            [B, F, H/16, W/16, dit.dim]   added after patchify
    ref_feat    = encode_ref_pose(ref_pose)          [B, H/8, W/8, 20]
    y           = condition_y(ref_latent_y, ref_feat)  y + ref_feat broadcast over frames, all 20 channels
    flow        = model(x, t, context, clip_fea=..., y=y, pose_tokens=pose_tokens)

Conditioning modes (``resolve_conditioning``; config key ``conditioning.mode``):

``"pose+image"`` (default)
    Everything, as UA inference: CLIP tokens of the reference image, ``y`` = mask + reference VAE latent
    plus the reference-pose features, and the driving pose tokens. Needs ``clip_fea``, ``ref_latent_y``
    (``--ref``), ``pose_tokens`` (``--pose``) and ``ref_pose_feat`` (``--ref-pose``).
``"image"``
    Plain Wan I2V: CLIP tokens and ``y`` = the reference latent without the reference pose; no pose
    tokens. Needs ``clip_fea`` and ``ref_latent_y`` (``--ref``); pose inputs, if given, are ignored.
    (This is also UA's training-time pose dropout: pose tokens and ref pose dropped together, 5%.)
``"pose"``
    Pose only, with UA's *image-dropout* semantics (training step 3, spec 10.3): CLIP features and
    ``y`` are zeros and the reference-pose features are added afterwards (``y = 0 + ref_feat``), so the
    reference pose survives. Needs ``pose_tokens`` (``--pose``) and ``ref_pose_feat`` (``--ref-pose``).

A missing input for the chosen mode raises :class:`ConditioningError` naming the flag.
The CFG negative branch of UA (spec 6) is ``pose_tokens=None`` with the *same* ``y`` (ref pose kept).

Student (spec 12.2): the 1.3B T2V backbone is widened to in_dim 36 with the I2V image branch;
:func:`init_student_from_backbone` copies the backbone and zeroes everything new (the 20 extra input
channels of ``patch_embedding``, ``v_img``, ``pose_proj``) so that the student equals the backbone at
step 0. Causal rollouts call :meth:`PoseDiT.forward_cached` per block; the caller slices the pose
tokens and ``y`` to the block's frames (:func:`frame_slice`), in the denoising passes and in the
clean cache-refresh pass alike, with the same absolute frame index as RoPE.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401  (flax config)
from wanjax.checkpoint import flatten_params
from wanjax.models.dit import PRESETS as DIT_PRESETS
from wanjax.models.dit import CrossKV, KVCache, WanDiT, WanDiTConfig
from wanjax.models.pose import PoseConditioner, PoseConfig

MODES = ("pose+image", "image", "pose")
DEFAULT_MODE = "pose+image"


class ConditioningError(ValueError):
    """An input needed by the chosen conditioning mode is missing or has the wrong shape."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PoseDiTConfig:
    dit: WanDiTConfig
    pose: PoseConfig

    def __post_init__(self):
        if self.pose.token_dim != self.dit.dim:
            raise ValueError(f"pose tokens have width {self.pose.token_dim} (pose.out_dim={self.pose.out_dim}, "
                             f"pose.proj_dim={self.pose.proj_dim}) but the DiT width is dit.dim={self.dit.dim}; "
                             f"set pose.proj_dim={self.dit.dim} (or pose.out_dim)")
        if self.dit.i2v and self.pose.ref_dim != self.dit.in_dim - self.dit.out_dim:
            raise ValueError(f"pose.ref_dim={self.pose.ref_dim} must equal the y width "
                             f"dit.in_dim - dit.out_dim = {self.dit.in_dim - self.dit.out_dim}")

    def replace(self, **kw) -> "PoseDiTConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return {"dit": self.dit.to_dict(), "pose": self.pose.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PoseDiTConfig":
        """From ``{"dit": {...}, "pose": {...}}`` (extra top-level keys such as provenance are ignored)."""
        if "dit" not in d or "pose" not in d:
            raise ValueError(f"a PoseDiT config needs 'dit' and 'pose' sections, got keys {sorted(d)}")
        return cls(dit=WanDiTConfig.from_dict(dict(d["dit"])), pose=PoseConfig.from_dict(d["pose"]))


def _student_dit(base: WanDiTConfig) -> WanDiTConfig:
    """T2V backbone widened for the student: 16 noise + 20 y input channels and the I2V image branch."""
    return base.replace(in_dim=base.out_dim + 20, i2v=True)


PRESETS: dict[str, PoseDiTConfig] = {
    "tiny_teacher": PoseDiTConfig(DIT_PRESETS["tiny_i2v"], PoseConfig(hidden=4, out_dim=64, ref_dim=20)),
    # pose out_dim (96) wider than the DiT (64) with a projection, mirroring 5120 -> 1536
    "tiny_student": PoseDiTConfig(_student_dit(DIT_PRESETS["tiny"]),
                                  PoseConfig(hidden=4, out_dim=96, ref_dim=20, proj_dim=64)),
    "teacher_14b": PoseDiTConfig(DIT_PRESETS["i2v_14b"], PoseConfig(out_dim=5120)),
    "student_1_3b_pose": PoseDiTConfig(_student_dit(DIT_PRESETS["t2v_1_3b"]),
                                       PoseConfig(out_dim=5120, proj_dim=1536)),
}


def get_config(name: str) -> PoseDiTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown PoseDiT preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------------------------
# Conditioning modes
# ----------------------------------------------------------------------------------------------
class Conditioning(NamedTuple):
    """What the DiT gets: ``clip_fea`` [B, N, 1280], ``y`` [B, F, h, w, 20], ``pose_tokens`` or None."""
    clip_fea: jax.Array
    y: jax.Array
    pose_tokens: jax.Array | None


_FLAGS = {
    "clip_fea": "clip_fea (CLIP tokens of the reference image: --ref)",
    "ref_latent_y": "ref_latent_y (mask + VAE latent of the reference image: --ref)",
    "pose_tokens": "pose_tokens (encoded driving pose video: --pose)",
    "ref_pose_feat": "ref_pose_feat (encoded pose drawing of the reference image: --ref-pose)",
}
_NEEDS = {
    "pose+image": ("clip_fea", "ref_latent_y", "pose_tokens", "ref_pose_feat"),
    "image": ("clip_fea", "ref_latent_y"),
    "pose": ("pose_tokens", "ref_pose_feat"),
}


def condition_y(y: jax.Array, ref_feat: jax.Array) -> jax.Array:
    """``y`` [B, F, h, w, C] + ``ref_feat`` [B, h, w, C] broadcast over frames and all C (=20) channels
    (4 mask + 16 VAE, spec 4 and 14.3)."""
    if y.ndim != 5 or ref_feat.ndim != 4 or y.shape[:1] + y.shape[2:] != ref_feat.shape:
        raise ConditioningError(f"condition_y: y {tuple(y.shape)} [B, F, h, w, 20] and ref-pose features "
                                f"{tuple(ref_feat.shape)} [B, h, w, 20] disagree (same batch, latent size and "
                                f"channels needed; the reference pose must be H x W like the video)")
    return y + ref_feat[:, None].astype(y.dtype)


def resolve_conditioning(mode: str, *, clip_fea=None, ref_latent_y=None, pose_tokens=None,
                         ref_pose_feat=None, clip_tokens: int = 257, image_dim: int = 1280) -> Conditioning:
    """Turn the available inputs into the DiT inputs for ``mode`` (see the module docstring).

    In ``"pose"`` mode with no ``clip_fea``/``ref_latent_y`` the zero tensors get their shapes from
    ``ref_pose_feat`` ([B, h, w, 20]), the frame count of ``pose_tokens`` and ``clip_tokens`` x ``image_dim``.
    """
    if mode not in MODES:
        raise ConditioningError(f"unknown conditioning.mode {mode!r}; choose one of {list(MODES)}")
    given = dict(clip_fea=clip_fea, ref_latent_y=ref_latent_y, pose_tokens=pose_tokens,
                 ref_pose_feat=ref_pose_feat)
    missing = [n for n in _NEEDS[mode] if given[n] is None]
    if missing:
        raise ConditioningError(f"conditioning.mode={mode!r} needs " + ", ".join(_FLAGS[n] for n in missing)
                                + "; pass it or choose another conditioning.mode (one of "
                                + ", ".join(repr(m) for m in MODES) + ")")
    if mode == "pose+image":
        return Conditioning(clip_fea, condition_y(ref_latent_y, ref_pose_feat), pose_tokens)
    if mode == "image":
        return Conditioning(clip_fea, ref_latent_y, None)
    # "pose": UA image dropout zeroes CLIP and y, then adds the reference pose
    B, h, w, c = ref_pose_feat.shape
    F_ = pose_tokens.shape[1]
    clip0 = (jnp.zeros_like(clip_fea) if clip_fea is not None
             else jnp.zeros((B, clip_tokens, image_dim), jnp.float32))
    y0 = (jnp.zeros_like(ref_latent_y) if ref_latent_y is not None
          else jnp.zeros((B, F_, h, w, c), ref_pose_feat.dtype))
    return Conditioning(clip0, condition_y(y0, ref_pose_feat), pose_tokens)


def frame_slice(a: jax.Array | None, start_frame, num_frames: int) -> jax.Array | None:
    """Frames [start_frame, start_frame + num_frames) of a [B, F, ...] array (``start_frame`` may be
    traced); None stays None. Used to give each causal block its pose tokens and y."""
    if a is None:
        return None
    return jax.lax.dynamic_slice_in_dim(a, start_frame, num_frames, axis=1)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class PoseDiT(nnx.Module):
    """Wan DiT (``dit``) + UniAnimate pose conditioner (``pose``). The pose stacks run in float32 as in
    UA; the pose tokens are cast to the DiT compute dtype (bf16 in UA) before the sum."""

    def __init__(self, cfg: PoseDiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dit = WanDiT(cfg.dit, rngs=rngs)
        self.pose = PoseConditioner(cfg.pose, rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32)

    # -- conditioning encoders ---------------------------------------------------------------
    def encode_pose(self, pose_video: jax.Array, *, time_chunk: int | None = None) -> jax.Array:
        """Driving pose ``[B, 4F, H, W, 3]`` in [0, 1] (frame 0 already repeated 3x) -> tokens
        ``[B, F, H/16, W/16, dit.dim]`` in the DiT compute dtype."""
        tok = self.pose.pose_features(pose_video, time_chunk=time_chunk)
        return tok.astype(self.cfg.dit.compute_dtype)

    def encode_pose_from_trunk(self, trunk: jax.Array) -> jax.Array:
        """Precomputed trunk features ``[B, F, H/8, W/8, hidden]`` (``pose.trunk_features``, frozen
        trunk only) -> the tokens of :meth:`encode_pose`, without the full-resolution convolutions."""
        return self.pose.pose_features_from_trunk(trunk).astype(self.cfg.dit.compute_dtype)

    def encode_ref_pose(self, ref_pose: jax.Array) -> jax.Array:
        """Pose drawing of the reference ``[B, H, W, 3]`` in [0, 1] -> ``[B, H/8, W/8, 20]`` (float32)."""
        return self.pose.ref_pose_features(ref_pose)

    @staticmethod
    def condition_y(y: jax.Array, ref_feat: jax.Array) -> jax.Array:
        return condition_y(y, ref_feat)

    # -- DiT delegation ----------------------------------------------------------------------
    def context_kv(self, context: jax.Array, clip_fea: jax.Array | None = None) -> CrossKV:
        return self.dit.context_kv(context, clip_fea)

    def init_cache(self, batch: int, tokens_per_frame: int, dtype=None) -> KVCache:
        return self.dit.init_cache(batch, tokens_per_frame, dtype)

    def __call__(self, x, t, context=None, *, clip_fea=None, y=None, pose_tokens=None,
                 ckv: CrossKV | None = None, causal: bool = False, start_frame=0):
        """Flow prediction [B, F, H, W, 16]; ``pose_tokens`` None = no pose (CFG negative branch)."""
        if self.cfg.dit.i2v and y is None:
            raise ConditioningError("PoseDiT: y [B, F, H/8, W/8, 20] is required (use resolve_conditioning)")
        return self.dit(x, t, context, clip_fea=clip_fea, y=y, pose=pose_tokens, ckv=ckv, causal=causal,
                        start_frame=start_frame)

    def forward_cached(self, x, t, ckv: CrossKV, cache: KVCache, start_frame, *, y=None, pose_tokens=None):
        """One causal block (see ``WanDiT.forward_cached``); ``y`` and ``pose_tokens`` must already be
        sliced to this block's frames (:func:`frame_slice`)."""
        if self.cfg.dit.i2v and y is None:
            raise ConditioningError("PoseDiT.forward_cached: y (this block's frames of y) is required")
        return self.dit.forward_cached(x, t, ckv, cache, start_frame, y=y, pose=pose_tokens)


def build_pose_dit(cfg: PoseDiTConfig | Mapping, rngs: nnx.Rngs | None = None) -> PoseDiT:
    """Builder for ``wanjax.checkpoint.load_model`` (takes the checkpoint's config.json dict)."""
    if not isinstance(cfg, PoseDiTConfig):
        cfg = PoseDiTConfig.from_dict(cfg)
    return PoseDiT(cfg, rngs=rngs or nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# Student initialisation from a plain backbone
# ----------------------------------------------------------------------------------------------
# parameters a widened student has and a T2V backbone lacks: the I2V image branch
_I2V_ONLY = ("img_emb/", "blocks/cross_attn/k_img/", "blocks/cross_attn/v_img/", "blocks/cross_attn/norm_k_img/")


def init_student_from_backbone(student: PoseDiT, backbone_params) -> PoseDiT:
    """Copy a plain WanDiT backbone (its ``nnx.State`` or pure dict of ``nnx.Param``) into ``student``,
    in place, such that the student reproduces the backbone exactly at init:

    - every backbone weight is copied (shapes must match, except the patch embedding);
    - ``patch_embedding`` gets the backbone's input channels first and zeros for the extra (y) channels;
    - parameters the backbone lacks (``img_emb``, ``k_img``, ``norm_k_img``) keep the student's init,
      but ``v_img`` (weight and bias) is zero, so the image cross-attention adds exactly 0;
    - ``pose_proj`` (or, without one, the last pose conv) is zero, so the pose tokens are 0.
    The reference-pose stack keeps its init (it only reaches the zeroed y channels).
    """
    if isinstance(backbone_params, nnx.State):
        backbone_params = nnx.to_pure_dict(backbone_params)
    src = flatten_params(backbone_params)
    scfg = student.cfg.dit
    dst_state = nnx.state(student, nnx.Param)
    dst = flatten_params(nnx.to_pure_dict(dst_state))
    out = dict(dst)
    problems = []
    for k, v in src.items():
        tk = "dit/" + k
        if tk not in dst:
            problems.append(f"backbone parameter {k} {tuple(v.shape)} has no place in the student")
            continue
        want = tuple(dst[tk].shape)
        if k == "patch_embedding/kernel" and tuple(v.shape) != want:
            pt, ph, pw = scfg.patch
            n_patch = pt * ph * pw
            cin_b = v.shape[0] // n_patch
            if v.shape[0] % n_patch or v.shape[1] != want[1] or cin_b > scfg.in_dim:
                problems.append(f"patch_embedding/kernel: backbone {tuple(v.shape)} cannot be widened to {want}")
                continue
            # rows are ordered (pt, ph, pw, c) with c fastest: pad c from cin_b to in_dim with zeros
            out[tk] = (lambda v=v, cin_b=cin_b, n_patch=n_patch, want=want, dt=dst[tk].dtype: jnp.pad(
                jnp.asarray(v).reshape(n_patch, cin_b, want[1]), ((0, 0), (0, scfg.in_dim - cin_b), (0, 0))
            ).reshape(want).astype(dt))
            continue
        if tuple(v.shape) != want:
            problems.append(f"{k}: backbone {tuple(v.shape)}, student expects {want} (is the backbone the "
                            f"right size for preset dit={scfg.dim}x{scfg.num_layers}?)")
            continue
        out[tk] = (lambda v=v, dt=dst[tk].dtype: jnp.asarray(v, dt))
    not_filled = [k for k in dst if k.startswith("dit/") and k[4:] not in src]
    for k in not_filled:
        if not k[4:].startswith(_I2V_ONLY):
            problems.append(f"student parameter {k} {tuple(dst[k].shape)} is missing from the backbone")
    if problems:
        raise ValueError("init_student_from_backbone: the backbone does not fit the student:\n  - "
                         + "\n  - ".join(problems[:20]))
    out = {k: v() if callable(v) else v for k, v in out.items()}  # copy only once everything fits
    for k in ("dit/blocks/cross_attn/v_img/kernel", "dit/blocks/cross_attn/v_img/bias"):
        if k in out:
            out[k] = jnp.zeros_like(out[k])
    if student.cfg.pose.proj_dim is not None:
        zero_keys = ("pose/pose_proj/kernel", "pose/pose_proj/bias")
    else:
        last = max(int(k.split("/")[2]) for k in out if k.startswith("pose/dwpose_embedding/"))
        zero_keys = (f"pose/dwpose_embedding/{last}/kernel", f"pose/dwpose_embedding/{last}/bias")
    for k in zero_keys:
        out[k] = jnp.zeros_like(out[k])
    nnx.replace_by_pure_dict(dst_state, _rebuild(nnx.to_pure_dict(dst_state), out))
    nnx.update(student, dst_state)
    return student


def init_student_pose(student: PoseDiT, pose_params) -> list[str]:
    """Copy a UniAnimate pose conditioner (its ``nnx.State`` or pure dict of ``nnx.Param``, e.g. the
    converted teacher's ``pose/``) into ``student.pose``, in place (spec 12.2 item 1): the 3D stack's
    trunk (``dwpose_embedding.0-10``) and the reference-pose stack must match and are copied; the 3D
    head is copied where its shape matches (the 14B teacher's 16 -> 5120 head fits the 1.3B student's
    5120-wide stack + ``pose_proj``), else it keeps the student's init; ``pose_proj`` is never
    touched (zero at init: the student still starts unchanged). Returns the copied paths."""
    from wanjax.models.pose import is_trunk_param

    if isinstance(pose_params, nnx.State):
        pose_params = nnx.to_pure_dict(pose_params)
    src = flatten_params(pose_params)
    dst_state = nnx.state(student.pose, nnx.Param)
    out = flatten_params(nnx.to_pure_dict(dst_state))
    problems, copied = [], []
    for k, v in src.items():
        required = is_trunk_param(k) or k.startswith("randomref_embedding_pose/")
        if k.startswith("pose_proj/"):
            continue
        if k not in out:
            problems.append(f"{k} {tuple(v.shape)} has no place in the student's pose conditioner")
        elif tuple(v.shape) != tuple(out[k].shape):
            if required:
                problems.append(f"{k}: source {tuple(v.shape)}, student {tuple(out[k].shape)}")
        else:
            out[k] = jnp.asarray(v, out[k].dtype)
            copied.append(k)
    missing = [k for k in out if (is_trunk_param(k) or k.startswith("randomref_embedding_pose/")) and k not in src]
    problems += [f"the source has no {k}" for k in missing]
    if problems:
        raise ValueError("init_student_pose: the pose weights do not fit the student:\n  - "
                         + "\n  - ".join(problems[:20]))
    nnx.replace_by_pure_dict(dst_state, _rebuild(nnx.to_pure_dict(dst_state), out))
    nnx.update(student.pose, dst_state)
    return copied


def _rebuild(template: Mapping, flat: Mapping[str, Any], prefix: str = "") -> dict:
    """``template``'s nested structure (original key types, e.g. int keys of nnx.List) filled from ``flat``."""
    out = {}
    for k, v in template.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        out[k] = _rebuild(v, flat, p) if isinstance(v, Mapping) else flat[p]
    return out


def param_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """``{path: np.ndarray}`` of a model's ``nnx.Param`` state (test / debugging helper)."""
    return {k: np.asarray(v) for k, v in flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
