"""UA pose drawing (unianimate_dit.md 11.3): golden images, threshold, colours, hand eps rule.

The golden PNGs under tests/golden/ were produced once by this renderer (``python
tests/test_pose_render.py`` rewrites them); they pin the rasterisation exactly against regressions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wanjax.pose.keypoints import PoseSequence, invisible_hands
from wanjax.pose.render import COLORS, draw_pose, hand_edge_color, network_rgb, render_sequence

GOLDEN = Path(__file__).parent / "golden"


def standing_body() -> np.ndarray:
    """A fixed, fully visible 20-point skeleton (normalised x, y, score)."""
    return np.array([
        [0.50, 0.12, 0.9], [0.50, 0.22, 0.9], [0.38, 0.23, 0.9], [0.32, 0.38, 0.9], [0.30, 0.52, 0.9],
        [0.62, 0.23, 0.9], [0.68, 0.38, 0.9], [0.72, 0.50, 0.9], [0.42, 0.52, 0.9], [0.41, 0.70, 0.9],
        [0.40, 0.88, 0.9], [0.58, 0.52, 0.9], [0.60, 0.70, 0.9], [0.61, 0.88, 0.9], [0.47, 0.10, 0.9],
        [0.53, 0.10, 0.9], [0.44, 0.11, 0.9], [0.56, 0.11, 0.9], [0.64, 0.94, 0.9], [0.37, 0.94, 0.9]],
        np.float32)


def fan_hands() -> np.ndarray:
    """Two fixed hands: 5 straight fingers fanned out below each wrist."""
    hands = invisible_hands(1)[0]
    for h, (wx, wy) in enumerate([(0.72, 0.50), (0.30, 0.52)]):
        hands[h, 0] = (wx, wy, 0.9)
        for f in range(5):
            a = np.pi / 2 + (f - 2) * 0.35
            for j in range(4):
                r = 0.025 * (j + 1)
                hands[h, 1 + 4 * f + j] = (wx + r * np.cos(a) * 0.7, wy + r * np.sin(a), 0.9)
    return hands


def golden_cases() -> dict[str, np.ndarray]:
    body, hands = standing_body(), fan_hands()
    partial = body.copy()
    partial[[3, 4, 16, 18]] = (-1.0, -1.0, 0.0)  # right arm, R-ear, L-toes invisible
    partial[9, 2] = 0.29                         # R-knee just below the threshold
    hands_partial = hands.copy()
    hands_partial[1] = (-1.0, -1.0, 0.0)         # right hand invisible
    return {
        "pose_body_hands_96x64.png": draw_pose(body, hands, 96, 64),
        "pose_partial_160x112.png": draw_pose(partial, hands_partial, 160, 112),
    }


def test_golden_images():
    for name, img in golden_cases().items():
        path = GOLDEN / name
        assert path.is_file(), f"missing golden image {path}; generate with python tests/test_pose_render.py"
        want = np.asarray(Image.open(path).convert("RGB"))
        assert img.dtype == np.uint8 and img.shape == want.shape
        assert np.array_equal(img, want), f"{name}: {int(np.sum(np.any(img != want, -1)))} pixels differ"


def _blank_body() -> np.ndarray:
    """[20, 3] of invisible points (-1, -1, 0)."""
    return np.tile(np.array([-1.0, -1.0, 0.0], np.float32), (20, 1))


def _two_points(score_a: float, score_b: float) -> np.ndarray:
    body = _blank_body()
    body[1] = (0.5, 0.1, score_a)   # neck
    body[2] = (0.5, 0.9, score_b)   # R-shoulder: limb 0 (neck - R-shoulder), vertical
    return body


def test_threshold_and_invisible_points():
    h = w = 100
    drawn = draw_pose(_two_points(0.31, 0.31), None, h, w)
    not_drawn = draw_pose(_two_points(0.31, 0.29), None, h, w)
    # R-shoulder joint (pixel (x=50, y=90)) and the limb midpoint (50, 50)
    assert tuple(drawn[90, 50]) == network_rgb(COLORS[2])
    assert tuple(drawn[50, 50]) != (0, 0, 0)
    assert tuple(not_drawn[90, 50]) == (0, 0, 0) and tuple(not_drawn[50, 50]) == (0, 0, 0)
    assert tuple(not_drawn[10, 50]) == network_rgb(COLORS[1])  # the neck alone is still drawn
    # nothing at all for a fully invisible pose
    empty = draw_pose(_blank_body(), invisible_hands(1)[0], h, w)
    assert not empty.any()


def test_limb_and_joint_colours():
    img = draw_pose(_two_points(1.0, 1.0), None, 100, 100)
    # spec table: limb 0 listed (255, 0, 0) -> network RGB (0, 0, 153) = 0.6 x reversed colour
    assert tuple(img[50, 50]) == (0, 0, 153)
    assert tuple(img[50, 50]) == tuple(int(c * 0.6) for c in network_rgb(COLORS[0]))
    # joints in full colour: neck listed (255, 85, 0) -> (0, 85, 255)
    assert tuple(img[10, 50]) == (0, 85, 255)
    # limb 18 (R-ankle 10 -> R-toes 19) and the R-toes joint colour of the spec table
    body = _blank_body()
    body[10] = (0.2, 0.5, 1.0)
    body[19] = (0.8, 0.5, 1.0)
    img = draw_pose(body, None, 100, 100)
    assert tuple(img[50, 50]) == (153, 153, 102)
    assert tuple(img[50, 80]) == (0, 255, 255)
    assert tuple(img[50, 20]) == network_rgb(COLORS[10]) == (255, 170, 0)
    # limb pixels lie within stickwidth (4) of the axis: 6 px off the axis is black
    assert tuple(img[56, 50]) == (0, 0, 0) and tuple(img[46, 50]) != (0, 0, 0)


def test_hand_eps_rule_and_colours():
    h, w = 100, 200
    body = _blank_body()
    hands = invisible_hands(1)[0]
    hands[0, 0] = (1.2 / w, 0.5, 1.0)   # int(1.2) = 1 px > eps: drawn
    hands[0, 1] = (0.9, 0.5, 1.0)       # edge 0 (0 -> 1) along row 50
    img = draw_pose(body, hands, h, w)
    assert tuple(img[50, 1]) == (255, 0, 0)           # hand joints: listed (0, 0, 255) -> pure red
    assert tuple(img[50, 100]) == network_rgb(hand_edge_color(0)) == (0, 0, 255)
    hands[0, 0] = (0.8 / w, 0.5, 1.0)   # int(0.8) = 0 px: fails the eps test, as does its edge
    img = draw_pose(body, hands, h, w)
    assert tuple(img[50, 1]) == (0, 0, 0) and tuple(img[50, 100]) == (0, 0, 0)
    assert tuple(img[50, 180]) == (255, 0, 0)         # point 1 itself is still drawn
    hands[0, 0] = (0.5, 0.5, 0.29)      # below the score threshold
    assert tuple(draw_pose(body, hands, h, w)[50, 100]) == (0, 0, 0)
    # HSV edge colours, e.g. edge 5 = HSV(0.25, 1, 1) = listed (128, 255, 0) -> network (0, 255, 128)
    assert hand_edge_color(5) == (128, 255, 0)


def test_render_sequence():
    body = np.stack([standing_body(), _two_points(1.0, 1.0)])
    hands = np.stack([fan_hands(), invisible_hands(1)[0]])
    seq = PoseSequence(body, hands, 64, 96)
    frames = render_sequence(seq, 96, 64)
    assert frames.shape == (2, 96, 64, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[0], draw_pose(body[0], hands[0], 96, 64))
    assert np.array_equal(frames[1], draw_pose(body[1], None, 96, 64))


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    for name, img in golden_cases().items():
        Image.fromarray(img).save(GOLDEN / name, optimize=True)
        print("wrote", GOLDEN / name)
