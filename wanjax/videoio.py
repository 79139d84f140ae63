"""Progressive mp4 writing and JSON sidecars, both atomic.

``VideoWriter`` appends uint8 frames ``[n, H, W, 3]`` to ``<out>.partial.mp4`` (imageio-ffmpeg,
libx264, yuv420p) as they are produced, and renames it to ``<out>`` only when :meth:`close` succeeds.
Used as a context manager, an exception deletes the partial file, so a failed run never leaves an
mp4 behind (and never clobbers an existing ``<out>`` until the new one is complete).

``write_sidecar`` writes ``<out>.json`` (config, seed, per-block timings, first-frame latency, peak
memory, frame count) through a temporary file and ``os.replace``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class VideoWriteError(RuntimeError):
    pass


def partial_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".partial" + (out.suffix or ".mp4"))


def sidecar_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".json")


def to_uint8(frames_m11) -> np.ndarray:
    """Frames in [-1, 1] (any float array ``[..., 3]``) -> uint8 in 0..255 (round half to even)."""
    a = np.asarray(frames_m11, np.float32)
    return np.clip(np.rint((a + 1.0) * 127.5), 0, 255).astype(np.uint8)


class VideoWriter:
    """Progressive, atomic mp4 writer.

    >>> with VideoWriter("out.mp4", fps=16) as w:
    ...     w.append(frames)        # uint8 [n, H, W, 3], any number of times
    # out.mp4 exists only now; on an exception inside the block, no file is left.
    """

    def __init__(self, out: str | os.PathLike, fps: float = 16, *, quality: int | None = 8):
        self.out = Path(out)
        if self.out.suffix.lower() != ".mp4":
            raise VideoWriteError(f"--out {self.out}: the output must be an .mp4 file")
        if self.out.is_dir():
            raise VideoWriteError(f"--out {self.out} is a directory; pass a file name ending in .mp4")
        self.partial = partial_path(self.out)
        self.fps = float(fps)
        self.quality = quality
        self.frames_written = 0
        self.shape: tuple[int, int] | None = None
        self._writer = None
        self._closed = False

    def _open(self):
        import imageio.v2 as imageio

        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            self.partial.unlink()
        self._writer = imageio.get_writer(str(self.partial), format="FFMPEG", mode="I", fps=self.fps,
                                          codec="libx264", quality=self.quality, pixelformat="yuv420p",
                                          macro_block_size=1, ffmpeg_log_level="error")

    def append(self, frames) -> None:
        a = np.asarray(frames)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise VideoWriteError(f"VideoWriter.append: expected uint8 [n, H, W, 3], got {a.dtype} {a.shape}")
        if self._closed:
            raise VideoWriteError("VideoWriter.append after close()")
        if self.shape is None:
            if a.shape[1] % 2 or a.shape[2] % 2:
                raise VideoWriteError(f"frame size {a.shape[2]}x{a.shape[1]} must be even for yuv420p")
            self.shape = (a.shape[1], a.shape[2])
            self._open()
        elif a.shape[1:3] != self.shape:
            raise VideoWriteError(f"frame size {a.shape[1:3]} differs from the first frames {self.shape}")
        for f in a:
            self._writer.append_data(f)
        self.frames_written += a.shape[0]

    def close(self) -> Path:
        """Finish the file and move it to ``out`` (atomic rename). Returns ``out``."""
        if self._closed:
            return self.out
        if self.frames_written == 0:
            self.abort()
            raise VideoWriteError(f"{self.out}: no frames were produced; nothing written")
        self._writer.close()
        self._writer = None
        os.replace(self.partial, self.out)
        self._closed = True
        return self.out

    def abort(self) -> None:
        """Drop the partial file (idempotent)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # the file is deleted anyway
                pass
            self._writer = None
        if self.partial.exists():
            self.partial.unlink()
        self._closed = True

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _jsonable(x: Any):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    return str(x)


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_sidecar(out_mp4: str | os.PathLike, *, config: Any, seed: int, block_timings: list,
                  first_frame_latency_s: float | None, peak_memory_bytes: int | None, frame_count: int,
                  **extra) -> Path:
    """``<out>.json`` next to the mp4 with the run's configuration and measurements."""
    data = {"video": Path(out_mp4).name, "config": config, "seed": int(seed), "block_timings": block_timings,
            "first_frame_latency_s": first_frame_latency_s, "peak_memory_bytes": peak_memory_bytes,
            "frame_count": int(frame_count), **extra}
    return write_json_atomic(sidecar_path(out_mp4), data)


def peak_memory_bytes() -> int | None:
    """Peak device memory of device 0 where the backend reports it (GPU/TPU), else the process peak RSS."""
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"])
    except Exception:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None
