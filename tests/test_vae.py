"""Wan2.1 VAE: parity with diffusers.AutoencoderKLWan, converter layouts, streaming decode, errors.

Random weights are made in the *original* Wan layout (key names and shapes of wan_components.md
4.3), converted for the oracle with diffusers' ``convert_wan_vae_to_diffusers`` (strict load) and
for wanjax with ``converters.vae`` (through the CLI, from a .pth file).
"""
from __future__ import annotations


import wanjax  # noqa: F401  (first: disables Flax eager sharding)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import vae as cvae
from converters.common import ConversionError, TensorSource, materialize
from wanjax.models.vae import (LATENTS_MEAN, LATENTS_STD, StreamingDecoder, VAEConfig, init_vae,
                               jit_decode, jit_encode, load_vae, set_conv_impl)

BASE, Z = 8, 4
HEAD_SCALE = 0.05   # shrink the decoder head so that no output is clamped (a clamped pixel hides errors)


# ---------------------------------------------------------------------------------------------
# Random original-layout state dict, written from the spec's tables (not from our converter)
# ---------------------------------------------------------------------------------------------
def native_state_dict(base: int, z: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k, scale=1.0):
        fan_in = cin * int(np.prod(k))
        sd[f"{name}.weight"] = torch.randn((cout, cin, *k), generator=g) * (scale / fan_in ** 0.5)
        sd[f"{name}.bias"] = torch.randn((cout,), generator=g) * 0.1 * scale

    def gamma(name, c, nd):
        sd[name] = 1.0 + 0.2 * torch.randn((c,) + (1,) * nd, generator=g)

    def res(pre, cin, cout):
        gamma(f"{pre}.residual.0.gamma", cin, 3)
        conv(f"{pre}.residual.2", cout, cin, (3, 3, 3))
        gamma(f"{pre}.residual.3.gamma", cout, 3)
        conv(f"{pre}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{pre}.shortcut", cout, cin, (1, 1, 1))

    def middle(pre, c):
        res(f"{pre}.middle.0", c, c)
        gamma(f"{pre}.middle.1.norm.gamma", c, 2)
        conv(f"{pre}.middle.1.to_qkv", 3 * c, c, (1, 1))
        conv(f"{pre}.middle.1.proj", c, c, (1, 1))
        res(f"{pre}.middle.2", c, c)

    b = base
    # encoder (4.3): 0,1 res b; 2 down2d; 3,4 res b->2b; 5 down3d; 6,7 res 2b->4b; 8 down3d; 9,10 res 4b
    conv("encoder.conv1", b, 3, (3, 3, 3))
    e = "encoder.downsamples"
    res(f"{e}.0", b, b); res(f"{e}.1", b, b)
    conv(f"{e}.2.resample.1", b, b, (3, 3))
    res(f"{e}.3", b, 2 * b); res(f"{e}.4", 2 * b, 2 * b)
    conv(f"{e}.5.resample.1", 2 * b, 2 * b, (3, 3)); conv(f"{e}.5.time_conv", 2 * b, 2 * b, (3, 1, 1))
    res(f"{e}.6", 2 * b, 4 * b); res(f"{e}.7", 4 * b, 4 * b)
    conv(f"{e}.8.resample.1", 4 * b, 4 * b, (3, 3)); conv(f"{e}.8.time_conv", 4 * b, 4 * b, (3, 1, 1))
    res(f"{e}.9", 4 * b, 4 * b); res(f"{e}.10", 4 * b, 4 * b)
    middle("encoder", 4 * b)
    gamma("encoder.head.0.gamma", 4 * b, 3)
    conv("encoder.head.2", 2 * z, 4 * b, (3, 3, 3))
    conv("conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("conv2", z, z, (1, 1, 1))
    # decoder: 0-2 res 4b; 3 up3d (4b->2b, time 4b->8b); 4 res 2b->4b, 5, 6; 7 up3d; 8-10 res 2b;
    # 11 up2d 2b->b; 12-14 res b
    conv("decoder.conv1", 4 * b, z, (3, 3, 3))
    middle("decoder", 4 * b)
    d = "decoder.upsamples"
    for n in (0, 1, 2):
        res(f"{d}.{n}", 4 * b, 4 * b)
    conv(f"{d}.3.resample.1", 2 * b, 4 * b, (3, 3)); conv(f"{d}.3.time_conv", 8 * b, 4 * b, (3, 1, 1))
    res(f"{d}.4", 2 * b, 4 * b); res(f"{d}.5", 4 * b, 4 * b); res(f"{d}.6", 4 * b, 4 * b)
    conv(f"{d}.7.resample.1", 2 * b, 4 * b, (3, 3)); conv(f"{d}.7.time_conv", 8 * b, 4 * b, (3, 1, 1))
    for n in (8, 9, 10):
        res(f"{d}.{n}", 2 * b, 2 * b)
    conv(f"{d}.11.resample.1", b, 2 * b, (3, 3))
    for n in (12, 13, 14):
        res(f"{d}.{n}", b, b)
    gamma("decoder.head.0.gamma", b, 3)
    conv("decoder.head.2", 3, b, (3, 3, 3), scale=HEAD_SCALE)
    return sd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = native_state_dict(BASE, Z)
    oracle = AutoencoderKLWan(base_dim=BASE, z_dim=Z, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                              attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
                              latents_mean=list(LATENTS_MEAN[:Z]), latents_std=list(LATENTS_STD[:Z]))
    diff_sd = convert_wan_vae_to_diffusers(dict(sd))
    oracle.load_state_dict(diff_sd, strict=True)
    oracle.eval()

    tmp = tmp_path_factory.mktemp("vae")
    pth = tmp / "Wan2.1_VAE.pth"
    torch.save(sd, pth)
    assert cvae.main(["--src", str(pth), "--out", str(tmp / "ckpt")]) == 0
    vae = load_vae(tmp / "ckpt")
    return dict(sd=sd, diff_sd=diff_sd, oracle=oracle, vae=vae, tmp=tmp,
                decode=jit_decode(vae))


def _rel_err(ours, ref) -> tuple[float, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max())
    return float(np.abs(ours - ref).max()) / scale, scale


# ---------------------------------------------------------------------------------------------
# (a) parity with diffusers
# ---------------------------------------------------------------------------------------------
def test_encode_parity(setup):
    torch.manual_seed(1)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        mu = setup["oracle"].encode(x).latent_dist.mean          # [1, Z, 3, 4, 4]
    mean = torch.tensor(LATENTS_MEAN[:Z]).view(1, Z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENTS_STD[:Z]).view(1, Z, 1, 1, 1)
    ref = ((mu - mean) * inv_std).permute(0, 2, 3, 4, 1).numpy()  # channels-last
    z = jit_encode(setup["vae"])(jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()))
    assert z.shape == (1, 3, 4, 4, Z)
    err, scale = _rel_err(z, ref)
    print(f"encode: max rel err {err:.2e} (scale {scale:.3f})")
    # float32 on both sides, ~25 conv layers in a different summation order: observed ~1e-7
    assert err <= 1e-4


