"""CLIP image encoder: parity with transformers.CLIPVisionModel, converter layouts, preprocessing, errors.

Reference side: random weights in Wan's open-clip layout (wan_components.md 5.3), renamed to HF keys
with the 5.4 table and loaded strictly into ``transformers.CLIPVisionModel``; Wan's feature is
``hidden_states[-2]``. wanjax side: the same file converted with ``converters.clip``.
"""
from __future__ import annotations

import os

import wanjax  # noqa: F401  (first: disables Flax eager sharding)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image, ImageDraw

from converters import clip as conv
from converters.common import ConversionError, flatten_params
from wanjax import image as wimg
from wanjax.models.clip import CLIPVisionConfig, load_clip_encoder

CFG = CLIPVisionConfig.tiny()          # width 32, 3 blocks (2 used), 4 heads, 224/14 -> 257 tokens
D, M, L, P, T = CFG.width, CFG.mlp_dim, CFG.num_layers, CFG.patch_size, CFG.num_tokens


# ----------------------------------------------------------------------------------------------
# Original-layout weights and the oracle
# ----------------------------------------------------------------------------------------------
def wan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every ``visual.*`` key of 5.3 at tiny size, plus unused textual / head / log_scale keys."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "visual.patch_embedding.weight": rn(D, 3, P, P, std=0.05),
        "visual.cls_embedding": rn(1, 1, D, std=0.5),
        "visual.pos_embedding": rn(1, T, D, std=0.5),
        "visual.pre_norm.weight": 1 + rn(D), "visual.pre_norm.bias": rn(D),
        "visual.post_norm.weight": 1 + rn(D), "visual.post_norm.bias": rn(D),
        "visual.head": rn(D, 24),
        "log_scale": torch.tensor(4.6),
        "textual.token_embedding.weight": rn(50, 16),
        "textual.blocks.0.attn.q.weight": rn(16, 16),
        "textual.head.0.weight": rn(24, 16),
    }
    for i in range(L):
        b = f"visual.transformer.{i}."
        sd |= {
            b + "norm1.weight": 1 + rn(D), b + "norm1.bias": rn(D),
            b + "attn.to_qkv.weight": rn(3 * D, D, std=0.3), b + "attn.to_qkv.bias": rn(3 * D),
            b + "attn.proj.weight": rn(D, D, std=0.2), b + "attn.proj.bias": rn(D),
            b + "norm2.weight": 1 + rn(D), b + "norm2.bias": rn(D),
            b + "mlp.0.weight": rn(M, D, std=0.2), b + "mlp.0.bias": rn(M),
            b + "mlp.2.weight": rn(D, M, std=0.1), b + "mlp.2.bias": rn(D),
        }
    return sd


def wan_to_hf(sd: dict) -> dict:
    """The wan_components.md 5.4 table (oracle side): Wan ``visual.*`` -> HF CLIPVisionModelWithProjection."""
    v, hf = "visual.", "vision_model."
    out = {
        hf + "embeddings.patch_embedding.weight": sd[v + "patch_embedding.weight"],
        hf + "embeddings.class_embedding": sd[v + "cls_embedding"].reshape(D),
        hf + "embeddings.position_embedding.weight": sd[v + "pos_embedding"].reshape(T, D),
        hf + "pre_layrnorm.weight": sd[v + "pre_norm.weight"], hf + "pre_layrnorm.bias": sd[v + "pre_norm.bias"],
        hf + "post_layernorm.weight": sd[v + "post_norm.weight"],
        hf + "post_layernorm.bias": sd[v + "post_norm.bias"],
        "visual_projection.weight": sd[v + "head"].T.contiguous(),
    }
    for i in range(L):
        w, h = f"{v}transformer.{i}.", f"{hf}encoder.layers.{i}."
        for t in ("weight", "bias"):
            q, k, vv = sd[w + f"attn.to_qkv.{t}"].chunk(3, dim=0)
            out |= {h + f"self_attn.q_proj.{t}": q.contiguous(), h + f"self_attn.k_proj.{t}": k.contiguous(),
                    h + f"self_attn.v_proj.{t}": vv.contiguous(),
                    h + f"self_attn.out_proj.{t}": sd[w + f"attn.proj.{t}"],
                    h + f"layer_norm1.{t}": sd[w + f"norm1.{t}"], h + f"layer_norm2.{t}": sd[w + f"norm2.{t}"],
                    h + f"mlp.fc1.{t}": sd[w + f"mlp.0.{t}"], h + f"mlp.fc2.{t}": sd[w + f"mlp.2.{t}"]}
    return out


