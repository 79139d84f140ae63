"""The synthetic world (issue 7) on the ``ci`` preset: every stage of ``train.world`` runs on the CPU,
the VAE and teacher losses fall, distillation steps run, the bundle loads through the inference
loaders, the report is written, and the world's evaluation gives the known answers on known videos.

(The metric primitives themselves - perfect video -> PCK 1, shifted video -> the shift as keypoint
error - are tested in tests/test_metrics.py; here they are checked through the world's evaluation
path, ``wanjax.world.compare.metrics``.)
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import wanjax  # noqa: F401


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from configs.world import get_config
    from train import world as W

    cfg = get_config("ci")
    cfg.out_dir = str(tmp_path_factory.mktemp("world"))
    r = W.run(cfg, "pytest tests/test_world.py")
    return r


def _losses(run_dir: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[f"{name}/loss"] for r in rows if f"{name}/loss" in r]


def test_vae_and_teacher_losses_fall(world):
    p = world.p
    for name, d in (("vae", p.vae_run), ("teacher", p.teacher_run)):
        losses = _losses(d, name)
        assert len(losses) == world.cfg[name].steps, name
        assert all(np.isfinite(losses)), name
        first, last = np.mean(losses[:2]), np.mean(losses[-4:])
        assert last < 0.9 * first, f"{name} loss did not fall: {losses}"


def test_targets_and_distillation_ran(world):
    from wanjax.data.targets import TargetReader
    from wanjax.world.data import latent_frames

    cfg = world.cfg
    reader = TargetReader(world.p.targets)
    assert len(reader) == cfg.targets.n
    s = reader[0]
    F = latent_frames(cfg.data.num_frames)
    h = cfg.data.height // 8
    assert s["traj"].shape == (len(cfg.sample.student_steps), F, h, h, 16)
    assert s["x0"].shape == (F, h, h, 16) and np.all(np.isfinite(s["traj"]))
    losses = _losses(world.p.student_run, "ode")
    assert len(losses) == cfg.distill.ode.steps and all(np.isfinite(losses))
    st = world.stages["distill_ode"]
    assert st["status"] == "done" and st["layers_from_teacher"] == [0]


def test_every_stage_is_timed_and_recorded(world):
    w = json.loads(world.p.world_json.read_text())
    for name in ("data", "vae", "latents", "teacher", "targets", "distill_ode", "export", "eval", "report"):
        assert w["stages"][name]["status"] == "done", name
        assert w["stages"][name]["seconds"] >= 0, name
    m = w["metrics"]["mean"]
    assert m["gt"]["pck"] == 1.0  # the ground truth follows its own pose
    for name in ("teacher", "student"):
        assert 0.0 <= m[name]["pck"] <= 1.0 and np.isfinite(m[name]["flicker"])
    sp = w["summary"]["speed"]["cpu"]  # CI: the only device is the CPU
    assert sp["teacher"]["gen_s"] > 0 and sp["student"]["gen_s"] > 0
    checks = w["summary"]["checks"]
    assert set(checks) >= {"student_pck_ge_0.9x_teacher", "teacher_pck_ge_0.8", "student_flicker_le_1.2x_gt",
                           "student_ge_10x_faster (cpu)"}
    assert checks["student_ge_10x_faster (cpu)"]["value"] == pytest.approx(
        sp["teacher"]["gen_s"] / sp["student"]["gen_s"])


def test_report_and_images(world):
    from PIL import Image

    p = world.p
    md = (p.docs / "RESULTS.md").read_text()
    assert "img/strip.png" in md and "## Acceptance" in md and world.command in md
    cfg = world.cfg
    strip = Image.open(p.img / "strip.png")
    assert strip.size[1] > 4 * cfg.data.height  # 4 rows: pose, ground truth, teacher, student
    for name in ("vae", "teacher", "student"):
        assert f"img/loss_{name}.png" in md
        assert Image.open(p.img / f"loss_{name}.png").size == (640, 360)


def test_bundle_loads_with_the_inference_path(world):
    """The bundle is small, stores float16, loads through the inference loaders in float32, holds the
    distilled student, and its example clip conditions the model through infer.generate's path
    (read_pose_frames, find_ref_pose, make_reference) exactly as the world's evaluation did."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from wanjax import pipeline as P
    from wanjax.checkpoint import flatten_params
    from wanjax.world import compare
    from wanjax.world.bundle import dir_bytes, example_paths, read_world
    from wanjax.world.data import Clips

    root = world.p.bundle
    assert dir_bytes(root) <= world.cfg.export.max_mb * 1e6
    assert read_world(root)["heldout"]["n"] == world.cfg.eval.n
    stored = flatten_params(ocp.StandardCheckpointer().restore(root / "dit" / "params"))
    assert {np.asarray(v).dtype for v in stored.values()} == {np.dtype("float16")}
    model, vae, cfg = compare.load_model(root, "student")
    trained = flatten_params(ocp.StandardCheckpointer().restore(world.p.student / "dit" / "params"))
    got = flatten_params(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.dit, nnx.Param))))
    for k, v in trained.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], np.asarray(v, np.float16).astype(np.float32))
    ex = example_paths(root)
    assert ex["keypoints"].is_file() and ex["meta"].is_file()
    frames = P.read_pose_frames(ex["pose"], cfg.height, cfg.width, cfg.num_frames)
    ref_img = P.read_reference(ex["ref"], cfg.height, cfg.width)
    ref_pose = P.find_ref_pose(ex["pose"], "", cfg.height, cfg.width, frames[0])
    val = Clips.load(world.p.data / "val.npz")
    np.testing.assert_array_equal(frames, val.pose[0])
    np.testing.assert_array_equal(ref_img, val.ref[0])
    ref = P.make_reference(model, "pose+image", vae=vae, clip=None, ref_image_u8=ref_img, ref_pose=ref_pose,
                           y_frames=cfg.conditioning.y_frames)
    mine = compare.references(model, vae, val.subset([0]), cfg.conditioning.y_frames)[0]
    np.testing.assert_allclose(np.asarray(ref.y), np.asarray(mine.y), atol=1e-5)


