"""CLIP ViT-H/14 image encoder checkpoint -> wanjax (``config.json`` + Orbax ``params/``).

Usage::

    python -m converters.clip --src models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth \
        --out ckpt/clip [--dtype float32|bfloat16|float16] [--preset auto|tiny|vit_h_14] [--overwrite]

Two source layouts are recognised (wan_components.md sections 5.3 and 5.4):

* Wan / open-clip (``XLMRobertaCLIP`` state dict): ``visual.patch_embedding.weight``,
  ``visual.cls_embedding``, ``visual.pos_embedding``, ``visual.pre_norm.*``,
  ``visual.transformer.{i}.{norm1,attn.to_qkv,attn.proj,norm2,mlp.0,mlp.2}.*``. The fused ``to_qkv``
  (rows q, then k, then v) is split into the model's ``q``/``k``/``v``. A state dict of the visual
  tower alone (the same keys without ``visual.``) is accepted too.
* HF ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (also a full ``CLIPModel``):
  ``vision_model.embeddings.*``, ``vision_model.pre_layrnorm.*``,
  ``vision_model.encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.*``.

Ignored on purpose, because Wan never uses them (``use_31_block=True``): the last transformer block,
``post_norm`` / ``post_layernorm``, ``head`` / ``visual_projection``, ``log_scale`` / ``logit_scale``,
and the whole text tower (``textual.*`` / ``text_model.*``, ``text_projection``). Every other key
must be used and every parameter filled, otherwise the conversion fails and writes nothing.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from converters.common import (Assign, ConversionError, TensorSource, conv_t, convert,
                               abstract_params, linear_t, open_tensor_source, strip_wrappers)

OPEN_CLIP = "open_clip"
HF = "hf"
_PREFIXES = ("module.", "image_encoder.")
_DTYPES = ("float32", "bfloat16", "float16")


def normalize_source(src: TensorSource) -> TensorSource:
    """Strip FSDP/compile wrapper tokens and a leading ``module.`` / ``image_encoder.``."""
    return src.renamed(lambda k: strip_wrappers(k, _PREFIXES))


def detect_layout(src: TensorSource) -> tuple[str, str]:
    """``(layout, prefix)``: ``("open_clip", "visual.")``, ``("open_clip", "")`` or ``("hf", "vision_model.")``."""
    keys = set(src.keys())
    if "visual.patch_embedding.weight" in keys or any(k.startswith("visual.transformer.") for k in keys):
        return OPEN_CLIP, "visual."
    if "patch_embedding.weight" in keys and any(k.startswith("transformer.") for k in keys):
        return OPEN_CLIP, ""
    if ("vision_model.embeddings.patch_embedding.weight" in keys
            or any(k.startswith("vision_model.encoder.layers.") for k in keys)):
        return HF, "vision_model."
    raise ConversionError(
        f"{src.description}: not a CLIP vision checkpoint: found neither open-clip/Wan keys "
        f"('visual.patch_embedding.weight', 'visual.transformer.0.attn.to_qkv.weight') nor HF CLIPVisionModel "
        f"keys ('vision_model.embeddings.patch_embedding.weight'); first keys: {sorted(keys)[:5]}")


def _keys(layout: str, prefix: str) -> dict[str, str | Callable[[int], str]]:
    """Source key (or key function of the block index) for every role."""
    p = prefix
    if layout == OPEN_CLIP:
        b = p + "transformer.{}."
        return {
            "patch": p + "patch_embedding.weight", "cls": p + "cls_embedding", "pos": p + "pos_embedding",
            "pre_w": p + "pre_norm.weight", "pre_b": p + "pre_norm.bias",
            "blk": lambda i: b.format(i),
            "norm1": "norm1", "norm2": "norm2", "qkv": "attn.to_qkv", "o": "attn.proj",
            "fc1": "mlp.0", "fc2": "mlp.2",
        }
    return {
        "patch": p + "embeddings.patch_embedding.weight", "cls": p + "embeddings.class_embedding",
        "pos": p + "embeddings.position_embedding.weight",
        "pre_w": p + "pre_layrnorm.weight", "pre_b": p + "pre_layrnorm.bias",
        "blk": lambda i: f"{p}encoder.layers.{i}.",
        "norm1": "layer_norm1", "norm2": "layer_norm2", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
        "v": "self_attn.v_proj", "o": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
    }


def _num_blocks(src: TensorSource, layout: str, prefix: str) -> int:
    blk = re.escape(prefix) + (r"transformer\.(\d+)\." if layout == OPEN_CLIP else r"encoder\.layers\.(\d+)\.")
    pat = re.compile(blk)
    idx = [int(m.group(1)) for k in src.keys() if (m := pat.match(k))]
    if not idx:
        raise ConversionError(f"{src.description}: no transformer blocks found (keys matching {pat.pattern})")
    return max(idx) + 1


def infer_config(src: TensorSource):
    """The ``CLIPVisionConfig`` preset whose shapes match the checkpoint.

    The head count cannot be read from tensor shapes, so ``auto`` only accepts checkpoints that
    match a preset in width, MLP width, patch size, token count and block count.
    """
    from wanjax.models.clip import PRESETS

    layout, prefix = detect_layout(src)
    m = _keys(layout, prefix)
    fc1 = m["blk"](0) + m["fc1"] + ".weight"
    need = [m["patch"], m["pos"], fc1]
    missing = [k for k in need if k not in src]
    if missing:
        raise ConversionError(f"{src.description}: cannot infer the CLIP config, missing key(s) {missing}; "
                              f"pass --preset tiny|vit_h_14")
    width, cin, ph, pw = src.shape(m["patch"])
    tokens = src.shape(m["pos"])[-2]
    grid = math.isqrt(max(tokens - 1, 0))
    found = dict(width=width, patch_size=ph, image_size=grid * ph, mlp_dim=src.shape(fc1)[0],
                 num_layers=_num_blocks(src, layout, prefix))
    for name, make in PRESETS.items():
        cfg = make()
        if all(getattr(cfg, k) == v for k, v in found.items()) and cin == 3 and ph == pw:
            return cfg
    raise ConversionError(f"{src.description}: shapes {found} (from {m['patch']} {src.shape(m['patch'])}, "
                          f"{m['pos']} {src.shape(m['pos'])}, {fc1} {src.shape(fc1)}) match no CLIP preset "
                          f"{sorted(PRESETS)}; pass --preset explicitly")


def _squeeze_lead(a: np.ndarray, ndim: int) -> np.ndarray:
    """[1, 1, D] -> [D] / [1, T, D] -> [T, D]; other shapes pass through for the shape check."""
    if a.ndim > ndim and all(s == 1 for s in a.shape[: a.ndim - ndim]):
        return a.reshape(a.shape[a.ndim - ndim:])
    return a


def _qkv_part(key: str, part: int, width: int, weight: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Rows ``[part*D, (part+1)*D)`` of a fused ``to_qkv`` weight [3D, D] (transposed) or bias [3D]."""
    def fn(a: np.ndarray) -> np.ndarray:
        want = (3 * width, width) if weight else (3 * width,)
        if tuple(a.shape) != want:
            raise ConversionError(f"{key}: fused qkv tensor has shape {tuple(a.shape)}, expected {want} "
                                  f"(rows q, k, v of width {width}); is the --preset right?")
        rows = a[part * width:(part + 1) * width]
        return linear_t(rows) if weight else rows
    return fn


