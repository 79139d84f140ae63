"""Training and evaluation data of the synthetic world.

A split is a set of ``wanjax.data.synthetic`` samples (sample ``i`` of split ``s`` has the seed
``sample_seed(data.seed, s, i)``, so the held-out split ``"val"`` never overlaps ``"train"``), held
as host arrays in :class:`Clips`:

    video     uint8 [N, T, H, W, 3]   ground truth (the figure of the reference in the driving pose)
    ref       uint8 [N, H, W, 3]      reference image (same figure, another phase of the motion)
    pose      uint8 [N, T, H, W, 3]   driving pose drawn by the UniAnimate renderer
    ref_pose  uint8 [N, H, W, 3]      the reference image's pose, same renderer
    body      float32 [N, T, 20, 3]   driving keypoints (normalised x, y, score): metric ground truth
    seeds     int64 [N]               per-sample seeds;  families: list[str] motion family per sample

The model-side tensors (UniAnimate layout, spec unianimate_dit.md sections 3-5 and 10.3):

* pose video ``[B, T + 3, H, W, 3]`` in [0, 1], frame 0 repeated 3 times
  (``wanjax.distill.ode.pad_pose_video``);
* reference pose ``[B, H, W, 3]`` in [0, 1];
* ``x0`` latents ``[B, F, h, w, 16]`` of the video (``F = 1 + (T - 1) / 4``, ``h = H / 8``);
* ``y`` ``[B, F, h, w, 20]`` = 4 mask channels (1 on latent frame 0) + the latents of the video
  ``[ref, grey, grey, ...]`` (:func:`reference_y`), exactly what ``wanjax.pipeline.build_y`` builds
  at inference before the reference-pose features are added;
* text context ``[B, tokens, dim]``: the fixed stand-in of :func:`stand_in_context`.

Training batches come from map-style datasets (:class:`ArrayDataset`) through the shared loop's
seeded, resumable ``wanjax.training.BatchIterator``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

CLIP_FIELDS = ("video", "ref", "pose", "ref_pose", "body", "seeds")


def synthetic_config(data_cfg) -> "Any":
    """``wanjax.data.synthetic.SyntheticConfig`` of a world config's ``data`` section."""
    from wanjax.data.synthetic import SyntheticConfig

    return SyntheticConfig(height=int(data_cfg.height), width=int(data_cfg.width),
                           num_frames=int(data_cfg.num_frames), fps=float(data_cfg.fps),
                           supersample=int(data_cfg.supersample))


def latent_frames(num_frames: int) -> int:
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames={num_frames} must be 1 + 4k")
    return (num_frames - 1) // 4 + 1


