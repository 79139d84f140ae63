"""UMT5 encoder checkpoint -> wanjax (``config.json`` + Orbax ``params/``).

Usage::

    python -m converters.t5 --src models_t5_umt5-xxl-enc-bf16.pth --out ckpt/t5 \
        [--dtype bfloat16|float32] [--preset auto|tiny|umt5_xxl] [--overwrite]

Two source layouts are recognised (wan_components.md section 3.4):

* Wan-native (``models_t5_umt5-xxl-enc-bf16.pth``): ``token_embedding.weight``, ``blocks.{i}.norm1.weight``,
  ``blocks.{i}.attn.{q,k,v,o}.weight``, ``blocks.{i}.pos_embedding.embedding.weight``,
  ``blocks.{i}.norm2.weight``, ``blocks.{i}.ffn.gate.0.weight``, ``blocks.{i}.ffn.fc1.weight``,
  ``blocks.{i}.ffn.fc2.weight``, ``norm.weight``.
* HF ``UMT5EncoderModel``: ``shared.weight`` and/or ``encoder.embed_tokens.weight`` (both must then be
  equal), ``encoder.block.{i}.layer.0.{layer_norm,SelfAttention.{q,k,v,o,relative_attention_bias}}``,
  ``encoder.block.{i}.layer.1.{layer_norm,DenseReluDense.{wi_0,wi_1,wo}}``, ``encoder.final_layer_norm``.
  ``wi_0`` is the GELU branch (``gate``), ``wi_1`` the linear branch (``fc1``). The decoder and
  ``lm_head`` of a full seq2seq checkpoint are ignored.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from converters.common import (Assign, ConversionError, TensorSource, convert, linear_t,
                               open_tensor_source, strip_wrappers)

WAN = "wan"
HF = "hf"
# Parts of a full UMT5 seq2seq checkpoint that the encoder does not use.
HF_IGNORE = (r"decoder\..*", r"lm_head\.weight")
_PREFIXES = ("module.", "model.", "text_encoder.")


def _key_maps(layout: str) -> dict[str, Callable[[int], str] | str]:
    """Source key (or key function of the layer index) for every role of the model."""
    if layout == WAN:
        return {
            "embed": "token_embedding.weight",
            "norm1": lambda i: f"blocks.{i}.norm1.weight",
            "q": lambda i: f"blocks.{i}.attn.q.weight",
            "k": lambda i: f"blocks.{i}.attn.k.weight",
            "v": lambda i: f"blocks.{i}.attn.v.weight",
            "o": lambda i: f"blocks.{i}.attn.o.weight",
            "pos": lambda i: f"blocks.{i}.pos_embedding.embedding.weight",
            "norm2": lambda i: f"blocks.{i}.norm2.weight",
            "gate": lambda i: f"blocks.{i}.ffn.gate.0.weight",
            "fc1": lambda i: f"blocks.{i}.ffn.fc1.weight",
            "fc2": lambda i: f"blocks.{i}.ffn.fc2.weight",
            "norm": "norm.weight",
        }
    b = "encoder.block.{}.layer."
    return {
        "embed": "shared.weight",
        "norm1": lambda i: b.format(i) + "0.layer_norm.weight",
        "q": lambda i: b.format(i) + "0.SelfAttention.q.weight",
        "k": lambda i: b.format(i) + "0.SelfAttention.k.weight",
        "v": lambda i: b.format(i) + "0.SelfAttention.v.weight",
        "o": lambda i: b.format(i) + "0.SelfAttention.o.weight",
        "pos": lambda i: b.format(i) + "0.SelfAttention.relative_attention_bias.weight",
        "norm2": lambda i: b.format(i) + "1.layer_norm.weight",
        "gate": lambda i: b.format(i) + "1.DenseReluDense.wi_0.weight",
        "fc1": lambda i: b.format(i) + "1.DenseReluDense.wi_1.weight",
        "fc2": lambda i: b.format(i) + "1.DenseReluDense.wo.weight",
        "norm": "encoder.final_layer_norm.weight",
    }


def normalize_source(src: TensorSource) -> TensorSource:
    """Strip FSDP/compile wrapper tokens and a leading ``module.``/``model.``/``text_encoder.``."""
    return src.renamed(lambda k: strip_wrappers(k, _PREFIXES))


def detect_layout(src: TensorSource) -> str:
    """``"wan"`` or ``"hf"``; raises ConversionError naming the keys it looked for."""
    keys = set(src.keys())
    if "token_embedding.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return WAN
    if {"shared.weight", "encoder.embed_tokens.weight"} & keys or any(k.startswith("encoder.block.") for k in keys):
        return HF
    raise ConversionError(
        f"{src.description}: not a UMT5 encoder checkpoint: found neither Wan keys "
        f"('token_embedding.weight', 'blocks.0.attn.q.weight') nor HF UMT5EncoderModel keys "
        f"('shared.weight', 'encoder.block.0.layer.0.SelfAttention.q.weight'); first keys: {sorted(keys)[:5]}")


def _embed_key(src: TensorSource, layout: str) -> tuple[str, ...]:
    if layout == WAN:
        return ("token_embedding.weight",)
    present = tuple(k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in src)
    return present or ("shared.weight",)


def infer_config(src: TensorSource):
    """T5Config from tensor shapes (``max_distance`` and ``eps`` cannot be inferred: 128 and 1e-6)."""
    from wanjax.models.t5 import T5Config

    layout = detect_layout(src)
    m = _key_maps(layout)
    need = [_embed_key(src, layout)[0], m["q"](0), m["pos"](0), m["fc1"](0)]
    missing = [k for k in need if k not in src]
    if missing:
        raise ConversionError(f"{src.description}: cannot infer the T5 config, missing key(s) {missing}; "
                              f"pass --preset tiny|umt5_xxl")
    vocab, dim = src.shape(need[0])
    dim_attn = src.shape(need[1])[0]
    buckets, heads = src.shape(need[2])
    ffn = src.shape(need[3])[0]
    pat = re.compile(r"blocks\.(\d+)\." if layout == WAN else r"encoder\.block\.(\d+)\.")
    layers = 1 + max(int(mm.group(1)) for k in src.keys() if (mm := pat.match(k)))
    if dim_attn % heads:
        raise ConversionError(f"{src.description}: attention width {dim_attn} ({need[1]}) is not a multiple "
                              f"of the {heads} heads of {need[2]} {src.shape(need[2])}")
    return T5Config(vocab_size=vocab, dim=dim, num_heads=heads, head_dim=dim_attn // heads, ffn_dim=ffn,
                    num_layers=layers, num_buckets=buckets)


def _same(*arrays: np.ndarray) -> np.ndarray:
    """The HF state dict holds the tied embedding twice; both copies must agree."""
    for a in arrays[1:]:
        if a.shape != arrays[0].shape or not np.array_equal(a, arrays[0]):
            raise ConversionError("shared.weight and encoder.embed_tokens.weight differ; the encoder "
                                  "uses encoder.embed_tokens.weight: remove shared.weight from the file")
    return arrays[0]


def t5_plan(src: TensorSource, cfg) -> list[Assign]:
    """Assign plan from a (normalized) source in Wan or HF layout to the ``T5Encoder`` tree."""
    layout = detect_layout(src)
    m = _key_maps(layout)
    plan = [Assign("token_embedding/embedding", _embed_key(src, layout), _same),
            Assign("norm/weight", (m["norm"],))]
    for i in range(cfg.num_layers):
        plan += [
            Assign("blocks/norm1/weight", (m["norm1"](i),), index=i),
            Assign("blocks/norm2/weight", (m["norm2"](i),), index=i),
            Assign("blocks/pos_embedding", (m["pos"](i),), index=i),  # [buckets, heads], same orientation
        ]
        plan += [Assign(f"blocks/attn/{n}/kernel", (m[n](i),), linear_t, index=i) for n in "qkvo"]
        plan += [Assign(f"blocks/ffn/{n}/kernel", (m[n](i),), linear_t, index=i) for n in ("gate", "fc1", "fc2")]
    return plan


def t5_targets(cfg) -> dict:
    """``{path: ShapeDtypeStruct}`` of the ``T5Encoder`` parameters (built abstractly)."""
    from converters.common import abstract_params
    from wanjax.models.t5 import T5Encoder

    return abstract_params(T5Encoder, cfg)


def resolve_config(src: TensorSource, preset: str):
    from wanjax.models.t5 import get_t5_config

    return infer_config(src) if preset == "auto" else get_t5_config(preset)


def ignore_patterns(src: TensorSource) -> tuple[str, ...]:
    return HF_IGNORE if detect_layout(src) == HF else ()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.t5", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="Wan .pth, HF UMT5EncoderModel .safetensors, or a shard dir")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--preset", default="auto", choices=("auto", "tiny", "umt5_xxl"))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("wanjax.convert").setLevel(logging.INFO)  # our progress only, not Orbax's chatter

    import ml_dtypes

    src = normalize_source(open_tensor_source(args.src))
    cfg = resolve_config(src, args.preset)
    layout = detect_layout(src)
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    config = {**cfg.to_dict(), "model": "t5", "source": str(Path(args.src).absolute()),
              "source_layout": layout, "dtype": args.dtype}
    out = convert(src, t5_plan(src, cfg), t5_targets(cfg), args.out, config, dtype=dtype,
                  ignore=ignore_patterns(src), overwrite=args.overwrite, progress=sys.stderr.isatty())
    logging.getLogger("wanjax.convert").info("wrote %s (%s layout, %s)", out, layout, cfg)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
