"""UniAnimate-DiT pose conditioning: the pose-video encoder and the reference-pose encoder, Flax NNX.

Spec: /work/shared/docs/unianimate_dit.md sections 3, 4, 12.1 and 12.2 item 1.

``dwpose_embedding`` (3D stack, channels-last ``[B, T, H, W, C]``), UA ``nn.Sequential`` indices::

    idx  op      ch            kernel   stride   padding
    0    Conv3d  3 -> 16       3,3,3    1,1,1    1,1,1
    2    Conv3d  16 -> 16      3,3,3    1,1,1    1,1,1
    4    Conv3d  16 -> 16      3,3,3    1,1,1    1,1,1
    6    Conv3d  16 -> 16      3,3,3    1,2,2    1,1,1
    8    Conv3d  16 -> 16      3,3,3    2,2,2    1,1,1
    10   Conv3d  16 -> 16      3,3,3    2,2,2    1,1,1
    12   Conv3d  16 -> out     1,2,2    1,2,2    0 (VALID)
    (odd indices: SiLU; none after 12)

``randomref_embedding_pose`` (2D stack): Conv2d k3 p1 at 0, 2, 4 (stride 1), 6, 8, 10 (stride 2),
16 channels, the last one 16 -> ref_dim (20); SiLU between them.

Optional ``pose_proj`` (student, spec 12.2 item 1): ``Linear(out_dim -> proj_dim)`` after the 3D stack.
Because the last conv is affine, ``fold_pose_proj`` merges it into a ``16 -> proj_dim`` head.

Parameter tree (``/``-joined paths, used by ``converters/pose.py``)::

    dwpose_embedding/{0,2,...,12}/kernel           [kt, kh, kw, in, out]   (None, None, None, "conv_in", "conv_out")
    dwpose_embedding/{0,2,...,12}/bias             [out]                   ("conv_out",)
    randomref_embedding_pose/{0,2,...,10}/kernel   [kh, kw, in, out]
    randomref_embedding_pose/{0,2,...,10}/bias     [out]
    pose_proj/kernel                               [out_dim, proj_dim]     (None, "embed")   (only with proj_dim)
    pose_proj/bias                                 [proj_dim]

The odd (SiLU) entries are parameter-free placeholder modules, so the list indices are UA's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401  (disables Flax eager sharding)
from wanjax.nn import Conv, Linear, conv3d_time_folded, conv_nd

# (kernel, stride, padding) of the convolutions of the 3D stack, in order (UA indices 0, 2, ..., 12).
POSE3D_LAYERS: tuple[tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((3, 3, 3), (1, 2, 2), (1, 1, 1)),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
    ((1, 2, 2), (1, 2, 2), (0, 0, 0)),
)
# (stride) of the 2D stack convolutions (kernel 3, padding 1 everywhere), UA indices 0, 2, ..., 10.
REF2D_STRIDES: tuple[int, ...] = (1, 1, 1, 2, 2, 2)
# Number of leading 3D layers that run at full pixel resolution (remat / chunking targets).
_FULL_RES_LAYERS = 4
# Temporal halo (latent frames) that makes time-chunked evaluation exact: the receptive field of
# latent i is padded input frames [4i-7, 4i+7] (spec 3.3), i.e. within 2 latent groups each side.
_HALO_LATENT = 2


@dataclasses.dataclass(frozen=True)
class PoseConfig:
    """Hyperparameters of :class:`PoseConditioner`.

    ``hidden = concat_dim * 4 = 16``; ``out_dim`` is the DiT width the 3D stack maps to (5120 for the
    14B teacher); ``ref_dim = 20`` is the I2V ``y`` width; ``proj_dim`` (e.g. 1536 for the 1.3B student)
    adds ``pose_proj``; ``zero_init_proj`` zero-initialises it so that the student starts unchanged.
    ``train_trunk=False`` keeps the 3D stack's trunk (the six 16-channel convs before the head,
    ``dwpose_embedding.{0..10}``, ~36 K parameters initialised from UniAnimate's, spec 12.2 item 1)
    out of differentiation: no gradient flows into or through it, so under ``jax.grad`` it runs
    forward once, with no remat and no backward convolutions (on an H100 those full-resolution,
    16-channel float32 convolutions cost ~13% of the student's ODE step for 0.3% of its FLOPs).
    Pair it with an optimizer that freezes :func:`is_trunk_param` parameters (weight decay would
    otherwise still move them); the head and ``pose_proj`` stay trainable.
    ``remat`` rematerialises the full-resolution layers under differentiation. ``time_chunk``: latent
    frames per pass of the 3-D stack when :meth:`PoseConditioner.pose_features` is not given one
    (None: the whole video in one pass). Exact (a halo of 2 latent frames each side). It is meant to
    bound the full-resolution activations (at 480x832 and 21 latent frames every 16-channel float32
    activation of the whole video is 2 GiB). On an H100 it did not pay in training at 21 latent
    frames (chunks of 3: the ODE step slower, the DMD generator's temporaries larger; see
    docs/PERFORMANCE.md), so configs/distill.py leaves it off; it is there for longer clips.
    """
    hidden: int = 16
    out_dim: int = 5120
    ref_dim: int = 20
    in_channels: int = 3
    proj_dim: int | None = None
    zero_init_proj: bool = True
    remat: bool = True
    time_chunk: int | None = None
    train_trunk: bool = True

    @property
    def token_dim(self) -> int:
        """Width D of the pose tokens returned by ``pose_features``."""
        return self.proj_dim if self.proj_dim is not None else self.out_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PoseConfig":
        """Build from a dict (e.g. a checkpoint's config.json); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def is_trunk_param(path: str) -> bool:
    """Whether a parameter path (``.../dwpose_embedding/<i>/kernel|bias``, as ``param_path`` writes
    it) belongs to the 3D stack's trunk, i.e. every conv before the head (index 12)."""
    parts = path.split("/")
    if "dwpose_embedding" not in parts:
        return False
    i = parts.index("dwpose_embedding")
    return i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) < 2 * (len(POSE3D_LAYERS) - 1)


def frozen_params(cfg: PoseConfig):
    """The parameter-path filter an optimizer must keep fixed for a model with this pose config
    (``make_optimizer(frozen=...)``): :func:`is_trunk_param` when the trunk is not trained, else None."""
    return None if cfg.train_trunk else is_trunk_param


def trunk_fingerprint(pose: "PoseConditioner") -> str:
    """SHA-256 over the trunk's parameters (:func:`is_trunk_param`; path-sorted float32 bytes, with
    each path and shape). Precomputed trunk features (``PoseConditioner.trunk_features``) are valid
    for any pose stack whose trunk has the same fingerprint."""
    import hashlib

    from wanjax.checkpoint import flatten_params

    flat = flatten_params(nnx.to_pure_dict(nnx.state(pose, nnx.Param)))
    h = hashlib.sha256()
    for k in sorted(k for k in flat if is_trunk_param(k)):
        a = np.ascontiguousarray(np.asarray(jax.device_get(flat[k]), np.float32))
        h.update(f"{k}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


POSE_PRESETS: dict[str, PoseConfig] = {
    "tiny": PoseConfig(hidden=4, out_dim=8, ref_dim=6),
    "tiny_student": PoseConfig(hidden=4, out_dim=8, ref_dim=6, proj_dim=5),
    "unianimate_14b": PoseConfig(),
    "student_1_3b": PoseConfig(proj_dim=1536),
}


def get_pose_config(name: str) -> PoseConfig:
    """Preset by name: ``tiny``, ``tiny_student``, ``unianimate_14b`` or ``student_1_3b``."""
    if name not in POSE_PRESETS:
        raise ValueError(f"unknown pose preset {name!r}; choose one of {sorted(POSE_PRESETS)}")
    return POSE_PRESETS[name]


class SiLU(nnx.Module):
    """Parameter-free placeholder at the odd indices of the UA ``nn.Sequential`` stacks."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(x)


def _conv_list(convs: list[Conv]) -> nnx.List:
    """[conv, SiLU, conv, SiLU, ..., conv] with the convs at even indices (UA layout)."""
    items: list[nnx.Module] = []
    for i, c in enumerate(convs):
        if i:
            items.append(SiLU())
        items.append(c)
    return nnx.List(items)


CONV_IMPLS = ("auto", "3d", "fold")


def resolve_conv_impl(impl: str) -> str:
    """``"auto"``: ``"fold"`` (time-folded 2-D convs, :func:`wanjax.nn.conv3d_time_folded`) on the
    CPU, where XLA's 3-D convolution is slow; ``"3d"`` elsewhere. The CPU is the platform of the
    work's device (``wanjax.sharding.current_platform``), not only the default backend: the host
    CPU of a GPU process also folds."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"pose conv impl {impl!r}: choose one of {CONV_IMPLS}")
    if impl == "auto":
        from wanjax.sharding import current_platform

        return "fold" if current_platform() == "cpu" else "3d"
    return impl


def _run_stack(layers: list[tuple[jax.Array, jax.Array, tuple, tuple]], x: jax.Array,
               act_last: bool, impl: str = "3d") -> jax.Array:
    """Apply ``(kernel, bias, strides, padding)`` convs with SiLU in between (pure function).
    ``impl`` ("3d" / "fold") picks how 3-D kernels are computed; 2-D ones are unaffected."""
    for i, (k, b, s, p) in enumerate(layers):
        if k.ndim == 5 and impl == "fold":
            x = conv3d_time_folded(x, k, b, strides=s, padding=p)
        else:
            x = conv_nd(x, k, b, strides=s, padding=p)
        if i < len(layers) - 1 or act_last:
            x = jax.nn.silu(x)
    return x


class PoseConditioner(nnx.Module):
    """UA pose-video encoder (+ optional ``pose_proj``) and reference-pose encoder."""

    def __init__(self, cfg: PoseConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 conv_impl: str = "auto"):
        self.cfg = cfg
        self.dtype = dtype
        self.conv_impl = conv_impl  # static: "auto" | "3d" | "fold" (see resolve_conv_impl)
        resolve_conv_impl(conv_impl)
        c, h = cfg.in_channels, cfg.hidden
        convs3d = []
        for i, (k, s, p) in enumerate(POSE3D_LAYERS):
            cin = c if i == 0 else h
            cout = cfg.out_dim if i == len(POSE3D_LAYERS) - 1 else h
            convs3d.append(Conv(cin, cout, k, strides=s, padding=p, rngs=rngs, param_dtype=param_dtype))
        self.dwpose_embedding = _conv_list(convs3d)
        convs2d = []
        for i, s in enumerate(REF2D_STRIDES):
            cin = c if i == 0 else h
            cout = cfg.ref_dim if i == len(REF2D_STRIDES) - 1 else h
            convs2d.append(Conv(cin, cout, (3, 3), strides=(s, s), padding=(1, 1), rngs=rngs,
                                param_dtype=param_dtype))
        self.randomref_embedding_pose = _conv_list(convs2d)
        if cfg.proj_dim is not None:
            self.pose_proj = Linear(cfg.out_dim, cfg.proj_dim, rngs=rngs, axes=(None, "embed"),
                                    param_dtype=param_dtype, zero_init=cfg.zero_init_proj)
        else:
            self.pose_proj = None

    # ------------------------------------------------------------------------------------------
    def _layers3d(self) -> list[tuple[jax.Array, jax.Array, tuple, tuple]]:
        convs = [m for m in self.dwpose_embedding if isinstance(m, Conv)]
        return [(m.kernel[...], m.bias[...], m.strides, m.padding) for m in convs]

    def _encode3d(self, x: jax.Array) -> jax.Array:
        """[B, T, H, W, C] (T = 4n) -> [B, n, H/16, W/16, out_dim] through the 7 convs."""
        if not self.cfg.train_trunk:  # forward only: no gradient into or through the trunk, so no remat
            return self._head(jax.lax.stop_gradient(self._trunk(x)))
        layers = self._layers3d()
        impl = resolve_conv_impl(getattr(self, "conv_impl", "auto"))
        full, rest = layers[:_FULL_RES_LAYERS], layers[_FULL_RES_LAYERS:]
        geometry = [(s, p) for _, _, s, p in full]  # static: closed over, never traced

        def trunk(params, h):
            return _run_stack([(k, b, s, p) for (k, b), (s, p) in zip(params, geometry)], h, act_last=True,
                              impl=impl)

        if self.cfg.remat:
            trunk = jax.checkpoint(trunk)
        x = trunk([(k, b) for k, b, _, _ in full], x)
        return _run_stack(rest, x, act_last=False, impl=impl)

    def _trunk(self, x: jax.Array) -> jax.Array:
        """[B, T, H, W, C] -> the trunk's output [B, T/4, H/8, W/8, hidden] (the six convs + SiLU)."""
        impl = resolve_conv_impl(getattr(self, "conv_impl", "auto"))
        return _run_stack(self._layers3d()[:-1], x, act_last=True, impl=impl)

    def _head(self, trunk: jax.Array) -> jax.Array:
        """The trunk's output -> [B, n, H/16, W/16, out_dim] (the last conv, no activation)."""
        impl = resolve_conv_impl(getattr(self, "conv_impl", "auto"))
        return _run_stack(self._layers3d()[-1:], trunk, act_last=False, impl=impl)

    def _check_pose(self, pose: jax.Array, who: str) -> None:
        if pose.ndim != 5 or pose.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"{who}: expected pose [B, 4*F_lat, H, W, {self.cfg.in_channels}] "
                             f"(channels last), got shape {tuple(pose.shape)}")
        _, t, h, w, _ = pose.shape
        if t % 4 or t == 0:
            raise ValueError(f"{who}: the pose video has {t} frames, expected a positive multiple of 4 "
                             f"(num_frames = 4k+1 pixel frames plus 3 repeats of frame 0; use "
                             f"wanjax.pose.video.prepare_pose_video)")
        if h % 16 or w % 16:
            raise ValueError(f"{who}: H x W = {h} x {w} must be multiples of 16 (VAE 8 x patch 2)")

    def _over_time(self, fn, x: jax.Array, time_chunk: int | None, who: str) -> jax.Array:
        """``fn`` ([B, 4k, ...] -> [B, k, ...]) over the whole video, or ``time_chunk`` latent frames at
        a time with a halo of 2 latent frames each side (exact: the receptive field is +-7 frames)."""
        n = x.shape[1] // 4
        if time_chunk is None:
            time_chunk = self.cfg.time_chunk
        if not time_chunk or time_chunk >= n:
            return fn(x)
        if time_chunk < 0:
            raise ValueError(f"{who}: time_chunk must be >= 0 (0: whole video), got {time_chunk}")
        outs = []
        for a in range(0, n, time_chunk):
            e = min(a + time_chunk, n)
            lo, hi = max(a - _HALO_LATENT, 0), min(e + _HALO_LATENT, n)
            part = fn(x[:, 4 * lo:4 * hi])
            outs.append(part[:, a - lo:a - lo + (e - a)])
        return jnp.concatenate(outs, axis=1)

    def pose_features(self, pose: jax.Array, *, time_chunk: int | None = None) -> jax.Array:
        """Pose tokens.

        Args:
          pose: ``[B, 4*F_lat, H, W, 3]`` RGB in [0, 1], frame 0 already repeated 3x
            (``wanjax.pose.video.prepare_pose_video``); H and W multiples of 16.
          time_chunk: evaluate ``time_chunk`` latent frames at a time with a halo of 2 latent
            frames (8 pose frames) each side; exact (the receptive field is +-7 frames, spec 3.3) and
            bounds the full-resolution activations to ``4*(time_chunk+4)`` frames. None: the
            config's ``time_chunk``; 0: the whole video in one pass.
        Returns:
          ``[B, F_lat, H/16, W/16, D]``, D = ``proj_dim`` or ``out_dim``, in ``dtype``.
          Flatten ``(f, h, w)`` row-major to get the DiT token order. UA runs this stack in float32
          and casts the tokens to bfloat16 before adding them to the patch embeddings (spec 12.1).
        """
        self._check_pose(pose, "pose_features")
        y = self._over_time(self._encode3d, pose.astype(self.dtype), time_chunk, "pose_features")
        if self.pose_proj is not None:
            y = self.pose_proj(y)
        return y

    def trunk_features(self, pose: jax.Array, *, time_chunk: int | None = None) -> jax.Array:
        """The trunk's output for ``pose`` (as in :meth:`pose_features`): ``[B, F_lat, H/8, W/8,
        hidden]`` in ``dtype``, with no gradient. With a frozen trunk (``train_trunk=False``) it is a
        function of the data alone, so it can be computed once per sample and reused by
        :meth:`pose_features_from_trunk`, which then skips the full-resolution convolutions."""
        self._check_pose(pose, "trunk_features")
        return jax.lax.stop_gradient(self._over_time(self._trunk, pose.astype(self.dtype), time_chunk,
                                                     "trunk_features"))

    def pose_features_from_trunk(self, trunk: jax.Array) -> jax.Array:
        """Pose tokens from :meth:`trunk_features` (head conv + ``pose_proj``); equals
        :meth:`pose_features` on the same video. Only for a frozen trunk: a trainable trunk's
        gradient would be skipped silently, so that raises."""
        if self.cfg.train_trunk:
            raise ValueError("pose_features_from_trunk: this pose stack trains its trunk (PoseConfig.train_trunk="
                             "True), so precomputed trunk features would drop the trunk's gradient; freeze it "
                             "(configs/distill.py pose_trunk_trainable=False) or pass the pose video")
        want = (self.cfg.hidden,)
        if trunk.ndim != 5 or tuple(trunk.shape[-1:]) != want or trunk.shape[2] % 2 or trunk.shape[3] % 2:
            raise ValueError(f"pose_features_from_trunk: expected trunk features [B, F_lat, H/8, W/8, "
                             f"{self.cfg.hidden}] (trunk_features), got shape {tuple(trunk.shape)}")
        y = self._head(jax.lax.stop_gradient(trunk.astype(self.dtype)))
        if self.pose_proj is not None:
            y = self.pose_proj(y)
        return y

    def ref_pose_features(self, ref_pose: jax.Array) -> jax.Array:
        """Reference-pose features.

        Args:
          ref_pose: ``[B, H, W, 3]`` RGB in [0, 1] (the pose drawing of the reference image); H, W
            multiples of 8.
        Returns:
          ``[B, H/8, W/8, ref_dim]`` in ``dtype``; broadcast-add over latent frames to the 20-channel
          ``y`` (4 mask + 16 VAE channels) before the I2V concat.
        """
        if ref_pose.ndim != 4 or ref_pose.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"ref_pose_features: expected ref_pose [B, H, W, {self.cfg.in_channels}] "
                             f"(channels last), got shape {tuple(ref_pose.shape)}")
        if ref_pose.shape[1] % 8 or ref_pose.shape[2] % 8:
            raise ValueError(f"ref_pose_features: H x W = {ref_pose.shape[1]} x {ref_pose.shape[2]} must be "
                             f"multiples of 8")
        convs = [m for m in self.randomref_embedding_pose if isinstance(m, Conv)]
        layers = [(m.kernel[...], m.bias[...], m.strides, m.padding) for m in convs]
        return _run_stack(layers, ref_pose.astype(self.dtype), act_last=False)


