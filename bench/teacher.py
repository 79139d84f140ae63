"""Teacher DiT speed: one bidirectional forward of the I2V-14B shapes over a 480x832x81 clip.

    python -m bench.teacher [--preset i2v_14b] [--frames 21] [--height 480 --width 832] [--layers N]
    python -m bench.teacher --cfg-pair --devices 2 --mesh fsdp   # one CFG step on 2 GPUs

``--cfg-pair`` times what one sampler step costs: the positive and negative CFG branches as one
batch of 2 (the negative with zero pose tokens), as ``TeacherPipeline`` runs them. ``--devices N``
builds a mesh over the first N devices: ``--mesh fsdp`` shards the parameters (FSDP) and the batch
over them, ``--mesh data`` replicates the parameters and splits the batch ("CFG parallel").

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
from wanjax.sharding import make_mesh, named_sharding, state_shardings


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
    ap.add_argument("--cfg-pair", action="store_true", help="batch of 2: the CFG pair of one step")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--mesh", choices=("fsdp", "data"), default="fsdp")
    args = ap.parse_args(argv)
    over = {"num_layers": args.layers} if args.layers else {}
    cfg = dit_lib.get_config(args.preset, attention="auto", **over)
    h, w = args.height // 8, args.width // 8
    tokens = args.frames * (h // 2) * (w // 2)

    t0 = time.perf_counter()
    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {len(devices)} visible")
    mesh = make_mesh(data=args.devices if args.mesh == "data" else 1,
                     fsdp=args.devices if args.mesh == "fsdp" else 1, tensor=1, devices=devices)
    # initialise straight into the mesh's shardings (no full copy on device 0)
    gdef, abstract = nnx.split(nnx.eval_shape(lambda: dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0))))
    shardings = nnx.to_pure_dict(state_shardings(abstract, mesh))
    pure = jax.jit(lambda: nnx.to_pure_dict(nnx.split(dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0)))[1]),
                   out_shardings=shardings)()
    nnx.replace_by_pure_dict(abstract, pure)
    state = abstract
    model = None
    del model
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))

    key = jax.random.key(0)
    ks = jax.random.split(key, 5)
    bf = cfg.compute_dtype
    B = 2 if args.cfg_pair else 1

    def put(a):
        if a is None:
            return None
        return jax.device_put(a, named_sharding(mesh, "batch", *(None,) * (a.ndim - 1), shape=a.shape))

    x = put(jax.random.normal(ks[0], (B, args.frames, h, w, 16), bf))
    y = put(jax.random.normal(ks[1], (B, args.frames, h, w, cfg.in_dim - 16), bf)) if cfg.in_dim > 16 else None
    ctx = put(jax.random.normal(ks[2], (B, 512, cfg.text_dim), bf))
    clip = put(jax.random.normal(ks[3], (B, 257, 1280), bf)) if cfg.i2v else None
    pose = jax.random.normal(ks[4], (1, args.frames, h // 2, w // 2, cfg.dim), bf) * 0.1
    if B == 2:  # the negative CFG branch has no pose tokens
        pose = jnp.concatenate([pose, jnp.zeros_like(pose)])
    pose = put(pose)
    t = put(jnp.full((B, args.frames), 937.0, jnp.float32))

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
    flops = B * forward_flops(cfg, tokens, 512 + (257 if cfg.i2v else 0))
    ndev = len(devices)
    peak = peak_bytes()
    rows = [
        ("device", f"{ndev} x {devices[0].device_kind}, mesh {dict(mesh.shape)}"),
        ("batch", "2 (one CFG step: positive + negative)" if B == 2 else "1 (one forward)"),
        ("model", f"{args.preset}, {cfg.num_layers} layers, {nparams / 1e9:.2f} B params, {cfg.dtype}, attention={cfg.backend()}"),
        ("tokens", f"{tokens} ({args.frames} x {h // 2} x {w // 2})"),
        ("forward (s)", f"{tf:.3f} (runs: {' '.join(f'{x:.3f}' for x in times)})"),
        ("per forward-equivalent (s)", f"{tf / B:.3f}"),
        ("FLOP / forward", f"{flops / 1e12:.0f} TFLOP"),
        ("achieved", f"{flops / tf / 1e12:.0f} TFLOP/s; MFU {flops / tf / ndev / 790e12:.0%} of "
                     f"{ndev} x 790 measured, {flops / tf / ndev / 989e12:.0%} of {ndev} x 989 datasheet"),
        ("per clip (50 steps x 2 CFG)", f"{100 * tf / B / 60:.2f} min"),
        ("compile (s)", f"{t_compile:.1f}"),
        ("init (s)", f"{t_init:.1f}"),
        ("peak memory (GiB, device 0)", "n/a" if peak is None else f"{peak / 2**30:.1f}"),
        ("output finite", str(bool(jnp.isfinite(out).all()))),
    ]
    print_table("teacher", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
