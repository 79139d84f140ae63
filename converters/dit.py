"""Convert Wan2.1 DiT checkpoints (PyTorch) to a wanjax Orbax checkpoint.

    python -m converters.dit --src PATH --out DIR [--dtype bfloat16|float32] [--preset auto|NAME]

Accepted sources (detected from the keys, not the file name):
- Wan-native ``diffusion_pytorch_model*.safetensors`` (single file or sharded with its
  ``*.index.json``; the directory's ``config.json`` supplies the architecture);
- the diffusers ``WanTransformer3DModel`` layout (``attn1.to_q``, ``scale_shift_table``, ...);
- a Self-Forcing ``.pt`` (``generator_ema`` preferred, else ``generator``; the ``model.``,
  ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.`` and ``_orig_mod.`` wrappers are stripped);
- a plain ``.pth`` state dict (optionally ``model.diffusion_model.``-prefixed).

Pickles are read with ``torch.load(weights_only=True)``; the conversion is strict and atomic.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from converters import common
from converters.common import Assign, ConversionError, conv_t, linear_t

log = logging.getLogger("wanjax.convert.dit")

# diffusers -> Wan-native renames (inverse of convert_wan_transformer_to_diffusers)
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
    (r"^blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
    (r"^blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_q\.", r"blocks.\1.self_attn.norm_q."),
    (r"^blocks\.(\d+)\.attn1\.norm_k\.", r"blocks.\1.self_attn.norm_k."),
    (r"^blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
    (r"^blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
    (r"^blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_q\.", r"blocks.\1.cross_attn.norm_q."),
    (r"^blocks\.(\d+)\.attn2\.norm_k\.", r"blocks.\1.cross_attn.norm_k."),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj\.", r"blocks.\1.cross_attn.k_img."),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj\.", r"blocks.\1.cross_attn.v_img."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]

_PREFIXES = ("model.diffusion_model.", "model.", "pipe.dit.", "dit.")


def detect_layout(keys) -> str:
    ks = set(keys)
    if any(re.match(r"^blocks\.\d+\.attn1\.to_q\.weight$", k) for k in ks):
        return "diffusers"
    if any(re.match(r"^blocks\.\d+\.self_attn\.q\.weight$", k) for k in ks):
        return "wan"
    raise ConversionError("cannot recognise the DiT layout: expected Wan-native keys "
                          "(blocks.N.self_attn.q.weight) or diffusers keys (blocks.N.attn1.to_q.weight); "
                          f"first keys found: {sorted(ks)[:5]}")


def to_wan_names(src: common.TensorSource) -> common.TensorSource:
    """Strip wrapper prefixes and rename diffusers keys to Wan-native names."""
    src = src.renamed(lambda k: common.strip_wrappers(k, _PREFIXES))
    if detect_layout(src.keys()) == "diffusers":
        def ren(k):
            for pat, rep in _DIFFUSERS_TO_WAN:
                if re.search(pat, k):
                    return re.sub(pat, rep, k)
            return k
        src = src.renamed(ren)
    return src


def infer_config(src: common.TensorSource, config_json: dict | None = None):
    """Architecture from shapes (and config.json where present)."""
    from wanjax.models.dit import WanDiTConfig

    D, cin = src.shape("patch_embedding.weight")[:2]
    layers = 1 + max(int(m.group(1)) for k in src.keys() if (m := re.match(r"^blocks\.(\d+)\.", k)))
    ffn = src.shape("blocks.0.ffn.0.weight")[0]
    text_dim = src.shape("text_embedding.0.weight")[1]
    freq_dim = src.shape("time_embedding.0.weight")[1]
    out_dim = src.shape("head.head.weight")[0] // 4
    i2v = "blocks.0.cross_attn.k_img.weight" in src
    heads = None
    if config_json:
        heads = config_json.get("num_heads") or config_json.get("num_attention_heads")
    if heads is None:
        if D % 128:
            raise ConversionError(f"cannot infer num_heads for dim {D} (not a multiple of head_dim 128); "
                                  f"pass --preset or a config.json")
        heads = D // 128
    return WanDiTConfig(dim=D, ffn_dim=ffn, num_heads=int(heads), num_layers=layers, in_dim=cin,
                        out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim, i2v=i2v)


def _patch_kernel(w: np.ndarray) -> np.ndarray:
    """Conv3d [D, C, pt, ph, pw] -> matmul kernel [(pt, ph, pw, C), D]."""
    k = conv_t(w)  # [pt, ph, pw, C, D]
    return k.reshape(-1, k.shape[-1])


def dit_plan(src: common.TensorSource, cfg, prefix: str = "") -> list[Assign]:
    """Assignments from Wan-native key names to WanDiT parameter paths."""
    P = prefix
    plan = [
        Assign(f"{P}patch_embedding/kernel", ("patch_embedding.weight",), _patch_kernel),
        Assign(f"{P}patch_embedding/bias", ("patch_embedding.bias",)),
        Assign(f"{P}head/modulation", ("head.modulation",), lambda w: w.reshape(2, -1)),
        Assign(f"{P}head/head/kernel", ("head.head.weight",), linear_t),
        Assign(f"{P}head/head/bias", ("head.head.bias",)),
        Assign(f"{P}time_projection/kernel", ("time_projection.1.weight",), linear_t),
        Assign(f"{P}time_projection/bias", ("time_projection.1.bias",)),
    ]
    for name, tgt in (("text_embedding", "text_embedding"), ("time_embedding", "time_embedding")):
        for i, fc in ((0, "fc1"), (2, "fc2")):
            plan += [Assign(f"{P}{tgt}/{fc}/kernel", (f"{name}.{i}.weight",), linear_t),
                     Assign(f"{P}{tgt}/{fc}/bias", (f"{name}.{i}.bias",))]
    if cfg.i2v:
        for i, t in ((0, "norm_in"), (4, "norm_out")):
            plan += [Assign(f"{P}img_emb/{t}/weight", (f"img_emb.proj.{i}.weight",)),
                     Assign(f"{P}img_emb/{t}/bias", (f"img_emb.proj.{i}.bias",))]
        for i, t in ((1, "fc1"), (3, "fc2")):
            plan += [Assign(f"{P}img_emb/{t}/kernel", (f"img_emb.proj.{i}.weight",), linear_t),
                     Assign(f"{P}img_emb/{t}/bias", (f"img_emb.proj.{i}.bias",))]
    linears = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"]
    norms = ["self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k"]
    if cfg.i2v:
        linears += ["cross_attn.k_img", "cross_attn.v_img"]
        norms += ["cross_attn.norm_k_img"]
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        plan.append(Assign(f"{P}blocks/modulation", (b + "modulation",), lambda w: w.reshape(6, -1), i))
        for lin in linears:
            t = lin.replace(".", "/")
            plan += [Assign(f"{P}blocks/{t}/kernel", (b + lin + ".weight",), linear_t, i),
                     Assign(f"{P}blocks/{t}/bias", (b + lin + ".bias",), index=i)]
        for n in norms:
            plan.append(Assign(f"{P}blocks/{n.replace('.', '/')}/weight", (b + n + ".weight",), index=i))
        plan += [Assign(f"{P}blocks/norm3/weight", (b + "norm3.weight",), index=i),
                 Assign(f"{P}blocks/norm3/bias", (b + "norm3.bias",), index=i)]
        for j, fc in ((0, "fc1"), (2, "fc2")):
            plan += [Assign(f"{P}blocks/ffn/{fc}/kernel", (f"{b}ffn.{j}.weight",), linear_t, i),
                     Assign(f"{P}blocks/ffn/{fc}/bias", (f"{b}ffn.{j}.bias",), index=i)]
    return plan


def abstract_targets(cfg, prefix: str = "") -> dict:
    """{param path: ShapeDtypeStruct} of a WanDiT built abstractly."""
    from wanjax.models.dit import WanDiT

    return {prefix + k: v for k, v in common.abstract_params(WanDiT, cfg).items()}


def load_source(path) -> tuple[common.TensorSource, dict | None]:
    src = common.open_tensor_source(path)
    p = Path(path)
    cfg_json = None
    cj = (p if p.is_dir() else p.parent) / "config.json"
    if cj.exists():
        try:
            cfg_json = json.loads(cj.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cj}: invalid JSON ({e})") from None
    return to_wan_names(src), cfg_json


def resolve_config(src, cfg_json, preset: str, dtype: str):
    from wanjax.models.dit import get_config

    if preset == "auto":
        cfg = infer_config(src, cfg_json)
    else:
        cfg = get_config(preset)
    return cfg.replace(param_dtype=dtype, dtype="bfloat16" if dtype == "bfloat16" else cfg.dtype)


def convert_dit(src_path, out_dir, *, dtype: str = "bfloat16", preset: str = "auto",
                overwrite: bool = False, progress: bool = True) -> Path:
    import jax.numpy as jnp

    t0 = time.time()
    src, cfg_json = load_source(src_path)
    cfg = resolve_config(src, cfg_json, preset, dtype)
    targets = abstract_targets(cfg)
    plan = dit_plan(src, cfg)
    config = {"model": "dit", **cfg.to_dict(),
              "converted_from": {"path": str(src_path), "tensors": len(src)}}
    out = common.convert(src, plan, targets, out_dir, config, dtype=jnp.dtype(dtype),
                         overwrite=overwrite, progress=progress)
    log.info("wrote %s in %.1f s; peak RSS %.0f MiB", out, time.time() - t0, common.peak_rss_mib())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m converters.dit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="checkpoint file or directory")
    ap.add_argument("--out", required=True, help="output directory (config.json + params/)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--preset", default="auto", help="auto (from shapes/config.json) or a preset name")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    return common.run_measured(lambda: convert_dit(args.src, args.out, dtype=args.dtype, preset=args.preset,
                                                   overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
