"""LoRA: converters.merge_lora (UA .ckpt layout) against an independent numpy merge, the merged
PoseDiT against the unmerged runtime LoRA (wanjax.lora.attach_lora), apply_lora, and the errors for
LoRA targets that do not exist."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import wanjax  # noqa: F401
from converters import merge_lora as ml
from converters.common import ConversionError, conv_t, linear_t
from tests.test_unianimate import random_model, ua_pose_state_dict
from tests.wan_fixtures import TINY_DIT, save_safetensors, to_numpy, wan_dit_state_dict
from wanjax import lora as lora_lib
from wanjax.checkpoint import load_model
from wanjax.models import dit as dit_lib
from wanjax.models import unianimate as ua

RANK, ALPHA = 4, 0.7
D, FF, LAYERS = TINY_DIT["dim"], TINY_DIT["ffn_dim"], TINY_DIT["num_layers"]


def _shape(module):
    """(out, in) of a Wan linear."""
    return {"ffn.0": (FF, D), "ffn.2": (D, FF)}.get(module, (D, D))


def ua_lora_state_dict(seed=0, std=0.1, extra=()) -> dict[str, torch.Tensor]:
    """UA's key names (spec 7.2) for every block x UA target; both A and B nonzero (trained state)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(LAYERS):
        for m in lora_lib.UA_TARGETS + tuple(extra):
            out, din = _shape(m)
            sd[f"pipe.dit.blocks.{i}.{m}.lora_A.default.weight"] = torch.randn(RANK, din, generator=g) * std
            sd[f"pipe.dit.blocks.{i}.{m}.lora_B.default.weight"] = torch.randn(out, RANK, generator=g) * std
    return sd


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = wan_dit_state_dict(**{**TINY_DIT, "in_dim": 36}, i2v=True, seed=21)
    save_safetensors(base, d / "base.safetensors")
    lora = ua_lora_state_dict(seed=22)
    pose = ua_pose_state_dict(ua.get_config("tiny_teacher").pose, seed=23)
    torch.save({**lora, **pose}, d / "ua.ckpt")
    rc = ml.main(["--base", str(d / "base.safetensors"), "--lora", str(d / "ua.ckpt"), "--out", str(d / "ck"),
                  "--alpha", str(ALPHA), "--dtype", "float32", "--device", "cpu", "--preset", "tiny_teacher"])
    assert rc == 0
    model = load_model(d / "ck", ua.build_pose_dit)
    return d, base, lora, pose, model


def test_merge_equals_numpy(merged):
    _, base, lora, pose, model = merged
    p = ua.param_arrays(model)
    n = 0
    for i in range(LAYERS):
        for m in lora_lib.UA_TARGETS:
            w = to_numpy(base[f"blocks.{i}.{m}.weight"])
            a = to_numpy(lora[f"pipe.dit.blocks.{i}.{m}.lora_A.default.weight"])
            b = to_numpy(lora[f"pipe.dit.blocks.{i}.{m}.lora_B.default.weight"])
            want = (w + np.float32(ALPHA) * (b @ a)).T   # UA: W + alpha * B@A, no alpha/r; kernel [in, out]
            grp, lin = lora_lib.MODULES[m]
            got = p[f"dit/blocks/{grp}/{lin}/kernel"][i]
            # same fp32 operations on both sides; allow fp32 rounding of |W| ~ 0.3 (ulp ~ 3e-8)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"blocks.{i}.{m}")
            assert np.abs(got - w.T).max() > 1e-3      # the update is really there
            n += 1
    assert n == 10 * LAYERS
    # non-adapted weights are the base unchanged (k_img is not a UA target)
    np.testing.assert_array_equal(p["dit/blocks/cross_attn/k_img/kernel"][1],
                                  linear_t(to_numpy(base["blocks.1.cross_attn.k_img.weight"])))
    np.testing.assert_array_equal(p["dit/blocks/self_attn/q/bias"][0], to_numpy(base["blocks.0.self_attn.q.bias"]))
    # the file's pose modules are in the output
    np.testing.assert_array_equal(p["pose/dwpose_embedding/12/kernel"], conv_t(to_numpy(pose["dwpose_embedding.12.weight"])))
    np.testing.assert_array_equal(p["pose/randomref_embedding_pose/10/bias"],
                                  to_numpy(pose["randomref_embedding_pose.10.bias"]))


