"""Image I/O and Wan's CLIP preprocessing (wan_components.md 5.2, unianimate_dit.md 5).

Pipeline for the I2V / UniAnimate reference image::

    img  = load_image(path)                      # uint8 [H, W, 3]
    img  = resize_pil(img, (H, W), "bicubic")    # UniAnimate: PIL stretch to the video size
    x    = to_model_range(img)[None]             # float32 [1, H, W, 3] in [-1, 1]
    pix  = clip_preprocess(x)                    # [1, 224, 224, 3], CLIP-normalised
    fea  = encoder(pix)                          # [1, 257, 1280]   (wanjax.models.clip)

``clip_preprocess`` is a plain bicubic *stretch* (no aspect-preserving crop, no antialias, no
clamping) that reproduces ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``.
``jax.image.resize`` is not equivalent (Keys a=-0.5 and antialiasing when downsampling).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.models.clip import load_clip_encoder  # noqa: F401  (re-exported)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_GREY_MODES = ("1", "L")
_COLOR_MODES = ("CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_ALPHA_CHOICES = ("error", "drop", "white", "black")


def load_image(path: str | os.PathLike, *, alpha: str = "error") -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` (RGB). Only the first frame of animations is read.

    Conversions: greyscale (``L``, ``1``) is replicated to three channels; palette images are
    expanded; ``CMYK``/``YCbCr``/``LAB``/``HSV`` are converted to RGB by PIL. An alpha channel
    that is fully opaque is dropped. A *non-opaque* alpha channel is handled by ``alpha``:
    ``"error"`` (default) raises, ``"drop"`` discards it (what Wan's ``.convert("RGB")`` does),
    ``"white"`` / ``"black"`` composite onto that background. 16-bit and float images raise.
    EXIF orientation is not applied (neither Wan nor UniAnimate applies it).
    """
    from PIL import Image, UnidentifiedImageError

    if alpha not in _ALPHA_CHOICES:
        raise ValueError(f"load_image: alpha={alpha!r}, expected one of {_ALPHA_CHOICES}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            im.load()
            im = im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{p}: cannot read this file as an image ({type(e).__name__}: {e}); "
                         f"use an 8-bit PNG/JPEG/WebP") from None
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in _GREY_MODES or mode in _COLOR_MODES:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        rgb, a = rgba[..., :3], rgba[..., 3:]
        if alpha == "drop" or bool(np.all(a == 255)):
            return rgb.copy()
        if alpha == "error":
            raise ValueError(f"{p}: image has a non-opaque alpha channel (mode {im.mode}, 4 channels "
                             f"with {int(np.sum(a < 255))} transparent pixels) but 3 channels are "
                             f"needed; flatten it, or pass alpha='drop' | 'white' | 'black'")
        bg = 255.0 if alpha == "white" else 0.0
        af = a.astype(np.float32) / 255.0
        out = rgb.astype(np.float32) * af + bg * (1.0 - af)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    raise ValueError(f"{p}: unsupported image mode {mode!r} (bands {im.getbands()}); wanjax reads "
                     f"8-bit RGB, greyscale, palette, RGBA or CMYK images; convert it to 8-bit RGB")


def _check_rgb(img, name: str) -> None:
    if img.ndim < 3 or img.shape[-1] != 3:
        raise ValueError(f"{name}: expected an RGB image [..., H, W, 3] (channels last), got shape "
                         f"{tuple(img.shape)}; convert greyscale/RGBA with load_image or move channels last")


def to_model_range(img) -> jax.Array:
    """``uint8 [..., H, W, 3]`` -> float32 in [-1, 1] as ``(x/255 - 0.5) / 0.5`` (Wan's to_tensor+Normalize)."""
    img = np.asarray(img) if not isinstance(img, jax.Array) else img
    _check_rgb(img, "to_model_range")
    if img.dtype != np.uint8:
        raise ValueError(f"to_model_range: expected uint8 pixels in [0, 255], got dtype {img.dtype}; "
                         f"for float images in [0, 1] use x*2-1 directly")
    x = jnp.asarray(img).astype(jnp.float32) / 255.0
    return (x - 0.5) / 0.5


