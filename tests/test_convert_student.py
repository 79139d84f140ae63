"""converters.student: file-level widening of a converted T2V backbone + UA pose modules into the pose
student checkpoint. The converted student computes exactly what the backbone computes, its DiT part is
what init_student_from_backbone makes in memory, its pose modules are the source file's, and a backbone
of the wrong preset is refused by name."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import wanjax  # noqa: F401
from converters import dit as dit_conv
from converters import pose as pose_conv
from converters import student as student_conv
from converters.common import ConversionError, flatten_params
from tests.test_unianimate import _check_pose_params, _inputs, random_model, ua_pose_state_dict
from tests.wan_fixtures import TINY_DIT, save_safetensors, wan_dit_state_dict
from wanjax.checkpoint import load_model
from wanjax.models import dit as dit_lib
from wanjax.models import unianimate as ua

PRESET = "tiny_student"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("student_src")
    save_safetensors(wan_dit_state_dict(**TINY_DIT, seed=21), d / "sf.safetensors")
    backbone = dit_conv.convert_dit(d / "sf.safetensors", d / "backbone", dtype="float32", preset="tiny",
                                    progress=False)
    pose_sd = ua_pose_state_dict(ua.get_config(PRESET).pose, seed=22)
    full = dict(pose_sd)  # UA's file also holds the LoRA, skipped by the converter
    full["pipe.dit.blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(4, 64)
    torch.save(full, d / "ua.ckpt")
    out = student_conv.convert_student(backbone, d / "ua.ckpt", d / "student", preset=PRESET, progress=False)
    return d, backbone, pose_sd, out


def test_student_reproduces_backbone(files):
    _, backbone_dir, _, out = files
    backbone = load_model(backbone_dir, dit_lib.build)
    student = load_model(out, ua.build_pose_dit)
    assert student.cfg == ua.get_config(PRESET)
    inp = _inputs(3)
    ref = np.asarray(nnx.jit(lambda m: m(inp["x"], inp["t"], inp["ctx"]))(backbone))

    @nnx.jit
    def student_fwd(m, clip, y, pose_video):
        return m(inp["x"], inp["t"], inp["ctx"], clip_fea=clip, y=y, pose_tokens=m.encode_pose(pose_video))

    zero = student_fwd(student, jnp.zeros_like(inp["clip"]), jnp.zeros_like(inp["y"]), jnp.zeros_like(inp["pose"]))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_array_equal(np.asarray(zero), ref)  # zero pose / image inputs: exactly the backbone
    # real conditioning: the new paths are exact zeros (pose_proj, v_img, y rows of the patch kernel), so
    # only the summation length of the widened patch contraction differs (cf. test_unianimate)
    full = student_fwd(student, inp["clip"], inp["y"], inp["pose"])
    np.testing.assert_allclose(np.asarray(full), ref, rtol=0, atol=1e-6)


def test_student_params_match_in_memory_init_and_pose_file(files):
    d, backbone_dir, pose_sd, out = files
    got = ua.param_arrays(load_model(out, ua.build_pose_dit))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "pose_dit" and cfg["converted_from"]["converter"] == "converters.student"
    # DiT part: what init_student_from_backbone makes in memory from the same backbone, except the image
    # branch it keeps from the student's own init (img_emb, k_img, norm_k_img; v_img is zeroed)
    backbone = nnx.state(load_model(backbone_dir, dit_lib.build), nnx.Param)
    ref = random_model(lambda: ua.PoseDiT(ua.get_config(PRESET), rngs=nnx.Rngs(0)), 6)
    want = ua.param_arrays(ua.init_student_from_backbone(ref, backbone))
    in_backbone = set(flatten_params(nnx.to_pure_dict(backbone)))
    kept = {k for k in want if k.startswith("dit/") and k[4:] not in in_backbone and "/v_img/" not in k}
    assert kept == {k for k in want if k.startswith(("dit/img_emb/", "dit/blocks/cross_attn/k_img/",
                                                     "dit/blocks/cross_attn/norm_k_img/"))}
    assert {k for k in want if k.startswith("dit/")} == {k for k in got if k.startswith("dit/")}
    for k in want:
        if k.startswith("dit/") and k not in kept:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # ... and the image branch is PoseDiT(cfg, rngs=nnx.Rngs(0))'s init (computed alone), layer by layer
    init = student_conv.init_values(ua.get_config(PRESET), [k[4:] for k in sorted(kept)], seed=0)
    for k in kept:
        np.testing.assert_array_equal(got[k], init[k[4:]], err_msg=k)
    assert not got["dit/blocks/cross_attn/v_img/kernel"].any() and got["dit/blocks/cross_attn/k_img/kernel"].any()
    # pose modules: the UA file's, unchanged; pose_proj zero
    _check_pose_params(got, pose_sd)
    assert got["pose/pose_proj/kernel"].shape == (96, 64) and not got["pose/pose_proj/kernel"].any()
    # a converted pose directory (no --proj-dim) gives the same student
    assert pose_conv.main(["--src", str(d / "ua.ckpt"), "--out", str(d / "pose")]) == 0
    out2 = student_conv.convert_student(backbone_dir, d / "pose", d / "student2", preset=PRESET, progress=False)
    got2 = ua.param_arrays(load_model(out2, ua.build_pose_dit))
    for k in got:
        np.testing.assert_array_equal(got2[k], got[k], err_msg=k)


def test_wrong_backbone_preset_is_refused(files, tmp_path):
    d, backbone_dir, _, _ = files
    sd = wan_dit_state_dict(**{**TINY_DIT, "ffn_dim": 96, "num_layers": 3}, seed=23)
    save_safetensors(sd, tmp_path / "wrong.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4}))
    wrong = dit_conv.convert_dit(tmp_path / "wrong.safetensors", tmp_path / "wrong", dtype="float32",
                                 preset="auto", progress=False)
    rc = student_conv.main(["--backbone", str(wrong), "--pose", str(d / "ua.ckpt"), "--out", str(tmp_path / "s"),
                            "--preset", PRESET])
    assert rc == 2 and not (tmp_path / "s").exists()
    with pytest.raises(ConversionError, match=r"not the backbone of preset 'tiny_student': ffn_dim=96 \(preset "
                                              r"needs 128\); num_layers=3 \(preset needs 2\)"):
        student_conv.convert_student(wrong, d / "ua.ckpt", tmp_path / "s", preset=PRESET, progress=False)
    # the default preset (the 1.3B student) refuses the tiny backbone the same way
    with pytest.raises(ConversionError, match=r"dim=64 \(preset needs 1536\)"):
        student_conv.convert_student(backbone_dir, d / "ua.ckpt", tmp_path / "s", progress=False)
    assert not list(tmp_path.glob(".s.*")) and not (tmp_path / "s").exists()
