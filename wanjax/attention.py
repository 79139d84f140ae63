"""One attention interface, three backends.

All functions take ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` and return ``[B, Lq, H, D]`` in
``q.dtype``. The softmax is always computed in float32.

Backends:
- ``"xla"``: the reference (plain einsums, explicit boolean masks). Runs everywhere; used by the
  CPU tests as the ground truth for the other two.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16/fp16). Masks are
  never handed to cuDNN as dense tensors (that turns into a slow bias): key-validity is a
  ``key_value_seq_lengths`` prefix. Unwindowed block-causal attention is two causal calls (the
  whole sequence, and every block's upper triangle reversed in time) merged by their log-sum-exps
  (:func:`block_causal_split`); windowed specs run one unmasked call per block against its key
  range (static shapes, unrolled), a prefix that starts at the first key given as
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
def xla_attention(q, k, v, *, mask=None, kv_len=None, scale: float | None = None, return_lse: bool = False):
    """Reference attention. ``mask`` is boolean, broadcastable to [B, H, Lq, Lk] (True = attend);
    ``kv_len`` ([B] int) masks keys at positions >= kv_len. ``return_lse`` also returns the
    log-sum-exp of the scaled, masked scores, [B, H, Lq] float32 (a flash kernel's statistics)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_len is not None:
        valid = jnp.arange(k.shape[1])[None, :] < jnp.asarray(kv_len).reshape(-1, 1)  # [B, Lk]
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)
    return (o, jax.nn.logsumexp(logits, axis=-1)) if return_lse else o


CUDNN_SEQ_MULTIPLE = 64  # K/V lengths are padded to this multiple (and masked) for cuDNN


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


