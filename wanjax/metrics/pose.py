"""Pose-following metrics: colour-key keypoint estimation, keypoint error, PCK, DWPose.

Synthetic videos (``wanjax.data.synthetic``) carry a disc marker of a fixed saturated key
colour on each of K joints, so keypoints of a generated video can be read back exactly
without a learned pose estimator (``estimate_pose_colorkey``). Real videos need DWPose
(``DWPoseEstimator``, onnxruntime).

Keypoint arrays are float32 ``[T, K, 3]`` = (x, y, confidence) with x, y normalised to
[0, 1] of the frame width / height; an absent point is (-1, -1, 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def _palette_arrays(palette: Any) -> tuple[np.ndarray, int | None, float | None]:
    """(colors uint8 [K, 3], tolerance or None, radius_frac or None) from a
    ``MarkerPalette`` or a plain [K, 3] colour array."""
    if hasattr(palette, "colors"):
        return np.asarray(palette.colors, np.int16), int(palette.tolerance), float(palette.radius_frac)
    c = np.asarray(palette)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"estimate_pose_colorkey: palette must be a MarkerPalette or [K, 3] colours, got {c.shape}")
    return c.astype(np.int16), None, None


def estimate_pose_colorkey(frames: np.ndarray, palette: Any = None, tolerance: int | None = None,
                           min_pixels: int = 2, radius_frac: float | None = None) -> np.ndarray:
    """Locate the key-colour markers in every frame.

    frames: uint8 [T, H, W, 3] RGB.  palette: ``MarkerPalette`` (default
    ``wanjax.data.synthetic.DEFAULT_PALETTE``) or colours uint8 [K, 3].
    A pixel belongs to marker k when colour k is its nearest palette colour and the
    L-inf RGB distance is <= ``tolerance`` (default: the palette's, else 56).
    For each marker the position is a robust centroid of its pixel centres (all pixels,
    then only those within 3 marker radii of the per-axis median, which discards stray
    pixels elsewhere), normalised as ((col + 0.5) / W, (row + 0.5) / H) to match the
    keypoint convention. Confidence = clip(count / (0.5 * pi * r^2), 0, 1) with r the
    marker radius in px (``radius_frac * H``, at least 1.5 px); fewer than
    ``min_pixels`` pixels gives (-1, -1, 0).
    Returns float32 [T, K, 3].
    """
    if palette is None:
        from wanjax.data.synthetic import DEFAULT_PALETTE

        palette = DEFAULT_PALETTE
    colors, pal_tol, pal_rf = _palette_arrays(palette)
    tol = tolerance if tolerance is not None else (pal_tol if pal_tol is not None else 56)
    rf = radius_frac if radius_frac is not None else (pal_rf if pal_rf is not None else 0.03)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"estimate_pose_colorkey: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    T, H, W, _ = frames.shape
    K = colors.shape[0]
    r_px = max(1.5, rf * H)
    full = 0.5 * np.pi * r_px ** 2
    out = np.full((T, K, 3), -1.0, np.float32)
    out[..., 2] = 0.0
    rows, cols = np.mgrid[0:H, 0:W]
    for t in range(T):
        f = frames[t].astype(np.int16)
        d = np.abs(f[:, :, None, :] - colors[None, None]).max(-1)  # [H, W, K]
        nearest = d.argmin(-1)
        ok = d.min(-1) <= tol
        for k in range(K):
            m = ok & (nearest == k)
            n = int(m.sum())
            if n < min_pixels:
                continue
            ys, xs = rows[m] + 0.5, cols[m] + 0.5
            my, mx = np.median(ys), np.median(xs)
            near = np.hypot(ys - my, xs - mx) <= 3 * r_px
            if near.sum() >= min_pixels:
                ys, xs = ys[near], xs[near]
            out[t, k] = (xs.mean() / W, ys.mean() / H, min(1.0, len(xs) / full))
    return out


def marker_keypoints(body: np.ndarray, palette: Any = None) -> np.ndarray:
    """Select the marker joints of the palette from body keypoints [T, 20, 3] -> [T, K, 3]."""
    if palette is None:
        from wanjax.data.synthetic import DEFAULT_PALETTE

        palette = DEFAULT_PALETTE
    body = np.asarray(body, np.float32)
    if body.ndim != 3 or body.shape[-1] != 3:
        raise ValueError(f"marker_keypoints: body must be [T, 20, 3], got {body.shape}")
    return body[:, list(palette.joints)]


def _check_pair(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray | None, name: str):
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"{name}: pred and gt must both be [T, K, 3], got {pred.shape} and {gt.shape}")
    vis = gt[..., 2] > 0 if visible is None else np.asarray(visible, bool)
    if vis.shape != gt.shape[:2]:
        raise ValueError(f"{name}: visible must be [T, K] = {gt.shape[:2]}, got {vis.shape}")
    return pred, gt, vis


def _scale(width: int | None, height: int | None) -> np.ndarray:
    if (width is None) != (height is None):
        raise ValueError("give both width and height (pixels) or neither (normalised units)")
    return np.array([1.0, 1.0]) if width is None else np.array([float(width), float(height)])


def keypoint_error(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray | None = None,
                   width: int | None = None, height: int | None = None) -> dict[str, float]:
    """Mean L2 keypoint error over points visible in GT AND detected in pred (conf > 0).

    pred, gt: [T, K, 3] normalised (x, y, conf).  visible: bool [T, K] (default gt conf > 0).
    Returns {"l2": mean L2 in normalised units (x/W, y/H; anisotropic when W != H),
    "l2_px": mean L2 in pixels (nan unless width/height given), "detected": fraction of
    visible GT points that were detected, "n": number of points averaged}. Missing
    detections are not in the mean; they count as failures in ``pck``.
    """
    pred, gt, vis = _check_pair(pred, gt, visible, "keypoint_error")
    valid = vis & (pred[..., 2] > 0)
    d = pred[..., :2] - gt[..., :2]
    n = int(valid.sum())
    out = {"l2": float(np.linalg.norm(d, axis=-1)[valid].mean()) if n else float("nan"),
           "l2_px": float("nan"), "detected": float(valid.sum() / vis.sum()) if vis.sum() else float("nan"),
           "n": n}
    if width is not None and n:
        out["l2_px"] = float(np.linalg.norm(d * _scale(width, height), axis=-1)[valid].mean())
    return out


def pck(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray | None = None, alpha: float = 0.1,
        ref: str = "bbox", width: int | None = None, height: int | None = None) -> float:
    """Percentage of Correct Keypoints (fraction in [0, 1]).

    A visible GT point counts as correct when pred is detected (conf > 0) and
    ||pred - gt|| <= alpha * L, distances measured in pixels when width/height are given
    (isotropic), else in normalised units. The normaliser L is
      ref="bbox":  per frame, max(width, height) of the tight bounding box of that frame's
                   visible GT keypoints (the usual "PCK@alpha of the person box"
                   convention; for the 14 synthetic marker joints this box spans
                   nose/wrists to ankles);
      ref="image": max(W, H) of the image (1 in normalised units).
    Undetected visible points are failures. Returns nan if no point is visible.
    """
    pred, gt, vis = _check_pair(pred, gt, visible, "pck")
    s = _scale(width, height)
    dist = np.linalg.norm((pred[..., :2] - gt[..., :2]) * s, axis=-1)  # [T, K]
    if ref == "bbox":
        g = gt[..., :2] * s
        lo = np.where(vis[..., None], g, np.inf).min(1)
        hi = np.where(vis[..., None], g, -np.inf).max(1)
        size = np.where(vis.any(1), (hi - lo).max(-1), 0.0)  # [T]
        thr = alpha * size[:, None]
    elif ref == "image":
        thr = np.full(dist.shape, alpha * s.max())
    else:
        raise ValueError(f"pck: ref must be 'bbox' or 'image', got {ref!r}")
    correct = vis & (pred[..., 2] > 0) & (dist <= thr)
    return float(correct.sum() / vis.sum()) if vis.sum() else float("nan")


# ----------------------------------------------------------------------------------------
# DWPose (real videos)
# ----------------------------------------------------------------------------------------

_DWPOSE_HELP = ("Both files ship with the UniAnimate-DiT checkpoint download (ModelScope "
                "xiaolaowx/UniAnimate-DiT or Hugging Face ZheWang123/UniAnimate-DiT, folder checkpoints/); "
                "they are the standard DWPose release files.")


class DWPoseEstimator:
    """DWPose whole-body estimator (YOLOX-L detector + DWPose-L SimCC) via onnxruntime.

    det_path: ``yolox_l.onnx``; pose_path: ``dw-ll_ucoco_384.onnx``.
    Construction checks that both files exist (FileNotFoundError naming the missing ones)
    and that ``onnxruntime`` is importable (ImportError with the install command).

    ``__call__(frame uint8 [H, W, 3] RGB) -> (body [20, 3], hands [2, 21, 3])`` follows
    unianimate_dit.md section 11.2 (letterbox 640, YOLOX decode + NMS 0.45, person 0,
    box padding 1.25 -> 288x384 affine crop, BGR mean/std, SimCC split 2.0, neck insert,
    OpenPose-18 permutation, toes = mean of the two toes, score < 0.3 -> (-1, -1, 0)).
    The pre/post-processing is implemented in numpy (no OpenCV); interpolation therefore
    differs slightly from cv2 and it has not been validated against the reference, since
    onnxruntime and the weights are unavailable in this environment.
    """

    def __init__(self, det_path: str | os.PathLike, pose_path: str | os.PathLike, providers: list[str] | None = None):
        missing = [str(p) for p in (det_path, pose_path) if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"DWPoseEstimator: missing model file(s): {', '.join(missing)}. {_DWPOSE_HELP}")
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("DWPoseEstimator needs the 'onnxruntime' package, which is not installed. Install it "
                              "with `pip install onnxruntime` (or `onnxruntime-gpu==1.18.1` as UniAnimate-DiT "
                              "suggests).") from e
        prov = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        prov = [p for p in prov if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        self.det = ort.InferenceSession(str(det_path), providers=prov)
        self.pose = ort.InferenceSession(str(pose_path), providers=prov)
        shp = self.pose.get_inputs()[0].shape  # [1, 3, h, w]
        self.pose_hw = (int(shp[2]), int(shp[3]))

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"DWPoseEstimator: frame must be [H, W, 3] RGB, got {frame.shape}")
        bgr = frame[..., ::-1].astype(np.float32)
        H, W = bgr.shape[:2]
        box = self._detect(bgr)
        kpts, scores = self._pose(bgr, box)
        return openpose_from_wholebody(kpts, scores, W, H)

    def _detect(self, bgr: np.ndarray) -> np.ndarray:
        H, W = bgr.shape[:2]
        r = min(640 / H, 640 / W)
        nh, nw = int(H * r), int(W * r)
        img = np.full((640, 640, 3), 114.0, np.float32)
        img[:nh, :nw] = _resize_bilinear(bgr, nh, nw)
        inp = img.transpose(2, 0, 1)[None]
        out = self.det.run(None, {self.det.get_inputs()[0].name: inp})[0][0]
        boxes, scores = yolox_decode(out, (640, 640))
        boxes /= r
        keep = nms(boxes, scores, 0.45, 0.1)
        keep = [i for i in keep if scores[i] > 0.3]
        return boxes[keep[0]] if keep else np.array([0, 0, W, H], np.float32)

    def _pose(self, bgr: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.pose_hw
        center, scale = box_to_center_scale(box, w / h, padding=1.25)
        crop = _crop_affine(bgr, center, scale, h, w)
        crop = (crop - np.array([123.675, 116.28, 103.53], np.float32)) / np.array([58.395, 57.12, 57.375], np.float32)
        sx, sy = self.pose.run(None, {self.pose.get_inputs()[0].name: crop.transpose(2, 0, 1)[None].astype(np.float32)})
        locs, vals = simcc_decode(sx[0], sy[0], 2.0)
        kpts = locs / np.array([w, h]) * scale + center - scale / 2
        return kpts, vals


def _resize_bilinear(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (cv2.INTER_LINEAR convention). [H, W, C]."""
    H, W = img.shape[:2]
    ys = np.clip((np.arange(oh) + 0.5) * H / oh - 0.5, 0, H - 1)
    xs = np.clip((np.arange(ow) + 0.5) * W / ow - 0.5, 0, W - 1)
    return _sample(img, ys[:, None] + 0 * xs[None], xs[None] + 0 * ys[:, None], 0.0)


def _sample(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, fill: float) -> np.ndarray:
    """Bilinear sample img [H, W, C] at float pixel coords ys, xs [h, w]; outside -> fill."""
    H, W = img.shape[:2]
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    out = 0.0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = ((yy >= 0) & (yy < H) & (xx >= 0) & (xx < W))[..., None]
            v = img[np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)]
            out = out + wy * wx * np.where(inside, v, fill)
    return np.asarray(out, np.float32)


