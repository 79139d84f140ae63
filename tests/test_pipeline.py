"""Inference pipelines on tiny random checkpoints made through the real converters / save_model."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wanjax  # noqa: F401
from tests.wan_fixtures import TINY_DIT, save_safetensors, wan_dit_state_dict

H = W = 32


def make_tiny_ckpt(root: Path, *, teacher: bool) -> Path:
    """root/{dit,pose,vae,clip}/ + root/text.npz for the tiny teacher (I2V DiT + CLIP) or student
    (DiT with y input, no CLIP)."""
    from flax import nnx

    from converters.common import materialize, unflatten_params
    from converters.dit import abstract_targets, dit_plan, load_source, resolve_config
    from wanjax.models.dit import WanDiT
    from wanjax.checkpoint import save_model
    from wanjax.models.clip import CLIPVisionConfig, CLIPVisionEncoder
    from wanjax.models.pose import PoseConfig, create_pose_conditioner
    from wanjax.models.vae import VAEConfig, init_vae

    root = Path(root)
    src = root / "src"
    src.mkdir(parents=True)
    sd = wan_dit_state_dict(**{**TINY_DIT, "in_dim": 36}, i2v=teacher, seed=1)
    save_safetensors(sd, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"num_heads": TINY_DIT["num_heads"]}))
    # the converter's own plan and config detection; the checkpoint is written with save_model
    tsrc, cfg_json = load_source(src / "model.safetensors")
    dcfg = resolve_config(tsrc, cfg_json, "auto", "float32")
    params = materialize(tsrc, dit_plan(tsrc, dcfg), abstract_targets(dcfg))
    dit = nnx.eval_shape(lambda: WanDiT(dcfg, rngs=nnx.Rngs(0)))
    state = nnx.state(dit, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten_params({k: jnp.asarray(v) for k, v in params.items()}))
    nnx.update(dit, state)
    save_model(dit, root / "dit", {"model": "dit", **dcfg.to_dict()})
    pcfg = (PoseConfig(hidden=4, out_dim=64, ref_dim=20) if teacher else
            PoseConfig(hidden=4, out_dim=8, ref_dim=20, proj_dim=64, zero_init_proj=False))
    pose = create_pose_conditioner(pcfg, seed=2)
    save_model(pose, root / "pose", {"model": "pose_conditioner", **pcfg.to_dict()})
    vcfg = VAEConfig.with_z_dim(base_dim=8, z_dim=16)
    save_model(init_vae(vcfg, seed=3), root / "vae", {"model": "vae", **vcfg.to_dict()})
    if teacher:
        ccfg = CLIPVisionConfig(image_size=28, patch_size=14, width=1280, num_layers=2, num_heads=16, mlp_dim=64)
        clip = nnx.jit(lambda: CLIPVisionEncoder(ccfg, rngs=nnx.Rngs(4)))()
        save_model(clip, root / "clip", {"model": "clip", **ccfg.to_dict()})
    rng = np.random.default_rng(5)
    np.savez(root / "text.npz", prompt=rng.normal(size=(5, 32)).astype(np.float32),
             negative=rng.normal(size=(7, 32)).astype(np.float32))
    return root


def pose_frames(n: int, seed: int = 0) -> np.ndarray:
    """Moving bright squares on black, uint8 [n, H, W, 3]."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):
        y, x = (4 + i) % 24, (2 * i) % 24
        out[i, y:y + 8, x:x + 8] = rng.integers(100, 255, 3)
    return out


def ref_image() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([yy * 8, xx * 8, (yy + xx) * 4], -1).astype(np.uint8)


def tiny_cfg(root, name="tiny_student", **over):
    from configs.infer import get_config

    c = get_config(name)
    c.ckpt_dir = str(root)
    c.prompt_embeds_path = str(Path(root) / "text.npz")
    return set_fields(c, over)


def set_fields(c, over: dict):
    """``c`` with ``{"a.b.c": value}`` fields set (dotted paths into the ConfigDict)."""
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def load_all(cfg):
    from wanjax import pipeline as P

    dit = P.load_dit(cfg)
    model = P.PoseDiT(dit, P.load_pose(cfg))
    vae = P.load_vae(cfg)
    clip = P.load_clip(cfg) if model.uses_clip else None
    ref_pose = np.asarray(pose_frames(1, 9)[0:1], np.float32) / 255.0
    ref = P.make_reference(model, "pose+image", vae=vae, clip=clip, ref_image_u8=ref_image(),
                           ref_pose=ref_pose, y_frames=cfg.conditioning.y_frames)
    ctx, neg = P.encode_prompts(cfg, 512, dit.cfg.text_dim, need_negative=True)
    return model, vae, ref, ctx, neg