def test_decode_parity(setup):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1, 3, 4, 4, Z)).astype(np.float32)        # normalised, channels-last
    mean = np.asarray(LATENTS_MEAN[:Z], np.float32)
    inv_std = 1.0 / np.asarray(LATENTS_STD[:Z], np.float32)
    raw = torch.from_numpy(z / inv_std + mean).permute(0, 4, 1, 2, 3)  # oracle does not un-normalise
    with torch.no_grad():
        ref = setup["oracle"].decode(raw).sample.permute(0, 2, 3, 4, 1).numpy()
    out = setup["decode"](jnp.asarray(z))
    assert out.shape == (1, 9, 32, 32, 3)
    err, scale = _rel_err(out, ref)
    print(f"decode: max rel err {err:.2e} (scale {scale:.3f})")
    assert scale < 0.9, "outputs reach the clamp; the test would not see errors there"
    # float32, same ops; the oracle decodes frame by frame with a cache, we decode the whole
    # sequence (and upsample+conv as a 4-phase conv): only summation order differs, observed ~1e-7
    assert err <= 1e-4


# ---------------------------------------------------------------------------------------------
# (b) the diffusers layout converts to identical params
# ---------------------------------------------------------------------------------------------
def test_diffusers_layout_same_params(setup):
    cfg = VAEConfig.tiny(Z)
    targets = cvae.vae_targets(cfg)
    out = {}
    for name, sd in (("wan", setup["sd"]), ("diffusers", setup["diff_sd"])):
        src = cvae.normalize_source(TensorSource.from_arrays(sd, name))
        assert cvae.detect_layout(src) == name
        assert cvae.infer_config(src) == cfg
        out[name] = materialize(src, cvae.vae_plan(src, cfg), targets)
    assert out["wan"].keys() == out["diffusers"].keys() == targets.keys()
    for k in targets:
        np.testing.assert_array_equal(out["wan"][k], out["diffusers"][k], err_msg=k)
    # and the CLI-converted checkpoint holds exactly those arrays
    from flax import nnx

    from converters.common import flatten_params
    loaded = flatten_params(nnx.to_pure_dict(nnx.state(setup["vae"], nnx.Param)))
    for k in targets:
        np.testing.assert_array_equal(np.asarray(loaded[k]), out["wan"][k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# (c) streaming decode == full decode
# ---------------------------------------------------------------------------------------------
def test_streaming_equals_full_decode(setup):
    vae = setup["vae"]
    z = jax.random.normal(jax.random.key(3), (1, 9, 4, 4, Z), jnp.float32)
    full = setup["decode"](z)
    assert full.shape == (1, 1 + 4 * 8, 32, 32, 3)
    dec = StreamingDecoder(vae)
    blocks = [dec.push(z[:, i:i + 3]) for i in range(0, 9, 3)]
    assert [b.shape[1] for b in blocks] == [9, 12, 12]
    stream = jnp.concatenate(blocks, axis=1)
    err, scale = _rel_err(stream, full)
    print(f"stream vs full: max rel err {err:.2e} (scale {scale:.3f})")
    # identical math, only the conv padding (zeros vs carried frames) is arranged differently
    assert err <= 1e-5
    assert scale < 0.9
    # reset starts a new video: the first block again gives the same 9 frames
    dec.reset()
    again = dec.push(z[:, :3])
    np.testing.assert_allclose(np.asarray(again), np.asarray(blocks[0]), rtol=0, atol=1e-6)

    # frame-by-frame streaming (chunk=1: a scan over single latent frames inside each push, the
    # pipeline's low-memory setting) gives the same frames
    dec1 = StreamingDecoder(vae, chunk=1)
    stream1 = jnp.concatenate([dec1.push(z[:, i:i + 3]) for i in range(0, 9, 3)], axis=1)
    err1, _ = _rel_err(stream1, full)
    print(f"stream chunk=1 vs full: max rel err {err1:.2e}")
    assert stream1.shape == full.shape and err1 <= 1e-5

    # chunked decode (first 2, a scan over 3 chunks of 2, a remainder of 1) with the plain 3-D
    # conv implementation (the default is "fold"): same values (only summation order differs)
    from flax import nnx
    conv3d = set_conv_impl(nnx.clone(vae), "3d")
    chunked = jit_decode(conv3d, chunk=2)(z)
    err2, _ = _rel_err(chunked, full)
    print(f"chunked+3d vs full: max rel err {err2:.2e}")
    assert chunked.shape == full.shape and err2 <= 1e-5


# ---------------------------------------------------------------------------------------------
# (d) bad input
# ---------------------------------------------------------------------------------------------
def test_bad_video_and_latent_errors():
    vae = init_vae(VAEConfig.tiny(Z))
    with pytest.raises(ValueError, match=r"T=8 frames.*1 \+ 4k"):
        vae.encode(jnp.zeros((1, 8, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        vae.encode(jnp.zeros((1, 9, 32, 32, 4)))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(jnp.zeros((1, 9, 30, 32, 3)))
    with pytest.raises(ValueError, match=f"T_lat, h, w, {Z}"):
        vae.decode(jnp.zeros((1, 2, 4, 4, Z + 1)))
    dec = StreamingDecoder(vae)
    dec.cache, dec._shape = {}, (1, 4, 4, Z)  # pretend a stream of 4x4 latents is running
    with pytest.raises(ValueError, match="does not continue the stream"):
        dec.push(jnp.zeros((1, 3, 8, 8, Z)))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir())


def test_converter_missing_key_and_wrong_shape(setup, tmp_path):
    sd = dict(setup["sd"])
    missing = dict(sd)
    del missing["decoder.upsamples.7.time_conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ConversionError, match=r"missing key 'decoder\.upsamples\.7\.time_conv\.weight'"):
        cvae.main(["--src", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o1")])

    bad = dict(sd)
    bad["encoder.downsamples.3.residual.2.weight"] = torch.zeros(16, 8, 3, 3, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"encoder/down/3/conv1/kernel.*\(16, 8, 3, 3, 1\)"):
        cvae.main(["--src", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "o2")])
    # strict and atomic: nothing but the two inputs is left behind
    assert _leftovers(tmp_path) == ["bad.pth", "missing.pth"]

    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="cannot tell the VAE layout"):
        cvae.main(["--src", str(tmp_path / "other.pth"), "--out", str(tmp_path / "o3")])