def test_merged_equals_runtime_lora(merged):
    d, base, lora, _, model = merged
    # the un-merged base DiT, converted by converters.dit
    from converters import dit as dit_conv
    ck = dit_conv.convert_dit(d / "base.safetensors", d / "base_ck", dtype="float32", preset="tiny_i2v",
                              progress=False)
    base_dit = load_model(ck, dit_lib.build)
    lw = lora_lib.LoRAWeights.from_state_dict(lora)
    assert len(lw) == 10 * LAYERS and lw.rank == RANK
    runtime = lora_lib.attach_lora(base_dit, lw, alpha=ALPHA)
    assert isinstance(runtime.blocks.self_attn, lora_lib.LoRASelfAttention)
    assert isinstance(base_dit.blocks.ffn.fc1, type(base_dit.blocks.ffn.fc2))  # the original is untouched
    # apply_lora (merged view) == the converter's merge
    view = lora_lib.apply_lora(nnx.to_pure_dict(nnx.state(base_dit, nnx.Param)), lw, alpha=ALPHA)
    conv = ua.param_arrays(model)
    for m in ("self_attn/q", "cross_attn/o", "ffn/fc1"):
        g, l_ = m.split("/")
        np.testing.assert_allclose(np.asarray(view["blocks"][g][l_]["kernel"]), conv[f"dit/blocks/{m}/kernel"],
                                   rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 6, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((1, 2, 4, 6, 20)), jnp.float32)
    ctx = np.zeros((1, 512, 32), np.float32)
    ctx[:, :6] = rng.standard_normal((1, 6, 32))
    clip = jnp.asarray(rng.standard_normal((1, 257, 1280)), jnp.float32)
    t = jnp.asarray([[800.0, 100.0]], jnp.float32)
    fwd = nnx.jit(lambda m: m(x, t, jnp.asarray(ctx), clip_fea=clip, y=y))
    o_merged, o_runtime, o_base = (np.asarray(fwd(m)) for m in (model.dit, runtime, base_dit))
    scale = np.abs(o_merged).max()
    assert scale > 0.1 and np.abs(o_merged - o_base).max() > 1e-2 * scale   # the adapter matters
    # fp32 both ways; the only difference is x@(W + dW) vs x@W + (x@A^T)@B^T summation order,
    # ~1e-6 relative per layer through 2 blocks: 1e-4 absolute on outputs of scale ~1-5
    print(f"\nmerged vs runtime LoRA: max abs {np.abs(o_runtime - o_merged).max():.2e}, scale {scale:.2f}")
    np.testing.assert_allclose(o_runtime, o_merged, rtol=0, atol=1e-4)


def test_lora_for_missing_module_errors(tmp_path, merged):
    d, _, lora, pose, _ = merged
    # a block the base does not have
    bad = dict(lora)
    bad["pipe.dit.blocks.5.self_attn.q.lora_A.default.weight"] = torch.zeros(RANK, D)
    bad["pipe.dit.blocks.5.self_attn.q.lora_B.default.weight"] = torch.zeros(D, RANK)
    torch.save({**bad, **pose}, tmp_path / "bad.ckpt")
    with pytest.raises(ConversionError, match=r"LoRA target blocks\.5\.self_attn\.q does not exist"):
        ml.merge_lora(d / "base.safetensors", tmp_path / "bad.ckpt", tmp_path / "o", alpha=1.0,
                      dtype="float32", preset="tiny_teacher", progress=False)
    assert not (tmp_path / "o").exists()
    # a module a T2V base lacks (k_img), through the CLI: exit code 2 and the name on stderr
    t2v = wan_dit_state_dict(**TINY_DIT, seed=24)
    save_safetensors(t2v, tmp_path / "t2v.safetensors")
    bad2 = ua_lora_state_dict(seed=25, extra=("cross_attn.k_img",))
    torch.save(bad2, tmp_path / "bad2.ckpt")
    with pytest.raises(ConversionError, match=r"blocks\.0\.cross_attn\.k_img does not exist"):
        ml.merge_plan(ml.dit_conv.load_source(tmp_path / "t2v.safetensors")[0], dit_lib.get_config("tiny"),
                      ml.read_lora(ml.pose_conv.normalize_source(ml.common.open_tensor_source(tmp_path / "bad2.ckpt")))[0],
                      1.0)
    # a module name that is not an adaptable linear, and an unpaired A
    with pytest.raises(ConversionError, match=r"head\.head"):
        ml.merge_plan(ml.dit_conv.load_source(tmp_path / "t2v.safetensors")[0], dit_lib.get_config("tiny"),
                      {"head.head": ("x", "y")}, 1.0)
    lone = {"pipe.dit.blocks.0.ffn.0.lora_A.default.weight": torch.zeros(RANK, D), **pose}
    torch.save(lone, tmp_path / "lone.ckpt")
    with pytest.raises(ConversionError, match=r"only one of lora_A / lora_B: \['blocks\.0\.ffn\.0'\]"):
        ml.merge_lora(d / "base.safetensors", tmp_path / "lone.ckpt", tmp_path / "o2", preset="tiny_teacher",
                      dtype="float32", progress=False)
    # the runtime helpers reject missing modules too
    tiny = random_model(lambda: dit_lib.WanDiT(dit_lib.get_config("tiny"), rngs=nnx.Rngs(0)), 0)
    k_img = lora_lib.LoRAWeights({"blocks.0.cross_attn.k_img": (np.zeros((RANK, D)), np.zeros((D, RANK)))})
    with pytest.raises(lora_lib.LoRAError, match=r"blocks\.0\.cross_attn\.k_img does not exist"):
        lora_lib.attach_lora(tiny, k_img)
    with pytest.raises(lora_lib.LoRAError, match=r"blocks\.0\.cross_attn\.k_img does not exist"):
        lora_lib.apply_lora(nnx.to_pure_dict(nnx.state(tiny, nnx.Param)), k_img)
