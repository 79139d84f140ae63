"""Merge UniAnimate-DiT's LoRA into a Wan DiT and add its pose modules: a wanjax PoseDiT checkpoint.

    python -m converters.merge_lora --base PATH --lora PATH --out DIR [--alpha 1.0] \
        [--dtype float32|bfloat16] [--device cpu] [--preset auto|NAME] [--overwrite]

``--base``: the Wan2.1-I2V-14B DiT (any source ``converters.dit`` reads). ``--lora``: UniAnimate's
``UniAnimate-Wan2.1-14B-Lora-*.ckpt`` (spec unianimate_dit.md 7.2): ``pipe.dit.blocks.N.<module>.
lora_{A,B}.default.weight`` (A [r, in], B [out, r]; the rank is read from the shapes) plus
``dwpose_embedding.*`` / ``randomref_embedding_pose.*``.

Merge rule (spec 7.3, UA ``load_lora_v2``): ``W' = W + alpha * (B @ A)``, ``alpha`` = ``--alpha`` (UA's
``lora_alpha`` argument, 1.0), with no PEFT ``alpha/r`` factor (UA trained with alpha = r; for an
adapter trained with alpha != r pass ``--alpha alpha/r``). The sum is computed in float32 and cast
once to ``--dtype`` (UA adds in bf16). Every LoRA target must exist in the base (error otherwise);
every base tensor is used; the pose keys must all be present (``pose_proj`` of a student preset is
zero-initialised, spec 12.2).

Memory: the base is read lazily (safetensors mmap / ``torch.load(mmap=True)``), the merge runs inside
the per-tensor plan function (one ``W``, ``A``, ``B`` at a time) and the outputs are disk-backed
buffers, so peak host memory is about one 14B tensor plus Orbax's write buffers, never the model.
``--device`` picks where ``B @ A`` runs: ``cpu`` (numpy) or a JAX platform (``gpu``/``cuda``/``tpu``).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from converters import common
from converters import dit as dit_conv
from converters import pose as pose_conv
from converters import unianimate as ua_conv
from converters.common import Assign, ConversionError, TensorSource

log = logging.getLogger("wanjax.convert.merge_lora")

_POSE_KEY = re.compile(r"(^|\.)(dwpose_embedding|randomref_embedding_pose|pose_proj)\.")


def read_lora(src: TensorSource) -> tuple[dict[str, tuple[str, str]], int]:
    """``{Wan module: (A key, B key)}`` and the rank, from a (pose-normalised) UA LoRA source. Keys that
    are neither LoRA nor pose weights are an error naming them."""
    from wanjax.lora import parse_lora_key

    a_, b_, other = {}, {}, []
    for k in src.keys():
        p = parse_lora_key(k)
        if p is not None:
            (a_ if p[1] == "A" else b_)[p[0]] = k
        elif not _POSE_KEY.search(k):
            other.append(k)
    if other:
        raise ConversionError(f"{src.description}: keys that are neither LoRA (…lora_A/lora_B…) nor pose "
                              f"modules: {other[:10]}{' …' if len(other) > 10 else ''}")
    unpaired = sorted(set(a_) ^ set(b_))
    if unpaired:
        raise ConversionError(f"{src.description}: LoRA modules with only one of lora_A / lora_B: {unpaired[:10]}")
    if not a_:
        raise ConversionError(f"{src.description}: no LoRA tensors (…lora_A.default.weight) found")
    ranks = {}
    for m in a_:
        ra, rb = src.shape(a_[m])[0], src.shape(b_[m])[-1]
        if ra != rb or len(src.shape(a_[m])) != 2 or len(src.shape(b_[m])) != 2:
            raise ConversionError(f"{src.description}: LoRA {m}: A {src.shape(a_[m])} and B {src.shape(b_[m])} "
                                  f"are not [r, in] / [out, r]")
        ranks.setdefault(ra, m)
    if len(ranks) > 1:
        raise ConversionError(f"{src.description}: mixed LoRA ranks {sorted(ranks)} (e.g. {list(ranks.values())[:2]})")
    return {m: (a_[m], b_[m]) for m in sorted(a_)}, next(iter(ranks))


def _matmul(device: str):
    if device == "cpu":
        return lambda b, a: b @ a
    import jax
    import jax.numpy as jnp

    try:
        dev = jax.devices(device)[0]
    except RuntimeError as e:
        raise ConversionError(f"--device {device}: no such JAX device ({e}); use --device cpu") from None

    def mm(b, a):
        out = jnp.matmul(jax.device_put(b, dev), jax.device_put(a, dev), precision=jax.lax.Precision.HIGHEST)
        return np.asarray(jax.device_get(out), np.float32)
    return mm


def merge_fn(module: str, alpha: float, matmul):
    """Plan function: (W [out, in], A [r, in], B [out, r]) -> merged kernel [in, out] (float32)."""
    s = np.float32(alpha)

    def fn(w, a, b):
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise ConversionError(f"LoRA {module}: A {a.shape} / B {b.shape} do not fit the base weight "
                                  f"{module}.weight {w.shape} (need A [r, {w.shape[1]}], B [{w.shape[0]}, r])")
        d = matmul(b.astype(np.float32), a.astype(np.float32))
        return (w.astype(np.float32) + s * d).T
    return fn


def merge_plan(base_src: TensorSource, cfg_dit, lora: dict[str, tuple[str, str]], alpha: float,
               device: str = "cpu", lora_prefix: str = ua_conv.POSE_SRC_PREFIX) -> list[Assign]:
    """``dit_plan(prefix="dit/")`` with each adapted kernel's Assign reading (W, A, B) and merging."""
    from wanjax.lora import LoRAError, split_module

    plan = dit_conv.dit_plan(base_src, cfg_dit, prefix="dit/")
    by_target = {}
    for m in lora:
        try:
            layer, grp, lin = split_module(m)
        except LoRAError as e:
            raise ConversionError(str(e)) from None
        if f"{m}.weight" not in base_src:
            raise ConversionError(f"LoRA target {m} does not exist in the base model {base_src.description} "
                                  f"(no {m}.weight); wrong --base?")
        by_target[(f"dit/blocks/{grp}/{lin}/kernel", layer)] = m
    mm = _matmul(device)
    out, used = [], set()
    for a in plan:
        m = by_target.get((a.target, a.index))
        if m is None:
            out.append(a)
            continue
        ka, kb = lora[m]
        out.append(Assign(a.target, (a.sources[0], lora_prefix + ka, lora_prefix + kb), merge_fn(m, alpha, mm),
                          a.index))
        used.add(m)
    unused = sorted(set(lora) - used)
    if unused:
        raise ConversionError(f"LoRA targets {unused[:10]} exist in the base file but not in the model "
                              f"preset (i2v={cfg_dit.i2v}, layers={cfg_dit.num_layers}); check --preset")
    return out


