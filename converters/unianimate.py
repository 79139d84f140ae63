"""Assemble a wanjax PoseDiT checkpoint from a DiT backbone and separately stored pose modules.

    python -m converters.unianimate --base DIT_SRC --pose POSE_SRC --out DIR \
        [--preset auto|NAME] [--dtype bfloat16|float32] [--strict] [--overwrite]

``DIT_SRC`` is any source ``converters.dit`` reads (Wan-native safetensors, diffusers, Self-Forcing
``.pt``, plain ``.pth``). ``POSE_SRC`` is either UniAnimate's ``.ckpt`` (``dwpose_embedding.*``,
``randomref_embedding_pose.*``; its LoRA tensors are *not* applied here -- use
``converters.merge_lora`` for the UA teacher) or a wanjax pose checkpoint directory written by
``converters.pose`` (``config.json`` with ``"model": "pose_conditioner"`` + Orbax ``params/``).

The output is ``config.json`` (``{"model": "pose_dit", "dit": ..., "pose": ..., provenance}``) +
Orbax ``params/`` with targets ``dit/...`` and ``pose/...``; load it with
``wanjax.checkpoint.load_model(dir, wanjax.models.unianimate.build_pose_dit)``.

Key checks. The backbone is converted strictly (every key used, every parameter filled). For the pose
modules, unexpected keys are always an error; *missing* keys are an error with ``--strict`` and
otherwise keep a documented initialisation, listed in a warning: ``PoseConditioner``'s init with
``nnx.Rngs(0)`` (PyTorch-default U(+-1/sqrt(fan_in)) for the convs) and zeros for ``pose_proj`` (so a
student with a fresh projection starts with zero pose tokens, spec 12.2). A ``pose_proj`` absent from a
UA file (which never has one), or from a pose directory converted without ``--proj-dim``, is the
documented zero init, not a "missing" key.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from converters import common
from converters import dit as dit_conv
from converters import pose as pose_conv
from converters.common import Assign, ConversionError, TensorSource

log = logging.getLogger("wanjax.convert.unianimate")

POSE_SRC_PREFIX = "pose::"   # namespace of the pose tensors inside the combined source
INIT_SRC_PREFIX = "init::"   # documented initialisation of pose parameters missing from the source


# --------------------------------------------------------------------------------------------
# helpers shared with converters.merge_lora
# --------------------------------------------------------------------------------------------
def combine(parts: list[tuple[str, TensorSource]], description: str) -> TensorSource:
    """One lazy source holding every key of ``parts``, each prefixed with its namespace."""
    out = TensorSource()
    out.description = description
    for prefix, src in parts:
        for k in src.keys():
            out._add(prefix + k, (lambda s=src, k=k: s.get(k)), src.shape(k), src.where(k))
    return out


def abstract_targets(cfg) -> dict:
    """``{path: ShapeDtypeStruct}`` of a PoseDiT (``dit/...`` then ``pose/...``), built abstractly."""
    out = dict(dit_conv.abstract_targets(cfg.dit, prefix="dit/"))
    out.update(pose_conv.pose_targets(cfg.pose, prefix="pose/"))
    return out


def is_wanjax_dir(path, model: str) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").exists() and (p / "params").exists()):
        return False
    try:
        return json.loads((p / "config.json").read_text()).get("model") == model
    except json.JSONDecodeError:
        return False


def orbax_source(path) -> tuple[TensorSource, dict]:
    """A wanjax checkpoint dir as a lazy TensorSource keyed by ``/``-joined param paths, and its config.json."""
    return common.open_orbax_source(path)


def resolve_dit_config(base_src, cfg_json, preset: str, dtype: str):
    """(PoseDiTConfig or None, dit config) from a preset name or the base shapes."""
    from wanjax.models import unianimate as ua

    if preset == "auto":
        return None, dit_conv.resolve_config(base_src, cfg_json, "auto", dtype)
    pcfg = ua.get_config(preset)
    d = pcfg.dit
    return pcfg, d.replace(param_dtype=dtype, dtype="bfloat16" if dtype == "bfloat16" else d.dtype)


def pose_dit_config(dcfg, pose_cfg):
    from wanjax.models.unianimate import PoseDiTConfig

    try:
        return PoseDiTConfig(dit=dcfg, pose=pose_cfg)
    except ValueError as e:
        raise ConversionError(f"the pose modules do not fit the DiT: {e}; pass --preset NAME") from None


def pose_source_plan(pose_path, cfg_pose, *, strict: bool, label: str = "--pose",
                     src: TensorSource | None = None, warn_lora: bool = True):
    """(TensorSource namespaced with POSE_SRC_PREFIX / INIT_SRC_PREFIX, plan, ignore regexes,
    missing keys) for the pose modules of ``cfg_pose`` read from ``pose_path`` (UA file or wanjax dir;
    ``src``: the already opened UA file)."""
    if src is None and is_wanjax_dir(pose_path, "pose_conditioner"):
        psrc, _ = orbax_source(pose_path)
        proj = f"{pose_conv.PROJ}/kernel"
        if cfg_pose.proj_dim is not None and proj not in psrc and f"{pose_conv.PROJ}/bias" not in psrc:
            # converted without --proj-dim: the documented zero pose_proj, as for a UA file
            shapes = {proj: (cfg_pose.out_dim, cfg_pose.proj_dim), f"{pose_conv.PROJ}/bias": (cfg_pose.proj_dim,)}
            for k, shp in shapes.items():
                psrc._add(k, (lambda shp=shp: np.zeros(shp, np.float32)), shp, "<zero init>")
        plan = [Assign(f"pose/{k}", (POSE_SRC_PREFIX + k,)) for k in pose_conv.pose_targets(cfg_pose)]
        ignore: tuple[str, ...] = ()
    else:
        psrc = pose_conv.normalize_source(src if src is not None else common.open_tensor_source(pose_path))
        psrc = pose_conv.with_zero_proj(psrc, cfg_pose)
        plan = pose_conv.pose_plan(psrc, cfg_pose, prefix="pose/", src_prefix=POSE_SRC_PREFIX)
        ignore = tuple(POSE_SRC_PREFIX + r for r in pose_conv.LORA_IGNORE)
        n_lora = sum(1 for k in psrc.keys() if ".lora_A." in k or ".lora_B." in k)
        if n_lora and warn_lora:
            log.warning("%s: %d LoRA tensors are NOT applied by this converter (use converters.merge_lora)",
                        pose_path, n_lora)
    missing = [s for a in plan for s in a.sources if s[len(POSE_SRC_PREFIX):] not in psrc]
    parts = [(POSE_SRC_PREFIX, psrc)]
    if missing:
        names = [s[len(POSE_SRC_PREFIX):] for s in missing]
        if strict:
            raise ConversionError(f"{label} {pose_path}: missing pose key(s) {names} (--strict); pass the "
                                  f"complete pose checkpoint or drop --strict to keep the documented init")
        log.warning("%s %s: %d pose key(s) missing, keeping the documented init (PoseConditioner init "
                    "with nnx.Rngs(0), pose_proj zeros) for: %s", label, pose_path, len(names), ", ".join(names))
        init_targets = [a.target for a in plan if any(s in missing for s in a.sources)]
        parts.append((INIT_SRC_PREFIX, _init_source(cfg_pose, init_targets)))
        plan = [Assign(a.target, (INIT_SRC_PREFIX + a.target,)) if a.target in init_targets else a for a in plan]
    return combine(parts, str(pose_path)), plan, ignore, missing


def _init_source(cfg_pose, targets) -> TensorSource:
    """The documented init of a PoseConditioner for ``targets`` (``pose/...`` paths)."""
    import jax
    from flax import nnx

    from wanjax.models.pose import PoseConditioner

    cond = PoseConditioner(cfg_pose, rngs=nnx.Rngs(0))  # eager: fewer compilations than the jitted init
    flat = common.flatten_params(nnx.to_pure_dict(nnx.state(cond, nnx.Param)))
    src = TensorSource()
    src.description = "<PoseConditioner init, nnx.Rngs(0)>"
    for k, v in flat.items():
        if f"pose/{k}" not in targets:
            continue
        arr = np.asarray(jax.device_get(v), np.float32)
        if k.startswith(pose_conv.PROJ + "/"):
            arr = np.zeros_like(arr)
        src._add(f"pose/{k}", (lambda a=arr: a), arr.shape, src.description)
    return src


# --------------------------------------------------------------------------------------------
# lazy pose weights
# --------------------------------------------------------------------------------------------
def convert_unianimate(base, pose, out_dir, *, preset: str = "auto", dtype: str = "bfloat16",
                       strict: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    t0 = time.time()
    base_src, cfg_json = dit_conv.load_source(base)
    pcfg, dcfg = resolve_dit_config(base_src, cfg_json, preset, dtype)
    if pcfg is not None:
        pose_cfg = pcfg.pose
    elif is_wanjax_dir(pose, "pose_conditioner"):
        from wanjax.models.pose import PoseConfig
        pose_cfg = PoseConfig.from_dict(json.loads((Path(pose) / "config.json").read_text()))
    else:
        pose_cfg = pose_conv.infer_pose_config(pose_conv.normalize_source(common.open_tensor_source(pose)))
    cfg = pose_dit_config(dcfg, pose_cfg)
    psrc, pplan, ignore, missing = pose_source_plan(pose, cfg.pose, strict=strict)
    src = combine([("", base_src), ("", psrc)], f"{base} + {pose}")
    plan = dit_conv.dit_plan(base_src, cfg.dit, prefix="dit/") + pplan
    config = {"model": "pose_dit", **cfg.to_dict(),
              "converted_from": {"base": str(base), "pose": str(pose), "converter": "converters.unianimate",
                                 "pose_keys_initialised": [m[len(POSE_SRC_PREFIX):] for m in missing]}}
    out = common.convert(src, plan, abstract_targets(cfg), out_dir, config, dtype=None, ignore=ignore,
                         overwrite=overwrite, progress=progress)
    log.info("wrote %s in %.1f s; peak RSS %.0f MiB", out, time.time() - t0, common.peak_rss_mib())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.unianimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="DiT checkpoint (any converters.dit source)")
    ap.add_argument("--pose", required=True, help="UniAnimate .ckpt or a wanjax pose checkpoint dir")
    ap.add_argument("--out", required=True, help="output directory (config.json + params/)")
    ap.add_argument("--preset", default="auto", help="auto (from the shapes) or a PoseDiT preset name")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="DiT storage dtype (the pose modules stay float32)")
    ap.add_argument("--strict", action="store_true", help="fail on any missing pose key")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        convert_unianimate(args.base, args.pose, args.out, preset=args.preset, dtype=args.dtype,
                           strict=args.strict, overwrite=args.overwrite)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
