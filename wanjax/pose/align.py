"""Bone-length retargeting of a driving pose sequence to a reference pose (unianimate_dit.md 11.4).

All ratios come from driving frame 0 and are applied to every frame, in normalised coordinates:
  1. global scale: x by the ratio of the R->L shoulder x-spans (kp5.x - kp2.x), y by the ratio of the
     mid-shoulder -> mid-hip y-distances (body and hands);
  2. per bone (parent -> child, in UA's order): ratio = reference length / scaled frame-0 length; in
     every frame the child and everything further down its chain (hands follow the wrists, toes the
     knees/ankles) moves along the bone by ``(child - parent) * (ratio - 1)``;
  3. translation so that frame 0's neck lands on the reference neck.

Deviations from UA's script (documented): invisible points stay invisible (UA also moves the -1
sentinels, which can make them reappear); a bone whose end points are not visible in a frame is
not adjusted in that frame (UA would use the sentinels).
"""
from __future__ import annotations

import numpy as np

from wanjax.pose.keypoints import NUM_BODY, SCORE_THRESHOLD, PoseSequence

BODY_NAMES = ("nose", "neck", "R-shoulder", "R-elbow", "R-wrist", "L-shoulder", "L-elbow", "L-wrist",
              "R-hip", "R-knee", "R-ankle", "L-hip", "L-knee", "L-ankle", "R-eye", "L-eye", "R-ear", "L-ear",
              "L-toes", "R-toes")
RIGHT_HAND, LEFT_HAND = 1, 0
# (parent, child, body points moved, hands moved), in the order UA applies them.
BONES: tuple[tuple[int, int, tuple[int, ...], tuple[int, ...]], ...] = (
    (1, 0, (0, 14, 15, 16, 17), ()),          # neck
    (1, 2, (2, 3, 4), (RIGHT_HAND,)),         # right shoulder
    (1, 5, (5, 6, 7), (LEFT_HAND,)),          # left shoulder
    (2, 3, (3, 4), (RIGHT_HAND,)),            # right upper arm
    (3, 4, (4,), (RIGHT_HAND,)),              # right forearm
    (5, 6, (6, 7), (LEFT_HAND,)),             # left upper arm
    (6, 7, (7,), (LEFT_HAND,)),               # left forearm
    (0, 14, (14, 16), ()),                    # head: nose -> R-eye
    (0, 15, (15, 17), ()),                    # nose -> L-eye
    (14, 16, (16,), ()),                      # R-eye -> R-ear
    (15, 17, (17,), ()),                      # L-eye -> L-ear
    (8, 9, (9, 10, 19), ()),                  # right thigh (R-toes follow)
    (9, 10, (10, 19), ()),                    # right shin
    (11, 12, (12, 13, 18), ()),               # left thigh (L-toes follow)
    (12, 13, (13, 18), ()),                   # left shin
)
REQUIRED = tuple(range(18))


class AlignError(ValueError):
    """Retargeting is impossible (points missing or degenerate spans)."""


def _require_visible(body: np.ndarray, what: str) -> None:
    missing = [f"{k} ({BODY_NAMES[k]})" for k in REQUIRED if not body[k, 2] > SCORE_THRESHOLD]
    if missing:
        raise AlignError(f"align_pose: {what} must show all 18 body keypoints (score > {SCORE_THRESHOLD}); "
                         f"missing: {', '.join(missing)}. Pick a reference image / first driving frame with "
                         f"the whole body visible, or skip retargeting.")


def _ratio(num: float, den: float, what: str) -> float:
    if abs(den) < 1e-8:
        raise AlignError(f"align_pose: driving frame 0 has a zero {what}; cannot compute the scale ratio")
    return num / den


def align_pose(driving: PoseSequence, reference_body: np.ndarray, *,
               reference_size: tuple[int, int] | None = None) -> PoseSequence:
    """Retarget ``driving`` to the proportions and neck position of ``reference_body [20, 3]``.

    Both are in normalised coordinates. Returns a new ``PoseSequence`` (same frame count; width and
    height = ``reference_size`` (width, height) if given, else the driving sequence's).
    """
    ref = np.asarray(reference_body, np.float64)
    if ref.shape != (NUM_BODY, 3):
        raise AlignError(f"align_pose: reference_body must be [{NUM_BODY}, 3], got {ref.shape}")
    _require_visible(ref, "the reference pose")
    _require_visible(driving.body[0].astype(np.float64), "driving frame 0")

    body = driving.body[..., :2].astype(np.float64).copy()      # [T, 20, 2]
    hands = driving.hands[..., :2].astype(np.float64).copy()    # [T, 2, 21, 2]
    body_vis = driving.body[..., 2] > SCORE_THRESHOLD           # [T, 20]
    hand_vis = driving.hands[..., 2] >= SCORE_THRESHOLD         # [T, 2, 21]

    d0 = body[0]
    x_ratio = _ratio(ref[5, 0] - ref[2, 0], d0[5, 0] - d0[2, 0], "shoulder x-span (kp5.x - kp2.x)")
    ref_torso = 0.5 * (ref[8, 1] + ref[11, 1]) - 0.5 * (ref[2, 1] + ref[5, 1])
    d_torso = 0.5 * (d0[8, 1] + d0[11, 1]) - 0.5 * (d0[2, 1] + d0[5, 1])
    y_ratio = _ratio(ref_torso, d_torso, "mid-shoulder to mid-hip y-distance")
    scale = np.array([x_ratio, y_ratio])
    body *= scale
    hands *= scale

    ratios = []
    for parent, child, _, _ in BONES:
        ref_len = float(np.hypot(*(ref[child, :2] - ref[parent, :2])))
        cur_len = float(np.hypot(*(body[0, child] - body[0, parent])))
        if cur_len < 1e-8:
            raise AlignError(f"align_pose: bone {BODY_NAMES[parent]} -> {BODY_NAMES[child]} has zero length "
                             f"in driving frame 0")
        ratios.append(ref_len / cur_len)

    for t in range(body.shape[0]):
        for (parent, child, moved, moved_hands), r in zip(BONES, ratios):
            if not (body_vis[t, parent] and body_vis[t, child]):
                continue
            off = (body[t, child] - body[t, parent]) * (r - 1.0)
            body[t, list(moved)] += off
            for h in moved_hands:
                hands[t, h] += off

    shift = ref[1, :2] - body[0, 1]
    body += shift
    hands += shift

    out_body = np.concatenate([body, driving.body[..., 2:3].astype(np.float64)], axis=-1)
    out_hands = np.concatenate([hands, driving.hands[..., 2:3].astype(np.float64)], axis=-1)
    out_body[~body_vis] = (-1.0, -1.0, 0.0)
    out_hands[~hand_vis] = (-1.0, -1.0, 0.0)
    w, h = reference_size if reference_size is not None else (driving.width, driving.height)
    return PoseSequence(out_body.astype(np.float32), out_hands.astype(np.float32), w, h)
