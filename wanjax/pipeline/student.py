"""Causal few-step student: block-by-block generation with a KV cache and streaming decode.

Algorithm (self_forcing.md 4.2-4.4, 8.2; unianimate_dit.md 12.2):

* Latents are generated in blocks of ``num_frame_per_block`` (3) frames. For each block, 4 denoising
  steps at the warped timesteps of :func:`wanjax.sampling.student_schedule` (shift 5:
  1000, 937.5, 833.3, 625): ``x0 = x - sigma * G(x, t)``; between steps ``x = renoise(x0, eps, sigma')``
  with fresh noise. The block's output is the last x0 (no final Euler step).
* Then a context pass at t = 0 on the clean x0 rewrites the block's K/V slots of the cache
  (skipped after the last block of a finite run). All 5 forwards are one jitted function with the
  cache donated; the start frame is a traced int32, so the same executable serves every block
  (a second executable exists for the no-context-pass last block).
* Cross-attention K/V (text, CLIP) are computed once; ``y`` (reference latent + ref-pose) and the
  pose tokens are sliced to the block's absolute latent frames, in the denoising passes *and* in the
  context pass. RoPE frame positions are absolute, so a rolling cache (``local_attn_size`` frames,
  the first ``sink_size`` pinned) gives unbounded length.
* Every block is decoded right away with :class:`wanjax.models.vae.StreamingDecoder`: 9 pixel frames
  for the first block, 12 for each later one (equal to decoding all latents at once).

Determinism: the block noise and the 3 re-noising draws come from
``fold_in(fold_in(key(seed), block), j)`` (j = 0 initial noise, j = 1..3 re-noising). A block's
randomness depends only on (seed, block index), so streaming, batch and interactive runs agree.

Pose tokens and the encoder's lookahead. The pose encoder's receptive field around latent frame i
is padded pose frames [4i-7, 4i+7] (unianimate_dit.md 3.3): it sees **one latent frame (4 pose
frames) of future**. Tokens are computed per block from a window with a 2-latent halo, which is
exact (equal to encoding the whole video at once) for a whole pose video as well. In
interactive mode (pose frames from an iterator) block b (latents [3b, 3b+3)) starts as soon as pose
frames up to original index 12b+12 exist (or the stream ended); its tokens are computed from padded
frames [4(3b-2), 4(3b+4)), which is exact: the result equals the whole-video computation. A live
pose source therefore adds a delay of 4 pose frames on top of the block's own 12.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from wanjax import sampling
from wanjax.pipeline import PipelineError, PoseDiT, Reference, latent_frames, uses_pose


class BlockResult(tuple):
    """``(block_index, frames uint8 [n, H, W, 3] or None, timings)`` plus ``.latents`` [1, nfb, h, w, C]."""

    def __new__(cls, index, frames, timings, latents):
        obj = super().__new__(cls, (index, frames, timings))
        obj.latents = latents
        return obj

    @property
    def index(self) -> int:
        return self[0]

    @property
    def frames(self):
        return self[1]

    @property
    def timings(self) -> dict:
        return self[2]


class _PoseFeed:
    """Pose frames -> per-block pose tokens, from a whole video or an incremental iterator."""

    HALO = 2  # latent groups of left context needed for an exact chunk (receptive field 7 frames)

    def __init__(self, model: PoseDiT, pose, num_latent: int | None, nfb: int, whole: bool = False):
        self.model, self.nfb = model, nfb
        self.num_latent = num_latent
        self.whole = whole  # whole pose video: encode every block's tokens in one call (batch mode)
        self._all = None
        self.wait_s = 0.0
        if isinstance(pose, np.ndarray) or isinstance(pose, jax.Array):
            a = np.asarray(pose)
            if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
                raise PipelineError(f"pose frames must be uint8 [T, H, W, 3], got {a.dtype} {a.shape}")
            if num_latent is None:
                num_latent = (a.shape[0] - 1) // 4 + 1
                num_latent -= num_latent % nfb
                self.num_latent = num_latent
            need = 4 * (num_latent - 1) + 1
            if a.shape[0] < need:
                raise PipelineError(f"the pose video has {a.shape[0]} frames; {need} are needed for "
                                    f"{num_latent} latent frames (num_frames={need})")
            self.frames = a[:need]
            self.iterator = None
            self.ended = True
            # tokens are computed per block (exact, with the halo below), not for the whole video
            # up front: the first block starts sooner and the encoder's activations stay small
            self.encode_s = 0.0
            self._buf = list(self.frames)
            self._shape = self.frames.shape[1:]
        else:
            self.frames = None
            self.iterator = iter(pose)
            self.ended = False
            self.encode_s = 0.0
            self._buf: list[np.ndarray] = []
            self._shape = None

    @property
    def frame_shape(self):
        if self.frames is not None:
            return self.frames.shape[1:3]
        self._fill(1)
        if not self._buf:
            raise PipelineError("the pose stream ended before its first frame")
        return self._buf[0].shape[:2]

    def _fill(self, count: int) -> None:
        """Pull from the iterator until ``count`` pixel frames are buffered or it ends."""
        t0 = time.perf_counter()
        while len(self._buf) < count and not self.ended:
            try:
                f = next(self.iterator)
            except StopIteration:
                self.ended = True
                break
            f = np.asarray(f)
            for g in (f if f.ndim == 4 else f[None]):
                if g.ndim != 3 or g.shape[-1] != 3 or g.dtype != np.uint8:
                    raise PipelineError(f"pose frame {len(self._buf)}: expected uint8 [H, W, 3], got "
                                        f"{g.dtype} {g.shape}")
                if self._shape is None:
                    self._shape = g.shape
                elif g.shape != self._shape:
                    raise PipelineError(f"pose frame {len(self._buf)} has shape {g.shape}, the first had "
                                        f"{self._shape}")
                self._buf.append(g)
        self.wait_s += time.perf_counter() - t0

    def available(self, b: int) -> bool:
        """Can block ``b`` run (its frames plus the one-latent lookahead exist, or the stream ended)?"""
        e = (b + 1) * self.nfb  # exclusive latent end
        if self.num_latent is not None and e > self.num_latent:
            return False
        if self.frames is not None:
            return True
        need_own = 4 * (e - 1) + 1
        cap = 4 * (self.num_latent - 1) + 1 if self.num_latent is not None else None
        need = 4 * e + 1 if cap is None else min(4 * e + 1, cap)  # + lookahead group
        self._fill(need)
        if len(self._buf) >= need:
            return True
        if self.num_latent is not None:
            raise PipelineError(f"the pose stream ended after {len(self._buf)} frames; "
                                f"{4 * (self.num_latent - 1) + 1} were requested (num_frames)")
        return len(self._buf) >= need_own  # stream ended: the last block has no lookahead

    def tokens(self, b: int) -> jax.Array:
        s, e = b * self.nfb, (b + 1) * self.nfb
        if self.whole and self.frames is not None:
            if self._all is None:  # one call over the whole video (time-chunked inside: exact)
                padded = np.concatenate([np.repeat(self.frames[:1], 3, 0), self.frames])[None]  # uint8
                t0 = time.perf_counter()
                self._all = self.model.pose_tokens(padded)
                self.encode_s += time.perf_counter() - t0
            return self._all[:, s:e]
        lo = max(s - self.HALO, 0)
        hi_pad = min(4 * (e + 1), 3 + len(self._buf))  # padded frames available (3 repeats in front)
        if self.num_latent is not None:
            hi_pad = min(hi_pad, 4 * self.num_latent)
        hi_pad -= hi_pad % 4
        padded_lo = 4 * lo
        # padded index p -> original frame max(p - 3, 0)
        idx = np.maximum(np.arange(padded_lo, hi_pad) - 3, 0)
        window = np.stack([self._buf[i] for i in idx])[None]  # uint8: scaled to [0, 1] on the device
        t0 = time.perf_counter()
        tok = self.model.pose_tokens(window)
        self.encode_s += time.perf_counter() - t0
        return tok[:, s - lo:e - lo]


class StudentPipeline:
    """Causal few-step generation (see the module docstring).

    Args:
      model: ``WanDiT``, :class:`wanjax.pipeline.PoseDiT` or a ``unianimate.PoseDiT``.
      vae: ``WanVAE`` for streaming decode (None: latents only, ``frames`` is None).
      shift, steps: the student schedule (Self-Forcing: 5.0, (1000, 750, 500, 250)).
      vae_chunk: latent frames per VAE decoder pass inside a block (1: frame by frame, the lowest
        memory; None: the whole block at once). The frames are the same either way.
    """

    def __init__(self, model, vae=None, *, shift: float = 5.0, steps=(1000, 750, 500, 250),
                 mode: str = "pose+image", vae_chunk: int | None = 1):
        self.model = PoseDiT.wrap(model)
        self.vae_chunk = vae_chunk
        self._decoder = None
        self._compiled: set = set()
        self.dit = self.model.dit
        self.vae = vae
        self.mode = mode
        cfg = self.dit.cfg
        self.nfb = cfg.num_frame_per_block
        ts, sig = sampling.student_schedule(shift, tuple(steps))
        self.timesteps = [float(t) for t in ts]
        self.sigmas = [float(s) for s in sig]
        gd, self._state = nnx.split(self.dit)
        self._gd = gd
        self.dit = nnx.merge(gd, self._state)  # private view: later edits of the caller's cfg don't leak in
        self._ckv_fn = jax.jit(lambda st, c, f: nnx.merge(gd, st).context_kv(c, f))
        self._block_fn = jax.jit(self._block_impl, static_argnames=("context", "hw"), donate_argnums=(3,))

    # -- the one jitted block -------------------------------------------------------------------
    def _block_impl(self, state, key, ckv, cache, start, y, pose, *, context: bool, hw: tuple):
        model = nnx.merge(self._gd, state)
        cfg = model.cfg
        B, nfb = 1, self.nfb
        shape = (B, nfb) + tuple(hw) + (cfg.out_dim,)
        cdt = cfg.compute_dtype
        x = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32).astype(cdt)
        x0 = x
        for j, (tj, sj) in enumerate(zip(self.timesteps, self.sigmas)):
            t = jnp.full((B, nfb), tj, jnp.float32)
            flow, cache = model.forward_cached(x, t, ckv, cache, start, y=y, pose=pose)
            x0 = sampling.x0_from_flow(x, flow, sj)
            if j + 1 < len(self.timesteps):
                eps = jax.random.normal(jax.random.fold_in(key, j + 1), shape, jnp.float32)
                x = sampling.renoise(x0, eps.astype(cdt), self.sigmas[j + 1])
        if context:
            _, cache = model.forward_cached(x0, jnp.zeros((B, nfb), jnp.float32), ckv, cache, start,
                                            y=y, pose=pose)
        return x0, cache

    def _precompile(self, ckv, y, pose, T: int, decoder, feed, variants=(True, False)) -> None:
        """Compile every executable of a stream (both block variants, the VAE steps, the pose
        windows) before the KV cache is allocated. XLA's autotuning tries convolution and GEMM
        algorithms with large scratch buffers while it compiles; done here, that happens with only
        the weights resident, so the first video peaks no higher than later ones (the compiled
        executables land in the jit caches, later calls reuse them)."""
        nfb, hw = self.nfb, self._latent_hw
        sig = (hw, T, y is None, pose is None, decoder is not None, tuple(variants), bool(feed and feed.whole))
        if sig in self._compiled:
            return
        cache = jax.eval_shape(lambda: self.dit.init_cache(1, T))
        for context in variants:
            self._block_fn.lower(self._state, jax.random.key(0), ckv, cache, jnp.int32(0), y, pose,
                                 context=context, hw=hw).compile()
        if decoder is not None:
            decoder.precompile((1, nfb) + tuple(hw) + (self.dit.cfg.out_dim,), self.dit.cfg.compute_dtype)
        if feed is not None and not feed.whole:  # whole-video tokens exist already (computed first)
            H, W = 16 * (hw[0] // 2), 16 * (hw[1] // 2)
            for groups in (nfb + 3, nfb + 2):  # a middle block's window, the last block's window
                self.model.precompile_pose((1, 4 * groups, H, W, 3))
        self._compiled.add(sig)

    # -- public API ------------------------------------------------------------------------------
    def cross_kv(self, context, clip_fea=None):
        ctx = jnp.asarray(context, self.dit.cfg.compute_dtype)
        cf = None if clip_fea is None else jnp.asarray(clip_fea, jnp.float32)
        return self._ckv_fn(self._state, ctx, cf)

    def stream(self, context, pose=None, *, reference: Reference | None = None, num_frames: int | None = None,
               seed: int = 0, size: tuple[int, int] | None = None, decode: bool = True,
               latency: bool = True) -> Iterator[BlockResult]:
        """Yield :class:`BlockResult` ``(block_index, frames, timings)`` as soon as each block is decoded.

        Args:
          context: text context [1, text_len, text_dim].
          pose: uint8 pose frames [T, H, W, 3] (whole video), or an iterable of frames ([H, W, 3]
            or [n, H, W, 3]) arriving over time (interactive), or None (mode ``image``).
          reference: y / CLIP from :func:`wanjax.pipeline.make_reference` (None: no reference).
          num_frames: pixel frames 4k+1 with k+1 a multiple of the block size; None = as many whole
            blocks as the pose frames allow (unbounded for an endless iterator; needs a rolling cache).
          seed: all noise is ``jax.random`` from this seed, folded by block and step.
          size: (H, W) pixels when no pose is given.
          decode: decode frames (needs a VAE); otherwise ``frames`` is None.
          latency: with a whole pose video, encode each block's pose tokens just before the block
            (the first block starts soonest; the default for streaming). False encodes the whole
            video in one call up front (less pose-encoder work: no per-block halo; what
            :meth:`generate` does). The tokens are the same either way.
        """
        cfg = self.dit.cfg
        nfb = self.nfb
        t_start = time.perf_counter()
        reference = reference or Reference(None, None)
        num_latent = None
        if num_frames is not None:
            num_latent = latent_frames(num_frames)
            if num_latent % nfb:
                raise PipelineError(f"--num_frames={num_frames} gives {num_latent} latent frames, not a multiple "
                                    f"of the block size {nfb}; use 4*{nfb}*k-3 frames (e.g. "
                                    f"{4 * nfb * max(1, num_latent // nfb) - 3})")
        use_pose = uses_pose(self.mode, self.model)
        if use_pose and pose is None:
            raise PipelineError("this model/mode needs pose frames (--pose)")
        feed = _PoseFeed(self.model, pose, num_latent, nfb, whole=not latency) if use_pose else None
        if feed is not None:
            num_latent = feed.num_latent
            H, W = feed.frame_shape
        else:
            if size is None or num_latent is None:
                raise PipelineError("without pose frames pass size=(H, W) and num_frames")
            H, W = size
        if H % 16 or W % 16:
            raise PipelineError(f"video size {H}x{W} must be a multiple of 16 (VAE 8 x patch 2)")
        self._latent_hw = (H // 8, W // 8)
        if num_latent is not None and cfg.local_attn_size == -1 and num_latent > cfg.max_frames:
            raise PipelineError(f"{num_latent} latent frames exceed the KV cache of max_frames={cfg.max_frames}; "
                                f"set --config.model.local_attn_size (rolling cache, with sink_size) or raise "
                                f"--config.model.max_frames")
        if num_latent is None and cfg.local_attn_size == -1:
            raise PipelineError("an unbounded run needs a rolling cache: set --config.model.local_attn_size "
                                "(e.g. 21) and --config.model.sink_size (e.g. 3)")
        if decode and self.vae is None:
            raise PipelineError("decode=True needs a VAE")
        ckv = self.cross_kv(context, reference.clip_fea)
        T = (H // 16) * (W // 16)
        cache = None  # allocated once block 0's inputs exist, after compiling (see _precompile)
        base = jax.random.key(seed)
        decoder = None
        if decode:
            if self._decoder is None:  # compiled once per pipeline; each stream gets its own caches
                from wanjax.models.vae import StreamingDecoder
                self._decoder = StreamingDecoder(self.vae, chunk=self.vae_chunk, uint8=True)
            decoder = self._decoder.fork()
        b = 0
        first_latency = None
        while True:
            if num_latent is not None and (b + 1) * nfb > num_latent:
                break
            tb = time.perf_counter()
            w0 = feed.wait_s if feed else 0.0
            if feed is not None and not feed.available(b):
                break
            e0 = feed.encode_s if feed else 0.0
            pose_tok = feed.tokens(b) if feed else None
            last = num_latent is not None and (b + 2) * nfb > num_latent
            s = b * nfb
            y = reference.y_slice(s, nfb)
            if cache is None:
                # the block variants this run will use: with the context pass unless it is the last
                # block of a finite run; without it only for that last block
                variants = tuple(v for v in (True, False)
                                 if (v and (num_latent is None or num_latent > nfb))
                                 or (not v and num_latent is not None))
                self._precompile(ckv, y, pose_tok, T, decoder, feed, variants)
                cache = self.dit.init_cache(1, T)
            td = time.perf_counter()
            x0, cache = self._block_fn(self._state, jax.random.fold_in(base, b), ckv, cache, jnp.int32(s),
                                       y, pose_tok, context=not last, hw=self._latent_hw)
            x0 = jax.block_until_ready(x0)
            t_den = time.perf_counter() - td
            frames = None
            t_dec = 0.0
            if decoder is not None:
                tc = time.perf_counter()
                frames = np.asarray(jax.device_get(decoder.push(x0))[0])  # uint8, made on device
                t_dec = time.perf_counter() - tc
            now = time.perf_counter()
            if first_latency is None:
                first_latency = now - t_start
            timings = {"block": b, "start_frame": s, "pose_wait_s": (feed.wait_s - w0) if feed else 0.0,
                       "pose_encode_s": (feed.encode_s - e0) if feed else 0.0, "denoise_s": t_den,
                       "decode_s": t_dec, "block_s": now - tb, "since_start_s": now - t_start,
                       "first_frame_latency_s": first_latency, "context_pass": not last,
                       "frames": 0 if frames is None else int(frames.shape[0])}
            yield BlockResult(b, frames, timings, x0)
            b += 1

    def generate(self, context, pose=None, **kw) -> dict:
        """Batch mode: collect :meth:`stream`. Returns ``frames`` uint8 [N, H, W, 3] (or None),
        ``latents`` [1, F, h, w, C] and ``timings`` (one dict per block)."""
        kw.setdefault("latency", False)  # nobody sees a block before the last: least total work
        blocks = list(self.stream(context, pose, **kw))
        if not blocks:
            raise PipelineError("no block could be generated (too few pose frames for one block)")
        frames = None if blocks[0].frames is None else np.concatenate([r.frames for r in blocks])
        return {"frames": frames, "latents": jnp.concatenate([r.latents for r in blocks], axis=1),
                "timings": [r.timings for r in blocks]}