@pytest.fixture(scope="module")
def student_root(tmp_path_factory):
    return make_tiny_ckpt(tmp_path_factory.mktemp("student"), teacher=False)


@pytest.fixture(scope="module")
def student(student_root):
    cfg = tiny_cfg(student_root)
    return load_all(cfg)


def test_student_stream_equals_batch_and_seeds(student):
    from wanjax.pipeline.student import StudentPipeline

    model, vae, ref, ctx, _ = student
    pipe = StudentPipeline(model, vae)
    poses = pose_frames(33)
    blocks = list(pipe.stream(ctx, poses, reference=ref, num_frames=33, seed=7))
    assert [b for b, _, _ in blocks] == [0, 1, 2]
    assert [f.shape for _, f, _ in blocks] == [(9, H, W, 3), (12, H, W, 3), (12, H, W, 3)]
    assert [t["context_pass"] for _, _, t in blocks] == [True, True, False]
    assert all(f.dtype == np.uint8 for _, f, _ in blocks)
    batch = pipe.generate(ctx, poses, reference=ref, num_frames=33, seed=7, latency=True)
    assert batch["frames"].shape == (33, H, W, 3)
    np.testing.assert_array_equal(np.concatenate([f for _, f, _ in blocks]), batch["frames"])
    # generate()'s default encodes the whole pose video in one call instead of per block: same tokens
    # up to fp32 summation order (see below), so the same latents within 1e-4
    once = pipe.generate(ctx, poses, reference=ref, num_frames=33, seed=7)
    np.testing.assert_allclose(np.asarray(once["latents"]), np.asarray(batch["latents"]), atol=1e-4)
    assert float(jnp.std(batch["latents"])) > 0.05  # not a degenerate all-equal output
    # streamed decode == whole-latent decode
    from wanjax.models.vae import jit_decode
    from wanjax.videoio import to_uint8
    whole = to_uint8(np.asarray(jit_decode(vae)(batch["latents"]))[0])
    assert np.abs(whole.astype(int) - batch["frames"].astype(int)).max() <= 1
    # interactive: pose frames arrive one by one from an iterator -> same result
    inter = pipe.generate(ctx, iter(list(poses)), reference=ref, num_frames=33, seed=7)
    np.testing.assert_allclose(np.asarray(inter["latents"]), np.asarray(batch["latents"]), atol=2e-5)
    # the per-block pose tokens (a window with a 2-latent halo) equal encoding the whole video at once
    from wanjax.pipeline import pad_pose
    from wanjax.pipeline.student import _PoseFeed
    feed = _PoseFeed(pipe.model, poses, 9, 3)
    per_block = np.concatenate([np.asarray(feed.tokens(b)) for b in range(3)], axis=1)
    whole_tok = np.asarray(pipe.model.pose_tokens(pad_pose(poses[:33])))
    assert per_block.shape == whole_tok.shape
    np.testing.assert_allclose(per_block, whole_tok, atol=1e-5)  # fp32 convs, summation order only
    # same seed -> same, other seed -> different
    other = pipe.generate(ctx, poses, reference=ref, num_frames=33, seed=8)
    assert float(jnp.abs(other["latents"] - batch["latents"]).mean()) > 1e-2


