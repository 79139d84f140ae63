"""The bundled default model: the world's distilled student + VAE, small enough for the repository.

Layout of a bundle root (``assets/default/`` in the repository; written by ``python -m train.world``
as ``<out_dir>/assets/default/``)::

    dit/            student WanDiT          config.json + Orbax params/ (stored in float16)
    pose/           its pose conditioner    config.json + Orbax params/ (float16)
    vae/            the world's VAE         config.json + Orbax params/ (float16)
    text.npz        the stand-in prompt embedding: ``prompt`` [tokens, dim], ``negative`` (= prompt)
    world.json      sizes, sampler settings, provenance and the held-out metrics of the run
    example/        a held-out clip to drive the demo:
        ref.png             reference image
        pose/00000.png ...  driving pose frames (UniAnimate drawings); pose/pose.png = reference pose
        pose.json           driving keypoints, meta.json (marker palette): the metric's ground truth

There is no ``clip/`` (the world's DiTs have no CLIP branch) and no ``t5/``: ``text.npz`` replaces
T5 through ``prompt_embeds_path``. Parameters are restored in float32 (``load_model(dtype=...)``
casts), so the float16 storage only halves the files.

:func:`infer_config` returns the ``configs/infer.py`` config (``tiny_student`` as the base) that
points ``infer.generate`` at a bundle::

    from wanjax.world.bundle import infer_config
    cfg = infer_config()                 # assets/default, the streaming student
    infer.generate.run(cfg, ref=..., pose=..., out="out.mp4")

or on the command line, with the fields of ``world.json``:
``python -m infer.generate --config configs/infer.py:tiny_student --config.ckpt_dir=assets/default
--config.prompt_embeds_path=assets/default/text.npz --config.height=96 --config.width=96
--config.num_frames=21 --config.model.expect={} --config.model.max_frames=6
--config.conditioning.y_frames=6 --ref assets/default/example/ref.png --pose assets/default/example/pose
--out out.mp4``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / "assets" / "default"
FORMAT = "wanjax-world-bundle-v1"


class BundleError(ValueError):
    pass


def read_world(root: str | os.PathLike = DEFAULT_ROOT) -> dict:
    p = Path(root) / "world.json"
    if not p.is_file():
        raise BundleError(f"{root}: not a wanjax world bundle (no world.json); build one with "
                          f"python -m train.world --config configs/world.py:full")
    d = json.loads(p.read_text())
    if d.get("format") != FORMAT:
        raise BundleError(f"{p}: format {d.get('format')!r}, expected {FORMAT!r}")
    return d


def infer_config(root: str | os.PathLike = DEFAULT_ROOT, pipeline: str = "student"):
    """``configs/infer.py`` config for the bundle at ``root`` (``pipeline``: ``student``, or
    ``teacher`` for a teacher root written by the world with the same layout)."""
    from configs.infer import get_config

    w = read_world(root)
    root = Path(root)
    c = get_config("tiny_student" if pipeline == "student" else "tiny")
    c.ckpt_dir = str(root)
    c.prompt_embeds_path = str(root / "text.npz")
    c.prompt = w.get("prompt", c.prompt)
    c.height, c.width = int(w["height"]), int(w["width"])
    c.num_frames = int(w["num_frames"])
    c.fps = float(w["fps"])
    c.dtype = "float32"
    c.vae_dtype = "float32"
    c.attention = "xla"
    c.model.expect = dict(dim=int(w["dit"]["dim"]), num_layers=int(w["dit"]["num_layers"]))
    c.model.num_frame_per_block = int(w["num_frame_per_block"])
    c.model.local_attn_size = -1
    c.model.max_frames = int(w["latent_frames"])
    c.conditioning.mode = "pose+image"
    c.conditioning.y_frames = int(w["latent_frames"])
    c.window.size = int(w["latent_frames"])
    c.window.overlap = 0
    s = w["sampler"]
    c.sampler.shift = float(s["student_shift"] if pipeline == "student" else s["teacher_shift"])
    c.sampler.student_steps = tuple(int(t) for t in s["student_steps"])
    if pipeline == "teacher":
        c.pipeline = "teacher"
        c.sampler.name = s.get("sampler", "euler")
        c.sampler.steps = int(s["teacher_steps"])
        c.sampler.cfg_scale = float(s["cfg_scale"])
    return c


def example_paths(root: str | os.PathLike = DEFAULT_ROOT) -> dict[str, Path]:
    ex = Path(root) / "example"
    return {"ref": ex / "ref.png", "pose": ex / "pose", "keypoints": ex / "pose.json", "meta": ex / "meta.json"}


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_params_as(src_ckpt: str | os.PathLike, dst_ckpt: str | os.PathLike, dtype: str) -> Path:
    """Copy a ``config.json`` + Orbax ``params/`` checkpoint with every floating array stored as
    ``dtype`` (the config is unchanged; loaders cast back to their compute dtype)."""
    import orbax.checkpoint as ocp

    from wanjax.checkpoint import write_params

    src = Path(src_ckpt).absolute()
    tree = ocp.StandardCheckpointer().restore(src / "params")
    dt = np.dtype(dtype)
    cast = _map(tree, lambda a: np.asarray(a).astype(dt) if np.issubdtype(np.asarray(a).dtype, np.floating)
                else np.asarray(a))
    config = json.loads((src / "config.json").read_text())
    return write_params(dst_ckpt, cast, config, overwrite=True)


def _map(tree, fn):
    if isinstance(tree, Mapping):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def write_bundle(root: str | os.PathLike, *, student_root: str | os.PathLike, vae_dir: str | os.PathLike,
                 context: np.ndarray, example: Mapping[str, Any], world: Mapping[str, Any], dtype: str = "float16",
                 max_mb: float = 20.0) -> Path:
    """Write a bundle (see the module docstring) atomically: everything goes to a temporary sibling
    renamed at the end. ``example``: ``ref`` uint8 [H, W, 3], ``pose_frames`` uint8 [T, H, W, 3],
    ``ref_pose_frame`` uint8 [H, W, 3], ``body`` [T, 20, 3], ``meta`` dict. Raises
    :class:`BundleError` (and leaves no bundle) when it would exceed ``max_mb`` megabytes."""
    from PIL import Image

    from wanjax.pose.keypoints import PoseSequence, invisible_hands, save_keypoints
    from wanjax.videoio import write_json_atomic

    root = Path(root).absolute()
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        student_root = Path(student_root)
        write_params_as(student_root / "dit", tmp / "dit", dtype)
        write_params_as(student_root / "pose", tmp / "pose", dtype)
        write_params_as(vae_dir, tmp / "vae", dtype)
        ctx = np.asarray(context, np.float32)
        np.savez(tmp / "text.npz", prompt=ctx, negative=ctx)
        ex = tmp / "example"
        (ex / "pose").mkdir(parents=True)
        Image.fromarray(np.asarray(example["ref"], np.uint8)).save(ex / "ref.png")
        for i, f in enumerate(np.asarray(example["pose_frames"], np.uint8)):
            Image.fromarray(f).save(ex / "pose" / f"{i:05d}.png")
        Image.fromarray(np.asarray(example["ref_pose_frame"], np.uint8)).save(ex / "pose" / "pose.png")
        body = np.asarray(example["body"], np.float32)
        H, W = np.asarray(example["ref"]).shape[:2]
        save_keypoints(ex / "pose.json", PoseSequence(body, invisible_hands(body.shape[0]), W, H))
        (ex / "meta.json").write_text(json.dumps(dict(example["meta"]), indent=1))
        write_json_atomic(tmp / "world.json", {"format": FORMAT, **dict(world), "params_dtype": dtype})
        size = dir_bytes(tmp)
        if size > max_mb * 1e6:
            raise BundleError(f"the bundle would be {size / 1e6:.1f} MB, over export.max_mb={max_mb}; use smaller "
                              f"models (teacher.dim / num_layers, vae.base_dim) or export.dtype=bfloat16")
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root

