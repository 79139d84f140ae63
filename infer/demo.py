"""`make demo`: the whole student path on the CPU, end to end, on the bundled synthetic world.

What it does today: renders a synthetic pose-driven sample (wanjax.data.synthetic), builds TINY
RANDOM-WEIGHT checkpoints through the real converters/savers, and runs `infer.generate` with the
streaming student preset, writing out/demo/demo.mp4 + its JSON sidecar. The weights are untrained,
so the video is noise-like: the trained tiny student that makes a real pose-driven video is the
"world we can check" issue (not done yet). This demo proves the install and the pipeline mechanics.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> int:
    out = Path("out/demo")
    out.mkdir(parents=True, exist_ok=True)
    # the tiny fixtures live with the tests; they build random checkpoints through the real code
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_pipeline import make_tiny_ckpt, pose_frames, ref_image

    ck = out / "student"
    if not (ck / "text.npz").exists():
        make_tiny_ckpt(ck, teacher=False)
    Image.fromarray(ref_image()).save(out / "ref.png")
    pose_dir = out / "pose"
    pose_dir.mkdir(exist_ok=True)
    for i, f in enumerate(pose_frames(21)):
        Image.fromarray(f).save(pose_dir / f"{i}.png")
    Image.fromarray(pose_frames(1, 9)[0]).save(pose_dir / "pose.png")
    from infer import generate
    rc = generate.main(["--config", "configs/infer.py:tiny_student", f"--config.ckpt_dir={ck}",
                        f"--config.prompt_embeds_path={ck / 'text.npz'}", "--ref", str(out / "ref.png"),
                        "--pose", str(pose_dir), "--out", str(out / "demo.mp4")])
    if rc == 0:
        print(f"wrote {out / 'demo.mp4'} (untrained tiny random weights; see infer/demo.py)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
