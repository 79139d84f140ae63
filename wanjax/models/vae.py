"""Wan2.1 causal 3-D VAE (``Wan2.1_VAE.pth``) with a streaming decoder, in Flax NNX.

Spec: /work/shared/docs/wan_components.md section 4; self_forcing.md sections 6.2 and 8.2.

Layout conventions: video is channels-last ``[B, T, H, W, 3]`` in [-1, 1]; latents are
``[B, T_lat, H/8, W/8, z_dim]`` normalised with the per-channel mean/std constants (4.5).
T pixel frames map to ``1 + (T - 1) / 4`` latent frames (T = 1 + 4k).

Time handling. Every temporal convolution is *causal* (2 zero frames in front, none behind).
The original code runs the network chunk by chunk with a feature cache; this module uses the
exactly equivalent full-sequence form of section 4.4 and, for streaming, the same code with an
explicit cache: every 3-tap temporal conv carries the last 2 frames of its input between
chunks (zeros before the first chunk). Two layers are special:

* ``downsample3d`` (encoder): frame 0 passes through, then a stride-2 temporal conv with no
  padding over the whole sequence (out_j = conv(x_{2j-2}, x_{2j-1}, x_{2j}), j >= 1).
* ``upsample3d`` (decoder): frame 0 of the *sequence* is replaced by zeros before the causal
  temporal conv (C -> 2C) and its output dropped; each later output splits into two frames
  (first C channels, then last C); the untouched frame 0 is prepended. Later chunks just run
  the causal conv with the cache.

Hence the decoder maps a first chunk of n latent frames to 1 + 4(n - 1) frames and every later
chunk of n to 4n frames: 3-latent blocks give 9, then 12, 12, ... frames (the Self-Forcing demo
schedule), and the concatenation equals ``decode`` of the whole sequence.

Parameters are stored in float32 (``param_dtype``); ``dtype`` is the compute dtype (bfloat16 for
speed on GPU). Norm statistics and attention softmax run in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.nn import Conv, Linear, conv_nd, param

LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of ``WanVAE_`` (names as in the original constructor)."""
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        for f in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig: temperal_downsample {self.temperal_downsample} needs "
                             f"len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"VAEConfig: latents_mean/std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @classmethod
    def wan21(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def tiny(cls, z_dim: int = 4) -> "VAEConfig":
        """base_dim 8; dim_mult/num_res_blocks stay real (diffusers' converter hard-codes them)."""
        return cls.with_z_dim(base_dim=8, z_dim=z_dim)

    @classmethod
    def with_z_dim(cls, base_dim: int, z_dim: int, **kw) -> "VAEConfig":
        if z_dim > len(LATENTS_MEAN):
            raise ValueError(f"z_dim={z_dim}: only {len(LATENTS_MEAN)} latent mean/std constants "
                             f"exist; pass latents_mean/latents_std explicitly")
        return cls(base_dim=base_dim, z_dim=z_dim, latents_mean=LATENTS_MEAN[:z_dim],
                   latents_std=LATENTS_STD[:z_dim], **kw)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def get_vae_config(name: str) -> VAEConfig:
    presets = {"tiny": VAEConfig.tiny, "wan21": VAEConfig.wan21}
    if name not in presets:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]()


# ---------------------------------------------------------------------------------------------
# Functional pieces (channels-last)
# ---------------------------------------------------------------------------------------------
CACHE_T = 2     # frames of history a 3-tap causal temporal conv needs


class _Init:
    """Sentinel cache value: 'start a stream here' (zero history, return the new caches)."""

    def __repr__(self):
        return "INIT"


INIT = _Init()


def _sub(cache, key):
    """The cache of child ``key``: None (no caching) and INIT propagate unchanged."""
    if cache is None or cache is INIT:
        return cache
    return cache[key]