def test_world_metrics_on_known_videos(world):
    """The world's evaluation on the ground truth gives PCK 1 and ~0 px error; the ground truth shifted
    by k pixels gives a keypoint error of about k px."""
    from wanjax.data.synthetic import SyntheticConfig, make_sample
    from wanjax.world import compare
    from wanjax.world.data import Clips

    s = make_sample(11, SyntheticConfig(height=64, width=64, num_frames=5))
    clips = Clips(video=s["video"][None], ref=s["ref_image"][None], pose=s["pose_frames"][None],
                  ref_pose=s["pose_frames"][:1], body=np.asarray(s["pose"].body)[None], seeds=np.array([11]),
                  families=[s["meta"]["family"]])
    k = 3
    shifted = np.concatenate([np.repeat(s["video"][:, :, :1], k, axis=2), s["video"][:, :, :-k]], axis=2)
    met = compare.metrics({"gt": clips.video, "shifted": shifted[None]}, clips, alpha=0.1, workers=1)
    gt, sh = met["mean"]["gt"], met["mean"]["shifted"]
    assert gt["pck"] == 1.0 and gt["kp_err_px"] < 0.5 and gt["detected"] == 1.0
    assert met["per_clip"]["gt"][0]["psnr"] == float("inf") and met["per_clip"]["gt"][0]["flicker_ratio"] == 1.0
    assert sh["kp_err_px"] == pytest.approx(k, abs=0.5)
    assert sh["detected"] == 1.0 and sh["psnr"] < 40


def test_teacher_fine_tunes_from_its_checkpoint(world):
    """``teacher.init`` loads an inference root (the architecture comes from the checkpoint)."""
    from flax import nnx

    from configs.world import get_config
    from wanjax.checkpoint import flatten_params
    from wanjax.world import models as M
    from wanjax.world.stages import teacher_model

    cfg = get_config("ci")
    cfg.teacher.init = str(world.p.teacher)
    cfg.teacher.num_layers = 3  # ignored in favour of the checkpoint's 2 layers (with a warning)
    model = teacher_model(cfg)
    saved = M.load_pose_dit(world.p.teacher)
    a = flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    b = flatten_params(nnx.to_pure_dict(nnx.state(saved, nnx.Param)))
    assert model.cfg.dit.num_layers == 2 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_student_takes_evenly_spread_teacher_layers(world):
    from flax import nnx

    from wanjax.world import models as M

    assert M.student_layers(8, 4) == [0, 2, 5, 7]
    assert M.student_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="student.num_layers"):
        M.student_layers(2, 3)
    cfg = world.cfg  # teacher 2 layers, student 1
    teacher = M.load_pose_dit(world.p.teacher)
    student = M.student_from_teacher(teacher, M.pose_dit_config(cfg, causal=True))
    t = nnx.state(teacher, nnx.Param)
    s = nnx.state(student, nnx.Param)
    assert student.cfg.dit.num_layers == 1 and student.cfg.dit.num_frame_per_block == cfg.sample.num_frame_per_block
    np.testing.assert_array_equal(np.asarray(s["dit"]["blocks"]["ffn"]["fc1"]["kernel"][...]),
                                  np.asarray(t["dit"]["blocks"]["ffn"]["fc1"]["kernel"][...])[[0]])
    np.testing.assert_array_equal(np.asarray(s["pose"]["dwpose_embedding"][0]["kernel"][...]),
                                  np.asarray(t["pose"]["dwpose_embedding"][0]["kernel"][...]))
    np.testing.assert_array_equal(np.asarray(s["dit"]["head"]["head"]["kernel"][...]),
                                  np.asarray(t["dit"]["head"]["head"]["kernel"][...]))