def merge_lora(base, lora_path, out_dir, *, alpha: float = 1.0, dtype: str = "float32", device: str = "cpu",
               preset: str = "auto", overwrite: bool = False, progress: bool = True) -> Path:
    t0 = time.time()
    base_src, cfg_json = dit_conv.load_source(base)
    lsrc = pose_conv.normalize_source(common.open_tensor_source(lora_path))
    lora, rank = read_lora(lsrc)
    pcfg, dcfg = ua_conv.resolve_dit_config(base_src, cfg_json, preset, dtype)
    pose_cfg = pcfg.pose if pcfg is not None else pose_conv.infer_pose_config(lsrc)
    cfg = ua_conv.pose_dit_config(dcfg, pose_cfg)
    psrc, pplan, _, _ = ua_conv.pose_source_plan(lora_path, cfg.pose, strict=True, label="--lora",
                                                      src=lsrc, warn_lora=False)
    plan = merge_plan(base_src, cfg.dit, lora, alpha, device) + pplan
    src = ua_conv.combine([("", base_src), ("", psrc)], f"{base} + {lora_path}")
    log.info("%s: %d LoRA modules, rank %d, alpha %g; %d pose tensors", lora_path, len(lora), rank, alpha,
             len(pplan))
    config = {"model": "pose_dit", **cfg.to_dict(),
              "lora": {"path": str(lora_path), "rank": rank, "alpha": alpha, "modules": len(lora),
                       "rule": "W + alpha * (B @ A), float32, no alpha/r factor"},
              "converted_from": {"base": str(base), "converter": "converters.merge_lora"}}
    out = common.convert(src, plan, ua_conv.abstract_targets(cfg), out_dir, config, dtype=None,
                         ignore=(), overwrite=overwrite, progress=progress)
    log.info("wrote %s in %.1f s; peak RSS %.0f MiB", out, time.time() - t0, common.peak_rss_mib())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.merge_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="Wan DiT checkpoint (any converters.dit source)")
    ap.add_argument("--lora", required=True, help="UniAnimate LoRA + pose .ckpt")
    ap.add_argument("--out", required=True, help="output directory (config.json + params/)")
    ap.add_argument("--alpha", type=float, default=1.0, help="UA's lora_alpha merge factor (W + alpha*B@A)")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                    help="DiT storage dtype (the pose modules stay float32)")
    ap.add_argument("--device", default="cpu", help="where B@A runs: cpu (numpy) or a JAX platform (gpu, tpu)")
    ap.add_argument("--preset", default="auto", help="auto (from the shapes) or a PoseDiT preset name")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        merge_lora(args.base, args.lora, args.out, alpha=args.alpha, dtype=args.dtype, device=args.device,
                   preset=args.preset, overwrite=args.overwrite)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"peak RSS {common.peak_rss_mib():.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
