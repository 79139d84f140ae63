"""Procedural pose-driven videos with exact ground truth (the "synthetic world").

A sample is a 2D stick person (DWPose / OpenPose-18 + 2 toe points, see
``/work/shared/docs/unianimate_dit.md`` section 11.2) that moves with one of a few
motion families, drawn with a seeded appearance. Everything is a pure function of
an integer seed, so the dataset can be regenerated bit-exactly.

Coordinates
    Keypoints use the ``PoseSequence`` convention of ``wanjax.pose.keypoints``:
    ``body: float32 [T, 20, 3]`` with ``(x, y, score)``, ``x`` and ``y`` normalised to
    ``[0, 1]`` of the frame width / height, invisible points ``(-1, -1, 0)``.
    Internally the skeleton is built in *height units* (``X = x_px / H``, ``Y = y_px / H``)
    so that bones keep their length for any aspect ratio; ``x = X * H / W``.

Measurement markers
    Each of the 14 joints in ``MARKER_JOINTS`` carries a small disc in a FIXED, fully
    saturated key colour (``MARKER_COLORS``; value 255, min channel 0). Background and
    limb colours are built from desaturated HSV colours (channel spread <= 0.40 * 0.85 *
    255 ~= 87), and every blend / shading of them keeps the spread <= 87, so no
    background or limb pixel can come within ``DEFAULT_TOLERANCE`` (L-inf) of a marker
    colour. ``wanjax.metrics.pose.estimate_pose_colorkey`` reads the markers back.

Public API
    ``SyntheticConfig``, ``Skeleton``, ``sample_skeleton``, ``MotionParams``,
    ``sample_motion_params``, ``motion``, ``FAMILIES``, ``Appearance``, ``make_appearance``,
    ``render_figure``, ``render_video``, ``MarkerPalette``, ``DEFAULT_PALETTE``,
    ``make_sample``, ``make_dataset``, ``sample_seed``, ``write_video``, ``read_video``.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------
# Keypoint layout (OpenPose-18 + toes) and marker palette
# ----------------------------------------------------------------------------------------

NUM_BODY = 20
NUM_HAND = 21
BODY_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear",
    "l_ear", "l_toes", "r_toes",
)
# Limbs drawn as capsules (pairs of body indices); the head is a disc, not a capsule.
FIGURE_LIMBS = (
    (1, 8), (1, 11), (8, 11), (1, 2), (1, 5),  # torso outline + shoulders
    (2, 3), (3, 4), (5, 6), (6, 7),  # arms
    (8, 9), (9, 10), (11, 12), (12, 13),  # legs
    (10, 19), (13, 18),  # feet
    (1, 0),  # neck
)
MARKER_JOINTS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)


def _marker_colors(k: int) -> np.ndarray:
    """``k`` fully saturated hues (value 1, saturation 1) as uint8 ``[k, 3]``.

    Hues are evenly spaced on the colour wheel (spacing 360/k degrees; for k=14 the
    L-inf distance between neighbours is ~109) and assigned in steps of 5 around the
    wheel so that neighbouring joints get very different colours.
    """
    step = 5 if np.gcd(5, k) == 1 else 1
    out = []
    for j in range(k):
        h = ((j * step) % k) / k
        out.append([round(255 * c) for c in colorsys.hsv_to_rgb(h, 1.0, 1.0)])
    return np.asarray(out, dtype=np.uint8)


DEFAULT_TOLERANCE = 56  # L-inf RGB distance; < (255 - 87) / 2 keeps background out.


@dataclass(frozen=True)
class MarkerPalette:
    """Fixed key colours of the measurement markers.

    joints: body indices (into the 20-point layout) that carry a marker, length K.
    colors: uint8 ``[K, 3]`` RGB marker colours (fully saturated).
    tolerance: L-inf RGB distance within which a pixel counts as a marker pixel.
    radius_frac: marker radius as a fraction of the frame height (render side; the
        estimator uses it to turn pixel counts into a confidence).
    """

    joints: tuple[int, ...] = MARKER_JOINTS
    colors: np.ndarray = dataclasses.field(default_factory=lambda: _marker_colors(len(MARKER_JOINTS)))
    tolerance: int = DEFAULT_TOLERANCE
    radius_frac: float = 0.03

    def __post_init__(self):
        c = np.asarray(self.colors)
        if c.shape != (len(self.joints), 3):
            raise ValueError(f"MarkerPalette: colors must be [K={len(self.joints)}, 3], got {c.shape}")

    def radius_px(self, height: int) -> float:
        """Marker radius in pixels for a frame of ``height`` rows (at least 1.5 px)."""
        return max(1.5, self.radius_frac * height)

    def to_json(self) -> dict:
        return {"joints": list(self.joints), "colors": np.asarray(self.colors).tolist(),
                "tolerance": self.tolerance, "radius_frac": self.radius_frac}

    @staticmethod
    def from_json(d: dict) -> "MarkerPalette":
        return MarkerPalette(tuple(int(j) for j in d["joints"]), np.asarray(d["colors"], np.uint8),
                             int(d["tolerance"]), float(d["radius_frac"]))


DEFAULT_PALETTE = MarkerPalette()

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

FAMILIES = ("walk", "wave", "squat", "turn", "dance")


@dataclass(frozen=True)
class SyntheticConfig:
    """Seeded synthetic-world configuration.

    height, width: frame size in pixels (default 64x64).
    num_frames: T = 1 + 4k (Wan's VAE compresses 1 + 4k frames to 1 + k latents).
    family: one of ``FAMILIES`` or ``"random"`` (chosen per sample from the seed).
    fps: frames per second (motion frequencies are in Hz).
    hands: if True, draw-able 21-point hands are generated; otherwise hands are absent
        (all scores 0, coordinates -1), as allowed by the PoseSequence contract.
    supersample: render at ``s`` times the resolution and box-filter down (anti-aliasing);
        1 gives hard edges. Deterministic either way.
    prompt: text prompt written to the manifest.
    """

    height: int = 64
    width: int = 64
    num_frames: int = 17
    family: str = "random"
    fps: float = 8.0
    hands: bool = False
    supersample: int = 2
    prompt: str = "a person is dancing"
    palette: MarkerPalette = DEFAULT_PALETTE

    def __post_init__(self):
        if self.num_frames < 1 or (self.num_frames - 1) % 4 != 0:
            raise ValueError(f"SyntheticConfig.num_frames must be 1 + 4k (e.g. 17, 33), got {self.num_frames}")
        if self.height < 32 or self.width < 32:
            raise ValueError(f"SyntheticConfig: height/width must be >= 32, got {self.height}x{self.width}")
        if not 0.5 <= self.width / self.height <= 2.0:
            raise ValueError(f"SyntheticConfig: aspect width/height must be in [0.5, 2], got {self.width}/{self.height}")
        if self.family != "random" and self.family not in FAMILIES:
            raise ValueError(f"SyntheticConfig.family must be 'random' or one of {FAMILIES}, got {self.family!r}")
        if self.supersample < 1:
            raise ValueError(f"SyntheticConfig.supersample must be >= 1, got {self.supersample}")


# ----------------------------------------------------------------------------------------
# Skeleton
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skeleton:
    """Body proportions and placement, in height units (fraction of the frame height).

    center_x: hip-centre x in *normalised* frame coordinates [0, 1].
    ground_y: y of the lowest foot point (normalised, = height units).
    Bone lengths: torso (hip centre -> neck), neck (neck -> nose), upper_arm, forearm,
    thigh, shin, foot; half-widths shoulder_half, hip_half; head radius head.
    limb_radius: margin for the drawn limb thickness (used when fitting to the frame).
    """

    center_x: float
    ground_y: float
    torso: float
    neck: float
    head: float
    shoulder_half: float
    hip_half: float
    upper_arm: float
    forearm: float
    thigh: float
    shin: float
    foot: float
    limb_radius: float

    @property
    def stature(self) -> float:
        """Approximate standing height (ground to top of head) in height units."""
        return self.shin + self.thigh + self.torso + self.neck + 2 * self.head


def sample_skeleton(rng: np.random.Generator) -> Skeleton:
    """Random body proportions (each bone +-15 % around a nominal adult) and placement.

    The stature is 0.55-0.72 of the frame height; ``motion`` later rescales globally if a
    pose sequence would leave the frame, so any sample is valid.
    """
    stature = rng.uniform(0.55, 0.72)
    nominal = dict(torso=0.30, neck=0.09, head=0.065, shoulder_half=0.11, hip_half=0.065,
                   upper_arm=0.17, forearm=0.15, thigh=0.24, shin=0.23, foot=0.05)
    jit = {k: v * rng.uniform(0.85, 1.15) for k, v in nominal.items()}
    total = jit["shin"] + jit["thigh"] + jit["torso"] + jit["neck"] + 2 * jit["head"]
    s = stature / total
    b = {k: float(v * s) for k, v in jit.items()}
    return Skeleton(center_x=float(rng.uniform(0.4, 0.6)), ground_y=float(rng.uniform(0.88, 0.94)),
                    limb_radius=float(stature * rng.uniform(0.045, 0.06)), **b)


# ----------------------------------------------------------------------------------------
# Motion
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotionParams:
    """Parameters of one motion clip.

    skeleton: the body.  freq: main frequency in Hz.  phase: radians.
    amp: amplitude scale in [0.6, 1].  mix: weights of the five components used by "dance"
    (walk, wave, squat, turn, sway), each in [0, 1].  width, height: frame size in pixels.
    """

    skeleton: Skeleton
    freq: float
    phase: float
    amp: float
    mix: tuple[float, ...]
    width: int
    height: int
    hands: bool = False


def sample_motion_params(rng: np.random.Generator, skeleton: Skeleton, cfg: SyntheticConfig) -> MotionParams:
    """Random clip parameters: 0.35-0.8 Hz main frequency, random phase and amplitude."""
    mix = rng.uniform(0.3, 1.0, size=5)
    mix[rng.integers(0, 5)] = 1.0
    return MotionParams(skeleton=skeleton, freq=float(rng.uniform(0.35, 0.8)),
                        phase=float(rng.uniform(0, 2 * np.pi)), amp=float(rng.uniform(0.6, 1.0)),
                        mix=tuple(float(m) for m in mix), width=cfg.width, height=cfg.height,
                        hands=cfg.hands)


def _dir(angle: np.ndarray) -> np.ndarray:
    """Unit vector [..., 2] for an image-space angle measured from straight down (+y),
    positive turning toward +x."""
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1)


def _angles(family: str, t: np.ndarray, p: MotionParams) -> dict[str, np.ndarray]:
    """Per-frame joint angles (radians, image space, see ``_dir``) for ``t`` [T] seconds.

    Keys: root_dx (hip-centre x offset, height units), lean, tilt, yaw, and for each side
    s in (r, l): arm_s (upper arm), elbow_s (forearm relative), leg_s (thigh), knee_s
    (shin relative). R limbs sit at image-left (negative x): outward = negative angle.
    """
    T = t.shape[0]
    w = 2 * np.pi * p.freq * t + p.phase
    a = p.amp
    z = np.zeros(T)
    out = dict(root_dx=z.copy(), lean=z.copy(), tilt=z.copy(), yaw=z.copy(),
               arm_r=z - 0.15, arm_l=z + 0.15, elbow_r=z - 0.1, elbow_l=z + 0.1,
               leg_r=z - 0.06, leg_l=z + 0.06, knee_r=z.copy(), knee_l=z.copy())

    def add(d: dict[str, np.ndarray], weight: float):
        for k, v in d.items():
            out[k] = out[k] + weight * v

    lift_r, lift_l = np.maximum(0, np.sin(w)), np.maximum(0, -np.sin(w))  # marching in place + drift
    walk = dict(root_dx=0.12 * a * np.sin(0.5 * w), leg_r=-0.08 - 0.45 * a * lift_r, leg_l=0.08 + 0.45 * a * lift_l,
                knee_r=0.8 * a * lift_r, knee_l=-0.8 * a * lift_l,
                arm_r=-0.1 - 0.3 * a * (1 + np.sin(w)) / 2, arm_l=0.1 + 0.3 * a * (1 - np.sin(w)) / 2,
                elbow_r=-0.3 * a * (1 + np.sin(w)) / 2, elbow_l=0.3 * a * (1 - np.sin(w)) / 2,
                lean=0.04 * a * np.sin(2 * w))
    wave = dict(arm_r=-(1.9 + 0.25 * a * np.sin(0.5 * w)) + 0.15, elbow_r=-0.35 - 0.7 * a * np.sin(2 * w),
                arm_l=0.15 * a * np.sin(w), lean=0.05 * a * np.sin(w), tilt=0.1 * a * np.sin(w + 1.0))
    depth = 0.5 * (1 - np.cos(w)) * a
    squat = dict(leg_r=-0.95 * depth, leg_l=0.95 * depth, knee_r=1.2 * depth, knee_l=-1.2 * depth,
                 arm_r=-1.4 * depth, arm_l=1.4 * depth, elbow_r=-0.2 * depth, elbow_l=0.2 * depth)
    turn = dict(yaw=0.9 * a * np.sin(w), arm_r=-0.25 + 0.15 * a * np.sin(w), arm_l=0.25 + 0.15 * a * np.sin(w),
                tilt=-0.08 * a * np.sin(w), root_dx=0.03 * a * np.sin(w))
    sway = dict(lean=0.18 * a * np.sin(w + 0.5), root_dx=0.06 * a * np.sin(w),
                arm_r=-1.2 * a * (0.5 + 0.5 * np.sin(1.5 * w)), arm_l=1.2 * a * (0.5 + 0.5 * np.sin(1.5 * w + 2.0)),
                elbow_r=-0.8 * a * np.sin(2 * w), elbow_l=0.8 * a * np.sin(2 * w + 1.0))
    if family == "walk":
        add(walk, 1.0)
    elif family == "wave":
        add(wave, 1.0)
    elif family == "squat":
        add(squat, 1.0)
    elif family == "turn":
        add(turn, 1.0)
    elif family == "dance":
        m = p.mix
        add(walk, 0.5 * m[0])
        add(wave, 0.5 * m[1])
        add(squat, 0.5 * m[2])
        add(turn, 0.6 * m[3])
        add(sway, m[4])
    else:
        raise ValueError(f"motion family must be one of {FAMILIES}, got {family!r}")
    # Keep arms below ~180 degrees and knees bending the anatomical way.
    out["arm_r"] = np.clip(out["arm_r"], -2.9, 0.6)
    out["arm_l"] = np.clip(out["arm_l"], -0.6, 2.9)
    out["yaw"] = np.clip(out["yaw"], -1.0, 1.0)
    return out


def _hand_points(wrist: np.ndarray, direction: np.ndarray, size: float, side: int) -> np.ndarray:
    """21-point hand [T, 21, 2] (height units): wrist + 5 fingers x 4 joints in a fan
    around ``direction`` [T, 2] (forearm direction). side: -1 right, +1 left."""
    base = np.arctan2(direction[:, 0], direction[:, 1])  # angle from +y
    pts = [wrist]
    for f in range(5):
        ang = base + side * (f - 2) * 0.3
        d = _dir(ang)
        for j in range(1, 5):
            pts.append(wrist + d * size * (0.25 + 0.2 * j) * (0.8 if f in (0, 4) else 1.0))
    return np.stack(pts, axis=1)


def _forward_kinematics(ang: dict[str, np.ndarray], sk: Skeleton) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint positions in height units.

    Returns (body_xy [T, 20, 2], body_vis [T, 20] bool, hands_xy [T, 2, 21, 2]) with the
    hip centre at x = root_dx (relative) and the lowest foot point on y = 0.
    """
    T = ang["lean"].shape[0]
    xy = np.zeros((T, NUM_BODY, 2))
    vis = np.ones((T, NUM_BODY), bool)
    yaw = ang["yaw"]
    cw = np.cos(yaw)  # foreshortening of widths
    sw = np.sin(yaw)
    hip_c = np.stack([ang["root_dx"], np.zeros(T)], -1)
    up = -_dir(ang["lean"])  # torso up direction
    perp = np.stack([-up[:, 1], up[:, 0]], -1)  # points to image +x when upright
    neck = hip_c + sk.torso * up
    xy[:, 1] = neck
    xy[:, 8] = hip_c - (sk.hip_half * cw)[:, None] * perp
    xy[:, 11] = hip_c + (sk.hip_half * cw)[:, None] * perp
    xy[:, 2] = neck - (sk.shoulder_half * cw)[:, None] * perp
    xy[:, 5] = neck + (sk.shoulder_half * cw)[:, None] * perp
    head_up = -_dir(ang["lean"] + ang["tilt"])
    head_perp = np.stack([-head_up[:, 1], head_up[:, 0]], -1)
    nose = neck + sk.neck * head_up + (0.6 * sk.head * sw)[:, None] * head_perp
    xy[:, 0] = nose
    head_c = neck + (sk.neck + 0.35 * sk.head) * head_up
    for idx, side in ((14, -1), (15, 1)):  # eyes
        xy[:, idx] = nose + 0.45 * sk.head * head_up + (side * 0.4 * sk.head * cw + 0.3 * sk.head * sw)[:, None] * head_perp
    for idx, side in ((16, -1), (17, 1)):  # ears
        xy[:, idx] = head_c + (side * 0.95 * sk.head * cw)[:, None] * head_perp
        vis[:, idx] = side * sw < 0.45  # the far ear disappears when turned away
    hands = np.zeros((T, 2, NUM_HAND, 2))
    for s, sh, el, wr, hand_i, sign in (("r", 2, 3, 4, 1, -1), ("l", 5, 6, 7, 0, 1)):
        d1 = _dir(ang[f"arm_{s}"])
        xy[:, el] = xy[:, sh] + sk.upper_arm * d1
        d2 = _dir(ang[f"arm_{s}"] + ang[f"elbow_{s}"])
        xy[:, wr] = xy[:, el] + sk.forearm * d2
        hands[:, hand_i] = _hand_points(xy[:, wr], d2, 0.9 * sk.head, sign)
    for s, hp, kn, an, toe, sign in (("r", 8, 9, 10, 19, -1), ("l", 11, 12, 13, 18, 1)):
        d1 = _dir(ang[f"leg_{s}"])
        xy[:, kn] = xy[:, hp] + sk.thigh * d1
        xy[:, an] = xy[:, kn] + sk.shin * _dir(ang[f"leg_{s}"] + ang[f"knee_{s}"])
        xy[:, toe] = xy[:, an] + sk.foot * np.array([sign * 0.7, 0.45])
    # Ground contact: lowest foot point touches y = 0 in every frame.
    low = np.max(xy[:, [10, 13, 18, 19], 1], axis=1)
    xy[..., 1] -= low[:, None]
    hands[..., 1] -= low[:, None, None]
    return xy, vis, hands


def _fit_to_frame(xy: np.ndarray, hands: np.ndarray, p: MotionParams, margin: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Map height-unit coordinates to normalised [0, 1] frame coordinates.

    Places the hip centre at ``skeleton.center_x`` and the ground at ``skeleton.ground_y``,
    then applies ONE global scale + shift (for the whole clip, so motion stays smooth)
    that keeps every point (body, head disc and limb radius included) inside
    ``[margin, 1 - margin]``. Returns (body [T, 20, 2], hands [T, 2, 21, 2]) normalised.
    """
    sk = p.skeleton
    aspect = p.height / p.width  # height units -> normalised x
    pad = sk.neck + sk.limb_radius + 0.3 * sk.torso  # head disc / limb thickness beyond the points
    allp = np.concatenate([xy.reshape(-1, 2), hands.reshape(-1, 2)], 0)
    x = sk.center_x + allp[:, 0] * aspect
    y = sk.ground_y + allp[:, 1]
    lo = np.array([x.min() - pad * aspect, y.min() - pad]) - margin
    hi = np.array([x.max() + pad * aspect, y.max() + pad]) + margin
    ext = hi - lo
    s = float(min(1.0, 1.0 / ext.max(), *(1.0 / ext)))
    # scale about the anchor (center_x, ground_y), then shift into [0, 1]
    anchor = np.array([sk.center_x, sk.ground_y])
    lo_s, hi_s = anchor + (lo - anchor) * s, anchor + (hi - anchor) * s
    shift = np.maximum(0.0, -lo_s) - np.maximum(0.0, hi_s - 1.0)

    def conv(q: np.ndarray) -> np.ndarray:
        n = np.stack([sk.center_x + q[..., 0] * aspect, sk.ground_y + q[..., 1]], -1)
        return anchor + (n - anchor) * s + shift

    return conv(xy), conv(hands)


def motion(family: str, t: np.ndarray, params: MotionParams, margin: float = 0.02):
    """Pose sequence of ``family`` at times ``t`` (float [T], seconds).

    Smooth (sums of sinusoids of ``params.freq`` and harmonics), periodic with period
    ``2 / params.freq`` and inside the frame (see ``_fit_to_frame``; the fit is global
    over the given ``t``, so call it once with all times you need, e.g. reference + clip).
    Returns a ``wanjax.pose.keypoints.PoseSequence`` with body [T, 20, 3] and hands
    [T, 2, 21, 3] (absent: score 0, coords -1, unless ``params.hands``).
    """
    t = np.asarray(t, dtype=np.float64)
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"motion: t must be a non-empty 1-D array of seconds, got shape {t.shape}")
    ang = _angles(family, t, params)
    xy, vis, hands = _forward_kinematics(ang, params.skeleton)
    bxy, hxy = _fit_to_frame(xy, hands, params, margin)
    T = t.shape[0]
    body = np.full((T, NUM_BODY, 3), -1.0, np.float32)
    body[..., :2] = np.where(vis[..., None], bxy, -1.0)
    body[..., 2] = vis.astype(np.float32)
    hand_arr = np.full((T, 2, NUM_HAND, 3), -1.0, np.float32)
    hand_arr[..., 2] = 0.0
    if params.hands:
        hand_arr[..., :2] = hxy
        hand_arr[..., 2] = 1.0
    return _pose_sequence(body, hand_arr, params.width, params.height)


def _pose_sequence(body: np.ndarray, hands: np.ndarray, width: int, height: int):
    """Build the shared-contract ``PoseSequence`` (imported lazily)."""
    from wanjax.pose.keypoints import PoseSequence

    return PoseSequence(body=np.asarray(body, np.float32), hands=np.asarray(hands, np.float32),
                        width=int(width), height=int(height))


# ----------------------------------------------------------------------------------------
# Appearance and rendering
# ----------------------------------------------------------------------------------------


def _muted_colors(rng: np.random.Generator, n: int, v_range=(0.3, 0.85)) -> np.ndarray:
    """n desaturated colours (HSV saturation 0.08-0.40) as float [n, 3] in [0, 255]."""
    out = [colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.08, 0.40), rng.uniform(*v_range)) for _ in range(n)]
    return np.asarray(out, np.float64) * 255.0


@dataclass(frozen=True)
class Appearance:
    """Resolution-independent reference look.

    bg_grid: float [G, G, 3] (0..255) colour noise, bilinearly upsampled to the frame.
    bg_stripe: (angle rad, period in frame heights, amplitude 0..1) stripe modulation.
    limb_colors / limb_colors2: float [L, 3] per limb (FIGURE_LIMBS) base / stripe colour.
    stripe_period: stripe period along limbs, in height units.
    head_color, torso_color: float [3].
    palette: the fixed marker palette.
    All colours are desaturated (see module docstring).
    """

    bg_grid: np.ndarray
    bg_stripe: tuple[float, float, float]
    limb_colors: np.ndarray
    limb_colors2: np.ndarray
    stripe_period: float
    head_color: np.ndarray
    torso_color: np.ndarray
    thickness: float = 0.2
    palette: MarkerPalette = DEFAULT_PALETTE


def make_appearance(rng: np.random.Generator, palette: MarkerPalette = DEFAULT_PALETTE) -> Appearance:
    """Seeded textured background + limb colours/textures. Marker colours are fixed."""
    g = int(rng.integers(3, 7))
    base = _muted_colors(rng, 2, (0.35, 0.85))
    wts = rng.uniform(0, 1, size=(g, g, 1))
    grid = wts * base[0] + (1 - wts) * base[1]
    L = len(FIGURE_LIMBS)
    shirt, trousers, skin = _muted_colors(rng, 3, (0.25, 0.8))
    c1 = np.empty((L, 3))
    for i, (a, b) in enumerate(FIGURE_LIMBS):
        c1[i] = trousers if a in (8, 9, 11, 12) or b in (9, 12) else shirt
        if (a, b) in ((3, 4), (6, 7), (1, 0)):
            c1[i] = skin
    c2 = 0.6 * c1 + 0.4 * _muted_colors(rng, L, (0.2, 0.9))
    return Appearance(bg_grid=grid, bg_stripe=(float(rng.uniform(0, np.pi)), float(rng.uniform(0.08, 0.3)),
                                              float(rng.uniform(0.05, 0.25))),
                      limb_colors=c1, limb_colors2=c2, stripe_period=float(rng.uniform(0.03, 0.08)),
                      head_color=skin.copy(), torso_color=shirt.copy(),
                      thickness=float(rng.uniform(0.17, 0.24)), palette=palette)


def _background(app: Appearance, H: int, W: int) -> np.ndarray:
    """float [H, W, 3] background: bilinear colour noise times a stripe pattern."""
    G = app.bg_grid.shape[0]
    ys = (np.arange(H) + 0.5) / H * (G - 1)
    xs = (np.arange(W) + 0.5) / W * (G - 1)
    y0 = np.clip(np.floor(ys).astype(int), 0, G - 2)
    x0 = np.clip(np.floor(xs).astype(int), 0, G - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    g = app.bg_grid
    img = ((1 - fy) * (1 - fx) * g[y0][:, x0] + (1 - fy) * fx * g[y0][:, x0 + 1]
           + fy * (1 - fx) * g[y0 + 1][:, x0] + fy * fx * g[y0 + 1][:, x0 + 1])
    ang, period, amp = app.bg_stripe
    yy, xx = np.mgrid[0:H, 0:W] / H
    s = np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
    return img * (1 - amp * (0.5 + 0.5 * s))[..., None]


def _draw_capsule(img: np.ndarray, p0: np.ndarray, p1: np.ndarray, r: float, c0: np.ndarray, c1: np.ndarray,
                  period: float) -> None:
    """In place: capsule of radius r (px) from p0 to p1 (px, (x, y)); colour alternates
    between c0 and c1 in stripes of ``period`` px along the axis, shaded toward the rim."""
    H, W, _ = img.shape
    lo = np.floor(np.minimum(p0, p1) - r - 1).astype(int)
    hi = np.ceil(np.maximum(p0, p1) + r + 1).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], W), min(hi[1], H)
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    d = p1 - p0
    ll = float(d @ d)
    tt = np.zeros_like(xx) if ll < 1e-12 else np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / ll, 0, 1)
    dist = np.hypot(xx - (p0[0] + tt * d[0]), yy - (p0[1] + tt * d[1]))
    m = dist <= r
    stripe = (np.floor(tt * np.sqrt(ll) / max(period, 1e-6)) % 2)[..., None]
    col = (1 - stripe) * c0 + stripe * c1
    shade = (1.0 - 0.35 * (dist / max(r, 1e-6)) ** 2)[..., None]
    region = img[y0:y1, x0:x1]
    region[m] = (col * shade)[m]


def _draw_disc(img: np.ndarray, c: np.ndarray, r: float, color: np.ndarray) -> None:
    """In place: solid disc of radius r (px) at c (px, (x, y))."""
    _draw_capsule(img, c, c, r, np.asarray(color, np.float64), np.asarray(color, np.float64), 1.0)


def render_figure(appearance: Appearance, body: np.ndarray, height: int, width: int, supersample: int = 2,
                  marker_scale: float = 1.0, background: np.ndarray | None = None) -> np.ndarray:
    """Draw the figure of ``appearance`` in pose ``body`` (float [20, 3], normalised x, y,
    score) over its background. Returns uint8 [height, width, 3]. Deterministic.

    Drawing order: background, limbs (capsules, back to front in FIGURE_LIMBS order),
    head disc, then the key-colour marker discs of ``appearance.palette`` (on top, so they
    stay visible). Limbs/markers whose joints have score 0 are skipped.
    ``supersample`` > 1 renders at that factor and box-filters down (anti-aliasing).
    ``background`` (optional float [H*s, W*s, 3]) is a precomputed ``_background`` to reuse.
    """
    body = np.asarray(body, np.float64)
    if body.shape != (NUM_BODY, 3):
        raise ValueError(f"render_figure: body must be [{NUM_BODY}, 3], got {body.shape}")
    s = int(supersample)
    H, W = height * s, width * s
    img = _background(appearance, H, W) if background is None else np.array(background, np.float64)
    px = body[:, :2] * np.array([W, H])
    ok = body[:, 2] > 0
    sk_r = max(1.0, appearance.thickness * _torso_px(px, ok, H))
    for i, (a, b) in enumerate(FIGURE_LIMBS):
        if ok[a] and ok[b]:
            rr = sk_r * (1.25 if (a, b) in ((1, 8), (1, 11), (8, 11)) else 1.0)
            _draw_capsule(img, px[a], px[b], rr, appearance.limb_colors[i], appearance.limb_colors2[i],
                          appearance.stripe_period * H)
    # Torso fill: capsule from neck to hip centre, wide.
    if ok[1] and ok[8] and ok[11]:
        hip_c = 0.5 * (px[8] + px[11])
        half = 0.5 * np.hypot(*(px[8] - px[11]))
        _draw_capsule(img, px[1], hip_c, max(sk_r, half), appearance.torso_color, appearance.torso_color, 1.0)
    if ok[0] and ok[1]:
        _draw_disc(img, px[0] + 0.3 * (px[0] - px[1]), 0.6 * np.hypot(*(px[0] - px[1])), appearance.head_color)
    pal = appearance.palette
    mr = pal.radius_px(height) * s * marker_scale
    for j, col in zip(pal.joints, np.asarray(pal.colors, np.float64)):
        if ok[j] and mr > 0:
            _draw_disc(img, px[j], mr, col)
    if s > 1:
        img = img.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _torso_px(px: np.ndarray, ok: np.ndarray, H: int) -> float:
    """Torso length (neck to hip centre) in px of a [20, 2] pixel pose. It is invariant
    to lean, turn and squat, so limb thickness stays constant over a clip; falls back
    to 0.2 H when the joints are missing."""
    if ok[1] and ok[8] and ok[11]:
        return float(np.hypot(*(px[1] - 0.5 * (px[8] + px[11]))))
    return 0.2 * H


def render_video(appearance: Appearance, body: np.ndarray, height: int, width: int, supersample: int = 2
                 ) -> np.ndarray:
    """``render_figure`` for every frame of body [T, 20, 3]; returns uint8 [T, H, W, 3]."""
    bg = _background(appearance, height * supersample, width * supersample)
    return np.stack([render_figure(appearance, b, height, width, supersample, background=bg) for b in np.asarray(body)])


def marker_visibility(body: np.ndarray, height: int, width: int, palette: MarkerPalette = DEFAULT_PALETTE
                      ) -> np.ndarray:
    """Which markers are measurable in frames rendered by ``render_figure``.

    body: [T, 20, 3] normalised keypoints.  Returns bool [T, K] (K = len(palette.joints)):
    joint visible (score > 0) and not hidden by a marker drawn after it (markers are
    drawn in palette order; "hidden" = a later marker centre closer than 1.2 marker
    radii, i.e. more than ~28 % of the disc covered, which would bias its centroid).
    """
    body = np.asarray(body, np.float64)
    m = body[:, list(palette.joints)]
    px = m[..., :2] * np.array([width, height])
    d = np.linalg.norm(px[:, :, None] - px[:, None], axis=-1)  # [T, K, K]
    K = m.shape[1]
    later = np.triu(np.ones((K, K), bool), 1)  # later[k, j]: j drawn after k
    vis_j = (m[..., 2] > 0)[:, None, :]
    covered = (later[None] & vis_j & (d < 1.2 * palette.radius_px(height))).any(-1)
    return (m[..., 2] > 0) & ~covered


# ----------------------------------------------------------------------------------------
# Video I/O
# ----------------------------------------------------------------------------------------


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, lossless: bool = True) -> None:
    """Write uint8 [T, H, W, 3] frames to an .mp4.

    lossless=True uses libx264rgb with crf 0 (bit-exact RGB round trip, needed so the
    key-colour markers of ground-truth videos survive); False uses yuv420p H.264 (what a
    typical generator writes; needs even H and W).
    """
    import imageio.v2 as iio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video({path}): frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if lossless:
        kw = dict(codec="libx264rgb", pixelformat="rgb24", output_params=["-crf", "0", "-preset", "ultrafast"])
    else:
        kw = dict(codec="libx264", pixelformat="yuv420p", quality=8)
    w = iio.get_writer(str(path), fps=fps, macro_block_size=1, ffmpeg_log_level="error", format="FFMPEG", **kw)
    try:
        for f in frames:
            w.append_data(f)
    finally:
        w.close()


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read a video as uint8 [T, H, W, 3]. ``path`` is an .mp4 (any ffmpeg-readable file)
    or a directory of frame images (sorted by name, e.g. 00000.png ...)."""
    import imageio.v2 as iio

    path = Path(path)
    if path.is_dir():
        files = sorted(q for q in path.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"read_video: directory {path} has no .png/.jpg frames")
        frames = [np.asarray(iio.imread(q)) for q in files]
    else:
        if not path.exists():
            raise FileNotFoundError(f"read_video: {path} does not exist")
        r = iio.get_reader(str(path), format="FFMPEG")
        try:
            frames = [np.asarray(f) for f in r]
        finally:
            r.close()
    frames = [f[..., :3] if f.ndim == 3 else np.repeat(f[..., None], 3, -1) for f in frames]
    return np.stack(frames).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Samples and datasets
# ----------------------------------------------------------------------------------------


def sample_seed(seed: int, split: str, index: int) -> int:
    """Deterministic per-sample seed from (dataset seed, split name, sample index)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), int(index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def make_sample(seed: int, cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, Any]:
    """One synthetic sample, a pure function of (seed, cfg).

    Returns dict:
      ref_image   uint8 [H, W, 3]: the same figure at a different phase of the motion.
      ref_pose    PoseSequence (1 frame): its keypoints.
      pose        PoseSequence (T frames): driving keypoints (= exact GT of ``video``).
      video       uint8 [T, H, W, 3]: ground-truth video.
      pose_frames uint8 [T, H, W, 3]: ``wanjax.pose.render.render_sequence(pose, H, W)``.
      meta        JSON-serialisable dict (seed, family, sizes, skeleton, motion, palette).
    """
    from wanjax.pose.render import render_sequence

    rng_sk, rng_app, rng_mo, rng_fam = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4))
    family = cfg.family if cfg.family != "random" else FAMILIES[int(rng_fam.integers(0, len(FAMILIES)))]
    skeleton = sample_skeleton(rng_sk)
    app = make_appearance(rng_app, cfg.palette)
    params = sample_motion_params(rng_mo, skeleton, cfg)
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    period = 2.0 / params.freq
    t_ref = -float(rng_fam.uniform(0.2, 0.8)) * period
    times = np.concatenate([[t_ref], np.arange(T) / cfg.fps])
    seq = motion(family, times, params)
    ref_pose = _pose_sequence(seq.body[:1], seq.hands[:1], W, H)
    pose = _pose_sequence(seq.body[1:], seq.hands[1:], W, H)
    video = render_video(app, pose.body, H, W, cfg.supersample)
    ref_image = render_figure(app, ref_pose.body[0], H, W, cfg.supersample)
    pose_frames = np.asarray(render_sequence(pose, H, W), np.uint8)
    meta = dict(seed=int(seed), family=family, height=H, width=W, num_frames=T, fps=cfg.fps,
                ref_time=t_ref, prompt=cfg.prompt, skeleton=dataclasses.asdict(skeleton),
                motion=dict(freq=params.freq, phase=params.phase, amp=params.amp, mix=list(params.mix)),
                palette=cfg.palette.to_json())
    return dict(ref_image=ref_image, ref_pose=ref_pose, pose=pose, video=video, pose_frames=pose_frames, meta=meta)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_sample(sample: dict[str, Any], sample_dir: Path, fps: float) -> None:
    """Write one sample (as returned by ``make_sample``) into the directory ``sample_dir``
    (must not exist): ref.png, ref_pose.json, pose.json, pose/00000.png..., gt.mp4
    (lossless), meta.json."""
    import imageio.v2 as iio

    from wanjax.pose.keypoints import save_keypoints

    sample_dir.mkdir(parents=True)
    iio.imwrite(sample_dir / "ref.png", sample["ref_image"])
    save_keypoints(sample_dir / "ref_pose.json", sample["ref_pose"])
    save_keypoints(sample_dir / "pose.json", sample["pose"])
    (sample_dir / "pose").mkdir()
    for i, f in enumerate(sample["pose_frames"]):
        iio.imwrite(sample_dir / "pose" / f"{i:05d}.png", f)
    write_video(sample_dir / "gt.mp4", sample["video"], fps=fps, lossless=True)
    (sample_dir / "meta.json").write_text(json.dumps(sample["meta"], indent=1))


def manifest_row(sample_id: str, prompt: str) -> dict[str, str]:
    """Manifest row for ``sample_id``; paths are relative to the manifest's directory."""
    return {"id": sample_id, "ref_image": f"{sample_id}/ref.png", "ref_pose": f"{sample_id}/ref_pose.json",
            "pose": f"{sample_id}/pose", "pose_keypoints": f"{sample_id}/pose.json", "gt": f"{sample_id}/gt.mp4",
            "prompt": prompt}


def make_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig(),
                 split: str = "train", progress: bool = False) -> Path:
    """Write ``n`` samples to ``out_dir/<split>/<id>/`` plus ``out_dir/<split>/manifest.jsonl``.

    Sample ``i`` has id ``f"{i:06d}"`` and seed ``sample_seed(seed, split, i)``. Each sample
    is written to a hidden temporary directory and renamed into place, so a sample
    directory exists only when complete; re-running skips finished ids (resumable) and
    removes stale temporaries. The manifest (one JSON row per sample: id, ref_image,
    ref_pose, pose, pose_keypoints, gt, prompt; paths relative to the split directory)
    is rewritten atomically at the end. Returns the manifest path.
    """
    if n < 0:
        raise ValueError(f"make_dataset: n must be >= 0, got {n}")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"make_dataset: split must be a plain name like 'train', got {split!r}")
    root = Path(out_dir) / split
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    ids = [f"{i:06d}" for i in range(n)]
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"synthetic/{split}", file=None)
    for i in it:
        final = root / ids[i]
        if final.is_dir():
            continue
        tmp = root / f".{ids[i]}.tmp-{os.getpid()}"
        sample = make_sample(sample_seed(seed, split, i), cfg)
        write_sample(sample, tmp, cfg.fps)
        os.rename(tmp, final)
    rows = "".join(json.dumps(manifest_row(s, cfg.prompt)) + "\n" for s in ids)
    manifest = root / "manifest.jsonl"
    _atomic_write_text(manifest, rows)
    return manifest
