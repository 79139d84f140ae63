"""Small NNX building blocks shared by every wanjax model.

Conventions (see docs/DESIGN.md):
- Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds *logical* axis names
  (``"embed"``, ``"mlp"``, ``"heads"``, ``"vocab"``, ``"conv_in"``, ``"conv_out"``, ``None``...).
  ``wanjax.sharding`` maps logical names to mesh axes in one place.
- Linear kernels are stored ``[in, out]``; conv kernels ``[*spatial, in, out]`` (channels last).
- ``param_dtype`` is the storage dtype; ``dtype`` the compute dtype. Norm statistics are always
  computed in float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """An ``nnx.Param`` annotated with logical axis names (one per array dim)."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(axes))


def uniform_fan_in(key, shape, dtype, fan_in: int):
    """PyTorch's default Linear/Conv init, U(+-1/sqrt(fan_in)); used for weights and biases."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class Linear(nnx.Module):
    """y = x @ W + b with W stored [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 axes: Axes = (None, None), use_bias: bool = True,
                 param_dtype=jnp.float32, zero_init: bool = False):
        self.in_features, self.out_features = in_features, out_features
        shape = (in_features, out_features)
        if zero_init:
            w = jnp.zeros(shape, param_dtype)
        else:
            w = uniform_fan_in(rngs.params(), shape, param_dtype, in_features)
        self.kernel = param(w, axes)
        if use_bias:
            b = jnp.zeros((out_features,), param_dtype) if zero_init else uniform_fan_in(
                rngs.params(), (out_features,), param_dtype, in_features)
            self.bias = param(b, (axes[1],))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y


def layer_norm(x: jax.Array, eps: float, weight=None, bias=None) -> jax.Array:
    """LayerNorm with float32 statistics; output in the input dtype."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True,
                 param_dtype=jnp.float32, axes: Axes = ("norm",)):
        self.eps = eps
        if affine:
            self.weight = param(jnp.ones((dim,), param_dtype), axes)
            self.bias = param(jnp.zeros((dim,), param_dtype), axes)
        else:
            self.weight = self.bias = None

    def __call__(self, x):
        w = None if self.weight is None else self.weight[...]
        b = None if self.bias is None else self.bias[...]
        return layer_norm(x, self.eps, w, b)


class RMSNorm(nnx.Module):
    """w * x / sqrt(mean(x^2) + eps); statistic in float32, cast back before the weight (Wan)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
                 axes: Axes = ("norm",)):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), param_dtype), axes)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


def conv_nd(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *,
            strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """Channels-last N-d convolution with explicit padding (never "SAME")."""
    nd = kernel.ndim - 2
    spatial = "DHW"[-nd:] if nd <= 3 else None
    dn = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), tuple(strides), tuple(padding),
                                     dimension_numbers=dn)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def conv3d_time_folded(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *,
                       strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """The 3-D convolution of :func:`conv_nd` computed as one 2-D convolution per output frame.

    x ``[B, T, H, W, Ci]``, kernel ``[kt, kh, kw, Ci, Co]``. The input is padded in time, the ``kt``
    strided temporal taps are stacked on channels (index ``j * Ci + c``) and the frames go to the
    batch axis, so the kernel becomes ``[kh, kw, kt * Ci, Co]``. Same function as ``conv_nd`` (up to
    float summation order); XLA:CPU runs it several times faster than its 3-D convolution (a
    96x96 pose stack: 0.33 -> 0.06 s on 2 cores), at the cost of a ``kt``-fold input copy.
    """
    kt, kh, kw, ci, co = kernel.shape
    st, sh, sw = strides
    (p0, p1), ph, pw = padding
    xp = jnp.pad(x, ((0, 0), (p0, p1), (0, 0), (0, 0), (0, 0))) if p0 or p1 else x
    t = (xp.shape[1] - kt) // st + 1
    if t < 1:
        raise ValueError(f"conv3d_time_folded: {x.shape[1]} frames (+{p0 + p1} padding) are fewer than the "
                         f"temporal kernel {kt}")
    taps = [xp[:, j:j + st * (t - 1) + 1:st] for j in range(kt)]
    xs = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)
    b = xs.shape[0]
    k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * ci, co)
    y = conv_nd(xs.reshape((b * t,) + xs.shape[2:]), k2, bias, strides=(sh, sw), padding=(ph, pw))
    return y.reshape((b, t) + y.shape[1:])


