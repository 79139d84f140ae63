"""Pose and video metrics, and the evaluate CLI end to end."""

import json
import math

import numpy as np
import pytest

from wanjax.data import synthetic as syn
from wanjax.metrics import pose as pm
from wanjax.metrics import video as vm

CFG = syn.SyntheticConfig(height=64, width=64, num_frames=9)


@pytest.fixture(scope="module")
def sample():
    return syn.make_sample(4, CFG)


def _shift_x(video: np.ndarray, k: int) -> np.ndarray:
    """Translate every frame right by k px, filling the vacated columns with the edge column."""
    out = np.empty_like(video)
    out[:, :, k:] = video[:, :, :-k]
    out[:, :, :k] = video[:, :, :1]
    return out


def test_perfect_video_gives_pck_one_and_zero_error():
    gt = np.random.default_rng(0).uniform(0.1, 0.9, (5, 14, 3)).astype(np.float32)
    gt[..., 2] = 1
    assert pm.pck(gt, gt) == 1.0
    e = pm.keypoint_error(gt, gt, width=64, height=32)
    assert e["l2"] == 0 and e["l2_px"] == 0 and e["detected"] == 1


def test_undetected_points_fail_pck_and_invisible_points_are_ignored():
    gt = np.random.default_rng(1).uniform(0.1, 0.9, (2, 4, 3)).astype(np.float32)
    gt[..., 2] = 1
    pred = gt.copy()
    pred[0, 0] = (-1, -1, 0)  # missed detection
    assert pm.pck(pred, gt) == pytest.approx(7 / 8)
    assert pm.keypoint_error(pred, gt)["detected"] == pytest.approx(7 / 8)
    gt2 = gt.copy()
    gt2[0, 0, 2] = 0  # not visible in GT -> ignored
    assert pm.pck(pred, gt2) == 1.0


def test_shifted_video_gives_expected_error_and_pck_drop(sample):
    k = 3
    body = sample["pose"].body
    gt = pm.marker_keypoints(body)
    vis = syn.marker_visibility(body, 64, 64)
    est = pm.estimate_pose_colorkey(_shift_x(sample["video"], k))
    e = pm.keypoint_error(est, gt, vis, width=64, height=64)
    assert e["detected"] == 1.0
    assert e["l2_px"] == pytest.approx(k, abs=0.5)
    assert e["l2"] == pytest.approx(k / 64, abs=0.5 / 64)
    # 'image' normaliser: threshold alpha * 64 px straddling k
    assert pm.pck(est, gt, vis, alpha=(k + 1.0) / 64, ref="image", width=64, height=64) == 1.0
    assert pm.pck(est, gt, vis, alpha=(k - 1.0) / 64, ref="image", width=64, height=64) == 0.0
    # 'bbox' normaliser: threshold alpha * max bbox side of the visible GT keypoints per frame
    side = np.array([np.ptp(g[v, :2] * 64, axis=0).max() for g, v in zip(gt, vis)])
    assert pm.pck(est, gt, vis, alpha=(k + 1.0) / side.min(), ref="bbox", width=64, height=64) == 1.0
    assert pm.pck(est, gt, vis, alpha=(k - 1.0) / side.max(), ref="bbox", width=64, height=64) == 0.0


def test_pck_rejects_bad_inputs():
    a = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="ref"):
        pm.pck(a, a, ref="torso")
    with pytest.raises(ValueError, match="\\[T, K, 3\\]"):
        pm.pck(a, np.zeros((2, 4, 3)))


def test_dwpose_estimator_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="yolox_l.onnx.*dw-ll_ucoco_384.onnx"):
        pm.DWPoseEstimator(tmp_path / "yolox_l.onnx", tmp_path / "dw-ll_ucoco_384.onnx")


def test_openpose_conversion_layout():
    rng = np.random.default_rng(0)
    k = rng.uniform(10, 90, (133, 2))
    s = np.ones(133)
    s[17] = 0.1  # left big toe invisible -> left toes (18) invisible
    body, hands = pm.openpose_from_wholebody(k, s, 100, 100)
    np.testing.assert_allclose(body[1, :2], (k[5] + k[6]) / 200, atol=1e-6)  # neck = mid-shoulders
    np.testing.assert_allclose(body[2, :2], k[6] / 100, atol=1e-6)  # R-shoulder = COCO 6
    np.testing.assert_allclose(body[19, :2], (k[20] + k[21]) / 200, atol=1e-6)
    assert tuple(body[18]) == (-1, -1, 0)
    np.testing.assert_allclose(hands[1, 0, :2], k[112] / 100, atol=1e-6)