def rms_norm_f(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """Wan's RMS_norm: ``x / max(||x||_2 over C, 1e-12) * sqrt(C) * gamma`` (F.normalize style).

    x [..., C] (any dtype); statistics in float32; result in x.dtype.
    """
    xf = x.astype(jnp.float32)
    c = x.shape[-1]
    n = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    y = xf / jnp.maximum(n, 1e-12) * (math.sqrt(c) * gamma.astype(jnp.float32))
    return y.astype(x.dtype)


def _last_frames(prev: jax.Array | None, x: jax.Array, n: int = CACHE_T) -> jax.Array:
    """The last ``n`` frames of concat([prev, x], time); prev None means zeros. x [B,T,...]."""
    t = x.shape[1]
    if t >= n:
        return x[:, t - n:]
    if prev is None:
        prev = jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)
    return jnp.concatenate([prev[:, t:], x], axis=1)


def _conv3d_folded(xc: jax.Array, kernel: jax.Array, bias, pad_hw: int) -> jax.Array:
    """Valid-in-time 3-D conv as one 2-D conv over time-stacked channels.

    xc [B,T+kt-1,H,W,Ci]; kernel [kt,kh,kw,Ci,Co] -> [B,T,H,W,Co]. The kt shifted views are
    concatenated on channels (index kt*Ci + c), so the conv is a per-frame 2-D conv with kt*Ci
    inputs (cuDNN's 2-D kernels are often faster than its 3-D ones; costs a kt-fold input copy).
    """
    kt, kh, kw, ci, co = kernel.shape
    t = xc.shape[1] - (kt - 1)
    xs = jnp.concatenate([xc[:, i:i + t] for i in range(kt)], axis=-1)
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * ci, co)
    return _per_frame(lambda f: conv_nd(f, k2, bias, strides=(1, 1),
                                        padding=((pad_hw, pad_hw), (pad_hw, pad_hw))), xs)


def causal_conv3d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, cache,
                  pad_hw: int, impl: str = "fold") -> tuple[jax.Array, Any]:
    """Causal 3-D conv. x [B,T,H,W,Ci]; kernel [kt,kh,kw,Ci,Co] -> y [B,T,H,W,Co].

    ``cache``: None (whole sequence, 2 front zero frames, no cache returned), INIT (same, and
    return the new cache) or an array [B, kt-1, H, W, Ci] of the previous input frames.
    ``impl``: "3d" (one 3-D conv) or "fold" (time folded into channels, one 2-D conv).
    Returns (y, new_cache or None).
    """
    kt = kernel.shape[0]
    hw = ((pad_hw, pad_hw), (pad_hw, pad_hw))
    if kt == 1:
        return conv_nd(x, kernel, bias, strides=(1, 1, 1), padding=((0, 0),) + hw), None
    if cache is None or cache is INIT:
        new_cache = None if cache is None else _last_frames(None, x, kt - 1)
        if impl == "fold":
            xc = jnp.pad(x, ((0, 0), (kt - 1, 0), (0, 0), (0, 0), (0, 0)))
            return _conv3d_folded(xc, kernel, bias, pad_hw), new_cache
        y = conv_nd(x, kernel, bias, strides=(1, 1, 1), padding=((kt - 1, 0),) + hw)
        return y, new_cache
    cache = cache.astype(x.dtype)
    xc = jnp.concatenate([cache, x], axis=1)
    if impl == "fold":
        y = _conv3d_folded(xc, kernel, bias, pad_hw)
    else:
        y = conv_nd(xc, kernel, bias, strides=(1, 1, 1), padding=((0, 0),) + hw)
    return y, xc[:, xc.shape[1] - (kt - 1):]


