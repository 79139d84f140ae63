"""train.generate_teacher on a tiny random teacher (tests.test_pipeline.make_tiny_ckpt): agreed keys and
shapes, parity with TeacherPipeline, kill + resume = uninterrupted (bytes), CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tests.test_pipeline import H, W, make_tiny_ckpt, pose_frames, ref_image

NUM_FRAMES = 9
F = (NUM_FRAMES - 1) // 4 + 1
KEYS = {"noise": ("float32", (F, H // 8, W // 8, 16)), "context": ("float32", (512, 32)),
        "clip_fea": ("float32", (5, 1280)), "ref_y": ("float32", (F, H // 8, W // 8, 20)),
        "ref_pose": ("float32", (H, W, 3)), "pose": ("uint8", (NUM_FRAMES, H, W, 3)),
        "traj": ("float32", (4, F, H // 8, W // 8, 16)), "traj_sigmas": ("float32", (4,)),
        "x0": ("float32", (F, H // 8, W // 8, 16)), "pose_trunk": ("float32", (F, H // 8, W // 8, 4))}


class Killed(RuntimeError):
    pass


def teacher_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny random teacher checkpoint ``root/ckpt`` and a data folder ``root/data`` holding two
    reference images, ``ref.png`` and its upside-down ``ref2.png``."""
    ckpt = make_tiny_ckpt(root / "ckpt", teacher=True)
    data = root / "data"
    data.mkdir()
    Image.fromarray(ref_image()).save(data / "ref.png")
    Image.fromarray(ref_image()[::-1].copy()).save(data / "ref2.png")
    return ckpt, data


