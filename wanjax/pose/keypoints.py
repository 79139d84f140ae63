"""Canonical pose-keypoint sequences and their file formats (unianimate_dit.md section 11.2).

``PoseSequence``:
  * ``body``  float32 ``[T, 20, 3]``: OpenPose-18 order (0 nose, 1 neck, 2 R-shoulder, 3 R-elbow,
    4 R-wrist, 5 L-shoulder, 6 L-elbow, 7 L-wrist, 8 R-hip, 9 R-knee, 10 R-ankle, 11 L-hip, 12 L-knee,
    13 L-ankle, 14 R-eye, 15 L-eye, 16 R-ear, 17 L-ear) + 18 L-toes (mean of the two left toes) and
    19 R-toes. Each point is ``(x, y, score)`` with x, y normalised to [0, 1] of the frame.
  * ``hands`` float32 ``[T, 2, 21, 3]``: left hand, right hand; COCO-WholeBody hand order.
  * ``width``, ``height``: size of the original frames in pixels.
  Invisible points have ``score = 0`` and ``x = y = -1`` (use :func:`mark_invisible`).

File formats read by :func:`load_keypoints`:
  * ``.json``: ``{"format": "wanjax-pose-v1", "width": W, "height": H, "frames": [{"body": [[x, y, s] x 20],
    "hands": [[[x, y, s] x 21], [[x, y, s] x 21]]}, ...]}`` (``hands`` optional: then invisible).
  * ``.npz``: arrays ``body [T,20,3]``, ``hands [T,2,21,3]`` (optional), scalars ``width``, ``height``.
  * ``.pkl`` (UniAnimate style): the per-frame pose dicts of UniAnimate's ``DWposeDetector`` -- a list
    (or a dict ``name -> pose``, taken in insertion order, or ``{"poses": [...], "width": W,
    "height": H}``) of ``{"bodies": {"candidate": [20, 2], "subset": [1, 20]}, "hands": [2, 21, 2],
    "faces": ...}`` with normalised coordinates; ``subset`` holds an index (visible) or -1, hands
    coordinates -1 when invisible. Scores become 1 (visible) or 0. Without ``width``/``height`` the
    UA inference canvas 512 x 768 is assumed. The pickle is read by a restricted unpickler that only
    rebuilds numpy arrays/scalars (through numpy's own reconstruction functions), lists, tuples,
    dicts, str, bytes, numbers, booleans and None; anything else is refused without being executed.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

NUM_BODY = 20
NUM_HAND = 21
SCORE_THRESHOLD = 0.3
JSON_FORMAT = "wanjax-pose-v1"
UA_CANVAS_WH = (512, 768)  # width, height of the UniAnimate inference drawing canvas


class PoseFileError(ValueError):
    """A keypoint file is missing, unreadable, malformed or unsafe. The message names file and field."""


@dataclasses.dataclass(frozen=True)
class PoseSequence:
    """T frames of body (20 points) and hand (2 x 21 points) keypoints, see the module docstring."""
    body: np.ndarray
    hands: np.ndarray
    width: int
    height: int

    def __post_init__(self):
        body = np.asarray(self.body, dtype=np.float32)
        hands = np.asarray(self.hands, dtype=np.float32)
        if body.ndim != 3 or body.shape[1:] != (NUM_BODY, 3):
            raise ValueError(f"PoseSequence.body must be [T, {NUM_BODY}, 3] (x, y, score), got {body.shape}")
        if hands.ndim != 4 or hands.shape[1:] != (2, NUM_HAND, 3):
            raise ValueError(f"PoseSequence.hands must be [T, 2, {NUM_HAND}, 3] (left, right), got {hands.shape}")
        if body.shape[0] != hands.shape[0]:
            raise ValueError(f"PoseSequence: body has {body.shape[0]} frames but hands has {hands.shape[0]}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"PoseSequence: width/height must be positive, got {self.width} x {self.height}")
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "hands", hands)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    @property
    def num_frames(self) -> int:
        return int(self.body.shape[0])

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, idx) -> "PoseSequence":
        """Frame slice/index array -> a shorter ``PoseSequence`` (an int keeps a length-1 axis)."""
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1 if int(idx) != -1 else None)
        return PoseSequence(self.body[idx], self.hands[idx], self.width, self.height)


def invisible_hands(num_frames: int) -> np.ndarray:
    """``[T, 2, 21, 3]`` of invisible hand points (x = y = -1, score 0)."""
    h = np.full((num_frames, 2, NUM_HAND, 3), -1.0, np.float32)
    h[..., 2] = 0.0
    return h


def mark_invisible(points: np.ndarray, threshold: float = SCORE_THRESHOLD) -> np.ndarray:
    """Copy of ``[..., 3]`` points where score < ``threshold`` become ``(-1, -1, 0)``."""
    p = np.array(points, dtype=np.float32, copy=True)
    bad = p[..., 2] < threshold
    p[bad] = (-1.0, -1.0, 0.0)
    return p


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save_keypoints(path: str | os.PathLike, seq: PoseSequence) -> Path:
    """Write ``seq`` as ``.json`` or ``.npz`` (chosen by the suffix)."""
    p = Path(path)
    if p.suffix == ".json":
        frames = [{"body": seq.body[t].tolist(), "hands": seq.hands[t].tolist()} for t in range(len(seq))]
        p.write_text(json.dumps({"format": JSON_FORMAT, "width": seq.width, "height": seq.height,
                                 "frames": frames}))
    elif p.suffix == ".npz":
        with open(p, "wb") as f:
            np.savez(f, body=seq.body, hands=seq.hands, width=np.int64(seq.width), height=np.int64(seq.height))
    else:
        raise PoseFileError(f"{p}: cannot save keypoints as {p.suffix!r}; use a .json or .npz path")
    return p


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_keypoints(path: str | os.PathLike) -> PoseSequence:
    """Read a ``.json``, ``.npz`` or UniAnimate-style ``.pkl`` keypoint file (see module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise PoseFileError(f"{p}: no such keypoint file")
    if p.stat().st_size == 0:
        raise PoseFileError(f"{p}: the file is empty")
    loaders = {".json": _load_json, ".npz": _load_npz, ".pkl": _load_pkl, ".pickle": _load_pkl}
    if p.suffix not in loaders:
        raise PoseFileError(f"{p}: unknown keypoint format {p.suffix!r}; expected .json, .npz or .pkl")
    return loaders[p.suffix](p)


def _array(p: Path, field: str, value: Any, shape_tail: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise PoseFileError(f"{p}: field {field!r} is not a numeric array ({e})") from None
    if a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail:
        raise PoseFileError(f"{p}: field {field!r} has shape {a.shape}, expected [T, "
                            f"{', '.join(map(str, shape_tail))}]")
    return a


def _size(p: Path, field: str, value: Any) -> int:
    try:
        v = int(np.asarray(value).item())
    except (TypeError, ValueError) as e:
        raise PoseFileError(f"{p}: field {field!r} must be a positive integer ({e})") from None
    if v <= 0:
        raise PoseFileError(f"{p}: field {field!r} must be a positive integer, got {v}")
    return v


def _build(p: Path, body: np.ndarray, hands: np.ndarray | None, width, height) -> PoseSequence:
    if body.shape[0] == 0:
        raise PoseFileError(f"{p}: field 'body' holds no frames")
    if hands is None:
        hands = invisible_hands(body.shape[0])
    if hands.shape[0] != body.shape[0]:
        raise PoseFileError(f"{p}: frame counts differ: 'body' has {body.shape[0]} frames, "
                            f"'hands' has {hands.shape[0]}")
    return PoseSequence(body, hands, _size(p, "width", width), _size(p, "height", height))


def _load_json(p: Path) -> PoseSequence:
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PoseFileError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "frames" not in d:
        raise PoseFileError(f"{p}: expected an object with 'width', 'height' and 'frames' (format {JSON_FORMAT})")
    for k in ("width", "height"):
        if k not in d:
            raise PoseFileError(f"{p}: missing field {k!r}")
    frames = d["frames"]
    if not isinstance(frames, list) or not frames:
        raise PoseFileError(f"{p}: field 'frames' must be a non-empty list")
    if any(not isinstance(f, dict) or "body" not in f for f in frames):
        bad = next(i for i, f in enumerate(frames) if not isinstance(f, dict) or "body" not in f)
        raise PoseFileError(f"{p}: frames[{bad}] has no 'body' field")
    body = _array(p, "frames[*].body", [f["body"] for f in frames], (NUM_BODY, 3))
    with_hands = ["hands" in f for f in frames]
    if any(with_hands) and not all(with_hands):
        raise PoseFileError(f"{p}: frames[{with_hands.index(False)}] has no 'hands' field while other frames do")
    hands = _array(p, "frames[*].hands", [f["hands"] for f in frames], (2, NUM_HAND, 3)) if all(with_hands) else None
    return _build(p, body, hands, d["width"], d["height"])


def _load_npz(p: Path) -> PoseSequence:
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise PoseFileError(f"{p}: not a readable .npz archive ({e})") from None
    for k in ("body", "width", "height"):
        if k not in data:
            raise PoseFileError(f"{p}: missing array {k!r} (found {sorted(data)})")
    body = _array(p, "body", data["body"], (NUM_BODY, 3))
    hands = _array(p, "hands", data["hands"], (2, NUM_HAND, 3)) if "hands" in data else None
    return _build(p, body, hands, data["width"], data["height"])


# ---- restricted pickle ------------------------------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): __import__("codecs").encode,
               ("collections", "OrderedDict"): __import__("collections").OrderedDict}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    # dtype classes referenced by numpy >= 1.25 pickles of dtypes (e.g. numpy.dtypes.Float32DType)
    import numpy.dtypes as npd
    for name in dir(npd):
        if name.endswith("DType"):
            allowed[("numpy.dtypes", name)] = getattr(npd, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only numpy array/scalar reconstruction; plain containers need no globals at all."""

    def __init__(self, f, path: Path):
        super().__init__(f)
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise PoseFileError(
                f"{self._path}: refused to unpickle {module}.{name}: keypoint pickles may only contain "
                f"numpy arrays, lists, tuples, dicts, str, bytes, numbers and None (pickles can run code, "
                f"so nothing else is loaded). Re-save the keypoints as .json or .npz "
                f"(wanjax.pose.keypoints.save_keypoints).")
        return obj

    def persistent_load(self, pid):
        raise PoseFileError(f"{self._path}: refused persistent id {pid!r} in a keypoint pickle")


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with the restricted unpickler (no arbitrary code execution)."""
    p = Path(path)
    data = p.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), p).load()
    except PoseFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError) as e:
        raise PoseFileError(f"{p}: not a readable pickle ({type(e).__name__}: {e})") from None


