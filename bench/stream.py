"""End-to-end streaming student: causal 1.3B DiT blocks + streaming VAE decode, 81 frames at 480x832.

    python -m bench.stream [--latent-frames 21] [--height 480 --width 832]

Random bf16 weights. For each block of 3 latent frames: 4 denoising steps + the context pass (one
jitted call, donated KV cache), then the streaming VAE decode of that block (9 pixel frames for the
first block, 12 after). Reports frames per second end to end (compile excluded, reported apart),
the latency to the first 9 frames, per-block times and the combined peak device memory.
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
from bench.dit import make_block_fn
from wanjax.models import dit as dit_lib
from wanjax.models.vae import StreamingDecoder, VAEConfig, get_vae_config, init_vae


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="t2v_1_3b")
    ap.add_argument("--vae", default="wan21")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    nfb = 3
    F = args.latent_frames
    h, w = args.height // 8, args.width // 8
    T = (h // 2) * (w // 2)
    cfg = dit_lib.get_config(args.preset, max_frames=F)
    model = nnx.jit(lambda: dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0)))()
    gdef, state = nnx.split(model)
    state["head"]["head"]["kernel"][...] = (jax.random.normal(jax.random.key(1), state["head"]["head"]["kernel"].shape)
                                            * 0.02).astype(cfg.param_dtype)
    del model
    vcfg = VAEConfig.tiny(z_dim=16) if args.vae == "tiny" else get_vae_config(args.vae)
    vae = init_vae(vcfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    dec = StreamingDecoder(vae)
    ctx = jax.random.normal(jax.random.key(0), (1, 512, cfg.text_dim), jnp.bfloat16)
    ckv = jax.jit(lambda s, c: nnx.merge(gdef, s).context_kv(c))(state, ctx)
    noise = jax.random.normal(jax.random.key(2), (1, F, h, w, 16), jnp.bfloat16)
    eps = jax.random.normal(jax.random.key(3), (3, 1, F, h, w, 16), jnp.float32)
    block_fn, last_fn = make_block_fn(gdef, nfb), make_block_fn(gdef, nfb, skip_context=True)
    init_cache = jax.jit(lambda: dit_lib.KVCache(*[jnp.zeros((cfg.num_layers, 1, F * T, cfg.num_heads, cfg.head_dim),
                                                               cfg.compute_dtype)] * 2))
    nblocks = F // nfb

    def run():
        dec.reset()
        cache = init_cache()
        t0 = time.perf_counter()
        first, per_block, nframes = None, [], 0
        for b in range(nblocks):
            tb = time.perf_counter()
            fn = last_fn if b == nblocks - 1 else block_fn
            x0, cache = fn(state, noise[:, b * nfb:(b + 1) * nfb], eps[:, :, b * nfb:(b + 1) * nfb], ckv, cache,
                           jnp.int32(b * nfb))
            frames = dec.push(x0.astype(jnp.bfloat16))
            frames = np.asarray(jax.device_get(frames))  # the frames are on the host: displayable
            nframes += frames.shape[1]
            per_block.append(time.perf_counter() - tb)
            if first is None:
                first = time.perf_counter() - t0
        return time.perf_counter() - t0, first, per_block, nframes

    tc = time.perf_counter()
    run()
    t_compile = time.perf_counter() - tc
    results = [run() for _ in range(args.repeats)]
    total, first, per_block, nframes = min(results, key=lambda r: r[0])
    peak = peak_bytes()
    rows = [("device", str(jax.devices()[0].device_kind)),
            ("frames", f"{nframes} at {args.height}x{args.width} ({F} latent frames, {nblocks} blocks)"),
            ("end to end (s)", f"{total:.3f}  ->  {nframes / total:.1f} FPS"),
            ("first frames ready (s)", f"{first:.3f}"),
            ("per block DiT+VAE (ms)", " ".join(f"{1e3 * x:.0f}" for x in per_block)),
            ("first run incl. compile (s)", f"{t_compile:.1f}"),
            ("peak memory (GiB)", "n/a" if peak is None else f"{peak / 2**30:.2f}")]
    print_table("stream", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
