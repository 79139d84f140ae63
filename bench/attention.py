"""Attention backends on the current device: parity of each fast path with the XLA reference, and
timings at the Self-Forcing shapes (one 3-frame block of 4680 queries against a KV cache).

    python -m bench.attention [--heads 12] [--check-only]
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from bench.common import median_time
from wanjax import attention as A


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args(argv)
    backend = A.default_backend()
    rows = []
    key = jax.random.key(0)
    # parity: small shapes, bf16 inputs; reference in float32 from the same bf16 values
    T, F, H, D = 96, 9, 4, 128
    q, k, v = (jax.random.normal(kk, (1, F * T, H, D), jnp.float32).astype(jnp.bfloat16)
               for kk in jax.random.split(key, 3))
    for name, spec in (("bidirectional", A.BlockCausalSpec(T, 1, bidirectional=True)),
                       ("block-causal", A.BlockCausalSpec(T, 3)),
                       ("window+sink", A.BlockCausalSpec(T, 3, window_frames=5, sink_frames=1))):
        ref = A.block_causal_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), spec,
                                       backend="xla")
        out = jax.jit(lambda a, b, c: A.block_causal_attention(a, b, c, spec, backend=backend))(q, k, v)
        err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        rows.append((f"parity {name}", backend, f"rel err {err:.2e}", "ok" if err < 1e-2 else "FAIL"))
    kv_len = jnp.array([5 * T], jnp.int32)
    ref = A.xla_attention(q[:, :3 * T].astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), kv_len=kv_len)
    out = jax.jit(lambda a, b, c, n: A.attention(a, b, c, backend=backend, kv_len=n))(q[:, :3 * T], k, v, kv_len)
    err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    rows.append(("parity kv prefix", backend, f"rel err {err:.2e}", "ok" if err < 1e-2 else "FAIL"))

    if not args.check_only:
        Lq, Lf = 4680, 1560
        for kv_frames in (9, 21):
            Lk = kv_frames * Lf
            qq = jax.random.normal(key, (1, Lq, args.heads, D), jnp.bfloat16)
            kk = jax.random.normal(key, (1, 21 * Lf, args.heads, D), jnp.bfloat16)
            n = jnp.array([Lk], jnp.int32)
            f = jax.jit(lambda a, b, c, n: A.attention(a, b, c, backend=backend, kv_len=n))
            t = median_time(f, qq, kk, kk, n)
            tflops = 4 * Lq * Lk * D * args.heads / t / 1e12
            rows.append((f"cache step kv={Lk}", backend, f"{t * 1e3:.2f} ms", f"{tflops:.0f} TFLOP/s"))
    print("\n== bench.attention ==")
    for r in rows:
        print(f"{r[0]:<24} {r[1]:<7} {r[2]:<18} {r[3]}")
    return 0 if all(r[3] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