def _cubic_weights_torch(in_size: int, out_size: int) -> np.ndarray:
    """float32 ``[out, in]`` matrix of PyTorch's bicubic (align_corners=False) along one axis.

    Source coordinate ``src = scale*(dst+0.5) - 0.5`` with ``scale = in/out`` in float32 and
    ``src`` rounded once to float32 (PyTorch's CPU kernel evaluates it with a fused multiply-add;
    rounding twice moves weights by up to 1e-5). ``src`` is not clamped; taps ``floor(src)-1..+2``
    get Keys cubic weights with a = -0.75, tap indices are clamped to ``[0, in-1]`` and the weights
    of clamped taps add up (border replication).
    """
    a = -0.75
    scale = float(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    real = (scale * (dst + 0.5) - 0.5).astype(np.float32).astype(np.float64)
    idx = np.minimum(np.floor(real), in_size - 1)
    t = np.clip(real - idx, 0.0, 1.0)

    def near(x):   # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = idx.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    taps = np.clip(taps, 0, in_size - 1)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), w.reshape(-1))
    return m.astype(np.float32)


def resize_bicubic_torch(x, size: Sequence[int]) -> jax.Array:
    """Bicubic resize of ``x [..., H, W, C]`` to ``[..., h, w, C]`` exactly like
    ``F.interpolate(mode="bicubic", align_corners=False)`` (no antialias, no clamping).

    Implemented as two separable interpolation matrices; ``size = (h, w)``. Computed in at least
    float32; the result has the input's float dtype (float32 for integer input).
    """
    if x.ndim < 3:
        raise ValueError(f"resize_bicubic_torch: expected [..., H, W, C], got shape {tuple(x.shape)}")
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"resize_bicubic_torch: size must be positive, got {tuple(size)}")
    x = jnp.asarray(x)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    cdt = jnp.promote_types(out_dtype, jnp.float32)      # never interpolate in bf16/fp16
    x = x.astype(cdt)
    wh = jnp.asarray(_cubic_weights_torch(x.shape[-3], h), cdt)
    ww = jnp.asarray(_cubic_weights_torch(x.shape[-2], w), cdt)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ow,...hwc->...hoc", ww, x, precision=hi)
    return jnp.einsum("oh,...hwc->...owc", wh, y, precision=hi).astype(out_dtype)


def clip_preprocess(img_m11, size: int = 224) -> jax.Array:
    """Wan's CLIP input: ``[B, H, W, 3]`` in [-1, 1] -> ``[B, size, size, 3]``.

    Bicubic stretch to ``size x size`` (torch semantics), then ``x*0.5+0.5`` and the OpenAI
    mean/std normalisation.
    """
    if img_m11.ndim != 4 or img_m11.shape[-1] != 3:
        raise ValueError(f"clip_preprocess: expected [B, H, W, 3] in [-1, 1], got shape "
                         f"{tuple(img_m11.shape)}; add a batch axis with x[None] / move channels last")
    x = resize_bicubic_torch(img_m11, (size, size))
    x = x * 0.5 + 0.5
    mean = jnp.asarray(CLIP_MEAN, x.dtype)
    std = jnp.asarray(CLIP_STD, x.dtype)
    return (x - mean) / std


def resize_pil(img: np.ndarray, size: Sequence[int], method: str = "bicubic") -> np.ndarray:
    """PIL resize of ``uint8 [H, W, 3]`` to ``size = (h, w)`` (note: *not* PIL's (w, h) order).

    ``"bicubic"`` is PIL's default filter used by UniAnimate's ``Image.resize``; PIL antialiases
    when downsampling, unlike ``resize_bicubic_torch``.
    """
    from PIL import Image

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    if method not in filters:
        raise ValueError(f"resize_pil: method {method!r}, expected one of {sorted(filters)}")
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"resize_pil: expected uint8 [H, W, 3], got {img.dtype} {tuple(img.shape)}")
    h, w = (int(s) for s in size)
    out = Image.fromarray(img, "RGB").resize((w, h), filters[method])
    return np.asarray(out, dtype=np.uint8).copy()


def encode_image(encoder, img_m11) -> jax.Array:
    """``[B, H, W, 3]`` in [-1, 1] -> CLIP features ``[B, 257, D]`` (clip_preprocess + encoder)."""
    return encoder(clip_preprocess(img_m11, encoder.cfg.image_size))
