"""WanDiT parity with diffusers' WanTransformer3DModel, through our converter.

Tolerance: both sides compute in float32; the only systematic difference is diffusers' fp32
sinusoid vs ours (same formula) and summation order, which the spec measured at ~3e-6 absolute for
outputs of scale ~3 between two torch implementations. We allow 1e-4 of the output scale.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import wanjax  # noqa: F401
from converters import dit as dit_conv
from wanjax import checkpoint
from wanjax.models import dit as dit_lib
from tests.wan_fixtures import TINY_DIT, save_safetensors, to_numpy, wan_dit_state_dict


def _diffusers_model(sd, i2v):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    kw = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
              in_channels=36 if i2v else 16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128,
              num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
              rope_max_seq_len=1024)
    if i2v:
        kw.update(image_dim=1280, added_kv_proj_dim=64)
    m = WanTransformer3DModel(**kw)
    conv = convert_wan_transformer_to_diffusers(dict(sd))
    m.load_state_dict(conv, strict=True)
    return m.eval()


def _inputs(i2v, seed=0):
    rng = np.random.default_rng(seed)
    B, F, H, W = 1, 3, 8, 12
    x = rng.standard_normal((B, F, H, W, 16)).astype(np.float32)
    y = rng.standard_normal((B, F, H, W, 20)).astype(np.float32) if i2v else None
    ctx = np.zeros((B, 512, 32), np.float32)
    ctx[:, :7] = rng.standard_normal((B, 7, 32))
    clip = rng.standard_normal((B, 257, 1280)).astype(np.float32) if i2v else None
    t = np.array([[937.0, 500.5, 20.0]], np.float32)  # a different timestep per frame
    return x, y, ctx, clip, t


def _oracle(model, x, y, ctx, clip, t, dtype=torch.float32):
    """diffusers' output [B, F, H, W, C] as float32 numpy; its activations enter in ``dtype``."""
    xin = np.concatenate([x, y], -1) if y is not None else x
    hs = torch.from_numpy(xin).permute(0, 4, 1, 2, 3).to(dtype)  # B C F H W
    tokens_per_frame = (x.shape[2] // 2) * (x.shape[3] // 2)
    ts = torch.from_numpy(np.repeat(t, tokens_per_frame, axis=1))  # per-token timesteps [B, L]
    kw = {}
    if clip is not None:
        kw["encoder_hidden_states_image"] = torch.from_numpy(clip).to(dtype)
    with torch.no_grad():
        out = model(hidden_states=hs, timestep=ts, encoder_hidden_states=torch.from_numpy(ctx).to(dtype),
                    return_dict=False, **kw)[0]
    return out.float().permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for i2v in (False, True):
        d = tmp_path_factory.mktemp("i2v" if i2v else "t2v")
        sd = wan_dit_state_dict(**{**TINY_DIT, "in_dim": 36 if i2v else 16}, i2v=i2v, seed=1 + i2v)
        src = d / "diffusion_pytorch_model.safetensors"
        save_safetensors(sd, src)
        ck = dit_conv.convert_dit(src, d / "ck", dtype="float32", preset="tiny_i2v" if i2v else "tiny",
                                  progress=False)
        out[i2v] = (sd, ck)
    return out


@pytest.mark.parametrize("i2v", [False, True])
def test_parity_with_diffusers(converted, i2v):
    sd, ck = converted[i2v]
    model = checkpoint.load_model(ck, dit_lib.build)
    x, y, ctx, clip, t = _inputs(i2v)
    ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                            clip_fea=None if clip is None else jnp.asarray(clip),
                            y=None if y is None else jnp.asarray(y)))
    ref = _oracle(_diffusers_model(sd, i2v), x, y, ctx, clip, t)
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert scale > 0.1
    assert err <= 1e-4 * scale, (err, scale)
    # timesteps really are per frame: changing one frame's t changes that frame
    t2 = t.copy()
    t2[0, 1] = 100.0
    ours2 = np.asarray(model(jnp.asarray(x), jnp.asarray(t2), jnp.asarray(ctx),
                             clip_fea=None if clip is None else jnp.asarray(clip),
                             y=None if y is None else jnp.asarray(y)))
    ref2 = _oracle(_diffusers_model(sd, i2v), x, y, ctx, clip, t2)
    assert np.abs(ours2 - ref2).max() <= 1e-4 * scale
    assert np.abs(ours2 - ours).max() > 1e-3


