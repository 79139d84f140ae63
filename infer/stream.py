"""Interactive student generation from a pose-frame folder that is still being written.

    python -m infer.stream --config configs/infer.py:student_1_3b --ref IMG --pose DIR --out OUT.mp4 \
        [--num_frames N] [--config.stream.timeout_s=30] [--config.stream.poll_s=0.1]

Pose frames (``0.png, 1.png, ...`` in numeric order, ``pose.*`` = reference pose) are picked up as
they appear; a frame is taken once it decodes and its size has not changed between two polls. The
stream ends at ``num_frames`` (``--num_frames`` / config; 0 = unbounded, needs a rolling cache), when a
file named ``END`` appears in the folder, or after ``stream.timeout_s`` seconds without a new frame.
A block starts as soon as its 12 pose frames plus the pose encoder's 4-frame lookahead exist, and
each block's latency is printed as it is written.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

import wanjax  # noqa: F401
from infer.generate import error_types, parse, run


def poll_frames(directory, height: int, width: int, *, poll_s: float = 0.1, timeout_s: float = 30.0,
                max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 [height, width, 3] frames from ``directory`` as they are written."""
    from PIL import Image

    from wanjax.pose.video import list_frame_files, resize_frames

    d = Path(directory)
    if not d.is_dir():
        from wanjax.pipeline import PipelineError
        raise PipelineError(f"--pose {d}: not a directory (infer.stream reads a folder of pose frames)")
    done = 0
    sizes: dict[Path, int] = {}
    last_new = time.monotonic()
    while max_frames is None or done < max_frames:
        files = list_frame_files(d)
        progressed = False
        while done < len(files) and (max_frames is None or done < max_frames):
            f = files[done]
            size = f.stat().st_size
            if sizes.get(f) != size:  # still growing (or first sight): look again next poll
                sizes[f] = size
                break
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"))
            except OSError:
                break
            yield resize_frames(a[None], height, width)[0]
            done += 1
            progressed = True
            last_new = time.monotonic()
        if (d / "END").exists() and done >= len(list_frame_files(d)):
            return
        if not progressed:
            if time.monotonic() - last_new > timeout_s:
                return
            time.sleep(poll_s)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, args = parse(argv, prog="python -m infer.stream", pose_help="folder of pose frames being written")
        with cfg.unlocked():
            cfg.pipeline = "student"
        n = int(cfg.num_frames) if cfg.num_frames else None
        frames = poll_frames(args.pose, cfg.height, cfg.width, poll_s=cfg.stream.poll_s,
                             timeout_s=cfg.stream.timeout_s, max_frames=n)

        def report(tm):
            print(f"block {tm['block']}: {tm['frames']} frames, latency {tm['block_s'] * 1e3:.0f} ms "
                  f"(waiting for pose {tm['pose_wait_s'] * 1e3:.0f} ms, denoise {tm['denoise_s'] * 1e3:.0f} ms, "
                  f"decode {tm['decode_s'] * 1e3:.0f} ms), since start {tm['since_start_s']:.2f} s", flush=True)

        res = run(cfg, args.ref, args.pose, args.out, progress=False, pose_iter=frames, on_block=report)
    except error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['out']} ({res['frames']} frames) and {res['sidecar']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