def _per_frame(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Apply an image op to every frame: x [B,T,H,W,C] -> [B,T,H',W',C']."""
    b, t = x.shape[:2]
    y = fn(x.reshape((b * t,) + x.shape[2:]))
    return y.reshape((b, t) + y.shape[1:])


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Nearest 2x upsampling followed by a 3x3 conv (pad 1), without materialising the 2x input.

    x [N,H,W,Ci]; kernel [3,3,Ci,Co] -> [N,2H,2W,Co]. Exact rewrite: output pixel (2i+a, 2j+b)
    only sees input rows i-1..i+1, with the taps of the 3x3 kernel that land on the same input
    pixel summed. The four phases become one 3x3 conv at low resolution with 4*Co outputs,
    followed by depth-to-space. Same FLOPs as the naive form, 4x less activation memory.
    """
    k = kernel.astype(jnp.float32)
    zero = jnp.zeros_like(k[0])
    # row phase a: taps at input rows (i-1, i, i+1)
    rows = [jnp.stack([k[0], k[1] + k[2], zero]),       # a = 0
            jnp.stack([zero, k[0] + k[1], k[2]])]       # a = 1
    phases = []
    for ka in rows:                                      # ka [3(r), 3(s), Ci, Co]
        zc = jnp.zeros_like(ka[:, 0])
        phases.append(jnp.stack([ka[:, 0], ka[:, 1] + ka[:, 2], zc], axis=1))  # b = 0
        phases.append(jnp.stack([zc, ka[:, 0] + ka[:, 1], ka[:, 2]], axis=1))  # b = 1
    kk = jnp.stack(phases, axis=-2)                       # [3,3,Ci,4(a,b),Co]
    ci, co = kernel.shape[2], kernel.shape[3]
    kk = kk.reshape(3, 3, ci, 4 * co)
    bb = jnp.tile(bias.astype(jnp.float32), 4)
    y = conv_nd(x, kk, bb, strides=(1, 1), padding=((1, 1), (1, 1)))   # [N,H,W,4*Co]
    n, h, w = x.shape[:3]
    y = y.reshape(n, h, w, 2, 2, co).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, 2 * h, 2 * w, co)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class ChannelRMSNorm(nnx.Module):
    """Wan RMS_norm over channels; ``weight`` [C] (the original gamma [C,1,1(,1)] squeezed)."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32):
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x):
        return rms_norm_f(x, self.weight[...])


class CausalConv3d(Conv):
    """Causal 3-D conv, kernel [kt,kh,kw,Ci,Co]; spatial zero padding ``kh // 2``.

    ``impl`` ("fold" or "3d", see ``causal_conv3d``) is a static attribute; change it for a whole
    model with ``set_conv_impl``. "fold" is the default: on an H100 in bf16 it decoded 21 latent
    frames to 81 frames of 480x832 in 0.78 s against 0.96 s for "3d" (cuDNN 2-D kernels beat its
    3-D ones), at the price of a longer compile (about 60 s against 17 s).
    """

    impl: str = "fold"

    def __call__(self, x, cache=None):
        return causal_conv3d(x, self.kernel[...], None if self.bias is None else self.bias[...],
                             cache, self.kernel.shape[1] // 2, self.impl)


def set_conv_impl(model: nnx.Module, impl: str) -> nnx.Module:
    """Select the temporal-conv implementation ("3d" or "fold") of every CausalConv3d (in place)."""
    if impl not in ("3d", "fold"):
        raise ValueError(f"conv impl {impl!r}: choose '3d' or 'fold'")
    for _, m in nnx.iter_graph(model):
        if isinstance(m, CausalConv3d):
            m.impl = impl
    return model


class ResidualBlock(nnx.Module):
    """RMS, SiLU, CausalConv3d 3^3, RMS, SiLU, CausalConv3d 3^3, plus a 1^3 shortcut if in != out."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = ChannelRMSNorm(cin, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), **kw)
        self.norm2 = ChannelRMSNorm(cout, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), **kw)
        self.shortcut = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x, cache=None, first: bool = True):
        """x [B,T,H,W,Ci] -> ([B,T,H,W,Co], cache dict or None)."""
        h = x if self.shortcut is None else self.shortcut(x)[0]
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), _sub(cache, "conv1"))
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), _sub(cache, "conv2"))
        return y + h, (None if cache is None else {"conv1": c1, "conv2": c2})


class AttentionBlock(nnx.Module):
    """Per-frame single-head self-attention over h*w positions (middle block only)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm = ChannelRMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = Linear(dim, 3 * dim, rngs=rngs, param_dtype=param_dtype)
        self.proj = Linear(dim, dim, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, cache=None, first: bool = True):
        """x [B,T,H,W,C] -> same shape. Stateless in time (cache passes through as {})."""
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        s = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
        o = jnp.einsum("nqk,nkc->nqc", p, v, preferred_element_type=jnp.float32).astype(x.dtype)
        o = self.proj(o).reshape(b, t, h, w, c)
        return x + o, (None if cache is None else {})


class Resample(nnx.Module):
    """downsample2d / downsample3d (encoder) and upsample2d / upsample3d (decoder)."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} not in {self.MODES}")
        self.mode = mode
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        if mode.startswith("up"):
            self.resample = Conv(dim, dim // 2, (3, 3), padding=(1, 1), **kw)
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw) if mode == "upsample3d" else None
        else:
            self.resample = Conv(dim, dim, (3, 3), strides=(2, 2), **kw)
            self.time_conv = Conv(dim, dim, (3, 1, 1), **kw) if mode == "downsample3d" else None

    def _spatial_down(self, x):
        # ZeroPad2d (left 0, right 1, top 0, bottom 1) + 3x3 stride-2 conv, no other padding
        return _per_frame(lambda f: conv_nd(f, self.resample.kernel[...], self.resample.bias[...],
                                            strides=(2, 2), padding=((0, 1), (0, 1))), x)

    def __call__(self, x, cache=None, first: bool = True):
        """x [B,T,H,W,C] -> (y, cache). Down: [B,T',H/2,W/2,C]; up: [B,T',2H,2W,C/2]."""
        if self.mode.startswith("down"):
            if cache is not None:
                raise NotImplementedError("the encoder runs on whole sequences only (no cache)")
            x = self._spatial_down(x)
            if self.mode == "downsample3d" and x.shape[1] > 1:
                y = conv_nd(x, self.time_conv.kernel[...], self.time_conv.bias[...],
                            strides=(2, 1, 1), padding=((0, 0), (0, 0), (0, 0)))
                x = jnp.concatenate([x[:, :1], y], axis=1)
            return x, None
        new_cache = None if cache is None else {}
        if self.mode == "upsample3d":
            x, tc = self._time_up(x, _sub(cache, "time_conv"), first)
            if cache is not None:
                new_cache = {"time_conv": tc}
        k, bias = self.resample.kernel[...], self.resample.bias[...]
        return _per_frame(lambda f: upsample2x_conv3x3(f, k, bias), x), new_cache

    def _time_up(self, x, cache, first: bool):
        """Temporal 2x of upsample3d: x [B,T,H,W,C] -> [B, 2T (-1 if first), H, W, C]."""
        b, t, h, w, c = x.shape
        if first:
            # frame 0 of the sequence never enters time_conv ('Rep' = zeros) and passes through
            if cache is not None and cache is not INIT:
                raise ValueError("first=True needs cache None or INIT")
            tin = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, 1:]], axis=1)
            new_cache = None if cache is None else _last_frames(None, tin)
            if t == 1:
                return x, new_cache
            # causal conv over [0, x1, x2, ...] with output 0 dropped == causal conv over x[:, 1:]
            # (its 2 zero front frames stand for the padding frame and the zeroed frame 0)
            y, _ = self.time_conv(x[:, 1:])
            head = x[:, :1]
        else:
            y, new_cache = self.time_conv(x, cache)
            head = None
        n = y.shape[1]
        y = y.reshape(b, n, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * n, h, w, c)
        if head is not None:
            y = jnp.concatenate([head, y], axis=1)
        return y, new_cache


class MidBlock(nnx.Module):
    """ResidualBlock, AttentionBlock, ResidualBlock at constant width."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.res0 = ResidualBlock(dim, dim, **kw)
        self.attn = AttentionBlock(dim, **kw)
        self.res1 = ResidualBlock(dim, dim, **kw)

    def __call__(self, x, cache=None, first: bool = True):
        x, c0 = self.res0(x, _sub(cache, "res0"))
        x, _ = self.attn(x)
        x, c1 = self.res1(x, _sub(cache, "res1"))
        return x, (None if cache is None else {"res0": c0, "res1": c1})


def encoder_layers(cfg: VAEConfig) -> list[tuple]:
    """Wan ``encoder.downsamples`` list: ("res", cin, cout) or ("down2d"/"down3d", C)."""
    dims = [cfg.base_dim * m for m in (1,) + cfg.dim_mult]
    out = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            out.append(("res", cin, cout))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            out.append(("downsample3d" if cfg.temperal_downsample[i] else "downsample2d", cout))
    return out


def decoder_layers(cfg: VAEConfig) -> list[tuple]:
    """Wan ``decoder.upsamples`` list: ("res", cin, cout) or ("upsample2d"/"upsample3d", C)."""
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
    out = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            cin //= 2          # the previous upsample halved the channels
        for _ in range(cfg.num_res_blocks + 1):
            out.append(("res", cin, cout))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            out.append(("upsample3d" if cfg.temperal_upsample[i] else "upsample2d", cout))
    return out


def _make_layer(spec, kw):
    if spec[0] == "res":
        return ResidualBlock(spec[1], spec[2], **kw)
    return Resample(spec[1], spec[0], **kw)


class Encoder(nnx.Module):
    """Video [B,T,H,W,3] -> [B,T_lat,H/8,W/8,2*z_dim] (mu, log_var)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        layers = encoder_layers(cfg)
        top = cfg.base_dim * cfg.dim_mult[-1]
        self.conv_in = CausalConv3d(3, cfg.base_dim, (3, 3, 3), **kw)
        self.down = nnx.List([_make_layer(s, kw) for s in layers])
        self.mid = MidBlock(top, **kw)
        self.norm_out = ChannelRMSNorm(top, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(top, 2 * cfg.z_dim, (3, 3, 3), **kw)

    def __call__(self, x):
        x, _ = self.conv_in(x)
        for layer in self.down:
            x, _ = layer(x)
        x, _ = self.mid(x)
        x, _ = self.conv_out(jax.nn.silu(self.norm_out(x)))
        return x


class Decoder(nnx.Module):
    """Latent (after conv2) [B,T_lat,h,w,z_dim] -> video [B,1+4(T_lat-1),8h,8w,3] (unclamped)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        top = cfg.base_dim * cfg.dim_mult[-1]
        self.conv_in = CausalConv3d(cfg.z_dim, top, (3, 3, 3), **kw)
        self.mid = MidBlock(top, **kw)
        self.up = nnx.List([_make_layer(s, kw) for s in decoder_layers(cfg)])
        self.norm_out = ChannelRMSNorm(cfg.base_dim, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(cfg.base_dim, 3, (3, 3, 3), **kw)

    def __call__(self, x, cache=None, first: bool = True):
        """cache None (whole sequence), INIT (first stream chunk) or the dict a previous chunk
        returned; ``first`` is True for the whole sequence / first chunk. Returns (y, cache)."""
        x, c_in = self.conv_in(x, _sub(cache, "conv_in"))
        x, c_mid = self.mid(x, _sub(cache, "mid"))
        c_up = []
        for i, layer in enumerate(self.up):
            x, c = layer(x, None if cache is None else (INIT if cache is INIT else cache["up"][i]),
                         first)
            c_up.append(c)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), _sub(cache, "conv_out"))
        if cache is None:
            return x, None
        return x, {"conv_in": c_in, "mid": c_mid, "up": c_up, "conv_out": c_out}


class WanVAE(nnx.Module):
    """Wan2.1 VAE. ``encode``: video [B,T,H,W,3] in [-1,1] -> normalised latent
    [B,T_lat,H/8,W/8,z]; ``decode``: latent -> video [B,1+4(T_lat-1),H,W,3] clamped to [-1,1].

    ``dtype`` is the compute dtype (float32 or bfloat16); parameters are stored in ``param_dtype``.
    """

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), **kw)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder(cfg, **kw)

    # -- input checks -------------------------------------------------------------------------
    def _check_video(self, video):
        s, tf = self.cfg.spatial_factor, self.cfg.temporal_factor
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"WanVAE.encode: expected channels-last video [B, T, H, W, 3], got shape "
                             f"{tuple(video.shape)}; transpose a [B, 3, T, H, W] tensor with "
                             f"x.transpose(0, 2, 3, 4, 1)")
        b, t, h, w, _ = video.shape
        if (t - 1) % tf:
            raise ValueError(f"WanVAE.encode: T={t} frames, but T must be 1 + {tf}k (1, 5, 9, ...); "
                             f"trim the video to {1 + (t - 1) // tf * tf} frames")
        if h % s or w % s:
            raise ValueError(f"WanVAE.encode: H, W = {h}, {w} must be multiples of {s}; crop or "
                             f"resize to {h // s * s}x{w // s * s}")

    def _check_latent(self, z, where="WanVAE.decode"):
        if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"{where}: expected channels-last latents [B, T_lat, h, w, "
                             f"{self.cfg.z_dim}], got shape {tuple(z.shape)}")
        if z.shape[1] < 1:
            raise ValueError(f"{where}: need at least one latent frame, got shape {tuple(z.shape)}")

    # -- latent normalisation (section 4.5) ---------------------------------------------------
    def _mean_inv_std(self):
        mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(self.cfg.latents_std, jnp.float32)
        return mean, inv_std

    def encode(self, video: jax.Array) -> jax.Array:
        """video [B,T,H,W,3] in [-1,1], T = 1+4k -> z [B,1+k,H/8,W/8,z_dim] float32 (normalised)."""
        self._check_video(video)
        x = self.encoder(video.astype(self.dtype))
        zd = self.cfg.z_dim
        # conv1 is 1x1x1; only its mu half is needed (log_var is discarded, no sampling)
        mu = conv_nd(x, self.conv1.kernel[..., :zd], self.conv1.bias[:zd],
                     strides=(1, 1, 1), padding=((0, 0),) * 3).astype(jnp.float32)
        mean, inv_std = self._mean_inv_std()
        return (mu - mean) * inv_std

    def _pre_decode(self, z):
        mean, inv_std = self._mean_inv_std()
        x = z.astype(jnp.float32) / inv_std + mean
        return self.conv2(x.astype(self.dtype))[0]

    def decode_chunk(self, z: jax.Array, cache=None, first: bool = True):
        """One causal chunk. z [B,n,h,w,z_dim] -> (video [B, 1+4(n-1) if first else 4n, 8h, 8w, 3]
        float32 clamped, cache). ``cache``: None (no streaming), INIT or the previous cache."""
        self._check_latent(z)
        y, cache = self.decoder(self._pre_decode(z), cache, first)
        return jnp.clip(y.astype(jnp.float32), -1.0, 1.0), cache

    def auto_chunk(self, z_shape: Sequence[int]) -> int | None:
        """Latent frames per decode chunk: None (one pass) unless the largest conv input (the
        time-folded full-resolution activation, 3*base_dim channels) would pass 2^31 elements,
        which cuDNN's fast kernels do not take; then chunks well below that (3 at 480x832)."""
        b, t, h, w = z_shape[:4]
        s = self.cfg.spatial_factor
        per_frame = b * (h * s) * (w * s) * 3 * self.cfg.base_dim
        if (1 + self.cfg.temporal_factor * (t - 1)) * per_frame < 2 ** 31:
            return None
        return max(1, int(2 ** 31 / (per_frame * self.cfg.temporal_factor * 1.5)))

    def decode(self, z: jax.Array, chunk: int | None | str = "auto") -> jax.Array:
        """z [B,T_lat,h,w,z_dim] (normalised) -> video [B,1+4(T_lat-1),8h,8w,3] in [-1,1].

        ``chunk="auto"`` picks ``auto_chunk``. ``chunk=None`` runs the whole sequence at once
        (the full-sequence form). ``chunk=n``
        decodes n latent frames at a time with the causal caches (the first chunk, then a
        ``lax.scan`` over equal chunks, then any remainder): same result, activations bounded by
        one chunk. Use it at real sizes: a single pass over 81 frames at 480x832 holds tensors of
        more than 2^31 elements, which cuDNN's fast kernels do not take.
        """
        t = z.shape[1]
        if chunk == "auto":
            chunk = self.auto_chunk(z.shape)
        if chunk is None or chunk >= t:
            return self.decode_chunk(z, None, True)[0]
        if chunk < 1:
            raise ValueError(f"WanVAE.decode: chunk must be >= 1, got {chunk}")
        first, cache = self.decode_chunk(z[:, :chunk], INIT, True)
        rest, _ = self.decode_continue(z[:, chunk:], cache, chunk)
        return jnp.concatenate([first, rest], axis=1)

    def decode_continue(self, z: jax.Array, cache, chunk: int):
        """Continue a causal decode: z [B,n,h,w,z_dim] after ``cache`` -> (video [B, 4n, 8h, 8w, 3],
        cache), ``chunk`` latent frames per step (a ``lax.scan`` over equal chunks, then any
        remainder), so activations are bounded by one chunk whatever n is."""
        t = z.shape[1]
        chunk = max(1, min(chunk, t))
        n_mid = t // chunk
        outs = []
        zs = z[:, :n_mid * chunk]
        zs = zs.reshape((zs.shape[0], n_mid, chunk) + zs.shape[2:]).swapaxes(0, 1)

        def body(c, zc):
            y, c = self.decode_chunk(zc, c, False)
            return c, y

        cache, ys = jax.lax.scan(body, cache, zs)          # ys [n_mid, B, 4*chunk, H, W, 3]
        ys = ys.swapaxes(0, 1)
        outs.append(ys.reshape((ys.shape[0], -1) + ys.shape[3:]))
        rest = t - n_mid * chunk
        if rest:
            y, cache = self.decode_chunk(z[:, t - rest:], cache, False)
            outs.append(y)
        return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)), cache