def _rel(a, ref):
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("i2v", [False, True])
def test_bf16_residual_stream_against_diffusers(converted, i2v):
    """``residual_dtype="bfloat16"`` stores the stream in bf16 between fp32 adds, which is the layout
    of diffusers in bf16 (``type_as(hidden_states)`` after each add; time embedder, modulation
    tables and norms kept in fp32, as ``from_pretrained(torch_dtype=bf16)`` loads them).

    Tolerances, relative L2 against the float32 oracle:
    - fp32 compute, bf16 stream: the stream is rounded 7 times (the embedding, 3 adds x 2 blocks),
      each <= 2^-9 relative, ~3e-3 in quadrature; the head's LayerNorm may amplify it, so <= 8e-3
      (measured: 3.9-4.1e-3), and > 1e-4 (the rounding happens);
    - bf16 compute and stream: no worse than diffusers' own bf16 mode (+25% for the independent
      rounding draws; measured: 0.89x)."""
    sd, ck = converted[i2v]
    x, y, ctx, clip, t = _inputs(i2v)
    ref = _oracle(_diffusers_model(sd, i2v), x, y, ctx, clip, t)

    def ours(**over):
        model = checkpoint.load_model(
            ck, lambda c, rngs: dit_lib.WanDiT(dit_lib.WanDiTConfig.from_dict(c).replace(**over), rngs=rngs))
        return np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                                clip_fea=None if clip is None else jnp.asarray(clip),
                                y=None if y is None else jnp.asarray(y)))

    assert 1e-4 < _rel(ours(residual_dtype="bfloat16"), ref) <= 8e-3
    dm = _diffusers_model(sd, i2v).to(torch.bfloat16)
    keep = set(dm._keep_in_fp32_modules)
    for name, p in dm.named_parameters():
        if keep & set(name.split(".")):
            p.data = p.data.float()
    e_theirs = _rel(_oracle(dm, x, y, ctx, clip, t, dtype=torch.bfloat16), ref)
    assert 1e-3 < e_theirs < 2e-2                      # diffusers really ran in bf16
    assert _rel(ours(dtype="bfloat16", param_dtype="bfloat16", residual_dtype="bfloat16"), ref) <= 1.25 * e_theirs


