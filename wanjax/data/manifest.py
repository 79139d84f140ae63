"""Distillation dataset manifest: one JSON object per line (JSONL), one sample per line.

Row fields::

    {"id": "dance_0001",              # required; letters, digits and . _ - : + = @ (no '/', <= 200 chars)
     "ref": "refs/0001.png",          # required; reference image
     "pose": "poses/0001.mp4",        # required; pose video (mp4, ...), frame folder or keypoint file
                                      #   (.json / .npz / .pkl, drawn with wanjax.pose.render_sequence)
     "prompt": "a person is dancing", # required; may be ""
     "ref_pose": "poses/0001/pose.jpg",  # optional; pose drawing (image) or keypoint file of the reference
     "seed": 1234}                    # optional; int in [0, 2**31); else hashed from the id

Relative paths are resolved against the manifest's directory. Blank lines are ignored; they do not
count as rows, but every message names the 1-based *line* number of the file.

Validation:

* **Structural errors** (a line that is not JSON, a missing / unknown / mistyped field, a duplicate id,
  an empty manifest) always raise :class:`ManifestError` naming ``FILE:LINE`` and the field: the
  manifest itself must be fixed before a long run starts.
* **Missing or unreadable inputs** (a ``ref`` / ``pose`` / ``ref_pose`` path that does not exist, a
  video that cannot be decoded, too few pose frames) follow ``on_bad_row``: ``"stop"`` raises
  :class:`ManifestError`, ``"skip"`` logs a warning (``wanjax.data.manifest`` logger, stderr) and
  drops the row. Existence is checked by :func:`load_manifest`; readability when a row's inputs are
  read (:func:`read_row`).

Rows keep their 0-based position ``index`` among all rows of the file (skipped ones included), so
grouping rows by position (e.g. into output shards) does not change when a row is skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("wanjax.data.manifest")

ON_BAD_ROW = ("skip", "stop")
REQUIRED = ("id", "ref", "pose", "prompt")
OPTIONAL = ("ref_pose", "seed")
KEYPOINT_SUFFIXES = (".json", ".npz", ".pkl", ".pickle")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+=@-]{0,199}$")
SEED_LIMIT = 2 ** 31


class ManifestError(ValueError):
    """A bad manifest line or sample input. The message names ``FILE:LINE``, the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One validated manifest line. Paths are absolute (resolved against the manifest's directory);
    ``raw`` keeps the path strings as written (stored in target metadata, portable)."""
    index: int                 # 0-based position among the manifest's rows
    line: int                  # 1-based line number in the file
    id: str
    ref: Path
    pose: Path
    prompt: str
    ref_pose: Path | None = None
    seed: int | None = None
    raw: tuple[tuple[str, str], ...] = ()
    manifest: str = ""         # the manifest file, for messages

    def where(self, field: str | None = None) -> str:
        """``FILE:LINE (id 'x')[, field 'f']`` for messages."""
        loc = f"{self.manifest}:{self.line}" if self.manifest else f"manifest line {self.line}"
        return f"{loc} (id {self.id!r})" + (f", field {field!r}" if field else "")

    def paths(self) -> dict[str, Path]:
        out = {"ref": self.ref, "pose": self.pose}
        if self.ref_pose is not None:
            out["ref_pose"] = self.ref_pose
        return out

    def missing(self) -> list[str]:
        """Names of the path fields whose file / folder does not exist."""
        return [k for k, p in self.paths().items() if not p.exists()]


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: Path
    rows: tuple[ManifestRow, ...]                 # usable rows, in file order
    skipped: tuple[tuple[ManifestRow, str], ...]  # (row, reason) for rows dropped by on_bad_row="skip"
    num_rows: int                                 # rows in the file (skipped included)

    def __len__(self) -> int:
        return len(self.rows)


def check_on_bad_row(value: str) -> str:
    if value not in ON_BAD_ROW:
        raise ManifestError(f"on_bad_row={value!r}; choose 'skip' (log and drop the row) or 'stop' (raise)")
    return value


def _resolve(base: Path, value: str) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


def parse_row(obj: Any, *, index: int, line: int, base: Path, manifest: str = "") -> ManifestRow:
    """Validate one decoded JSON value of line ``line`` of ``manifest`` -> :class:`ManifestRow`."""
    where = f"{manifest}:{line}" if manifest else f"manifest line {line}"
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object {{\"id\", \"ref\", \"pose\", \"prompt\", ...}}, "
                            f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ManifestError(f"{where}: unknown field {unknown[0]!r}; known fields: {list(REQUIRED + OPTIONAL)}")
    for k in REQUIRED:
        if k not in obj:
            raise ManifestError(f"{where}: missing required field {k!r}")
        if not isinstance(obj[k], str):
            raise ManifestError(f"{where}: field {k!r} must be a string, got {type(obj[k]).__name__}")
    sid = obj["id"]
    if not ID_PATTERN.match(sid):
        raise ManifestError(f"{where}: field 'id' = {sid!r}: use 1-200 characters from letters, digits and "
                            f"'._:+=@-', starting with a letter or digit (no '/' or spaces)")
    for k in ("ref", "pose"):
        if not obj[k].strip():
            raise ManifestError(f"{where}: field {k!r} is empty; give a path (relative to the manifest)")
    ref_pose = obj.get("ref_pose")
    if ref_pose is not None and (not isinstance(ref_pose, str) or not ref_pose.strip()):
        raise ManifestError(f"{where}: field 'ref_pose' must be a non-empty path string or absent")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise ManifestError(f"{where}: field 'seed' = {seed!r} must be an integer in [0, 2**31) or absent")
    raw = tuple((k, obj[k]) for k in ("ref", "pose", "ref_pose") if obj.get(k) is not None)
    return ManifestRow(index=index, line=line, id=sid, ref=_resolve(base, obj["ref"]),
                       pose=_resolve(base, obj["pose"]), prompt=obj["prompt"],
                       ref_pose=None if ref_pose is None else _resolve(base, ref_pose), seed=seed, raw=raw,
                       manifest=manifest)


def parse_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read and validate every line (structure only; files are not touched). Raises
    :class:`ManifestError` naming ``FILE:LINE`` and the field for the first bad line."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest {p}: no such file (set --config.data.manifest=FILE.jsonl)")
    base = p.resolve().parent
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    with open(p, encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{p}:{line_no}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                                    f"one JSON object") from None
            row = parse_row(obj, index=len(rows), line=line_no, base=base, manifest=str(p))
            if row.id in seen:
                raise ManifestError(f"{where}: field 'id' = {row.id!r} repeats line {seen[row.id]}; ids must be "
                                    f"unique")
            seen[row.id] = line_no
            rows.append(row)
    if not rows:
        raise ManifestError(f"manifest {p}: no rows (one JSON object per line expected)")
    return rows


def bad_row(msg: str, on_bad_row: str) -> None:
    """Apply ``on_bad_row`` to an unusable row (``msg`` names it, see :meth:`ManifestRow.where`):
    raise :class:`ManifestError` (``stop``) or log a warning (``skip``)."""
    if on_bad_row == "stop":
        raise ManifestError(msg + "; fix the row or set --config.data.on_bad_row=skip")
    log.warning("skipping %s", msg)


def load_manifest(path: str | os.PathLike, *, on_bad_row: str = "stop", check_files: bool = True) -> Manifest:
    """:func:`parse_manifest` plus the existence check of every path field (see the module doc)."""
    check_on_bad_row(on_bad_row)
    rows = parse_manifest(path)
    keep, skipped = [], []
    for r in rows:
        missing = r.missing() if check_files else []
        if missing:
            reason = "; ".join(f"field {k!r}: {r.paths()[k]} does not exist" for k in missing)
            bad_row(f"{r.where()}: {reason}", on_bad_row)
            skipped.append((r, reason))
        else:
            keep.append(r)
    if skipped:
        log.warning("manifest %s: %d of %d rows skipped (missing files)", path, len(skipped), len(rows))
    return Manifest(Path(path), tuple(keep), tuple(skipped), len(rows))


# ----------------------------------------------------------------------------------------------
# Reading a row's inputs at the video size
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RowInputs:
    """Host-side inputs of one row: ``ref`` uint8 [H, W, 3]; ``pose`` uint8 [num_frames, H, W, 3]
    (unpadded: no repeated leading frames); ``ref_pose`` float32 [H, W, 3] in [0, 1];
    ``ref_pose_source`` one of ``ref_pose`` (the manifest field), ``pose.jpg`` (next to the frame
    folder), ``first_pose_frame`` (fallback)."""
    row: ManifestRow
    ref: np.ndarray
    pose: np.ndarray
    ref_pose: np.ndarray
    ref_pose_source: str


def _render_keypoints(path: Path, height: int, width: int, start: int, count: int | None) -> np.ndarray:
    from wanjax.pose import load_keypoints, render_sequence

    seq = load_keypoints(path)
    stop = None if count is None else start + count
    seq = seq[start:stop]
    if len(seq) == 0:
        raise ValueError(f"{path}: no keypoint frames from start={start}")
    return render_sequence(seq, height, width)


def read_pose_source(path: Path, height: int, width: int, num_frames: int, *, pad_last: bool = False,
                     start: int = 0) -> np.ndarray:
    """Pose video / frame folder / keypoint file -> uint8 [num_frames, height, width, 3] (frames
    ``start ..``; a short source is an error unless ``pad_last`` repeats its last frame)."""
    from wanjax.pipeline import read_pose_frames

    if path.is_file() and path.suffix.lower() in KEYPOINT_SUFFIXES:
        frames = _render_keypoints(path, height, width, start, num_frames)
        if frames.shape[0] < num_frames:
            if not pad_last:
                raise ValueError(f"{path}: {frames.shape[0]} keypoint frames from start={start} but num_frames="
                                 f"{num_frames}; use a longer sequence or --config.pose.pad_last=True")
            frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - frames.shape[0], 0)])
        return frames
    return read_pose_frames(path, height, width, num_frames, pad_last=pad_last, start=start)


def read_ref_pose_source(row: ManifestRow, height: int, width: int, first_pose: np.ndarray
                         ) -> tuple[np.ndarray, str]:
    """Reference pose float32 [H, W, 3] in [0, 1] and where it came from (see :class:`RowInputs`)."""
    from wanjax.pose.video import REF_POSE_NAME, prepare_ref_pose

    if row.ref_pose is not None:
        if row.ref_pose.suffix.lower() in KEYPOINT_SUFFIXES:
            img = _render_keypoints(row.ref_pose, height, width, 0, 1)[0]
            return img.astype(np.float32) / 255.0, "ref_pose"
        return prepare_ref_pose(row.ref_pose, height, width)[0], "ref_pose"
    if row.pose.is_dir():
        for suffix in (".jpg", ".png", ".jpeg"):
            cand = row.pose / f"{REF_POSE_NAME}{suffix}"
            if cand.is_file():
                return prepare_ref_pose(cand, height, width)[0], "pose.jpg"
    return first_pose.astype(np.float32) / 255.0, "first_pose_frame"


def read_row(row: ManifestRow, height: int, width: int, num_frames: int, *, pad_last: bool = False,
             start: int = 0) -> RowInputs:
    """Read and resize one row's reference image, pose frames and reference pose. Any unreadable
    input raises :class:`ManifestError` naming the manifest line and field."""
    from wanjax.pipeline import read_reference

    field = "ref"
    try:
        ref = read_reference(row.ref, height, width)
        field = "pose"
        pose = read_pose_source(row.pose, height, width, num_frames, pad_last=pad_last, start=start)
        field = "ref_pose"
        ref_pose, source = read_ref_pose_source(row, height, width, pose[0])
    except (ValueError, OSError) as e:  # PipelineError, VideoError, PoseFileError are ValueErrors
        raise ManifestError(f"{row.where(field)}: {e}") from None
    return RowInputs(row, ref, pose, ref_pose, source)


__all__ = ["ManifestError", "ManifestRow", "Manifest", "RowInputs", "ON_BAD_ROW", "parse_manifest",
           "parse_row", "load_manifest", "bad_row", "check_on_bad_row", "read_row", "read_pose_source",
           "read_ref_pose_source"]
