"""ODE-regression distillation of a tiny causal pose student from a tiny random UniAnimate teacher
(CPU, float32): the loss falls >= 5x on a fixed set of 8 teacher targets and the student's 4-step
samples end up much closer to the teacher's x0; plus the pieces it relies on."""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wanjax  # noqa: F401
from wanjax import sampling
from tests.test_pipeline import set_fields
from wanjax.distill import dmd, ode, objectives
from wanjax.models import unianimate as ua

# Geometry: 6 latent frames (2 causal blocks of 3), 16x16 pixels -> 2x2 latents -> 1 token per frame,
# 21 pose frames. Kept this small because XLA:CPU runs the pose encoder's 3-D convolutions slowly.
F, H, W = 6, 16, 16
h, w = H // 8, W // 8
NUM_POSE = 4 * (F - 1) + 1
CLIP_TOKENS = 8   # the DiT takes any number of CLIP tokens; 257 only costs CPU time here


def make_teacher(seed: int = 0) -> ua.PoseDiT:
    """tiny_teacher with a random (instead of zero-initialised) output head, so that its flow is not 0."""
    t = ua.PoseDiT(ua.get_config("tiny_teacher"), rngs=nnx.Rngs(seed))
    k = t.dit.head.head.kernel
    k[...] = jax.random.normal(jax.random.key(seed + 100), k.shape) * 0.1
    return t


