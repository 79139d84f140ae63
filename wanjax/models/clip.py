"""CLIP ViT-H/14 image encoder as used by Wan2.1 I2V and UniAnimate-DiT (visual tower only).

Spec: /work/shared/docs/wan_components.md section 5 and unianimate_dit.md section 5.

Wan calls ``visual(x, use_31_block=True)``: patch embedding (conv without bias), a class token,
a learned position embedding, ``pre_norm``, then all transformer blocks **except the last**,
with no post-norm and no projection head. This module stores and runs exactly those blocks, so
``CLIPVisionEncoder(cfg)(pixels)`` returns Wan's ``clip_fea`` (HF ``hidden_states[-2]``).

Parameter tree (NNX attribute paths, as used by ``converters/clip.py``)::

    patch_embedding/kernel   [p, p, 3, D]          (no bias)
    cls_embedding            [D]
    pos_embedding            [T, D]                 T = (image/patch)^2 + 1 = 257
    pre_norm/{weight,bias}   [D]
    blocks/norm1/{weight,bias}            [L', D]   L' = num_layers - 1 (stacked)
    blocks/attn/{q,k,v}/{kernel,bias}     [L', D, D] / [L', D]
    blocks/attn/o/{kernel,bias}           [L', D, D] / [L', D]
    blocks/norm2/{weight,bias}            [L', D]
    blocks/mlp/fc1/{kernel,bias}          [L', D, M] / [L', M]
    blocks/mlp/fc2/{kernel,bias}          [L', M, D] / [L', D]

q, k and v are kept as separate kernels (the fused ``to_qkv`` of the checkpoint is split by the
converter) so that tensor parallelism over ``heads`` shards each of them the same way.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import wanjax  # noqa: F401  (disables Flax eager sharding)
from wanjax import nn


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Shapes of the CLIP vision tower. ``num_layers`` counts *all* blocks of the checkpoint."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"CLIPVisionConfig: width {self.width} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.num_layers < 2:
            raise ValueError(f"CLIPVisionConfig: num_layers must be >= 2 (Wan runs all but the "
                             f"last block), got {self.num_layers}")

    @property
    def num_layers_used(self) -> int:
        """Blocks that Wan runs (``use_31_block``): all but the last."""
        return self.num_layers - 1

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Class token plus patches (257 for 224/14)."""
        return self.grid * self.grid + 1

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":
        """Test size; still 224/14 so that the output has the real 257 tokens."""
        return cls(image_size=224, patch_size=14, width=32, num_layers=3, num_heads=4, mlp_dim=128)

    @classmethod
    def vit_h_14(cls) -> "CLIPVisionConfig":
        """open-clip xlm-roberta-large-ViT-H-14 visual tower (Wan2.1 I2V / UniAnimate)."""
        return cls()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
        """Build from a ``config.json`` dict; keys that are not config fields (provenance) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {"tiny": CLIPVisionConfig.tiny, "vit_h_14": CLIPVisionConfig.vit_h_14}


def preset(name: str) -> CLIPVisionConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


class Attention(nnx.Module):
    """Multi-head self-attention, scale 1/sqrt(head_dim), float32 softmax, no mask."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.num_heads = num_heads
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.q = nn.Linear(width, width, axes=("embed", "heads"), **kw)
        self.k = nn.Linear(width, width, axes=("embed", "heads"), **kw)
        self.v = nn.Linear(width, width, axes=("embed", "heads"), **kw)
        self.o = nn.Linear(width, width, axes=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        hd = d // self.num_heads
        q, k, v = (f(x).reshape(b, t, self.num_heads, hd) for f in (self.q, self.k, self.v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (1.0 / math.sqrt(hd)), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return self.o(out)


class MLP(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.fc1 = nn.Linear(width, mlp_dim, axes=("embed", "mlp"), rngs=rngs, param_dtype=param_dtype)
        self.fc2 = nn.Linear(mlp_dim, width, axes=("mlp", "embed"), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nn.gelu_exact(self.fc1(x)))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps, param_dtype=param_dtype)
        self.attn = Attention(cfg.width, cfg.num_heads, rngs=rngs, param_dtype=param_dtype)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionEncoder(nnx.Module):
    """Wan's CLIP image feature: ``pixels [B, S, S, 3]`` (CLIP-normalised) -> ``[B, 257, D]``.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. LayerNorm statistics and
    the attention softmax run in float32 regardless.
    """

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype
        d, p = cfg.width, cfg.patch_size
        self.patch_embedding = nn.Conv(3, d, (p, p), strides=(p, p), padding=(0, 0), use_bias=False,
                                       rngs=rngs, param_dtype=param_dtype)
        scale = d ** -0.5
        self.cls_embedding = nn.param(
            (scale * jax.random.normal(rngs.params(), (d,), jnp.float32)).astype(param_dtype), ("embed",))
        self.pos_embedding = nn.param(
            (scale * jax.random.normal(rngs.params(), (cfg.num_tokens, d), jnp.float32)).astype(param_dtype),
            (None, "embed"))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.eps, param_dtype=param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers_used)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r: nnx.Rngs) -> Block:
            return Block(cfg, rngs=r, param_dtype=param_dtype)

        self.blocks = make_blocks(rngs)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, 3] -> tokens [B, 257, D] after ``pre_norm`` (HF ``hidden_states[0]``)."""
        x = self.patch_embedding(pixels.astype(self.dtype))           # [B, g, g, D]
        b, g, _, d = x.shape
        x = x.reshape(b, g * g, d)                                     # row-major patches
        cls = jnp.broadcast_to(self.cls_embedding[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(x.dtype)
        return self.pre_norm(x)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, 3] already CLIP-normalised (see ``wanjax.image.clip_preprocess``)
        -> [B, (S/p)^2 + 1, D]: output of the first ``num_layers - 1`` blocks, no post-norm."""
        s = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s, s, 3):
            raise ValueError(f"CLIPVisionEncoder expects channels-last pixels [B, {s}, {s}, 3], got "
                             f"{tuple(pixels.shape)}; resize with wanjax.image.clip_preprocess first")
        x = self.embed(pixels)
        graphdef, state = nnx.split(self.blocks)

        def step(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h), None

        x, _ = jax.lax.scan(step, x, state)
        return x


def build_clip(config: Mapping[str, Any] | CLIPVisionConfig, rngs: nnx.Rngs, *,
               dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPVisionEncoder:
    cfg = config if isinstance(config, CLIPVisionConfig) else CLIPVisionConfig.from_dict(config)
    return CLIPVisionEncoder(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def load_clip_encoder(ckpt_dir, mesh=None, *, dtype=jnp.float32) -> CLIPVisionEncoder:
    """Load a checkpoint written by ``python -m converters.clip`` (sharded over ``mesh``).

    ``dtype`` is both the parameter dtype after restore and the compute dtype.
    """
    from wanjax import checkpoint

    cfg = checkpoint.read_config(ckpt_dir)
    if cfg.get("model") != "clip":
        raise checkpoint.CheckpointError(
            f"{ckpt_dir}/config.json says model={cfg.get('model')!r}, expected 'clip'; convert the "
            f"CLIP weights with python -m converters.clip --src <.pth|dir> --out {ckpt_dir}")
    return checkpoint.load_model(
        ckpt_dir, lambda c, r: build_clip(c, r, dtype=dtype, param_dtype=dtype), mesh, dtype=dtype)
