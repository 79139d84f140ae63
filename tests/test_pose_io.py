"""Keypoint files (json/npz/restricted pkl), frame folders and mp4, pose-video preparation, retargeting."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from wanjax.pose.align import BONES, AlignError, align_pose
from wanjax.pose.keypoints import (PoseFileError, PoseSequence, invisible_hands, load_keypoints,
                                   save_keypoints)
from wanjax.pose.video import (VideoError, prepare_pose_video, prepare_ref_pose, read_video,
                               resize_frames)

REF_BODY = np.array([
    [0.50, 0.12, 0.9], [0.50, 0.22, 0.9], [0.38, 0.23, 0.9], [0.32, 0.38, 0.9], [0.30, 0.52, 0.9],
    [0.62, 0.23, 0.9], [0.68, 0.38, 0.9], [0.72, 0.50, 0.9], [0.42, 0.52, 0.9], [0.41, 0.70, 0.9],
    [0.40, 0.88, 0.9], [0.58, 0.52, 0.9], [0.60, 0.70, 0.9], [0.61, 0.88, 0.9], [0.47, 0.10, 0.9],
    [0.53, 0.10, 0.9], [0.44, 0.11, 0.9], [0.56, 0.11, 0.9], [0.64, 0.94, 0.9], [0.37, 0.94, 0.9]],
    np.float32)


def _seq(t: int = 3) -> PoseSequence:
    rng = np.random.default_rng(0)
    body = rng.uniform(0, 1, (t, 20, 3)).astype(np.float32)
    hands = rng.uniform(0, 1, (t, 2, 21, 3)).astype(np.float32)
    body[1, 4] = (-1.0, -1.0, 0.0)
    return PoseSequence(body, hands, 512, 768)


# ---- keypoint files -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_keypoint_round_trip(tmp_path, suffix):
    seq = _seq()
    back = load_keypoints(save_keypoints(tmp_path / f"k{suffix}", seq))
    # float32 -> JSON (repr of the float64 widening) -> float32 is exact, npz stores the bits
    assert np.array_equal(back.body, seq.body) and np.array_equal(back.hands, seq.hands)
    assert (back.width, back.height, len(back)) == (512, 768, 3)


def _ua_pose(shift: float) -> dict:
    cand = REF_BODY[:, :2] + shift
    subset = np.arange(20, dtype=np.float64)[None]
    subset[0, 3] = -1
    cand[3] = -1
    hands = np.full((2, 21, 2), 0.5) + shift
    hands[1] = -1
    return {"bodies": {"candidate": cand, "subset": subset}, "hands": hands,
            "faces": np.zeros((1, 68, 2))}


@pytest.mark.parametrize("protocol", [2, 5])
def test_restricted_pkl_accepts_plain_data(tmp_path, protocol):
    path = tmp_path / "poses.pkl"
    path.write_bytes(pickle.dumps({"poses": [_ua_pose(0.0), _ua_pose(0.01)], "width": 480, "height": 832},
                                  protocol=protocol))
    seq = load_keypoints(path)
    assert (len(seq), seq.width, seq.height) == (2, 480, 832)
    np.testing.assert_array_equal(seq.body[1, 0, :2], REF_BODY[0, :2] + 0.01)
    assert tuple(seq.body[0, 3]) == (-1.0, -1.0, 0.0) and seq.body[0, 4, 2] == 1.0
    assert np.all(seq.hands[:, 1, :, 2] == 0) and np.all(seq.hands[:, 0, :, 2] == 1)
    # a bare list of frames (no width/height) falls back to the UA 512x768 canvas
    path.write_bytes(pickle.dumps([_ua_pose(0.0)], protocol=protocol))
    assert (load_keypoints(path).width, load_keypoints(path).height) == (512, 768)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_pkl_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([_ua_pose(0.0), {"x": _Evil(marker)}]))
    with pytest.raises(PoseFileError, match=r"refused to unpickle (posix|os|nt)\.system"):
        load_keypoints(path)
    assert not marker.exists()  # nothing was executed
    path.write_bytes(pickle.dumps([_ua_pose(0.0), {"f": print}]))
    with pytest.raises(PoseFileError, match="builtins.print"):
        load_keypoints(path)


def test_bad_keypoint_files(tmp_path):
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(PoseFileError, match="empty"):
        load_keypoints(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PoseFileError, match="not valid JSON"):
        load_keypoints(tmp_path / "bad.json")
    (tmp_path / "nob.json").write_text('{"width": 2, "height": 2, "frames": [{"hands": []}]}')
    with pytest.raises(PoseFileError, match=r"frames\[0\] has no 'body'"):
        load_keypoints(tmp_path / "nob.json")
    (tmp_path / "shape.json").write_text('{"width": 2, "height": 2, "frames": [{"body": [[0, 0, 1]]}]}')
    with pytest.raises(PoseFileError, match=r"'frames\[\*\].body' has shape \(1, 1, 3\)"):
        load_keypoints(tmp_path / "shape.json")
    np.savez(tmp_path / "mism.npz", body=np.zeros((3, 20, 3)), hands=np.zeros((2, 2, 21, 3)), width=4, height=4)
    with pytest.raises(PoseFileError, match="'body' has 3 frames, 'hands' has 2"):
        load_keypoints(tmp_path / "mism.npz")
    np.savez(tmp_path / "nowh.npz", body=np.zeros((3, 20, 3)))
    with pytest.raises(PoseFileError, match="missing array 'width'"):
        load_keypoints(tmp_path / "nowh.npz")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps([_ua_pose(0.0)])[:40])
    with pytest.raises(PoseFileError, match="not a readable pickle"):
        load_keypoints(tmp_path / "trunc.pkl")
    (tmp_path / "jpeg.pkl").write_bytes(pickle.dumps({"000000.jpg": b"\xff\xd8\xff"}))
    with pytest.raises(PoseFileError, match="JPEG pose drawing"):
        load_keypoints(tmp_path / "jpeg.pkl")
    with pytest.raises(PoseFileError, match="no such keypoint file"):
        load_keypoints(tmp_path / "missing.json")


# ---- videos -------------------------------------------------------------------------------------
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def test_frame_folder_numeric_order(tmp_path):
    for name, col in zip(["10.jpg", "0.jpg", "2.jpg"], COLOURS):
        Image.fromarray(np.full((16, 24, 3), col, np.uint8)).save(tmp_path / name, quality=95)
    Image.fromarray(np.full((16, 24, 3), 255, np.uint8)).save(tmp_path / "pose.jpg")
    frames = read_video(tmp_path)
    assert frames.shape == (3, 16, 24, 3) and frames.dtype == np.uint8
    # order 0, 2, 10 (pose.jpg skipped); flat JPEG colours survive within a few levels
    want = np.array([COLOURS[1], COLOURS[2], COLOURS[0]], np.float64)
    assert np.max(np.abs(frames.mean(axis=(1, 2)) - want)) < 4
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "11.jpg")
    with pytest.raises(VideoError, match="11.jpg: frame size 8x8 differs"):
        read_video(tmp_path)
    (tmp_path / "12.jpg").write_bytes(b"not an image")
    (tmp_path / "11.jpg").unlink()
    with pytest.raises(VideoError, match="12.jpg: unreadable image"):
        read_video(tmp_path)


def test_mp4_read(tmp_path):
    import imageio.v2 as imageio

    path = tmp_path / "clip.mp4"
    with imageio.get_writer(str(path), format="FFMPEG", fps=8, codec="libx264", quality=10,
                            macro_block_size=16) as wr:
        for col in COLOURS:
            wr.append_data(np.full((32, 48, 3), col, np.uint8))
    frames = read_video(path)
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
    # lossy H.264 + yuv420p on flat colours: a few levels of error
    assert np.max(np.abs(frames.mean(axis=(1, 2)) - np.array(COLOURS, np.float64))) < 8
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(VideoError, match="bad.mp4: unreadable video"):
        read_video(tmp_path / "bad.mp4")


def test_prepare_pose_video_and_ref_pose():
    frames = np.random.default_rng(0).integers(0, 256, (81, 32, 16, 3), dtype=np.uint8)
    x = prepare_pose_video(frames, 81)
    assert x.shape == (1, 84, 32, 16, 3) and x.dtype == np.float32
    assert np.array_equal(x[0, :4], np.repeat(frames[:1], 4, axis=0) / np.float32(255))
    assert np.array_equal(x[0, 4:], frames[1:] / np.float32(255))
    with pytest.raises(VideoError, match="has 50 frames but num_frames=81"):
        prepare_pose_video(frames[:50], 81)
    padded = prepare_pose_video(frames[:50], 81, pad_last=True)
    assert padded.shape == (1, 84, 32, 16, 3)
    assert np.array_equal(padded[0, 53:], np.repeat(frames[49:50], 31, axis=0) / np.float32(255))
    with pytest.raises(VideoError, match="must be 4k\\+1"):
        prepare_pose_video(frames, 80)
    with pytest.raises(VideoError, match="got shape \\(81, 32, 16, 4\\); drop the alpha"):
        prepare_pose_video(np.zeros((81, 32, 16, 4), np.uint8), 81)
    small = resize_frames(frames[:2], 8, 12)
    assert small.shape == (2, 8, 12, 3) and small.dtype == np.uint8
    ref = prepare_ref_pose(frames[0], 16, 8)
    assert ref.shape == (1, 16, 8, 3) and 0.0 <= ref.min() and ref.max() <= 1.0


# ---- retargeting --------------------------------------------------------------------------------
def _bone_lengths(body: np.ndarray) -> np.ndarray:
    return np.array([np.hypot(*(body[c, :2] - body[p, :2])) for p, c, _, _ in BONES])


def test_align_pose_recovers_reference_bone_lengths():
    drv = REF_BODY.copy()
    drv[:, 0] = 0.3 + 0.7 * (drv[:, 0] - 0.5)   # narrower ...
    drv[:, 1] = 0.1 + 1.2 * drv[:, 1] * 0.8     # ... differently scaled and shifted
    drv[[3, 4], :2] += (-0.05, 0.06)            # a longer right arm
    drv[[9, 10, 19], 1] += 0.05                 # a longer right thigh
    moved = drv.copy()
    moved[[6, 7], :2] += (0.03, -0.04)          # frame 1: the left forearm moves
    hands = invisible_hands(2)
    hands[:, 0, 0] = np.concatenate([drv[7], moved[7]]).reshape(2, 3)  # left-hand wrist on kp 7
    seq = PoseSequence(np.stack([drv, moved]), hands, 64, 96)
    out = align_pose(seq, REF_BODY)
    # frame 0: every retargeted bone has the reference length; float64 inside, float32 output
    np.testing.assert_allclose(_bone_lengths(out.body[0]), _bone_lengths(REF_BODY), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.body[0, 1, :2], REF_BODY[1, :2], atol=1e-6)  # neck on the reference neck
    # the hand follows its wrist in every frame; invisible hand points stay invisible
    np.testing.assert_allclose(out.hands[:, 0, 0, :2], out.body[:, 7, :2], atol=1e-6)
    assert np.all(out.hands[:, 0, 1:, :] == np.array([-1.0, -1.0, 0.0], np.float32))
    # identity: a driving pose equal to the reference is unchanged
    same = align_pose(PoseSequence(REF_BODY[None], invisible_hands(1), 64, 96), REF_BODY)
    np.testing.assert_allclose(same.body[0], REF_BODY, atol=1e-6)


def test_align_pose_requires_visible_points():
    ref = REF_BODY.copy()
    ref[4] = (-1.0, -1.0, 0.0)
    with pytest.raises(AlignError, match=r"reference pose .*missing: 4 \(R-wrist\)"):
        align_pose(PoseSequence(REF_BODY[None], invisible_hands(1), 64, 96), ref)
