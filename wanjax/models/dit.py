"""The Wan2.1 diffusion transformer in Flax NNX, bidirectional (teacher / critic) and block-causal
with a static-shape KV cache (Self-Forcing student).

Layouts (channels last everywhere):
- latents ``x``: [B, F, H, W, C_in]; with I2V conditioning ``y`` [B, F, H, W, 20] is concatenated
  on channels (noise 0-15 | mask 16-19 | reference latent 20-35).
- timesteps ``t``: [B, F] float (per frame; Wan's model timestep scale 0..1000).
- text ``context``: [B, 512, text_dim], already trimmed and zero-padded to 512 rows.
- ``clip_fea``: [B, N_img, 1280] (I2V only).
- ``pose``: [B, F, H/2, W/2, dim] tokens added after the patch embedding (UniAnimate).
- output: the flow (velocity) prediction [B, F, H, W, out_dim], float32.

Precision policy (``dtype`` = compute dtype, ``param_dtype`` = storage):
- matmuls and attention run in ``dtype`` (bf16 on accelerators) with float32 accumulation;
- float32 is kept for: the timestep sinusoid and time MLP, the modulation tables and all
  shift/scale/gate arithmetic, LayerNorm/RMSNorm statistics, the RoPE rotation, the softmax, the
  residual stream (as in the original Wan, whose residual becomes fp32 after the first gated add),
  and the output head;
- ``residual_dtype="bfloat16"`` stores the residual stream in bf16 between the ops instead, as
  diffusers does in bf16 (and Self-Forcing, which runs every add in bf16): each norm, modulation,
  gate and add still computes in fp32 and rounds its result once. That halves the bytes the stream
  itself moves and keeps (saved layer inputs); on an H100 the ODE step is ~1% faster
  (docs/PERFORMANCE.md, session 9).

Causal mode: ``forward(..., causal=True)`` applies the block-causal mask of
``num_frame_per_block`` frames (optionally windowed with sinks) over the whole sequence, for
ODE regression and teacher forcing. ``forward_cached`` runs one block against a per-layer K/V cache
of static shape; see :class:`KVCache`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from wanjax import attention as attn_lib
from wanjax.nn import (FFN_OUT_NAME, MATMUL_OUT_NAME, LayerNorm, Linear, RMSNorm, gelu_exact, gelu_tanh,
                       gelu_tanh_linear, layer_norm, matmul_one_cotangent, param)

F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
RESIDUAL_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class WanDiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    i2v: bool = False            # img_emb + image cross-attention (k_img / v_img / norm_k_img)
    image_dim: int = 1280
    # causal student
    num_frame_per_block: int = 3
    local_attn_size: int = -1    # frames in the attention window (-1: all, capped by max_frames)
    sink_size: int = 0           # frames pinned at the start of a rolling window
    max_frames: int = 21         # KV-cache capacity when local_attn_size == -1
    # numerics / kernels
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"
    residual_dtype: str = "float32"  # storage of the residual stream between the ops: float32 (upstream Wan) or
                                     # bfloat16 (diffusers' and Self-Forcing's layout; the adds still run in fp32)
    attention: str = "auto"      # xla | cudnn | splash | auto
    remat: bool = False
    remat_policy: str = "full"   # what a rematerialised block keeps (see REMAT_POLICIES)
    remat_dots_layers: int = 0   # the first N blocks keep every matmul output instead ("dots"): spare memory
                                 # spent on less recompute (full-sequence forward only)
    unroll_layers: bool = False  # unroll the full-sequence forward's layer scan(s) into straight-line code
                                 # (see ``scan_layers``): same function, compile time grows with num_layers

    def __post_init__(self):
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"WanDiTConfig.residual_dtype={self.residual_dtype!r}: choose one of {RESIDUAL_DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def residual(self):
        """The residual stream's storage dtype (``residual_dtype``)."""
        return jnp.dtype(self.residual_dtype)

    def backend(self) -> str:
        return attn_lib.default_backend() if self.attention == "auto" else attn_lib.check_backend(self.attention)

    def replace(self, **kw) -> "WanDiTConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanDiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"model", "preset", "source", "converted_from"}
        if unknown:
            raise ValueError(f"unknown WanDiTConfig fields {sorted(unknown)}")
        kw = {k: v for k, v in d.items() if k in names}
        if "patch" in kw:
            kw["patch"] = tuple(kw["patch"])
        return cls(**kw)