def test_diffusers_layout_converts_identically(converted, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd, ck = converted[False]
    dsd = convert_wan_transformer_to_diffusers(dict(sd))
    save_safetensors(dsd, tmp_path / "diffusers.safetensors")
    ck2 = dit_conv.convert_dit(tmp_path / "diffusers.safetensors", tmp_path / "ck2", dtype="float32",
                               preset="tiny", progress=False)
    a = checkpoint.load_model(ck, dit_lib.build)
    b = checkpoint.load_model(ck2, dit_lib.build)
    from flax import nnx
    la = jax.tree.leaves(nnx.state(a, nnx.Param))
    lb = jax.tree.leaves(nnx.state(b, nnx.Param))
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_rope_matches_float64_reference_far_beyond_1024_frames():
    d = 128
    cos, sin = dit_lib.rope_tables(d, (2, 2, 3), start_frame=5000)
    dt, dh, dw = dit_lib.rope_axis_dims(d)
    assert (dt, dh, dw) == (44, 42, 42)
    f = np.float64
    freqs = lambda n: np.power(10000.0, -np.arange(0, n, 2, dtype=f) / n)
    ang = np.zeros((2, 2, 3, 64))
    for fi in range(2):
        for hi in range(2):
            for wi in range(3):
                ang[fi, hi, wi] = np.concatenate([(5000 + fi) * freqs(dt), hi * freqs(dh), wi * freqs(dw)])
    ang = ang.reshape(-1, 64)
    np.testing.assert_allclose(np.asarray(cos), np.cos(ang), atol=2e-4)
    np.testing.assert_allclose(np.asarray(sin), np.sin(ang), atol=2e-4)


def test_patchify_roundtrip_and_token_order():
    x = jnp.arange(2 * 3 * 4 * 6 * 5, dtype=jnp.float32).reshape(2, 3, 4, 6, 5)
    tok = dit_lib.patchify(x, (1, 2, 2))
    assert tok.shape == (2, 3 * 2 * 3, 20)
    # token index ((t*h)+y)*w+x; patch vector (ph, pw, c) with c fastest
    np.testing.assert_array_equal(tok[0, (1 * 2 + 1) * 3 + 2, :5], x[0, 1, 2, 4, :])
    np.testing.assert_array_equal(tok[0, (1 * 2 + 1) * 3 + 2, 5:10], x[0, 1, 2, 5, :])
    back = dit_lib.unpatchify(tok, (3, 2, 3), (1, 2, 2), 5)
    np.testing.assert_array_equal(back, x)


def test_gelu_tanh_linear_backward_equals_autodiff():
    """``nn.gelu_tanh_linear`` (the FFN's bias + GELU + second matmul, with a hand-written backward
    that makes the activation and its gradient in one pass) against autodiff of the plain expression.
    float32: the same function, so value and h / b / w gradients agree within float32 rounding of a
    few differently ordered sums (rtol 1e-5). bf16 (the GPU compute dtype): its gradients must be at
    least as close to a float64 reference as autodiff's own bf16 ones are (it takes the derivative in
    float32 where jax's bf16 GELU rounds each step to bf16). Under the ``dots`` remat policy its
    output is kept by name, so the second matmul does not run again in the backward."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from wanjax import nn as nn_lib

    rng = np.random.default_rng(11)
    h64, b64, w64, g64 = (rng.standard_normal(s) * sc for s, sc in
                          (((2, 37, 96), 1.5), ((96,), 0.5), ((96, 24), 0.1), ((2, 37, 24), 1.0)))

    def plain(h, b, w):
        return jnp.einsum("...f,fo->...o", jax.nn.gelu(h + b, approximate=True), w)

    def vjp(fn, dt):
        args = [jnp.asarray(a, dt) for a in (h64, b64, w64)]
        y, f_vjp = jax.vjp(fn, *args)
        return [np.asarray(a, np.float64) for a in (y, *f_vjp(jnp.asarray(g64, dt)))]

    for ref, got in zip(vjp(plain, jnp.float32), vjp(nn_lib.gelu_tanh_linear, jnp.float32)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    with jax.enable_x64():
        exact = vjp(plain, jnp.float64)
    err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    for name, auto, custom, ref in zip(("y", "dh", "db", "dw"), vjp(plain, jnp.bfloat16),
                                       vjp(nn_lib.gelu_tanh_linear, jnp.bfloat16), exact):
        assert err(custom, ref) <= 1.1 * err(auto, ref) + 1e-4, (name, err(custom, ref), err(auto, ref))
        assert err(custom, ref) < 2e-2, name

    def layer(h, b, w):
        return jnp.sum(jnp.sin(nn_lib.gelu_tanh_linear(h, b, w)))

    args = [jnp.asarray(a, jnp.float32) for a in (h64, b64, w64)]
    for policy in ("dots", "full"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(jax.checkpoint(layer, policy=dit_lib.remat_policy(policy)), *args)
        assert buf.getvalue().count(f"named '{nn_lib.FFN_OUT_NAME}'") == (policy == "dots"), buf.getvalue()


def test_matmul_one_cotangent_equals_the_plain_matmul():
    """``nn.matmul_one_cotangent`` (the fused q/k/v projection; its backward materialises the
    concatenated dq/dk/dv once for both GEMMs) is ``x @ w`` with the same gradients: float32, the
    same products, so within 1e-6 relative. Under ``dots`` its output is kept by name, as the plain
    matmul's was kept as a dot output."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from wanjax import nn as nn_lib

    rng = np.random.default_rng(12)
    x, w, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 19, 32), (32, 48), (2, 19, 48)))
    plain = lambda x, w: jnp.einsum("...i,io->...o", x, w)  # noqa: E731
    # the cotangent arrives as a concatenation, as dq / dk / dv do
    split = lambda f: lambda x, w: sum(jnp.sum(jnp.sin(p) * s) for p, s in  # noqa: E731
                                       zip(jnp.split(f(x, w), 3, axis=-1), jnp.split(g, 3, axis=-1)))
    for ref, got in zip(jax.value_and_grad(split(plain), argnums=(0, 1))(x, w),
                        jax.value_and_grad(split(nn_lib.matmul_one_cotangent), argnums=(0, 1))(x, w)):
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    for policy in ("dots", "full"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(jax.checkpoint(split(nn_lib.matmul_one_cotangent),
                                                 policy=dit_lib.remat_policy(policy)), x, w)
        assert buf.getvalue().count(f"named '{nn_lib.MATMUL_OUT_NAME}'") == (policy == "dots"), buf.getvalue()
