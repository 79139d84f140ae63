"""Inference pipelines: shared model bundle, conditioning and loading.

* :class:`wanjax.pipeline.student.StudentPipeline` - causal few-step generation, block by block,
  with a KV cache and a streaming VAE decode (Self-Forcing + UniAnimate pose tokens).
* :class:`wanjax.pipeline.teacher.TeacherPipeline` - bidirectional many-step sampling with
  UniAnimate's asymmetric CFG and sliding windows for long videos.

Model adapter. The pipelines talk to a pose-conditioned DiT through :class:`PoseDiT`, a thin adapter
over ``WanDiT`` (``.dit``) + ``PoseConditioner`` (``.pose``, optional). ``PoseDiT.wrap`` also accepts
an object that already has ``.dit`` and ``.pose`` attributes (``wanjax.models.unianimate.PoseDiT``),
so switching to that class changes nothing here.

Conditioning (unianimate_dit.md sections 4-6), selected by ``conditioning.mode``; the names and
their meaning are those of :mod:`wanjax.models.unianimate` (``MODES``):

* ``pose+image`` (default): pose tokens; ``y`` = [mask (4) | VAE latent of (ref, grey, grey, ...)
  (16)] + reference-pose features, when the DiT has ``in_dim = out_dim + 20``; CLIP tokens of the
  reference image when the DiT is I2V. Needs ``--pose`` and ``--ref``.
* ``image``: plain Wan I2V, no pose tokens and no reference-pose features. Needs ``--ref``.
* ``pose``: UniAnimate's image dropout: pose tokens, ``y`` = zeros + reference-pose features, CLIP
  tokens zero (a T2V DiT gets the pose tokens only). Needs ``--pose``; ``--ref`` is not read.

``y`` is encoded once for ``y_frames`` latent frames (21 = 81 pixel frames). The VAE encoder is
causal, so any prefix of it equals the encoding of a shorter grey video; frames past ``y_frames``
(long or unbounded videos) reuse the last y frame, whose mask is 0 and whose latent is the VAE code
of steady grey.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from wanjax.models import dit as dit_lib
from wanjax.models import unianimate as ua
from wanjax.models.pose import PoseConditioner, PoseConfig

log = logging.getLogger("wanjax.pipeline")

from wanjax.models.unianimate import DEFAULT_MODE, MODES  # noqa: E402  (one set of mode names)
Y_CHANNELS = 20  # 4 mask + 16 VAE channels
UA_NEGATIVE_PROMPT = ("细节模糊不清，字幕，作品，画作，画面，静止，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
                      "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，杂乱的背景，三条腿，背景人很多，倒着走")


class PipelineError(ValueError):
    """Bad input, configuration or checkpoint. The message names the file/flag and the fix."""


# ----------------------------------------------------------------------------------------------
# Model adapter
# ----------------------------------------------------------------------------------------------
class PoseDiT:
    """``WanDiT`` + optional ``PoseConditioner`` with the few calls the pipelines need."""

    # latent frames per pass of the pose encoder (exact, with a halo): bounds its full-resolution
    # activations (84 frames of 480x832 at once would hold several GiB)
    POSE_TIME_CHUNK = 6

    def __init__(self, dit: dit_lib.WanDiT, pose: PoseConditioner | None = None):
        self.dit = dit
        self.pose = pose
        cfg = dit.cfg
        if pose is not None and pose.cfg.token_dim != cfg.dim:
            raise PipelineError(f"pose encoder makes {pose.cfg.token_dim}-dim tokens but the DiT width is "
                                f"{cfg.dim}; the pose checkpoint belongs to another model size")
        ych = cfg.in_dim - cfg.out_dim
        if ych not in (0, Y_CHANNELS):
            raise PipelineError(f"DiT in_dim={cfg.in_dim}, out_dim={cfg.out_dim}: expected in_dim = out_dim "
                                f"(T2V) or out_dim + {Y_CHANNELS} (I2V y)")
        self.uses_y = ych == Y_CHANNELS
        self.uses_clip = cfg.i2v
        self._pose_fn = None
        self._ref_fn = None

    @classmethod
    def wrap(cls, model) -> "PoseDiT":
        if isinstance(model, PoseDiT):
            return model
        if isinstance(model, dit_lib.WanDiT):
            return cls(model)
        if hasattr(model, "dit"):  # wanjax.models.unianimate.PoseDiT
            return cls(model.dit, getattr(model, "pose", None))
        raise TypeError(f"expected WanDiT, PoseDiT or an object with .dit/.pose, got {type(model).__name__}")

    @property
    def cfg(self) -> dit_lib.WanDiTConfig:
        return self.dit.cfg

    def pose_tokens(self, pose_video) -> jax.Array:
        """Pose video [1, 4n, H, W, 3] (frame 0 repeated 3x), float in [0, 1] or uint8 0..255 (then
        divided by 255 on the device: 4x less to transfer) -> tokens [1, n, H/16, W/16, D] in the
        DiT compute dtype (UA casts them to bf16 before the add)."""
        if self.pose is None:
            raise PipelineError("this model has no pose encoder (pose_dir); use --config.conditioning.mode=image")
        if self._pose_fn is None:
            gd, st = nnx.split(self.pose)
            chunk = self.POSE_TIME_CHUNK
            cdt = self.cfg.compute_dtype

            def fn(s, v):
                v = v.astype(jnp.float32) / 255.0 if v.dtype == jnp.uint8 else v.astype(jnp.float32)
                tok = nnx.merge(gd, s).pose_features(v, time_chunk=chunk if v.shape[1] // 4 > chunk else 0)
                return tok.astype(cdt)

            fn = jax.jit(fn)
            self._pose_jit, self._pose_state = fn, st
            self._pose_fn = lambda v: fn(st, v)
        v = np.asarray(pose_video) if not isinstance(pose_video, jax.Array) else pose_video
        return self._pose_fn(v if v.dtype == np.uint8 else jnp.asarray(v, jnp.float32))

    def precompile_pose(self, shape: tuple) -> None:
        """Compile the pose-token function for uint8 windows of ``shape`` [1, T, H, W, 3] ahead of use."""
        if self.pose is None:
            return
        if self._pose_fn is None:
            self.pose_tokens(np.zeros((1, 4) + tuple(shape[2:]), np.uint8))  # builds the jitted fn
        self._pose_jit.lower(self._pose_state, jax.ShapeDtypeStruct(shape, jnp.uint8)).compile()

    def ref_pose_features(self, ref_pose) -> jax.Array:
        """[1, H, W, 3] in [0, 1] -> [1, H/8, W/8, 20]."""
        if self._ref_fn is None:
            gd, st = nnx.split(self.pose)
            fn = jax.jit(lambda s, v: nnx.merge(gd, s).ref_pose_features(v))
            self._ref_fn = lambda v: fn(st, v)
        return self._ref_fn(jnp.asarray(ref_pose, jnp.float32))


def check_mode(mode: str, model: PoseDiT) -> None:
    if mode not in MODES:
        raise PipelineError(f"--config.conditioning.mode={mode!r}; choose one of {list(MODES)}")
    if mode in ("pose+image", "pose") and model.pose is None:
        raise PipelineError(f"--config.conditioning.mode={mode} needs pose weights: set --config.pose_dir "
                            f"(or put pose/ under --config.ckpt_dir), or use mode=image")
    if mode == "image" and not (model.uses_y or model.uses_clip):
        raise PipelineError("--config.conditioning.mode=image needs an I2V DiT (y / CLIP inputs); this "
                            "checkpoint is T2V: use mode=pose")


def uses_pose(mode: str, model: PoseDiT) -> bool:
    """Whether ``mode`` feeds pose tokens (``pose+image`` and ``pose``)."""
    return mode != "image" and model.pose is not None


# ----------------------------------------------------------------------------------------------
# Reference conditioning (y, CLIP)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Reference:
    """Per-video reference conditioning shared by every block / window / step."""
    y: jax.Array | None          # [1, y_frames, h, w, 20] (ref-pose features already added)
    clip_fea: jax.Array | None   # [1, N, image_dim]

    def y_slice(self, start: int, n: int) -> jax.Array | None:
        """y for latent frames [start, start + n); frames past the encoded ones repeat the last."""
        if self.y is None:
            return None
        idx = np.minimum(np.arange(start, start + n), self.y.shape[1] - 1)
        return self.y[:, idx]


def build_y(vae, ref_m11: jax.Array, y_frames: int, ref_pose_feat: jax.Array | None) -> jax.Array:
    """UA's y: VAE latent of [ref, 0, 0, ...] (4(y_frames-1)+1 pixel frames), 4 mask channels (1 on
    latent frame 0), plus the reference-pose features broadcast over frames and all 20 channels."""
    from wanjax.models.vae import jit_encode

    _, H, W, _ = ref_m11.shape
    T = 4 * (y_frames - 1) + 1
    video = jnp.zeros((1, T, H, W, 3), jnp.float32).at[:, 0].set(ref_m11.astype(jnp.float32))
    lat = jit_encode(vae)(video)  # [1, y_frames, h, w, 16]
    h, w = lat.shape[2:4]
    mask = jnp.zeros((1, y_frames, h, w, 4), jnp.float32).at[:, 0].set(1.0)
    y = jnp.concatenate([mask, lat.astype(jnp.float32)], axis=-1)
    if ref_pose_feat is not None:
        y = y + ref_pose_feat[:, None].astype(jnp.float32)
    return y


def make_reference(model: PoseDiT, mode: str, *, vae, clip, ref_image_u8: np.ndarray | None,
                   ref_pose: np.ndarray | None, y_frames: int) -> Reference:
    """y / CLIP for ``mode`` (see the module doc). ``ref_image_u8`` uint8 [H, W, 3] at the video size;
    ``ref_pose`` [1, H, W, 3] in [0, 1] (the reference image's pose drawing) or None."""
    from wanjax.image import encode_image, to_model_range

    check_mode(mode, model)
    feat = None
    if model.uses_y and mode != "image" and ref_pose is not None:
        feat = model.ref_pose_features(ref_pose)
    if mode == "pose":
        if not model.uses_y:
            return Reference(None, None)
        if feat is None:
            raise PipelineError("--config.conditioning.mode=pose needs the reference pose (--ref_pose, "
                                "or pose.jpg in the pose folder)")
        h, w = feat.shape[1:3]
        y = ua.condition_y(jnp.zeros((1, y_frames, h, w, Y_CHANNELS), jnp.float32), feat)
        clip_fea = None
        if model.uses_clip:
            clip_fea = jnp.zeros((1, 257, model.cfg.image_dim), jnp.float32)
        return Reference(y.astype(model.cfg.compute_dtype), clip_fea)
    if ref_image_u8 is None:
        raise PipelineError(f"--config.conditioning.mode={mode} needs a reference image (--ref)")
    ref = to_model_range(ref_image_u8)[None]
    y = clip_fea = None
    if model.uses_y:
        if vae is None:
            raise PipelineError("y conditioning needs the VAE (vae_dir)")
        y = build_y(vae, ref, y_frames, feat).astype(model.cfg.compute_dtype)
    if model.uses_clip:
        if clip is None:
            raise PipelineError("this DiT is I2V and needs CLIP weights: set --config.clip_dir")
        clip_fea = encode_image(clip, ref)
    return Reference(y, clip_fea)


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
def _pad_text(emb: np.ndarray, text_len: int, text_dim: int, what: str) -> np.ndarray:
    emb = np.asarray(emb, np.float32)
    if emb.ndim == 3:
        if emb.shape[0] != 1:
            raise PipelineError(f"{what}: expected one prompt embedding, got batch {emb.shape[0]}")
        emb = emb[0]
    if emb.ndim != 2 or emb.shape[1] != text_dim or emb.shape[0] > text_len:
        raise PipelineError(f"{what}: text embedding of shape {emb.shape}, expected [n <= {text_len}, "
                            f"{text_dim}] for this DiT (text_dim={text_dim})")
    out = np.zeros((1, text_len, text_dim), np.float32)
    out[0, :emb.shape[0]] = emb
    return out


def encode_prompts(cfg, text_len: int, text_dim: int, *, need_negative: bool, mesh=None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Positive (and negative) text context [1, text_len, text_dim] as host numpy arrays.

    ``prompt_embeds_path`` (a .npz with ``prompt`` and optionally ``negative`` arrays [n, text_dim])
    skips T5. Otherwise T5 is loaded, run, and **freed before the DiT is loaded** (its 5.7 B params
    never share device memory with the 14 B DiT); the embeddings come back to the host.
    """
    if cfg.prompt_embeds_path:
        p = Path(cfg.prompt_embeds_path)
        if not p.is_file():
            raise PipelineError(f"--config.prompt_embeds_path={p}: no such file")
        with np.load(p) as z:
            if "prompt" not in z:
                raise PipelineError(f"{p}: expected arrays 'prompt' (and 'negative'), found {list(z.keys())}")
            pos = _pad_text(z["prompt"], text_len, text_dim, f"{p}[prompt]")
            neg = _pad_text(z["negative"], text_len, text_dim, f"{p}[negative]") if "negative" in z else None
        if need_negative and neg is None:
            neg = np.zeros_like(pos)  # an empty negative prompt still gets the zero-padded context
        return pos, neg
    from wanjax.text import load_text_encoder

    t5_dir, tok_dir = resolve_dir(cfg, "t5_dir", "t5"), resolve_dir(cfg, "tokenizer_dir", "tokenizer")
    te = load_text_encoder(t5_dir, tok_dir, mesh=mesh, dtype=jnp.dtype(cfg.t5_dtype), text_len=text_len)
    if te.cfg.dim != text_dim:
        raise PipelineError(f"T5 checkpoint {t5_dir} has dim {te.cfg.dim}, the DiT expects text_dim={text_dim}")
    prompts = [cfg.prompt] + ([cfg.negative_prompt] if need_negative else [])
    ctx = np.asarray(jax.device_get(te.encode(prompts)), np.float32)
    del te
    gc.collect()
    return ctx[:1], (ctx[1:2] if need_negative else None)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def resolve_dir(cfg, field: str, sub: str) -> Path:
    v = getattr(cfg, field, "") or ""
    if v:
        return Path(v)
    if not cfg.ckpt_dir:
        raise PipelineError(f"no checkpoint for {sub}: set --config.{field}=DIR or --config.ckpt_dir=ROOT "
                            f"(with ROOT/{sub}/)")
    return Path(cfg.ckpt_dir) / sub


def _read(ckpt: Path, model: str | tuple) -> dict:
    from wanjax.checkpoint import read_config

    if not ckpt.is_dir():
        raise PipelineError(f"{ckpt}: checkpoint directory does not exist")
    c = read_config(ckpt)
    models = (model,) if isinstance(model, str) else model
    if c.get("model") not in models:
        raise PipelineError(f"{ckpt}/config.json says model={c.get('model')!r}, expected {models[0]!r}")
    return c


def check_preset(dit_cfg: dit_lib.WanDiTConfig, expect: dict, ckpt: Path, preset: str) -> None:
    bad = [f"{k}: checkpoint {getattr(dit_cfg, k)!r}, preset {v!r}" for k, v in expect.items()
           if getattr(dit_cfg, k) != v]
    if bad:
        raise PipelineError(f"DiT checkpoint {ckpt} does not match preset {preset!r} ("
                            + "; ".join(bad) + "); pick the matching --config or checkpoint")


def load_dit(cfg, mesh=None) -> dit_lib.WanDiT:
    from wanjax.checkpoint import load_model

    d = resolve_dir(cfg, "model_dir", "dit")
    raw = _read(d, "dit")
    base = dit_lib.WanDiTConfig.from_dict(raw)
    check_preset(base, dict(cfg.model.expect), d, cfg.preset)
    over = dict(dtype=cfg.dtype, param_dtype=cfg.dtype, attention=cfg.attention,
                num_frame_per_block=cfg.model.num_frame_per_block, local_attn_size=cfg.model.local_attn_size,
                sink_size=cfg.model.sink_size, max_frames=cfg.model.max_frames)
    if cfg.get("residual_dtype"):
        if cfg.residual_dtype not in dit_lib.RESIDUAL_DTYPES:
            raise PipelineError(f"--config.residual_dtype={cfg.residual_dtype!r}: choose one of "
                                f"{dit_lib.RESIDUAL_DTYPES}, or '' for the checkpoint's")
        over["residual_dtype"] = cfg.residual_dtype
    dcfg = base.replace(**over)
    return load_model(d, lambda _c, rngs: dit_lib.WanDiT(dcfg, rngs=rngs), mesh, dtype=jnp.dtype(cfg.dtype))


def load_pose(cfg, mesh=None) -> PoseConditioner | None:
    from wanjax.checkpoint import load_model

    d = Path(cfg.pose_dir) if cfg.pose_dir else (Path(cfg.ckpt_dir) / "pose" if cfg.ckpt_dir else None)
    if d is None or not d.exists():
        if cfg.conditioning.mode == "image":
            return None
        raise PipelineError(f"pose encoder checkpoint {d} not found: set --config.pose_dir "
                            f"(python -m converters.pose) or use --config.conditioning.mode=image")
    raw = _read(d, ("pose_conditioner", "pose"))
    pcfg = dataclasses.replace(PoseConfig.from_dict(raw), remat=False)
    return load_model(d, lambda _c, rngs: PoseConditioner(pcfg, rngs=rngs), mesh, dtype=jnp.float32)


def load_vae(cfg, mesh=None):
    from wanjax.models.vae import load_vae as _load

    d = resolve_dir(cfg, "vae_dir", "vae")
    _read(d, "vae")
    return _load(d, dtype=jnp.dtype(cfg.vae_dtype), mesh=mesh)


def load_clip(cfg, mesh=None):
    from wanjax.models.clip import load_clip_encoder

    d = resolve_dir(cfg, "clip_dir", "clip")
    _read(d, "clip")
    return load_clip_encoder(d, mesh, dtype=jnp.float32)


def make_mesh(cfg):
    from wanjax import sharding as shd

    n = len(jax.devices())
    m = cfg.mesh
    try:
        return shd.make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as e:
        raise PipelineError(f"--config.mesh: {e} ({n} devices available)") from None


# ----------------------------------------------------------------------------------------------
# Input reading
# ----------------------------------------------------------------------------------------------
def read_reference(path, height: int, width: int) -> np.ndarray:
    """--ref image -> uint8 [height, width, 3] (PIL bicubic stretch, as UniAnimate)."""
    from wanjax.image import load_image, resize_pil

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"--ref {p}: no such image file")
    try:
        img = load_image(p, alpha="drop")
    except (ValueError, OSError) as e:
        raise PipelineError(f"--ref {p}: unreadable image ({e})") from None
    return resize_pil(img, (height, width), "bicubic")


def read_pose_frames(path, height: int, width: int, num_frames: int | None, *, pad_last: bool = False,
                     start: int = 0) -> np.ndarray:
    """--pose video / frame folder -> uint8 [num_frames, height, width, 3] (PIL bilinear)."""
    from wanjax.pose.video import VideoError, read_video, resize_frames

    try:
        frames = read_video(path)
    except VideoError as e:
        raise PipelineError(f"--pose: {e}") from None
    frames = frames[start:]
    if num_frames is not None:
        if frames.shape[0] < num_frames:
            if not pad_last:
                raise PipelineError(f"--pose {path}: {frames.shape[0]} pose frames but --num_frames={num_frames}; "
                                    f"pass fewer frames, a longer pose video, or --config.pose.pad_last=True")
            frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - frames.shape[0], 0)])
        frames = frames[:num_frames]
    return resize_frames(frames, height, width)


def find_ref_pose(pose_path, ref_pose_path, height: int, width: int, first_pose: np.ndarray) -> np.ndarray:
    """UA's reference pose (pose.jpg next to the aligned frames) as [1, H, W, 3] in [0, 1]; falls back
    to the first driving pose frame (logged) when none is given."""
    from wanjax.pose.video import VideoError, prepare_ref_pose

    cand = [Path(ref_pose_path)] if ref_pose_path else []
    p = Path(pose_path) if pose_path else None
    if not cand and p is not None and p.is_dir():
        cand = [p / f"pose{s}" for s in (".jpg", ".png", ".jpeg")]
    for c in cand:
        if c.is_file():
            try:
                return prepare_ref_pose(c, height, width)
            except VideoError as e:
                raise PipelineError(f"--ref_pose: {e}") from None
    if ref_pose_path:
        raise PipelineError(f"--ref_pose {ref_pose_path}: no such image")
    log.warning("no reference pose (pose.jpg / --ref_pose): using the first driving pose frame")
    return first_pose[None].astype(np.float32) / 255.0


def pad_pose(frames_u8: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [1, T + 3, H, W, 3] in [0, 1], frame 0 repeated 3x in front."""
    a = np.concatenate([np.repeat(frames_u8[:1], 3, 0), frames_u8]).astype(np.float32) / 255.0
    return a[None]


def latent_frames(num_frames: int) -> int:
    if num_frames < 1 or (num_frames - 1) % 4:
        raise PipelineError(f"--num_frames={num_frames} must be 4k+1 (e.g. 81, 33, 9)")
    return (num_frames - 1) // 4 + 1


def free(*objs: Any) -> None:
    for o in objs:
        del o
    gc.collect()


__all__ = ["PipelineError", "PoseDiT", "Reference", "build_y", "make_reference", "encode_prompts",
           "load_dit", "load_pose", "load_vae", "load_clip", "read_reference", "read_pose_frames",
           "find_ref_pose", "pad_pose", "latent_frames", "check_mode", "uses_pose", "MODES", "DEFAULT_MODE", "UA_NEGATIVE_PROMPT"]