# What a rematerialised block saves for its backward pass (everything else is recomputed):
#   full            nothing: one extra forward of the whole block (least memory)
#   attention       the self-attention kernels' outputs, incl. cuDNN's softmax statistics, so the
#                   backward recomputes only the projections, norms and FFN (self-attention is
#                   most of a block's FLOPs at video lengths); + one [L, D] activation per layer
#   attention_proj  also q / k / v and the self- and cross-attention projections' outputs (only
#                   the FFN and the elementwise ops are recomputed); + ~6 [L, D] per layer
#   dots            every matmul output without batch dims (the FFN's 4x-wide hidden too: most memory)
#                   and the self-attention output as in ``attention``
REMAT_POLICIES = ("full", "attention", "attention_proj", "dots")
_SAVED_NAMES = {"attention": ("attn",), "attention_proj": ("attn", "qkv", "attn_proj", "cross_out"),
                "dots": ("attn", FFN_OUT_NAME, MATMUL_OUT_NAME)}
# (dots: plus every matmul output without batch dims, below; the FFN's second matmul and the fused q/k/v
# projection run inside custom_vjps, which a policy cannot see into, so their outputs are tagged)
# With cuDNN, "attn" is replaced by the attention's own residuals: the kernel outputs of the per-block
# form (``_is_self_attention_kernel``) or the split form's merged output and log-sum-exp (tagged).


def _is_self_attention_kernel(prim, *avals) -> bool:
    """A fused-attention forward (cuDNN's ``dot_product_attention_fwd[_wrapper]``, whose outputs are
    the attention result *and* the softmax statistics its backward needs) over at least as many keys
    as queries: self-attention (a block against its prefix). Cross-attention (32,760 queries against
    512 text / 257 CLIP keys) is ~2% of the attention FLOPs but as large to keep: it is recomputed
    (keeping it under ``dots`` saved ~3 ms per ODE step for 3.4 GiB, docs/PERFORMANCE.md, session 12)."""
    if not prim.name.startswith("dot_product_attention_fwd") or len(avals) < 2:
        return False
    q, k = avals[0], avals[1]
    return getattr(k, "ndim", 0) == 4 and getattr(q, "ndim", 0) == 4 and k.shape[1] >= q.shape[1]


def remat_policy(name: str, backend: str = "xla"):
    """The ``jax.checkpoint`` policy for ``WanDiTConfig.remat_policy``. With cuDNN the attention is
    kept through its kernel's outputs (the tagged, sliced copy would only duplicate them)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {name!r}: choose one of {REMAT_POLICIES}")
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    names = _SAVED_NAMES[name]
    if backend == "cudnn" and "attn" in names:
        names = tuple(n for n in names if n != "attn") + (attn_lib.SPLIT_RESIDUAL_NAME,)
    by_name = cp.save_only_these_names(*names) if names else cp.nothing_saveable
    dots = cp.dots_with_no_batch_dims_saveable if name == "dots" else cp.nothing_saveable
    return lambda prim, *args, **params: (_is_self_attention_kernel(prim, *args) or by_name(prim, *args, **params)
                                          or dots(prim, *args, **params))


def remat(fn, cfg: "WanDiTConfig", policy: str | None = None, unrolled: bool = False):
    """``fn`` checkpointed per ``cfg.remat`` / ``cfg.remat_policy`` (or ``policy``); identity when remat
    is off. Inside a rolled scan the recomputation cannot be merged with the forward, so CSE may stay
    on. For a body that runs unrolled (``unrolled``) it must be prevented, else XLA would fold each
    block's recomputation into its forward and keep every activation alive."""
    if not cfg.remat:
        return fn
    return jax.checkpoint(fn, prevent_cse=unrolled, policy=remat_policy(policy or cfg.remat_policy, cfg.backend()))


def scan_layers(body, carry, xs, cfg: "WanDiTConfig"):
    """``lax.scan`` of a per-block ``body`` over the stacked layers ``xs``, rematerialised per ``cfg``.
    With ``cfg.remat_dots_layers = n`` the first n blocks run under the ``dots`` policy (one scan)
    and the rest under ``cfg.remat_policy`` (a second scan): the same function, less recompute for
    the memory the saved matmul outputs take.

    ``cfg.unroll_layers`` unrolls the scans fully (a 1-step scan stays a loop). A rolled scan stacks
    every saved residual into a [layers, ...] buffer: XLA zero-fills it, copies each cuBLAS / cuDNN
    output into it and may transpose the whole stack for the backward's layout. Unrolled, each
    residual is its own buffer. 1.3B ODE step on an H100 with ``remat_dots_layers=18``: 1.586 ->
    1.557 s and 4.7 GiB fewer temporaries (docs/PERFORMANCE.md, session 13)."""
    if cfg.remat_dots_layers < 0:
        raise ValueError(f"remat_dots_layers={cfg.remat_dots_layers}: must be >= 0 (0 = off; "
                         f"{cfg.num_layers} or more = every block)")
    unroll = bool(cfg.unroll_layers)

    def scan(carry, xs, policy=None):  # unrolled bodies must be CSE-fenced (see ``remat``)
        return jax.lax.scan(remat(body, cfg, policy, unrolled=unroll), carry, xs, unroll=unroll)

    n = min(int(cfg.remat_dots_layers), cfg.num_layers) if cfg.remat else 0
    if n == 0 or cfg.remat_policy == "dots":
        return scan(carry, xs)
    carry, ys_head = scan(carry, jax.tree.map(lambda a: a[:n], xs), "dots")
    if n == cfg.num_layers:
        return carry, ys_head
    carry, ys_tail = scan(carry, jax.tree.map(lambda a: a[n:], xs))
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys_head, ys_tail)