def clip_plan(src: TensorSource, cfg) -> list[Assign]:
    """Assign plan from a (normalized) open-clip or HF source to the ``CLIPVisionEncoder`` tree.

    Only the ``cfg.num_layers_used`` blocks that Wan runs are read; see ``ignore_patterns``.
    """
    layout, prefix = detect_layout(src)
    m = _keys(layout, prefix)
    plan = [
        Assign("patch_embedding/kernel", (m["patch"],), conv_t),
        Assign("cls_embedding", (m["cls"],), lambda a: _squeeze_lead(a, 1)),
        Assign("pos_embedding", (m["pos"],), lambda a: _squeeze_lead(a, 2)),
        Assign("pre_norm/weight", (m["pre_w"],)),
        Assign("pre_norm/bias", (m["pre_b"],)),
    ]
    for i in range(cfg.num_layers_used):
        b = m["blk"](i)
        for role in ("norm1", "norm2"):
            plan += [Assign(f"blocks/{role}/{t}", (f"{b}{m[role]}.{t}",), index=i) for t in ("weight", "bias")]
        for role, tgt in (("o", "attn/o"), ("fc1", "mlp/fc1"), ("fc2", "mlp/fc2")):
            plan += [Assign(f"blocks/{tgt}/kernel", (f"{b}{m[role]}.weight",), linear_t, index=i),
                     Assign(f"blocks/{tgt}/bias", (f"{b}{m[role]}.bias",), index=i)]
        if layout == OPEN_CLIP:
            for j, n in enumerate("qkv"):
                wk, bk = f"{b}{m['qkv']}.weight", f"{b}{m['qkv']}.bias"
                plan += [Assign(f"blocks/attn/{n}/kernel", (wk,), _qkv_part(wk, j, cfg.width, True), index=i),
                         Assign(f"blocks/attn/{n}/bias", (bk,), _qkv_part(bk, j, cfg.width, False), index=i)]
        else:
            for n in "qkv":
                plan += [Assign(f"blocks/attn/{n}/kernel", (f"{b}{m[n]}.weight",), linear_t, index=i),
                         Assign(f"blocks/attn/{n}/bias", (f"{b}{m[n]}.bias",), index=i)]
    return plan


