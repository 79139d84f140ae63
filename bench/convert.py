"""Converter memory: peak RSS of `python -m converters.dit` on a full-size random checkpoint.

    python -m bench.convert [--preset t2v_1_3b] [--src-dtype float32] [--workdir DIR]

Writes a Wan-native ``diffusion_pytorch_model.safetensors`` of the preset's real shapes, streaming
(tensor by tensor, random data, never the whole model in memory), then runs the converter in a
child process and reports its peak resident set size against the checkpoint size. The converter
keeps about one tensor in flight (disk-backed buffers, Orbax writes bounded), so its peak RSS should
not grow with the model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def wan_shapes(cfg) -> dict[str, tuple[int, ...]]:
    D, F = cfg.dim, cfg.ffn_dim
    s = {"patch_embedding.weight": (D, cfg.in_dim, 1, 2, 2), "patch_embedding.bias": (D,),
         "text_embedding.0.weight": (D, cfg.text_dim), "text_embedding.0.bias": (D,),
         "text_embedding.2.weight": (D, D), "text_embedding.2.bias": (D,),
         "time_embedding.0.weight": (D, cfg.freq_dim), "time_embedding.0.bias": (D,),
         "time_embedding.2.weight": (D, D), "time_embedding.2.bias": (D,),
         "time_projection.1.weight": (6 * D, D), "time_projection.1.bias": (6 * D,),
         "head.modulation": (1, 2, D), "head.head.weight": (4 * cfg.out_dim, D), "head.head.bias": (4 * cfg.out_dim,)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, D)
        names = ["q", "k", "v", "o"]
        for a in ("self_attn", "cross_attn"):
            for n in names + (["k_img", "v_img"] if (cfg.i2v and a == "cross_attn") else []):
                s[f"{b}{a}.{n}.weight"] = (D, D)
                s[f"{b}{a}.{n}.bias"] = (D,)
            for n in ("norm_q", "norm_k") + (("norm_k_img",) if (cfg.i2v and a == "cross_attn") else ()):
                s[f"{b}{a}.{n}.weight"] = (D,)
        s[b + "norm3.weight"] = (D,)
        s[b + "norm3.bias"] = (D,)
        s[b + "ffn.0.weight"] = (F, D)
        s[b + "ffn.0.bias"] = (F,)
        s[b + "ffn.2.weight"] = (D, F)
        s[b + "ffn.2.bias"] = (D,)
    if cfg.i2v:
        s.update({"img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
                  "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
                  "img_emb.proj.3.weight": (D, 1280), "img_emb.proj.3.bias": (D,),
                  "img_emb.proj.4.weight": (D,), "img_emb.proj.4.bias": (D,)})
    return s


def write_random_safetensors(path: Path, shapes: dict, dtype: str = "float32", seed: int = 0) -> int:
    """Stream a safetensors file tensor by tensor; returns its size in bytes."""
    np_dt, st_dt, nbytes = {"float32": (np.float32, "F32", 4), "bfloat16": (np.uint16, "BF16", 2)}[dtype]
    header, off = {}, 0
    for k, shp in shapes.items():
        n = int(np.prod(shp)) * nbytes
        header[k] = {"dtype": st_dt, "shape": list(shp), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for k, shp in shapes.items():
            a = (rng.standard_normal(shp, dtype=np.float32) * 0.02)
            if dtype == "bfloat16":
                a = (a.view(np.uint32) >> 16).astype(np.uint16)
            f.write(np.ascontiguousarray(a).tobytes())
    return path.stat().st_size


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="t2v_1_3b")
    ap.add_argument("--src-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out-dtype", default="bfloat16")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wanjax.models.dit import get_config

    cfg = get_config(args.preset)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wanjax-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "diffusion_pytorch_model.safetensors"
    try:
        t0 = time.time()
        size = write_random_safetensors(src, wan_shapes(cfg), args.src_dtype)
        t_write = time.time() - t0
        (work / "config.json").write_text(json.dumps({"dim": cfg.dim, "num_heads": cfg.num_heads}))
        t0 = time.time()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
        r = subprocess.run([sys.executable, "-m", "converters.dit", "--src", str(work), "--out", str(work / "out"),
                            "--dtype", args.out_dtype, "--preset", args.preset], env=env, capture_output=True, text=True)
        t_conv = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        import re
        m = re.search(r"anonymous, non-reclaimable: (\d+) MiB", r.stderr)
        anon = float(m.group(1)) if m else float("nan")
        out_size = sum(p.stat().st_size for p in (work / "out").rglob("*") if p.is_file())
        rows = [("preset", f"{args.preset} ({len(wan_shapes(cfg))} tensors)"),
                ("source", f"{size / 2**30:.2f} GiB {args.src_dtype} safetensors (written in {t_write:.0f} s)"),
                ("output", f"{out_size / 2**30:.2f} GiB Orbax, {args.out_dtype}"),
                ("convert time", f"{t_conv:.0f} s"),
                ("peak RSS (VmHWM, incl. file-backed pages)", f"{peak / 1024:.2f} GiB"),
                ("peak anonymous RSS (sampled RssAnon)", f"{anon / 1024:.2f} GiB"),
                ("peak RSS / source size", f"{peak / 1024 / (size / 2**30):.2f}")]
        from bench.common import print_table
        print_table("convert", rows)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