@dataclasses.dataclass
class Clips:
    video: np.ndarray
    ref: np.ndarray
    pose: np.ndarray
    ref_pose: np.ndarray
    body: np.ndarray
    seeds: np.ndarray
    families: list

    def __len__(self) -> int:
        return int(self.video.shape[0])

    def subset(self, idx) -> "Clips":
        idx = np.asarray(idx)
        return Clips(**{k: getattr(self, k)[idx] for k in CLIP_FIELDS},
                     families=[self.families[int(i)] for i in idx])

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` atomically (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, families=np.asarray(self.families), **{k: getattr(self, k) for k in CLIP_FIELDS})
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> "Clips":
        with np.load(path) as z:
            return Clips(**{k: z[k] for k in CLIP_FIELDS}, families=[str(f) for f in z["families"]])


def _render(args: tuple[int, Any]) -> dict[str, Any]:
    """One sample as plain arrays (runs in a worker process)."""
    from wanjax.data.synthetic import make_sample
    from wanjax.pose.render import render_sequence

    seed, syn_cfg = args
    s = make_sample(seed, syn_cfg)
    ref_pose = np.asarray(render_sequence(s["ref_pose"], syn_cfg.height, syn_cfg.width), np.uint8)[0]
    return dict(video=s["video"], ref=s["ref_image"], pose=s["pose_frames"], ref_pose=ref_pose,
                body=np.asarray(s["pose"].body, np.float32), seed=seed, family=s["meta"]["family"])


def default_workers(requested: int = 0) -> int:
    return int(requested) if requested and requested > 0 else max(1, min(16, os.cpu_count() or 1))


def render_split(data_cfg, split: str, n: int, *, workers: int = 0, progress: bool = False) -> Clips:
    """Render samples ``0..n-1`` of ``split`` (seeds ``sample_seed(data.seed, split, i)``) in
    ``workers`` processes (spawned, so they do not inherit the parent's JAX runtime)."""
    from wanjax.data.synthetic import sample_seed

    syn_cfg = synthetic_config(data_cfg)
    jobs = [(sample_seed(int(data_cfg.seed), split, i), syn_cfg) for i in range(n)]
    workers = min(default_workers(workers), max(n, 1))
    if workers <= 1:
        rows = [_render(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            it = pool.imap(_render, jobs, chunksize=max(1, n // (4 * workers)))
            if progress:
                from tqdm import tqdm

                it = tqdm(it, total=n, desc=f"render {split}", mininterval=2.0)
            rows = list(it)
    if not rows:
        raise ValueError(f"render_split: no samples requested for split {split!r}")
    return Clips(video=np.stack([r["video"] for r in rows]), ref=np.stack([r["ref"] for r in rows]),
                 pose=np.stack([r["pose"] for r in rows]), ref_pose=np.stack([r["ref_pose"] for r in rows]),
                 body=np.stack([r["body"] for r in rows]), seeds=np.asarray([r["seed"] for r in rows], np.int64),
                 families=[r["family"] for r in rows])


def stand_in_context(text_cfg) -> np.ndarray:
    """The world's prompt embedding: float32 ``[tokens, dim]`` of unit-variance Gaussian noise from
    ``text.seed``. One fixed context for every sample (see configs/world.py)."""
    rng = np.random.default_rng(int(text_cfg.seed))
    return rng.standard_normal((int(text_cfg.tokens), int(text_cfg.dim))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Model-side tensors
# ---------------------------------------------------------------------------------------------
def to_m11(video_u8: jax.Array) -> jax.Array:
    """uint8 -> float32 in [-1, 1] (``x / 127.5 - 1``, Wan's normalisation)."""
    return video_u8.astype(jnp.float32) / 127.5 - 1.0


def _batched(fn: Callable[[np.ndarray], jax.Array], arrays: np.ndarray, batch: int) -> np.ndarray:
    """Apply ``fn`` to ``arrays`` in chunks of ``batch`` (the last chunk padded, so one compile)."""
    n = arrays.shape[0]
    out = []
    for s in range(0, n, batch):
        chunk = arrays[s:s + batch]
        pad = batch - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        out.append(np.asarray(jax.device_get(fn(chunk)))[:batch - pad])
    return np.concatenate(out)


@functools.lru_cache(maxsize=16)
def _vae_fn(graphdef, kind: str, num_latent: int = 0):
    """One jitted function per (VAE graph, kind), shared by every VAE with that graph (the state is an
    argument), so reloading or re-exporting a VAE does not recompile. kind: ``encode`` (uint8 video
    -> latents), ``reference_y`` (uint8 references -> y without the reference pose), ``roundtrip``
    (uint8 video -> decode(encode(video)) in [-1, 1])."""
    from flax import nnx

    if kind == "encode":
        return jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(to_m11(v)))
    if kind == "roundtrip":
        def roundtrip(s, v):
            vae = nnx.merge(graphdef, s)
            return vae.decode(vae.encode(to_m11(v)))

        return jax.jit(roundtrip)
    if kind == "reference_y":
        T = 4 * (num_latent - 1) + 1

        def one(s, refs):
            B, H, W, _ = refs.shape
            video = jnp.zeros((B, T, H, W, 3), jnp.float32).at[:, 0].set(to_m11(refs))
            lat = nnx.merge(graphdef, s).encode(video)
            mask = jnp.zeros(lat.shape[:4] + (4,), jnp.float32).at[:, 0].set(1.0)
            return jnp.concatenate([mask, lat.astype(jnp.float32)], axis=-1)

        return jax.jit(one)
    raise ValueError(kind)


def _apply(vae, kind: str, arrays: np.ndarray, batch: int, num_latent: int = 0) -> np.ndarray:
    from flax import nnx

    gd, st = nnx.split(vae)
    fn = _vae_fn(gd, kind, num_latent)
    return _batched(lambda c: fn(st, c), arrays, batch)


def encode_videos(vae, videos_u8: np.ndarray, batch: int = 16) -> np.ndarray:
    """VAE latents (normalised with the VAE config's constants) of uint8 videos ``[N, T, H, W, 3]``
    -> float32 ``[N, F, h, w, z]``."""
    return _apply(vae, "encode", videos_u8, batch)


def roundtrip_videos(vae, videos_u8: np.ndarray, batch: int = 4) -> np.ndarray:
    """``decode(encode(video))`` in [-1, 1] (float32) of uint8 videos ``[N, T, H, W, 3]``."""
    return _apply(vae, "roundtrip", videos_u8, batch)


def reference_y(vae, refs_u8: np.ndarray, num_latent: int, batch: int = 8) -> np.ndarray:
    """``y`` without the reference-pose features for uint8 references ``[N, H, W, 3]``: mask
    ``[N, F, h, w, 4]`` (1 on latent frame 0) next to the latents of ``[ref, grey, ...]`` (4(F-1)+1
    frames). Equal to ``wanjax.pipeline.build_y(vae, ref, F, None)`` for every reference."""
    return _apply(vae, "reference_y", refs_u8, batch, int(num_latent))


def channel_stats(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64) of latents ``[..., C]``; a std of 0 becomes 1."""
    x = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    mean, std = x.mean(0), x.std(0)
    return mean, np.where(std > 1e-8, std, 1.0)


# ---------------------------------------------------------------------------------------------
# Map-style datasets for wanjax.training.BatchIterator
# ---------------------------------------------------------------------------------------------
class ArrayDataset:
    """``dataset[i] -> {name: arrays[name][i]}`` plus fixed ``constants`` (the same array in every
    sample, e.g. the text context). Host numpy arrays; the shared loop stacks and places batches."""

    def __init__(self, arrays: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray] | None = None):
        sizes = {k: int(np.shape(v)[0]) for k, v in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"ArrayDataset: arrays must share their first axis, got {sizes}")
        self.n = next(iter(sizes.values()))
        self.arrays = dict(arrays)
        self.constants = {k: np.asarray(v) for k, v in (constants or {}).items()}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {**{k: v[i] for k, v in self.arrays.items()}, **self.constants}


def teacher_dataset(clips: Clips, x0: np.ndarray, ref_y: np.ndarray, context: np.ndarray) -> ArrayDataset:
    """Samples for :func:`wanjax.world.losses.teacher_flow_loss` (the key names of the teacher
    targets of ``wanjax.distill``: x0, ref_y, pose, ref_pose, context)."""
    return ArrayDataset({"x0": x0, "ref_y": ref_y, "pose": clips.pose, "ref_pose": clips.ref_pose},
                        {"context": context})
