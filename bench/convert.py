"""Converter memory: peak RSS of `python -m converters.dit` on a full-size random checkpoint.

    python -m bench.convert [--preset t2v_1_3b] [--num_layers N] [--student] [--src-dtype float32]
                            [--out-dtype bfloat16] [--workdir DIR] [--keep]

Writes a Wan-native ``diffusion_pytorch_model.safetensors`` of the preset's real shapes, streaming
(tensor by tensor, random data, never the whole model in memory), then runs the converter in a
child process and reports its peak resident set size against the checkpoint size. The converter
keeps about one tensor in flight (disk-backed buffers) and the checkpoint writer one region of one
array, so its peak anonymous memory should not grow with the model. ``--num_layers`` keeps the
preset's layer geometry at a smaller depth (the converter then runs with ``--preset auto``), which
is how the 14B is measured on a disk that cannot hold its 57 GB fp32 source plus the output.
``--student`` then widens the converted 1.3B into the ``student_1_3b_pose`` checkpoint
(``converters.student``) with synthetic UniAnimate pose modules and reports the same numbers.
"""
from __future__ import annotations

import argparse
import json
import os
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


def write_random_ua_pose(path: Path, out_dim: int = 5120, seed: int = 1) -> None:
    """The pose modules of a UniAnimate-DiT ``.ckpt`` (spec 7.2 shapes, random) as a torch pickle."""
    import torch

    from converters import pose as pose_conv

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for idx in pose_conv.POSE3D_IDX:
        last = idx == pose_conv.POSE3D_IDX[-1]
        shape = (out_dim, 16, 1, 2, 2) if last else (16, 3 if idx == 0 else 16, 3, 3, 3)
        sd[f"{pose_conv.POSE3D}.{idx}.weight"] = torch.randn(*shape, generator=g) * 0.02
        sd[f"{pose_conv.POSE3D}.{idx}.bias"] = torch.zeros(shape[0])
    for idx in pose_conv.REF2D_IDX:
        shape = (20 if idx == pose_conv.REF2D_IDX[-1] else 16, 3 if idx == 0 else 16, 3, 3)
        sd[f"{pose_conv.REF2D}.{idx}.weight"] = torch.randn(*shape, generator=g) * 0.02
        sd[f"{pose_conv.REF2D}.{idx}.bias"] = torch.zeros(shape[0])
    torch.save(sd, path)


def run_converter(module: str, argv: list[str]) -> tuple[float, dict]:
    """Run ``python -m module argv`` on the CPU; (wall seconds, numbers parsed from its stderr)."""
    import re

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(r.returncode)
    got = {}
    m = re.search(r"peak RSS (\d+) MiB \(anonymous, non-reclaimable: (\d+) MiB\)", r.stderr)
    if m:
        got["vmhwm"], got["anon"] = int(m.group(1)) / 1024, int(m.group(2)) / 1024
    m = re.search(r"phases: materialize ([\d.]+) s \(peak anonymous (\d+) MiB\), checkpoint write ([\d.]+) s "
                  r"\(peak anonymous (\d+) MiB\)", r.stderr)
    if m:
        got["phases"] = f"materialize {float(m.group(1)):.0f} s, checkpoint write {float(m.group(3)):.0f} s"
        got["phase_anon"] = (f"materialize {int(m.group(2)) / 1024:.2f} GiB, "
                             f"checkpoint write {int(m.group(4)) / 1024:.2f} GiB")
    return wall, got


def _dir_gib(d: Path) -> float:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="t2v_1_3b")
    ap.add_argument("--src-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out-dtype", default="bfloat16")
    ap.add_argument("--num_layers", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--student", action="store_true",
                    help="t2v_1_3b only: then widen the converted backbone with converters.student "
                         "(student_1_3b_pose, synthetic UniAnimate pose modules)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the files in --workdir (default: delete them)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wanjax.models.dit import get_config

    cfg = get_config(args.preset)
    preset = args.preset
    if args.num_layers is not None:
        cfg, preset = cfg.replace(num_layers=args.num_layers), "auto"
    if args.student and preset != "t2v_1_3b":
        ap.error("--student needs --preset t2v_1_3b at full depth")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wanjax-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "diffusion_pytorch_model.safetensors"
    made = [src, work / "config.json", work / "ua_pose.ckpt", work / "out", work / "student"]
    try:
        t0 = time.time()
        size = write_random_safetensors(src, wan_shapes(cfg), args.src_dtype)
        t_write = time.time() - t0
        (work / "config.json").write_text(json.dumps({"dim": cfg.dim, "num_heads": cfg.num_heads}))
        t_conv, got = run_converter("converters.dit", ["--src", str(work), "--out", str(work / "out"),
                                                       "--dtype", args.out_dtype, "--preset", preset])
        rows = [("preset", f"{args.preset}, {cfg.num_layers} layers ({len(wan_shapes(cfg))} tensors)"),
                ("source", f"{size / 2**30:.2f} GiB {args.src_dtype} safetensors (written in {t_write:.0f} s)"),
                ("output", f"{_dir_gib(work / 'out'):.2f} GiB Orbax, {args.out_dtype}"),
                ("convert time", f"{t_conv:.0f} s ({got.get('phases', '?')})"),
                ("peak RSS (VmHWM, incl. file-backed pages)", f"{got.get('vmhwm', float('nan')):.2f} GiB"),
                ("peak anonymous RSS (sampled RssAnon)",
                 f"{got.get('anon', float('nan')):.2f} GiB ({got.get('phase_anon', '?')})")]
        if args.student:
            write_random_ua_pose(work / "ua_pose.ckpt")
            t_st, st = run_converter("converters.student", ["--backbone", str(work / "out"), "--pose",
                                                            str(work / "ua_pose.ckpt"), "--out", str(work / "student")])
            rows += [("student: converters.student", f"{t_st:.0f} s ({st.get('phases', '?')}), output "
                      f"{_dir_gib(work / 'student'):.2f} GiB"),
                     ("student: peak RSS (VmHWM)", f"{st.get('vmhwm', float('nan')):.2f} GiB"),
                     ("student: peak anonymous RSS",
                      f"{st.get('anon', float('nan')):.2f} GiB ({st.get('phase_anon', '?')})")]
        from bench.common import print_table
        print_table("convert", rows)
    finally:
        if not args.keep:
            for p in made:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
