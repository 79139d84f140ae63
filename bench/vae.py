"""Wan2.1 VAE decode speed: full decode and the Self-Forcing streaming decode.

    python -m bench.vae [--dtype bfloat16] [--height 480 --width 832 --latent-frames 21]
    python -m bench.vae --preset tiny --height 64 --width 64        # CPU smoke run

Random weights (NumPy, PyTorch-like fan-in scaling) at the ``wan21`` size (126.9 M params).
Times (1) the full decode of all latent frames in one jitted call (21 -> 81 frames) and (2) the
streaming decode, ``--block`` latent frames per push (9 frames for the first block, then 12),
with per-block times and the first-block latency. Compile (+ one warm-up run) is timed
separately; peak device memory is read after each part. Prints one table at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import wanjax  # noqa: F401  (first: disables Flax eager sharding)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import peak_bytes, print_table
from wanjax.models.vae import (StreamingDecoder, decoder_layers, get_vae_config, init_vae,
                               jit_decode, set_conv_impl)


def decoder_flops(cfg, n_lat: int, h: int, w: int, first: bool) -> float:
    """Multiply-add FLOPs (x2) of the decoder's convs and attention for one chunk of n_lat latents."""
    t = 1 + 4 * (n_lat - 1) if first else 4 * n_lat
    t_lat, top = n_lat, cfg.base_dim * cfg.dim_mult[-1]
    fl = 2 * 27 * cfg.z_dim * top * t_lat * h * w                        # conv_in
    fl += 2 * (2 * 2 * 27 * top * top) * t_lat * h * w                   # mid res blocks
    fl += 2 * (4 * top * top) * t_lat * h * w + 2 * 2 * t_lat * (h * w) ** 2 * top   # attention
    tt, hh, ww = t_lat, h, w
    for spec in decoder_layers(cfg):
        if spec[0] == "res":
            ci, co = spec[1], spec[2]
            fl += 2 * 27 * (ci * co + co * co) * tt * hh * ww + (2 * ci * co * tt * hh * ww if ci != co else 0)
        else:
            c = spec[1]
            if spec[0] == "upsample3d":
                fl += 2 * 3 * c * 2 * c * tt * hh * ww
                tt = 2 * tt - (1 if first else 0)
            fl += 2 * 9 * c * (c // 2) * tt * (2 * hh) * (2 * ww)
            hh, ww = 2 * hh, 2 * ww
    fl += 2 * 27 * cfg.base_dim * 3 * tt * hh * ww                       # conv_out
    assert tt == t, (tt, t)
    return float(fl)


def _gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vae", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan21", choices=("wan21", "tiny"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--block", type=int, default=3, help="latent frames per streamed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=3,
                    help="latent frames per chunk of the full decode (0: one pass over everything; "
                         "at 480x832 that is ~100x slower, cuDNN refuses tensors over 2^31 elements)")
    ap.add_argument("--conv-impl", default="fold", choices=("fold", "3d"),
                    help="temporal conv as one 3-D conv or as a time-folded 2-D conv")
    ap.add_argument("--skip-full", action="store_true", help="only the streaming decode")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    cfg = get_vae_config(args.preset)
    s = cfg.spatial_factor
    if args.height % s or args.width % s:
        ap.error(f"--height/--width must be multiples of {s}")
    if args.latent_frames % args.block:
        ap.error(f"--latent-frames {args.latent_frames} must be a multiple of --block {args.block}")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    F, h, w = args.latent_frames, args.height // s, args.width // s
    n_out = 1 + cfg.temporal_factor * (F - 1)

    t0 = time.perf_counter()
    vae = set_conv_impl(init_vae(cfg, seed=0, dtype=dtype), args.conv_impl)
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vae, nnx.Param)))
    t_init = time.perf_counter() - t0
    z = jax.random.normal(jax.random.key(0), (1, F, h, w, cfg.z_dim), jnp.float32)
    z = jax.block_until_ready(z)

    # ---- streaming decode --------------------------------------------------------------------
    dec = StreamingDecoder(vae)

    def run_stream():
        dec.reset()
        times, outs = [], []
        for i in range(0, F, args.block):
            tb = time.perf_counter()
            f = jax.block_until_ready(dec.push(z[:, i:i + args.block]))
            times.append(time.perf_counter() - tb)
            outs.append(f)
        return times, outs

    tc = time.perf_counter()
    _, outs = run_stream()                       # compiles the first-block and the step function
    t_compile_stream = time.perf_counter() - tc
    counts = [o.shape[1] for o in outs]
    del outs
    stream_runs = [run_stream() for _ in range(args.repeats)]
    totals = [sum(r[0]) for r in stream_runs]
    best = int(np.argmin(totals))
    per_block = stream_runs[best][0]
    stream = jnp.concatenate(stream_runs[best][1], axis=1)
    del stream_runs
    peak_stream = peak_bytes()

    # ---- full decode ---------------------------------------------------------------------------
    rows_full = []
    diff = None
    if not args.skip_full:
        decode = jit_decode(vae, chunk=args.chunk or None)
        tc = time.perf_counter()
        full = jax.block_until_ready(decode(z))
        t_compile_full = time.perf_counter() - tc
        full_times = []
        for _ in range(args.repeats):
            tb = time.perf_counter()
            full = jax.block_until_ready(decode(z))
            full_times.append(time.perf_counter() - tb)
        peak_full = peak_bytes()
        diff = float(jnp.abs(full - stream).max())
        finite = bool(jnp.isfinite(full).all())
        fl_full = decoder_flops(cfg, F, h, w, True)
        rows_full = [
            ("full decode (s)", f"{min(full_times):.3f} (median {np.median(full_times):.3f}; "
                                f"{n_out / min(full_times):.1f} frames/s; "
                                f"{fl_full / min(full_times) / 1e12:.0f} TFLOP/s)"),
            ("full decode chunking", "one pass" if not args.chunk else f"{args.chunk} latent frames"),
            ("full compile+warmup (s)", f"{t_compile_full:.1f}"),
            ("peak memory after full (GiB)", _gib(peak_full)),
            ("stream vs full max |diff|", f"{diff:.2e}"),
            ("full output finite", str(finite)),
        ]

    fl_step = decoder_flops(cfg, args.block, h, w, len(per_block) == 1)
    dev = jax.devices()[0]
    rows = [
        ("device", f"{dev.platform}:{getattr(dev, 'device_kind', '')}"),
        ("model", f"VAE {args.preset} (base_dim {cfg.base_dim}), {nparams / 1e6:.2f} M params, "
                  f"compute {args.dtype}, conv {args.conv_impl}"),
        ("latents", f"{F} x {h}x{w}x{cfg.z_dim} -> {n_out} frames of {args.height}x{args.width}"),
        ("stream frames per block", " ".join(map(str, counts))),
        ("stream per block (ms)", " ".join(f"{1e3 * t:.1f}" for t in per_block)),
        ("stream first block (ms)", f"{1e3 * per_block[0]:.1f}"),
        ("stream later block TFLOP/s", f"{fl_step / 1e12 / float(np.median(per_block[1:] or per_block)):.0f}"),
        ("stream total (s)", f"{sum(per_block):.3f} (median {np.median(totals):.3f})"),
        ("stream compile+warmup (s)", f"{t_compile_stream:.1f}"),
        ("peak memory after stream (GiB)", _gib(peak_stream)),
        *rows_full,
        ("init (s)", f"{t_init:.1f}"),
    ]
    print_table("vae", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_block_s": per_block, "stream_total_s": sum(per_block),
                       "frames_per_block": counts, "peak_bytes_stream": peak_stream,
                       "stream_vs_full": diff, "device": str(dev), "args": vars(args),
                       "full": dict(rows_full)}, f, indent=1)
    ok = bool(jnp.isfinite(stream).all()) and sum(counts) == n_out
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
