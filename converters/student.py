"""Widen a converted Self-Forcing / Wan 1.3B DiT into the pose student checkpoint (spec 12.2).

    python -m converters.student --backbone DIR --pose PATH --out DIR [--preset student_1_3b_pose]
        [--dtype auto|bfloat16|float32] [--seed 0] [--overwrite]

``--backbone`` is a wanjax DiT checkpoint written by ``converters.dit`` (the T2V 1.3B: ``t2v_1_3b``).
``--pose`` is UniAnimate's ``.ckpt`` (its pose modules; the LoRA tensors are skipped) or a wanjax pose
checkpoint from ``converters.pose``. The output is a ``PoseDiT`` checkpoint of ``--preset`` (config.json
+ Orbax ``params/``, load it with ``load_model(dir, wanjax.models.unianimate.build_pose_dit)``) with the
semantics of :func:`wanjax.models.unianimate.init_student_from_backbone`, so that the student computes
exactly what the backbone computes until it is trained:

- every backbone parameter is copied (``dit/...``), stacked block parameters one layer at a time;
- ``patch_embedding`` is widened from the backbone's 16 input channels to 36, the 20 new (``y``)
  channels with zero weights;
- the image branch the T2V backbone lacks (``img_emb``, ``k_img``, ``norm_k_img``) gets the values
  ``PoseDiT(cfg, rngs=nnx.Rngs(seed))`` initialises it with (computed alone: only those parameters are
  materialised), and ``v_img`` is zero, so image cross-attention adds exactly 0;
- the pose modules (``dwpose_embedding``, ``randomref_embedding_pose``) are the source's, unchanged;
  ``pose_proj`` (5120 -> 1536) is zero unless the pose checkpoint already holds one.

Strict and streaming like every converter here (``converters.common``): the backbone's config must be
the preset's backbone (same architecture, T2V), every backbone key is used and every student parameter
filled, shape errors name the key and both shapes, nothing is read before the checks pass, the backbone
is read one layer at a time, and the output appears atomically. The one non-streaming step is the
image-branch init (:func:`init_values`), which bounds the peak memory at about 1.7 GiB for the 1.3B.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from converters import common
from converters import dit as dit_conv
from converters import pose as pose_conv
from converters import unianimate as ua_conv
from converters.common import Assign, ConversionError, TensorSource

log = logging.getLogger("wanjax.convert.student")

BACKBONE_PREFIX = "backbone::"   # namespace of the backbone arrays in the combined source
INIT_PREFIX = "student_init::"   # new image-branch parameters (PoseDiT init / zeros)
ZERO_INIT = ("blocks/cross_attn/v_img/",)
# fields that must agree between the backbone's config.json and the preset's DiT
ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "out_dim", "text_dim", "freq_dim", "text_len",
               "patch", "eps")


def backbone_config(backbone, student_dit, preset: str):
    """The backbone's ``WanDiTConfig`` after checking that it is the T2V backbone of ``student_dit``."""
    from wanjax.models.dit import WanDiTConfig

    if not ua_conv.is_wanjax_dir(backbone, "dit"):
        raise ConversionError(f"--backbone {backbone}: not a wanjax DiT checkpoint (config.json with "
                              f"\"model\": \"dit\" + params/); convert the PyTorch file with converters.dit first")
    bcfg = WanDiTConfig.from_dict(json.loads((Path(backbone) / "config.json").read_text()))
    diff = [f"{f}={getattr(bcfg, f)} (preset needs {getattr(student_dit, f)})" for f in ARCH_FIELDS
            if tuple(np.atleast_1d(getattr(bcfg, f))) != tuple(np.atleast_1d(getattr(student_dit, f)))]
    if bcfg.i2v or bcfg.in_dim != bcfg.out_dim:
        diff.append(f"i2v={bcfg.i2v}, in_dim={bcfg.in_dim} (the backbone must be text-to-video: i2v=False, "
                    f"in_dim={bcfg.out_dim})")
    if diff:
        raise ConversionError(f"--backbone {backbone} is not the backbone of preset {preset!r}: "
                              + "; ".join(diff) + ". Pass the converted Self-Forcing/Wan t2v_1_3b checkpoint "
                              "or the matching --preset")
    return bcfg