def _crop_affine(img: np.ndarray, center: np.ndarray, scale: np.ndarray, h: int, w: int) -> np.ndarray:
    """Top-down crop without rotation: output pixel (u, v) samples
    center - scale / 2 + (u, v) * scale / (w, h); border 0 (cv2.warpAffine default)."""
    xs = center[0] - scale[0] / 2 + np.arange(w) * scale[0] / w
    ys = center[1] - scale[1] / 2 + np.arange(h) * scale[1] / h
    return _sample(img, np.repeat(ys[:, None], w, 1), np.repeat(xs[None], h, 0), 0.0)


def box_to_center_scale(box: np.ndarray, aspect: float, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """xyxy box -> (center [2], scale [2]) padded by ``padding`` and widened/heightened to
    ``aspect`` = w / h (mmpose ``bbox_xyxy2cs`` + ``_fix_aspect_ratio``)."""
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    center = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    w, h = (x2 - x1) * padding, (y2 - y1) * padding
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return center, np.array([w, h])


def yolox_decode(out: np.ndarray, size: tuple[int, int], strides=(8, 16, 32)) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX raw output [N, 5 + C] (grid order over strides 8, 16, 32) -> person boxes
    xyxy [N, 4] and scores [N] (objectness * class-0 probability)."""
    grids, exp = [], []
    for s in strides:
        hs, ws = size[0] // s, size[1] // s
        yv, xv = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        exp.append(np.full((hs * ws, 1), s))
    grid, st = np.concatenate(grids), np.concatenate(exp)
    if out.shape[0] != grid.shape[0]:
        raise ValueError(f"yolox_decode: expected {grid.shape[0]} predictions for {size}, got {out.shape[0]}")
    xy = (out[:, :2] + grid) * st
    wh = np.exp(out[:, 2:4]) * st
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], -1).astype(np.float32)
    return boxes, (out[:, 4] * out[:, 5]).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float, score_thr: float) -> list[int]:
    """Greedy NMS over xyxy boxes [N, 4]; returns kept indices by decreasing score."""
    order = [i for i in np.argsort(-scores) if scores[i] > score_thr]
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order:
        i = order.pop(0)
        keep.append(int(i))
        rest = np.array(order, int)
        if not len(rest):
            break
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        iou = inter / (area[i] + area[rest] - inter + 1e-12)
        order = [int(j) for j, o in zip(rest, iou) if o <= iou_thr]
    return keep


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """SimCC logits [K, Wx], [K, Hy] -> locations [K, 2] (input-crop px) and scores [K]
    (min of the two maxima, as mmpose ``get_simcc_maximum``; score <= 0 -> location -1)."""
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], -1).astype(np.float32)
    vals = np.minimum(simcc_x.max(-1), simcc_y.max(-1)).astype(np.float32)
    locs[vals <= 0] = -1
    return locs / split_ratio, vals


def openpose_from_wholebody(kpts: np.ndarray, scores: np.ndarray, width: int, height: int, thr: float = 0.3
                            ) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody 133 points (pixels [133, 2], scores [133]) -> normalised
    (body [20, 3], hands [2, 21, 3]) in the DWPose/OpenPose layout of section 11.2:
    neck = mean(shoulders) inserted (visible only if both shoulders > thr), OpenPose-18
    permutation, toes 18/19 = mean(big, small toe) of left/right (both must be > thr),
    hands = points 91..111 (left) and 112..132 (right) of the original indexing;
    scores < thr -> (-1, -1, 0)."""
    kpts = np.asarray(kpts, np.float64)
    scores = np.asarray(scores, np.float64)
    if kpts.shape != (133, 2) or scores.shape != (133,):
        raise ValueError(f"openpose_from_wholebody: need [133, 2] and [133], got {kpts.shape} {scores.shape}")
    coco_to_op = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
    body = np.zeros((20, 3))
    for o, c in enumerate(coco_to_op):
        if c is None:
            both = scores[5] > thr and scores[6] > thr
            body[o] = (*(0.5 * (kpts[5] + kpts[6])), 1.0 if both else 0.0)
        else:
            body[o] = (*kpts[c], scores[c])
    for o, (a, b) in ((18, (17, 18)), (19, (20, 21))):
        both = scores[a] > thr and scores[b] > thr
        body[o] = (*(0.5 * (kpts[a] + kpts[b])), 1.0 if both else 0.0)
    hands = np.stack([np.concatenate([kpts[s:s + 21], scores[s:s + 21, None]], -1) for s in (91, 112)])
    wh = np.array([width, height], np.float64)
    out = []
    for arr in (body, hands):
        arr = arr.copy()
        arr[..., :2] /= wh
        bad = arr[..., 2] < thr
        arr[bad] = (-1.0, -1.0, 0.0)
        out.append(arr.astype(np.float32))
    return out[0], out[1]
