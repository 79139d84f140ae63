"""Pose-video input path (unianimate_dit.md sections 3.1 and 4): read, resize, normalise.

``read_video`` -> uint8 ``[T, H, W, 3]``; ``resize_frames`` (PIL bilinear, antialiased when
downscaling, as torchvision does on PIL images); ``prepare_pose_video`` -> float32
``[1, num_frames + 3, H, W, 3]`` in [0, 1] with frame 0 repeated 3x (the input of
``PoseConditioner.pose_features``); ``prepare_ref_pose`` -> float32 ``[1, H, W, 3]`` in [0, 1].

Deviation: when the pose video is longer than ``num_frames``, UA picks an unseeded random window;
we take a deterministic window starting at ``start`` (default 0).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")
REF_POSE_NAME = "pose"  # UA writes the reference pose as pose.jpg next to the aligned frames


class VideoError(ValueError):
    """Unreadable video/frames or frames of the wrong shape. The message names the file and the fix."""


def _natural_key(name: str):
    """'10.jpg' after '2.jpg': digit runs compare as integers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise VideoError(f"{what}: expected uint8 frames [T, H, W, 3] (RGB, channels last), got shape {a.shape}"
                         + ("; drop the alpha channel first" if a.ndim == 4 and a.shape[-1] == 4 else ""))
    if a.dtype != np.uint8:
        raise VideoError(f"{what}: expected uint8 frames in 0..255, got dtype {a.dtype}")
    if a.shape[0] == 0:
        raise VideoError(f"{what}: no frames")
    return a


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise VideoError(f"{path}: unreadable image ({e})") from None


def list_frame_files(directory: str | os.PathLike) -> list[Path]:
    """Image files of a frame folder in numeric order (0, 2, 10, ...), without ``pose.*``."""
    d = Path(directory)
    files = [f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
             and f.stem.lower() != REF_POSE_NAME]
    return sorted(files, key=lambda f: _natural_key(f.name))


def read_video(path_or_dir: str | os.PathLike) -> np.ndarray:
    """Read an mp4 (or another ffmpeg-readable video) or a folder of frames -> uint8 ``[T, H, W, 3]``.

    Folders are read in numeric file-name order (``0.jpg, 2.jpg, 10.jpg``); ``pose.jpg`` (UA's
    reference pose) is skipped. All frames must have the same size.
    """
    p = Path(path_or_dir)
    if not p.exists():
        raise VideoError(f"{p}: no such file or directory")
    if p.is_dir():
        files = list_frame_files(p)
        if not files:
            raise VideoError(f"{p}: no image frames ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        frames = []
        for f in files:
            im = _read_image(f)
            if frames and im.shape != frames[0].shape:
                raise VideoError(f"{f}: frame size {im.shape[1]}x{im.shape[0]} differs from "
                                 f"{files[0].name} ({frames[0].shape[1]}x{frames[0].shape[0]}); resize the frames")
            frames.append(im)
        return np.stack(frames)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(p)[None]
    try:
        import imageio.v2 as imageio

        reader = imageio.get_reader(str(p), format="FFMPEG")
        try:
            frames = [np.asarray(f) for f in reader]
        finally:
            reader.close()
    except Exception as e:  # imageio/ffmpeg raise many exception types for bad files
        raise VideoError(f"{p}: unreadable video ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not frames:
        raise VideoError(f"{p}: the video has no frames")
    out = np.stack(frames)
    if out.ndim == 3:
        out = np.repeat(out[..., None], 3, axis=-1)
    if out.shape[-1] == 4:
        out = out[..., :3]
    return _check_frames(out, str(p))


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, height, width, 3]`` with PIL bilinear (aspect not kept)."""
    from PIL import Image

    a = _check_frames(frames, "resize_frames")
    if a.shape[1:3] == (height, width):
        return a.copy()
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in a])


def prepare_pose_video(frames: np.ndarray, num_frames: int, *, pad_last: bool = False,
                       start: int = 0) -> np.ndarray:
    """uint8 pose frames ``[T, H, W, 3]`` -> float32 ``[1, num_frames + 3, H, W, 3]`` in [0, 1].

    ``num_frames`` must be ``4k + 1`` (81 -> 84 network frames). Frames ``start .. start+num_frames-1``
    are used; a shorter video is an error unless ``pad_last`` (then the last frame is repeated, as UA
    does at inference). Frame 0 of the window is prepended 3 times.
    """
    a = _check_frames(frames, "prepare_pose_video")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise VideoError(f"prepare_pose_video: num_frames={num_frames} must be 4k+1 (e.g. 81, 21, 5) so that "
                         f"num_frames+3 is a multiple of 4 (one pose token frame per VAE latent frame)")
    if start < 0 or start >= a.shape[0]:
        raise VideoError(f"prepare_pose_video: start={start} outside the {a.shape[0]} pose frames")
    win = a[start:start + num_frames]
    if win.shape[0] < num_frames:
        if not pad_last:
            raise VideoError(f"prepare_pose_video: the pose video has {a.shape[0]} frames"
                             f"{f' ({win.shape[0]} from start={start})' if start else ''} but num_frames="
                             f"{num_frames} are needed; pass pad_last=True to repeat the last pose, or lower "
                             f"num_frames")
        win = np.concatenate([win, np.repeat(win[-1:], num_frames - win.shape[0], axis=0)])
    win = np.concatenate([np.repeat(win[:1], 3, axis=0), win])
    return (win.astype(np.float32) / 255.0)[None]


def prepare_ref_pose(img, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Reference pose drawing (uint8 ``[H, W, 3]`` array or image path) -> float32 ``[1, H, W, 3]`` in
    [0, 1], resized (PIL bilinear) to ``height x width`` when given."""
    if isinstance(img, (str, os.PathLike)):
        p = Path(img)
        if not p.is_file():
            raise VideoError(f"{p}: no such reference pose image")
        a = _read_image(p)
    else:
        a = np.asarray(img)
    a = _check_frames(a[None] if a.ndim == 3 else a, "prepare_ref_pose")
    if a.shape[0] != 1:
        raise VideoError(f"prepare_ref_pose: expected one image [H, W, 3], got {a.shape[0]} frames")
    if height is not None or width is not None:
        if height is None or width is None:
            raise VideoError("prepare_ref_pose: pass both height and width (or neither)")
        a = resize_frames(a, height, width)
    return a.astype(np.float32) / 255.0