def test_reference_per_conditioning_mode(student, student_root):
    """The pipeline's y / CLIP per mode follow wanjax.models.unianimate: image = y without the
    reference-pose features, pose = zeros + those features (CLIP zeros), pose+image = both."""
    from wanjax import pipeline as P
    from wanjax.models import unianimate as ua

    model, vae, ref_full, _, _ = student
    cfg = tiny_cfg(student_root)
    clip = P.load_clip(cfg) if model.uses_clip else None
    ref_pose = np.asarray(pose_frames(1, 9)[0:1], np.float32) / 255.0
    feat = np.asarray(model.ref_pose_features(ref_pose))
    common = dict(vae=vae, clip=clip, ref_image_u8=ref_image(), ref_pose=ref_pose, y_frames=3)
    img = P.make_reference(model, "image", **common)
    both = P.make_reference(model, "pose+image", **common)
    pose = P.make_reference(model, "pose", **common)
    np.testing.assert_allclose(np.asarray(both.y), np.asarray(img.y) + feat[:, None], atol=1e-6)
    np.testing.assert_allclose(np.asarray(pose.y), np.broadcast_to(feat[:, None], pose.y.shape), atol=1e-6)
    if model.uses_clip:
        assert float(jnp.abs(pose.clip_fea).max()) == 0.0 and pose.clip_fea.shape[-1] == model.cfg.image_dim
        np.testing.assert_array_equal(np.asarray(img.clip_fea), np.asarray(both.clip_fea))
    else:
        assert img.clip_fea is None and pose.clip_fea is None
    assert P.MODES == ua.MODES
    with pytest.raises(P.PipelineError, match="conditioning.mode=pose needs the reference pose"):
        P.make_reference(model, "pose", **{**common, "ref_pose": None})
    with pytest.raises(P.PipelineError, match="needs a reference image"):
        P.make_reference(model, "image", **{**common, "ref_image_u8": None})
    with pytest.raises(P.PipelineError, match="choose one of"):
        P.make_reference(model, "unianimate", **common)
    no_pose = P.PoseDiT(model.dit, None)
    with pytest.raises(P.PipelineError, match="needs pose weights"):
        P.check_mode("pose+image", no_pose)
    # the DiT's residual-stream storage: the checkpoint's by default, overridable, checked by name
    assert model.dit.cfg.residual_dtype == "float32"
    assert P.load_dit(tiny_cfg(student_root, residual_dtype="bfloat16")).cfg.residual_dtype == "bfloat16"
    with pytest.raises(P.PipelineError, match=r"--config\.residual_dtype='fp8'.*choose one of"):
        P.load_dit(tiny_cfg(student_root, residual_dtype="fp8"))


@pytest.fixture(scope="module")
def pipes(student):
    """Rolling (window 9, sink 3) and plain (12-frame cache) pipelines, 2-step schedule for speed."""
    from wanjax.pipeline.student import StudentPipeline

    model = student[0]
    base = model.dit.cfg
    try:
        model.dit.cfg = base.replace(local_attn_size=9, sink_size=3)
        rolling = StudentPipeline(model, None, steps=(1000, 500))
        model.dit.cfg = base.replace(local_attn_size=-1, max_frames=12)
        plain = StudentPipeline(model, None, steps=(1000, 500))
    finally:
        model.dit.cfg = base
    return rolling, plain


def test_interactive_lookahead_and_unbounded_end(student, pipes):
    """A block starts only once its pose frames + 4 lookahead frames were pulled; an endless-style
    run (num_frames=None) ends with the stream and drops the incomplete block."""
    from wanjax.pipeline.student import StudentPipeline

    model, vae, ref, ctx, _ = student
    poses = pose_frames(40)  # latents: (40-1)//4+1 = 10 -> 3 whole blocks
    pulled = []

    def gen():
        for i, f in enumerate(poses):
            pulled.append(i)
            yield f

    with pytest.raises(Exception, match="rolling cache"):
        next(StudentPipeline(model, None).stream(ctx, gen(), reference=ref, decode=False))
    pulled.clear()
    it = pipes[0].stream(ctx, gen(), reference=ref, decode=False)
    r0 = next(it)
    assert r0.index == 0 and r0.frames is None
    assert len(pulled) == 13  # frames 0..8 of block 0 (latents 0-2) + lookahead group 3 (9..12)
    rest = list(it)
    assert [r.index for r in rest] == [1, 2]
    assert all(r.timings["context_pass"] for r in [r0] + rest)  # unknown end: always refreshed


def test_rolling_cache_45_frames_matches_plain_cache_in_first_window(student, pipes):
    model, vae, ref, ctx, _ = student
    rolling, plain = pipes
    poses = pose_frames(4 * 44 + 1)
    roll = rolling.generate(ctx, poses, reference=ref, num_frames=177, seed=3, decode=False)
    ref12 = plain.generate(ctx, poses, reference=ref, num_frames=45, seed=3, decode=False)
    a, b = np.asarray(roll["latents"]), np.asarray(ref12["latents"])
    assert a.shape == (1, 45, H // 8, W // 8, 16) and np.isfinite(a).all()
    assert len(roll["timings"]) == 15
    # frames 0..8 (the first window; their pose tokens see frame 9 in both runs) are identical
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5)
    # block 3 attends to a rolled window (sink 0-2 + frames 6-11) in the rolling run: different
    assert np.abs(a[:, 9:12] - b[:, 9:12]).mean() > 1e-3


def test_window_starts_match_unianimate():
    from wanjax.pipeline.teacher import window_starts

    assert window_starts(21) == [0]
    assert window_starts(10) == [0]
    assert window_starts(39) == [0, 17, 18]
    assert window_starts(55) == [0, 17, 34]
    assert window_starts(60) == [0, 17, 34, 39]


