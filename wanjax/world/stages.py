"""The stages of ``python -m train.world`` (and of ``train.vae`` / ``train.teacher``).

Every training stage is resumable: it returns at once when its output exists
(``--config.redo=STAGE`` deletes the outputs of a stage and of all later ones), and its wall time and
status go to ``<out_dir>/world.json``; the export, evaluation and report always run. Outputs:

``<work_dir>/`` (large intermediates; ``work_dir`` defaults to ``<out_dir>/work``)
    data/train.npz, data/val.npz   rendered clips (``wanjax.world.data.Clips``)
    heldout/val/<id>/              the held-out clips on disk for ``python -m infer.evaluate``:
                                   pose.json (driving keypoints), meta.json (palette), gt.mp4 (lossless)
    vae/                           trained VAE (config.json with the measured latent statistics + params/)
    vae_run/, teacher_run/, student_run/   metrics.jsonl and Orbax training checkpoints (resume)
    latents.npz                    x0 latents and ref_y of the training clips
    teacher/, student/             inference roots (dit/ pose/ vae -> ../vae, text.npz, world.json)
    targets/                       teacher targets (``wanjax.data.targets`` shards + index)
    eval/teacher/, eval/student/   held-out generations, lossless mp4, named like the held-out ids
``<out_dir>/`` (what goes back into the repository)
    docs/RESULTS.md, docs/img/strip.png, docs/img/loss_*.png
    assets/default/                the bundled default (``wanjax.world.bundle``)
    world.json                     stage timings, metrics, acceptance checks, config
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from wanjax.world import data as D

log = logging.getLogger("wanjax.world")


# ----------------------------------------------------------------------------------------------
# Run bookkeeping
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Paths:
    out: Path
    work: Path

    def __getattr__(self, name: str) -> Path:
        work = {"data": "data", "heldout": "heldout/val", "vae": "vae", "vae_run": "vae_run", "latents": "latents.npz",
                "teacher": "teacher", "teacher_run": "teacher_run", "targets": "targets", "student": "student",
                "student_run": "student_run", "eval": "eval"}
        out = {"docs": "docs", "img": "docs/img", "bundle": "assets/default", "world_json": "world.json"}
        if name in work:
            return self.work / work[name]
        if name in out:
            return self.out / out[name]
        raise AttributeError(name)


def paths(cfg) -> Paths:
    out = Path(cfg.out_dir).absolute()
    work = Path(cfg.work_dir).absolute() if cfg.get("work_dir") else out / "work"
    return Paths(out, work)


class Run:
    """A world run: config, paths, per-stage records (written to ``world.json`` after every stage)."""

    def __init__(self, cfg, command: str = ""):
        self.cfg = cfg
        self.p = paths(cfg)
        self.command = command
        self.stages: dict[str, dict] = {}
        self.extra: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.p.out.mkdir(parents=True, exist_ok=True)
        self.p.work.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        rec: dict[str, Any] = {"status": "running"}
        self.stages[name] = rec
        t = time.perf_counter()
        print(f"[world] stage {name} ...", flush=True)
        try:
            yield rec
        except BaseException:
            rec["status"] = "failed"
            rec["seconds"] = time.perf_counter() - t
            self.save()
            raise
        rec["seconds"] = time.perf_counter() - t
        if rec["status"] == "running":
            rec["status"] = "done"
        print(f"[world] stage {name}: {rec['status']} in {rec['seconds']:.1f} s", flush=True)
        self.save()

    def save(self) -> None:
        from wanjax.videoio import write_json_atomic

        write_json_atomic(self.p.world_json, {"command": self.command, "config": self.cfg.to_dict(),
                                              "stages": self.stages, "elapsed_s": time.perf_counter() - self.t0,
                                              "paths": {"out": str(self.p.out), "work": str(self.p.work)},
                                              **self.extra})


# stage -> its outputs (under work_dir); a stage is redone when its outputs are gone
STAGE_OUTPUTS = (("data", ("data", "heldout")), ("vae", ("vae", "vae_run", "latents.npz")),
                 ("teacher", ("teacher", "teacher_run")), ("targets", ("targets",)),
                 ("distill", ("student_init", "student", "student_run", "student_dmd", "dmd_run")))


def apply_redo(run: Run) -> list[Path]:
    """``--config.redo=STAGE`` (data | vae | teacher | targets | distill): delete the outputs of that
    stage and of every later one, so that they are recomputed (the export, evaluation and report
    always run). Returns the deleted paths."""
    import shutil

    name = str(run.cfg.get("redo", "") or "")
    if not name:
        return []
    names = [n for n, _ in STAGE_OUTPUTS]
    if name not in names:
        raise ValueError(f"--config.redo={name!r}: choose one of {names}")
    gone = []
    for n, outs in STAGE_OUTPUTS[names.index(name):]:
        for o in outs:
            path = run.p.work / o
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            gone.append(path)
    log.info("redo %s: removed %s", name, ", ".join(str(g) for g in gone) or "nothing")
    return gone


def parse_args(argv: list[str], prog: str):
    """``--config FILE.py:NAME`` plus ``--config.a.b=VALUE`` overrides (the parser of infer.generate)."""
    from infer.generate import UsageError, apply_override, load_config, split_config_args

    spec, overrides, rest = split_config_args(list(argv))
    if rest:
        raise UsageError(f"{prog}: unexpected arguments {rest}; use --config.FIELD=VALUE")
    if spec is None:
        raise UsageError(f"{prog}: --config configs/world.py:NAME is required (NAME: ci or full)")
    cfg = load_config(spec)
    for k, v in overrides:
        apply_override(cfg, k, v)
    return cfg


def setup_jax(cfg) -> None:
    """Persistent compilation cache under ``<out_dir>/jax_cache`` (a rerun skips recompiling)."""
    import jax

    if cfg.jax_cache:
        d = paths(cfg).work / "jax_cache"
        d.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(d))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def stage_cli(argv: list[str], prog: str, body) -> int:
    """The shell of the single-stage CLIs (``train.vae``, ``train.teacher``): logging to stderr, the
    config, the compilation cache, a :class:`Run`, then ``body(run) -> message`` printed on success.
    A preemption (SIGTERM) exits 0 after its save; a usage or input error prints ``error: ...`` and
    exits 2."""
    from infer.generate import UsageError
    from wanjax.world.fit import Preempted

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("wanjax").setLevel(logging.INFO)
    try:
        cfg = parse_args(argv, prog)
        setup_jax(cfg)
        message = body(Run(cfg, " ".join([prog] + argv)))
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 0
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(message, file=sys.stderr)
    return 0


def world_info(cfg, num_layers: int | None = None) -> dict[str, Any]:
    """The sizes and sampler settings an inference config needs (``wanjax.world.bundle``);
    ``num_layers``: the DiT depth of the root (default: the student's)."""
    s = cfg.sample
    return {"format": "wanjax-world-bundle-v1", "preset": cfg.name, "height": int(cfg.data.height),
            "width": int(cfg.data.width), "num_frames": int(cfg.data.num_frames), "fps": float(cfg.data.fps),
            "latent_frames": D.latent_frames(int(cfg.data.num_frames)),
            "num_frame_per_block": int(s.num_frame_per_block), "prompt": "a person is dancing",
            "dit": {"dim": int(cfg.teacher.dim), "num_layers": int(num_layers or cfg.student.num_layers)},
            "sampler": {"sampler": str(s.sampler), "teacher_steps": int(s.teacher_steps),
                        "teacher_shift": float(s.teacher_shift), "cfg_scale": float(s.cfg_scale),
                        "student_steps": [int(t) for t in s.student_steps], "student_shift": float(s.student_shift)},
            "text": {"tokens": int(cfg.text.tokens), "dim": int(cfg.text.dim), "seed": int(cfg.text.seed)}}


def _history(res) -> dict[str, Any]:
    h = res.history
    loss_key = next((k for k in (h[-1] if h else {}) if k.endswith("/loss")), None)
    return {"steps": res.steps, "train_s": res.train_seconds, "status": res.status,
            "final_loss": h[-1][loss_key] if loss_key else None,
            "first_loss": h[0][loss_key] if loss_key else None}


# A training stage's record (steps, train time, losses, status) is stored next to its output, so that a
# later run that finds the output (a resumed or split run: train.vae, then train.teacher, then
# train.world) still reports how it was trained.
STAGE_RECORD = "stage.json"
_RECORD_KEYS = ("steps", "train_s", "status", "first_loss", "final_loss", "samples")


def save_stage_record(out_dir: Path, rec: dict[str, Any]) -> None:
    from wanjax.videoio import write_json_atomic

    write_json_atomic(Path(out_dir) / STAGE_RECORD, {k: rec[k] for k in _RECORD_KEYS if k in rec})


def mark_cached(rec: dict[str, Any], out_dir: Path) -> None:
    """``rec`` of a stage whose output exists: status ``cached (<how it was trained>)`` plus the
    training record saved with the output (if any)."""
    path = Path(out_dir) / STAGE_RECORD
    saved = json.loads(path.read_text()) if path.is_file() else {}
    rec.update({k: v for k, v in saved.items() if k != "status"})
    rec["status"] = f"cached ({saved['status']})" if saved.get("status") else "cached"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _heldout_job(args):
    from wanjax.data.synthetic import DEFAULT_PALETTE, write_video
    from wanjax.pose.keypoints import PoseSequence, invisible_hands, save_keypoints

    d, video, body, seed, family, fps = args
    d = Path(d)
    tmp = d.with_name(f".{d.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    T, H, W = video.shape[:3]
    save_keypoints(tmp / "pose.json", PoseSequence(body, invisible_hands(T), W, H))
    (tmp / "meta.json").write_text(json.dumps({"seed": int(seed), "family": family, "height": H, "width": W,
                                               "num_frames": T, "palette": DEFAULT_PALETTE.to_json()}))
    write_video(tmp / "gt.mp4", video, fps=fps, lossless=True)
    tmp.rename(d)


def write_heldout(clips: D.Clips, root: Path, fps: float, workers: int = 1) -> Path:
    """The held-out clips as ``root/<id>/{pose.json, meta.json, gt.mp4}`` (ids ``000000`` ...), the
    layout ``python -m infer.evaluate --pose root --gt root`` reads."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"{i:06d}"), clips.video[i], clips.body[i], int(clips.seeds[i]), clips.families[i], fps)
            for i in range(len(clips)) if not (root / f"{i:06d}").is_dir()]
    workers = min(D.default_workers(workers), max(1, len(jobs)))
    if workers <= 1:
        for j in jobs:
            _heldout_job(j)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_heldout_job, jobs, chunksize=1)
    return root


def _cached_clips(path: Path, make) -> D.Clips:
    if path.is_file():
        return D.Clips.load(path)
    clips = make()
    clips.save(path)
    return clips


def stage_data(run: Run) -> tuple[D.Clips, D.Clips]:
    cfg, p = run.cfg, run.p
    with run.stage("data") as rec:
        w = int(cfg.data.workers)
        train = _cached_clips(p.data / "train.npz", lambda: D.render_split(
            cfg.data, "train", int(cfg.data.n_train), workers=w, progress=True))
        val = _cached_clips(p.data / "val.npz",
                            lambda: D.render_split(cfg.data, "val", int(cfg.data.n_val), workers=w))
        write_heldout(val, p.heldout, float(cfg.data.fps), workers=w)
        rec.update(n_train=len(train), n_val=len(val), families=sorted(set(train.families)))
    return train, val


# ----------------------------------------------------------------------------------------------
# VAE and latents
# ----------------------------------------------------------------------------------------------
def vae_loss_fn(vcfg):
    from wanjax.world.losses import vae_loss

    return functools.partial(vae_loss, clip_frames=int(vcfg.clip_frames), crop=int(vcfg.crop) or None,
                             noise_frac=float(vcfg.noise_frac),
                             marker_weight=float(vcfg.marker_weight), l2_weight=float(vcfg.l2_weight),
                             mu_weight=float(vcfg.mu_weight))


def stage_vae(run: Run, clips: D.Clips):
    """Train the VAE (or load the finished one). Returns the VAE with its latent statistics."""
    import jax.numpy as jnp

    from wanjax.checkpoint import save_model
    from wanjax.models.vae import load_vae, set_conv_impl
    from wanjax.world import models as M
    from wanjax.world.fit import fit

    cfg, p = run.cfg, run.p
    v = cfg.vae
    with run.stage("vae") as rec:
        if (p.vae / "config.json").is_file():
            mark_cached(rec, p.vae)
            return set_conv_impl(load_vae(p.vae, dtype=jnp.float32), str(v.conv_impl))
        vae = M.build_vae(v, int(cfg.seed))
        res = fit(vae, vae_loss_fn(v), D.ArrayDataset({"video": clips.video}), name="vae", opt=v, batch=int(v.batch),
                  steps=int(v.steps), max_seconds=float(v.max_seconds), seed=int(cfg.seed), log_every=int(v.log_every),
                  workdir=p.vae_run)
        rec.update(_history(res))
        raw = D.encode_videos(M.with_latent_stats(res.model, np.zeros(16), np.ones(16), conv_impl=str(v.conv_impl)),
                              clips.video)
        mean, std = D.channel_stats(raw)
        vae = M.with_latent_stats(res.model, mean, std, conv_impl=str(v.conv_impl))
        save_model(vae, p.vae, {"model": "vae", **vae.cfg.to_dict(), "world": {"preset": cfg.name, **rec}},
                   overwrite=True)
        save_stage_record(p.vae, rec)
        run.extra["_x0"] = ((raw - mean) / std).astype(np.float32)
        rec["latent_std_raw"] = [float(s) for s in std]
        return vae


def stage_vae_check(run: Run, vae, val: D.Clips) -> dict[str, float]:
    """The VAE's ceiling: colour-key PCK and PSNR of decode(encode(ground truth)) on the held-out
    clips. A generator cannot follow the pose better than its VAE reproduces the markers."""
    from wanjax.videoio import to_uint8
    from wanjax.world import compare

    cfg = run.cfg
    with run.stage("vae_check") as rec:
        n = min(int(cfg.eval.n), len(val))
        clips = val.subset(np.arange(n))
        rec_videos = to_uint8(D.roundtrip_videos(vae, clips.video, batch=min(4, n)))
        met = compare.metrics({"vae": rec_videos}, clips, float(cfg.eval.alpha), int(cfg.eval.workers))
        m = met["mean"]["vae"]
        rec.update(pck=m["pck"], psnr=m["psnr"], ssim=m["ssim"], kp_err_px=m["kp_err_px"], n=n)
        run.extra["vae_check"] = {k: rec[k] for k in ("pck", "psnr", "ssim", "kp_err_px", "n")}
        return run.extra["vae_check"]


def stage_latents(run: Run, vae, clips: D.Clips) -> tuple[np.ndarray, np.ndarray]:
    """x0 latents and ref_y of the training clips (cached in latents.npz)."""
    p = run.p
    with run.stage("latents") as rec:
        if p.latents.is_file():
            rec["status"] = "cached"
            with np.load(p.latents) as z:
                return z["x0"], z["ref_y"]
        F = D.latent_frames(int(run.cfg.data.num_frames))
        x0 = run.extra.pop("_x0", None)
        if x0 is None:
            x0 = D.encode_videos(vae, clips.video)
        ref_y = D.reference_y(vae, clips.ref, F)
        tmp = p.latents.with_name(".latents.tmp.npz")
        np.savez(tmp, x0=x0, ref_y=ref_y)
        tmp.replace(p.latents)
        rec.update(x0_std=float(x0.std()), x0_mean=float(x0.mean()))
        return x0, ref_y


# ----------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------
def finish_root(run: Run, model, root: Path, provenance: dict) -> Path:
    """Export ``model`` as an inference root next to the world's VAE and text embedding."""
    from wanjax.training import export_inference

    export_inference(model, root, provenance=provenance, link_from=run.p.work)
    return complete_root(run, root, model.cfg.dit.num_layers)


def complete_root(run: Run, root: Path, num_layers: int) -> Path:
    """Add ``text.npz`` (the stand-in prompt, negative = prompt) and ``world.json`` to an exported
    root, so that ``wanjax.world.bundle.infer_config(root)`` points the inference CLI at it."""
    from wanjax.videoio import write_json_atomic

    ctx = D.stand_in_context(run.cfg.text)
    np.savez(root / "text.npz", prompt=ctx, negative=ctx)
    write_json_atomic(root / "world.json", world_info(run.cfg, num_layers))
    return root


def teacher_model(cfg):
    """The teacher to train: a fresh PoseDiT, or ``teacher.init`` (an inference root with dit/ +
    pose/, e.g. a previous run's teacher) to fine-tune; then the checkpoint's architecture wins."""
    import dataclasses as dc

    from wanjax.world import models as M

    t = cfg.teacher
    if not t.init:
        return M.build_pose_dit(M.pose_dit_config(cfg), int(cfg.seed))
    pcfg = M.read_pose_dit_config(t.init)
    want = M.pose_dit_config(cfg)
    diff = [f"{k}: checkpoint {getattr(pcfg.dit, k)}, config {getattr(want.dit, k)}"
            for k in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "text_len")
            if getattr(pcfg.dit, k) != getattr(want.dit, k)]
    if diff:
        log.warning("teacher.init=%s: the checkpoint's architecture is used (%s)", t.init, "; ".join(diff))
    pcfg = pcfg.replace(dit=dc.replace(pcfg.dit, dtype=want.dit.dtype, param_dtype="float32",
                                       attention=want.dit.attention),
                        pose=dc.replace(pcfg.pose, remat=False))
    return M.load_pose_dit(t.init, pcfg)


def stage_teacher(run: Run, clips: D.Clips, x0: np.ndarray, ref_y: np.ndarray) -> Path:
    from wanjax.sampling import FlowMatchGrid
    from wanjax.world.fit import fit
    from wanjax.world.losses import teacher_flow_loss

    cfg, p = run.cfg, run.p
    t = cfg.teacher
    with run.stage("teacher") as rec:
        if (p.teacher / "dit" / "config.json").is_file():
            mark_cached(rec, p.teacher)
            return p.teacher
        model = teacher_model(cfg)
        loss = functools.partial(teacher_flow_loss, grid=FlowMatchGrid(shift=float(t.shift)),
                                 pose_drop=float(t.pose_drop), image_drop=float(t.image_drop))
        data = D.teacher_dataset(clips, x0, ref_y, D.stand_in_context(cfg.text))
        res = fit(model, loss, data, name="teacher", opt=t, batch=int(t.batch), steps=int(t.steps),
                  max_seconds=float(t.max_seconds), seed=int(cfg.seed), ema_decay=float(t.ema_decay) or None,
                  log_every=int(t.log_every), workdir=p.teacher_run)
        rec.update(_history(res))
        finish_root(run, res.ema_model or res.model, p.teacher,
                    {"stage": "teacher", "preset": cfg.name, "init": t.init or "scratch", **_history(res)})
        save_stage_record(p.teacher, rec)
        return p.teacher


# ----------------------------------------------------------------------------------------------
# Teacher targets and distillation
# ----------------------------------------------------------------------------------------------
def stage_targets(run: Run, teacher_root: Path, clips: D.Clips) -> Path:
    """The teacher's trajectories at the student's sigmas for the first ``targets.n`` training clips,
    with the distillation library (``wanjax.distill.targets.TeacherTargets`` + ``TargetWriter``).
    Thin adapter: the inputs are the world's in-memory clips, so no manifest is written and read."""
    from wanjax import sampling
    from wanjax.data.manifest import ManifestRow, RowInputs
    from wanjax.data.targets import TargetWriter, shard_name
    from wanjax.distill.targets import Item, TeacherTargets
    from wanjax.sharding import make_mesh
    from wanjax.world.compare import load_model

    import jax

    cfg, p = run.cfg, run.p
    s = cfg.sample
    with run.stage("targets") as rec:
        n = min(int(cfg.targets.n), len(clips))
        bs = max(1, min(int(cfg.targets.batch), n))
        groups = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        writer = TargetWriter(p.targets)
        todo = [g for g in range(len(groups)) if shard_name(g) not in writer.done_shards()]
        if not todo:
            rec["status"] = "cached"
            writer.close()
            return p.targets
        model, vae, _ = load_model(teacher_root, "teacher")
        ctx = D.stand_in_context(cfg.text)
        T, H, W = int(cfg.data.num_frames), int(cfg.data.height), int(cfg.data.width)
        gen = TeacherTargets(model, vae, None, mesh=make_mesh(devices=jax.devices()[:1]), negative=ctx, num_frames=T,
                             height=H, width=W, mode="pose+image", sampler=str(s.sampler), steps=int(s.teacher_steps),
                             shift=float(s.teacher_shift), cfg_scale=float(s.cfg_scale),
                             student_sigmas=sampling.student_schedule(float(s.student_shift),
                                                                      tuple(s.student_steps))[1], batch_size=bs)
        t0 = time.perf_counter()
        for g in todo:
            items = []
            for i in groups[g]:
                sid = f"{i:06d}"
                seed = int(cfg.targets.seed) * 100_003 + i
                row = ManifestRow(index=i, line=i + 1, id=sid, ref=p.data / "train.npz", pose=p.data / "train.npz",
                                  prompt="", seed=seed)
                inputs = RowInputs(row, clips.ref[i], clips.pose[i], clips.ref_pose[i].astype(np.float32) / 255.0,
                                   "ref_pose")
                items.append(Item(inputs, ctx, seed))
            for it, arrays in zip(items, gen.run(items)):
                writer.add(it.inputs.row.id, arrays, {"id": it.inputs.row.id, "seed": it.seed,
                                                      "family": clips.families[it.inputs.row.index]})
            writer.flush(shard=g)
            print(f"[world] targets: shard {g + 1}/{len(groups)} ({time.perf_counter() - t0:.1f} s)", flush=True)
        writer.close()
        rec.update(samples=n, seconds_sampling=time.perf_counter() - t0)
        return p.targets


def register_presets(cfg) -> tuple[str, str]:
    """Thin adapter: ``wanjax.distill.objectives`` builds its models from named PoseDiT presets
    (``wanjax.models.unianimate.PRESETS``), so the world's teacher and student sizes are registered
    there under ``world_<name>_teacher`` / ``world_<name>_student``."""
    from wanjax.models import unianimate as ua
    from wanjax.world import models as M

    names = (f"world_{cfg.name}_teacher", f"world_{cfg.name}_student")
    ua.PRESETS[names[0]] = M.pose_dit_config(cfg)
    ua.PRESETS[names[1]] = M.pose_dit_config(cfg, causal=True)
    return names


def distill_config(run: Run, objective: str, init_root: Path, workdir: Path, export_dir: Path, teacher_root: Path,
                   targets_dir: Path):
    """A ``configs/distill.py`` config (``python -m train.distill``'s) for one of the world's
    distillation stages."""
    from configs.distill import get_config

    cfg = run.cfg
    sec = cfg.distill.ode if objective == "ode" else cfg.distill.dmd
    t_name, s_name = register_presets(cfg)
    c = get_config("tiny")
    c.preset = f"world_{cfg.name}"
    c.objective = objective
    c.workdir = str(workdir)
    c.seed = int(cfg.seed) + (1 if objective == "ode" else 2)
    c.total_steps = int(sec.steps)
    c.batch_size = int(sec.batch)
    c.log_every = int(sec.log_every)
    c.ckpt_every = 0
    c.master_dtype = "float32"
    c.compute_dtype = str(cfg.teacher.dtype)
    c.attention = str(cfg.teacher.attention)
    c.remat = False
    c.data.update(dir=str(targets_dir), seed=int(cfg.seed), verify=False,
                  negative_embeds_path=str(teacher_root / "text.npz"))
    c.student.update(preset=s_name, init=str(init_root), num_frame_per_block=int(cfg.sample.num_frame_per_block),
                     max_frames=D.latent_frames(int(cfg.data.num_frames)))
    c.teacher.update(preset=t_name, ckpt_dir=str(teacher_root), dtype=str(cfg.teacher.dtype))
    c.optim.update(lr=float(sec.lr), b1=float(sec.b1), b2=float(sec.b2), weight_decay=float(sec.weight_decay),
                   max_grad_norm=float(sec.grad_clip), warmup_steps=int(sec.warmup))
    c.ema.update(decay=float(sec.ema_decay), start_step=int(sec.get("ema_start", 0)))
    c.ode.update(pose_drop=float(cfg.teacher.pose_drop), image_drop=float(cfg.teacher.image_drop))
    if objective == "dmd":
        d = cfg.distill.dmd
        c.dmd.update(gen_update_ratio=int(d.gen_update_ratio), lr_generator=float(d.lr), lr_critic=float(d.lr_critic),
                     b1=float(d.b1), b2=float(d.b2), guidance_scale=float(cfg.sample.cfg_scale) - 1.0,
                     shift=float(cfg.sample.student_shift), score_shift=float(cfg.sample.teacher_shift),
                     steps=tuple(int(t) for t in cfg.sample.student_steps))
    c.val.every = 0
    c.export.update(enabled=True, dir=str(export_dir), link_from=str(run.p.work))
    return c


def _distill(run: Run, name: str, objective: str, init_root: Path, teacher_root: Path, targets_dir: Path,
             workdir: Path, export_dir: Path) -> Path:
    """One distillation stage through ``wanjax.distill.objectives.run`` (the library of
    ``python -m train.distill``), with the world's time budget as the loop's stop guard; a run the
    budget stops is exported here (``objectives.run`` exports finished runs only)."""
    from flax import nnx

    import jax

    from wanjax.data.targets import TargetReader
    from wanjax.distill import objectives
    from wanjax.models import unianimate as ua
    from wanjax.sharding import make_mesh
    from wanjax.training import export_inference
    from wanjax.world.fit import Preempted, TimeBudget

    cfg = run.cfg
    sec = cfg.distill.ode if objective == "ode" else cfg.distill.dmd
    dcfg = distill_config(run, objective, init_root, workdir, export_dir, teacher_root, targets_dir)
    reader = TargetReader(targets_dir, verify=False)
    budget = TimeBudget(float(sec.max_seconds))
    first = {}

    def on_step(step_done, metrics):
        if not first:
            jax.block_until_ready(metrics)
            first["done"] = step_done
            budget.start()

    budget.install()
    try:
        res = objectives.run(dcfg, reader, on_step=on_step, guard=budget,
                             mesh=make_mesh(devices=jax.devices()[:1]))
    finally:
        budget.uninstall()
    if budget.inner.requested:
        raise Preempted(f"{name}: stopped by SIGTERM at step {int(jax.device_get(res.state.step))}; the checkpoint "
                        f"is saved in {workdir}; rerun the same command to resume")
    status = "time_budget" if (res.status == "preempted" and budget.timed_out) else res.status
    if res.status != "done":
        ms = res.state.models["student"]
        params = ms.ema if ms.ema is not None else ms.params
        model = nnx.eval_shape(lambda: ua.PoseDiT(objectives.student_config(dcfg), rngs=nnx.Rngs(0)))
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(model, state)
        export_inference(model, export_dir, provenance={"stage": name, "status": status,
                                                        "step": int(jax.device_get(res.state.step))},
                         link_from=run.p.work)
    complete_root(run, export_dir, int(cfg.student.num_layers))
    h = res.history
    key = next((k for k in (h[-1] if h else {}) if k.endswith("/loss")), None)
    run.stages[name].update(steps=int(jax.device_get(res.state.step)), train_s=budget.elapsed, status=status,
                            first_loss=h[0][key] if key else None, final_loss=h[-1][key] if key else None,
                            samples=len(reader))
    save_stage_record(export_dir, run.stages[name])
    return export_dir


def stage_ode(run: Run, teacher_root: Path, targets_dir: Path) -> Path:
    """ODE regression of the causal student on the teacher targets (``objective=ode`` of
    ``train.distill``), starting from the teacher's weights (``student.num_layers`` of its blocks)."""
    from wanjax.world import models as M

    cfg, p = run.cfg, run.p
    with run.stage("distill_ode") as rec:
        if (p.student / "dit" / "config.json").is_file():
            mark_cached(rec, p.student)
            return p.student
        init = p.work / "student_init"
        teacher_layers = M.read_pose_dit_config(teacher_root).dit.num_layers
        rec["layers_from_teacher"] = M.student_layers(teacher_layers, int(cfg.student.num_layers))
        if not (init / "dit" / "config.json").is_file():
            student = M.student_from_teacher(M.load_pose_dit(teacher_root), M.pose_dit_config(cfg, causal=True))
            finish_root(run, student, init, {"stage": "student_init", "teacher": str(teacher_root),
                                             "layers": rec["layers_from_teacher"]})
        return _distill(run, "distill_ode", "ode", init, teacher_root, targets_dir, p.student_run, p.student)


def stage_dmd(run: Run, student_root: Path, teacher_root: Path, targets_dir: Path) -> Path:
    """Self-Forcing DMD (``objective=dmd`` of ``train.distill``) from the ODE student, the teacher
    as the real score (its CFG), a critic starting from the ODE student. Optional
    (``distill.dmd.enabled``); the bundle then ships this student."""
    p = run.p
    out = p.work / "student_dmd"
    with run.stage("distill_dmd") as rec:
        if (out / "dit" / "config.json").is_file():
            mark_cached(rec, out)
            return out
        return _distill(run, "distill_dmd", "dmd", student_root, teacher_root, targets_dir, p.work / "dmd_run", out)


# ----------------------------------------------------------------------------------------------
# Evaluation, report, export
# ----------------------------------------------------------------------------------------------
def example_of(clips: D.Clips, i: int = 0) -> dict[str, Any]:
    from wanjax.data.synthetic import DEFAULT_PALETTE

    return {"ref": clips.ref[i], "pose_frames": clips.pose[i], "ref_pose_frame": clips.ref_pose[i],
            "body": clips.body[i], "meta": {"seed": int(clips.seeds[i]), "family": clips.families[i],
                                            "palette": DEFAULT_PALETTE.to_json(), "split": "val", "index": i}}


def stage_export(run: Run, student_root: Path, val: D.Clips) -> Path:
    """Write the bundle (``wanjax.world.bundle``): the student and the VAE stored in ``export.dtype``,
    the text stand-in, held-out clip 0 as the example. The evaluation then runs on this bundle."""
    from wanjax.world.bundle import dir_bytes, write_bundle

    cfg, p = run.cfg, run.p
    with run.stage("export") as rec:
        info = {**world_info(cfg), "provenance": {"command": run.command, "preset": cfg.name}}
        write_bundle(p.bundle, student_root=student_root, vae_dir=p.vae, context=D.stand_in_context(cfg.text),
                     example=example_of(val, 0), world=info, dtype=str(cfg.export.dtype),
                     max_mb=float(cfg.export.max_mb))
        rec["megabytes"] = dir_bytes(p.bundle) / 1e6
        return p.bundle


def stage_eval(run: Run, teacher_root: Path, bundle_root: Path, val: D.Clips) -> dict[str, Any]:
    """Teacher (``<work>/teacher``) vs the bundled student on the first ``eval.n`` held-out clips
    (:mod:`wanjax.world.compare`); the means are also written into the bundle's ``world.json``."""
    import jax

    from wanjax.videoio import write_json_atomic
    from wanjax.world import compare
    from wanjax.world.bundle import read_world

    cfg, p = run.cfg, run.p
    with run.stage("eval") as rec:
        n = min(int(cfg.eval.n), len(val))
        clips = val.subset(np.arange(n))
        roots = {"teacher": teacher_root, "student": bundle_root}
        gen = compare.generate(roots, clips, cfg, out_dir=p.eval)
        dev = jax.devices()[0].platform
        speeds = {dev: compare.speed(gen, int(cfg.eval.timing_clips))}
        k = min(int(cfg.eval.cpu_timing_clips), n)
        mesh = compare.cpu_mesh() if dev != "cpu" and k > 0 else None
        if mesh is not None:  # the same models timed on the host CPU (the bundled default's device)
            try:
                speeds["cpu"] = compare.speed(compare.generate(roots, clips.subset(np.arange(k)), cfg, mesh=mesh), k)
            except Exception as e:  # noqa: BLE001 - a failed extra timing must not lose the run
                log.warning("timing on the CPU failed (%s: %s); the speed check uses %s", type(e).__name__, e, dev)
                rec["cpu_timing_error"] = f"{type(e).__name__}: {e}"
        videos = {"gt": clips.video, **{k_: v["frames"] for k_, v in gen.items()}}
        met = compare.metrics(videos, clips, float(cfg.eval.alpha), int(cfg.eval.workers))
        summ = compare.summarize(met, speeds)
        rec.update(n=n, **{f"pck_{k_}": met["mean"][k_]["pck"] for k_ in videos})
        run.extra.update(metrics={"n": n, "mean": met["mean"], "per_clip": met["per_clip"]}, summary=summ)
        w = read_world(bundle_root)
        w["heldout"] = {"n": n, "mean": met["mean"], "speed": summ["speed"], "checks": summ["checks"]}
        write_json_atomic(bundle_root / "world.json", w)
        return {"clips": clips, "videos": videos, "metrics": met, "summary": summ, "gen": gen}


def _curve(run_dir: Path, name: str) -> tuple[list[float], list[float]]:
    path = run_dir / "metrics.jsonl"
    by_step: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if f"{name}/loss" in r:
                by_step[int(r["step"])] = float(r[f"{name}/loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def stage_report(run: Run, ev: dict[str, Any]) -> dict[str, Path]:
    import jax

    from wanjax.world.report import curve_png, results_markdown, smooth, strip_png

    cfg, p = run.cfg, run.p
    with run.stage("report") as rec:
        v = ev["videos"]
        T = v["gt"].shape[1]
        frames = sorted(set(int(round(x)) for x in np.linspace(0, T - 1, min(T, 7))))
        rows = [("pose", ev["clips"].pose[0]), ("ground truth", v["gt"][0]), ("teacher", v["teacher"][0]),
                ("student", v["student"][0])]
        out = {"strip": strip_png(p.img / "strip.png", rows, frames, scale=max(1, 192 // int(cfg.data.height)))}
        curves = []
        for name, rd, key in (("vae", p.vae_run, "vae"), ("teacher", p.teacher_run, "teacher"),
                              ("student", p.student_run, "ode"), ("dmd_generator", p.work / "dmd_run", "generator"),
                              ("dmd_critic", p.work / "dmd_run", "critic")):
            xs, ys = _curve(rd, key)
            if xs:
                win = max(1, len(xs) // 25)
                series = {f"{name} loss": (xs, ys), f"moving average ({win})": (xs, smooth(ys, win))}
                out[f"loss_{name}"] = curve_png(p.img / f"loss_{name}.png", series, f"{name} training loss")
                curves.append(name)
        dev = jax.devices()[0]
        summary = {"config": cfg.to_dict(), "command": run.command, "device": f"{dev.device_kind} ({dev.platform})",
                   "total_s": time.perf_counter() - run.t0, "metrics": run.extra["metrics"],
                   "summary": run.extra["summary"], "stages": run.stages, "curves": curves,
                   "vae_check": run.extra.get("vae_check"),
                   "models": _model_lines(cfg)}
        (p.docs).mkdir(parents=True, exist_ok=True)
        out["results"] = p.docs / "RESULTS.md"
        out["results"].write_text(results_markdown(summary))
        rec["files"] = {k: str(v) for k, v in out.items()}
        return out


def _model_lines(cfg) -> dict[str, str]:
    from wanjax.world import models as M

    v, t = cfg.vae, cfg.teacher
    return {"VAE": f"Wan causal 3-D VAE, base_dim {v.base_dim}, dim_mult {tuple(v.dim_mult)}, "
                   f"{v.num_res_blocks} res blocks, z_dim {v.z_dim} (8x spatial, 4x temporal)",
            "teacher": f"PoseDiT: WanDiT dim {t.dim}, {t.num_layers} layers, {t.num_heads} heads, ffn {t.ffn_dim}, "
                       f"in_dim 36 (16 noise + 20 y), no CLIP branch; UniAnimate pose conditioner (hidden "
                       f"{t.pose_hidden}); trained with flow matching, pose dropout {t.pose_drop}, image dropout "
                       f"{t.image_drop}, EMA {t.ema_decay}",
            "student": f"the teacher's width, {cfg.student.num_layers} of its {t.num_layers} DiT blocks (teacher blocks "
                       f"{M.student_layers(int(t.num_layers), int(cfg.student.num_layers))}) and its pose conditioner, "
                       f"block-causal ({cfg.sample.num_frame_per_block} latent frames "
                       f"per block, KV cache), initialised from the teacher, ODE regression on the teacher's "
                       f"trajectories ({cfg.targets.n} clips) at the {len(cfg.sample.student_steps)}-step student "
                       f"sigmas",
            "text": f"a fixed random stand-in context [{cfg.text.tokens}, {cfg.text.dim}] (seed {cfg.text.seed}); "
                    f"negative = positive, so CFG contrasts pose vs no pose only"}


def print_artefacts(run: Run, extra: dict[str, Path] | None = None) -> None:
    p = run.p
    lines = ["[world] artefacts:",
             f"  report          {p.docs / 'RESULTS.md'}  (-> docs/RESULTS.md)",
             f"  images          {p.img}/  (-> docs/img/)",
             f"  bundle          {p.bundle}/  (-> assets/default/)",
             f"  run summary     {p.world_json}",
             f"  VAE             {p.vae}",
             f"  teacher         {p.teacher}  (inference root; train log {p.teacher_run / 'metrics.jsonl'})",
             f"  teacher targets {p.targets}",
             f"  student         {p.student}  (inference root; train log {p.student_run / 'metrics.jsonl'})",
             f"  held-out clips  {p.heldout}",
             f"  generations     {p.eval}/teacher, {p.eval}/student  (lossless mp4)"]
    for k, v in (extra or {}).items():
        lines.append(f"  {k:<15} {v}")
    print("\n".join(lines), file=sys.stderr, flush=True)


__all__ = ["Paths", "paths", "Run", "apply_redo", "parse_args", "setup_jax", "world_info", "stage_data", "stage_vae",
           "stage_latents", "stage_teacher", "stage_targets", "stage_ode", "stage_dmd", "stage_eval", "stage_export",
           "stage_report", "print_artefacts", "teacher_model", "write_heldout"]