def _tag(x, name: str):
    return checkpoint_name(x, name)


PRESETS: dict[str, WanDiTConfig] = {
    "tiny": WanDiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32,
                         dtype="float32", param_dtype="float32"),
    "tiny_i2v": WanDiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32,
                             in_dim=36, i2v=True, dtype="float32", param_dtype="float32"),
    "t2v_1_3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v_14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v_14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, i2v=True),
}


def get_config(name: str, **overrides) -> WanDiTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------------------------
# Pure helpers: timestep embedding, RoPE, patchify
# ----------------------------------------------------------------------------------------------
def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """[...] -> [..., dim] as [cos(t w_j), sin(t w_j)], w_j = 10000^(-j/(dim/2)); float32."""
    half = dim // 2
    freqs = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half), F32)
    ang = t.astype(F32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per RoPE axis (t, h, w): [d - 4*(d//6), 2*(d//6), 2*(d//6)] = [44, 42, 42] for 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim {head_dim} must be even and >= 6 for 3-axis RoPE")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_freqs(d_axis: int) -> np.ndarray:
    return np.power(10000.0, -np.arange(0, d_axis, 2, dtype=np.float64) / d_axis)  # [d_axis/2]


def _frame_angles(frames: jax.Array, freqs: np.ndarray) -> jax.Array:
    """pos * freq for integer frame positions, accurate far beyond 1024: the position is split as
    hi*1024 + lo and (1024*freq mod 2pi) is precomputed in float64."""
    frames = jnp.asarray(frames, jnp.int32)
    hi, lo = frames // 1024, frames % 1024
    big = jnp.asarray(np.mod(1024.0 * freqs, 2 * np.pi), F32)
    return hi.astype(F32)[..., None] * big + lo.astype(F32)[..., None] * jnp.asarray(freqs, F32)


def rope_tables(head_dim: int, grid: tuple[int, int, int], start_frame=0) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [F*h*w, head_dim/2] for tokens in (f, h, w) order, frame positions
    ``start_frame + 0..F-1`` (may be traced)."""
    F, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    fa = _frame_angles(start_frame + jnp.arange(F), _axis_freqs(dt))  # [F, dt/2]
    ha = jnp.asarray(np.arange(h)[:, None] * _axis_freqs(dh), F32)   # [h, dh/2]
    wa = jnp.asarray(np.arange(w)[:, None] * _axis_freqs(dw), F32)   # [w, dw/2]
    ang = jnp.concatenate([
        jnp.broadcast_to(fa[:, None, None, :], (F, h, w, fa.shape[-1])),
        jnp.broadcast_to(ha[None, :, None, :], (F, h, w, ha.shape[-1])),
        jnp.broadcast_to(wa[None, None, :, :], (F, h, w, wa.shape[-1])),
    ], axis=-1).reshape(F * h * w, head_dim // 2)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved-pair rotation: x [B, L, H, D], cos/sin [L, D/2]; float32 math, input dtype out."""
    B, L, H, D = x.shape
    xf = x.astype(F32).reshape(B, L, H, D // 2, 2)
    xe, xo = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([xe * c - xo * s, xe * s + xo * c], axis=-1)
    return out.reshape(B, L, H, D).astype(x.dtype)


def patchify(x: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """[B, F, H, W, C] -> [B, F*h*w, pt*ph*pw*C], patch vector ordered (pt, ph, pw, c)."""
    pt, ph, pw = patch
    B, F, H, W, C = x.shape
    if F % pt or H % ph or W % pw:
        raise ValueError(f"latent [F={F}, H={H}, W={W}] is not divisible by the patch {patch}")
    x = x.reshape(B, F // pt, pt, H // ph, ph, W // pw, pw, C)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(B, (F // pt) * (H // ph) * (W // pw), pt * ph * pw * C)


def unpatchify(tok: jax.Array, grid: tuple[int, int, int], patch, out_dim: int) -> jax.Array:
    """[B, f*h*w, pt*ph*pw*c] (c fastest) -> [B, f*pt, h*ph, w*pw, c]."""
    pt, ph, pw = patch
    f, h, w = grid
    B = tok.shape[0]
    x = tok.reshape(B, f, h, w, pt, ph, pw, out_dim)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, f * pt, h * ph, w * pw, out_dim)


def _per_frame(x: jax.Array, num_frames: int) -> jax.Array:
    B, L, D = x.shape
    return x.reshape(B, num_frames, L // num_frames, D)


def _modulate(x_norm: jax.Array, shift: jax.Array, scale: jax.Array, num_frames: int) -> jax.Array:
    """x_norm [B, L, D] (fp32), shift/scale [B, F, D] -> [B, L, D] fp32."""
    xf = _per_frame(x_norm, num_frames)
    return (xf * (1.0 + scale[:, :, None]) + shift[:, :, None]).reshape(x_norm.shape)


def _gate(y: jax.Array, gate: jax.Array, num_frames: int) -> jax.Array:
    return (_per_frame(y.astype(F32), num_frames) * gate[:, :, None]).reshape(y.shape)


def _add(x: jax.Array, branch: jax.Array) -> jax.Array:
    """Residual add in float32, stored back in the stream's dtype (a no-op cast for float32)."""
    return (x.astype(F32) + branch.astype(F32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class MLP2(nnx.Module):
    """Linear -> act -> Linear (text / time embeddings)."""

    def __init__(self, din, dhidden, dout, act, *, rngs, param_dtype, axes_in=(None, "embed")):
        self.fc1 = Linear(din, dhidden, rngs=rngs, axes=axes_in, param_dtype=param_dtype)
        self.fc2 = Linear(dhidden, dout, rngs=rngs, axes=("embed", None), param_dtype=param_dtype)
        self.act = act

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ImageEmbedding(nnx.Module):
    """CLIP tokens [B, N, 1280] -> [B, N, dim]: LN, Linear, GELU(erf), Linear, LN."""

    def __init__(self, cfg: WanDiTConfig, *, rngs, param_dtype):
        self.norm_in = LayerNorm(cfg.image_dim, eps=1e-5, param_dtype=param_dtype)
        self.fc1 = Linear(cfg.image_dim, cfg.image_dim, rngs=rngs, axes=(None, "embed"), param_dtype=param_dtype)
        self.fc2 = Linear(cfg.image_dim, cfg.dim, rngs=rngs, axes=("embed", None), param_dtype=param_dtype)
        self.norm_out = LayerNorm(cfg.dim, eps=1e-5, param_dtype=param_dtype)

    def __call__(self, x):
        x = self.norm_in(x.astype(F32))
        return self.norm_out(self.fc2(gelu_exact(self.fc1(x))))


class CrossKV(NamedTuple):
    """Per-layer cross-attention keys/values (already normed): [B, Lc, H, Dh] each; image
    entries are None for T2V."""
    k: jax.Array
    v: jax.Array
    k_img: jax.Array | None
    v_img: jax.Array | None


class _Projections(nnx.Module):
    """q, k, v, o (D -> D) and the full-width RMSNorms on q and k, shared by both attentions."""

    def __init__(self, cfg: WanDiTConfig, *, rngs, param_dtype):
        D = cfg.dim
        self.q = Linear(D, D, rngs=rngs, axes=("embed", "heads"), param_dtype=param_dtype)
        self.k = Linear(D, D, rngs=rngs, axes=("embed", "heads"), param_dtype=param_dtype)
        self.v = Linear(D, D, rngs=rngs, axes=("embed", "heads"), param_dtype=param_dtype)
        self.o = Linear(D, D, rngs=rngs, axes=("heads", "embed"), param_dtype=param_dtype)
        self.norm_q = RMSNorm(D, eps=cfg.eps, param_dtype=param_dtype)
        self.norm_k = RMSNorm(D, eps=cfg.eps, param_dtype=param_dtype)
        self.num_heads = cfg.num_heads


class SelfAttention(_Projections):
    def qkv(self, x, cos, sin):
        B, L, D = x.shape
        H = self.num_heads
        # one fused [D, 3D] projection (same arithmetic as three matmuls, better GPU utilisation); its
        # backward builds the concatenated dq / dk / dv once (H100 ODE step: -10 ms, session 14)
        w = jnp.concatenate([self.q.kernel[...], self.k.kernel[...], self.v.kernel[...]], axis=1)
        b = jnp.concatenate([self.q.bias[...], self.k.bias[...], self.v.bias[...]])
        qkv = matmul_one_cotangent(x, w.astype(x.dtype)) + b.astype(x.dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        with jax.named_scope("qk_norm"):
            q = self.norm_q(q).reshape(B, L, H, D // H)
            k = self.norm_k(k).reshape(B, L, H, D // H)
        v = v.reshape(B, L, H, D // H)
        with jax.named_scope("rope"):
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o):
        B, L, H, Dh = o.shape
        return self.o(o.reshape(B, L, H * Dh))


class CrossAttention(_Projections):
    def __init__(self, cfg: WanDiTConfig, *, rngs, param_dtype):
        super().__init__(cfg, rngs=rngs, param_dtype=param_dtype)
        D = cfg.dim
        if cfg.i2v:
            self.k_img = Linear(D, D, rngs=rngs, axes=("embed", "heads"), param_dtype=param_dtype)
            self.v_img = Linear(D, D, rngs=rngs, axes=("embed", "heads"), param_dtype=param_dtype)
            self.norm_k_img = RMSNorm(D, eps=cfg.eps, param_dtype=param_dtype)
        else:
            self.k_img = self.v_img = self.norm_k_img = None

    def kv(self, text: jax.Array, img: jax.Array | None) -> CrossKV:
        """text [B, 512, D], img [B, N, D] or None (compute dtype) -> CrossKV."""
        B, Lc, D = text.shape
        H = self.num_heads
        k = self.norm_k(self.k(text)).reshape(B, Lc, H, D // H)
        v = self.v(text).reshape(B, Lc, H, D // H)
        if self.k_img is None:
            return CrossKV(k, v, None, None)
        if img is None:
            raise ValueError("this I2V model needs clip_fea (CLIP image tokens) for cross-attention")
        Li = img.shape[1]
        ki = self.norm_k_img(self.k_img(img)).reshape(B, Li, H, D // H)
        vi = self.v_img(img).reshape(B, Li, H, D // H)
        return CrossKV(k, v, ki, vi)

    def __call__(self, x, ckv: CrossKV, backend: str):
        B, L, D = x.shape
        H = self.num_heads
        q = self.norm_q(self.q(x)).reshape(B, L, H, D // H)
        o = attn_lib.attention(q, ckv.k, ckv.v, backend=backend)
        if ckv.k_img is not None:
            o = o + attn_lib.attention(q, ckv.k_img, ckv.v_img, backend=backend)
        return self.o(o.reshape(B, L, D))


class FFN(nnx.Module):
    def __init__(self, cfg: WanDiTConfig, *, rngs, param_dtype):
        self.fc1 = Linear(cfg.dim, cfg.ffn_dim, rngs=rngs, axes=("embed", "mlp"), param_dtype=param_dtype)
        self.fc2 = Linear(cfg.ffn_dim, cfg.dim, rngs=rngs, axes=("mlp", "embed"), param_dtype=param_dtype)

    def __call__(self, x):
        if type(self.fc1) is not Linear or type(self.fc2) is not Linear:  # wrapped (runtime LoRA): their calls
            return self.fc2(gelu_tanh(self.fc1(x)))
        dt = x.dtype
        h = jnp.einsum("...i,io->...o", x, self.fc1.kernel[...].astype(dt))  # fc1 without its bias
        y = gelu_tanh_linear(h, self.fc1.bias[...].astype(dt), self.fc2.kernel[...].astype(dt))
        return y + self.fc2.bias[...].astype(dt)


class Block(nnx.Module):
    """One Wan transformer block. ``modulation`` is the per-block [6, D] offset table."""

    def __init__(self, cfg: WanDiTConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.modulation = param(
            (jax.random.normal(rngs.params(), (6, cfg.dim), F32) / math.sqrt(cfg.dim)).astype(pd),
            (None, "embed"))
        self.self_attn = SelfAttention(cfg, rngs=rngs, param_dtype=pd)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, param_dtype=pd)
        self.cross_attn = CrossAttention(cfg, rngs=rngs, param_dtype=pd)
        self.ffn = FFN(cfg, rngs=rngs, param_dtype=pd)

    def _mods(self, e0):
        m = self.modulation[...].astype(F32)[None, None] + e0  # [B, F, 6, D]
        return [m[:, :, i] for i in range(6)]

    def _attend_and_ffn(self, x, e0, ckv, F_, self_attn_fn, backend):
        # named scopes only label the ops (profiles, HLO op_name metadata); they change no computation
        cdt = self.cfg.compute_dtype
        sh_sa, sc_sa, g_sa, sh_ff, sc_ff, g_ff = self._mods(e0)
        eps = self.cfg.eps
        # x may be stored in bf16 (cfg.residual_dtype): norms, modulation, gates and adds read it as fp32
        with jax.named_scope("norm_modulate_sa"):
            h = _modulate(layer_norm(x.astype(F32), eps), sh_sa, sc_sa, F_).astype(cdt)
        with jax.named_scope("self_attn"):
            y, aux = self_attn_fn(h)
        with jax.named_scope("gate_sa"):
            x = _add(x, _gate(y, g_sa, F_))
        with jax.named_scope("cross_attn"):
            x = _add(x, _tag(self.cross_attn(self.norm3(x.astype(F32)).astype(cdt), ckv, backend), "cross_out"))
        with jax.named_scope("norm_modulate_ffn"):
            h = _modulate(layer_norm(x.astype(F32), eps), sh_ff, sc_ff, F_).astype(cdt)
        with jax.named_scope("ffn"):
            y = self.ffn(h)
        with jax.named_scope("gate_ffn"):
            x = _add(x, _gate(y, g_ff, F_))
        return x, aux

    def __call__(self, x, e0, ckv: CrossKV, cos, sin, spec: attn_lib.BlockCausalSpec, backend: str):
        """Full-sequence forward. x [B, L, D] (``cfg.residual_dtype``), e0 [B, F, 6, D] fp32."""
        F_ = e0.shape[1]

        def sa(h):
            q, k, v = _tag(self.self_attn.qkv(h, cos, sin), "qkv")
            o = _tag(attn_lib.block_causal_attention(q, k, v, spec, backend=backend), "attn")
            return _tag(self.self_attn.out(o), "attn_proj"), None

        return self._attend_and_ffn(x, e0, ckv, F_, sa, backend)[0]

    def cached(self, x, e0, ckv: CrossKV, cos, sin, cache_k, cache_v, layer, write_slots, kv_len, backend):
        """One block of frames against layer ``layer`` of the stacked caches
        [num_layers, B, S, H, Dh]. Only this block's frames are written (in place in the caller's
        loop carry). Returns (x, cache_k, cache_v)."""
        F_ = e0.shape[1]

        def sa(h):
            q, k, v = _tag(self.self_attn.qkv(h, cos, sin), "qkv")
            ck, cv = cache_k, cache_v
            T = k.shape[1] // F_
            for j in range(F_):  # static: frames of this block
                at = (layer, 0, write_slots[j] * T, 0, 0)
                ck = jax.lax.dynamic_update_slice(ck, k[None, :, j * T:(j + 1) * T].astype(ck.dtype), at)
                cv = jax.lax.dynamic_update_slice(cv, v[None, :, j * T:(j + 1) * T].astype(cv.dtype), at)
            lk = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False).astype(q.dtype)
            lv = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False).astype(q.dtype)
            o = _tag(attn_lib.attention(q, lk, lv, backend=backend, kv_len=kv_len), "attn")
            return _tag(self.self_attn.out(o), "attn_proj"), (ck, cv)

        x, (ck, cv) = self._attend_and_ffn(x, e0, ckv, F_, sa, backend)
        return x, ck, cv


class Head(nnx.Module):
    def __init__(self, cfg: WanDiTConfig, *, rngs, param_dtype):
        self.modulation = param(
            (jax.random.normal(rngs.params(), (2, cfg.dim), F32) / math.sqrt(cfg.dim)).astype(param_dtype),
            (None, "embed"))
        out = math.prod(cfg.patch) * cfg.out_dim
        self.head = Linear(cfg.dim, out, rngs=rngs, axes=("embed", None), param_dtype=param_dtype, zero_init=True)
        self.eps = cfg.eps

    def __call__(self, x, e, num_frames):
        """x [B, L, D] fp32, e [B, F, D] fp32 -> [B, L, prod(patch)*out_dim] fp32."""
        m = self.modulation[...].astype(F32)[None, None] + e[:, :, None]  # [B, F, 2, D]
        h = _modulate(layer_norm(x.astype(F32), self.eps), m[:, :, 0], m[:, :, 1], num_frames)
        w = self.head.kernel[...].astype(F32)
        return h @ w + self.head.bias[...].astype(F32)


class BlockInputs(NamedTuple):
    """Per-block inputs of the cached layers (:meth:`WanDiT.block_inputs`)."""
    tok: jax.Array        # [B, L, D] patch embeddings (+ pose tokens)
    grid: tuple           # (frames, h, w) of the block's token grid
    e: jax.Array          # time embedding (head modulation)
    e0: jax.Array         # per-layer modulation input
    cos: jax.Array        # RoPE tables at the block's absolute frames
    sin: jax.Array
    slots: jax.Array      # [nf] cache frame slots of the block
    kv_len: jax.Array     # [B] valid key tokens (the prefix up to and including the block)


class KVCache(NamedTuple):
    """Static-shape self-attention cache: k, v [num_layers, B, capacity_frames*T, H, Dh].

    Frames live in frame slots: the first ``sink`` frames are pinned; later frames go to a ring of
    ``capacity - sink`` slots (slot = sink + (f - sink) mod ring). Because keys are stored already
    rotated with their absolute RoPE positions, slot order is irrelevant to attention, and the
    valid keys are always the slot prefix [0, min(frames_written, capacity)). Nothing but the
    buffers is carried: write slots and the valid length are pure functions of the start frame.
    """
    k: jax.Array
    v: jax.Array


class WanDiT(nnx.Module):
    def __init__(self, cfg: WanDiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        D = cfg.dim
        pin = math.prod(cfg.patch) * cfg.in_dim
        self.patch_embedding = Linear(pin, D, rngs=rngs, axes=(None, "embed"), param_dtype=pd)
        self.text_embedding = MLP2(cfg.text_dim, D, D, gelu_tanh, rngs=rngs, param_dtype=pd)
        self.time_embedding = MLP2(cfg.freq_dim, D, D, jax.nn.silu, rngs=rngs, param_dtype=pd)
        self.time_projection = Linear(D, 6 * D, rngs=rngs, axes=("embed", None), param_dtype=pd)
        self.img_emb = ImageEmbedding(cfg, rngs=rngs, param_dtype=pd) if cfg.i2v else None

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return Block(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.head = Head(cfg, rngs=rngs, param_dtype=pd)

    # -- embeddings --------------------------------------------------------------------------
    def time_embed(self, t: jax.Array):
        """t [B, F] -> e [B, F, D], e0 [B, F, 6, D] (float32)."""
        sin = sinusoidal_embedding(t, self.cfg.freq_dim)
        fc1, fc2 = self.time_embedding.fc1, self.time_embedding.fc2
        e = jax.nn.silu(sin @ fc1.kernel[...].astype(F32) + fc1.bias[...].astype(F32))
        e = e @ fc2.kernel[...].astype(F32) + fc2.bias[...].astype(F32)
        tp = self.time_projection
        e0 = jax.nn.silu(e) @ tp.kernel[...].astype(F32) + tp.bias[...].astype(F32)
        return e, e0.reshape(e0.shape[:-1] + (6, self.cfg.dim))

    def embed_tokens(self, x, y=None, pose=None):
        """x [B, F, H, W, C] (+ y, + pose tokens [B, F, h, w, D]) -> tokens [B, L, D] (residual dtype), grid."""
        cfg = self.cfg
        if y is not None:
            x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
        if x.shape[-1] != cfg.in_dim:
            raise ValueError(f"DiT input has {x.shape[-1]} channels, the model expects in_dim={cfg.in_dim}"
                             + (" (16 noise + 20 y for I2V: pass y)" if cfg.i2v else ""))
        B, F_, H, W, _ = x.shape
        grid = (F_ // cfg.patch[0], H // cfg.patch[1], W // cfg.patch[2])
        tok = self.patch_embedding(patchify(x.astype(cfg.compute_dtype), cfg.patch)).astype(F32)
        if pose is not None:
            if pose.shape[:4] != (B,) + grid or pose.shape[-1] != cfg.dim:
                raise ValueError(f"pose tokens have shape {pose.shape}, expected {(B,) + grid + (cfg.dim,)}")
            tok = tok + pose.reshape(B, -1, cfg.dim).astype(F32)
        return tok.astype(cfg.residual), grid

    def context_kv(self, context: jax.Array, clip_fea: jax.Array | None = None) -> CrossKV:
        """Text [B, 512, text_dim] (+ CLIP [B, N, 1280]) -> stacked per-layer CrossKV
        ([num_layers, B, Lc, H, Dh] leaves). Computed once per prompt and reused."""
        cfg = self.cfg
        if context.shape[1] != cfg.text_len:
            raise ValueError(f"text context has {context.shape[1]} rows; pad it with zeros to "
                             f"text_len={cfg.text_len} (the DiT attends to all rows)")
        cdt = cfg.compute_dtype
        text = self.text_embedding(context.astype(cdt))
        img = None
        if cfg.i2v:
            if clip_fea is None:
                raise ValueError("I2V model: clip_fea [B, 257, 1280] is required")
            img = self.img_emb(clip_fea).astype(cdt)
        gdef, state = nnx.split(self.blocks)

        def body(_, layer_state):
            blk = nnx.merge(gdef, layer_state)
            return None, blk.cross_attn.kv(text, img)

        _, ckv = jax.lax.scan(body, None, state)
        return ckv

    # -- full-sequence forward ---------------------------------------------------------------
    def __call__(self, x, t, context=None, *, clip_fea=None, y=None, pose=None, ckv: CrossKV | None = None,
                 causal: bool = False, start_frame=0):
        """Flow prediction for the whole latent sequence; ``causal`` selects the block-causal mask."""
        cfg = self.cfg
        backend = cfg.backend()
        if ckv is None:
            ckv = self.context_kv(context, clip_fea)
        tok, grid = self.embed_tokens(x, y, pose)
        F_ = grid[0]
        t = jnp.broadcast_to(jnp.asarray(t, F32).reshape(x.shape[0], -1), (x.shape[0], F_))
        e, e0 = self.time_embed(t)
        cos, sin = rope_tables(cfg.head_dim, grid, start_frame)
        spec = self.attention_spec(grid, causal)
        gdef, state = nnx.split(self.blocks)

        def body(h, xs):
            layer_state, layer_ckv = xs
            blk = nnx.merge(gdef, layer_state)
            return blk(h, e0, layer_ckv, cos, sin, spec, backend), None

        tok, _ = scan_layers(body, tok, (state, ckv), cfg)
        out = self.head(tok, e, F_)
        return unpatchify(out, grid, cfg.patch, cfg.out_dim)

    def attention_spec(self, grid, causal: bool) -> attn_lib.BlockCausalSpec:
        cfg = self.cfg
        T = grid[1] * grid[2]
        if not causal:
            return attn_lib.BlockCausalSpec(T, 1, bidirectional=True)
        window = None if cfg.local_attn_size == -1 else cfg.local_attn_size
        return attn_lib.BlockCausalSpec(T, cfg.num_frame_per_block, window_frames=window,
                                        sink_frames=cfg.sink_size if window else 0)

    # -- KV-cached causal step ---------------------------------------------------------------
    def cache_capacity(self) -> int:
        cfg = self.cfg
        return cfg.max_frames if cfg.local_attn_size == -1 else cfg.local_attn_size

    def init_cache(self, batch: int, tokens_per_frame: int, dtype=None) -> KVCache:
        cfg = self.cfg
        shape = (cfg.num_layers, batch, self.cache_capacity() * tokens_per_frame, cfg.num_heads, cfg.head_dim)
        dt = dtype or cfg.compute_dtype
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))

    def frame_slots(self, start_frame, num_frames: int):
        """Cache slots for frames start_frame..+num_frames and the valid-prefix length in frames."""
        cfg = self.cfg
        cap = self.cache_capacity()
        sink = cfg.sink_size if cfg.local_attn_size != -1 else 0
        ring = cap - sink
        if ring < num_frames:
            raise ValueError(f"local_attn_size={cap} with sink_size={sink} leaves {ring} ring frames, "
                             f"fewer than a block of {num_frames}")
        f = jnp.asarray(start_frame, jnp.int32) + jnp.arange(num_frames, dtype=jnp.int32)
        slots = jnp.where(f < sink, f, sink + (f - sink) % ring)
        frames_valid = jnp.minimum(jnp.asarray(start_frame, jnp.int32) + num_frames, cap)
        return slots, frames_valid

    def block_inputs(self, x, t, start_frame, *, y=None, pose=None) -> "BlockInputs":
        """What every layer of a cached block pass needs (:meth:`forward_cached`, and the read-only
        form ``wanjax.distill.dmd.exit_forward``): tokens, RoPE at the absolute frames, time
        modulation, the block's cache slots and the valid key length."""
        tok, grid = self.embed_tokens(x, y, pose)
        nf = grid[0]
        T = grid[1] * grid[2]
        t = jnp.broadcast_to(jnp.asarray(t, F32).reshape(x.shape[0], -1), (x.shape[0], nf))
        e, e0 = self.time_embed(t)
        cos, sin = rope_tables(self.cfg.head_dim, grid, start_frame)
        slots, frames_valid = self.frame_slots(start_frame, nf)
        kv_len = jnp.full((x.shape[0],), frames_valid * T, jnp.int32)
        return BlockInputs(tok, grid, e, e0, cos, sin, slots, kv_len)

    def forward_cached(self, x, t, ckv: CrossKV, cache: KVCache, start_frame, *, y=None, pose=None):
        """One block: x [B, nf, H, W, C], t [B, nf]; frames start at absolute ``start_frame`` (traced
        ok). Writes this block's K/V into ``cache`` (a re-call at the same start_frame overwrites
        them, which is how denoising steps and the context pass share a slot) and returns
        (flow [B, nf, H, W, out], new cache)."""
        cfg = self.cfg
        backend = cfg.backend()
        tok, grid, e, e0, cos, sin, slots, kv_len = self.block_inputs(x, t, start_frame, y=y, pose=pose)
        nf = grid[0]
        T = grid[1] * grid[2]
        if cache.k.shape[2] != self.cache_capacity() * T:
            raise ValueError(f"cache holds {cache.k.shape[2]} tokens, expected "
                             f"{self.cache_capacity()} frames x {T} tokens")
        gdef, state = nnx.split(self.blocks)

        def body(carry, xs):
            h, ks, vs = carry
            layer_state, layer_ckv, layer = xs
            blk = nnx.merge(gdef, layer_state)
            h, ks, vs = blk.cached(h, e0, layer_ckv, cos, sin, ks, vs, layer, slots, kv_len, backend)
            return (h, ks, vs), None

        body = remat(body, cfg)
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        # the caches are loop carries updated in place: one copy lives, only new frames are written
        (tok, ks, vs), _ = jax.lax.scan(body, (tok, cache.k, cache.v), (state, ckv, layers))
        out = self.head(tok, e, nf)
        return unpatchify(out, grid, cfg.patch, cfg.out_dim), KVCache(ks, vs)


def build(cfg: WanDiTConfig | dict, rngs: nnx.Rngs | None = None) -> WanDiT:
    if isinstance(cfg, dict):
        cfg = WanDiTConfig.from_dict(cfg)
    return WanDiT(cfg, rngs=rngs or nnx.Rngs(0))


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
