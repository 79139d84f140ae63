"""Pose drawings as the UniAnimate-DiT network sees them (unianimate_dit.md section 11.3), numpy only.

Drawing order on a black ``H x W x 3`` canvas:
  1. 19 limbs as filled ellipses (polygon of 361 points at 1-degree steps, like ``cv2.ellipse2Poly``,
     centre/axes/angle truncated with ``int()``; half-axes ``length/2`` and ``stickwidth``), each
     filled with our own scanline fill (``fillConvexPoly``-like: span ends rounded to the nearest pixel);
  2. the canvas multiplied by 0.6 (float64, then truncated to uint8 like ``(canvas*0.6).astype(uint8)``);
  3. the 20 body joints as filled radius-4 circles (midpoint circle spans, like ``cv2.circle`` LINE_8);
  4. hands: 20 edges per hand (thickness 2: a 2-px band plus 1-px round caps) coloured HSV(e/20, 1, 1),
     then the 21 joints as radius-4 circles; a hand point/edge is drawn only if its pixel coordinates,
     after ``int()``, are > 0.01 (``eps`` is compared with pixels) and its score >= 0.3.
Body points are drawn when score > 0.3 (UA: ``subset`` index only for scores > 0.3).

Colours: UA writes the listed (BGR-interpreted) triples with OpenCV, JPEG-encodes and reads the JPEG
back with PIL as RGB, so the network sees each listed triple reversed. We draw the listed triples
and reverse the channels at the end ("Network RGB" column of the spec table).

Deviations (documented): no JPEG round trip (UA's drawings carry JPEG quality-95 artefacts); the
polygon fill, circles and thick lines follow OpenCV's algorithms closely but are not bit-checked
against OpenCV (not installed), so edge pixels may differ by one.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

from wanjax.pose.keypoints import NUM_BODY, NUM_HAND, SCORE_THRESHOLD, PoseSequence

EPS = 0.01
# 1-based (UA) limb endpoints, in drawing order; limb i uses LIMB_COLORS[i].
LIMBS_1BASED = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
                (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (14, 19), (11, 20))
LIMBS = tuple((a - 1, b - 1) for a, b in LIMBS_1BASED)
# Listed array colours (OpenCV / BGR interpretation); joint k uses COLORS[k].
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (170, 255, 255), (255, 255, 0))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
HAND_JOINT_COLOR = (0, 0, 255)  # listed; the network sees pure red
LIMB_DIM = 0.6


def hand_edge_color(e: int) -> tuple[int, int, int]:
    """Listed colour of hand edge ``e``: round(HSV(e/20, 1, 1) * 255) (OpenCV rounds float colours)."""
    r, g, b = colorsys.hsv_to_rgb(e / float(len(HAND_EDGES)), 1.0, 1.0)
    return tuple(int(np.rint(c * 255)) for c in (r, g, b))


def network_rgb(listed: tuple[int, int, int]) -> tuple[int, int, int]:
    """The RGB triple the network sees for a listed (BGR-written) colour."""
    return tuple(reversed(listed))


# ---- rasterisation primitives (all on a listed-colour canvas) ------------------------------------
def ellipse_polygon(center: tuple[int, int], axes: tuple[int, int], angle: int) -> np.ndarray:
    """Integer polygon ``[N, 2]`` (x, y) approximating a rotated ellipse, like ``cv2.ellipse2Poly``
    with arc 0..360 and 1-degree steps: points rounded half-to-even, consecutive duplicates removed."""
    a = math.radians(angle % 360)
    ca, sa = math.cos(a), math.sin(a)
    t = np.radians(np.arange(0, 361, dtype=np.float64))
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    px = np.rint(center[0] + x * ca - y * sa).astype(np.int64)
    py = np.rint(center[1] + x * sa + y * ca).astype(np.int64)
    pts = np.stack([px, py], axis=1)
    keep = np.ones(len(pts), bool)
    keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
    pts = pts[keep]
    if len(pts) == 1:
        pts = np.repeat(pts, 2, axis=0)
    return pts


def fill_convex_polygon(canvas: np.ndarray, pts: np.ndarray, color) -> None:
    """Scanline fill of a convex polygon with (sub)pixel vertices ``pts [N, 2]`` (x, y), in place.

    For every integer row between the lowest and highest vertex, the span between the leftmost and
    rightmost edge crossings is filled, with both ends rounded to the nearest pixel (boundary pixels
    included, like OpenCV's ``fillConvexPoly``). Clipped to the canvas.
    """
    h, w = canvas.shape[:2]
    pts = np.asarray(pts, np.float64)
    y0 = max(int(math.ceil(pts[:, 1].min())), 0)
    y1 = min(int(math.floor(pts[:, 1].max())), h - 1)
    if y1 < y0:
        return
    rows = np.arange(y0, y1 + 1, dtype=np.float64)[:, None]          # [R, 1]
    p, q = pts, np.roll(pts, -1, axis=0)                               # edges p -> q, [E, 2]
    lo, hi = np.minimum(p[:, 1], q[:, 1])[None], np.maximum(p[:, 1], q[:, 1])[None]
    crosses = (rows >= lo) & (rows <= hi)                              # [R, E]
    dy = (q[:, 1] - p[:, 1])[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = p[:, 0][None] + (rows - p[:, 1][None]) * (q[:, 0] - p[:, 0])[None] / dy
    flat = dy == 0  # horizontal edges: both ends lie on the row
    x_min = np.where(crosses, np.where(flat, np.minimum(p[:, 0], q[:, 0])[None], xs), np.inf).min(axis=1)
    x_max = np.where(crosses, np.where(flat, np.maximum(p[:, 0], q[:, 0])[None], xs), -np.inf).max(axis=1)
    xl = np.floor(x_min + 0.5).astype(np.int64)
    xr = np.floor(x_max + 0.5).astype(np.int64)
    for r, a, b in zip(range(y0, y1 + 1), xl, xr):
        a, b = max(a, 0), min(b, w - 1)
        if a <= b:
            canvas[r, a:b + 1] = color


def fill_circle(canvas: np.ndarray, cx: int, cy: int, radius: int, color) -> None:
    """Filled circle by horizontal spans of the integer midpoint algorithm (``cv2.circle`` LINE_8,
    thickness -1); clipped to the canvas. Radius 4 gives row half-widths 4, 3, 3, 2, 0."""
    h, w = canvas.shape[:2]

    def span(y: int, x0: int, x1: int):
        if 0 <= y < h:
            a, b = max(x0, 0), min(x1, w - 1)
            if a <= b:
                canvas[y, a:b + 1] = color

    dx, dy, err, plus, minus = radius, 0, 0, 1, 2 * radius - 1
    while dx >= dy:
        span(cy - dy, cx - dx, cx + dx)
        span(cy + dy, cx - dx, cx + dx)
        span(cy - dx, cx - dy, cx + dy)
        span(cy + dx, cx - dy, cx + dy)
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2


def thick_line(canvas: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], color, thickness: int = 2) -> None:
    """A line of ``thickness`` px: the band of half-width thickness/2 around the segment (filled as a
    convex quad) plus round caps of radius round(thickness/2) at both ends (like OpenCV ``ThickLine``)."""
    (x0, y0), (x1, y1) = p0, p1
    half = thickness / 2.0
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy)
    if n > 0:
        ox, oy = -dy / n * half, dx / n * half
        quad = np.array([[x0 + ox, y0 + oy], [x0 - ox, y0 - oy], [x1 - ox, y1 - oy], [x1 + ox, y1 + oy]])
        fill_convex_polygon(canvas, quad, color)
    r = int(math.floor(half + 0.5))
    fill_circle(canvas, x0, y0, r, color)
    fill_circle(canvas, x1, y1, r, color)


# ---- UA drawing ---------------------------------------------------------------------------------
def _check(body: np.ndarray, hands: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    body = np.asarray(body, np.float64)
    if body.shape != (NUM_BODY, 3):
        raise ValueError(f"draw_pose: body must be [{NUM_BODY}, 3] (x, y, score), got {body.shape}")
    if hands is not None:
        hands = np.asarray(hands, np.float64)
        if hands.shape != (2, NUM_HAND, 3):
            raise ValueError(f"draw_pose: hands must be [2, {NUM_HAND}, 3] (x, y, score), got {hands.shape}")
    return body, hands


def draw_pose(body: np.ndarray, hands: np.ndarray | None, height: int, width: int, *,
              stickwidth: int = 4) -> np.ndarray:
    """Draw one frame: ``body [20, 3]``, ``hands [2, 21, 3]`` or None (normalised x, y, score) ->
    uint8 ``[height, width, 3]`` RGB as the network sees it (see module docstring)."""
    body, hands = _check(body, hands)
    if height <= 0 or width <= 0:
        raise ValueError(f"draw_pose: height and width must be positive, got {height} x {width}")
    canvas = np.zeros((height, width, 3), np.uint8)
    visible = body[:, 2] > SCORE_THRESHOLD
    for (a, b), color in zip(LIMBS, COLORS):
        if not (visible[a] and visible[b]):
            continue
        xs = body[[a, b], 0] * float(width)
        ys = body[[a, b], 1] * float(height)
        mx, my = float(np.mean(xs)), float(np.mean(ys))
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = ellipse_polygon((int(mx), int(my)), (int(length / 2), stickwidth), int(angle))
        fill_convex_polygon(canvas, poly, color)
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for k in range(NUM_BODY):
        if visible[k]:
            fill_circle(canvas, int(body[k, 0] * width), int(body[k, 1] * height), 4, COLORS[k])
    if hands is not None:
        for hand in hands:
            px = [int(x * width) for x in hand[:, 0]]
            py = [int(y * height) for y in hand[:, 1]]
            ok = [hand[i, 2] >= SCORE_THRESHOLD and px[i] > EPS and py[i] > EPS for i in range(NUM_HAND)]
            for e, (i, j) in enumerate(HAND_EDGES):
                if ok[i] and ok[j]:
                    thick_line(canvas, (px[i], py[i]), (px[j], py[j]), hand_edge_color(e), 2)
            for i in range(NUM_HAND):
                if ok[i]:
                    fill_circle(canvas, px[i], py[i], 4, HAND_JOINT_COLOR)
    return np.ascontiguousarray(canvas[..., ::-1])


def render_sequence(seq: PoseSequence, height: int, width: int, *, stickwidth: int = 4) -> np.ndarray:
    """All frames of ``seq`` drawn on ``height x width`` canvases -> uint8 ``[T, H, W, 3]`` RGB."""
    return np.stack([draw_pose(seq.body[t], seq.hands[t], height, width, stickwidth=stickwidth)
                     for t in range(len(seq))])
