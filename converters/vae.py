"""Convert the Wan2.1 VAE (``Wan2.1_VAE.pth`` or diffusers ``AutoencoderKLWan``) to wanjax.

    python -m converters.vae --src Wan2.1_VAE.pth --out ckpt/vae [--dtype float32]
        [--preset auto|tiny|wan21] [--overwrite]

Two source layouts are accepted (spec: wan_components.md 4.3 and 4.6):

* Wan-native: ``encoder.conv1``, ``encoder.downsamples.{n}.residual.{0,2,3,6}`` / ``shortcut`` /
  ``resample.1`` / ``time_conv``, ``{en,de}coder.middle.{0,1,2}``, ``{en,de}coder.head.{0,2}``,
  top-level ``conv1`` / ``conv2``, ``decoder.conv1``, ``decoder.upsamples.{n}...``.
* diffusers: ``encoder.conv_in``, ``encoder.down_blocks.{n}.{norm1,conv1,norm2,conv2,
  conv_shortcut,resample.1,time_conv}``, ``mid_block.{resnets,attentions}``, ``norm_out``,
  ``conv_out``, ``quant_conv`` / ``post_quant_conv``, ``decoder.up_blocks.{i}.resnets.{j}`` and
  ``decoder.up_blocks.{i}.upsamplers.0``.

Targets are the ``WanVAE`` parameter paths (``encoder/down/{n}/conv1/kernel``, ...): the flat
``down`` / ``up`` lists use the Wan-native indices.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from converters.common import (Assign, ConversionError, TensorSource, conv_t, convert,
                               open_tensor_source, strip_wrappers)

NATIVE, DIFFUSERS = "wan", "diffusers"
_PREFIXES = ("vae.", "first_stage_model.", "model.")


def normalize_source(src: TensorSource) -> TensorSource:
    """Drop FSDP/compile wrapper tokens and a leading ``vae.`` / ``first_stage_model.`` prefix."""
    return src.renamed(lambda k: strip_wrappers(k, _PREFIXES))


def detect_layout(src: TensorSource) -> str:
    keys = src.keys()
    native = any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) for k in keys)
    diff = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)
    if native == diff:
        raise ConversionError(
            f"{src.description}: cannot tell the VAE layout (Wan-native keys encoder.downsamples.* "
            f"{'and' if native else 'nor'} diffusers keys encoder.down_blocks.* present); "
            f"pass Wan2.1_VAE.pth or an AutoencoderKLWan state dict. First keys: {keys[:5]}")
    return NATIVE if native else DIFFUSERS


def gamma(g: np.ndarray) -> np.ndarray:
    """RMS_norm gamma [C,1,1(,1)] -> [C]."""
    return g.reshape(-1)


def conv1x1_to_linear(w: np.ndarray) -> np.ndarray:
    """Conv2d 1x1 weight [out, in, 1, 1] -> Linear kernel [in, out]."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ConversionError(f"expected a 1x1 Conv2d weight [out, in, 1, 1], got {w.shape}")
    return w[:, :, 0, 0].T


def infer_config(src: TensorSource):
    """base_dim and z_dim from the tensor shapes; dim_mult / num_res_blocks are Wan2.1's."""
    from wanjax.models.vae import VAEConfig

    layout = detect_layout(src)
    k_in = "encoder.conv1.weight" if layout == NATIVE else "encoder.conv_in.weight"
    k_z = "conv2.weight" if layout == NATIVE else "post_quant_conv.weight"
    for k in (k_in, k_z):
        if k not in src:
            raise ConversionError(f"{src.description}: missing key {k!r}; cannot infer the VAE "
                                  f"config (pass --preset tiny or wan21 to skip inference)")
    return VAEConfig.with_z_dim(base_dim=src.shape(k_in)[0], z_dim=src.shape(k_z)[0])


def _conv(target: str, source: str) -> list[Assign]:
    return [Assign(f"{target}/kernel", (f"{source}.weight",), conv_t),
            Assign(f"{target}/bias", (f"{source}.bias",))]


def _res(target: str, src_prefix: str, names: dict, has_shortcut: bool) -> list[Assign]:
    """A ResidualBlock; ``names`` maps norm1/conv1/norm2/conv2/shortcut to source sub-keys."""
    plan = [Assign(f"{target}/norm1/weight", (f"{src_prefix}.{names['norm1']}",), gamma),
            Assign(f"{target}/norm2/weight", (f"{src_prefix}.{names['norm2']}",), gamma)]
    plan += _conv(f"{target}/conv1", f"{src_prefix}.{names['conv1']}")
    plan += _conv(f"{target}/conv2", f"{src_prefix}.{names['conv2']}")
    if has_shortcut:
        plan += _conv(f"{target}/shortcut", f"{src_prefix}.{names['shortcut']}")
    return plan


_RES_NAMES = {
    NATIVE: dict(norm1="residual.0.gamma", conv1="residual.2", norm2="residual.3.gamma",
                 conv2="residual.6", shortcut="shortcut"),
    DIFFUSERS: dict(norm1="norm1.gamma", conv1="conv1", norm2="norm2.gamma", conv2="conv2",
                    shortcut="conv_shortcut"),
}


