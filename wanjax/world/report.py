"""The world's report: ``RESULTS.md``, the strip image and loss-curve PNGs (PIL only; no matplotlib).

* :func:`strip_png` - rows of frames (pose | ground truth | teacher | student) with row labels.
* :func:`curve_png` - one or more loss curves (x = step) on a linear or log10 y axis.
* :func:`results_markdown` - the Markdown report from the world's summary dict.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def strip_png(path: str | Path, rows: Sequence[tuple[str, np.ndarray]], frames: Sequence[int], scale: int = 2,
              label_w: int = 96) -> Path:
    """Save a grid: one row per ``(label, video uint8 [T, H, W, 3])``, one column per frame index of
    ``frames``, each frame upscaled ``scale`` times (nearest), labels on the left."""
    from PIL import Image, ImageDraw

    H, W = rows[0][1].shape[1:3]
    h, w, gap = H * scale, W * scale, 2
    img = Image.new("RGB", (label_w + len(frames) * (w + gap), len(rows) * (h + gap) + 16), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font()
    for c, f in enumerate(frames):
        draw.text((label_w + c * (w + gap) + 2, 2), f"frame {f}", fill=(0, 0, 0), font=font)
    for r, (label, video) in enumerate(rows):
        y0 = 16 + r * (h + gap)
        draw.text((4, y0 + h // 2 - 6), label, fill=(0, 0, 0), font=font)
        for c, f in enumerate(frames):
            tile = Image.fromarray(np.asarray(video[f], np.uint8)).resize((w, h), Image.NEAREST)
            img.paste(tile, (label_w + c * (w + gap), y0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """log10 positions of 1-2-5 ticks between the log10 values lo and hi (fewer when crowded)."""
    for mults in ((1, 2, 5), (1,)):
        ticks = [math.log10(m) + e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mults
                 if lo <= math.log10(m) + e <= hi]
        if len(ticks) <= 8:
            break
    return ticks if len(ticks) >= 2 else _nice_ticks(lo, hi)


def curve_png(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str,
              ylabel: str = "loss", log_y: bool = True, size: tuple[int, int] = (640, 360)) -> Path:
    """Save a line plot of ``series`` ``{name: (steps, values)}`` (non-finite values dropped)."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 64, 16, 28, 40
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font()
    clean = {}
    for name, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y)) and (not log_y or y > 0)]
        if pts:
            clean[name] = pts
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    if not clean:
        draw.text((left, H // 2), "no data", fill=(0, 0, 0), font=font)
        img.save(path)
        return Path(path)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [fy(y) for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom)  # noqa: E731
    draw.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for t in (_log_ticks(y0, y1) if log_y else _nice_ticks(y0, y1)):
        yy = py(t)
        draw.line([left - 3, yy, left, yy], fill=(0, 0, 0))
        draw.line([left, yy, W - right, yy], fill=(230, 230, 230))
        draw.text((4, yy - 6), f"{10 ** t:.3g}" if log_y else f"{t:.3g}", fill=(0, 0, 0), font=font)
    for t in _nice_ticks(x0, x1):
        xx = px(t)
        draw.line([xx, H - bottom, xx, H - bottom + 3], fill=(0, 0, 0))
        draw.text((xx - 10, H - bottom + 6), f"{t:g}", fill=(0, 0, 0), font=font)
    draw.text((W // 2 - 12, H - 14), "step", fill=(0, 0, 0), font=font)
    draw.text((4, top - 16), ylabel + (" (log)" if log_y else ""), fill=(0, 0, 0), font=font)
    for k, (name, pts) in enumerate(clean.items()):
        col = PALETTE[k % len(PALETTE)]
        line = [(px(x), py(fy(y))) for x, y in pts]
        if len(line) > 1:
            draw.line(line, fill=col, width=2)
        else:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=col)
        draw.text((W - right - 150, top + 6 + 14 * k), name, fill=col, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window >= 1)."""
    out, acc = [], []
    for v in values:
        acc.append(float(v))
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}g}"


def _cached_note(s: Mapping[str, Any]) -> list[str]:
    """A sentence for the stages this command found already trained (a split or resumed run)."""
    cached = [n for n, st in s["stages"].items() if str(st.get("status", "")).startswith("cached (")]
    if not cached:
        return []
    return [f"Stages {', '.join(cached)} were trained by earlier commands on the same `--config.work_dir` "
            "(`python -m train.vae` / `python -m train.teacher` with the same config, or an interrupted "
            "`train.world`) and reused here; their steps, train times and losses in the training table are "
            "those of that training. The total wall time below counts only this command.", ""]


def results_markdown(s: Mapping[str, Any]) -> str:
    """``docs/RESULTS.md`` from the summary written by ``train.world`` (see its keys below)."""
    cfg = s["config"]
    m = s["metrics"]["mean"]
    speed = s["summary"]["speed"]
    checks = s["summary"]["checks"]
    cached_note = _cached_note(s)
    lines = [f"# Results: the synthetic world (`{cfg['name']}` preset)", "",
             "A world whose ground truth we know (issue 7): procedural pose-driven videos "
             "(`wanjax.data.synthetic`), a tiny Wan VAE and a tiny pose + reference teacher trained from scratch, "
             "distilled into a 4-step block-causal student, all with the project's own code. Everything below "
             + ("was produced by this command, with the reused stages noted after it:" if cached_note
                else "was produced by one command:"), "", "```bash", s["command"], "```", "",
             *cached_note,
             f"Device: {s['device']}. Total wall time: {s['total_s']:.0f} s. Seeds: data {cfg['data']['seed']} "
             f"(train split `train`, held-out split `val`, per-sample seeds "
             f"`wanjax.data.synthetic.sample_seed(seed, split, i)`), model init {cfg['seed']}, evaluation noise "
             f"{cfg['eval']['seed']} + clip index.", "",
             "![pose | ground truth | teacher | student](img/strip.png)", "",
             "Rows: driving pose (UniAnimate drawing), ground truth, teacher "
             f"({cfg['sample']['teacher_steps']} Euler steps, CFG {cfg['sample']['cfg_scale']}), student "
             f"({len(cfg['sample']['student_steps'])} steps, causal, KV cache); one held-out clip.", "",
             "## Held-out clips", "",
             f"{s['metrics']['n']} held-out clips of {cfg['data']['num_frames']} frames at "
             f"{cfg['data']['height']}x{cfg['data']['width']}. PCK@{cfg['eval']['alpha']} with the person-box "
             "normaliser and keypoint error come from the colour-keyed marker estimator "
             "(`wanjax.metrics.pose.estimate_pose_colorkey`) on the generated frames against the driving "
             "keypoints; flicker is the mean squared frame difference, its ratio is to the ground truth's; "
             "warping error uses the flow of the ground truth. Means over clips:", ""]
    cols = [("pck", "PCK"), ("kp_err_px", "kp err (px)"), ("detected", "detected"), ("flicker", "flicker"),
            ("flicker_ratio", "flicker / GT"), ("warp_err", "warp err"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM")]
    lines.append("| | " + " | ".join(c for _, c in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for name in ("gt", "teacher", "student"):
        if name not in m:
            continue
        label = {"gt": "ground truth", "teacher": "teacher", "student": "student"}[name]
        lines.append(f"| {label} | " + " | ".join(_fmt(m[name].get(k)) for k, _ in cols) + " |")
    vc = s.get("vae_check")
    if vc:
        lines += ["", f"The VAE alone (decode(encode(ground truth)), the ceiling of any generator in its latent "
                      f"space): PCK {_fmt(vc['pck'])}, keypoint error {_fmt(vc['kp_err_px'])} px, PSNR "
                      f"{_fmt(vc['psnr'])} dB, SSIM {_fmt(vc['ssim'])}."]
    smp = cfg["sample"]
    lines += ["", "## Speed per clip", "",
              "Median seconds per clip over the timed clips (after one warm-up clip that compiles), both models in "
              "the same process on the same device. *generate* = conditioning to final latents (pose encoding, text "
              f"K/V and every DiT forward: teacher {smp['teacher_steps']} Euler steps with CFG "
              f"{smp['cfg_scale']} (pose / no-pose pair as one batch of 2), student {len(smp['student_steps'])} "
              "steps per causal block plus the KV-cache pass); *+ decode* adds the streaming VAE decode, the same "
              "VAE work for both.", "",
              "| device | teacher generate | student generate | speedup | teacher + decode | student + decode "
              "| speedup | clips timed |", "|---|---|---|---|---|---|---|---|"]
    for dev, sp in speed.items():
        t, st = sp["teacher"], sp["student"]
        lines.append(f"| {dev} | {_fmt(t['gen_s'])} | {_fmt(st['gen_s'])} | {_fmt(t['gen_s'] / st['gen_s'], 3)}x "
                     f"| {_fmt(t['e2e_s'])} | {_fmt(st['e2e_s'])} | {_fmt(t['e2e_s'] / st['e2e_s'], 3)}x "
                     f"| {st['clips_timed']} |")
    lines += ["", "The speed check is made on the CPU when it was timed: it is the device the bundled default "
              "is made for, and there both models are compute-bound. On a GPU models this small are bound by "
              "kernel-launch latency (each forward is a few milliseconds of launches whatever its FLOPs), so "
              "the GPU ratio mostly counts sequential forwards.", "", "## Acceptance (issue 7)", "",
              "| check | value | target | ok |", "|---|---|---|---|"]
    for k, c in checks.items():
        lines.append(f"| {k} | {_fmt(c['value'])} | {c['target']} | {_fmt(c['ok'])} |")
    lines += ["", "## Training", "", "| stage | steps | train time (s) | stage time (s) | status | final loss |",
              "|---|---|---|---|---|---|"]
    for name, st in s["stages"].items():
        if st.get("status") == "running":
            continue
        lines.append(f"| {name} | {_fmt(st.get('steps'))} | {_fmt(st.get('train_s'), 3)} "
                     f"| {_fmt(st.get('seconds'), 3)} | {st.get('status', '')} | {_fmt(st.get('final_loss'))} |")
    lines += [""]
    for name in s.get("curves", []):
        lines += [f"![{name} loss](img/loss_{name}.png)", ""]
    lines += ["## Models", ""]
    for k, v in s["models"].items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## Reproduce", "", "```bash", s["command"],
              "# recompute the metrics of the saved videos with the evaluation CLI:",
              f"python -m infer.evaluate --videos <work_dir>/eval/student --pose <work_dir>/heldout/val "
              f"--gt <work_dir>/heldout/val --out student_report", "```", ""]
    return "\n".join(lines)