class Conv(nnx.Module):
    """Channels-last convolution, kernel [*k, in, out], PyTorch-style explicit padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: Sequence[int], *, rngs: nnx.Rngs,
                 strides: Sequence[int] | None = None, padding: Sequence[int] | None = None,
                 use_bias: bool = True, param_dtype=jnp.float32,
                 axes: Axes | None = None, zero_init: bool = False):
        ks = tuple(kernel_size)
        self.strides = tuple(strides) if strides is not None else (1,) * len(ks)
        pads = tuple(padding) if padding is not None else (0,) * len(ks)
        self.padding = tuple((p, p) for p in pads)
        fan_in = in_ch * math.prod(ks)
        shape = ks + (in_ch, out_ch)
        axes = axes if axes is not None else (None,) * len(ks) + ("conv_in", "conv_out")
        w = jnp.zeros(shape, param_dtype) if zero_init else uniform_fan_in(
            rngs.params(), shape, param_dtype, fan_in)
        self.kernel = param(w, axes)
        if use_bias:
            b = jnp.zeros((out_ch,), param_dtype) if zero_init else uniform_fan_in(
                rngs.params(), (out_ch,), param_dtype, fan_in)
            self.bias = param(b, (axes[-1],))
        else:
            self.bias = None

    def __call__(self, x):
        return conv_nd(x, self.kernel[...], None if self.bias is None else self.bias[...],
                       strides=self.strides, padding=self.padding)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


FFN_OUT_NAME = "ffn_out"  # checkpoint name of gelu_tanh_linear's output (a remat policy may keep it)
_GELU_C, _GELU_K = math.sqrt(2.0 / math.pi), 0.044715


def _gelu_tanh_value_and_grad(u):
    """float32 ``u`` -> (gelu_tanh(u), gelu_tanh'(u)), both from one tanh."""
    t = jnp.tanh(_GELU_C * (u + _GELU_K * u * u * u))
    grad = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_K * u * u)
    return 0.5 * u * (1.0 + t), grad


def _gelu_tanh_linear(h, b, w):
    return jnp.einsum("...f,fo->...o", gelu_tanh(h + b), w)


@jax.custom_vjp
def gelu_tanh_linear(h: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
    """``gelu_tanh(h + b) @ w`` ([..., F], [F], [F, O] -> [..., O]): an FFN's bias, activation and
    second projection (without its bias), ``h`` being the first projection's matmul output.

    Same forward as the plain expression. The backward is written out so that the activation and
    its gradient come from one elementwise pass over ``h`` and the incoming ``dA`` (read h and dA,
    write A for the weight gradient and dh): autodiff's version makes XLA materialise the tanh in a
    pass of its own and fuse the rest with the bias gradient's column sum, two passes at ~2.4 TB/s
    instead of one at ~3 TB/s (H100, one 1.3B block at 32,760 tokens: 1.98 -> 1.50 ms of FFN
    elementwise work, docs/PERFORMANCE.md, session 14). The output is tagged ``FFN_OUT_NAME`` so
    that a remat policy that keeps matmul outputs can keep it (the policy cannot see into a
    ``custom_vjp``)."""
    return _gelu_tanh_linear(h, b, w)


def _gelu_tanh_linear_fwd(h, b, w):
    return checkpoint_name(_gelu_tanh_linear(h, b, w), FFN_OUT_NAME), (h, b, w)


def _gelu_tanh_linear_bwd(res, dy):
    h, b, w = res
    da = jnp.einsum("...o,fo->...f", dy, w)
    a, grad = _gelu_tanh_value_and_grad((h + b).astype(jnp.float32))
    dh = (da.astype(jnp.float32) * grad).astype(h.dtype)
    # The bias gradient sums dh as passed on. The barrier keeps XLA from fusing this column sum into
    # the pass above (with it, XLA splits that pass in two around the tanh).
    db = jnp.sum(jax.lax.optimization_barrier(dh).astype(jnp.float32), axis=tuple(range(h.ndim - 1)))
    dw = jnp.einsum("...f,...o->fo", a.astype(h.dtype), dy, preferred_element_type=jnp.float32)
    return dh, db.astype(b.dtype), dw.astype(w.dtype)


gelu_tanh_linear.defvjp(_gelu_tanh_linear_fwd, _gelu_tanh_linear_bwd)


MATMUL_OUT_NAME = "matmul_out"  # checkpoint name of matmul_one_cotangent's output


@jax.custom_vjp
def matmul_one_cotangent(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` ([..., I], [I, O] -> [..., O]) whose backward materialises the incoming cotangent once
    for both of its GEMMs (dx and dw). When that cotangent is a concatenation (the fused q/k/v
    projection's dq, dk, dv), XLA otherwise builds it twice, once per GEMM. Output tagged
    ``MATMUL_OUT_NAME`` (a remat policy cannot see into a ``custom_vjp``)."""
    return jnp.einsum("...i,io->...o", x, w)


def _matmul_one_cotangent_fwd(x, w):
    return checkpoint_name(jnp.einsum("...i,io->...o", x, w), MATMUL_OUT_NAME), (x, w)


def _matmul_one_cotangent_bwd(res, dy):
    x, w = res
    dy = jax.lax.optimization_barrier(dy)
    dx = jnp.einsum("...o,io->...i", dy, w)
    dw = jnp.einsum("...i,...o->io", x, dy, preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


matmul_one_cotangent.defvjp(_matmul_one_cotangent_fwd, _matmul_one_cotangent_bwd)