def make_inputs(n: int, seed: int = 0) -> list[dict]:
    """Conditioning + noise of ``n`` samples in the targets format (no batch axis)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pose = np.zeros((NUM_POSE, H, W, 3), np.uint8)
        for f in range(NUM_POSE):
            y0, x0 = (3 * i + f) % 10, (5 * i + 2 * f) % 10
            pose[f, y0:y0 + 6, x0:x0 + 6] = rng.integers(80, 255, 3)
        ref_y = rng.normal(size=(F, h, w, 20)).astype(np.float32)
        ref_y[..., :4] = 0.0
        ref_y[0, ..., :4] = 1.0
        out.append(dict(noise=rng.normal(size=(F, h, w, 16)).astype(np.float32),
                        context=rng.normal(size=(512, 32)).astype(np.float32),
                        clip_fea=rng.normal(size=(CLIP_TOKENS, 1280)).astype(np.float32),
                        ref_y=ref_y, ref_pose=rng.uniform(size=(H, W, 3)).astype(np.float32), pose=pose))
    return out


def make_targets(n: int = 8, seed: int = 0) -> list[dict]:
    """Teacher targets of ``n`` samples: Euler over sigmas [student sigmas..., 0.45, 0.3, 0.15, 0] with
    the tiny teacher (pose+image conditioning, no CFG); ``traj`` = latents entering the 4 student steps."""
    teacher = make_teacher(seed)
    samples = make_inputs(n, seed)
    _, sig = sampling.student_schedule()
    grid = jnp.asarray(np.concatenate([sig, [0.45, 0.3, 0.15, 0.0]]), jnp.float32)
    gd, params = nnx.split(teacher)

    @jax.jit
    def trajectory(params, batch):
        model = nnx.merge(gd, params)
        cond = dmd.resolve_cond(model, ode.conditioning_batch(batch, None))
        ckv = model.context_kv(cond.context, cond.clip_fea)

        def step(x, j):
            t = jnp.full(x.shape[:2], grid[j] * 1000.0)
            v = model(x, t, ckv=ckv, y=cond.y, pose_tokens=cond.pose_tokens)
            return x + (grid[j + 1] - grid[j]) * v, x

        x0, xs = jax.lax.scan(step, batch["noise"], jnp.arange(grid.shape[0] - 1))
        return jnp.moveaxis(xs[:len(sig)], 0, 1), x0

    batch = {k: jnp.asarray(np.stack([s[k] for s in samples])) for k in samples[0]}
    traj, x0 = jax.device_get(trajectory(params, batch))
    for i, s in enumerate(samples):
        s.update(traj=np.asarray(traj[i]), traj_sigmas=np.asarray(sig, np.float32), x0=np.asarray(x0[i]))
    return samples


def tiny_cfg(workdir, **over):
    from configs.distill import get_config

    c = get_config("tiny")
    c.workdir = str(workdir)
    c.progress = False
    return set_fields(c, over)


def _batch(samples):
    return {k: jnp.asarray(v) for k, v in ode.collate(samples, text_len=512).items()}


def test_pad_pose_video_matches_pipeline_pad_pose():
    from wanjax.pipeline import pad_pose

    frames = make_inputs(2)[1]["pose"]
    ours = np.asarray(ode.pad_pose_video(jnp.asarray(frames[None])))
    np.testing.assert_array_equal(ours, pad_pose(frames))  # same float32 ops: bit-identical


def test_ode_inputs_gather_and_loss_mask():
    rng = np.random.default_rng(0)
    traj = jnp.asarray(rng.normal(size=(2, 4, 6, 1, 1, 2)), jnp.float32)
    sig = jnp.asarray(np.tile([1.0, 0.9, 0.8, 0.6], (2, 1)), jnp.float32)
    x0 = jnp.asarray(rng.normal(size=(2, 6, 1, 1, 2)), jnp.float32)
    idx = ode.draw_block_indices(jax.random.key(3), 2, 6, 3, 5)
    assert idx.shape == (2, 6) and bool(jnp.all(idx[:, :3] == idx[:, :1])) and bool(jnp.all(idx[:, 3:] == idx[:, 3:4]))
    idx = jnp.asarray([[4, 4, 4, 1, 1, 1], [0, 0, 0, 3, 3, 3]], jnp.int32)
    x_t, s = ode.ode_inputs(traj, sig, x0, idx)
    np.testing.assert_array_equal(np.asarray(x_t[0, :3]), np.asarray(x0[0, :3]))      # clean entry = x0
    np.testing.assert_array_equal(np.asarray(x_t[0, 3:]), np.asarray(traj[0, 1, 3:]))
    np.testing.assert_array_equal(np.asarray(x_t[1, 3:]), np.asarray(traj[1, 3, 3:]))
    np.testing.assert_array_equal(np.asarray(s), np.float32([[0, 0, 0, .9, .9, .9], [1, 1, 1, .6, .6, .6]]))


def test_student_sample_equals_student_pipeline():
    """Validation's sampler is StudentPipeline's math: same noise draws -> the same latents."""
    from wanjax.pipeline import Reference
    from wanjax.pipeline.student import StudentPipeline

    student = ua.PoseDiT(ua.get_config("tiny_student"), rngs=nnx.Rngs(2))
    for m in (student.dit.head.head.kernel, student.pose.pose_proj.kernel):
        m[...] = jax.random.normal(jax.random.key(7), m.shape) * 0.1
    s = make_inputs(1, seed=3)
    b = _batch(s)
    ref_feat = student.encode_ref_pose(b["ref_pose"])
    ref = Reference(y=ua.condition_y(b["ref_y"], ref_feat), clip_fea=b["clip_fea"])
    pipe = StudentPipeline(student)
    want = pipe.generate(b["context"], s[0]["pose"], reference=ref, num_frames=NUM_POSE, seed=5, decode=False)
    key = jax.random.key(5)
    noise = ode.pipeline_noise(key, (1, F, h, w, 16), 3)
    got = jax.jit(ode.student_sample)(student, b, noise, key)
    # identical float32 computation up to op order inside jit: 1e-5 relative to the sample's scale
    np.testing.assert_allclose(np.asarray(got), np.asarray(want["latents"]),
                               atol=1e-5 * float(jnp.abs(want["latents"]).max()))


def tiny_vae(path):
    from wanjax.checkpoint import save_model
    from wanjax.models.vae import VAEConfig, init_vae

    vcfg = VAEConfig.with_z_dim(base_dim=8, z_dim=16)
    save_model(init_vae(vcfg, seed=3), path, {"model": "vae", **vcfg.to_dict()})
    return path


def test_ode_distillation_loss_falls_and_samples_approach_teacher(tmp_path):
    t0 = time.perf_counter()
    samples = make_targets(8)
    steps = 24
    cfg = tiny_cfg(tmp_path / "run", total_steps=steps, batch_size=8, ckpt_every=0, log_every=4,
                   **{"ema.decay": 0.0, "export.enabled": False, "val.every": steps, "val.num_samples": 8,
                      "val.vae_dir": str(tiny_vae(tmp_path / "vae"))})
    full = _batch(samples)
    init = objectives.build_student(cfg)   # the run builds the same initial student (cfg.seed)
    key = jax.random.key(cfg.seed)         # the validator's sampling key
    eval_fn = jax.jit(lambda m: (ode.ode_eval_loss(m, full),
                                 jnp.mean(jnp.square(ode.student_sample(m, full, full["noise"], key) - full["x0"]))))
    loss0, dist0 = eval_fn(init)
    result = objectives.run(cfg, dataset=samples)
    assert result.status == "done" and int(result.state.step) == steps
    assert int(result.state.data_pos) == steps * 8
    final = result.trainer.model(result.state, "student")
    loss1, dist1 = eval_fn(final)
    ratio = float(jnp.mean(loss0) / jnp.mean(loss1))
    print(f"eval loss {np.asarray(loss0)} -> {np.asarray(loss1)} ({ratio:.1f}x); 4-step sample MSE to the "
          f"teacher x0 {float(dist0):.4f} -> {float(dist1):.4f}; {time.perf_counter() - t0:.1f} s")
    # acceptance: the deterministic ODE loss (every trajectory index, no dropout) falls at least 5x
    assert ratio >= 5.0
    assert bool(jnp.all(loss1 < loss0 / 3))          # and it falls at every trajectory index
    # the training loss logged by the loop falls too (first logged window vs last)
    hist = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["ode/loss"] for r in hist if "ode/loss" in r]
    assert losses[-1] < losses[0] / 2
    train_recs = [r for r in hist if "ode/loss" in r]
    assert {"ode/grad_norm", "step_time_s", "tokens_per_s", "model_flops_per_step"} <= set(train_recs[-1])
    # periodic validation: the validator sampled the 8 targets from their recorded noise (the same
    # computation as dist1 above, in another program: float32 rounding only) and wrote their mp4s
    val = [r for r in hist if "val/x0_mse" in r]
    assert len(val) == 1 and val[0]["step"] == steps
    np.testing.assert_allclose(val[0]["val/x0_mse"], float(dist1), rtol=1e-4)
    mp4s = sorted((tmp_path / "run" / "val").glob("*.mp4"))
    assert [p.name for p in mp4s] == [f"step_{steps:07d}_{i}.mp4" for i in range(8)]
    # the 4-step causal samples (StudentPipeline's math from the teacher's initial noise) sit closer to
    # the teacher's x0 than at initialisation: MSE at most 0.9x the initial one (measured 0.81x). The
    # gap cannot close per sample: after step 0 the sampler re-noises with *fresh* noise at sigma 0.9375,
    # so only the first step sees the noise the teacher's x0 was integrated from (that step's x0 error,
    # eval index 0, falls 12x above).
    assert float(dist1) < 0.9 * float(dist0)


def _trunk_features_fn(gd):
    """jit(state, uint8 pose frames [B, T, H, W, 3]) -> the pose trunk's features, as generate_teacher
    stores them (``trunk_features`` of ``ode.pad_pose_video``)."""
    return jax.jit(lambda st, p: nnx.merge(gd, st).pose.trunk_features(ode.pad_pose_video(p)))


def test_ode_loss_with_cached_pose_trunk_equals_the_pose_video():
    """A frozen-trunk student fed the batch's precomputed trunk features (``pose_trunk``, from
    ``PoseConditioner.trunk_features``, no pose frames) gets the loss and gradients it gets from the
    pose frames: the same ops, split at the trunk's output. Tolerance 1e-6 relative: float32, and the
    two are compiled as different programs (XLA may fuse the trunk's last SiLU differently)."""
    import dataclasses

    pcfg = ua.get_config("tiny_student")
    student = ua.PoseDiT(pcfg.replace(pose=dataclasses.replace(pcfg.pose, train_trunk=False)), rngs=nnx.Rngs(1))
    k = student.dit.head.head.kernel
    k[...] = jax.random.normal(jax.random.key(5), k.shape) * 0.1
    batch = _batch(make_targets(2))
    cached = {kk: v for kk, v in batch.items() if kk != "pose"}
    gd, state = nnx.split(student)
    trunk = _trunk_features_fn(gd)
    cached["pose_trunk"] = trunk(state, batch["pose"])
    key = jax.random.key(7)

    @jax.jit
    def loss_and_grad(st, b):
        return nnx.value_and_grad(lambda m: ode.ode_loss(m, b, key)[0])(nnx.merge(gd, st))

    (lv, gv), (lc, gc) = loss_and_grad(state, batch), loss_and_grad(state, cached)
    assert abs(float(lv) - float(lc)) <= 1e-6 * abs(float(lv)) and float(lv) > 0
    gv, gc = jax.tree.leaves(nnx.state(gv, nnx.Param)), jax.tree.leaves(nnx.state(gc, nnx.Param))
    assert len(gv) == len(gc)
    for a, b in zip(gv, gc):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-6 * max(np.abs(a).max(), 1e-12)
    # the latent shape comes from the trunk features when neither y nor frames are given
    cb = ode.conditioning_batch(cached, None)
    assert dmd.latent_shape(cb._replace(ref_latent_y=None)) == (F, h, w)


def test_distill_run_on_cached_pose_trunk_matches_the_pose_frames(tmp_path):
    """train.distill with ``pose_trunk_cached``: the batches carry each sample's stored ``pose_trunk``
    instead of its frames, and the run's losses equal those of the same run on the frames (1e-6
    relative: float32, different programs). The run refuses a trainable trunk, targets without the
    features' fingerprint and features of another trunk, naming the flag, sample and fix."""
    from tests.test_training_ckpt import write_targets
    from wanjax.data.targets import TargetWriter
    from wanjax.models.pose import trunk_fingerprint

    samples = make_targets(2)
    over = dict(total_steps=2, batch_size=2, ckpt_every=0, log_every=1, pose_trunk_trainable=False,
                **{"ema.decay": 0.0, "export.enabled": False, "val.every": 0})
    student = objectives.build_student(tiny_cfg(tmp_path / "x", **over))  # what each run builds (cfg.seed)
    gd, state = nnx.split(student)
    trunk = _trunk_features_fn(gd)
    fp = trunk_fingerprint(student.pose)
    with TargetWriter(tmp_path / "targets") as tw:
        for i, s in enumerate(samples):
            feat = np.asarray(trunk(state, jnp.asarray(s["pose"])[None]))[0]
            tw.add(f"sample{i}", {**s, "pose_trunk": feat}, {"prompt": "test", "pose_trunk_sha256": fp})
    data = {"data.dir": str(tmp_path / "targets")}

    def losses(name, **kw):
        res = objectives.run(tiny_cfg(tmp_path / name, **over, **data, **kw))
        assert res.status == "done"
        return [r["ode/loss"] for r in res.history]

    frames, cached = losses("frames"), losses("cached", pose_trunk_cached=True)
    assert len(frames) == 2 and frames[0] > 0
    np.testing.assert_allclose(cached, frames, rtol=1e-6)

    with pytest.raises(objectives.DistillError, match="pose_trunk_cached=True needs a frozen pose trunk"):
        objectives.build(tiny_cfg(tmp_path / "t", **{**over, "pose_trunk_trainable": True}, **data,
                                  pose_trunk_cached=True))
    with pytest.raises(objectives.DistillError, match="needs a target directory"):  # in-memory samples: no metadata
        objectives.build(tiny_cfg(tmp_path / "m", **over, pose_trunk_cached=True), dataset=samples)
    old = write_targets(samples, tmp_path / "old")  # no pose_trunk_sha256 in the metadata
    with pytest.raises(objectives.DistillError, match=r"sample 'sample0' has no pose_trunk features.*regenerate"):
        objectives.build(tiny_cfg(tmp_path / "o", **over, pose_trunk_cached=True, **{"data.dir": str(old)}))
    with TargetWriter(tmp_path / "other") as tw:
        for i, s in enumerate(samples):
            tw.add(f"sample{i}", {**s, "pose_trunk": np.zeros((F, h, w, 4), np.float32)},
                  {"prompt": "test", "pose_trunk_sha256": "0" * 64})
    with pytest.raises(objectives.DistillError, match=r"sample 'sample0' holds pose_trunk features of a different "
                                                      r"pose trunk .*student.*student\.pose_init"):
        objectives.build(tiny_cfg(tmp_path / "d", **over, pose_trunk_cached=True,
                                  **{"data.dir": str(tmp_path / "other")}))
