"""Bidirectional teacher sampling (UniAnimate-DiT on Wan2.1-I2V-14B, or any WanDiT).

* Sampler: FlowMatch Euler on :func:`wanjax.sampling.euler_sigmas` (UniAnimate's default; timesteps
  ``1000 * sigma``, fed in float32 - UniAnimate feeds them in bf16, a quirk of its pipeline not copied) or
  Wan's flow-UniPC (:func:`wanjax.sampling.unipc_schedule`, truncated integer timesteps).
  Defaults (unianimate_dit.md 8): 50 steps, shift 5, CFG 1.5.
* CFG (unianimate_dit.md 6): ``v = v_neg + s (v_pos - v_neg)``; the positive branch has the prompt,
  CLIP, y (with the reference pose) and the pose tokens; the **negative branch uses the negative
  prompt and drops the pose tokens but keeps CLIP and y**. ``cfg_scale == 1`` skips it. Both
  branches run as one batch of 2 (``cfg_batch``, default): one launch per step, and on a mesh with
  2 devices on (data, fsdp) each device computes one branch ("CFG parallel", ~2x on 2 GPUs).
* Long videos (unianimate_dit.md 9): windows of ``window`` (21) latent frames starting at 0, 17, 34,
  ... (stride window - overlap) while start < N - overlap, the last window forced to [N - 21, N).
  Every window is evaluated at every step on the current latents with its own pose tokens (pixel
  frames [4s, 4s + 80], frame 0 of the window repeated 3x) and the shared y/CLIP of the first 21
  frames (every window sees the reference as its frame 0, as in UniAnimate). The window flows are
  averaged per frame and one global sampler step is taken. Simplification: UniAnimate's two
  "private" leading frames per window (fresh unseeded noise, discarded when accumulating) are not
  reproduced; for Euler, averaging x_{t-1} over windows (UniAnimate) equals averaging flows (here)
  when all windows start from the same latents. Videos shorter than a window run as one window.
* Sharding: parameters are restored sharded over the mesh by the loaders (``wanjax.sharding``
  logical rules: fsdp/tensor); latents and conditioning are placed batch-sharded (``batch`` ->
  data x fsdp; batch 1 replicates them). T5 runs first and is freed before the DiT is loaded
  (:func:`wanjax.pipeline.encode_prompts`).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from wanjax import sampling
from wanjax.sharding import MeshJit
from wanjax.pipeline import PipelineError, PoseDiT, Reference, latent_frames, pad_pose, uses_pose


def window_starts(num_latent: int, size: int = 21, overlap: int = 4) -> list[int]:
    """UniAnimate's window starts (context_stride 1): 0, size-overlap, ... while j < N - overlap, the
    last one forced to N - size; a single window [0, N) when N <= size."""
    if num_latent <= size:
        return [0]
    if not 0 <= overlap < size:
        raise PipelineError(f"--config.window.overlap={overlap} must be in [0, window.size={size})")
    starts = list(range(0, num_latent - overlap, size - overlap))
    starts[-1] = num_latent - size
    return sorted(set(starts))


class TeacherPipeline:
    def __init__(self, model, vae=None, *, sampler: str = "euler", steps: int = 50, shift: float = 5.0,
                 cfg_scale: float = 1.5, window: int = 21, overlap: int = 4, mesh=None,
                 mode: str = "pose+image", cfg_batch: bool = True):
        if sampler not in ("euler", "unipc"):
            raise PipelineError(f"--config.sampler.name={sampler!r}; choose euler (UniAnimate) or unipc (Wan)")
        self.model = PoseDiT.wrap(model)
        self.dit = self.model.dit
        self.vae = vae
        self.sampler, self.steps, self.shift = sampler, int(steps), float(shift)
        self.cfg_scale = float(cfg_scale)
        self.window, self.overlap = int(window), int(overlap)
        self.mesh = mesh
        self.mode = mode
        gd, self._state = nnx.split(self.dit)
        scale = self.cfg_scale
        self.cfg_batch = cfg_batch = bool(cfg_batch)

        def flow(state, x, t, ckv_pos, ckv_neg, y, pose):
            m = nnx.merge(gd, state)
            tt = jnp.full(x.shape[:2], t, jnp.float32)
            if ckv_neg is None:
                return m(x, tt, ckv=ckv_pos, y=y, pose=pose)
            if not cfg_batch:
                v_pos = m(x, tt, ckv=ckv_pos, y=y, pose=pose)
                v_neg = m(x, tt, ckv=ckv_neg, y=y, pose=None)  # asymmetric: no pose, same y/CLIP
                return sampling.cfg(v_neg, v_pos, scale)
            # Both branches as one batch of 2 [pos, neg]: the negative gets zero pose tokens (the
            # tokens are added to the patch embedding, so zeros == no pose). On a mesh the batch is
            # sharded over (data, fsdp): 2 devices run one branch each.
            B = x.shape[0]
            x2 = self._constrain(jnp.concatenate([x, x]))
            ckv2 = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), ckv_pos, ckv_neg)
            y2 = None if y is None else self._constrain(jnp.concatenate([y, y]))
            p2 = None if pose is None else self._constrain(jnp.concatenate([pose, jnp.zeros_like(pose)]))
            v = m(x2, jnp.concatenate([tt, tt]), ckv=ckv2, y=y2, pose=p2)
            return sampling.cfg(v[B:], v[:B], scale)

        self._flow = MeshJit(jax.jit(flow), mesh)  # traced under the mesh: attention co-shards q/k/v
        self._ckv = MeshJit(jax.jit(lambda st, c, f: nnx.merge(gd, st).context_kv(c, f)), mesh)

    def schedule(self) -> tuple[np.ndarray, np.ndarray]:
        if self.sampler == "euler":
            sig = sampling.euler_sigmas(self.steps, self.shift)
            return sig, (sig[:-1] * 1000.0).astype(np.float32)
        return sampling.unipc_schedule(self.steps, self.shift)

    def _constrain(self, a):
        """Inside jit: pin a [B, ...] activation batch-sharded on the mesh (no-op without one)."""
        if self.mesh is None:
            return a
        from wanjax.sharding import named_sharding

        axes = ("batch",) + (None,) * (a.ndim - 1)
        return jax.lax.with_sharding_constraint(a, named_sharding(self.mesh, *axes, shape=a.shape))

    def _place(self, a):
        if a is None or self.mesh is None:
            return a
        from wanjax.sharding import named_sharding

        axes = ("batch",) + (None,) * (a.ndim - 1)
        return jax.device_put(a, named_sharding(self.mesh, *axes, shape=a.shape))

    def sample(self, context, negative, pose=None, *, reference: Reference | None = None,
               num_frames: int, seed: int = 0, size: tuple[int, int] | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
        """Denoise; returns ``latents`` [1, F, h, w, C] and ``timings``.

        ``pose``: uint8 [T >= num_frames, H, W, 3] at the video size (None in ``image`` mode, then
        pass ``size``). ``negative``: negative-prompt context (needed when cfg_scale != 1).
        """
        cfg = self.dit.cfg
        t0 = time.perf_counter()
        reference = reference or Reference(None, None)
        F = latent_frames(num_frames)
        use_pose = uses_pose(self.mode, self.model)
        if use_pose:
            if pose is None:
                raise PipelineError("this model/mode needs pose frames (--pose)")
            pose = np.asarray(pose)
            if pose.shape[0] < num_frames:
                raise PipelineError(f"the pose video has {pose.shape[0]} frames, --num_frames={num_frames}")
            H, W = pose.shape[1:3]
        else:
            if size is None:
                raise PipelineError("without pose frames pass size=(H, W)")
            H, W = size
        if H % 16 or W % 16:
            raise PipelineError(f"video size {H}x{W} must be a multiple of 16")
        wsize = min(self.window, F)
        starts = window_starts(F, self.window, self.overlap)
        windows = []
        for s in starts:
            tok = None
            if use_pose:
                px = pose[4 * s:4 * s + 4 * (wsize - 1) + 1]
                tok = self._place(self.model.pose_tokens(pad_pose(px)))
            windows.append((s, tok, self._place(reference.y_slice(0, wsize))))
        cdt = cfg.compute_dtype
        ckv_pos = self._ckv(self._state, jnp.asarray(context, cdt), reference.clip_fea)
        ckv_neg = None
        if self.cfg_scale != 1.0:
            if negative is None:
                raise PipelineError("cfg_scale != 1 needs a negative prompt context")
            ckv_neg = self._ckv(self._state, jnp.asarray(negative, cdt), reference.clip_fea)
        x = jax.random.normal(jax.random.key(seed), (1, F, H // 8, W // 8, cfg.out_dim), jnp.float32)
        x = self._place(x.astype(cdt))
        sigmas, timesteps = self.schedule()
        step_times = []
        counter = {"i": 0}

        def model_fn(xc, t):
            ts = time.perf_counter()
            if len(windows) == 1:
                out = self._flow(self._state, xc, t, ckv_pos, ckv_neg, windows[0][2], windows[0][1])
            else:
                acc = jnp.zeros(xc.shape, jnp.float32)
                cnt = np.zeros((F,), np.float32)
                for s, tok, y in windows:
                    v = self._flow(self._state, xc[:, s:s + wsize], t, ckv_pos, ckv_neg, y, tok)
                    acc = acc.at[:, s:s + wsize].add(v.astype(jnp.float32))
                    cnt[s:s + wsize] += 1
                out = acc / jnp.asarray(cnt)[None, :, None, None, None]
            out = jax.block_until_ready(out)
            step_times.append(time.perf_counter() - ts)
            counter["i"] += 1
            if progress is not None:
                progress(counter["i"], len(timesteps))
            return out

        if self.sampler == "euler":
            lat = sampling.sample_euler(model_fn, x, sigmas, timesteps)
        else:
            lat = sampling.sample_unipc(model_fn, x, sigmas, timesteps)
        lat = jax.block_until_ready(lat)
        return {"latents": lat, "windows": starts, "step_s": step_times,
                "denoise_s": time.perf_counter() - t0}

    def decode_stream(self, latents, chunk: int = 3) -> Iterator[tuple[int, np.ndarray, dict]]:
        """Decode with the streaming VAE in chunks of ``chunk`` latent frames (9 then 12 frames per
        3 latents; equal to a whole decode), yielding ``(chunk_index, frames uint8, timings)``."""
        from wanjax.models.vae import StreamingDecoder

        if self.vae is None:
            raise PipelineError("decoding needs a VAE")
        if getattr(self, "_decoder", None) is None:  # compiled once per pipeline
            self._decoder = StreamingDecoder(self.vae, chunk=1, uint8=True)
        dec = self._decoder.fork()
        for i, s in enumerate(range(0, latents.shape[1], chunk)):
            t0 = time.perf_counter()
            fr = np.asarray(jax.device_get(dec.push(latents[:, s:s + chunk]))[0])
            yield i, fr, {"block": i, "decode_s": time.perf_counter() - t0, "frames": int(fr.shape[0])}

    def generate(self, context, negative, pose=None, **kw) -> dict:
        """Sample and decode everything: ``frames`` uint8 [1+4(F-1), H, W, 3], ``latents``, timings."""
        out = self.sample(context, negative, pose, **kw)
        parts = [fr for _, fr, _ in self.decode_stream(out["latents"])] if self.vae is not None else None
        out["frames"] = None if parts is None else np.concatenate(parts)
        return out
