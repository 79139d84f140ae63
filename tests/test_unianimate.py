"""PoseDiT (UniAnimate conditioning): end-to-end forwards of the tiny teacher and student in all three
conditioning modes, the named errors for missing inputs, the student initialised from a plain backbone
(exactly the backbone at init), and lazy pose weights (converters.unianimate) with strict key checks."""
from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import wanjax  # noqa: F401
from converters import pose as pose_conv
from converters import unianimate as ua_conv
from converters.common import ConversionError, conv_t, flatten_params, linear_t
from tests.wan_fixtures import TINY_DIT, save_safetensors, to_numpy, wan_dit_state_dict
from wanjax.checkpoint import load_model
from wanjax.models import dit as dit_lib
from wanjax.models import unianimate as ua
from wanjax.models.pose import PoseConditioner

B, F_LAT, H, W = 1, 2, 32, 48          # pixels; latent 4 x 6, tokens 2 x 3, pose video 8 frames


def ua_pose_state_dict(pose_cfg, seed=0, std=0.2) -> dict[str, torch.Tensor]:
    """UA pose-module keys and shapes (spec 7.2) for ``pose_cfg``, random normal(std)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * std
    h, c = pose_cfg.hidden, pose_cfg.in_channels
    sd = {}
    for i, idx in enumerate(pose_conv.POSE3D_IDX):
        cin = c if i == 0 else h
        last = idx == pose_conv.POSE3D_IDX[-1]
        cout = pose_cfg.out_dim if last else h
        k = (1, 2, 2) if last else (3, 3, 3)
        sd[f"dwpose_embedding.{idx}.weight"] = r(cout, cin, *k)
        sd[f"dwpose_embedding.{idx}.bias"] = r(cout)
    for i, idx in enumerate(pose_conv.REF2D_IDX):
        cin = c if i == 0 else h
        cout = pose_cfg.ref_dim if idx == pose_conv.REF2D_IDX[-1] else h
        sd[f"randomref_embedding_pose.{idx}.weight"] = r(cout, cin, 3, 3)
        sd[f"randomref_embedding_pose.{idx}.bias"] = r(cout)
    return sd


def randomize(model: nnx.Module, seed: int, paths=None, std=0.2) -> nnx.Module:
    """Add N(0, std) noise (numpy, no compilation) to parameters (all, or those whose path starts with
    one of ``paths``), so that zero-initialised heads do not hide differences."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    flat = flatten_params(nnx.to_pure_dict(state))
    new = {k: (np.asarray(v) + std * rng.standard_normal(v.shape).astype(np.float32))
           if paths is None or any(k.startswith(p) for p in paths) else v for k, v in flat.items()}
    nnx.replace_by_pure_dict(state, ua._rebuild(nnx.to_pure_dict(state), new))
    nnx.update(model, state)
    return model


