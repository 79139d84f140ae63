"""converters.dit: Self-Forcing .pt round trip, clear errors for bad checkpoints, and the streaming
checkpoint writer (same checkpoint as the stock Orbax save, restored by the unchanged load path)."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import wanjax  # noqa: F401
from converters import common
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
    # plain copies are shape-checked before any data is read
    sd = wan_dit_state_dict(**TINY_DIT, seed=8)
    sd["blocks.1.norm3.bias"] = torch.zeros(63)
    save_safetensors(sd, tmp_path / "bad2.safetensors")
    with pytest.raises(ConversionError, match=r"shape mismatch for blocks/norm3/bias\[1\]: source "
                                              r"blocks\.1\.norm3\.bias \(63,\), the model expects \(64,\)"):
        common.check_plan(*_plan_of(tmp_path / "bad2.safetensors"))
    _assert_clean(tmp_path, "out")


def _plan_of(path, dtype="float32"):
    """(source, plan, targets) of the tiny preset for a Wan-native safetensors file."""
    src, _ = dit_conv.load_source(path)
    cfg = dit_conv.resolve_config(src, None, "tiny", dtype)
    return src, dit_conv.dit_plan(src, cfg), dit_conv.abstract_targets(cfg)


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_write_matches_stock_orbax_save(tmp_path, dtype):
    """write_params streams host arrays chunk by chunk (here 4 KiB chunks, so the stacked kernels span many
    chunks and writes); the checkpoint restores through the unchanged load path bit for bit like the stock
    Orbax save of the same disk-backed buffers, with the same Orbax metadata."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    sd = wan_dit_state_dict(**TINY_DIT, seed=13)
    save_safetensors(sd, tmp_path / "m.safetensors")
    src, plan, targets = _plan_of(tmp_path / "m.safetensors", dtype)
    work = tmp_path / "work"
    work.mkdir()
    params = common.materialize(src, plan, targets, dtype=jax.numpy.dtype(dtype), workdir=work)
    tree = common.unflatten_params(params)
    config = {"model": "dit", **dit_conv.resolve_config(src, None, "tiny", dtype).to_dict()}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=2)).save(
        tmp_path / "old" / "params", args=ocp.args.StandardSave(tree))
    checkpoint.write_params(tmp_path / "new", tree, config, chunk_bytes=4096, write_bytes=3 * 4096)

    fc1 = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/new/params/",
                                                 "path": "blocks.ffn.fc1.kernel"}}).result()
    assert fc1.shape == (2, 64, 128) and tuple(fc1.chunk_layout.write_chunk.shape) != (2, 64, 128)
    for f in ("_METADATA", "_CHECKPOINT_METADATA"):
        old, new = (json.loads((tmp_path / d / "params" / f).read_text()) for d in ("old", "new"))
        for m in (old, new):
            for stamp in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
                m.pop(stamp, None)
        assert old == new, f
    a = nnx.to_pure_dict(nnx.state(checkpoint.load_model(tmp_path / "old", dit_lib.build), nnx.Param))
    b = nnx.to_pure_dict(nnx.state(checkpoint.load_model(tmp_path / "new", dit_lib.build), nnx.Param))
    flat_a, flat_b = common.flatten_params(a), common.flatten_params(b)
    assert set(flat_a) == set(flat_b) == set(params)
    for k, v in flat_a.items():
        assert v.dtype == jax.numpy.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(flat_b[k]), np.asarray(v), err_msg=k)
        np.testing.assert_array_equal(np.asarray(flat_b[k]), np.asarray(params[k]), err_msg=k)


def test_chunk_layout_covers_arrays_contiguously():
    from wanjax.checkpoint import c_order_chunks, write_regions

    assert c_order_chunks((40, 5120, 13824), 2, 64 * 2**20) == (1, 2427, 13824)  # 14B FFN kernel, bf16
    assert c_order_chunks((30, 1536, 8960), 2, 64 * 2**20) == (2, 1536, 8960)
    assert c_order_chunks((7,), 4, 1024) == (7,)
    for shape, itemsize, chunk_limit, budget in [((5, 6, 7), 4, 40, 100), ((40, 5120, 13824), 2, 2**26, 2**28),
                                                  ((3,), 4, 4, 4), ((), 4, 4, 4)]:
        chunk = c_order_chunks(shape, itemsize, chunk_limit)
        seen = np.zeros(shape, np.int32) if np.prod(shape) < 1e6 else None
        offset = 0
        for box in write_regions(shape, chunk, itemsize, budget):
            lo = np.ravel_multi_index([s.start for s in box], shape) if shape else 0
            n = int(np.prod([s.stop - s.start for s in box]))
            assert lo == offset  # boxes follow each other in memory: each is one contiguous run
            offset += n
            assert n * itemsize <= max(budget, int(np.prod(chunk)) * itemsize)
            if seen is not None:
                seen[box] += 1
        assert offset == int(np.prod(shape))
        if seen is not None:
            assert (seen == 1).all()
