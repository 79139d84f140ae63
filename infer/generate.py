"""Generate a pose-driven video (teacher or student) and write it progressively.

    python -m infer.generate --config configs/infer.py:NAME --ref IMG --pose PATH --out OUT.mp4 \
        [--prompt TEXT] [--seed N] [--num_frames N] [--ref_pose IMG] [--config.a.b=VALUE ...]

NAME: teacher_14b, student_1_3b, tiny, tiny_student (configs/infer.py). ``--config.x.y=v`` overrides
any config field (typed like the field). Writes ``OUT.mp4`` (through ``OUT.partial.mp4``, renamed on
success; deleted on any error) and the sidecar ``OUT.json`` (config, seed, per-block timings,
first-frame latency, peak memory, frame count). The progress bar goes to stderr. Errors print one
``error: ...`` line naming the file/flag and exit with status 2.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

import wanjax  # noqa: F401


class UsageError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# --config handling (no absl flag globals, so main() can run many times in one process)
# ----------------------------------------------------------------------------------------------
def load_config(spec: str):
    if ":" not in spec:
        raise UsageError(f"--config {spec!r}: expected FILE.py:NAME, e.g. configs/infer.py:tiny")
    path, name = spec.rsplit(":", 1)
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {spec}: no such file {p}")
    mod_spec = importlib.util.spec_from_file_location(f"_wanjax_cfg_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    try:
        return mod.get_config(name)
    except ValueError as e:
        raise UsageError(f"--config {spec}: {e}") from None


def _convert(old, text: str, key: str):
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"--config.{key}={text}: expected true/false")
    if isinstance(old, (int, float, str)) or old is None:
        try:
            return type(old)(text) if old is not None else text
        except ValueError:
            raise UsageError(f"--config.{key}={text}: expected a {type(old).__name__}") from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UsageError(f"--config.{key}={text}: expected a Python literal like {old!r}") from None


def apply_override(cfg, key: str, text: str) -> None:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        if p not in node:
            raise UsageError(f"--config.{key}: unknown field {p!r}; known: {sorted(node.keys())}")
        node = node[p]
    last = parts[-1]
    if last not in node:
        raise UsageError(f"--config.{key}: unknown field {last!r}; known: {sorted(node.keys())}")
    old = node[last]
    new = _convert(old, text, key)
    with cfg.unlocked() if hasattr(cfg, "unlocked") else _null():
        node[last] = new


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def split_config_args(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    spec, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            if "=" in a:
                spec = a.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise UsageError("--config needs FILE.py:NAME")
                spec = argv[i + 1]
                i += 1
        elif a.startswith("--config."):
            body = a[len("--config."):]
            if "=" in body:
                k, v = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise UsageError(f"{a} needs a value")
                k, v = body, argv[i + 1]
                i += 1
            overrides.append((k, v))
        else:
            rest.append(a)
        i += 1
    return spec, overrides, rest


def build_parser(prog: str, pose_help: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="reference image")
    ap.add_argument("--pose", required=True, help=pose_help)
    ap.add_argument("--out", required=True, help="output .mp4 (sidecar .json next to it)")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--num_frames", type=int, default=None)
    ap.add_argument("--ref_pose", default=None, help="reference pose drawing (default: pose.jpg in --pose dir)")
    ap.add_argument("--no_progress", action="store_true")
    return ap


def parse(argv, prog="python -m infer.generate", pose_help="pose video or frame folder"):
    spec, overrides, rest = split_config_args(list(argv))
    if spec is None:
        raise UsageError("--config FILE.py:NAME is required (e.g. configs/infer.py:tiny)")
    cfg = load_config(spec)
    for k, v in overrides:
        apply_override(cfg, k, v)
    args = build_parser(prog, pose_help).parse_args(rest)
    with cfg.unlocked() if hasattr(cfg, "unlocked") else _null():
        if args.prompt is not None:
            cfg.prompt = args.prompt
        if args.seed is not None:
            cfg.seed = args.seed
        if args.num_frames is not None:
            cfg.num_frames = args.num_frames
        if args.ref_pose is not None:
            cfg.ref_pose = args.ref_pose
    return cfg, args


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def run(cfg, ref: str, pose: str, out: str, *, progress: bool = True,
        pose_iter: Iterable | None = None, on_block: Callable[[dict], None] | None = None) -> dict:
    """Load, generate, write ``out`` + sidecar. ``pose_iter`` (student only) streams pose frames
    (uint8 [H, W, 3] at the config size); then ``pose`` is only used to find the reference pose."""
    import jax
    from tqdm import tqdm

    from wanjax import pipeline as P
    from wanjax.videoio import VideoWriter, VideoWriteError, peak_memory_bytes, write_sidecar

    t_start = time.perf_counter()
    outp = Path(out)
    if outp.suffix.lower() != ".mp4":
        raise UsageError(f"--out {out}: must end in .mp4")
    H, W = int(cfg.height), int(cfg.width)
    student = cfg.pipeline == "student"
    if cfg.pipeline not in ("teacher", "student"):
        raise UsageError(f"--config.pipeline={cfg.pipeline!r}: teacher or student")
    num_frames = int(cfg.num_frames) if cfg.num_frames else None
    if num_frames is not None:
        P.latent_frames(num_frames)
    # inputs first: bad files fail before any model is loaded
    ref_img = P.read_reference(ref, H, W)
    if pose_iter is None:
        frames = P.read_pose_frames(pose, H, W, num_frames, pad_last=cfg.pose.pad_last, start=cfg.pose.start)
        first_pose = frames[0]
    else:
        frames = None
        it = iter(pose_iter)
        first_pose = np.asarray(next(it))
        import itertools
        pose_iter = itertools.chain([first_pose], it)
    ref_pose = P.find_ref_pose(pose if pose_iter is None or Path(pose).is_dir() else None,
                               cfg.ref_pose, H, W, first_pose)

    mesh = None if student else P.make_mesh(cfg)
    # T5 first, freed before the DiT is loaded
    from wanjax.checkpoint import read_config
    dit_dir = P.resolve_dir(cfg, "model_dir", "dit")
    dit_raw = P._read(dit_dir, "dit")
    need_neg = (not student) and float(cfg.sampler.cfg_scale) != 1.0
    ctx, neg = P.encode_prompts(cfg, dit_raw.get("text_len", 512), dit_raw["text_dim"], need_negative=need_neg,
                                mesh=mesh)
    dit = P.load_dit(cfg, mesh)
    pose_model = P.load_pose(cfg, mesh) if cfg.conditioning.mode != "image" else None
    model = P.PoseDiT(dit, pose_model)
    P.check_mode(cfg.conditioning.mode, model)
    vae = P.load_vae(cfg, mesh)
    clip = P.load_clip(cfg, mesh) if model.uses_clip and cfg.conditioning.mode != "pose" else None
    reference = P.make_reference(model, cfg.conditioning.mode, vae=vae, clip=clip, ref_image_u8=ref_img,
                                 ref_pose=ref_pose, y_frames=int(cfg.conditioning.y_frames))
    del clip
    t_loaded = time.perf_counter()
    block_timings: list[dict] = []
    first_latency = None
    n_frames = 0
    extra = {}
    with VideoWriter(outp, fps=cfg.fps) as writer:
        if student:
            from wanjax.pipeline.student import StudentPipeline
            pipe = StudentPipeline(model, vae, shift=cfg.sampler.shift, steps=tuple(cfg.sampler.student_steps),
                                   mode=cfg.conditioning.mode)
            total = None if num_frames is None else P.latent_frames(num_frames) // dit.cfg.num_frame_per_block
            bar = tqdm(total=total, desc="blocks", file=sys.stderr, disable=not progress)
            src = frames if pose_iter is None else pose_iter
            for b, fr, tm in pipe.stream(ctx, src, reference=reference, num_frames=num_frames, seed=cfg.seed,
                                         size=(H, W)):
                writer.append(fr)
                n_frames += fr.shape[0]
                if first_latency is None:
                    first_latency = time.perf_counter() - t_start
                block_timings.append(tm)
                bar.update(1)
                if on_block is not None:
                    on_block(tm)
            bar.close()
        else:
            from wanjax.pipeline.teacher import TeacherPipeline
            pipe = TeacherPipeline(model, vae, sampler=cfg.sampler.name, steps=cfg.sampler.steps,
                                   shift=cfg.sampler.shift, cfg_scale=cfg.sampler.cfg_scale,
                                   window=cfg.window.size, overlap=cfg.window.overlap, mesh=mesh,
                                   mode=cfg.conditioning.mode)
            bar = tqdm(total=int(cfg.sampler.steps), desc="steps", file=sys.stderr, disable=not progress)
            res = pipe.sample(ctx, neg, frames, reference=reference, num_frames=num_frames, seed=cfg.seed,
                              size=(H, W), progress=lambda i, n: bar.update(1))
            bar.close()
            extra = {"windows": res["windows"], "step_s": res["step_s"], "denoise_s": res["denoise_s"]}
            for i, fr, tm in pipe.decode_stream(res["latents"]):
                writer.append(fr)
                n_frames += fr.shape[0]
                if first_latency is None:
                    first_latency = time.perf_counter() - t_start
                block_timings.append(tm)
    side = write_sidecar(outp, config=cfg.to_dict(), seed=cfg.seed, block_timings=block_timings,
                         first_frame_latency_s=first_latency, peak_memory_bytes=peak_memory_bytes(),
                         frame_count=n_frames, load_s=t_loaded - t_start,
                         total_s=time.perf_counter() - t_start, device=str(jax.devices()[0]), **extra)
    return {"out": outp, "sidecar": side, "frames": n_frames, "block_timings": block_timings}


def error_types():
    from wanjax.checkpoint import CheckpointError
    from wanjax.pipeline import PipelineError
    from wanjax.pose.video import VideoError
    from wanjax.text import TextEncoderError
    from wanjax.videoio import VideoWriteError
    return (UsageError, PipelineError, CheckpointError, VideoError, VideoWriteError, TextEncoderError,
            FileNotFoundError)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, args = parse(argv)
        res = run(cfg, args.ref, args.pose, args.out, progress=not args.no_progress)
    except error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['out']} ({res['frames']} frames) and {res['sidecar']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