def test_psnr_identical_and_analytic():
    x = np.random.default_rng(0).uniform(20, 230, (3, 16, 16, 3))
    assert math.isinf(vm.psnr(x, x))
    d = 5.0
    signs = np.random.default_rng(1).choice([-1.0, 1.0], x.shape)
    assert vm.psnr(x, x + d * signs) == pytest.approx(10 * np.log10(255 ** 2 / d ** 2), abs=1e-9)
    # Gaussian noise: PSNR ~ 20 log10(255 / sigma)
    n = np.random.default_rng(2).normal(0, 10, (8, 64, 64, 3))
    assert vm.psnr(x[:1].repeat(8, 0).repeat(4, 1).repeat(4, 2), x[:1].repeat(8, 0).repeat(4, 1).repeat(4, 2) + n) \
        == pytest.approx(20 * np.log10(25.5), abs=0.05)


def test_ssim(sample):
    v = sample["video"]
    assert vm.ssim(v, v) == pytest.approx(1.0, abs=1e-9)
    assert vm.ssim(v, v, channels="rgb") == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(v + np.random.default_rng(0).normal(0, 25, v.shape), 0, 255)
    s = vm.ssim(v, noisy)
    assert 0 < s < 0.9
    assert vm.ssim(v, np.clip(v + np.random.default_rng(0).normal(0, 5, v.shape), 0, 255)) > s
    with pytest.raises(ValueError, match="window"):
        vm.ssim(v[:, :8, :8], v[:, :8, :8])


def test_flicker(sample):
    v = sample["video"]
    static = np.repeat(v[:1], 5, axis=0)
    assert vm.flicker(static) == 0.0
    assert vm.flicker_ratio(v, v) == 1.0
    assert vm.flicker_ratio(static, static) == 1.0
    alt = static.astype(np.float64)
    alt[1::2] += 4.0  # alternating brightness: every difference is +-4
    assert vm.flicker(alt) == pytest.approx(16.0)


def test_optical_flow_recovers_translation():
    rng = np.random.default_rng(0)
    tex = vm._blur(np.kron(rng.uniform(0, 1, (12, 12)), np.ones((8, 8)))[None], 3.0)
    d = np.array([1.5, -0.7])
    moved, _ = vm.warp(tex, np.broadcast_to(-d, tex.shape + (2,)))  # moved(x) = tex(x - d)
    f = vm.optical_flow(tex[:, 10:74, 10:74], moved[:, 10:74, 10:74])
    np.testing.assert_allclose(f[0, 16:48, 16:48].mean((0, 1)), -d, atol=0.1)


def test_warping_error(sample):
    v = sample["video"]
    assert vm.warping_error(np.repeat(v[:1], 4, axis=0)) == 0.0
    base = vm.warping_error(v, v)
    flick = np.clip(v + np.random.default_rng(0).normal(0, 10, (v.shape[0], 1, 1, 1)), 0, 255)
    assert base < 0.02
    assert vm.warping_error(flick, v) > 2 * base


def test_evaluate_cli_end_to_end(tmp_path, capsys):
    from infer import evaluate as ev

    man = syn.make_dataset(tmp_path / "data", 2, seed=1, cfg=CFG, split="test")
    split = man.parent
    vids = tmp_path / "gen"
    vids.mkdir()
    for i, row in enumerate(json.loads(x) for x in man.read_text().splitlines()):
        v = syn.read_video(split / row["gt"])
        if i == 1:
            v = _shift_x(v, 2)  # a worse "generated" video
        syn.write_video(vids / f"{row['id']}.mp4", v)
    out = tmp_path / "rep" / "report"
    assert ev.main(["--videos", str(vids), "--pose", str(split), "--gt", str(split), "--out", str(out),
                    "--no-progress"]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = {r["id"]: r for r in rep["videos"]}
    assert set(rows) == {"000000", "000001"} and rep["config"]["n"] == 2
    assert rows["000000"]["pck"] == 1.0 and rows["000000"]["kp_err_px"] < 0.6
    assert rows["000000"]["psnr"] == "inf" and rows["000000"]["ssim"] == pytest.approx(1.0)
    assert rows["000000"]["flicker_ratio"] == pytest.approx(1.0)
    assert rows["000001"]["kp_err_px"] == pytest.approx(2.0, abs=0.5) and rows["000001"]["psnr"] < 40
    assert rep["mean"]["kp_err_px"] == pytest.approx((rows["000000"]["kp_err_px"] + rows["000001"]["kp_err_px"]) / 2)
    md = (tmp_path / "rep" / "report.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 2 + 1 and "**mean**" in lines[-1] and "pck" in lines[0]
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)
    # missing pose -> clear error naming the file and the flag, exit code 2
    (vids / "999999.mp4").write_bytes((vids / "000000.mp4").read_bytes())
    assert ev.main(["--videos", str(vids), "--pose", str(split), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--pose" in err and "999999" in err and "pose.json" in err