def _frames_dir(d: Path, frames: np.ndarray, ref_pose: np.ndarray | None = None) -> str:
    d.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / f"{i:03d}.png")
    if ref_pose is not None:
        Image.fromarray(ref_pose).save(d / "pose.png")
    return d.name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny teacher checkpoint + a 5-row manifest: frame folders (one with pose.png), an mp4, a keypoint
    file, and one row whose pose file is missing (skipped)."""
    from wanjax.pose import PoseSequence, save_keypoints
    from wanjax.pose.keypoints import invisible_hands
    from wanjax.videoio import VideoWriter

    root = tmp_path_factory.mktemp("gen")
    ckpt, data = teacher_inputs(root)
    with VideoWriter(data / "p2.mp4", fps=8) as vw:
        vw.append(pose_frames(NUM_FRAMES, seed=2))
    t = np.linspace(0, 1, 10, dtype=np.float32)[:, None]
    body = np.zeros((10, 20, 3), np.float32)
    body[..., 0] = 0.3 + 0.4 * t
    body[..., 1] = np.linspace(0.1, 0.9, 20)[None]
    body[..., 2] = 1.0
    save_keypoints(data / "kp.json", PoseSequence(body, invisible_hands(10), 64, 64))
    rows = [
        {"id": "s0", "ref": "ref.png", "pose": _frames_dir(data / "p0", pose_frames(NUM_FRAMES, 0),
                                                           pose_frames(1, 9)[0]), "prompt": "dance"},
        {"id": "s1", "ref": "ref2.png", "pose": "kp.json", "prompt": "dance"},
        {"id": "s2", "ref": "ref.png", "pose": "p2.mp4", "prompt": "dance", "ref_pose": "p0/pose.png"},
        {"id": "s3", "ref": "ref.png", "pose": "missing.mp4", "prompt": "dance"},
        {"id": "s4", "ref": "ref2.png", "pose": _frames_dir(data / "p4", pose_frames(12, 4)), "prompt": "dance",
         "seed": 1234},
    ]
    (data / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "ckpt": ckpt, "manifest": data / "m.jsonl"}


def _args(world, out, *extra):
    # batch 2 on data=2 x fsdp=4: the batch is sharded over `data`, the parameters over `fsdp`
    return ["--config", "configs/teacher.py:tiny", f"--config.ckpt_dir={world['ckpt']}",
            f"--config.prompt_embeds_path={world['ckpt'] / 'text.npz'}", f"--config.data.manifest={world['manifest']}",
            f"--config.out_dir={out}", "--config.data.on_bad_row=skip", "--config.data.rows_per_shard=3",
            "--config.batch_size=2", "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.progress=false",
            *extra]


@pytest.fixture(scope="module")
def full_run(world):
    from train.generate_teacher import main

    out = world["root"] / "full"
    assert main(_args(world, out)) == 0
    return out


def test_targets_have_agreed_keys_and_match_teacher_pipeline(world, full_run):
    import jax.numpy as jnp

    from tests.test_pipeline import tiny_cfg
    from wanjax import pipeline as P
    from wanjax import sampling
    from wanjax.data.targets import TargetReader
    from wanjax.distill.targets import initial_noise, sample_seed
    from wanjax.pipeline.teacher import TeacherPipeline

    r = TargetReader(full_run)
    assert r.ids == ["s0", "s1", "s2", "s4"]  # s3 (missing pose file) skipped
    assert sorted(p.name for p in full_run.iterdir()) == ["index-p00000.json", "index.json",
                                                          "shard-00000.safetensors", "shard-00001.safetensors"]
    _, st_sig = sampling.student_schedule(5.0)
    samples = {sid: r.get(sid) for sid in r.ids}
    for sid, d in samples.items():
        assert {k: (v.dtype.name, v.shape) for k, v in d.items()} == KEYS, sid
        assert all(np.isfinite(v).all() for v in d.values())
        np.testing.assert_array_equal(d["traj_sigmas"], st_sig)
        np.testing.assert_array_equal(d["traj"][0], d["noise"])  # student sigma 1 = the teacher's start
        assert np.abs(d["x0"] - d["noise"]).mean() > 0.05 and np.abs(d["traj"][3] - d["traj"][2]).mean() > 1e-3
        np.testing.assert_array_equal(d["ref_y"][:, :, :, :4].max(axis=(1, 2, 3)), [1.0] + [0.0] * (F - 1))
    meta = {sid: r.meta(sid) for sid in r.ids}
    assert meta["s4"]["seed"] == 1234 and meta["s0"]["seed"] == sample_seed("s0", 0)
    np.testing.assert_array_equal(samples["s4"]["noise"], initial_noise(1234, KEYS["noise"][1]))
    assert [meta[s]["ref_pose_source"] for s in r.ids] == ["pose.jpg", "first_pose_frame", "ref_pose",
                                                           "first_pose_frame"]
    m = meta["s0"]
    assert (m["sampler"], m["steps"], m["cfg_scale"], m["shift"], m["conditioning_mode"], m["teacher_preset"],
            m["num_frames"], m["H"], m["W"], m["prompt"], m["traj_mode"]) == \
        ("euler", 4, 1.5, 5.0, "pose+image", "tiny", 9, 32, 32, "dance", "exact_sigma")
    assert m["source"] == {"ref": "ref.png", "pose": "p0"} and m["manifest_line"] == 1
    np.testing.assert_array_equal(samples["s0"]["pose"], pose_frames(NUM_FRAMES, 0))
    np.testing.assert_array_equal(samples["s2"]["ref_pose"], samples["s0"]["ref_pose"])

    # parity: stored ref_y is build_y(..., ref_pose_feat=None); TeacherPipeline (batch 1, no mesh) fed
    # the stored conditioning gives the same x0 for the stored seed
    from wanjax.image import to_model_range

    cfg = tiny_cfg(world["ckpt"], "tiny")
    model, vae = P.PoseDiT(P.load_dit(cfg), P.load_pose(cfg)), P.load_vae(cfg)
    d = samples["s0"]
    y = P.build_y(vae, to_model_range(ref_image())[None], F, None)
    np.testing.assert_allclose(d["ref_y"], np.asarray(y)[0], atol=1e-5)
    feat = model.ref_pose_features(d["ref_pose"][None])
    ref = P.Reference(y=jnp.asarray(d["ref_y"])[None] + feat[:, None], clip_fea=jnp.asarray(d["clip_fea"])[None])
    ctx, neg = P.encode_prompts(cfg, 512, 32, need_negative=True)
    np.testing.assert_array_equal(d["context"], ctx[0])
    pipe = TeacherPipeline(model, None, steps=4, shift=5.0, cfg_scale=1.5, window=F)
    out = pipe.sample(ctx, neg, d["pose"], reference=ref, num_frames=NUM_FRAMES, seed=meta["s0"]["seed"])
    np.testing.assert_allclose(d["x0"], np.asarray(out["latents"])[0], atol=2e-4, rtol=1e-3)
    assert float(jnp.abs(out["latents"][0] - samples["s4"]["x0"]).mean()) > 1e-2

    # pose_trunk: the teacher's trunk on the stored frames, as a student computes it (ode.pad_pose_video),
    # labelled with that trunk's fingerprint; the teacher's head on it gives the teacher's own pose tokens
    import dataclasses

    from wanjax.distill.ode import pad_pose_video
    from wanjax.models.pose import PoseConditioner, trunk_fingerprint

    pose_m = model.pose
    for sid in r.ids:
        want = pose_m.trunk_features(pad_pose_video(jnp.asarray(samples[sid]["pose"])[None]))
        np.testing.assert_allclose(samples[sid]["pose_trunk"], np.asarray(want)[0], rtol=1e-6, atol=1e-6)
        assert meta[sid]["pose_trunk_sha256"] == trunk_fingerprint(pose_m)
    frozen = PoseConditioner(dataclasses.replace(pose_m.cfg, train_trunk=False), rngs=nnx.Rngs(0))
    nnx.update(frozen, nnx.state(pose_m, nnx.Param))
    np.testing.assert_allclose(np.asarray(frozen.pose_features_from_trunk(jnp.asarray(d["pose_trunk"])[None])),
                               np.asarray(pose_m.pose_features(pad_pose_video(jnp.asarray(d["pose"])[None]))),
                               rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_to_identical_shards(world, full_run):
    from train.generate_teacher import main, parse_config, run
    from wanjax.data.targets import TargetReader

    out = world["root"] / "killed"
    cfg, _ = parse_config(["generate_teacher"] + _args(world, out))

    def kill(n):
        if n == 3:  # group 0 ([s0, s1], [s2]) is written; group 1 ([s4]) is done but not flushed
            raise Killed("simulated kill")

    with pytest.raises(Killed):
        run(cfg, on_batch=kill)
    assert sorted(p.name for p in out.iterdir()) == ["index-p00000.json", "shard-00000.safetensors"]
    assert TargetReader(out).ids == ["s0", "s1", "s2"]
    (out / ".shard-00001.safetensors.p00000.tmp").write_bytes(b"half a shard")  # a kill during a write
    assert main(_args(world, out)) == 0
    a, b = ({p.name: p.read_bytes() for p in sorted(d.iterdir())} for d in (full_run, out))
    assert list(a) == list(b) and all(a[k] == b[k] for k in a)  # every shard and index, byte for byte
    ra, rb = TargetReader(full_run), TargetReader(out)
    for sid in ra.ids:
        da, db = ra.get(sid), rb.get(sid)
        assert all(da[k].tobytes() == db[k].tobytes() for k in KEYS if k in da)
    # a finished directory: nothing to do, nothing loaded, nothing rewritten
    res = run(cfg)
    assert res["samples"] == 0 and res["groups_done_before"] == res["groups"] == 2
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == b


def test_cli_errors_name_the_item(world, capsys):
    from train.generate_teacher import main

    assert main(["--config", "configs/teacher.py:nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown teacher-target preset 'nope'" in err and "teacher_14b" in err
    out = world["root"] / "stop"
    assert main(_args(world, out, "--config.data.on_bad_row=stop")) == 2
    err = capsys.readouterr().err
    assert "m.jsonl:4 (id 's3'): field 'pose'" in err and "missing.mp4 does not exist" in err
    assert not out.exists() or not any(out.glob("shard-*"))
    assert main(_args(world, out, "--config.sampler.name=ddim")) == 2
    assert "--config.sampler.name='ddim'" in capsys.readouterr().err
    assert main(_args(world, out, "--config.no_such_field=1")) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert main(["--config", "configs/teacher.py:tiny"]) == 2
    assert "--config.data.manifest=FILE.jsonl is required" in capsys.readouterr().err
