"""End-to-end streaming student through the real pipeline: ``StudentPipeline.stream`` at 480x832.

    python -m bench.stream [--num-frames 81] [--local-attn-size -1 --sink-size 0] [--vae-chunk 1]
    python -m bench.stream --num-frames 249 --local-attn-size 21 --sink-size 3   # rolling cache

Random bf16 weights of the ``student_1_3b_pose`` PoseDiT (Self-Forcing 1.3B backbone widened to
in_dim 36 + I2V image branch + the 14B pose encoder with ``pose_proj``), the wan21 VAE in bf16,
random pose frames / y / CLIP / text context. This is the code path of ``infer.generate``: per
block of 3 latent frames, one jitted call (4 denoising steps + the context pass, donated KV cache),
then the streaming VAE decode of the block (``--vae-chunk`` latent frames per decoder pass) and
the copy of the uint8 frames to the host.

Reports: frames per second end to end (compile excluded: the first run is reported apart), the
latency to the first frames, per-block times (DiT / VAE), the steady-state speed over the blocks
after the rolling window is full, and the peak device memory of the process.
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
from wanjax.models import unianimate as ua
from wanjax.models.dit import RESIDUAL_DTYPES
from wanjax.models.vae import VAEConfig, get_vae_config, init_vae
from wanjax.pipeline import Reference, latent_frames
from wanjax.pipeline.student import StudentPipeline


def random_student(preset: str, **dit_over) -> ua.PoseDiT:
    """A PoseDiT with random weights (bf16 DiT), built on the device; the zero-initialised output
    head gets random values so that the latents (and the VAE's input) are not constant."""
    base = ua.get_config(preset)
    cfg = base.replace(dit=base.dit.replace(**dit_over))
    model = nnx.jit(lambda: ua.PoseDiT(cfg, rngs=nnx.Rngs(0)))()
    head = model.dit.head.head.kernel
    head.value = (jax.random.normal(jax.random.key(1), head.value.shape) * 0.02).astype(head.value.dtype)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="student_1_3b_pose")
    ap.add_argument("--vae", default="wan21")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--num-frames", type=int, default=81)
    ap.add_argument("--local-attn-size", type=int, default=-1)
    ap.add_argument("--sink-size", type=int, default=0)
    ap.add_argument("--vae-chunk", type=int, default=1, help="latent frames per VAE decoder pass (0: whole block)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--residual-dtype", default="float32", choices=RESIDUAL_DTYPES,
                    help="the DiT's residual-stream storage (WanDiTConfig.residual_dtype)")
    ap.add_argument("--memory-report", default="", help="directory: write XLA memory analysis + HLO of "
                    "the block and VAE executables there")
    args = ap.parse_args(argv)
    H, W, N = args.height, args.width, args.num_frames
    F = latent_frames(N)
    rolling = args.local_attn_size != -1
    model = random_student(args.preset, max_frames=F if not rolling else 21,
                           local_attn_size=args.local_attn_size, sink_size=args.sink_size,
                           residual_dtype=args.residual_dtype)
    dcfg = model.cfg.dit
    vcfg = VAEConfig.tiny(z_dim=16) if args.vae == "tiny" else get_vae_config(args.vae)
    vae = init_vae(vcfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    pipe = StudentPipeline(model, vae, vae_chunk=args.vae_chunk or None)
    rng = np.random.default_rng(0)
    pose = rng.integers(0, 255, (N, H, W, 3), dtype=np.uint8)
    ks = jax.random.split(jax.random.key(0), 3)
    ctx = jax.random.normal(ks[0], (1, dcfg.text_len, dcfg.text_dim), jnp.bfloat16)
    y = jax.random.normal(ks[1], (1, min(F, 21), H // 8, W // 8, 20), jnp.bfloat16)
    clip = jax.random.normal(ks[2], (1, 257, dcfg.image_dim), jnp.float32)
    ref = Reference(y, clip)

    def run():
        t0 = time.perf_counter()
        blocks = [r.timings for r in pipe.stream(ctx, pose, reference=ref, num_frames=N, seed=0)]
        return time.perf_counter() - t0, blocks

    t_compile, _ = run()
    if args.memory_report:
        rows_m = memory_report(pipe, args.memory_report, ctx, clip, (H // 8, W // 8))
    results = [run() for _ in range(max(1, args.repeats))]
    total, blocks = min(results, key=lambda r: r[0])
    nframes = sum(b["frames"] for b in blocks)
    nfb = dcfg.num_frame_per_block
    window = args.local_attn_size if rolling else F
    steady = [b for b in blocks if b["start_frame"] >= window and b["block"] < len(blocks) - 1]
    rows = [("device", str(jax.devices()[0].device_kind)),
            ("model", f"{args.preset} (random {dcfg.dtype}, residual {dcfg.residual_dtype}), "
                      f"attention={dcfg.backend()}, VAE {args.vae} bf16, vae_chunk={args.vae_chunk or 'block'}"),
            ("frames", f"{nframes} at {H}x{W} ({F} latent frames, {len(blocks)} blocks of {nfb})"),
            ("cache", f"rolling: local_attn_size={args.local_attn_size}, sink_size={args.sink_size}" if rolling
             else f"full: max_frames={F}"),
            ("end to end (s)", f"{total:.3f}  ->  {nframes / total:.1f} FPS"),
            ("first frames ready (s)", f"{blocks[0]['first_frame_latency_s']:.3f} ({blocks[0]['frames']} frames)"),
            ("per block total (ms)", " ".join(f"{1e3 * b['block_s']:.0f}" for b in blocks)),
            ("per block DiT (ms)", " ".join(f"{1e3 * b['denoise_s']:.0f}" for b in blocks)),
            ("per block VAE (ms)", " ".join(f"{1e3 * b['decode_s']:.0f}" for b in blocks)),
            ("per block pose tokens, host (ms)", " ".join(f"{1e3 * b['pose_encode_s']:.0f}" for b in blocks))]
    if steady:
        sb = float(np.mean([b["block_s"] for b in steady]))
        sf = float(np.mean([b["frames"] for b in steady]))
        rows.append(("steady state (window full)", f"{len(steady)} blocks, {1e3 * sb:.0f} ms/block -> "
                                                  f"{sf / sb:.1f} FPS"))
    peak = peak_bytes()
    rows += [("first run incl. compile (s)", f"{t_compile:.1f}"),
             ("peak memory (GiB)", "n/a" if peak is None else f"{peak / 2**30:.2f}")]
    if args.memory_report:
        rows += rows_m
    print_table("stream", rows)
    return 0


def memory_report(pipe, out_dir, ctx, clip, hw) -> list:
    """XLA's buffer sizes (arguments / outputs / aliased / temporaries) of the jitted block function
    and the VAE's streaming steps; their optimised HLO goes to ``out_dir`` for inspection."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    d = pipe.dit.cfg
    h, w = hw
    sds = jax.ShapeDtypeStruct
    cache = jax.eval_shape(lambda: pipe.dit.init_cache(1, (h // 2) * (w // 2)))
    ckv = jax.eval_shape(pipe.cross_kv, ctx, clip)
    y = sds((1, d.num_frame_per_block, h, w, 20), d.compute_dtype)
    pose = sds((1, d.num_frame_per_block, h // 2, w // 2, d.dim), d.compute_dtype)
    comp = {"dit_block": pipe._block_fn.lower(pipe._state, jax.random.key(0), ckv, cache, jnp.int32(0), y, pose,
                                              context=True, hw=(h, w)).compile()}
    dec = pipe._decoder
    if dec is not None:
        z = sds((1, d.num_frame_per_block, h, w, 16), jnp.bfloat16)
        vcache = jax.eval_shape(dec._first, dec.state, z)[1]
        comp["vae_first"] = dec._first.lower(dec.state, z).compile()
        comp["vae_step"] = dec._step.lower(dec.state, z, vcache).compile()
    if getattr(pipe.model, "_pose_jit", None) is not None:
        # one block's pose window: its 3 latent groups + 2 of halo + 1 of lookahead, 4 frames each
        win = sds((1, 4 * (d.num_frame_per_block + 3), 8 * h, 8 * w, 3), jnp.uint8)
        comp["pose_tokens"] = pipe.model._pose_jit.lower(pipe.model._pose_state, win).compile()
    rows = []
    for name, c in comp.items():
        m = c.memory_analysis()
        with open(os.path.join(out_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(c.as_text())
        g = 2 ** 30
        rows.append((f"XLA {name} (GiB)", f"args {m.argument_size_in_bytes / g:.2f}  out {m.output_size_in_bytes / g:.2f}  "
                                          f"alias {m.alias_size_in_bytes / g:.2f}  temp {m.temp_size_in_bytes / g:.2f}"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
