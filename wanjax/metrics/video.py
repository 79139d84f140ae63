"""Video quality and temporal-consistency metrics (numpy, no OpenCV / SciPy).

Videos are ``[T, H, W, 3]`` arrays (uint8 0..255 or float on the same 0..255 scale,
unless ``data_range`` says otherwise). Single images ``[H, W, 3]`` are accepted where
noted.

Public API: ``psnr``, ``ssim``, ``flicker``, ``flicker_ratio``, ``optical_flow``,
``warp``, ``warping_error``, ``luma``.
"""

from __future__ import annotations

import numpy as np


def _as_float(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (3, 4) or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected [T, H, W, 3] or [H, W, 3], got {x.shape}")
    return x.astype(np.float64)


def luma(x: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of [..., 3] RGB -> [...] (same scale as the input)."""
    x = np.asarray(x, np.float64)
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114 if x.shape[-1] == 3 else x[..., 0]


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE), with the MSE taken
    over ALL frames, pixels and channels of x vs y (same shape). Identical inputs -> inf."""
    a, b = _as_float(x, "psnr"), _as_float(y, "psnr")
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _gauss(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    return g / g.sum()


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of x [..., H, W] with the 1-D kernel k on both axes."""
    n = len(k)
    H, W = x.shape[-2:]
    y = sum(k[i] * x[..., i:H - n + 1 + i, :] for i in range(n))
    return sum(k[i] * y[..., :, i:W - n + 1 + i] for i in range(n))


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, channels: str = "luma",
         win_size: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004), Gaussian window 11 / sigma 1.5,
    K1 = 0.01, K2 = 0.03, 'valid' window positions only (no padding).

    channels="luma": SSIM on BT.601 luma; "rgb": per channel, averaged. The SSIM map is
    averaged per frame, then over frames. x, y: [T, H, W, 3] or [H, W, 3], H, W >= win_size.
    """
    a, b = _as_float(x, "ssim"), _as_float(y, "ssim")
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if min(a.shape[1:3]) < win_size:
        raise ValueError(f"ssim: frames {a.shape[1:3]} are smaller than the {win_size}-px window")
    if channels == "luma":
        a, b = luma(a)[:, None], luma(b)[:, None]  # [T, 1, H, W]
    elif channels == "rgb":
        a, b = np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1)  # [T, C, H, W]
    else:
        raise ValueError(f"ssim: channels must be 'luma' or 'rgb', got {channels!r}")
    k = _gauss(win_size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    s_aa = _filter_valid(a * a, k) - mu_a ** 2
    s_bb = _filter_valid(b * b, k) - mu_b ** 2
    s_ab = _filter_valid(a * b, k) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return float(m.mean(axis=(1, 2, 3)).mean())


def flicker(video: np.ndarray) -> float:
    """Mean squared frame-difference energy: mean over t = 1..T-1 and all pixels/channels
    of (x_t - x_{t-1})^2, on the input's scale (0..255 for uint8). A static video gives 0.
    It also counts legitimate motion, so compare models with ``flicker_ratio``.
    video: [T, H, W, C], T >= 2."""
    v = _as_float(video, "flicker")
    if v.ndim != 4 or v.shape[0] < 2:
        raise ValueError(f"flicker: need a video [T >= 2, H, W, C], got {v.shape}")
    return float(np.mean(np.diff(v, axis=0) ** 2))


def flicker_ratio(video: np.ndarray, gt: np.ndarray, eps: float = 1e-6) -> float:
    """(flicker(video) + eps) / (flicker(gt) + eps): 1 = as much frame-to-frame change as the
    ground truth, > 1 = extra flicker/jitter. Two static videos give 1."""
    return (flicker(video) + eps) / (flicker(gt) + eps)


# ----------------------------------------------------------------------------------------
# Optical flow (multi-scale Horn-Schunck) and warping error
# ----------------------------------------------------------------------------------------


def warp(img: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backward warp: out(x) = img(x + flow(x)) with bilinear sampling.

    img: [N, H, W] or [N, H, W, C]; flow: [N, H, W, 2] as (dx, dy) in pixels.
    Returns (warped like img, inside bool [N, H, W]: sample point inside the image).
    """
    N, H, W = img.shape[:3]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    sx, sy = xx[None] + flow[..., 0], yy[None] + flow[..., 1]
    inside = (sx >= 0) & (sx <= W - 1) & (sy >= 0) & (sy <= H - 1)
    sx, sy = np.clip(sx, 0, W - 1), np.clip(sy, 0, H - 1)
    x0 = np.minimum(np.floor(sx).astype(int), W - 2) if W > 1 else np.zeros_like(sx, int)
    y0 = np.minimum(np.floor(sy).astype(int), H - 2) if H > 1 else np.zeros_like(sy, int)
    fx, fy = sx - x0, sy - y0
    n = np.arange(N)[:, None, None]
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    if img.ndim == 4:
        fx, fy = fx[..., None], fy[..., None]
    out = ((1 - fy) * ((1 - fx) * img[n, y0, x0] + fx * img[n, y0, x1])
           + fy * ((1 - fx) * img[n, y1, x0] + fx * img[n, y1, x1]))
    return out, inside


def _blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur of [N, H, W] with edge padding (same size)."""
    r = int(np.ceil(2 * sigma))
    k = _gauss(2 * r + 1, sigma)
    p = np.pad(x, ((0, 0), (r, r), (r, r)), mode="edge")
    return _filter_valid(p, k)


def _avg4(u: np.ndarray) -> np.ndarray:
    """Horn-Schunck neighbourhood average (1/6 edge, 1/12 corner neighbours), edge padded."""
    p = np.pad(u, ((0, 0), (1, 1), (1, 1)), mode="edge")
    e = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
    c = p[:, :-2, :-2] + p[:, :-2, 2:] + p[:, 2:, :-2] + p[:, 2:, 2:]
    return e / 6 + c / 12


def optical_flow(src: np.ndarray, dst: np.ndarray, alpha: float = 0.03, iters: int = 30, warps: int = 2,
                 min_size: int = 12) -> np.ndarray:
    """Dense flow f with dst(x) ~= src(x + f(x)) (so ``warp(src, f)`` approximates dst).

    src, dst: float [N, H, W] grey images in [0, 1]. Multi-scale Horn-Schunck: a 2x
    average-pooling pyramid down to ``min_size`` px, ``warps`` re-linearisations per level,
    ``iters`` Jacobi iterations each, smoothness weight ``alpha`` (intensity units), images
    pre-blurred with sigma 1. Returns float [N, H, W, 2] = (dx, dy) in pixels.
    """
    src, dst = _blur(np.asarray(src, np.float64)), _blur(np.asarray(dst, np.float64))
    pyr = [(src, dst)]
    while min(pyr[-1][0].shape[1:]) // 2 >= min_size:
        a, b = pyr[-1]
        h, w = a.shape[1] // 2 * 2, a.shape[2] // 2 * 2
        pool = lambda z: z[:, :h, :w].reshape(z.shape[0], h // 2, 2, w // 2, 2).mean((2, 4))
        pyr.append((pool(a), pool(b)))
    flow = np.zeros(pyr[-1][0].shape + (2,))
    for lvl, (a, b) in enumerate(reversed(pyr)):
        if lvl:  # upsample the coarser flow (nearest, x2 values), pad/crop to this size
            f = 2 * flow.repeat(2, 1).repeat(2, 2)
            N, H, W = a.shape
            f = np.pad(f, ((0, 0), (0, max(0, H - f.shape[1])), (0, max(0, W - f.shape[2])), (0, 0)), mode="edge")
            flow = f[:, :H, :W]
        for _ in range(warps):
            aw, _ = warp(a, flow)
            gy, gx = np.gradient(aw, axis=(1, 2))
            r = aw - b - gx * flow[..., 0] - gy * flow[..., 1]
            u, v = flow[..., 0].copy(), flow[..., 1].copy()
            den = alpha ** 2 + gx ** 2 + gy ** 2
            for _ in range(iters):
                ub, vb = _avg4(u), _avg4(v)
                t = (gx * ub + gy * vb + r) / den
                u, v = ub - gx * t, vb - gy * t
            flow = np.stack([u, v], -1)
    return flow


def warping_error(video: np.ndarray, flow_source: np.ndarray | None = None, alpha: float = 0.03
                  ) -> float:
    """Flow-based temporal warping error (after Lai et al. 2018), in [0, 1] intensity units.

    For each t = 1..T-1, the backward flow f_t (frame t -> t-1) and forward flow g_t are
    estimated with ``optical_flow`` on ``flow_source`` (the ground-truth video when given,
    so that the motion is the true one; else ``video`` itself), from BT.601 luma / 255.
    A pixel is used when its sample point is inside the frame and the flow is
    forward-backward consistent (Sundaram et al.: |f + g(x + f)|^2 <= 0.01 (|f|^2 +
    |g(x + f)|^2) + 0.5), which removes occlusions. The error is the masked mean over all
    pixels, pairs and RGB channels of |video_t - warp(video_{t-1}, f_t)| / 255.
    video, flow_source: [T, H, W, 3] (0..255), T >= 2, same shape.
    """
    v = _as_float(video, "warping_error")
    if v.ndim != 4 or v.shape[0] < 2:
        raise ValueError(f"warping_error: need a video [T >= 2, H, W, 3], got {v.shape}")
    s = v if flow_source is None else _as_float(flow_source, "warping_error(flow_source)")
    if s.shape[:3] != v.shape[:3]:
        raise ValueError(f"warping_error: flow_source {s.shape} and video {v.shape} differ in [T, H, W]")
    y = luma(s) / 255.0
    prev, cur = y[:-1], y[1:]
    f = optical_flow(prev, cur, alpha)  # cur(x) ~ prev(x + f)
    g = optical_flow(cur, prev, alpha)  # prev(x) ~ cur(x + g)
    g_at, inside = warp(g, f)
    fb = np.sum((f + g_at) ** 2, -1)
    mask = inside & (fb <= 0.01 * (np.sum(f ** 2, -1) + np.sum(g_at ** 2, -1)) + 0.5)
    pred, _ = warp(v[:-1], f)
    err = np.abs(v[1:] - pred).mean(-1) / 255.0
    return float((err * mask).sum() / max(mask.sum(), 1))
