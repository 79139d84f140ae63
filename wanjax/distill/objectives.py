"""Distillation runs from an ml_collections config (``configs/distill.py``): models, data, phases,
validation, resume and export, for the two objectives.

``ode``  one phase per iteration: the causal student regresses the teacher trajectory
         (:func:`wanjax.distill.ode.ode_loss`).
``dmd``  Self-Forcing: phase ``generator`` (the student, :func:`wanjax.distill.dmd.generator_loss`,
         every ``dmd.gen_update_ratio``-th iteration) then phase ``critic`` (the fake score,
         :func:`wanjax.distill.dmd.critic_loss`, every iteration), each on its own fresh batch; the
         teacher (real score) is frozen. The exit step and every other draw come from the state's
         replicated key, so all replicas agree.

Models (PoseDiT = ``wanjax.models.unianimate.PoseDiT``):

* student: preset ``student.preset``; ``student.init`` is "" (random init, tests), an inference
  checkpoint root with ``dit/`` + ``pose/`` (e.g. the exported ODE student) or a plain Wan DiT
  checkpoint (``config.json`` model "dit", e.g. converted Wan2.1-T2V-1.3B), which is widened with
  :func:`~wanjax.models.unianimate.init_student_from_backbone`. ``student.pose_init`` (optional) then
  copies UniAnimate's pose stacks (e.g. from the teacher root's ``pose/``) into the student's
  (:func:`~wanjax.models.unianimate.init_student_pose`); with ``pose_trunk_trainable=False`` the
  trunk stays at those weights and gets no gradient (a faster step, see docs/PERFORMANCE.md). With
  ``pose_trunk_cached`` as well, the batches carry the targets' ``pose_trunk`` features (the
  teacher's trunk, stored by generate_teacher) instead of the pose frames, and no model runs its
  trunk; :func:`check_pose_trunk_cache` requires every model's trunk to have the targets' fingerprint.
* teacher (dmd): preset ``teacher.preset`` loaded from ``teacher.ckpt_dir`` (``dit/`` + ``pose/``);
  frozen, computes in ``teacher.dtype``.
* critic (dmd): a PoseDiT of ``critic.preset`` (default: the student's) starting from the student's
  initial weights, run bidirectionally.

The run directory ``workdir`` holds ``ckpt/`` (Orbax), ``metrics.jsonl``, ``val/`` (mp4 + x0 error
of the fixed validation samples) and ``export/`` (the EMA student as an inference checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from wanjax import sharding as shd
from wanjax.distill import dmd, ode
from wanjax.models import unianimate as ua
from wanjax.models.dit import RESIDUAL_DTYPES, WanDiTConfig
from wanjax.models.pose import PoseConfig, frozen_params
from wanjax.training import ckpt as ckpt_lib
from wanjax.training import loop as loop_lib
from wanjax.training import state as st

log = logging.getLogger("wanjax.distill")

OBJECTIVES = ("ode", "dmd")


class DistillError(ValueError):
    """Bad configuration or inputs of a distillation run; the message names the flag / path."""


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def _preset(name: str, flag: str) -> ua.PoseDiTConfig:
    if name not in ua.PRESETS:
        raise DistillError(f"--config.{flag}={name!r}: unknown PoseDiT preset; known: {sorted(ua.PRESETS)}")
    return ua.PRESETS[name]


def _with_numerics(pcfg: ua.PoseDiTConfig, *, dtype: str, param_dtype: str, attention: str, remat: bool,
                   remat_policy: str = "full", remat_dots_layers: int = 0, pose_time_chunk: int | None = None,
                   train_pose_trunk: bool = True, **dit_over) -> ua.PoseDiTConfig:
    dit = pcfg.dit.replace(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat,
                           remat_policy=remat_policy, remat_dots_layers=remat_dots_layers, **dit_over)
    return pcfg.replace(dit=dit, pose=dataclasses.replace(pcfg.pose, remat=remat, time_chunk=pose_time_chunk or None,
                                                          train_trunk=train_pose_trunk))


def _residual_dtype(cfg) -> str:
    name = cfg.get("residual_dtype", "float32")
    if name not in RESIDUAL_DTYPES:
        raise DistillError(f"--config.residual_dtype={name!r}: choose one of {RESIDUAL_DTYPES}")
    return name


def _trained_numerics(cfg) -> dict:
    """The numerics keywords of :func:`_with_numerics` shared by the trained models (student, critic)."""
    return dict(dtype=cfg.compute_dtype, param_dtype=cfg.master_dtype, attention=cfg.attention, remat=cfg.remat,
                remat_policy=cfg.get("remat_policy", "full"), remat_dots_layers=cfg.get("remat_dots_layers", 0),
                residual_dtype=_residual_dtype(cfg), unroll_layers=bool(cfg.get("unroll_layers", False)),
                pose_time_chunk=cfg.get("pose_time_chunk", 0),
                train_pose_trunk=cfg.get("pose_trunk_trainable", True))


def student_config(cfg) -> ua.PoseDiTConfig:
    s = cfg.student
    return _with_numerics(_preset(s.preset, "student.preset"), num_frame_per_block=s.num_frame_per_block,
                          max_frames=s.max_frames, **_trained_numerics(cfg))


def _check_dir(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DistillError(f"--config.{flag}={path}: no such directory")
    return p


def load_pose_dit(root: str | Path, pcfg: ua.PoseDiTConfig, *, flag: str, mesh=None, dtype=None) -> ua.PoseDiT:
    """An inference checkpoint root (``dit/`` + ``pose/``) into a PoseDiT of config ``pcfg`` (its
    numerics are kept; the checkpoint's shapes must match the preset)."""
    from wanjax.checkpoint import read_config, restore_params

    root = _check_dir(str(root), flag)
    for sub in ("dit", "pose"):
        if not (root / sub / "config.json").is_file():
            raise DistillError(f"--config.{flag}={root}: expected {root / sub}/config.json (an inference "
                               f"checkpoint root with dit/ and pose/)")
    raw = read_config(root / "dit")
    src = WanDiTConfig.from_dict(raw)
    bad = [f"{k}: checkpoint {getattr(src, k)!r}, preset {getattr(pcfg.dit, k)!r}"
           for k in ("dim", "num_layers", "num_heads", "ffn_dim", "in_dim", "i2v", "text_dim")
           if getattr(src, k) != getattr(pcfg.dit, k)]
    if bad:
        raise DistillError(f"--config.{flag}={root}: the DiT checkpoint does not match its preset (" + "; ".join(bad)
                           + ")")
    pose_src = PoseConfig.from_dict(read_config(root / "pose"))
    pcfg = pcfg.replace(pose=dataclasses.replace(pose_src, remat=pcfg.pose.remat, time_chunk=pcfg.pose.time_chunk,
                                                 train_trunk=pcfg.pose.train_trunk))
    model = nnx.eval_shape(lambda: ua.PoseDiT(pcfg, rngs=nnx.Rngs(0)))
    restore_params(model.dit, root / "dit", mesh, dtype=dtype)
    restore_params(model.pose, root / "pose", mesh, dtype=jnp.float32)
    return model


def build_student(cfg, mesh=None) -> ua.PoseDiT:
    """The student PoseDiT from ``student.preset``, ``student.init`` and ``student.pose_init`` (see
    the module docstring)."""
    student = _build_student(cfg, mesh)
    if cfg.student.get("pose_init", ""):
        init_pose(student, cfg.student.pose_init, mesh=mesh)
    return student


def init_pose(student: ua.PoseDiT, path: str, *, mesh=None, flag: str = "student.pose_init") -> list[str]:
    """``--config.student.pose_init=ROOT``: the pose stacks from a converted UniAnimate pose
    checkpoint (ROOT/pose/ of an inference root such as the teacher's, or a pose checkpoint
    directory itself), copied by ``ua.init_student_pose``."""
    from wanjax.checkpoint import read_config, restore_params
    from wanjax.models.pose import PoseConditioner

    root = _check_dir(path, flag)
    pdir = root / "pose" if (root / "pose" / "config.json").is_file() else root
    if not (pdir / "config.json").is_file():
        raise DistillError(f"--config.{flag}={path}: expected a pose checkpoint ({root}/pose/config.json or "
                           f"{root}/config.json), e.g. the converted teacher's root")
    src_cfg = PoseConfig.from_dict(read_config(pdir))
    src = nnx.eval_shape(lambda: PoseConditioner(src_cfg, rngs=nnx.Rngs(0)))
    restore_params(src, pdir, mesh, dtype=jnp.float32)
    try:
        return ua.init_student_pose(student, nnx.state(src, nnx.Param))
    except ValueError as e:
        raise DistillError(f"--config.{flag}={path}: {e}") from None


def _build_student(cfg, mesh=None) -> ua.PoseDiT:
    from wanjax.checkpoint import load_model, read_config
    from wanjax.models.dit import WanDiT

    pcfg = student_config(cfg)
    init = cfg.student.init
    master = jnp.dtype(cfg.master_dtype)
    if not init:
        return ua.PoseDiT(pcfg, rngs=nnx.Rngs(cfg.seed))
    root = _check_dir(init, "student.init")
    if (root / "dit").is_dir():
        return load_pose_dit(root, pcfg, flag="student.init", mesh=mesh, dtype=master)
    raw = read_config(root)
    if raw.get("model") != "dit":
        raise DistillError(f"--config.student.init={init}: neither an inference root (dit/ + pose/) nor a DiT "
                           f"checkpoint (config.json says model={raw.get('model')!r})")
    backbone = load_model(root, lambda c, rngs: WanDiT(WanDiTConfig.from_dict(c).replace(param_dtype=cfg.master_dtype),
                                                       rngs=rngs), mesh, dtype=master)
    student = ua.PoseDiT(pcfg, rngs=nnx.Rngs(cfg.seed))
    try:
        return ua.init_student_from_backbone(student, nnx.state(backbone, nnx.Param))
    except ValueError as e:
        raise DistillError(f"--config.student.init={init}: {e}") from None


def build_teacher(cfg, mesh=None) -> ua.PoseDiT:
    t = cfg.teacher
    pcfg = _with_numerics(_preset(t.preset, "teacher.preset"), dtype=t.dtype, param_dtype=t.dtype,
                          attention=cfg.attention, remat=False, pose_time_chunk=cfg.get("pose_time_chunk", 0),
                          train_pose_trunk=False)  # the teacher trains nothing (and may read cached trunk features)
    if not t.ckpt_dir:
        raise DistillError("objective=dmd needs the teacher: set --config.teacher.ckpt_dir=ROOT (dit/ + pose/, "
                           "the converted UniAnimate teacher)")
    return load_pose_dit(t.ckpt_dir, pcfg, flag="teacher.ckpt_dir", mesh=mesh, dtype=jnp.dtype(t.dtype))


def build_critic(cfg, student: ua.PoseDiT) -> ua.PoseDiT:
    """Critic with the student's initial weights (same preset) or a fresh init of ``critic.preset``."""
    name = cfg.critic.preset or cfg.student.preset
    pcfg = _with_numerics(_preset(name, "critic.preset"), **_trained_numerics(cfg))
    critic = ua.PoseDiT(pcfg.replace(pose=student.cfg.pose) if name == cfg.student.preset else pcfg,
                        rngs=nnx.Rngs(cfg.seed + 1))
    if name == cfg.student.preset:
        nnx.update(critic, nnx.state(student, nnx.Param))
    return critic


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def open_targets(cfg):
    """The training dataset: ``wanjax.data.targets.TargetReader(data.dir)``."""
    from wanjax.data.targets import TargetError, TargetReader

    if not cfg.data.dir:
        raise DistillError("--config.data.dir is required: the teacher-target directory written by "
                           "python -m train.generate_teacher")
    p = Path(cfg.data.dir)
    if not p.is_dir():
        raise DistillError(f"--config.data.dir={cfg.data.dir}: no such directory (run python -m "
                           f"train.generate_teacher first)")
    try:
        return TargetReader(p, verify=cfg.data.verify)
    except TargetError as e:
        raise DistillError(f"--config.data.dir={cfg.data.dir}: {e}") from None


def negative_context(cfg) -> np.ndarray | None:
    """The negative prompt embedding [n, text_dim] for the teacher's CFG branch (dmd only)."""
    path = cfg.data.negative_embeds_path
    if not path:
        if cfg.objective == "dmd" and cfg.dmd.guidance_scale != 0:
            raise DistillError("objective=dmd with dmd.guidance_scale != 0 needs the negative prompt embedding: set "
                               "--config.data.negative_embeds_path=FILE.npz (array 'negative' [n, text_dim]) or "
                               "--config.dmd.guidance_scale=0")
        return None
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"--config.data.negative_embeds_path={path}: no such file")
    with np.load(p) as z:
        if "negative" not in z:
            raise DistillError(f"--config.data.negative_embeds_path={path}: no array 'negative' (found {list(z.keys())})")
        neg = np.asarray(z["negative"], np.float32)
    return neg[0] if neg.ndim == 3 else neg


