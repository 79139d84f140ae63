"""One attention interface, three backends.

All functions take ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` and return ``[B, Lq, H, D]`` in
``q.dtype``. The softmax is always computed in float32.

Backends:
- ``"xla"``: the reference (plain einsums, explicit boolean masks). Runs everywhere; used by the
  CPU tests as the ground truth for the other two.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16). Masks are
  never handed to cuDNN as dense tensors (that turns into a slow bias): key-validity is a
  ``key_value_seq_lengths`` prefix, and block-causal attention is one unmasked call per block
  against its prefix (static shapes, unrolled). A prefix that starts at the first key is given as
  ``key_value_seq_lengths`` over the whole once-padded K/V, so no block copies its keys.
- ``"splash"``: Pallas splash attention (TPU) with the block-causal mask evaluated in-kernel.
  Tested in Pallas interpret mode on CPU only; **not yet run on TPU hardware**.

Masks are described structurally (frame-block ids, windows, sinks), never as dense arrays, so
every backend can pick its own representation.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Backend = Literal["xla", "cudnn", "splash"]
BACKENDS = ("xla", "cudnn", "splash")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def default_backend() -> str:
    """``cudnn`` on GPU, ``splash`` on TPU, ``xla`` elsewhere (the platform of the work's device:
    ``wanjax.sharding.current_platform``)."""
    from wanjax.sharding import current_platform

    plat = current_platform()
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(plat, "xla")


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def xla_attention(q, k, v, *, mask=None, kv_len=None, scale: float | None = None):
    """Reference attention. ``mask`` is boolean, broadcastable to [B, H, Lq, Lk] (True = attend);
    ``kv_len`` ([B] int) masks keys at positions >= kv_len."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_len is not None:
        valid = jnp.arange(k.shape[1])[None, :] < jnp.asarray(kv_len).reshape(-1, 1)  # [B, Lk]
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


CUDNN_SEQ_MULTIPLE = 64  # cuDNN's fused attention backward takes only sequence lengths of this multiple


def _pad_seq(a, multiple: int):
    pad = -a.shape[1] % multiple
    return a if pad == 0 else jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))