def hf_oracle(hf_sd: dict):
    from transformers import CLIPVisionConfig as HFConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(HFConfig(
        hidden_size=D, intermediate_size=M, num_hidden_layers=L, num_attention_heads=CFG.num_heads,
        image_size=CFG.image_size, patch_size=P, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=24))
    model.load_state_dict(hf_sd, strict=True)
    return model.eval()


def oracle_feature(model, pixels_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2).contiguous(),
                    output_hidden_states=True)
    return out.hidden_states[-2].numpy()


def params_of(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    sd = wan_state_dict(0)
    torch.save(sd, root / "models_clip_tiny.pth")
    assert conv.main(["--src", str(root / "models_clip_tiny.pth"), "--out", str(root / "ckpt")]) == 0
    encoder = load_clip_encoder(root / "ckpt")
    return dict(root=root, sd=sd, hf=hf_oracle(wan_to_hf(sd)), encoder=encoder)


# ----------------------------------------------------------------------------------------------
# (a) parity with transformers, open-clip (Wan) source
# ----------------------------------------------------------------------------------------------
def test_parity_with_hf_hidden_states_minus_2(setup):
    pixels = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ref = oracle_feature(setup["hf"], pixels)
    out = np.asarray(jax.jit(lambda x: setup["encoder"](x))(jnp.asarray(pixels)))
    assert out.shape == ref.shape == (2, 257, D)
    scale = np.abs(ref).max()
    err = np.abs(out - ref).max()
    print(f"clip parity: max abs err {err:.3g}, output scale {scale:.3g}")
    # fp32 on both sides; only summation order differs (measured ~1e-6 relative), so 1e-4 of the
    # output scale catches any real error (wrong GELU, scale, q/k/v order, or an extra block: >1e-1).
    assert err <= 1e-4 * scale
    # the feature is not the full stack: hidden_states[-1] (all 3 blocks) must differ
    with torch.no_grad():
        full = setup["hf"](pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                           output_hidden_states=True).hidden_states[-1].numpy()
    assert np.abs(out - full).max() > 1e-2 * scale


def test_config_json_and_stored_blocks(setup):
    import json
    cfg = json.loads((setup["root"] / "ckpt" / "config.json").read_text())
    assert cfg["model"] == "clip" and cfg["source_layout"] == "open_clip"
    assert CLIPVisionConfig.from_dict(cfg) == CFG
    p = params_of(setup["encoder"])
    assert p["blocks/attn/q/kernel"].shape == (L - 1, D, D)     # the last block is not stored
    # q/k/v split: rows [0:D] of to_qkv are q, [D:2D] k, [2D:3D] v (kernels transposed to [in, out])
    qkv = setup["sd"]["visual.transformer.1.attn.to_qkv.weight"].numpy()
    for j, n in enumerate("qkv"):
        np.testing.assert_array_equal(p[f"blocks/attn/{n}/kernel"][1], qkv[j * D:(j + 1) * D].T)


def test_vit_h_14_shapes_match_spec():
    """Full-size tree built abstractly: 257 tokens, 31 stored blocks, 611.1 M used parameters (5.1)."""
    import math

    cfg = CLIPVisionConfig.vit_h_14()
    assert (cfg.num_layers_used, cfg.head_dim, cfg.num_tokens) == (31, 80, 257)
    t = conv.clip_targets(cfg)
    assert t["patch_embedding/kernel"].shape == (14, 14, 3, 1280)
    assert t["blocks/attn/q/kernel"].shape == (31, 1280, 1280)
    assert t["blocks/mlp/fc1/kernel"].shape == (31, 1280, 5120)
    assert round(sum(math.prod(v.shape) for v in t.values()) / 1e6, 1) == 611.1


# ----------------------------------------------------------------------------------------------
# (b) HF-layout source converts to identical params
# ----------------------------------------------------------------------------------------------
def test_hf_layout_source_is_identical(setup, tmp_path):
    from safetensors.torch import save_file

    save_file(wan_to_hf(setup["sd"]), str(tmp_path / "model.safetensors"))
    conv.convert_clip(tmp_path / "model.safetensors", tmp_path / "ckpt_hf")
    enc_hf = load_clip_encoder(tmp_path / "ckpt_hf")
    a, b = params_of(setup["encoder"]), params_of(enc_hf)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 224, 224, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(setup["encoder"](x)), np.asarray(enc_hf(x)))