def batch_keys(objective: str, pose_trunk_cached: bool = False) -> tuple[str, ...]:
    pose = "pose_trunk" if pose_trunk_cached else "pose"
    if objective == "ode":
        return ("context", "clip_fea", "ref_y", "ref_pose", pose, "traj", "traj_sigmas", "x0")
    return ("context", "clip_fea", "ref_y", "ref_pose", pose)


def _trunk_cached(cfg) -> bool:
    return bool(getattr(cfg, "pose_trunk_cached", False))  # (also a plain namespace: bench.train)


def check_pose_trunk_cache(cfg, dataset, models: Mapping[str, ua.PoseDiT]) -> None:
    """``pose_trunk_cached``: the run reads each sample's precomputed ``pose_trunk`` features instead of
    its pose frames. Valid only for frozen trunks equal to the one that computed them: every sample's
    ``pose_trunk_sha256`` must match each model's ``trunk_fingerprint`` (student, critic, teacher)."""
    from wanjax.models.pose import trunk_fingerprint

    if getattr(cfg, "pose_trunk_trainable", True):
        raise DistillError("--config.pose_trunk_cached=True needs a frozen pose trunk: set "
                           "--config.pose_trunk_trainable=False (precomputed features carry no trunk gradient)")
    where = getattr(dataset, "dir", "the dataset")
    prints = {name: trunk_fingerprint(m.pose) for name, m in models.items()}
    metas = getattr(dataset, "meta", None)
    if metas is None:
        raise DistillError("--config.pose_trunk_cached=True needs a target directory (--config.data.dir, as "
                           "generate_teacher writes it): its per-sample metadata names the pose trunk that computed "
                           "the features")
    for sid in dataset.ids:
        have = metas(sid).get("pose_trunk_sha256")
        if have is None:
            raise DistillError(f"--config.pose_trunk_cached=True: {where}: sample {sid!r} has no pose_trunk features "
                               f"(targets from an older generate_teacher, or image mode); regenerate the targets or "
                               f"set --config.pose_trunk_cached=False")
        bad = [n for n, fp in prints.items() if fp != have]
        if bad:
            raise DistillError(f"--config.pose_trunk_cached=True: {where}: sample {sid!r} holds pose_trunk features "
                               f"of a different pose trunk (sha256 {have[:12]}...) than the {', '.join(bad)}'s "
                               f"({prints[bad[0]][:12]}...); initialise the pose stacks from the teacher that wrote "
                               f"the targets (--config.student.pose_init=TEACHER_ROOT) or set "
                               f"--config.pose_trunk_cached=False")


