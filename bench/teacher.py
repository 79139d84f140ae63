"""Teacher DiT speed: one bidirectional forward of the I2V-14B shapes over a 480x832x81 clip.

    python -m bench.teacher [--preset i2v_14b] [--frames 21] [--height 480 --width 832] [--layers N]

Random bf16 weights, cuDNN attention, CLIP tokens and y included. Prints forward time, the FLOP
arithmetic, achieved TFLOP/s, MFU against the measured 790 TFLOP/s bf16 matmul peak (and the
989 TFLOP/s datasheet dense peak), the per-clip estimate for 50 steps x 2 CFG passes, and peak memory.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from bench.common import peak_bytes, print_table
from wanjax.models import dit as dit_lib


def forward_flops(cfg: dit_lib.WanDiTConfig, tokens: int, ctx_tokens: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add), attention included."""
    D, Fh, L = cfg.dim, cfg.ffn_dim, cfg.num_layers
    per_layer = (2 * tokens * (4 * D * D)            # self-attn q k v o
                 + 2 * tokens * (2 * D * D)          # cross-attn q, o
                 + 2 * ctx_tokens * (2 * D * D)      # cross-attn k, v (k_img, v_img for CLIP rows)
                 + 2 * tokens * (2 * D * Fh)         # ffn
                 + 4 * tokens * tokens * D           # self-attention QK^T and PV
                 + 4 * tokens * ctx_tokens * D)      # cross-attention
    return L * per_layer + 2 * tokens * (cfg.in_dim * 4 * D + D * 64)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="i2v_14b")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (quick runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args(argv)
    over = {"num_layers": args.layers} if args.layers else {}
    cfg = dit_lib.get_config(args.preset, attention="auto", **over)
    h, w = args.height // 8, args.width // 8
    tokens = args.frames * (h // 2) * (w // 2)

    t0 = time.perf_counter()
    model = nnx.jit(lambda: dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0)))()
    gdef, state = nnx.split(model)
    del model
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))

    key = jax.random.key(0)
    ks = jax.random.split(key, 5)
    bf = cfg.compute_dtype
    x = jax.random.normal(ks[0], (1, args.frames, h, w, 16), bf)
    y = jax.random.normal(ks[1], (1, args.frames, h, w, cfg.in_dim - 16), bf) if cfg.in_dim > 16 else None
    ctx = jax.random.normal(ks[2], (1, 512, cfg.text_dim), bf)
    clip = jax.random.normal(ks[3], (1, 257, 1280), bf) if cfg.i2v else None
    pose = jax.random.normal(ks[4], (1, args.frames, h // 2, w // 2, cfg.dim), bf) * 0.1
    t = jnp.full((1, args.frames), 937.0, jnp.float32)

    @jax.jit
    def fwd(state, x, t, ctx, clip, y, pose):
        return nnx.merge(gdef, state)(x, t, ctx, clip_fea=clip, y=y, pose=pose)

    tc = time.perf_counter()
    out = jax.block_until_ready(fwd(state, x, t, ctx, clip, y, pose))
    t_compile = time.perf_counter() - tc
    times = []
    for _ in range(args.repeats):
        tb = time.perf_counter()
        out = jax.block_until_ready(fwd(state, x, t, ctx, clip, y, pose))
        times.append(time.perf_counter() - tb)
    tf = float(np.median(times))
    flops = forward_flops(cfg, tokens, 512 + (257 if cfg.i2v else 0))
    peak = peak_bytes()
    rows = [
        ("device", str(jax.devices()[0].device_kind)),
        ("model", f"{args.preset}, {cfg.num_layers} layers, {nparams / 1e9:.2f} B params, {cfg.dtype}, attention={cfg.backend()}"),
        ("tokens", f"{tokens} ({args.frames} x {h // 2} x {w // 2})"),
        ("forward (s)", f"{tf:.3f} (runs: {' '.join(f'{x:.3f}' for x in times)})"),
        ("FLOP / forward", f"{flops / 1e12:.0f} TFLOP"),
        ("achieved", f"{flops / tf / 1e12:.0f} TFLOP/s; MFU {flops / tf / 790e12:.0%} of 790 measured, "
                     f"{flops / tf / 989e12:.0%} of 989 datasheet"),
        ("per clip (50 steps x 2 CFG)", f"{100 * tf / 60:.2f} min"),
        ("compile (s)", f"{t_compile:.1f}"),
        ("init (s)", f"{t_init:.1f}"),
        ("peak memory (GiB)", "n/a" if peak is None else f"{peak / 2**30:.1f}"),
        ("output finite", str(bool(jnp.isfinite(out).all()))),
    ]
    print_table("teacher", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