# ----------------------------------------------------------------------------------------------
# (c) preprocessing on a real image file
# ----------------------------------------------------------------------------------------------
def make_png(path, h=137, w=211) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * 7 + yy * 13) % 256], -1).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    d.ellipse((20, 15, 90, 70), fill=(250, 30, 40))
    d.rectangle((120, 60, 190, 125), fill=(10, 200, 90), outline=(0, 0, 0), width=3)
    d.line((0, h - 1, w - 1, 0), fill=(255, 255, 255), width=2)
    im.save(path)
    return np.asarray(im)


def torch_clip_preprocess(img_u8: np.ndarray) -> np.ndarray:
    """Independent reference of wan_components.md 5.2: to_tensor, (x-.5)/.5, bicubic, x*.5+.5, mean/std."""
    x = torch.from_numpy(img_u8).permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)[None]
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return ((x - mean) / std).permute(0, 2, 3, 1).numpy()


def test_preprocess_real_png_matches_torch(setup, tmp_path):
    drawn = make_png(tmp_path / "ref.png")
    img = wimg.load_image(tmp_path / "ref.png")
    assert img.dtype == np.uint8 and img.shape == (137, 211, 3)
    np.testing.assert_array_equal(img, drawn)
    ref = torch_clip_preprocess(img)
    ours = np.asarray(wimg.clip_preprocess(wimg.to_model_range(img)[None]))
    err = np.abs(ours - ref).max()
    print(f"clip preprocess: max abs err {err:.3g}, scale {np.abs(ref).max():.3g}")
    # float32 on both sides; interpolation weights agree to ~5e-7 and the inputs are bounded by 1,
    # so after /std (~3.8x) the worst case is ~2e-6. jax.image.resize (a=-0.5, antialias) is ~1e-1 off.
    assert err <= 1e-5
    assert np.abs(np.asarray(jax.image.resize(wimg.to_model_range(img), (224, 224, 3), "bicubic"))
                  * 0.5 + 0.5 - (ref[0] * np.array(wimg.CLIP_STD) + np.array(wimg.CLIP_MEAN))).max() > 1e-2
    # end to end: image file -> features, against torch preprocessing + the HF oracle
    feat = np.asarray(wimg.encode_image(setup["encoder"], wimg.to_model_range(img)[None]))
    want = oracle_feature(setup["hf"], ref)
    assert np.abs(feat - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("hw_in,hw_out", [((300, 500), (224, 224)), ((5, 7), (224, 160)), ((64, 64), (64, 64)),
                                          ((1, 3), (4, 9))])
def test_resize_bicubic_torch_shapes(hw_in, hw_out):
    x = np.random.default_rng(3).standard_normal((2, *hw_in, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=hw_out, mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    out = np.asarray(wimg.resize_bicubic_torch(x, hw_out))
    # inputs ~N(0,1): float32 rounding of weights and sums, measured <= 2.4e-6
    assert np.abs(out - ref).max() <= 1e-5
    assert wimg.resize_bicubic_torch(jnp.asarray(x, jnp.bfloat16), hw_out).dtype == jnp.bfloat16


def test_load_image_modes_and_resize_pil(tmp_path):
    rgb = make_png(tmp_path / "a.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    g = wimg.load_image(tmp_path / "grey.png")
    assert g.shape == (137, 211, 3) and np.array_equal(g[..., 0], g[..., 2])
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(wimg.load_image(tmp_path / "opaque.png"), rgb)
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transp.png")
    with pytest.raises(ValueError, match="non-opaque alpha"):
        wimg.load_image(tmp_path / "transp.png")
    white = wimg.load_image(tmp_path / "transp.png", alpha="white")
    assert (white[:10, :10] == 255).all() and np.array_equal(white[20:], rgb[20:])
    r = wimg.resize_pil(rgb, (64, 48), "bicubic")
    assert r.shape == (64, 48, 3)
    np.testing.assert_array_equal(r, np.asarray(Image.fromarray(rgb).resize((48, 64), Image.Resampling.BICUBIC)))
    assert wimg.resize_pil(rgb, (64, 48), "bilinear").shape == (64, 48, 3)


# ----------------------------------------------------------------------------------------------
# (d) bad input
# ----------------------------------------------------------------------------------------------
def test_bad_images(setup, tmp_path):
    with pytest.raises(ValueError, match=r"RGB image .*\(4, 5, 4\)"):
        wimg.to_model_range(np.zeros((4, 5, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        wimg.to_model_range(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 224, 224, 3\].*\(1, 224, 224, 4\)"):
        setup["encoder"](jnp.zeros((1, 224, 224, 4)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        wimg.clip_preprocess(jnp.zeros((224, 224, 3)))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        wimg.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="junk.png: cannot read"):
        wimg.load_image(tmp_path / "junk.png")
    make_png(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png: cannot read"):
        wimg.load_image(tmp_path / "cut.png")
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 1] = 128
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    with pytest.raises(ValueError, match="non-opaque alpha"):
        wimg.load_image(tmp_path / "la.png")


def _convert_fails(tmp_path, sd, match, **kw):
    src = tmp_path / "bad.pth"
    torch.save(sd, src)
    before = set(os.listdir(tmp_path))
    with pytest.raises(ConversionError, match=match):
        conv.convert_clip(src, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    assert set(os.listdir(tmp_path)) == before        # no temporary or partial output left behind


def test_converter_errors(setup, tmp_path):
    sd = dict(setup["sd"])
    del sd["visual.transformer.1.attn.proj.weight"]
    _convert_fails(tmp_path, sd, r"missing key 'visual.transformer.1.attn.proj.weight'")

    sd = dict(setup["sd"])
    sd["visual.transformer.1.mlp.2.weight"] = torch.zeros(D, M - 1)
    _convert_fails(tmp_path, sd, r"blocks/mlp/fc2/kernel\[1\].*visual.transformer.1.mlp.2.weight \(32, 127\)")

    sd = dict(setup["sd"])
    sd["visual.transformer.0.attn.to_qkv.weight"] = torch.zeros(3 * D - 1, D)
    _convert_fails(tmp_path, sd, r"visual.transformer.0.attn.to_qkv.weight: fused qkv .*\(95, 32\)")

    sd = dict(setup["sd"]) | {"visual.transformer.0.attn.extra": torch.zeros(3)}
    _convert_fails(tmp_path, sd, r"unexpected key 'visual.transformer.0.attn.extra'")

    _convert_fails(tmp_path, dict(setup["sd"]), r"missing key 'visual.transformer.3\.", preset="vit_h_14")

    sd = {k: v for k, v in setup["sd"].items() if not k.startswith("visual.")}
    _convert_fails(tmp_path, sd, "not a CLIP vision checkpoint")
