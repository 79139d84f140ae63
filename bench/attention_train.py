"""Block-causal self-attention of the ODE training step, forward + backward, one layer at the real
shape (21 latent frames x 1,560 tokens, 3-frame blocks, 12 heads x 128): the ways of running it on
cuDNN, each checked against the per-block form and timed. The library's form since session 12 is
``split``. The alternatives live here only: ``per_block``, the library's form in session 11 (1.7-2.6
ms slower per layer alone, 25-45 ms per ODE step); ``stacked``, which made the whole ODE step slower
(its K/V broadcast is rebuilt in the rematerialised backward, docs/PERFORMANCE.md, session 6); and
``sliced``, the form before session 11, which copies every block's key prefix (26 ms slower per ODE
step than ``per_block``).

    PYTHONPATH=. python -m bench.attention_train [--heads 12] [--frames 21] [--repeats 20] [--fp32_ref]

Variants (all compute the same function):
  split       the library (wanjax.attention.block_causal_attention): one causal call over the whole
              sequence plus one batched causal call over the blocks' time-reversed upper triangles,
              merged by their log-sum-exps (block_causal_split); ``split64`` pads both to 64 tokens
  per_block   one call per 3-frame block against the whole once-padded K/V, its key prefix given as
              key_value_seq_lengths
  sliced      one call per block against a sliced, 64-padded copy of its key prefix
  stacked     one call: the 7 query blocks as a batch of 7 against K/V broadcast to it,
              key_value_seq_lengths per batch entry
Rate references (different functions, same tensors): ``dense`` (no mask, 49/28 of the work) and
``causal`` (token-causal mask, cuDNN's own masking). Two cross-attention rows (the same queries
against 512 text keys): the library's form, a batch of query chunks, checked against one call.
``--mgpu`` adds jax's own Mosaic-GPU flash kernel (``jax.experimental.pallas.ops.gpu.attention_mgpu``,
FA3-style, dense only: it has no causal backward) as a further rate reference, to judge a custom
block-causal kernel built the same way. Its backward is float16-only, so those rows run float16
inputs at L rounded up to a multiple of 128, and are checked against cuDNN dense on the same inputs.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from bench.common import median_time, print_table
from wanjax import attention as A


def _cudnn_padded(qp, kp, vp, q_len, kv_len):
    """cuDNN flash attention on already 64-padded arrays with valid lengths ``q_len``, ``kv_len`` ([B])."""
    return jax.nn.dot_product_attention(qp, kp, vp, implementation="cudnn", query_seq_lengths=q_len,
                                        key_value_seq_lengths=kv_len)


def block_causal_sliced(q, k, v, spec):
    """One call per query block against a sliced, 64-padded copy of its key prefix."""
    return A._per_block(q, k, v, spec, q.shape[1] // spec.tokens_per_frame, A._cudnn)


def block_causal_per_block(q, k, v, spec):
    """One call per block against the whole once-padded K/V, its prefix as key_value_seq_lengths."""
    return A._per_block(q, k, v, spec, q.shape[1] // spec.tokens_per_frame, A._cudnn,
                        pad_multiple=A.CUDNN_SEQ_MULTIPLE)


def block_causal_stacked(q, k, v, spec):
    """One call: the query blocks as a batch against K/V broadcast to it, a prefix length per entry."""
    B, L, H, D = q.shape
    Tb = spec.tokens_per_frame * spec.frames_per_block
    nb = L // Tb
    kp, vp = A._pad_seq(k, A.CUDNN_SEQ_MULTIPLE), A._pad_seq(v, A.CUDNN_SEQ_MULTIPLE)
    qs = A._pad_seq(q.reshape(B * nb, Tb, H, D), A.CUDNN_SEQ_MULTIPLE)
    ks, vs = (jnp.broadcast_to(a[:, None], (B, nb) + a.shape[1:]).reshape((B * nb,) + a.shape[1:]) for a in (kp, vp))
    kv_len = jnp.tile((jnp.arange(nb, dtype=jnp.int32) + 1) * Tb, B)
    out = _cudnn_padded(qs, ks, vs, jnp.full((B * nb,), Tb, jnp.int32), kv_len)[:, :Tb]
    return out.reshape(B, L, H, D)


# (block_q, block_kv) forward; (block_q_dkv, block_kv_dkv, block_q_dq, block_kv_dq, compute warpgroups) backward
MGPU_CONFIGS = {"mgpu dense (ref rate) a": (64, 128, (64, 64, 64, 64, 2)),
                "mgpu dense (ref rate) b": (64, 128, (128, 64, 64, 128, 2))}


def mgpu_variant(block_q, block_kv, bwd, scale):
    """jax's Mosaic-GPU attention (no mask) with the softmax scale folded into q (it applies none)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    cfg = attention_mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=2,
                                      block_q_dkv=bwd[0], block_kv_dkv=bwd[1], block_q_dq=bwd[2],
                                      block_kv_dq=bwd[3], compute_wgs_bwd=bwd[4])
    return lambda q, k, v: attention_mgpu.attention((q * scale).astype(q.dtype), k, v, cfg)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--tokens", type=int, default=1560)
    ap.add_argument("--fpb", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mgpu", action="store_true", help="add jax's Mosaic-GPU kernel as a rate reference")
    ap.add_argument("--fp32_ref", action="store_true",
                    help="also check the block-causal forms against the float32 XLA reference (dense mask: "
                         "use a short clip, e.g. --frames 6)")
    args = ap.parse_args(argv)
    T, F, H, D, fpb = args.tokens, args.frames, args.heads, 128, args.fpb
    L = F * T
    nb = F // fpb
    spec = A.BlockCausalSpec(T, fpb)
    useful = 4 * D * H * sum((b + 1) * (fpb * T) ** 2 for b in range(nb))  # forward FLOPs

    variants = {
        "split": lambda q, k, v: A.block_causal_attention(q, k, v, spec, backend="cudnn"),
        "split64": lambda q, k, v: A.block_causal_split(q, k, v, nb, backend="cudnn", multiple=64),
        "per_block": lambda q, k, v: block_causal_per_block(q, k, v, spec),
        "sliced": lambda q, k, v: block_causal_sliced(q, k, v, spec),
        "stacked": lambda q, k, v: block_causal_stacked(q, k, v, spec),
        "dense (ref rate)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
        "causal (ref rate)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn",
                                                                          is_causal=True),
    }
    # cross-attention against the 512 text tokens: the library runs it as a batch of query chunks
    # (wanjax.attention.query_chunks), the reference row as one call
    Lc = 512
    variants["cross (library, query chunks)"] = lambda q, k, v: A.attention(q, k, v, backend="cudnn")
    variants["cross, one call"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    kv_tokens = {"cross (library, query chunks)": Lc, "cross, one call": Lc}
    work = {"dense (ref rate)": 4 * D * H * L * L, "causal (ref rate)": 4 * D * H * L * L / 2,
            "cross (library, query chunks)": 4 * D * H * L * Lc, "cross, one call": 4 * D * H * L * Lc}
    # the form each variant is checked against (same function: the library's; the Mosaic-GPU rows: cuDNN dense)
    checked_against = {name: "per_block" for name in ("split", "split64", "per_block", "sliced", "stacked")}
    checked_against["cross (library, query chunks)"] = "cross, one call"
    Lm = -(-L // 128) * 128
    if args.mgpu:
        for name, (bq, bkv, bwd) in MGPU_CONFIGS.items():
            variants[name] = mgpu_variant(bq, bkv, bwd, D ** -0.5)
            work[name] = 4 * D * H * Lm * Lm
            checked_against[name] = "dense (ref rate)"
    key = jax.random.key(0)
    rows = [("variant", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "bwd TFLOP/s (2.5x fwd)", "rel err out", "rel err grads")]
    for name, fn in variants.items():
        kq, kk, kv, kg, key = jax.random.split(key, 5)
        # fresh random inputs per variant; the check recomputes its reference form on the same inputs
        mg = name in MGPU_CONFIGS
        shape, dt = ((1, Lm, H, D), jnp.float16) if mg else ((1, L, H, D), jnp.bfloat16)
        q = jax.random.normal(kq, shape, jnp.float32).astype(dt)
        kv_shape = (shape[0], kv_tokens.get(name, shape[1])) + shape[2:]
        k, v = (jax.random.normal(x, kv_shape, jnp.float32).astype(dt) for x in (kk, kv))
        g = jax.random.normal(kg, shape, jnp.float32).astype(dt)
        fwd = jax.jit(fn)
        fb = jax.jit(lambda q, k, v, g, fn=fn: jax.vjp(fn, q, k, v)[1](g))
        tf = median_time(fwd, q, k, v, n=args.repeats)
        tb = median_time(fb, q, k, v, g, n=args.repeats)
        flops = work.get(name, useful)
        err_o = err_g = "-"
        if name in checked_against:
            base = variants[checked_against[name]]
            o_ref = jax.jit(base)(q, k, v).astype(jnp.float32)
            g_ref = jax.jit(lambda q, k, v, g: jax.vjp(base, q, k, v)[1](g))(q, k, v, g)
            o = fwd(q, k, v).astype(jnp.float32)
            gs = fb(q, k, v, g)
            rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b.astype(jnp.float32))
                                     / jnp.linalg.norm(b.astype(jnp.float32)))
            err_o = f"{rel(o, o_ref):.1e}"
            err_g = " ".join(f"{rel(a, b):.1e}" for a, b in zip(gs, g_ref))
            if args.fp32_ref and checked_against[name] == "per_block":
                exact = lambda q, k, v: A.block_causal_attention(q, k, v, spec, backend="xla")  # noqa: E731
                f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
                o32, g32 = jax.jit(lambda q, k, v, g: (exact(q, k, v), jax.vjp(exact, q, k, v)[1](g)))(*f32)
                err_o += f" (fp32: {rel(o, o32):.1e})"
                err_g += " (fp32: " + " ".join(f"{rel(a, b):.1e}" for a, b in zip(gs, g32)) + ")"
            finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (o, *gs))
            if not finite:
                err_o += " NaN!"
        rows.append((name, f"{tf * 1e3:.2f}", f"{flops / tf / 1e12:.0f}", f"{tb * 1e3:.2f}",
                     f"{2.5 * flops / max(tb - tf, 1e-9) / 1e12:.0f}", err_o, err_g))
    print_table("attention_train", rows)
    print(f"device: {jax.devices()[0].device_kind}; L={L} ({F} frames x {T}), {nb} blocks of {fpb} frames, "
          f"{H} heads x {D}; useful forward {useful / 1e12:.2f} TFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
