"""Teacher vs student on the held-out clips: generation through the project's pipelines, timing and
the ``wanjax.metrics`` numbers.

Generation. Both models are loaded from inference roots with the pipeline loaders
(``wanjax.pipeline.load_dit`` / ``load_pose`` / ``load_vae`` on the config of
:func:`wanjax.world.bundle.infer_config`), conditioned exactly as ``infer.generate`` conditions them
(``y`` = mask + VAE latents of ``[ref, grey, ...]`` + the model's reference-pose features; no CLIP),
and sampled with :class:`wanjax.pipeline.teacher.TeacherPipeline` (Euler, ``sample.teacher_steps``,
UniAnimate's asymmetric CFG ``sample.cfg_scale``) and :class:`wanjax.pipeline.student.StudentPipeline`
(4 steps, block-causal with the KV cache). Each clip has its own seed (``eval.seed + index``).

Timing ("per clip", same device, same process): the time from the conditioning to the final latents
(``TeacherPipeline.sample`` / ``StudentPipeline.generate(decode=False)``: pose encoding, text K/V,
every DiT forward), measured after a first untimed warm-up clip (compilation), median over the
timed clips. The VAE decode is the same for both models (one shared ``StreamingDecoder``) and is
reported separately; ``e2e`` = generation + decode.

Metrics: :func:`infer.evaluate.evaluate_one` per clip (colour-key PCK@alpha with the person-box
normaliser, keypoint error, detection rate, flicker, flicker ratio to the ground truth, warping
error, PSNR, SSIM), computed in worker processes, on the raw uint8 frames (no lossy video codec in
between). The videos are also written losslessly (``libx264rgb``, crf 0) so that
``python -m infer.evaluate --videos <eval>/student --pose <heldout> --gt <heldout>`` reproduces
the numbers.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("teacher", "student")


def load_model(root: str | Path, pipeline: str, conv_impl: str | None = None, mesh=None):
    """(pipeline PoseDiT adapter, VAE, infer config) of an inference root, placed on ``mesh``
    (default: the first default device). ``conv_impl`` of the VAE: None = "fold" when the mesh is
    on the CPU (XLA:CPU's 3-D convolution is ~4x slower: 96x96, 21 frames, 2 cores: 3.9 -> 1.1 s
    per decode), else "3d" (much faster to compile; tiny models on a GPU are launch-bound)."""
    if conv_impl is None:
        import jax

        dev = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        conv_impl = "fold" if dev.platform == "cpu" else "3d"
    from wanjax import pipeline as P
    from wanjax.models.vae import set_conv_impl
    from wanjax.world.bundle import infer_config

    cfg = infer_config(root, pipeline)
    dit = P.load_dit(cfg, mesh)
    model = P.PoseDiT(dit, P.load_pose(cfg, mesh))
    vae = set_conv_impl(P.load_vae(cfg, mesh), conv_impl)  # plain 3-D convs: much faster to compile
    return model, vae, cfg


def cpu_mesh():
    """A one-device mesh on the host CPU, or None when JAX has no CPU backend (JAX_PLATFORMS=cuda)."""
    import jax

    from wanjax.sharding import make_mesh

    try:
        return make_mesh(devices=jax.devices("cpu")[:1])
    except RuntimeError:
        return None


def references(model, vae, clips, num_latent: int):
    """``wanjax.pipeline.Reference`` per clip: y = mask + reference latents + this model's
    reference-pose features (``make_reference``'s ``pose+image`` branch, batched over the clips)."""
    import jax.numpy as jnp

    from wanjax.pipeline import Reference
    from wanjax.world.data import reference_y

    ys = reference_y(vae, clips.ref, num_latent)
    out = []
    for i in range(len(clips)):
        feat = model.ref_pose_features(clips.ref_pose[i][None].astype(np.float32) / 255.0)
        y = jnp.asarray(ys[i:i + 1]) + feat[:, None]
        out.append(Reference(y.astype(model.cfg.compute_dtype), None))
    return out


def generate(roots: dict[str, Path], clips, cfg, out_dir: Path | None = None, progress: bool = True,
             mesh=None) -> dict[str, Any]:
    """Generate every clip with each model of ``roots`` (``{"teacher": root, "student": root}``), on
    ``mesh``'s device (default: the default device).
    Returns ``{name: {"frames": uint8 [N, T, H, W, 3], "gen_s": [N], "decode_s": [N]}}``."""
    import contextlib

    import jax

    with (jax.default_device(mesh.devices.flat[0]) if mesh is not None else contextlib.nullcontext()):
        return _generate(roots, clips, cfg, out_dir, progress, mesh)


def _generate(roots, clips, cfg, out_dir, progress, mesh) -> dict[str, Any]:
    import jax
    from flax import nnx

    from wanjax.models.vae import StreamingDecoder
    from wanjax.pipeline.student import StudentPipeline
    from wanjax.pipeline.teacher import TeacherPipeline
    from wanjax.videoio import to_uint8
    from wanjax.world.data import latent_frames, stand_in_context

    T = int(cfg.data.num_frames)
    F = latent_frames(T)
    ctx = stand_in_context(cfg.text)[None]
    s = cfg.sample
    results: dict[str, Any] = {}
    dec = None
    for name, root in roots.items():
        model, vae, _ = load_model(root, name, mesh=mesh)
        refs = references(model, vae, clips, F)
        if name == "teacher":
            pipe = TeacherPipeline(model, vae, sampler=str(s.sampler), steps=int(s.teacher_steps),
                                   shift=float(s.teacher_shift), cfg_scale=float(s.cfg_scale), window=F, overlap=0)

            def run(i):
                return pipe.sample(ctx, ctx, clips.pose[i], reference=refs[i], num_frames=T,
                                   seed=int(cfg.eval.seed) + i)["latents"]
        else:
            pipe = StudentPipeline(model, vae, shift=float(s.student_shift), steps=tuple(s.student_steps))

            def run(i):
                return pipe.generate(ctx, clips.pose[i], reference=refs[i], num_frames=T,
                                     seed=int(cfg.eval.seed) + i, decode=False)["latents"]
        if dec is None:
            dec = StreamingDecoder(vae)
        else:  # same VAE graph: reuse the compiled decoder with this model's VAE weights
            dec.state = nnx.split(vae)[1]
        nfb = int(s.num_frame_per_block)
        frames, gen_s, dec_s = [], [], []
        for i in range(len(clips)):
            t0 = time.perf_counter()
            lat = jax.block_until_ready(run(i))
            t1 = time.perf_counter()
            dec.reset()
            parts = [jax.device_get(dec.push(lat[:, b:b + nfb])) for b in range(0, F, nfb)]
            video = to_uint8(np.concatenate(parts, axis=1)[0])
            t2 = time.perf_counter()
            frames.append(video)
            gen_s.append(t1 - t0)
            dec_s.append(t2 - t1)
            if progress:
                where = "" if mesh is None else f" on {mesh.devices.flat[0].platform}"
                print(f"[world] eval {name} clip {i + 1}/{len(clips)}{where}: {t1 - t0:.3f} s generate, "
                      f"{t2 - t1:.3f} s decode", flush=True)
        results[name] = {"frames": np.stack(frames), "gen_s": gen_s, "decode_s": dec_s}
        if out_dir is not None:
            from wanjax.data.synthetic import write_video

            d = Path(out_dir) / name
            d.mkdir(parents=True, exist_ok=True)
            for i, v in enumerate(results[name]["frames"]):
                write_video(d / f"{i:06d}.mp4", v, fps=float(cfg.data.fps), lossless=True)
    return results


def _metrics_job(args):
    from infer.evaluate import evaluate_one
    from wanjax.data.synthetic import DEFAULT_PALETTE

    video, body, gt, alpha = args
    return evaluate_one(video, body, gt, DEFAULT_PALETTE, alpha)


def metrics(videos: dict[str, np.ndarray], clips, alpha: float = 0.1, workers: int = 1) -> dict[str, Any]:
    """Per-clip metrics for every entry of ``videos`` (``{"gt": ..., "teacher": ..., ...}``, uint8
    [N, T, H, W, 3]) against the clips' driving poses and ground truth; means per entry."""
    from infer.evaluate import METRIC_COLUMNS
    from wanjax.world.data import default_workers

    jobs, keys = [], []
    for name, v in videos.items():
        for i in range(len(clips)):
            jobs.append((v[i], clips.body[i], clips.video[i], alpha))
            keys.append((name, i))
    workers = min(default_workers(workers), len(jobs))
    if workers <= 1:
        rows = [_metrics_job(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(_metrics_job, jobs, chunksize=1)
    per: dict[str, list] = {name: [None] * len(clips) for name in videos}
    for (name, i), r in zip(keys, rows):
        per[name][i] = r
    mean = {}
    for name, rs in per.items():
        mean[name] = {}
        for k in METRIC_COLUMNS:
            vals = [r[k] for r in rs if not (isinstance(r[k], float) and (math.isnan(r[k]) or math.isinf(r[k])))]
            mean[name][k] = float(np.mean(vals)) if vals else float("nan")
    return {"per_clip": per, "mean": mean}


def speed(gen: dict[str, Any], timing_clips: int) -> dict[str, Any]:
    """Median per-clip times over the timed clips (the first clip, which compiles, excluded)."""
    out = {}
    for name, r in gen.items():
        g = np.asarray(r["gen_s"][1:] or r["gen_s"])[:max(1, timing_clips)]
        d = np.asarray(r["decode_s"][1:] or r["decode_s"])[:max(1, timing_clips)]
        out[name] = {"gen_s": float(np.median(g)), "decode_s": float(np.median(d)),
                     "e2e_s": float(np.median(g + d)), "clips_timed": int(len(g))}
    return out


def summarize(met: dict[str, Any], speeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The acceptance checks of issue 7. ``speeds``: ``{device label: speed(...)}``; the speed check
    is made on the CPU when it was timed (the device the bundled default is made for; tiny models
    on an accelerator are bound by kernel-launch latency, not by their FLOPs), else on the only
    device timed; every device's ratios are reported."""
    m = met["mean"]
    t, s, gt = m.get("teacher", {}), m.get("student", {}), m.get("gt", {})
    checks = {}
    if t and s:
        ratio = s["pck"] / t["pck"] if t["pck"] else float("nan")
        checks["student_pck_ge_0.9x_teacher"] = {"value": ratio, "target": ">= 0.9", "ok": bool(ratio >= 0.9)}
        checks["teacher_pck_ge_0.8"] = {"value": t["pck"], "target": ">= 0.8", "ok": bool(t["pck"] >= 0.8)}
        if gt:
            fr = s["flicker"] / gt["flicker"] if gt["flicker"] else float("nan")
            checks["student_flicker_le_1.2x_gt"] = {"value": fr, "target": "<= 1.2", "ok": bool(fr <= 1.2)}
        judge = "cpu" if "cpu" in speeds else next(iter(speeds))
        for dev, sp in speeds.items():
            r = sp["teacher"]["gen_s"] / sp["student"]["gen_s"]
            checks[f"student_ge_10x_faster ({dev})"] = {"value": r, "target": ">= 10" if dev == judge else "(reported)",
                                                       "ok": bool(r >= 10) if dev == judge else None}
            checks[f"speedup incl. VAE decode ({dev})"] = {
                "value": sp["teacher"]["e2e_s"] / sp["student"]["e2e_s"], "target": "(reported)", "ok": None}
    return {"speed": speeds, "checks": checks}
