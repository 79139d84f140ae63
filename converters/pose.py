"""UniAnimate-DiT pose modules -> wanjax ``PoseConditioner`` (``config.json`` + Orbax ``params/``).

Usage::

    python -m converters.pose --src UniAnimate-Wan2.1-14B-Lora-12000.ckpt --out ckpt/pose \
        [--proj-dim 1536] [--overwrite]

Source keys (unianimate_dit.md section 7.2)::

    dwpose_embedding.{0,2,4,6,8,10,12}.{weight,bias}      Conv3d [O, I, kt, kh, kw] -> kernel [kt, kh, kw, I, O]
    randomref_embedding_pose.{0,2,...,10}.{weight,bias}   Conv2d [O, I, kh, kw]     -> kernel [kh, kw, I, O]
    pose_proj.{weight,bias}                               Linear [proj, out]        -> kernel [out, proj]

The LoRA tensors of the same file (``*.lora_A.*`` / ``*.lora_B.*``) are skipped explicitly; any other
unknown key is an error. With ``--proj-dim`` and no ``pose_proj.*`` in the source (the released UA
file has none) ``pose_proj`` is written as zeros, so that a student starts unchanged (spec 12.2).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from converters.common import (Assign, ConversionError, TensorSource, conv_t, convert, abstract_params,
                               linear_t, open_tensor_source, strip_wrappers)

log = logging.getLogger("wanjax.convert.pose")

POSE3D = "dwpose_embedding"
REF2D = "randomref_embedding_pose"
PROJ = "pose_proj"
POSE3D_IDX = (0, 2, 4, 6, 8, 10, 12)
REF2D_IDX = (0, 2, 4, 6, 8, 10)
# LoRA tensors stored next to the pose modules in the UA checkpoint.
LORA_IGNORE = (r".*\.lora_[AB]\..*",)
_PREFIXES = ("module.", "model.")


def _join(prefix: str, path: str) -> str:
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + path


def pose_plan(src: TensorSource, cfg, prefix: str = "", *, src_prefix: str = "") -> list[Assign]:
    """Assigns for a :class:`wanjax.models.pose.PoseConditioner` (``cfg``: its ``PoseConfig``).

    Target paths are ``prefix`` + ``dwpose_embedding/{i}/{kernel,bias}`` etc., so the plan can be
    embedded into a bigger model's plan (``prefix="pose"`` gives ``pose/dwpose_embedding/0/kernel``).
    Source keys are ``src_prefix`` + the UA names. ``pose_proj`` is included iff ``cfg.proj_dim``.
    """
    del src  # the plan does not depend on the source; shapes are checked by check_plan/materialize
    plan: list[Assign] = []
    for mod, idx in ((POSE3D, POSE3D_IDX), (REF2D, REF2D_IDX)):
        for i in idx:
            plan.append(Assign(_join(prefix, f"{mod}/{i}/kernel"), (f"{src_prefix}{mod}.{i}.weight",), conv_t))
            plan.append(Assign(_join(prefix, f"{mod}/{i}/bias"), (f"{src_prefix}{mod}.{i}.bias",)))
    if cfg.proj_dim is not None:
        plan.append(Assign(_join(prefix, f"{PROJ}/kernel"), (f"{src_prefix}{PROJ}.weight",), linear_t))
        plan.append(Assign(_join(prefix, f"{PROJ}/bias"), (f"{src_prefix}{PROJ}.bias",)))
    return plan


def pose_targets(cfg, prefix: str = "") -> dict:
    """``{path: ShapeDtypeStruct}`` of the ``PoseConditioner`` parameters (built abstractly)."""
    from wanjax.models.pose import PoseConditioner

    return {_join(prefix, k): v for k, v in abstract_params(PoseConditioner, cfg).items()}


def normalize_source(src: TensorSource) -> TensorSource:
    """Strip FSDP/compile wrapper tokens and a leading ``module.``/``model.``."""
    return src.renamed(lambda k: strip_wrappers(k, _PREFIXES))


def infer_pose_config(src: TensorSource, proj_dim: int | None = None):
    """``PoseConfig`` from the tensor shapes of a UA checkpoint (hidden, out_dim, ref_dim, in_channels)."""
    from wanjax.models.pose import PoseConfig

    need = [f"{POSE3D}.0.weight", f"{POSE3D}.12.weight", f"{REF2D}.10.weight"]
    missing = [k for k in need if k not in src]
    if missing:
        pose_keys = [k for k in src.keys() if POSE3D in k or REF2D in k][:5]
        raise ConversionError(
            f"{src.description}: not a UniAnimate-DiT pose checkpoint, missing key(s) {missing} "
            f"(pose-like keys found: {pose_keys or 'none'}); pass the UniAnimate-Wan2.1-14B-Lora-*.ckpt file")
    hidden, cin = src.shape(need[0])[:2]
    out_dim = src.shape(need[1])[0]
    ref_dim = src.shape(need[2])[0]
    if proj_dim is None and f"{PROJ}.weight" in src:
        proj_dim = src.shape(f"{PROJ}.weight")[0]
    return PoseConfig(hidden=hidden, out_dim=out_dim, ref_dim=ref_dim, in_channels=cin, proj_dim=proj_dim)


def with_zero_proj(src: TensorSource, cfg) -> TensorSource:
    """``src`` plus zero ``pose_proj.{weight,bias}`` when ``cfg.proj_dim`` is set and they are absent."""
    if cfg.proj_dim is None or f"{PROJ}.weight" in src:
        return src
    if f"{PROJ}.bias" in src:
        raise ConversionError(f"{src.description}: has {PROJ}.bias but no {PROJ}.weight")
    log.info("no %s.* in %s: initialising pose_proj [%d -> %d] with zeros", PROJ, src.description,
             cfg.out_dim, cfg.proj_dim)
    out = src.renamed(lambda k: k)
    w_shape, b_shape = (cfg.proj_dim, cfg.out_dim), (cfg.proj_dim,)
    out._add(f"{PROJ}.weight", lambda: np.zeros(w_shape, np.float32), w_shape, "<zero init>")
    out._add(f"{PROJ}.bias", lambda: np.zeros(b_shape, np.float32), b_shape, "<zero init>")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.pose", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="UniAnimate-DiT .ckpt (pose modules + LoRA) or safetensors")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--proj-dim", type=int, default=None,
                    help="add a pose_proj Linear out_dim -> N (1536 for the 1.3B student); zeros unless "
                         "the source has pose_proj.*")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        src = normalize_source(open_tensor_source(args.src))
        cfg = infer_pose_config(src, args.proj_dim)
        src = with_zero_proj(src, cfg)
        plan = pose_plan(src, cfg)
        n_lora = sum(1 for k in src.keys() if ".lora_A." in k or ".lora_B." in k)
        log.info("%s: %d pose tensors, skipping %d LoRA tensors", args.src, len(plan), n_lora)
        config = {"model": "pose_conditioner", **cfg.to_dict(),
                  "provenance": {"source": str(Path(args.src).absolute()), "converter": "converters.pose"}}
        out = convert(src, plan, pose_targets(cfg), args.out, config, dtype=np.float32,
                      ignore=LORA_IGNORE, overwrite=args.overwrite, progress=False)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