def widen_patch_kernel(kernel: np.ndarray, n_patch: int, in_dim: int) -> np.ndarray:
    """Patch-embedding kernel ``[(pt, ph, pw, c), D]`` (c fastest) with ``c`` zero-padded to ``in_dim``."""
    cin = kernel.shape[0] // n_patch
    out = np.zeros((n_patch, in_dim, kernel.shape[1]), kernel.dtype)
    out[:, :cin] = kernel.reshape(n_patch, cin, kernel.shape[1])
    return out.reshape(n_patch * in_dim, kernel.shape[1])


def init_values(cfg, paths, seed: int) -> dict[str, np.ndarray]:
    """``{path: value}`` of the DiT parameters ``paths`` of ``PoseDiT(cfg, rngs=nnx.Rngs(seed))``, in the
    parameter dtype. The model is built inside ``jax.jit`` with only these parameters as outputs, so XLA
    computes nothing else (for the 1.3B student: the 76 M image-branch parameters, not 1.4 G). XLA's
    random-number intermediates make this the converter's peak: ~1.2 GiB for a few seconds."""
    import jax
    from flax import nnx

    from wanjax.models.unianimate import PoseDiT

    def init():
        flat = common.flatten_params(nnx.to_pure_dict(nnx.state(PoseDiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param)))
        return {p: flat["dit/" + p] for p in paths}

    values = jax.jit(init)()
    return {k: np.asarray(values.pop(k)) for k in list(values)}


def init_source(cfg, targets, seed: int) -> TensorSource:
    """Lazy source of the student's new image-branch parameters (``targets``: ``{dit path: spec}``),
    stacked ones per layer (``path[i]``): ``v_img`` zeros, the others the PoseDiT init."""
    src = TensorSource()
    src.description = f"<PoseDiT init, nnx.Rngs({seed}); v_img zeros>"
    cache: dict[str, np.ndarray] = {}
    unread = [0]  # reads left before the cached init values can go

    def value(path, index):
        if not cache:
            cache.update(init_values(cfg, [p for p in targets if not p.startswith(ZERO_INIT)], seed))
        out = cache[path][index]
        unread[0] -= 1
        if unread[0] <= 0:
            cache.clear()
        return out

    for path, spec in targets.items():
        shape = tuple(spec.shape)
        zero = path.startswith(ZERO_INIT)
        for index, key, shp in ([(i, f"{path}[{i}]", shape[1:]) for i in range(shape[0])]
                                if path.startswith("blocks/") else [((), path, shape)]):
            load = ((lambda shp=shp: np.zeros(shp, np.float32)) if zero
                    else (lambda path=path, index=index: value(path, index)))
            unread[0] += not zero
            src._add(key, load, shp, src.description)
    return src


def student_plan(bcfg, cfg, targets) -> tuple[list[Assign], dict]:
    """Assignments of the DiT part: the backbone's parameters (``BACKBONE_PREFIX``) and the new ones
    (``INIT_PREFIX``); also returns the new parameters' ``{path: spec}``."""
    backbone = dit_conv.abstract_targets(bcfg)
    new = {k[4:]: v for k, v in targets.items() if k.startswith("dit/") and k[4:] not in backbone}
    pt, ph, pw = cfg.dit.patch
    plan = []
    for prefix, params in ((BACKBONE_PREFIX, backbone), (INIT_PREFIX, new)):
        for path, spec in params.items():
            if path.startswith("blocks/"):
                plan += [Assign(f"dit/{path}", (f"{prefix}{path}[{i}]",), index=i) for i in range(spec.shape[0])]
            elif prefix == BACKBONE_PREFIX and path == "patch_embedding/kernel":
                plan.append(Assign(f"dit/{path}", (prefix + path,),
                                   lambda k: widen_patch_kernel(k, pt * ph * pw, cfg.dit.in_dim)))
            else:
                plan.append(Assign(f"dit/{path}", (prefix + path,)))
    return plan, new


