"""`make demo`: a pose-driven video from the bundled default model, on the CPU, in well under 3 minutes.

The bundle (``assets/default``, see :mod:`wanjax.world.bundle`) is the synthetic world's distilled
4-step causal student and its VAE, trained by ``python -m train.world --config configs/world.py:full``
(``docs/RESULTS.md``). The demo drives it with the bundle's held-out example (a reference image and
21 pose frames it never saw in training) through the same code path as any user's run:

    python -m infer.generate <bundle config> --ref assets/default/example/ref.png \
        --pose assets/default/example/pose --out out/demo/demo.mp4

then measures that the video follows its driving pose (PCK@0.1 and keypoint error of the colour-keyed
markers against the example's keypoints, ``wanjax.metrics``), and writes ``out/demo/strip.png``
(pose drawings above the generated frames, every 4th frame, 2x) and ``out/demo/metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

STRIP_STEP = 4  # every 4th frame in the strip


def follow_metrics(video: np.ndarray, example: dict[str, Path], alpha: float = 0.1) -> dict[str, float]:
    """PCK / keypoint error of ``video`` (uint8 [T, H, W, 3]) against the example's driving keypoints."""
    from infer.evaluate import evaluate_one, read_driving

    body, palette = read_driving(example["keypoints"], example["meta"])
    if body.shape[0] != video.shape[0]:
        raise ValueError(f"the video has {video.shape[0]} frames, {example['keypoints']} has {body.shape[0]}")
    m = evaluate_one(video, body, None, palette, alpha)
    return {k: float(m[k]) for k in ("pck", "kp_err_px", "detected", "flicker")}


def write_strip(path: Path, pose_frames: np.ndarray, video: np.ndarray, step: int = STRIP_STEP) -> Path:
    """Two rows: the driving pose drawings and the generated frames, every ``step``-th frame."""
    from PIL import Image

    idx = np.arange(0, video.shape[0], step)
    rows = [np.concatenate(list(a[idx]), axis=1) for a in (pose_frames, video)]
    img = np.concatenate(rows, axis=0).astype(np.uint8).repeat(2, axis=0).repeat(2, axis=1)  # 2x, nearest
    tmp = path.with_name(path.stem + ".partial.png")
    Image.fromarray(img).save(tmp)
    tmp.replace(path)
    return path


def run(out_dir: str | Path = "out/demo", root: str | Path | None = None, progress: bool = True) -> dict:
    from infer import generate
    from wanjax.data.synthetic import read_video
    from wanjax.pipeline import read_pose_frames
    from wanjax.world.bundle import DEFAULT_ROOT, example_paths, infer_config, read_world

    root = Path(root) if root is not None else DEFAULT_ROOT
    read_world(root)  # a clear error if the bundle is missing or malformed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = infer_config(root)
    ex = example_paths(root)
    t0 = time.perf_counter()
    res = generate.run(cfg, ref=str(ex["ref"]), pose=str(ex["pose"]), out=str(out / "demo.mp4"), progress=progress)
    seconds = time.perf_counter() - t0
    video = read_video(res["out"])
    pose = read_pose_frames(str(ex["pose"]), int(cfg.height), int(cfg.width), int(cfg.num_frames))
    metrics = follow_metrics(video, ex)
    strip = write_strip(out / "strip.png", pose, video)
    summary = {"video": str(res["out"]), "sidecar": str(res["sidecar"]), "strip": str(strip),
               "frames": int(video.shape[0]), "seconds": seconds, "follows_pose": metrics}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infer.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/demo", help="output folder (demo.mp4, its .json sidecar, strip.png)")
    ap.add_argument("--bundle", default=None, help="bundle root (default: assets/default)")
    args = ap.parse_args(argv)
    try:
        s = run(args.out, args.bundle)
    except Exception as e:  # noqa: BLE001 - one clear line for the user, the cause in the message
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    m = s["follows_pose"]
    print(f"wrote {s['video']} ({s['frames']} frames in {s['seconds']:.1f} s, sidecar {s['sidecar']}) and "
          f"{s['strip']}; follows its pose: PCK@0.1 {m['pck']:.3f}, keypoint error {m['kp_err_px']:.2f} px",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