def random_model(make, seed: int, std=0.1) -> nnx.Module:
    """``make()`` built abstractly and filled with numpy noise (norm weights 1 + noise): no per-parameter
    init programs to compile, which dominates test time on a shared 2-core CPU."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(make))
    flat = flatten_params(nnx.to_pure_dict(state))
    new = {k: jnp.asarray(("norm" in k and k.endswith("weight")) + std * rng.standard_normal(v.shape),
                          v.dtype) for k, v in flat.items()}
    nnx.replace_by_pure_dict(state, ua._rebuild(nnx.to_pure_dict(state), new))
    return nnx.merge(graphdef, state)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    ctx = np.zeros((B, 512, 32), np.float32)
    ctx[:, :5] = rng.standard_normal((B, 5, 32))
    return dict(
        x=f(B, F_LAT, H // 8, W // 8, 16),
        t=jnp.asarray([[900.0, 300.0]], jnp.float32),
        ctx=jnp.asarray(ctx),
        clip=f(B, 257, 1280),
        y=f(B, F_LAT, H // 8, W // 8, 20),
        pose=jnp.asarray(rng.uniform(0, 1, (B, 4 * F_LAT, H, W, 3)), jnp.float32),
        ref_pose=jnp.asarray(rng.uniform(0, 1, (B, H, W, 3)), jnp.float32),
    )


@pytest.fixture(scope="module", params=["tiny_teacher", "tiny_student"])
def model(request):
    cfg = ua.get_config(request.param)
    return random_model(lambda: ua.PoseDiT(cfg, rngs=nnx.Rngs(0)), 1)


def test_forward_all_modes(model):
    inp = _inputs()
    tok = model.encode_pose(inp["pose"])
    ref = model.encode_ref_pose(inp["ref_pose"])
    assert tok.shape == (B, F_LAT, H // 16, W // 16, model.cfg.dit.dim)
    assert ref.shape == (B, H // 8, W // 8, 20)
    fwd = nnx.jit(lambda m, c: m(inp["x"], inp["t"], inp["ctx"], clip_fea=c.clip_fea, y=c.y,
                                 pose_tokens=c.pose_tokens))
    outs = {}
    for mode in ua.MODES:
        c = ua.resolve_conditioning(mode, clip_fea=inp["clip"], ref_latent_y=inp["y"], pose_tokens=tok,
                                    ref_pose_feat=ref)
        if mode == "image":
            assert c.pose_tokens is None and c.y is inp["y"]
        elif mode == "pose":
            # UA image dropout: CLIP = 0, y = 0 + ref pose (broadcast over frames and all 20 channels)
            assert float(jnp.abs(c.clip_fea).max()) == 0.0
            np.testing.assert_array_equal(np.asarray(c.y), np.broadcast_to(np.asarray(ref)[:, None], c.y.shape))
        else:
            np.testing.assert_array_equal(np.asarray(c.y), np.asarray(inp["y"]) + np.asarray(ref)[:, None])
        o = np.asarray(fwd(model, c))
        assert o.shape == (B, F_LAT, H // 8, W // 8, 16) and np.isfinite(o).all()
        outs[mode] = o
    scale = np.abs(outs["pose+image"]).max()
    assert scale > 1e-2
    # every pair of modes changes the inputs, so the flows must differ well above float noise
    for a, b in (("pose+image", "image"), ("pose+image", "pose"), ("image", "pose")):
        assert np.abs(outs[a] - outs[b]).max() > 1e-3 * scale, (a, b)


def test_missing_inputs_name_the_flag():
    z = jnp.zeros((1, 2, 4, 6, 20))
    r = jnp.zeros((1, 4, 6, 20))
    with pytest.raises(ua.ConditioningError, match=r"pose_tokens.*--pose"):
        ua.resolve_conditioning("pose", ref_pose_feat=r)
    with pytest.raises(ua.ConditioningError, match=r"ref_pose_feat.*--ref-pose"):
        ua.resolve_conditioning("pose+image", clip_fea=jnp.zeros((1, 257, 1280)), ref_latent_y=z,
                                pose_tokens=jnp.zeros((1, 2, 2, 3, 64)))
    with pytest.raises(ua.ConditioningError, match=r"clip_fea.*--ref"):
        ua.resolve_conditioning("image", ref_latent_y=z)
    with pytest.raises(ua.ConditioningError, match=r"conditioning\.mode"):
        ua.resolve_conditioning("text-only", clip_fea=None)
    with pytest.raises(ua.ConditioningError, match=r"disagree"):
        ua.condition_y(z, jnp.zeros((1, 8, 6, 20)))
    with pytest.raises(ValueError, match=r"proj_dim"):
        ua.PoseDiTConfig(dit_lib.get_config("tiny_i2v"), ua.get_config("tiny_student").pose.__class__(out_dim=96))


def test_student_from_backbone_reproduces_backbone():
    cfg = ua.get_config("tiny_student")
    backbone = random_model(lambda: dit_lib.WanDiT(dit_lib.get_config("tiny"), rngs=nnx.Rngs(0)), 4)
    # a student whose own init is random everywhere (incl. pose_proj, v_img): the init must overwrite it
    student = random_model(lambda: ua.PoseDiT(cfg, rngs=nnx.Rngs(0)), 6)
    ua.init_student_from_backbone(student, nnx.state(backbone, nnx.Param))
    inp = _inputs(1)
    ref = nnx.jit(lambda m: m(inp["x"], inp["t"], inp["ctx"]))(backbone)

    def student_fwd(m):
        tok = m.encode_pose(inp["pose"])
        c = ua.resolve_conditioning("pose+image", clip_fea=inp["clip"], ref_latent_y=inp["y"], pose_tokens=tok,
                                    ref_pose_feat=m.encode_ref_pose(inp["ref_pose"]))
        return m(inp["x"], inp["t"], inp["ctx"], clip_fea=c.clip_fea, y=c.y, pose_tokens=c.pose_tokens), tok

    student_fwd = nnx.jit(student_fwd)
    out, tok = student_fwd(student)
    assert float(jnp.abs(tok).max()) == 0.0          # pose_proj is zero
    ref, out = np.asarray(ref), np.asarray(out)
    assert np.abs(ref).max() > 0.1
    # The extra terms are exact zeros (zero kernel rows / v_img / pose tokens); only the patch-embedding
    # contraction length changes (64 -> 144 terms, the extra ones 0), i.e. at most summation order:
    # 1e-6 absolute on outputs of scale ~1.
    print(f"\nstudent vs backbone: max abs {np.abs(out - ref).max():.2e}, scale {np.abs(ref).max():.2f}")
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    # sensitivity: a nonzero v_img (image branch) must change the output
    randomize(student, 7, paths=("dit/blocks/cross_attn/v_img/",))
    out2 = np.asarray(student_fwd(student)[0])
    assert np.abs(out2 - ref).max() > 1e-3


def test_student_init_rejects_wrong_backbone():
    student = nnx.eval_shape(lambda: ua.PoseDiT(ua.get_config("tiny_student"), rngs=nnx.Rngs(0)))
    wrong = nnx.eval_shape(lambda: dit_lib.WanDiT(dit_lib.get_config("tiny", ffn_dim=96), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"blocks/ffn/fc1/kernel.*\(2, 64, 96\)"):
        ua.init_student_from_backbone(student, nnx.state(wrong, nnx.Param))


# ----------------------------------------------------------------------------------------------
# lazy pose weights (converters.unianimate)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("ua_src")
    sd = wan_dit_state_dict(**{**TINY_DIT, "in_dim": 36}, i2v=True, seed=11)
    save_safetensors(sd, d / "diffusion_pytorch_model.safetensors")
    pose_sd = ua_pose_state_dict(ua.get_config("tiny_teacher").pose, seed=12)
    # UA's file also holds the LoRA: it must be skipped (with a warning) by the lazy converter
    full = dict(pose_sd)
    full["pipe.dit.blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(4, 64)
    full["pipe.dit.blocks.0.self_attn.q.lora_B.default.weight"] = torch.zeros(64, 4)
    torch.save(full, d / "ua.ckpt")
    return d, sd, pose_sd


def _check_pose_params(params, pose_sd, skip=()):
    for k, v in pose_sd.items():
        if k in skip:
            continue
        mod, idx, kind = k.split(".")
        want = conv_t(to_numpy(v)) if kind == "weight" else to_numpy(v)
        got = params[f"pose/{mod}/{idx}/{'kernel' if kind == 'weight' else 'bias'}"]
        np.testing.assert_array_equal(got, want, err_msg=k)


def test_lazy_pose_weights_strict(sources, tmp_path):
    d, sd, pose_sd = sources
    out = ua_conv.main(["--base", str(d / "diffusion_pytorch_model.safetensors"), "--pose", str(d / "ua.ckpt"),
                        "--out", str(tmp_path / "ck"), "--preset", "tiny_teacher", "--dtype", "float32",
                        "--strict"])
    assert out == 0
    m = load_model(tmp_path / "ck", ua.build_pose_dit)
    assert isinstance(m, ua.PoseDiT) and m.cfg == ua.get_config("tiny_teacher")
    p = ua.param_arrays(m)
    _check_pose_params(p, pose_sd)
    # backbone: exact copies of the source (transposed where PyTorch stores [out, in])
    np.testing.assert_array_equal(p["dit/blocks/cross_attn/v_img/kernel"][1],
                                  linear_t(to_numpy(sd["blocks.1.cross_attn.v_img.weight"])))
    np.testing.assert_array_equal(p["dit/head/head/bias"], to_numpy(sd["head.head.bias"]))

    # a converted wanjax pose directory works as --pose too
    assert pose_conv.main(["--src", str(d / "ua.ckpt"), "--out", str(tmp_path / "pose")]) == 0
    ua_conv.convert_unianimate(d / "diffusion_pytorch_model.safetensors", tmp_path / "pose", tmp_path / "ck2",
                               preset="tiny_teacher", dtype="float32", strict=True, progress=False)
    p2 = ua.param_arrays(load_model(tmp_path / "ck2", ua.build_pose_dit))
    _check_pose_params(p2, pose_sd)


def test_lazy_pose_missing_key(sources, tmp_path, caplog):
    d, sd, pose_sd = sources
    partial = {k: v for k, v in pose_sd.items() if k != "dwpose_embedding.12.bias"}
    torch.save(partial, tmp_path / "partial.ckpt")
    base = d / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ConversionError, match=r"missing pose key\(s\) \['dwpose_embedding\.12\.bias'\]"):
        ua_conv.convert_unianimate(base, tmp_path / "partial.ckpt", tmp_path / "a", preset="tiny_teacher",
                                   dtype="float32", strict=True, progress=False)
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.WARNING, logger="wanjax.convert.unianimate"):
        ua_conv.convert_unianimate(base, tmp_path / "partial.ckpt", tmp_path / "b", preset="tiny_teacher",
                                   dtype="float32", strict=False, progress=False)
    assert "dwpose_embedding.12.bias" in caplog.text
    p = ua.param_arrays(load_model(tmp_path / "b", ua.build_pose_dit))
    _check_pose_params(p, pose_sd, skip=("dwpose_embedding.12.bias",))
    init = PoseConditioner(ua.get_config("tiny_teacher").pose, rngs=nnx.Rngs(0))  # the documented init
    np.testing.assert_array_equal(p["pose/dwpose_embedding/12/bias"],
                                  np.asarray(init.dwpose_embedding[12].bias[...]))
    # unexpected pose keys are always an error, strict or not
    extra = dict(pose_sd)
    extra["dwpose_embedding.14.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.ckpt")
    with pytest.raises(ConversionError, match=r"unexpected key 'pose::dwpose_embedding\.14\.weight'"):
        ua_conv.convert_unianimate(base, tmp_path / "extra.ckpt", tmp_path / "c", preset="tiny_teacher",
                                   dtype="float32", progress=False)


def test_student_pose_from_ua_file_gets_zero_proj(sources, tmp_path):
    """Student preset: the UA pose file (no pose_proj) fills the 96-wide trunk, pose_proj is zero."""
    d, _, _ = sources
    pose_sd = ua_pose_state_dict(ua.get_config("tiny_student").pose, seed=13)
    torch.save(pose_sd, tmp_path / "p.ckpt")
    sd = wan_dit_state_dict(**{**TINY_DIT, "in_dim": 36}, i2v=True, seed=14)
    save_safetensors(sd, tmp_path / "base.safetensors")
    ua_conv.convert_unianimate(tmp_path / "base.safetensors", tmp_path / "p.ckpt", tmp_path / "ck",
                               preset="tiny_student", dtype="float32", strict=True, progress=False)
    p = ua.param_arrays(load_model(tmp_path / "ck", ua.build_pose_dit))
    _check_pose_params(p, pose_sd)
    assert p["pose/pose_proj/kernel"].shape == (96, 64) and not p["pose/pose_proj/kernel"].any()