def _attn(target: str, src_prefix: str) -> list[Assign]:
    return [Assign(f"{target}/norm/weight", (f"{src_prefix}.norm.gamma",), gamma),
            Assign(f"{target}/to_qkv/kernel", (f"{src_prefix}.to_qkv.weight",), conv1x1_to_linear),
            Assign(f"{target}/to_qkv/bias", (f"{src_prefix}.to_qkv.bias",)),
            Assign(f"{target}/proj/kernel", (f"{src_prefix}.proj.weight",), conv1x1_to_linear),
            Assign(f"{target}/proj/bias", (f"{src_prefix}.proj.bias",))]


def _layer(target: str, src_prefix: str, spec: tuple, layout: str) -> list[Assign]:
    if spec[0] == "res":
        return _res(target, src_prefix, _RES_NAMES[layout], spec[1] != spec[2])
    plan = _conv(f"{target}/resample", f"{src_prefix}.resample.1")
    if spec[0] in ("downsample3d", "upsample3d"):
        plan += _conv(f"{target}/time_conv", f"{src_prefix}.time_conv")
    return plan


def _mid(target: str, side: str, layout: str) -> list[Assign]:
    names = _RES_NAMES[layout]
    if layout == NATIVE:
        return (_res(f"{target}/res0", f"{side}.middle.0", names, False)
                + _attn(f"{target}/attn", f"{side}.middle.1")
                + _res(f"{target}/res1", f"{side}.middle.2", names, False))
    return (_res(f"{target}/res0", f"{side}.mid_block.resnets.0", names, False)
            + _attn(f"{target}/attn", f"{side}.mid_block.attentions.0")
            + _res(f"{target}/res1", f"{side}.mid_block.resnets.1", names, False))


def _diffusers_up_prefixes(specs: list[tuple]) -> list[str]:
    """Flat decoder layer index -> ``decoder.up_blocks.{i}.resnets.{j}`` / ``.upsamplers.0``."""
    out, stage, j = [], 0, 0
    for spec in specs:
        if spec[0] == "res":
            out.append(f"decoder.up_blocks.{stage}.resnets.{j}")
            j += 1
        else:
            out.append(f"decoder.up_blocks.{stage}.upsamplers.0")
            stage, j = stage + 1, 0
    return out


def vae_plan(src: TensorSource, cfg) -> list[Assign]:
    """Every ``WanVAE`` parameter with its source key in ``src``'s layout (native or diffusers)."""
    from wanjax.models.vae import decoder_layers, encoder_layers

    layout = detect_layout(src)
    nat = layout == NATIVE
    plan: list[Assign] = []
    # encoder
    plan += _conv("encoder/conv_in", "encoder.conv1" if nat else "encoder.conv_in")
    for n, spec in enumerate(encoder_layers(cfg)):
        pre = f"encoder.downsamples.{n}" if nat else f"encoder.down_blocks.{n}"
        plan += _layer(f"encoder/down/{n}", pre, spec, layout)
    plan += _mid("encoder/mid", "encoder", layout)
    plan.append(Assign("encoder/norm_out/weight",
                       ("encoder.head.0.gamma" if nat else "encoder.norm_out.gamma",), gamma))
    plan += _conv("encoder/conv_out", "encoder.head.2" if nat else "encoder.conv_out")
    # quant convs
    plan += _conv("conv1", "conv1" if nat else "quant_conv")
    plan += _conv("conv2", "conv2" if nat else "post_quant_conv")
    # decoder
    plan += _conv("decoder/conv_in", "decoder.conv1" if nat else "decoder.conv_in")
    plan += _mid("decoder/mid", "decoder", layout)
    specs = decoder_layers(cfg)
    prefixes = ([f"decoder.upsamples.{n}" for n in range(len(specs))] if nat
                else _diffusers_up_prefixes(specs))
    for n, (spec, pre) in enumerate(zip(specs, prefixes)):
        plan += _layer(f"decoder/up/{n}", pre, spec, layout)
    plan.append(Assign("decoder/norm_out/weight",
                       ("decoder.head.0.gamma" if nat else "decoder.norm_out.gamma",), gamma))
    plan += _conv("decoder/conv_out", "decoder.head.2" if nat else "decoder.conv_out")
    return plan


def vae_targets(cfg) -> dict:
    """``{path: ShapeDtypeStruct}`` of the ``WanVAE`` parameters (built abstractly)."""
    from converters.common import abstract_params
    from wanjax.models.vae import WanVAE

    return abstract_params(WanVAE, cfg)


def resolve_config(src: TensorSource, preset: str):
    from wanjax.models.vae import get_vae_config

    return infer_config(src) if preset == "auto" else get_vae_config(preset)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.vae", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="Wan2.1_VAE.pth, or an AutoencoderKLWan .safetensors / dir")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="storage dtype (Wan runs its VAE in float32)")
    ap.add_argument("--preset", default="auto", choices=("auto", "tiny", "wan21"))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import ml_dtypes

    src = normalize_source(open_tensor_source(args.src))
    cfg = resolve_config(src, args.preset)
    layout = detect_layout(src)
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    config = {**cfg.to_dict(), "model": "vae", "source": str(Path(args.src).absolute()),
              "source_layout": layout, "dtype": args.dtype}
    out = convert(src, vae_plan(src, cfg), vae_targets(cfg), args.out, config, dtype=dtype,
                  overwrite=args.overwrite, progress=sys.stderr.isatty())
    logging.getLogger("wanjax.convert").info("wrote %s (%s layout, base_dim=%d, z_dim=%d)",
                                             out, layout, cfg.base_dim, cfg.z_dim)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