def ignore_patterns(src: TensorSource, cfg) -> tuple[str, ...]:
    """Regexes (full match) of the source keys that Wan never uses and the converter skips."""
    layout, prefix = detect_layout(src)
    p = re.escape(prefix)
    last = cfg.num_layers - 1
    if layout == OPEN_CLIP:
        return (rf"{p}transformer\.{last}\..*", rf"{p}post_norm\.(weight|bias)", rf"{p}head",
                r"log_scale", r"textual\..*")
    return (rf"{p}encoder\.layers\.{last}\..*", rf"{p}post_layernorm\.(weight|bias)",
            rf"{p}embeddings\.position_ids", r"visual_projection\.weight", r"text_model\..*",
            r"text_projection\.weight", r"logit_scale")


def clip_targets(cfg) -> dict:
    """``{path: ShapeDtypeStruct}`` of the ``CLIPVisionEncoder`` parameters (built abstractly)."""
    from wanjax.models.clip import CLIPVisionEncoder

    return abstract_params(CLIPVisionEncoder, cfg)


def resolve_config(src: TensorSource, preset: str):
    from wanjax.models.clip import preset as get_preset

    return infer_config(src) if preset == "auto" else get_preset(preset)


def convert_clip(src_path, out_dir, *, dtype: str = "float32", preset: str = "auto",
                 overwrite: bool = False, progress: bool = False) -> Path:
    """Convert ``src_path`` (file or shard directory) into a wanjax checkpoint at ``out_dir``."""
    import ml_dtypes

    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {_DTYPES}")
    src = normalize_source(open_tensor_source(src_path))
    cfg = resolve_config(src, preset)
    layout, _ = detect_layout(src)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    config = {**cfg.to_dict(), "model": "clip", "source": str(Path(src_path).absolute()),
              "source_layout": layout, "dtype": dtype}
    out = convert(src, clip_plan(src, cfg), clip_targets(cfg), out_dir, config, dtype=np_dtype,
                  ignore=ignore_patterns(src, cfg), overwrite=overwrite, progress=progress)
    logging.getLogger("wanjax.convert").info("wrote %s (%s layout, %s)", out, layout, cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.clip", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True,
                    help="Wan open-clip .pth, HF CLIPVisionModel .safetensors, or a shard directory")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--dtype", default="float32", choices=_DTYPES)
    ap.add_argument("--preset", default="auto", choices=("auto", "tiny", "vit_h_14"))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_clip(args.src, args.out, dtype=args.dtype, preset=args.preset, overwrite=args.overwrite,
                 progress=sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