def _ua_frame(p: Path, i: int, pose: Any) -> tuple[np.ndarray, np.ndarray]:
    """One UniAnimate pose dict -> body [20, 3], hands [2, 21, 3]."""
    where = f"frame {i}"
    if isinstance(pose, (bytes, bytearray)):
        raise PoseFileError(f"{p}: {where} holds bytes (a JPEG pose drawing, like UA's "
                            f"dw_pose_with_foot_wo_face.pkl), not keypoints; decode the drawings as a video "
                            f"instead (wanjax.pose.video)")
    if not isinstance(pose, dict) or "bodies" not in pose:
        raise PoseFileError(f"{p}: {where} is a {type(pose).__name__}, expected a dict with 'bodies' and 'hands'")
    bodies = pose["bodies"]
    if not isinstance(bodies, dict) or "candidate" not in bodies or "subset" not in bodies:
        raise PoseFileError(f"{p}: {where}: 'bodies' must be a dict with 'candidate' and 'subset'")
    cand = np.asarray(bodies["candidate"], dtype=np.float32)
    subset = np.asarray(bodies["subset"], dtype=np.float32).reshape(-1)
    if cand.ndim != 2 or cand.shape[1] < 2 or cand.shape[0] < NUM_BODY:
        raise PoseFileError(f"{p}: {where}: 'bodies.candidate' has shape {cand.shape}, expected [20, 2]")
    if subset.shape[0] < NUM_BODY:
        raise PoseFileError(f"{p}: {where}: 'bodies.subset' has {subset.shape[0]} entries, expected 20")
    body = np.zeros((NUM_BODY, 3), np.float32)
    body[:, :2] = cand[:NUM_BODY, :2]
    body[:, 2] = (subset[:NUM_BODY] >= 0).astype(np.float32)
    body = mark_invisible(body, 0.5)
    if "hands" in pose and pose["hands"] is not None:
        hc = np.asarray(pose["hands"], dtype=np.float32)
        if hc.shape[:2] != (2, NUM_HAND) or hc.ndim != 3 or hc.shape[2] < 2:
            raise PoseFileError(f"{p}: {where}: 'hands' has shape {hc.shape}, expected [2, 21, 2]")
        hands = np.zeros((2, NUM_HAND, 3), np.float32)
        hands[..., :2] = hc[..., :2]
        hands[..., 2] = np.all(hc[..., :2] >= 0, axis=-1).astype(np.float32)
        hands = mark_invisible(hands, 0.5)
    else:
        hands = invisible_hands(1)[0]
    return body, hands


def _load_pkl(p: Path) -> PoseSequence:
    obj = safe_unpickle(p)
    width, height = UA_CANVAS_WH
    if isinstance(obj, dict) and "poses" in obj:
        width, height = obj.get("width", width), obj.get("height", height)
        obj = obj["poses"]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if not isinstance(obj, (list, tuple)):
        raise PoseFileError(f"{p}: expected a list of per-frame pose dicts, found {type(obj).__name__}")
    if not obj:
        raise PoseFileError(f"{p}: the pickle holds no frames")
    frames = [_ua_frame(p, i, f) for i, f in enumerate(obj)]
    body = np.stack([b for b, _ in frames])
    hands = np.stack([h for _, h in frames])
    return _build(p, body, hands, width, height)