# ---------------------------------------------------------------------------------------------
# Jitted entry points and the streaming decoder
# ---------------------------------------------------------------------------------------------
def _split(vae: WanVAE):
    graphdef, state = nnx.split(vae)
    return graphdef, state


def jit_encode(vae: WanVAE) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``video -> z`` (parameters are an argument, not baked-in constants)."""
    graphdef, state = _split(vae)
    fn = jax.jit(lambda st, v: nnx.merge(graphdef, st).encode(v))
    return lambda video: fn(state, video)


def jit_decode(vae: WanVAE, chunk: int | None | str = "auto") -> Callable[[jax.Array], jax.Array]:
    """A jitted ``z -> video`` (see ``WanVAE.decode`` for ``chunk``; auto gives 3 at 480x832)."""
    graphdef, state = _split(vae)
    fn = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z, chunk))
    return lambda z: fn(state, z)


def _as_uint8(fn):
    """Wrap a ``(..) -> (frames in [-1, 1], cache)`` function to return uint8 frames."""

    def wrapped(*args):
        frames, cache = fn(*args)
        return jnp.clip(jnp.round((frames + 1.0) * 127.5), 0, 255).astype(jnp.uint8), cache

    return wrapped


class StreamingDecoder:
    """Decode latents block by block with the causal caches carried between calls.

    >>> dec = StreamingDecoder(vae)
    >>> f1 = dec.push(z[:, 0:3])   # [B, 9, H, W, 3]
    >>> f2 = dec.push(z[:, 3:6])   # [B, 12, H, W, 3]; concat(f1, f2, ...) == vae.decode(z)
    >>> dec.reset()                 # start a new video

    The cache is a pytree of arrays (the last 2 input frames of every temporal conv) with static
    shapes, so one compiled step serves every block after the first (the first block has its own
    compiled function). Block sizes may vary, at the cost of one compile per new size. The cache
    is donated to the step, so its buffers are reused in place. The parameters are a snapshot
    taken at construction (make a new decoder after changing the model's weights).
    """

    def __init__(self, vae: WanVAE, chunk: int | None = None, uint8: bool = False):
        """``chunk``: latent frames per decoder pass inside one push (None: the whole block at
        once). ``chunk=1`` decodes frame by frame in a ``lax.scan`` (as Wan's own decode loop),
        bounding the activations by one latent frame (4 pixel frames) at the same result.
        ``uint8``: return frames as uint8 0..255 (rounded half to even on the device, as
        ``wanjax.videoio.to_uint8``): 4x less to copy to the host, no host-side conversion."""
        self.vae = vae
        self.chunk = chunk
        self.uint8 = uint8
        self.graphdef, self.state = _split(vae)
        gd = self.graphdef

        def first(st, z):
            m = nnx.merge(gd, st)
            if chunk is None or z.shape[1] <= chunk:
                return m.decode_chunk(z, INIT, True)
            y0, cache = m.decode_chunk(z[:, :chunk], INIT, True)
            y1, cache = m.decode_continue(z[:, chunk:], cache, chunk)
            return jnp.concatenate([y0, y1], axis=1), cache

        def step(st, z, cache):
            m = nnx.merge(gd, st)
            if chunk is None or z.shape[1] <= chunk:
                return m.decode_chunk(z, cache, False)
            return m.decode_continue(z, cache, chunk)

        if uint8:
            first, step = _as_uint8(first), _as_uint8(step)
        self._first = jax.jit(first)
        self._step = jax.jit(step, donate_argnums=(2,))
        self.cache = None
        self._shape = None

    def precompile(self, z_shape: tuple, dtype) -> None:
        """Compile the first-block and later-block steps for latent blocks of ``z_shape`` ahead of use
        (the executables land in the jit caches)."""
        z = jax.ShapeDtypeStruct(tuple(z_shape), dtype)
        self._first.lower(self.state, z).compile()
        cache = jax.eval_shape(self._first, self.state, z)[1]
        self._step.lower(self.state, z, cache).compile()

    def fork(self) -> "StreamingDecoder":
        """A new, empty stream sharing this decoder's parameters and compiled functions (so a
        pipeline compiles once and still runs independent streams)."""
        other = object.__new__(StreamingDecoder)
        other.__dict__.update(self.__dict__)
        other.cache = None
        other._shape = None
        return other

    def reset(self) -> None:
        """Forget the stream; the next ``push`` starts a new video."""
        self.cache = None
        self._shape = None

    @property
    def started(self) -> bool:
        return self.cache is not None

    def push(self, z: jax.Array) -> jax.Array:
        """z [B,n,h,w,z_dim] -> frames [B, 1+4(n-1) (first push) or 4n, 8h, 8w, 3] float32 in [-1, 1]
        (uint8 0..255 with ``uint8=True``)."""
        self.vae._check_latent(z, "StreamingDecoder.push")
        if self.cache is None:
            frames, self.cache = self._first(self.state, z)
            self._shape = (z.shape[0],) + tuple(z.shape[2:])
            return frames
        if (z.shape[0],) + tuple(z.shape[2:]) != self._shape:
            raise ValueError(f"StreamingDecoder.push: latent block {tuple(z.shape)} does not continue "
                             f"the stream (batch, h, w, z) = {self._shape}; call reset() first")
        frames, self.cache = self._step(self.state, z, self.cache)
        return frames


def init_vae(cfg: VAEConfig, seed: int = 0, *, dtype=jnp.float32, param_dtype=jnp.float32) -> WanVAE:
    """A VAE with random weights, made quickly with NumPy (for benchmarks and smoke tests).

    Kernels are U(+-1/sqrt(fan_in)) as in PyTorch's default init, biases zero, norm gains one.
    (Building ``WanVAE(cfg, rngs=...)`` directly gives the same distribution for the kernels but
    runs one jax.random kernel per parameter, which is slow to compile on CPU.)
    """
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(seed), dtype=dtype,
                                             param_dtype=param_dtype))
    state = nnx.state(abstract, nnx.Param)
    rng = np.random.default_rng(seed)

    def fill(path, var):
        name, shape = str(path[-1]), tuple(var.shape)
        if name == "kernel":
            bound = 1.0 / math.sqrt(max(int(np.prod(shape[:-1])), 1))
            val = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif name == "bias":
            val = np.zeros(shape, np.float32)
        else:
            val = np.ones(shape, np.float32)
        return jnp.asarray(val, param_dtype)

    flat = nnx.to_flat_state(state)
    values = {p: fill(p, v) for p, v in flat}
    pure = nnx.to_pure_dict(state)

    def assign(tree, prefix=()):
        return {k: (assign(v, prefix + (k,)) if isinstance(v, dict) else values[prefix + (k,)])
                for k, v in tree.items()}

    nnx.replace_by_pure_dict(state, assign(pure))
    nnx.update(abstract, state)
    return abstract


def load_vae(ckpt_dir, *, dtype=jnp.float32, mesh=None) -> WanVAE:
    """Load a converted checkpoint (``python -m converters.vae``) with compute dtype ``dtype``."""
    from wanjax.checkpoint import load_model, read_config

    cfg_d = read_config(ckpt_dir)
    if cfg_d.get("model") != "vae":
        raise ValueError(f"{ckpt_dir}: config.json says model={cfg_d.get('model')!r}, expected 'vae'; "
                         f"convert Wan2.1_VAE.pth with python -m converters.vae")
    return load_model(ckpt_dir, lambda c, rngs: WanVAE(VAEConfig.from_dict(c), rngs=rngs, dtype=dtype),
                      mesh, dtype=jnp.float32)