def test_teacher_cfg_windows_and_determinism(tmp_path_factory):
    from wanjax.pipeline.teacher import TeacherPipeline

    root = make_tiny_ckpt(tmp_path_factory.mktemp("teacher"), teacher=True)
    cfg = tiny_cfg(root, "tiny")
    model, vae, ref, ctx, neg = load_all(cfg)
    assert model.uses_clip and ref.clip_fea.shape == (1, 5, 1280) and ref.y.shape[-1] == 20
    poses = pose_frames(33)
    pipe = TeacherPipeline(model, vae, steps=2, cfg_scale=1.5, window=6, overlap=2)
    out = pipe.generate(ctx, neg, poses, reference=ref, num_frames=9, seed=1)
    assert out["frames"].shape == (9, H, W, 3) and out["windows"] == [0]
    again = pipe.generate(ctx, neg, poses, reference=ref, num_frames=9, seed=1)
    np.testing.assert_array_equal(np.asarray(out["latents"]), np.asarray(again["latents"]))
    # asymmetric CFG: guided = neg-without-pose + 1.5 (pos-with-pose - neg-without-pose)
    from flax import nnx
    dit = model.dit
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 16))
    tok = model.pose_tokens(np.concatenate([np.repeat(poses[:1], 3, 0), poses[:9]])[None] / 255.0)
    ckp = dit.context_kv(jnp.asarray(ctx), ref.clip_fea)
    ckn = dit.context_kv(jnp.asarray(neg), ref.clip_fea)
    y = ref.y_slice(0, 3)
    vp = dit(x, jnp.full((1, 3), 500.0), ckv=ckp, y=y, pose=tok)
    vn = dit(x, jnp.full((1, 3), 500.0), ckv=ckn, y=y)
    got = pipe._flow(nnx.split(dit)[1], x, 500.0, ckp, ckn, y, tok)
    np.testing.assert_allclose(np.asarray(got), np.asarray(vn + 1.5 * (vp - vn)), atol=1e-4)
    # CFG parallel: on a 2-device mesh (fsdp=2: parameters sharded, the [pos, neg] batch split so
    # each device runs one branch) the guided flow is the same (summation order only)
    from wanjax.sharding import make_mesh, shard_model
    mesh = make_mesh(data=1, fsdp=2, tensor=1, devices=jax.devices()[:2])
    dit2 = shard_model(nnx.clone(dit), mesh)
    pipe_m = TeacherPipeline(dit2, None, steps=2, cfg_scale=1.5, mesh=mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    put = lambda a: jax.device_put(a, rep)  # noqa: E731  (batch 1: replicated on the mesh)
    got_m = pipe_m._flow(nnx.split(dit2)[1], put(x), 500.0, jax.tree.map(put, ckp), jax.tree.map(put, ckn),
                         put(y), put(tok))
    np.testing.assert_allclose(np.asarray(got_m), np.asarray(got), atol=1e-4)
    # long video: 9 latents in windows of 6 (starts 0, 3), UniPC
    pipe2 = TeacherPipeline(model, vae, sampler="unipc", steps=2, cfg_scale=1.0, window=6, overlap=2)
    long = pipe2.sample(ctx, None, poses, reference=ref, num_frames=33, seed=1)
    assert long["windows"] == [0, 3] and long["latents"].shape == (1, 9, 4, 4, 16)
    assert np.isfinite(np.asarray(long["latents"])).all()


def test_video_writer_atomic(tmp_path):
    import imageio.v2 as imageio

    from wanjax.videoio import VideoWriter, partial_path, write_sidecar

    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out, fps=8) as w:
            w.append(np.zeros((3, 32, 32, 3), np.uint8))
            assert not out.exists()  # only the partial file is being written
            raise RuntimeError("boom")
    assert not out.exists() and not partial_path(out).exists()
    with VideoWriter(out, fps=8) as w:
        w.append(np.full((4, 32, 32, 3), 128, np.uint8))
        w.append(np.full((5, 32, 32, 3), 30, np.uint8))
    r = imageio.get_reader(str(out), format="FFMPEG")
    assert len([f for f in r]) == 9
    r.close()
    p = write_sidecar(out, config={"a": 1}, seed=3, block_timings=[{"x": np.float32(1.5)}],
                      first_frame_latency_s=0.1, peak_memory_bytes=10, frame_count=9)
    d = json.loads(p.read_text())
    assert d["frame_count"] == 9 and d["block_timings"][0]["x"] == 1.5 and d["seed"] == 3