def query_chunks(Lq: int, Lk: int, *, min_chunk: int = 2048, max_chunks: int = 16) -> int:
    """How many equal query chunks cuDNN should see for ``Lq`` queries against ``Lk`` keys: 1 unless
    the keys are few (``Lq >= 8 * Lk``, cross-attention). cuDNN's flash backward spreads its dK/dV
    work over key tiles, so 512 text keys x 12 heads fill only 48 of an H100's 132 SMs; as a batch
    of query chunks (K/V broadcast, their gradients summed in float32) the same work fills the card:
    cross-attention's backward at 32,760 x 512 goes from 1.56 to 0.84 ms (docs/PERFORMANCE.md,
    session 12). The largest divisor of ``Lq`` up to ``max_chunks`` that keeps ``min_chunk`` queries."""
    if Lq < 8 * Lk:
        return 1
    return max(n for n in range(1, max_chunks + 1) if Lq % n == 0 and Lq // n >= min(min_chunk, Lq))


def _cudnn(q, k, v, kv_len=None, scale=None):
    """cuDNN flash attention. K/V are zero-padded to a multiple of 64 keys and the padding is masked
    with ``key_value_seq_lengths``; queries are not padded (cuDNN 9 takes any query length, forward
    and backward). Short key sets run as a batch of query chunks (:func:`query_chunks`)."""
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    kv = jnp.full((B,), Lk, jnp.int32) if kv_len is None else jnp.broadcast_to(
        jnp.asarray(kv_len, jnp.int32).reshape(-1), (B,))
    masked = kv_len is not None or Lk % CUDNN_SEQ_MULTIPLE != 0
    kp, vp = _pad_seq(k, CUDNN_SEQ_MULTIPLE), _pad_seq(v, CUDNN_SEQ_MULTIPLE)
    n = query_chunks(Lq, Lk)
    if n > 1:
        # K/V broadcast through float32, so that the chunks' dK/dV are summed in float32
        kp, vp = (jnp.broadcast_to(a.astype(jnp.float32)[:, None], (B, n) + a.shape[1:])
                  .reshape((B * n,) + a.shape[1:]).astype(a.dtype) for a in (kp, vp))
        q, kv = q.reshape((B * n, Lq // n) + q.shape[2:]), jnp.repeat(kv, n)
    kwargs = {"key_value_seq_lengths": kv} if masked else {}
    q, kp, vp = co_shard(q, kp, vp)
    out = jax.nn.dot_product_attention(q, kp, vp, scale=scale, implementation="cudnn", **kwargs)
    return out.reshape((B, Lq) + out.shape[2:])


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
        if spec.window_frames is None and spec.tokens_per_frame * spec.frames_per_block >= 2:
            return block_causal_split(q, k, v, F // spec.frames_per_block, backend="cudnn", scale=scale)
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
# Block-causal attention as token-causal attention plus the blocks' upper triangles
# ----------------------------------------------------------------------------------------------
# An unwindowed block-causal mask is the token-causal mask plus, inside every block, the strict upper
# triangle (a query also sees the later tokens of its own block). Both parts are causal masks that a
# flash kernel evaluates by skipping tiles (one call over the whole sequence; one batched call over
# the blocks, each reversed in time so that "later in my block" becomes "earlier"). The two partial
# softmaxes are merged exactly with their log-sum-exps. The backward runs each part's flash backward
# with the *merged* output and log-sum-exp: with the global statistics a partial backward yields that
# part's exact share of dq and the exact dk/dv of its keys (FlashAttention-2, section 3.1.1), and the
# shares add up. docs/PERFORMANCE.md (session 12) has the measurements.
#
# A kernel pair is ``fwd(q, k, v, scale) -> (o, lse)`` and ``bwd(q, k, v, o, lse, do, scale) ->
# (dq, dk, dv)`` with q/k/v/o ``[B, L, H, D]``, lse ``[B, H, L]`` float32 (natural log of the scaled
# scores' exp-sum) and a top-left causal mask (query i sees keys j <= i).


def _xla_causal_fwd(q, k, v, scale):
    """Reference causal kernel: (output, log-sum-exp)."""
    L = q.shape[1]
    return xla_attention(q, k, v, mask=jnp.tril(jnp.ones((L, L), bool)), scale=scale, return_lse=True)


def _xla_causal_bwd(q, k, v, o, lse, do, scale):
    """Reference flash backward of a causal kernel from given (o, lse), as cuDNN's backward uses them."""
    L = q.shape[1]
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    s = jnp.einsum("bqhd,bkhd->bhqk", f32(q), f32(k)) * scale
    p = jnp.where(jnp.tril(jnp.ones((L, L), bool)), jnp.exp(s - lse[..., None]), 0.0)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p, f32(do))
    dp = jnp.einsum("bqhd,bkhd->bhqk", f32(do), f32(v))
    delta = jnp.einsum("bqhd,bqhd->bhq", f32(do), f32(o))
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, f32(k))
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, f32(q))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _cudnn_causal_fwd(q, k, v, scale):
    """cuDNN causal flash forward with its softmax statistics (``return_residual``), ``[B, H, L]``."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    q, k, v = co_shard(q, k, v)
    o, lse = fa.dot_product_attention(q, k, v, scale=scale, mask_type=fa.MaskType.CAUSAL,
                                      return_residual=True)
    B, L, H = q.shape[:3]
    if lse.shape == (B, L, H):  # jax documents either [B, T, N] or [B, N, T]
        lse = jnp.swapaxes(lse, 1, 2)
    return o, lse.reshape(B, H, L)


def _cudnn_causal_bwd(q, k, v, o, lse, do, scale):
    """cuDNN causal flash backward from a given output and log-sum-exp. jax binds its backward only
    from its own forward's residuals, so this binds jax's (private) backward primitive directly; the
    keyword set follows the installed jax (``score_mod`` is a keyword in jax 0.12, not in
    0.11.0). Checked on the GPU by ``python -m bench.attention_train`` (against the per-block form and,
    with ``--fp32_ref``, a float32 reference)."""
    import inspect

    from jax._src.cudnn import fused_attention_stablehlo as fa

    q, k, v, o, do = co_shard(q, k, v, o, do)
    none = jnp.zeros(0, q.dtype)
    kw = dict(scale=scale, seed=0, dropout_rate=0.0, variadic_args=(False, False),
              mask_type=fa.MaskType.CAUSAL, layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
    if "score_mod" in inspect.signature(fa._dot_product_attention_bwd_impl).parameters:
        kw["score_mod"] = None
    dq, dk, dv = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, none, none, none, none, none, none, none, lse, o, do, **kw)[:3]
    return dq, dk, dv


CAUSAL_KERNELS = {"xla": (_xla_causal_fwd, _xla_causal_bwd), "cudnn": (_cudnn_causal_fwd, _cudnn_causal_bwd)}


def _to_upper(a, nb: int):
    """[B, L, ...] -> [B * nb, Tb, ...]: each block reversed in time."""
    B, L = a.shape[:2]
    return a.reshape((B * nb, L // nb) + a.shape[2:])[:, ::-1]


def _from_upper(a, B: int):
    """Inverse of :func:`_to_upper`."""
    a = a[:, ::-1]
    return a.reshape((B, a.shape[0] // B * a.shape[1]) + a.shape[2:])


def _split_parts(q, k, v, nb: int, multiple: int):
    """The two causal problems, padded at the end to ``multiple`` (padded keys are seen by padded
    queries only, and padded rows get zero cotangents, so plain causal masks stay exact).

    Lower part: the sequence itself. Upper part: per block, reversed in time, the queries without the
    block's last token and the keys without its first, so that reversed query m sees reversed keys
    m' <= m, i.e. original keys strictly later in its block."""
    lo = tuple(_pad_seq(a, multiple) for a in (q, k, v))
    qu = _to_upper(q, nb)[:, 1:]
    ku, vu = (_to_upper(a, nb)[:, :-1] for a in (k, v))
    up = tuple(_pad_seq(a, multiple) for a in (qu, ku, vu))
    return lo, up


def _upper_rows_to_seq(a, B: int, Tb: int, fill, *, keys: bool = False):
    """Upper-part rows ``[B * nb, Tu_padded, ...]`` -> ``[B, L, ...]`` in original token order. Query
    rows lack every block's last token (it has no later keys), key rows its first (no earlier query
    sees it there); the missing token gets ``fill``."""
    a = a[:, :Tb - 1]
    a = jnp.pad(a, ((0, 0), (0, 1) if keys else (1, 0)) + ((0, 0),) * (a.ndim - 2), constant_values=fill)
    return _from_upper(a, B)


def _seq_to_upper_rows(a, nb: int, multiple: int):
    """``[B, L, ...]`` -> the upper part's padded query rows (inverse of :func:`_upper_rows_to_seq`)."""
    return _pad_seq(_to_upper(a, nb)[:, 1:], multiple)


def _lse_seq(lse):
    return jnp.swapaxes(lse, 1, 2)  # [B, H, L] <-> [B, L, H]


def _split_forward(q, k, v, nb, kernels, scale, multiple):
    fwd, _ = kernels
    B, L = q.shape[:2]
    Tb = L // nb
    (ql, kl, vl), (qu, ku, vu) = _split_parts(q, k, v, nb, multiple)
    o_lo, lse_lo = fwd(ql, kl, vl, scale)
    o_up, lse_up = fwd(qu, ku, vu, scale)
    o_lo, lse_lo = o_lo[:, :L].astype(jnp.float32), _lse_seq(lse_lo)[:, :L]
    o_up = _upper_rows_to_seq(o_up.astype(jnp.float32), B, Tb, 0.0)
    lse_up = _upper_rows_to_seq(_lse_seq(lse_up), B, Tb, -jnp.inf)
    lse = jnp.logaddexp(lse_lo, lse_up)  # [B, L, H]
    w_lo, w_up = jnp.exp(lse_lo - lse)[..., None], jnp.exp(lse_up - lse)[..., None]
    o = (o_lo * w_lo + o_up * w_up).astype(q.dtype)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _split_attention(q, k, v, nb, kernels, scale, multiple):
    return _split_forward(q, k, v, nb, kernels, scale, multiple)[0]


SPLIT_RESIDUAL_NAME = "attn_split"  # checkpoint name of the merged output and log-sum-exp


def _split_attention_fwd(q, k, v, nb, kernels, scale, multiple):
    from jax.ad_checkpoint import checkpoint_name

    # Tagged so that a remat policy can keep them (wanjax.models.dit.remat_policy): the kernels run
    # inside jax's own custom_vjp, which a policy cannot see into.
    o, lse = checkpoint_name(_split_forward(q, k, v, nb, kernels, scale, multiple), SPLIT_RESIDUAL_NAME)
    return o, (q, k, v, o, lse)


def _split_attention_bwd(nb, kernels, scale, multiple, res, do):
    _, bwd = kernels
    q, k, v, o, lse = res
    B, L = q.shape[:2]
    Tb = L // nb
    (ql, kl, vl), (qu, ku, vu) = _split_parts(q, k, v, nb, multiple)
    # the lower part's padded rows: any finite statistics (their cotangent is zero)
    lse_lo = _lse_seq(_pad_seq(lse[..., None], multiple)[..., 0])
    dq_lo, dk_lo, dv_lo = bwd(ql, kl, vl, _pad_seq(o, multiple), lse_lo, _pad_seq(do, multiple), scale)
    lse_up = _lse_seq(_seq_to_upper_rows(lse[..., None], nb, multiple)[..., 0])
    dq_up, dk_up, dv_up = bwd(qu, ku, vu, _seq_to_upper_rows(o, nb, multiple), lse_up,
                              _seq_to_upper_rows(do, nb, multiple), scale)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    dq = f32(dq_lo[:, :L]) + _upper_rows_to_seq(f32(dq_up), B, Tb, 0.0)
    dk = f32(dk_lo[:, :L]) + _upper_rows_to_seq(f32(dk_up), B, Tb, 0.0, keys=True)
    dv = f32(dv_lo[:, :L]) + _upper_rows_to_seq(f32(dv_up), B, Tb, 0.0, keys=True)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_split_attention.defvjp(_split_attention_fwd, _split_attention_bwd)


def block_causal_split(q, k, v, num_blocks: int, *, backend: str = "xla", scale: float | None = None,
                       multiple: int = 1):
    """Unwindowed block-causal self-attention (``num_blocks`` equal blocks over ``q.shape[1]``
    tokens) as token-causal attention plus the blocks' strict upper triangles (see above). ``backend``
    picks the kernel pair (``xla`` reference or ``cudnn``)."""
    L = q.shape[1]
    if L % num_blocks or k.shape[1] != L or L // num_blocks < 2:
        raise ValueError(f"block_causal_split: {L} queries / {k.shape[1]} keys do not split into "
                         f"{num_blocks} equal blocks of self-attention of at least 2 tokens")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _split_attention(q, k, v, num_blocks, CAUSAL_KERNELS[backend], float(scale), multiple)


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