def create_pose_conditioner(cfg: PoseConfig, *, seed: int | jax.Array = 0, dtype=jnp.float32,
                            param_dtype=jnp.float32) -> PoseConditioner:
    """``PoseConditioner(cfg, rngs=nnx.Rngs(seed))`` with the initialisation compiled as one jitted
    function (eager init compiles one small program per parameter, which is slow on CPU). ``seed`` may
    be a key, e.g. ``jax.random.key(0, impl="rbg")``, whose init compiles ~6x faster than threefry."""
    make = lambda: PoseConditioner(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()))()
    return nnx.merge(graphdef, state)


def fold_pose_proj(cond: PoseConditioner) -> PoseConditioner:
    """An equivalent conditioner whose last 3D conv maps hidden -> proj_dim directly (no ``pose_proj``).

    With the last conv ``y = W x + b`` (kernel ``[1,2,2,16,out]``) and ``pose_proj`` ``z = y P + c``
    (kernel ``P [out, proj]``): ``W' = W P`` (``[1,2,2,16,proj]``), ``b' = b P + c``. The trunk and the
    reference stack are shared by value (copied arrays). A conditioner without ``pose_proj`` is
    returned unchanged.
    """
    if cond.pose_proj is None:
        return cond
    cfg = cond.cfg
    new_cfg = dataclasses.replace(cfg, out_dim=cfg.proj_dim, proj_dim=None)
    folded = nnx.eval_shape(lambda: PoseConditioner(new_cfg, rngs=nnx.Rngs(0), dtype=cond.dtype))
    src = nnx.state(cond, nnx.Param)
    dst = nnx.state(folded, nnx.Param)
    src_pure = nnx.to_pure_dict(src)
    last = max(k for k in src_pure["dwpose_embedding"])
    out = {k: v for k, v in src_pure.items() if k != "pose_proj"}
    w = src_pure["dwpose_embedding"][last]["kernel"]
    b = src_pure["dwpose_embedding"][last]["bias"]
    p = src_pure["pose_proj"]["kernel"]
    c = src_pure["pose_proj"]["bias"]
    hi = jax.lax.Precision.HIGHEST
    w_new = jnp.einsum("...o,op->...p", w.astype(jnp.float32), p.astype(jnp.float32), precision=hi)
    b_new = jnp.einsum("o,op->p", b.astype(jnp.float32), p.astype(jnp.float32), precision=hi) + c
    out["dwpose_embedding"] = dict(out["dwpose_embedding"])
    out["dwpose_embedding"][last] = {"kernel": w_new.astype(w.dtype), "bias": b_new.astype(b.dtype)}
    nnx.replace_by_pure_dict(dst, out)
    nnx.update(folded, dst)
    return folded