def co_shard(*arrays):
    """Pin ``[B, L, H, D]`` arrays to one sharding: batch over the mesh's (data, fsdp) axes, heads over
    tensor (``wanjax.sharding.LOGICAL_RULES``). cuDNN's custom partitioner rejects q, k and v with
    different shardings (e.g. cross-attention K/V computed from a replicated text context while the
    queries are batch-sharded). Uses the mesh of the enclosing ``jax.set_mesh`` context, which
    ``wanjax.training.Trainer`` and the pipelines set; without one (or on one device) a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return arrays
    from jax.sharding import PartitionSpec

    from wanjax.sharding import logical_to_spec

    def one(a):
        spec = logical_to_spec(("batch", None, "act_heads", None), a.shape, mesh)
        return jax.lax.with_sharding_constraint(a, PartitionSpec(*spec))

    return tuple(one(a) for a in arrays)


def _cudnn(q, k, v, kv_len=None, scale=None):
    """cuDNN flash attention. Its backward pass accepts only sequence lengths that are multiples of
    64 (the forward takes any): q and k/v are zero-padded to that multiple and the padding is
    masked with ``query_seq_lengths`` / ``key_value_seq_lengths``. Nothing changes for aligned
    lengths; at 480x832, 32,760 and 4,680 query tokens gain 8 rows and the 257 CLIP tokens 63."""
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    kv = jnp.full((B,), Lk, jnp.int32) if kv_len is None else jnp.broadcast_to(
        jnp.asarray(kv_len, jnp.int32).reshape(-1), (B,))
    kwargs = {}
    if kv_len is not None or Lk % CUDNN_SEQ_MULTIPLE:
        kwargs["key_value_seq_lengths"] = kv
    if Lq % CUDNN_SEQ_MULTIPLE:
        kwargs["query_seq_lengths"] = jnp.full((B,), Lq, jnp.int32)
    qp, kp, vp = co_shard(*(_pad_seq(a, CUDNN_SEQ_MULTIPLE) for a in (q, k, v)))
    out = jax.nn.dot_product_attention(qp, kp, vp, scale=scale, implementation="cudnn", **kwargs)
    return out[:, :Lq]


def attention(q, k, v, *, backend: str = "xla", kv_len=None, scale: float | None = None):
    """Unmasked attention, optionally over a key prefix of length ``kv_len`` ([B] or scalar)."""
    check_backend(backend)
    if backend == "cudnn":
        return _cudnn(q, k, v, kv_len, scale)
    if backend == "splash" and kv_len is None:
        return splash_attention(q, k, v, BlockCausalSpec(k.shape[1], 1, bidirectional=True), scale=scale)
    return xla_attention(q, k, v, kv_len=kv_len, scale=scale)


# ----------------------------------------------------------------------------------------------
# Block-causal attention over a whole sequence (training / teacher forcing / reference)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockCausalSpec:
    """Frame-block attention structure over a sequence of ``num_frames`` frames.

    A query in block b (frames [b*fpb, (b+1)*fpb)) sees key frame j iff j < end(b) and either
    ``window_frames`` is None, or ``j >= end(b) - (window_frames - sink_frames)``, or ``j < sink_frames``.
    ``bidirectional=True`` ignores blocks (full attention).
    """
    tokens_per_frame: int
    frames_per_block: int
    window_frames: int | None = None
    sink_frames: int = 0
    bidirectional: bool = False

    def frame_mask(self, num_frames: int) -> np.ndarray:
        """[F, F] boolean (query frame, key frame)."""
        f = np.arange(num_frames)
        if self.bidirectional:
            return np.ones((num_frames, num_frames), bool)
        end = (f // self.frames_per_block + 1) * self.frames_per_block  # [F]
        m = f[None, :] < end[:, None]
        if self.window_frames is not None:
            recent = f[None, :] >= end[:, None] - (self.window_frames - self.sink_frames)
            m = m & (recent | (f[None, :] < self.sink_frames))
        return m

    def token_mask(self, num_frames: int) -> np.ndarray:
        fm = self.frame_mask(num_frames)
        return np.repeat(np.repeat(fm, self.tokens_per_frame, 0), self.tokens_per_frame, 1)


def block_causal_attention(q, k, v, spec: BlockCausalSpec, *, backend: str = "xla",
                           scale: float | None = None):
    """Attention of a full sequence (L = F * tokens_per_frame) under a :class:`BlockCausalSpec`."""
    check_backend(backend)
    L = q.shape[1]
    if L % spec.tokens_per_frame:
        raise ValueError(f"sequence length {L} is not a multiple of tokens_per_frame {spec.tokens_per_frame}")
    F = L // spec.tokens_per_frame
    if not spec.bidirectional and F % spec.frames_per_block:
        raise ValueError(f"{F} latent frames are not a multiple of num_frame_per_block {spec.frames_per_block}")
    if backend == "splash":
        return splash_attention(q, k, v, spec, scale=scale)
    if backend == "cudnn":
        if spec.bidirectional:
            return _cudnn(q, k, v, None, scale)
        return _per_block(q, k, v, spec, F, functools.partial(_cudnn, scale=scale),
                          pad_multiple=CUDNN_SEQ_MULTIPLE)
    mask = jnp.asarray(spec.token_mask(F))[None, None]
    return xla_attention(q, k, v, mask=mask, scale=scale)


def _per_block(q, k, v, spec: BlockCausalSpec, F: int, attn_fn, *, pad_multiple: int | None = None):
    """One unmasked call per query block against its (static) visible key range.

    Without ``pad_multiple`` each block attends a sliced copy of its key range (``attn_fn(q, k, v)``).
    With it, K/V are zero-padded once to that multiple and a block whose range is a prefix
    ``[0, end)`` (every block of an unwindowed spec) attends the whole padded K/V with
    ``attn_fn(q, k, v, kv_len=end)``: cuDNN skips the key tiles past ``kv_len`` and gives them zero
    gradient, so nothing copies a block's keys, forward or backward (docs/PERFORMANCE.md, session 11:
    -22 to -26 ms per ODE step against the sliced copies). Ranges that start later are still sliced."""
    T, fpb = spec.tokens_per_frame, spec.frames_per_block
    kp, vp = (k, v) if pad_multiple is None else (_pad_seq(k, pad_multiple), _pad_seq(v, pad_multiple))
    outs = []
    for b in range(F // fpb):
        end = (b + 1) * fpb
        if spec.window_frames is None:
            frames = list(range(end))
        else:
            lo = max(0, end - (spec.window_frames - spec.sink_frames))
            frames = sorted(set(range(min(spec.sink_frames, end))) | set(range(lo, end)))
        qb = q[:, b * fpb * T:end * T]
        if pad_multiple is not None and frames == list(range(end)):
            outs.append(attn_fn(qb, kp, vp, kv_len=end * T))
            continue
        if frames == list(range(frames[0], frames[-1] + 1)):
            kb = k[:, frames[0] * T:(frames[-1] + 1) * T]
            vb = v[:, frames[0] * T:(frames[-1] + 1) * T]
        else:
            idx = np.concatenate([np.arange(f * T, (f + 1) * T) for f in frames])
            kb, vb = k[:, idx], v[:, idx]
        outs.append(attn_fn(qb, kb, vb))
    return jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------------------------
# Splash (TPU)
# ----------------------------------------------------------------------------------------------
def splash_attention(q, k, v, spec: BlockCausalSpec, *, scale: float | None = None,
                     interpret: bool | None = None, block: int = 128):
    """Pallas splash attention with the block-causal mask computed in-kernel.

    The sequence is padded to a multiple of ``block`` tokens; padded keys are excluded with
    segment ids. ``interpret`` defaults to True off-TPU (CPU tests). Untested on TPU hardware.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    B, L, H, D = q.shape
    Lk = k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    Lp = -(-max(L, Lk) // block) * block
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Lp - x.shape[1]), (0, 0), (0, 0)))
    qp, kp, vp = pad(q * scale), pad(k), pad(v)
    if spec.bidirectional or L != Lk:
        fm = np.ones((Lp, Lp), bool)
    else:
        F = L // spec.tokens_per_frame
        fm = np.zeros((Lp, Lp), bool)
        fm[:L, :L] = spec.token_mask(F)
    fm[np.arange(Lp), np.arange(Lp)] = True  # padded rows are never empty
    mask = sm.MultiHeadMask([sm.NumpyMask(fm) for _ in range(H)])
    bs = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=bs, interpret=interpret)
    seg_q = jnp.concatenate([jnp.zeros(L, jnp.int32), jnp.ones(Lp - L, jnp.int32)])
    seg_k = jnp.concatenate([jnp.zeros(Lk, jnp.int32), jnp.ones(Lp - Lk, jnp.int32)])
    seg = sk.SegmentIds(q=seg_q, kv=seg_k)
    # kernel works on [H, L, D] per batch element
    out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=seg))(
        qp.transpose(0, 2, 1, 3), kp.transpose(0, 2, 1, 3), vp.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3)[:, :L].astype(q.dtype)