def make_collate(cfg, text_len: int, neg: np.ndarray | None) -> Callable[[list], dict]:
    keys = batch_keys(cfg.objective, _trunk_cached(cfg))
    extra = {"neg_context": neg} if neg is not None else None
    return lambda samples: ode.collate(samples, text_len=text_len, keys=keys, extra=extra)


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------
def _sample_geometry(sample: Mapping[str, np.ndarray]) -> tuple[int, int, int, int, int]:
    """(latent frames F, tokens per frame at patch 2x2, pixel frames, H, W) of one target record."""
    F_, h, w = sample["ref_y"].shape[:3] if "ref_y" in sample else sample["x0"].shape[:3]
    if "pose" in sample:
        T, H, W = sample["pose"].shape[:3]
    else:  # only the pose trunk's features (pose_trunk_cached): the frames they came from
        T, H, W = 4 * (F_ - 1) + 1, 8 * h, 8 * w
    return F_, (h // 2) * (w // 2), T, H, W


def _scalar_aux(aux: Mapping[str, Any]) -> dict:
    return {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in aux.items()}


def ode_phases(cfg, student: ua.PoseDiT, sample: Mapping[str, np.ndarray]) -> list[loop_lib.Phase]:
    ocfg = ode.ODEConfig(clean_context=cfg.ode.clean_context, pose_drop=cfg.ode.pose_drop,
                         image_drop=cfg.ode.image_drop)
    F_, T, pix, H, W = _sample_geometry(sample)
    scfg = student.cfg
    img = sample["clip_fea"].shape[0] if scfg.dit.i2v and "clip_fea" in sample else 0
    train_flops = 3 * loop_lib.dit_forward_flops(scfg.dit, F_, T, frames_per_block=scfg.dit.num_frame_per_block,
                                                 image_tokens=img) + loop_lib.pose_train_flops(
        scfg.pose, pix, H, W, cached_trunk=_trunk_cached(cfg))

    def loss(model, batch, key):
        return ode.ode_loss(model, batch, key, cfg=ocfg)

    return [loop_lib.Phase("ode", "student", loss, flops_per_sample=train_flops, tokens_per_sample=F_ * T)]


def dmd_config(cfg, student: ua.PoseDiT) -> dmd.DMDConfig:
    d = cfg.dmd
    return dmd.DMDConfig(steps=tuple(d.steps), shift=d.shift, score_shift=d.score_shift,
                         guidance_scale=d.guidance_scale, num_frame_per_block=student.cfg.dit.num_frame_per_block,
                         context_sigma=d.context_sigma, last_step_only=d.last_step_only)


def dmd_phases(cfg, student: ua.PoseDiT, teacher: ua.PoseDiT, critic: ua.PoseDiT,
               sample: Mapping[str, np.ndarray]) -> list[loop_lib.Phase]:
    """Generator (every ``gen_update_ratio``-th iteration, first) and critic (every iteration)."""
    dcfg = dmd_config(cfg, student)
    o = cfg.ode  # the dropout probabilities are UniAnimate's recipe, shared by both objectives
    F_, T, pix, H, W = _sample_geometry(sample)
    nfb = dcfg.num_frame_per_block
    S = len(dcfg.steps)
    img = sample["clip_fea"].shape[0] if "clip_fea" in sample else 0
    cached = _trunk_cached(cfg)

    def pose_fwd(pcfg):  # the pose stacks' forward; a cached trunk is not run
        return loop_lib.pose_encoder_flops(pcfg, pix, H, W, cached_trunk=cached)

    def fwd(model, causal_block: int | None = None):
        if causal_block is None:
            return loop_lib.dit_forward_flops(model.cfg.dit, F_, T, image_tokens=img) + pose_fwd(model.cfg.pose)
        return loop_lib.dit_forward_flops(model.cfg.dit, nfb, T, kv_frames=(causal_block + 1) * nfb,
                                          image_tokens=img)

    blocks = sum(fwd(student, b) for b in range(F_ // nfb))
    pose_s = pose_fwd(student.cfg.pose)
    # no-grad rollout: per block E[exit] denoising steps + the exit step + the context pass (exit ~ U{0..S-1})
    rollout = blocks * ((S - 1) / 2 + 2)
    cfg_passes = 1 if dcfg.guidance_scale == 0 else 2
    # generator: rollout, the exit forwards again with gradient (forward + backward = 3x), the student's
    # pose encoders with gradient, critic and teacher (both CFG branches) forwards
    train_critic = (3 * loop_lib.dit_forward_flops(critic.cfg.dit, F_, T, image_tokens=img)
                    + loop_lib.pose_train_flops(critic.cfg.pose, pix, H, W, cached_trunk=cached))
    gen_flops = (rollout + 3 * blocks + loop_lib.pose_train_flops(student.cfg.pose, pix, H, W, cached_trunk=cached)
                 + fwd(critic)
                 + cfg_passes * fwd(teacher))
    critic_flops = rollout + pose_s + train_critic

    def split(key):
        k_drop, k_loss = jax.random.split(key)
        return k_drop, k_loss

    def gen_loss(model, batch, key, critic, teacher):
        k_drop, k_loss = split(key)
        cb = ode.conditioning_batch(batch, k_drop, pose_drop=o.pose_drop, image_drop=o.image_drop)
        loss, aux = dmd.generator_loss(model, teacher, critic, cb, k_loss, dcfg)
        return loss, _scalar_aux(aux)

    def critic_loss(model, batch, key, student):
        k_drop, k_loss = split(key)
        cb = ode.conditioning_batch(batch, k_drop, pose_drop=o.pose_drop, image_drop=o.image_drop)
        loss, aux = dmd.critic_loss(model, student, cb, k_loss, dcfg)
        return loss, _scalar_aux(aux)

    r = int(cfg.dmd.gen_update_ratio)
    return [loop_lib.Phase("generator", "student", gen_loss, every=r, offset=0, uses=("critic", "teacher"),
                           flops_per_sample=gen_flops, tokens_per_sample=F_ * T),
            loop_lib.Phase("critic", "critic", critic_loss, every=1, uses=("student",),
                           flops_per_sample=critic_flops, tokens_per_sample=F_ * T)]


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def make_validator(cfg, samples: Sequence[Mapping[str, np.ndarray]], ids: Sequence[str], *, text_len: int,
                   out_dir: Path, vae=None) -> Callable:
    """``validate(trainer, state, step)``: the (EMA) student samples the fixed validation targets from
    their recorded noise (4 steps, StudentPipeline's math); returns the mean squared error to the
    teacher's x0 and, with a VAE, writes ``out_dir/step_XXXXXXX_<id>.mp4`` (process 0)."""
    from wanjax.videoio import VideoWriter, to_uint8

    batch = ode.collate(list(samples), text_len=text_len,
                        keys=("noise", "context", "clip_fea", "ref_y", "ref_pose",
                              "pose_trunk" if _trunk_cached(cfg) else "pose", "x0"))
    use_ema = cfg.ema.decay > 0
    steps, shift = tuple(cfg.dmd.steps), cfg.dmd.shift
    fns: dict = {}
    decode = None
    if vae is not None:
        from wanjax.models.vae import jit_decode
        decode = jit_decode(vae)

    def validate(trainer: loop_lib.Trainer, state: st.TrainState, step: int):
        mdef = trainer.defs["student"]
        if "fn" not in fns:
            def run(params, b, key_data):
                model = mdef.merge(params)
                x = ode.student_sample(model, b, b["noise"], jax.random.wrap_key_data(key_data), shift=shift,
                                       steps=steps)
                return x, jnp.mean(jnp.square(x.astype(jnp.float32) - b["x0"]), axis=(1, 2, 3, 4))
            repl = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
            fns["fn"] = jax.jit(run, out_shardings=(repl, repl))
            fns["batch"] = loop_lib.replicate(batch, trainer.mesh)
            fns["key"] = loop_lib.replicate(st.base_key(cfg.seed), trainer.mesh)
        params = state.models["student"].ema if use_ema else state.models["student"].params
        x, err = fns["fn"](params, fns["batch"], fns["key"])
        err = np.asarray(jax.device_get(err))
        if decode is not None and jax.process_index() == 0:
            # the latents come back to the host: the VAE lives on this process's default device
            video = np.asarray(jax.device_get(decode(np.asarray(jax.device_get(x), np.float32))))
            out_dir.mkdir(parents=True, exist_ok=True)
            for i, sid in enumerate(ids):
                safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(sid))
                with VideoWriter(out_dir / f"step_{step:07d}_{safe}.mp4", fps=cfg.val.fps) as w:
                    w.append(to_uint8(video[i]))
        return {"x0_mse": float(err.mean()), **{f"x0_mse/{sid}": float(e) for sid, e in zip(ids, err)}}

    return validate


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def fingerprint(cfg) -> dict:
    """Settings a checkpoint must agree with to be resumed. The pose trunk's settings are here too:
    ``pose_trunk_trainable`` decides which parameters the optimizer moves, and ``pose_trunk_cached``
    which features the batches carry (the trunk's tokens from the frames or from the targets). A
    checkpoint written before a key existed resumes (only keys it holds are compared)."""
    return {"objective": cfg.objective, "student_preset": cfg.student.preset,
            "teacher_preset": cfg.teacher.preset if cfg.objective == "dmd" else None,
            "batch_size": int(cfg.batch_size), "accum_steps": int(cfg.accum_steps), "data_seed": int(cfg.data.seed),
            "master_dtype": cfg.master_dtype, "pose_trunk_trainable": bool(cfg.get("pose_trunk_trainable", True)),
            "pose_trunk_cached": _trunk_cached(cfg)}


def make_mesh(cfg):
    try:
        return shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise DistillError(f"--config.mesh: {e} ({len(jax.devices())} devices)") from None


def build(cfg, dataset=None, mesh=None):
    """Everything of a run except the loop: (trainer, make_batches, validator, dataset)."""
    if cfg.objective not in OBJECTIVES:
        raise DistillError(f"--config.objective={cfg.objective!r}: choose one of {list(OBJECTIVES)}")
    if cfg.batch_size % cfg.accum_steps:
        raise DistillError(f"--config.batch_size={cfg.batch_size} must be a multiple of "
                           f"--config.accum_steps={cfg.accum_steps}")
    mesh = mesh or make_mesh(cfg)
    dataset = dataset if dataset is not None else open_targets(cfg)
    ids = list(getattr(dataset, "ids", range(len(dataset))))
    first = dataset[0]
    neg = negative_context(cfg)
    student = build_student(cfg, mesh)
    text_len = student.cfg.dit.text_len
    ema_cfg = st.EMAConfig(cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay > 0 else None
    o = cfg.optim
    if cfg.objective == "ode":
        if _trunk_cached(cfg):
            check_pose_trunk_cache(cfg, dataset, {"student": student})
        phases = ode_phases(cfg, student, first)
        trainer = loop_lib.Trainer(
            {"student": student},
            {"student": loop_lib.make_optimizer(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                                max_grad_norm=o.max_grad_norm, warmup_steps=o.warmup_steps,
                                                mu_dtype=o.mu_dtype or None,
                                                frozen=frozen_params(student.cfg.pose))},
            phases, mesh, ema={"student": ema_cfg} if ema_cfg else None, master_dtype=jnp.dtype(cfg.master_dtype),
            accum_steps=cfg.accum_steps, seed=cfg.seed, offload=cfg.get("offload_state", False))
    else:
        teacher = build_teacher(cfg, mesh)
        critic = build_critic(cfg, student)
        if _trunk_cached(cfg):
            check_pose_trunk_cache(cfg, dataset, {"student": student, "critic": critic, "teacher": teacher})
        d = cfg.dmd
        opt = lambda lr, m: loop_lib.make_optimizer(lr, b1=d.b1, b2=d.b2, eps=o.eps, weight_decay=o.weight_decay,
                                                    max_grad_norm=o.max_grad_norm, warmup_steps=o.warmup_steps,
                                                    mu_dtype=o.mu_dtype or None, frozen=frozen_params(m.cfg.pose))
        phases = dmd_phases(cfg, student, teacher, critic, first)
        trainer = loop_lib.Trainer(
            {"student": student, "critic": critic},
            {"student": opt(d.lr_generator, student), "critic": opt(d.lr_critic, critic)},
            phases, mesh, frozen={"teacher": teacher}, ema={"student": ema_cfg} if ema_cfg else None,
            master_dtype=jnp.dtype(cfg.master_dtype), accum_steps=cfg.accum_steps, seed=cfg.seed,
            offload=cfg.get("offload_state", False))
    collate = make_collate(cfg, text_len, neg)

    def iterator(pos):
        return loop_lib.BatchIterator(dataset, cfg.batch_size, seed=cfg.data.seed, start=pos, collate=collate,
                                      on_error=cfg.data.on_error, prefetch=cfg.data.prefetch)

    make_batches = loop_lib.phase_batches(trainer, iterator)
    validator = None
    if cfg.val.every:
        n = min(cfg.val.num_samples, len(dataset))
        vae = None
        if cfg.val.vae_dir:
            from wanjax.models.vae import load_vae
            vae = load_vae(_check_dir(cfg.val.vae_dir, "val.vae_dir"), dtype=jnp.float32)
        validator = make_validator(cfg, [dataset[i] for i in range(n)], ids[:n], text_len=text_len,
                                   out_dir=Path(cfg.workdir) / "val", vae=vae)
    return trainer, make_batches, validator, dataset


def run(cfg, dataset=None, *, on_step=None, guard=None, mesh=None) -> loop_lib.TrainResult:
    """Train (resuming from ``workdir/ckpt`` when it holds a checkpoint), then export the (EMA)
    student to ``export.dir`` (default ``workdir/export``) when the run finished."""
    if not cfg.workdir:
        raise DistillError("--config.workdir is required (checkpoints, metrics.jsonl, val/, export/)")
    workdir = Path(cfg.workdir)
    trainer, make_batches, validator, dataset = build(cfg, dataset, mesh)
    ck = ckpt_lib.Checkpointer(workdir / "ckpt", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    fp = fingerprint(cfg)
    state = None
    if ck.latest_step() is not None:
        ckpt_lib.check_meta_compatible(ck.read_meta().get("fingerprint", {}), fp, str(ck.directory))
        state, _ = ck.restore(trainer.abstract_state())
        log.info("resuming %s from step %d", workdir, int(state.step))
    else:
        state = trainer.init_state(keep_initial=False)
    meta = {"fingerprint": fp, "config": json.loads(cfg.to_json_best_effort())}
    lc = loop_lib.LoopConfig(total_steps=cfg.total_steps, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                             val_every=cfg.val.every, progress=cfg.progress, peak_flops=cfg.peak_tflops * 1e12 or None)
    try:
        result = loop_lib.train(trainer, make_batches, lc, state=state, checkpointer=ck, meta=meta,
                                metrics_path=workdir / "metrics.jsonl", validate=validator, on_step=on_step,
                                guard=guard)
    finally:
        ck.close()
    if result.status == "done" and cfg.export.enabled and jax.process_count() > 1:
        log.warning("export skipped: %d processes (the inference checkpoint is written by one process); run the "
                    "same command on one host (adjust --config.mesh) to export the final checkpoint",
                    jax.process_count())
    elif result.status == "done" and cfg.export.enabled:
        use_ema = cfg.ema.decay > 0
        model = trainer.model(result.state, "student", ema=use_ema)
        out = ckpt_lib.export_inference(model, cfg.export.dir or workdir / "export",
                                        provenance={"workdir": str(workdir), "step": int(result.state.step),
                                                    "ema": use_ema, "objective": cfg.objective,
                                                    "student_preset": cfg.student.preset},
                                        link_from=cfg.export.link_from or None)
        log.info("exported the %sstudent to %s", "EMA " if use_ema else "", out)
    return result
