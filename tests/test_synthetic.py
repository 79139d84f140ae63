"""Synthetic pose-driven video world: determinism, layout, motion, colour-key recovery, dataset writer."""

import json

import numpy as np
import pytest

from wanjax.data import synthetic as syn
from wanjax.pose.keypoints import load_keypoints
from wanjax.pose.render import render_sequence
from wanjax.metrics.pose import estimate_pose_colorkey, keypoint_error, marker_keypoints, pck

CFG = syn.SyntheticConfig(height=64, width=64, num_frames=9)


def test_config_rejects_bad_frame_count():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        syn.SyntheticConfig(num_frames=16)
    with pytest.raises(ValueError, match="family"):
        syn.SyntheticConfig(family="moonwalk")


def test_sample_is_deterministic_by_seed_and_has_right_shapes():
    a, b, c = syn.make_sample(5, CFG), syn.make_sample(5, CFG), syn.make_sample(6, CFG)
    assert a["video"].shape == (9, 64, 64, 3) and a["video"].dtype == np.uint8
    assert a["pose_frames"].shape == (9, 64, 64, 3) and a["ref_image"].shape == (64, 64, 3)
    assert a["pose"].body.shape == (9, 20, 3) and a["pose"].hands.shape == (9, 2, 21, 3)
    assert a["ref_pose"].body.shape == (1, 20, 3)
    # pose maps come from wanjax.pose.render.render_sequence: a skeleton on black in every frame
    assert all((f > 0).any() for f in a["pose_frames"])
    np.testing.assert_array_equal(a["pose_frames"], render_sequence(a["pose"], 64, 64))
    assert (a["video"].shape[0] - 1) % 4 == 0
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["pose"].body, b["pose"].body)
    np.testing.assert_array_equal(a["ref_image"], b["ref_image"])
    assert not np.array_equal(a["video"], c["video"])
    # hands are absent by default: score 0, coordinates -1
    assert np.all(a["pose"].hands[..., 2] == 0) and np.all(a["pose"].hands[..., :2] == -1)
    # the reference pose is a different phase of the motion, not frame 0
    assert np.abs(a["ref_pose"].body[0, :, :2] - a["pose"].body[0, :, :2]).max() > 1e-3


@pytest.mark.parametrize("family", syn.FAMILIES)
def test_every_family_moves_and_stays_in_frame(family):
    rng = np.random.default_rng(3)
    sk = syn.sample_skeleton(rng)
    p = syn.sample_motion_params(rng, sk, syn.SyntheticConfig(num_frames=17))
    seq = syn.motion(family, np.arange(17) / 8.0, p)
    body = seq.body
    vis = body[..., 2] > 0
    xy = body[..., :2][vis]
    assert xy.min() >= 0.0 and xy.max() <= 1.0
    assert np.all(body[..., :2][~vis] == -1)
    assert vis[:, syn.MARKER_JOINTS].all()  # all marker joints are always visible
    disp = np.linalg.norm(body[1:, :, :2] - body[:-1, :, :2], axis=-1)[vis[1:] & vis[:-1]]
    assert disp.max() > 0.01  # it moves (>0.64 px per frame somewhere at 64 px)
    # smooth: no joint jumps more than a fifth of the frame between frames
    assert disp.max() < 0.2


def test_families_differ():
    rng = np.random.default_rng(0)
    sk = syn.sample_skeleton(rng)
    p = syn.sample_motion_params(rng, sk, syn.SyntheticConfig())
    t = np.arange(9) / 8.0
    bodies = [syn.motion(f, t, p).body[..., :2] for f in syn.FAMILIES]
    for i in range(len(bodies)):
        for j in range(i + 1, len(bodies)):
            assert np.abs(bodies[i] - bodies[j]).max() > 0.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_marker_colours_never_in_background_or_limbs(seed):
    """Draw the figure with zero-size markers: no pixel of background or limbs may key."""
    s = syn.make_sample(seed, CFG)
    app = syn.make_appearance(np.random.default_rng(100 + seed))
    frames = np.stack([syn.render_figure(app, b, 64, 64, marker_scale=0.0) for b in s["pose"].body])
    assert np.all(estimate_pose_colorkey(frames, syn.DEFAULT_PALETTE)[..., 2] == 0)
    # ... while with markers every marker is found
    frames = syn.render_video(app, s["pose"].body, 64, 64)
    assert np.all(estimate_pose_colorkey(frames)[..., 2][syn.marker_visibility(s["pose"].body, 64, 64)] > 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_colorkey_recovers_ground_truth(seed):
    s = syn.make_sample(seed, CFG)
    gt = marker_keypoints(s["pose"].body)
    vis = syn.marker_visibility(s["pose"].body, 64, 64)
    assert vis.mean() > 0.95
    est = estimate_pose_colorkey(s["video"])
    assert pck(est, gt, vis, alpha=0.1, width=64, height=64) == 1.0
    err = keypoint_error(est, gt, vis, width=64, height=64)
    assert err["detected"] == 1.0
    assert err["l2_px"] < 0.6, err  # sub-pixel centroid accuracy
    assert err["l2"] < 0.6 / 64


def test_gt_video_roundtrips_losslessly_through_mp4(tmp_path):
    s = syn.make_sample(2, CFG)
    syn.write_video(tmp_path / "v.mp4", s["video"])
    np.testing.assert_array_equal(syn.read_video(tmp_path / "v.mp4"), s["video"])


def test_dataset_writer_is_resumable_and_manifest_valid(tmp_path):
    man = syn.make_dataset(tmp_path, 2, seed=7, cfg=CFG, split="val")
    rows = [json.loads(line) for line in man.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["000000", "000001"]
    root = man.parent
    for r in rows:
        assert {"id", "ref_image", "pose", "pose_keypoints", "gt", "prompt"} <= set(r)
        assert r["prompt"] == "a person is dancing"
        for k in ("ref_image", "pose", "pose_keypoints", "gt", "ref_pose"):
            assert (root / r[k]).exists(), r[k]
        assert len(list((root / r["pose"]).glob("*.png"))) == 9
        seq = load_keypoints(root / r["pose_keypoints"])
        assert np.asarray(seq.body).shape == (9, 20, 3)
        assert syn.read_video(root / r["gt"]).shape == (9, 64, 64, 3)
    # sample 1 equals make_sample with its derived seed
    exp = syn.make_sample(syn.sample_seed(7, "val", 1), CFG)
    np.testing.assert_array_equal(syn.read_video(root / "000001" / "gt.mp4"), exp["video"])
    # resume: a finished sample is not rewritten; a stale temp dir is cleaned; new ids appended
    marker = root / "000000" / "ref.png"
    mtime = marker.stat().st_mtime_ns
    (root / ".000002.tmp-999").mkdir()
    man2 = syn.make_dataset(tmp_path, 3, seed=7, cfg=CFG, split="val")
    assert marker.stat().st_mtime_ns == mtime
    assert not (root / ".000002.tmp-999").exists()
    assert [json.loads(x)["id"] for x in man2.read_text().splitlines()] == ["000000", "000001", "000002"]
    assert (root / "000002" / "gt.mp4").is_file()