def check_pose_config(pose, want, src: TensorSource | None) -> None:
    """The pose modules of ``--pose`` have the preset's sizes (hidden, out_dim, ref_dim, in_channels)."""
    from wanjax.models.pose import PoseConfig

    if src is None:
        got = PoseConfig.from_dict(json.loads((Path(pose) / "config.json").read_text()))
    else:
        got = pose_conv.infer_pose_config(pose_conv.normalize_source(src))
    diff = [f"{f}={getattr(got, f)} (preset needs {getattr(want, f)})"
            for f in ("hidden", "out_dim", "ref_dim", "in_channels") if getattr(got, f) != getattr(want, f)]
    if diff:
        raise ConversionError(f"--pose {pose}: its pose modules do not fit the preset: " + "; ".join(diff)
                              + ". Pass the UniAnimate-Wan2.1-14B file (or its converters.pose output)")


def convert_student(backbone, pose, out_dir, *, preset: str = "student_1_3b_pose", dtype: str = "auto",
                    seed: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    from wanjax.models import unianimate as ua

    pcfg = ua.get_config(preset)
    if not pcfg.dit.i2v or pcfg.pose.proj_dim is None:
        raise ConversionError(f"preset {preset!r} is not a pose student (needs an I2V-widened DiT and pose_proj)")
    bcfg = backbone_config(backbone, pcfg.dit, preset)
    dtype = bcfg.param_dtype if dtype == "auto" else dtype
    _, dcfg = ua_conv.resolve_dit_config(None, None, preset, dtype)
    cfg = ua_conv.pose_dit_config(dcfg, pcfg.pose)
    ua_src = None if ua_conv.is_wanjax_dir(pose, "pose_conditioner") else common.open_tensor_source(pose)
    check_pose_config(pose, cfg.pose, ua_src)

    targets = ua_conv.abstract_targets(cfg)
    plan, new = student_plan(bcfg, cfg, targets)
    bsrc, _ = common.open_orbax_source(backbone, per_layer=lambda p: p.startswith("blocks/"))
    want = (pcfg.dit.patch[0] * pcfg.dit.patch[1] * pcfg.dit.patch[2] * bcfg.in_dim, bcfg.dim)
    if "patch_embedding/kernel" in bsrc and bsrc.shape("patch_embedding/kernel") != want:
        raise ConversionError(f"--backbone {backbone}: patch_embedding/kernel has shape "
                              f"{bsrc.shape('patch_embedding/kernel')}, the student widens {want}")
    psrc, pplan, ignore, _ = ua_conv.pose_source_plan(pose, cfg.pose, strict=True, src=ua_src)
    src = ua_conv.combine([(BACKBONE_PREFIX, bsrc), (INIT_PREFIX, init_source(cfg, new, seed)), ("", psrc)],
                          f"{backbone} + {pose}")
    config = {"model": "pose_dit", **cfg.to_dict(),
              "converted_from": {"backbone": str(backbone), "pose": str(pose), "converter": "converters.student",
                                 "preset": preset, "image_branch_init": f"PoseDiT nnx.Rngs({seed}), v_img zeros",
                                 "initialised": sorted(new)}}
    out = common.convert(src, plan + pplan, targets, out_dir, config, dtype=None, ignore=ignore,
                         overwrite=overwrite, progress=progress)
    log.info("wrote %s; peak RSS %.0f MiB", out, common.peak_rss_mib())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.student", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", required=True, help="wanjax DiT checkpoint dir (converters.dit, t2v_1_3b)")
    ap.add_argument("--pose", required=True, help="UniAnimate .ckpt or a wanjax pose checkpoint dir")
    ap.add_argument("--out", required=True, help="output directory (config.json + params/)")
    ap.add_argument("--preset", default="student_1_3b_pose", help="PoseDiT student preset")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="DiT storage dtype (auto: the backbone's); the pose modules stay float32")
    ap.add_argument("--seed", type=int, default=0, help="nnx.Rngs seed of the new image-branch parameters")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    return common.run_measured(lambda: convert_student(args.backbone, args.pose, args.out, preset=args.preset,
                                                       dtype=args.dtype, seed=args.seed, overwrite=args.overwrite),
                               errors=(ValueError,))  # ConversionError and bad presets / configs


if __name__ == "__main__":
    sys.exit(main())
