"""Evaluate generated videos against their driving poses (and optional ground truth).

Usage::

    python -m infer.evaluate --videos DIR --pose DIR [--gt DIR] [--out report] [--alpha 0.1]

Layout (ids are the stems of ``--videos DIR/*.mp4``):
  --videos DIR   ``DIR/<id>.mp4`` generated videos, uint8 RGB, any resolution.
  --pose DIR     ``DIR/<id>/pose.json`` driving keypoints (``wanjax.pose.keypoints``
                 format), i.e. a split directory written by
                 ``wanjax.data.synthetic.make_dataset``. If ``DIR/<id>/meta.json`` exists
                 its marker palette is used, else the default palette.
  --gt DIR       optional ground truth: ``DIR/<id>.mp4`` or ``DIR/<id>/gt.mp4`` (so the
                 dataset split directory works for both --pose and --gt).

Per video: PCK@alpha (person-bbox normaliser, see ``wanjax.metrics.pose.pck``) and mean
keypoint error (normalised and px) of the colour-key markers read from the video
against the driving pose (only markers that are measurable in a correct rendering,
``marker_visibility``), marker detection rate, flicker, warping error (flow from GT when
given, else from the video), and with GT: flicker ratio, PSNR, SSIM (luma).
Writes ``<out>.json`` and ``<out>.md`` (per-video rows + mean) atomically; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

METRIC_COLUMNS = ("pck", "kp_err", "kp_err_px", "detected", "flicker", "flicker_ratio", "warp_err", "psnr", "ssim")


class EvaluationInputError(Exception):
    """Bad or missing evaluation input; the message names the file and the flag."""


def read_driving(pose_json: Path, meta_json: Path) -> tuple[np.ndarray, Any]:
    """The driving keypoints ``body`` [T, 20, 3] of ``pose_json`` and the marker palette of
    ``meta_json`` (the default palette when that file does not exist)."""
    from wanjax.data.synthetic import DEFAULT_PALETTE, MarkerPalette
    from wanjax.pose.keypoints import load_keypoints

    body = np.asarray(load_keypoints(pose_json).body)
    palette = (MarkerPalette.from_json(json.loads(Path(meta_json).read_text())["palette"])
               if Path(meta_json).is_file() else DEFAULT_PALETTE)
    return body, palette


def _find_gt(gt_dir: Path, vid: str) -> Path:
    for cand in (gt_dir / f"{vid}.mp4", gt_dir / vid / "gt.mp4"):
        if cand.is_file():
            return cand
    raise EvaluationInputError(f"--gt {gt_dir}: no ground truth for id {vid!r} "
                               f"(looked for {gt_dir / f'{vid}.mp4'} and {gt_dir / vid / 'gt.mp4'})")


def evaluate_one(video: np.ndarray, body: np.ndarray, gt: np.ndarray | None, palette: Any,
                 alpha: float = 0.1) -> dict[str, float]:
    """Metrics of one video.

    video: uint8 [T, H, W, 3]; body: driving keypoints [T, 20, 3] (normalised);
    gt: uint8 [T, H, W, 3] or None; palette: ``MarkerPalette``. Returns a flat dict with
    the keys of ``METRIC_COLUMNS`` (GT-only metrics are nan without GT).
    """
    from wanjax.data.synthetic import marker_visibility
    from wanjax.metrics.pose import estimate_pose_colorkey, keypoint_error, marker_keypoints, pck
    from wanjax.metrics.video import flicker, flicker_ratio, psnr, ssim, warping_error

    T, H, W, _ = video.shape
    pred = estimate_pose_colorkey(video, palette)
    gtk = marker_keypoints(body, palette)
    vis = marker_visibility(body, H, W, palette)
    ke = keypoint_error(pred, gtk, vis, width=W, height=H)
    nan = float("nan")
    out = {"pck": pck(pred, gtk, vis, alpha=alpha, ref="bbox", width=W, height=H), "kp_err": ke["l2"],
           "kp_err_px": ke["l2_px"], "detected": ke["detected"], "flicker": flicker(video),
           "flicker_ratio": nan, "warp_err": warping_error(video, gt), "psnr": nan, "ssim": nan}
    if gt is not None:
        out.update(flicker_ratio=flicker_ratio(video, gt), psnr=psnr(video, gt), ssim=ssim(video, gt))
    return out


def evaluate(videos_dir: str | os.PathLike, pose_dir: str | os.PathLike, gt_dir: str | os.PathLike | None = None,
             alpha: float = 0.1, progress: bool = True) -> dict[str, Any]:
    """Evaluate every ``videos_dir/*.mp4``; see the module docstring for the layout.
    Returns {"config": ..., "videos": [{"id": ..., <metrics>}], "mean": {<metrics>}}."""
    from wanjax.data.synthetic import read_video

    vdir, pdir = Path(videos_dir), Path(pose_dir)
    gdir = Path(gt_dir) if gt_dir is not None else None
    for flag, d in (("--videos", vdir), ("--pose", pdir), ("--gt", gdir)):
        if d is not None and not d.is_dir():
            raise EvaluationInputError(f"{flag} {d}: directory does not exist")
    ids = sorted(p.stem for p in vdir.glob("*.mp4"))
    if not ids:
        raise EvaluationInputError(f"--videos {vdir}: no <id>.mp4 files found")
    # Check all inputs up front so a long run does not fail at the last video.
    for vid in ids:
        if not (pdir / vid / "pose.json").is_file():
            raise EvaluationInputError(f"--pose {pdir}: missing keypoints {pdir / vid / 'pose.json'} for video "
                                       f"{vdir / (vid + '.mp4')}")
        if gdir is not None:
            _find_gt(gdir, vid)
    it = ids
    if progress:
        from tqdm import tqdm

        it = tqdm(ids, desc="evaluate", file=sys.stderr)
    rows = []
    for vid in it:
        video = read_video(vdir / f"{vid}.mp4")
        body, palette = read_driving(pdir / vid / "pose.json", pdir / vid / "meta.json")
        if body.shape[0] != video.shape[0]:
            raise EvaluationInputError(f"{vdir / (vid + '.mp4')} has {video.shape[0]} frames but "
                                       f"{pdir / vid / 'pose.json'} has {body.shape[0]}; generate the full clip")
        gt = None
        if gdir is not None:
            gpath = _find_gt(gdir, vid)
            gt = read_video(gpath)
            if gt.shape != video.shape:
                raise EvaluationInputError(f"{gpath} has shape {gt.shape} but {vdir / (vid + '.mp4')} has "
                                           f"{video.shape}; evaluate at the ground-truth resolution and length")
        rows.append({"id": vid, **evaluate_one(video, body, gt, palette, alpha)})
    mean = {}
    for k in METRIC_COLUMNS:
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
    return {"config": {"videos": str(vdir), "pose": str(pdir), "gt": str(gdir) if gdir else None, "alpha": alpha,
                       "pck_ref": "bbox", "n": len(rows)}, "videos": rows, "mean": mean}


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.4g}"


def to_markdown(report: dict[str, Any]) -> str:
    """Markdown table: one row per video, then the mean row."""
    c = report["config"]
    head = (f"# Evaluation\n\nvideos `{c['videos']}`, pose `{c['pose']}`, gt `{c['gt']}`; "
            f"PCK@{c['alpha']} (bbox normaliser), n = {c['n']}\n\n")
    lines = ["| id | " + " | ".join(METRIC_COLUMNS) + " |", "|---" * (len(METRIC_COLUMNS) + 1) + "|"]
    for r in report["videos"]:
        lines.append(f"| {r['id']} | " + " | ".join(_fmt(r[k]) for k in METRIC_COLUMNS) + " |")
    lines.append("| **mean** | " + " | ".join(_fmt(report["mean"][k]) for k in METRIC_COLUMNS) + " |")
    return head + "\n".join(lines) + "\n"


def _json_safe(x: Any) -> Any:
    """nan / inf -> None / "inf" so the JSON is standard (RFC 8259)."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<out>.json`` and ``<out>.md`` atomically; returns both paths."""
    out = Path(out)
    pj, pm = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    _atomic_write(pj, json.dumps(_json_safe(report), indent=1, allow_nan=False))
    _atomic_write(pm, to_markdown(report))
    return pj, pm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infer.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--videos", required=True, help="directory of <id>.mp4 generated videos")
    ap.add_argument("--pose", required=True, help="directory with <id>/pose.json (dataset split dir)")
    ap.add_argument("--gt", default=None, help="optional ground truth: <id>.mp4 or <id>/gt.mp4")
    ap.add_argument("--out", default="report", help="output prefix: writes <out>.json and <out>.md")
    ap.add_argument("--alpha", type=float, default=0.1, help="PCK threshold as a fraction of the person bbox")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        report = evaluate(a.videos, a.pose, a.gt, a.alpha, progress=not a.no_progress)
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pj, pm = write_report(report, a.out)
    m = report["mean"]
    print(f"wrote {pj} and {pm}: PCK@{a.alpha} {_fmt(m['pck'])}, kp_err_px {_fmt(m['kp_err_px'])}, "
          f"PSNR {_fmt(m['psnr'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