def test_a_resumed_run_reports_how_its_cached_stages_were_trained(world):
    """A second run over the same work dir finds each trained stage's output and reuses it; its record
    keeps the steps, train time and losses saved next to that output (train.vae / train.teacher /
    train.world split over several jobs still report their training)."""
    from wanjax.world import stages as S

    again = S.Run(world.cfg, "resumed")
    S.stage_vae(again, None)
    S.stage_teacher(again, None, None, None)
    S.stage_ode(again, world.p.teacher, world.p.targets)
    for name in ("vae", "teacher", "distill_ode"):
        first, second = world.stages[name], again.stages[name]
        assert second["status"] == f"cached ({first['status']})", name
        for k in ("steps", "train_s", "first_loss", "final_loss"):
            assert second[k] == pytest.approx(first[k]), (name, k)
        assert second["seconds"] < first["seconds"], name  # loading, not training


def test_vae_training_windows_and_crops():
    from wanjax.world.losses import marker_mask, random_windows

    v = np.arange(2 * 9 * 16 * 16 * 3, dtype=np.int32).reshape(2, 9, 16, 16, 3)
    w = np.asarray(random_windows(jax.numpy.asarray(v), 5, jax.random.key(0), crop=8))
    assert w.shape == (2, 5, 8, 8, 3)
    for b in range(2):  # every window is a contiguous block of its own clip
        t, y, x = np.argwhere(v[b] == w[b, 0, 0, 0, 0])[0][:3]
        np.testing.assert_array_equal(w[b], v[b, t:t + 5, y:y + 8, x:x + 8])
    with pytest.raises(ValueError, match="multiple of 8"):
        random_windows(jax.numpy.asarray(v), 5, jax.random.key(0), crop=12)
    px = jax.numpy.asarray([[1.0, -1.0, -1.0], [0.2, 0.1, -0.3], [1.0, 1.0, -1.0]])
    np.testing.assert_array_equal(np.asarray(marker_mask(px)), [1.0, 0.0, 1.0])


def test_redo_removes_a_stage_and_everything_after_it(tmp_path):
    from configs.world import get_config
    from wanjax.world.stages import Run, apply_redo

    cfg = get_config("ci")
    cfg.out_dir = str(tmp_path)
    run = Run(cfg)
    for d in ("data", "vae", "teacher", "teacher_run", "targets", "student", "student_run"):
        (run.p.work / d).mkdir()
    (run.p.work / "latents.npz").write_bytes(b"x")
    cfg.redo = "teacher"
    gone = {p.name for p in apply_redo(run)}
    assert gone == {"teacher", "teacher_run", "targets", "student", "student_run"}
    assert (run.p.work / "vae").is_dir() and (run.p.work / "latents.npz").is_file()
    cfg.redo = "nonsense"
    with pytest.raises(ValueError, match="redo"):
        apply_redo(run)


def test_fit_stops_on_its_time_budget_and_on_sigterm(tmp_path):
    """The world's training adapter on the shared loop: ``max_seconds`` ends a stage cleanly
    (status ``time_budget``); SIGTERM saves a checkpoint and raises ``Preempted``, and the same call
    then resumes from it."""
    import os
    import signal

    import ml_collections
    from flax import nnx

    from wanjax.nn import Linear
    from wanjax.world.data import ArrayDataset
    from wanjax.world.fit import Preempted, fit

    class Net(nnx.Module):
        def __init__(self):
            self.lin = Linear(4, 1, rngs=nnx.Rngs(0))

    def loss_fn(model, batch, key):
        err = model.lin(batch["x"])[:, 0] - batch["y"]
        return jax.numpy.mean(err ** 2), {}

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    data = ArrayDataset({"x": x, "y": x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)})
    opt = ml_collections.ConfigDict(dict(lr=1e-2, warmup=0, b1=0.9, b2=0.99, weight_decay=0.0, grad_clip=1.0))
    res = fit(Net(), loss_fn, data, name="net", opt=opt, batch=8, steps=10 ** 7, max_seconds=0.3, log_every=1000,
              progress=False)
    assert res.status == "time_budget" and 0 < res.steps < 10 ** 7 and res.train_seconds >= 0.3

    class Bomb(ArrayDataset):  # sends SIGTERM while the 5th batch is read
        reads = 0

        def __getitem__(self, i):
            Bomb.reads += 1
            if Bomb.reads == 8 * 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__getitem__(i)

    bomb = Bomb({"x": data.arrays["x"], "y": data.arrays["y"]})
    with pytest.raises(Preempted, match="rerun"):
        fit(Net(), loss_fn, bomb, name="net", opt=opt, batch=8, steps=1000, log_every=1, workdir=tmp_path,
            progress=False)
    assert any((tmp_path / "ckpt").iterdir())
    Bomb.reads = -10 ** 9  # no second bomb: the resumed run finishes
    res = fit(Net(), loss_fn, bomb, name="net", opt=opt, batch=8, steps=12, log_every=1, workdir=tmp_path,
              progress=False)
    assert res.status == "done" and res.steps == 12 and res.history[0]["step"] > 1
