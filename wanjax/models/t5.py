"""UMT5 encoder (the Wan2.1 text encoder), Flax NNX.

Architecture (spec: wan_components.md section 3):
    x = token_embedding[ids]                                   # [B, L, dim], no scaling, no abs. positions
    for each of num_layers blocks (stacked, run with lax.scan):
        x = x + attn(norm1(x))                                 # q.k NOT scaled by 1/sqrt(d);
                                                               # + the block's own relative position bias;
                                                               # padded keys masked; softmax in float32
        x = x + fc2(fc1(h) * gelu_tanh(gate(h))),  h = norm2(x)
    x = norm(x)                                                # T5 RMSNorm (fp32 statistic), eps 1e-6

Parameter tree (``/``-joined paths used by ``converters/t5.py``)::

    token_embedding/embedding   [vocab, dim]                 ("vocab", "embed")
    blocks/norm1/weight         [layers, dim]                ("layers", "norm")
    blocks/attn/{q,k,v}/kernel  [layers, dim, heads*hd]      ("layers", "embed", "heads")
    blocks/attn/o/kernel        [layers, heads*hd, dim]      ("layers", "heads", "embed")
    blocks/pos_embedding        [layers, buckets, heads]     ("layers", None, None)
    blocks/norm2/weight         [layers, dim]
    blocks/ffn/{gate,fc1}/kernel [layers, dim, ffn]          ("layers", "embed", "mlp")
    blocks/ffn/fc2/kernel       [layers, ffn, dim]           ("layers", "mlp", "embed")
    norm/weight                 [dim]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401  (disables Flax eager sharding)
from wanjax.nn import Linear, RMSNorm, gelu_tanh, param


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a UMT5 encoder (``dim_attn = num_heads * head_dim``)."""
    vocab_size: int = 256384
    dim: int = 4096
    num_heads: int = 64
    head_dim: int = 64
    ffn_dim: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def dim_attn(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        """Build from a dict (e.g. a checkpoint's config.json); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"T5 config is missing field(s) {sorted(missing)}; got keys {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in names})


T5_PRESETS: dict[str, T5Config] = {
    # Test size (wan_components.md section 9); vocab 128 covers small test tokenizers.
    "tiny": T5Config(vocab_size=128, dim=32, num_heads=4, head_dim=8, ffn_dim=64, num_layers=2),
    "umt5_xxl": T5Config(),
}


def get_t5_config(name: str) -> T5Config:
    """Preset by name: ``tiny`` or ``umt5_xxl``."""
    if name not in T5_PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; choose one of {sorted(T5_PRESETS)}")
    return T5_PRESETS[name]


def relative_position_bucket(q_len: int, k_len: int, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """Bidirectional T5 bucket of ``rel = key_pos - query_pos`` -> int32 [q_len, k_len].

    ``half = num_buckets // 2``, ``exact = half // 2``:
    ``bucket = half*[rel>0] + (|rel| < exact ? |rel| :
    min(half-1, exact + floor(ln(|rel|/exact) / ln(max_distance/exact) * (half-exact))))``.
    Computed in float64 at trace time (shapes are static); the ``+1e-9`` makes the exact integer
    boundaries (|rel| = 16, 32, 64 for the default config) land where PyTorch's float32 code puts
    them (checked against ``UMT5Attention._relative_position_bucket`` for all 512x512 positions).
    """
    half = num_buckets // 2
    exact = half // 2
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    out = np.where(rel > 0, half, 0)
    a = np.abs(rel)
    with np.errstate(divide="ignore"):
        large = exact + np.floor(np.log(np.maximum(a, 1) / exact) / math.log(max_distance / exact)
                                 * (half - exact) + 1e-9).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(a < exact, a, large)).astype(np.int32)


class Embedding(nnx.Module):
    """Token embedding table [vocab, dim]; lookup returns the compute dtype."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.embedding = param(jax.random.normal(rngs.params(), (vocab, dim), jnp.float32).astype(param_dtype),
                               ("vocab", "embed"))

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias and a key-padding mask."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, use_bias=False, param_dtype=param_dtype)
        self.q = Linear(cfg.dim, cfg.dim_attn, axes=("embed", "heads"), **kw)
        self.k = Linear(cfg.dim, cfg.dim_attn, axes=("embed", "heads"), **kw)
        self.v = Linear(cfg.dim, cfg.dim_attn, axes=("embed", "heads"), **kw)
        self.o = Linear(cfg.dim_attn, cfg.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, L, dim], bias [H, L, L] float32, mask [B, L] bool (True = real key) -> [B, L, dim]."""
        b, n = x.shape[:2]
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits + bias[None]
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.num_heads * self.head_dim)
        return self.o(out)


class T5FeedForward(nnx.Module):
    """Gated tanh-GELU FFN: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, use_bias=False, param_dtype=param_dtype)
        self.gate = Linear(cfg.dim, cfg.ffn_dim, axes=("embed", "mlp"), **kw)
        self.fc1 = Linear(cfg.dim, cfg.ffn_dim, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.ffn_dim, cfg.dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate(x)))


class T5Block(nnx.Module):
    """Pre-norm encoder block with its own relative position bias table [buckets, heads]."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm1 = RMSNorm(cfg.dim, eps=cfg.eps, param_dtype=param_dtype)
        self.attn = T5Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.pos_embedding = param(
            jax.random.normal(rngs.params(), (cfg.num_buckets, cfg.num_heads), jnp.float32).astype(param_dtype),
            (None, None))
        self.norm2 = RMSNorm(cfg.dim, eps=cfg.eps, param_dtype=param_dtype)
        self.ffn = T5FeedForward(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, buckets: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, L, dim], buckets int32 [L, L], mask [B, L] bool -> [B, L, dim]."""
        bias = jnp.take(self.pos_embedding[...].astype(jnp.float32), buckets, axis=0)  # [L, L, H]
        x = x + self.attn(self.norm1(x), jnp.transpose(bias, (2, 0, 1)), mask)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nnx.Module):
    """UMT5 encoder: ``__call__(ids [B, L] int, mask [B, L]) -> [B, L, dim]`` in ``dtype``.

    ``dtype`` is the compute dtype (bfloat16 on GPU, float32 in tests); ``param_dtype`` the storage
    dtype. Norm statistics and the softmax run in float32. Layers are stacked on a leading
    ``layers`` axis and run with ``jax.lax.scan`` (``remat=True`` rematerializes each block).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False):
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        self.token_embedding = Embedding(cfg.vocab_size, cfg.dim, rngs=rngs, param_dtype=param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r: nnx.Rngs) -> T5Block:
            return T5Block(cfg, rngs=r, param_dtype=param_dtype)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(cfg.dim, eps=cfg.eps, param_dtype=param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        ids = jnp.asarray(ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"T5Encoder expects integer token ids [B, L], got {ids.dtype} {ids.shape}")
        mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"T5Encoder: mask shape {mask.shape} does not match ids shape {ids.shape}")
        mask = mask.astype(bool)
        length = ids.shape[1]
        buckets = jnp.asarray(relative_position_bucket(length, length, self.cfg.num_buckets,
                                                       self.cfg.max_distance))
        x = self.token_embedding(ids, self.dtype)

        graphdef, state = nnx.split(self.blocks)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, buckets, mask), None

        if self.remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, state)
        return self.norm(x)
