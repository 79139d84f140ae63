"""converters.dit: Self-Forcing .pt round trip, and clear errors for bad checkpoints."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import wanjax  # noqa: F401
from converters import dit as dit_conv
from converters.common import ConversionError
from wanjax import checkpoint
from wanjax.models import dit as dit_lib
from tests.wan_fixtures import TINY_DIT, save_safetensors, to_numpy, wan_dit_state_dict


def _leaves(ck):
    m = checkpoint.load_model(ck, dit_lib.build)
    return jax.tree.leaves(nnx.state(m, nnx.Param))


def test_self_forcing_pt_roundtrip(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=5)
    ema = {f"model._fsdp_wrapped_module.{k}": v * 2 for k, v in sd.items()}
    gen = {f"model.{k}": v for k, v in sd.items()}
    torch.save({"generator": gen, "generator_ema": ema, "critic": gen}, tmp_path / "sf.pt")
    save_safetensors({k: v * 2 for k, v in sd.items()}, tmp_path / "ref.safetensors")
    a = dit_conv.convert_dit(tmp_path / "sf.pt", tmp_path / "a", dtype="float32", preset="tiny", progress=False)
    b = dit_conv.convert_dit(tmp_path / "ref.safetensors", tmp_path / "b", dtype="float32", preset="tiny",
                             progress=False)
    for u, v in zip(_leaves(a), _leaves(b)):  # generator_ema was preferred, wrappers stripped
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # and the converted params are the source tensors (spot check a transposed linear)
    m = checkpoint.load_model(a, dit_lib.build)
    np.testing.assert_array_equal(np.asarray(m.blocks.self_attn.q.kernel[...][1]),
                                  to_numpy(sd["blocks.1.self_attn.q.weight"] * 2).T)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model"] == "dit" and cfg["num_layers"] == 2


def test_generator_used_when_no_ema(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=6)
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "ode_init.pt")
    out = dit_conv.convert_dit(tmp_path / "ode_init.pt", tmp_path / "o", dtype="float32", preset="tiny",
                               progress=False)
    assert (out / "params").exists()


def _assert_clean(tmp_path, name):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")]


def test_missing_and_unexpected_keys(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=7)
    del sd["blocks.1.cross_attn.o.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        dit_conv.convert_dit(tmp_path / "bad.safetensors", tmp_path / "out", preset="tiny", progress=False)
    msg = str(e.value)
    assert "missing key 'blocks.1.cross_attn.o.bias'" in msg and "(64,)" in msg
    assert "unexpected key 'blocks.0.extra.weight'" in msg
    _assert_clean(tmp_path, "out")


def test_wrong_shape_names_key_and_shapes(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=8)
    sd["blocks.0.ffn.0.weight"] = torch.zeros(96, 64)
    save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        dit_conv.convert_dit(tmp_path / "bad.safetensors", tmp_path / "out", preset="tiny", progress=False)
    msg = str(e.value)
    assert "blocks.0.ffn.0.weight (96, 64)" in msg and "(64, 128)" in msg
    _assert_clean(tmp_path, "out")


def test_truncated_files(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=9)
    save_safetensors(sd, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        dit_conv.convert_dit(tmp_path / "cut.safetensors", tmp_path / "out", preset="tiny", progress=False)
    torch.save(sd, tmp_path / "m.pth")
    raw = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt|corrupt"):
        dit_conv.convert_dit(tmp_path / "cut.pth", tmp_path / "out", preset="tiny", progress=False)
    _assert_clean(tmp_path, "out")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_objects_is_refused(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=10)
    sd["evil"] = _Evil()
    torch.save(sd, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match="never unpickles arbitrary"):
        dit_conv.convert_dit(tmp_path / "evil.pth", tmp_path / "out", preset="tiny", progress=False)


def test_sharded_native_dir_with_config_and_cli(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=11)
    keys = sorted(sd)
    half = len(keys) // 2
    d = tmp_path / "wan"
    d.mkdir()
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    save_safetensors({k: sd[k] for k in keys[:half]}, d / names[0])
    save_safetensors({k: sd[k] for k in keys[half:]}, d / names[1])
    index = {"weight_map": {k: names[0] if i < half else names[1] for i, k in enumerate(keys)}}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text(json.dumps({"dim": 64, "num_heads": 4, "num_layers": 2}))
    r = subprocess.run([sys.executable, "-m", "converters.dit", "--src", str(d), "--out", str(tmp_path / "ck"),
                        "--dtype", "float32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "peak RSS" in r.stderr
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (cfg["dim"], cfg["num_heads"], cfg["ffn_dim"], cfg["text_dim"]) == (64, 4, 128, 32)
    # a second run refuses to overwrite
    r = subprocess.run([sys.executable, "-m", "converters.dit", "--src", str(d), "--out", str(tmp_path / "ck")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_checkpoint_preset_mismatch_is_reported(tmp_path):
    sd = wan_dit_state_dict(**TINY_DIT, seed=12)
    save_safetensors(sd, tmp_path / "m.safetensors")
    ck = dit_conv.convert_dit(tmp_path / "m.safetensors", tmp_path / "ck", dtype="float32", preset="tiny",
                              progress=False)
    wrong = lambda cfg, rngs: dit_lib.build(dit_lib.get_config("tiny", ffn_dim=96), rngs)
    with pytest.raises(checkpoint.CheckpointError, match="blocks/ffn/fc1/kernel"):
        checkpoint.load_model(ck, wrong)
