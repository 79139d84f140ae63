"""Flow-matching schedules, classifier-free guidance and samplers.

Conventions (wan_components.md §7.1, self_forcing.md §4.3):

* Forward process ``x_sigma = (1 - sigma) * x0 + sigma * eps`` with ``sigma`` in [0, 1].
* The DiT predicts the *flow* (velocity) ``v = eps - x0``, so ``x0 = x_sigma - sigma * v``.
* Shift: ``sigma' = s * sigma / (1 + (s - 1) * sigma)``.

What lives here:

* Schedule tables (numpy, built exactly like the reference code so that they agree bit for bit with
  the PyTorch / numpy originals): :func:`unipc_sigmas` / :func:`unipc_schedule` (Wan's UniPC grid),
  :func:`euler_sigmas` (UniAnimate's FlowMatch-Euler grid, equal to Wan's DPM++ grid),
  :class:`FlowMatchGrid` (Self-Forcing / UniAnimate 1000-point training grid) and
  :func:`student_schedule` (Self-Forcing's warped 4-step list).
* Pure jax functions, usable inside ``jax.jit`` and loops: :func:`cfg`, :func:`cfg_x0_dmd`,
  :func:`x0_from_flow`, :func:`flow_from_x0`, :func:`renoise`, the flow-UniPC solver
  (:class:`UniPCState`, :func:`unipc_init`, :func:`unipc_step`) and the drivers
  :func:`sample_unipc`, :func:`sample_euler`, :func:`sample_few_step`.

Tensor shapes are arbitrary (``x`` is any latent array, e.g. ``[B, F, H, W, C]``); a per-sample or
per-frame sigma / timestep array must be a *prefix* of ``x``'s shape (``[]``, ``[B]`` or ``[B, F]``)
and is broadcast over the trailing axes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "shift_sigma", "torch_linspace_f32", "unipc_sigmas", "unipc_schedule", "model_timesteps",
    "euler_sigmas", "wan_dpm_schedule", "flow_timesteps", "FlowMatchGrid", "student_schedule",
    "x0_from_flow", "flow_from_x0", "renoise", "cfg", "cfg_x0_dmd", "make_cfg_model_fn",
    "UniPCState", "unipc_init", "unipc_step", "sample_unipc", "sample_euler", "sample_few_step",
]

WAN_UNIPC_SIGMA_MAX = float(np.float32(0.999))
"""Wan's UniPC grid starts from float32(0.999) (= 1 - 1/num_train_timesteps of its training grid)."""


# ----------------------------------------------------------------------------------------------
# Schedule tables (numpy)
# ----------------------------------------------------------------------------------------------

def _check_steps_shift(num_steps: int, shift: float) -> None:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite positive number, got {shift!r}")


def shift_sigma(sigma, shift: float):
    """Timestep shift ``s*sigma / (1 + (s-1)*sigma)``; works on floats, numpy and jax arrays.

    Keeps the input's dtype (a Python-float ``shift`` is weakly typed in numpy and jax).
    """
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite positive number, got {shift!r}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 ``a*b + c`` (a fused multiply-add) for float32 inputs.

    The float64 product of two float32 values is exact; the float64 sum is then rounded to float32.
    That double rounding is only wrong when the float64 sum lies exactly on a float32 midpoint while
    the exact sum does not; the exact residual (TwoSum) decides those cases.
    """
    a64, b64, c64 = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a64 * b64
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    lo = np.where(r64 <= s, r, np.nextafter(r, np.float32(-np.inf)))
    hi = np.nextafter(lo, np.float32(np.inf))
    mid = (lo.astype(np.float64) + hi.astype(np.float64)) / 2
    tie = (s == mid) & (err != 0)
    return np.where(tie, np.where(err > 0, hi, lo), r).astype(np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32 on CPU, reproduced bit for bit.

    PyTorch's CPU kernel computes ``step = (end - start) / (steps - 1)`` in float32 and then
    ``start + step*i`` for the first half and ``end - step*(steps-1-i)`` for the second half, each a
    fused multiply-add. (Checked against torch 2.13 on CPU for many sizes in the tests.)

    Returns:
      float32 array ``[steps]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    first = _fma_f32(step, idx.astype(np.float32), start32)
    second = _fma_f32(-step, (steps - 1 - idx).astype(np.float32), end32)
    return np.where(idx < steps // 2, first, second).astype(np.float32)


def _unipc_sigmas_f64(num_steps: int, shift: float) -> np.ndarray:
    sig = np.linspace(WAN_UNIPC_SIGMA_MAX, 0.0, num_steps + 1)[:-1]
    return shift * sig / (1 + (shift - 1) * sig)


def unipc_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """Wan's ``FlowUniPCMultistepScheduler`` grid (wan_components.md §7.3).

    ``shift(linspace(float32(0.999), 0, N+1)[:-1])`` computed in float64 as Wan does, with a final 0
    appended, then cast to float32.

    Returns:
      float32 array ``[num_steps + 1]``; the last value is 0.
    """
    _check_steps_shift(num_steps, shift)
    return np.concatenate([_unipc_sigmas_f64(num_steps, shift), [0.0]]).astype(np.float32)


def model_timesteps(sigmas) -> np.ndarray:
    """Integer model timesteps ``int64(sigma * 1000)`` (truncated, not rounded), as float32.

    Elementwise on whatever sigmas are given (pass ``sigmas[:-1]`` to drop the final 0). The product
    is taken in float64. Wan truncates its float64 sigmas *before* their float32 cast; for the shipped
    grids the result is the same (checked for N = 1..200 and the usual shifts > 1 in the tests), but
    :func:`unipc_schedule` reproduces Wan's order exactly.
    """
    sig = np.asarray(sigmas)
    if not np.issubdtype(sig.dtype, np.floating):
        raise TypeError(f"sigmas must be floating point, got {sig.dtype}")
    return np.trunc(sig.astype(np.float64) * 1000.0).astype(np.int64).astype(np.float32)


def unipc_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Wan's UniPC ``(sigmas [N+1] float32, timesteps [N] float32 holding int64 values)``.

    The timesteps are truncated from the float64 sigmas exactly as Wan and diffusers do.
    """
    _check_steps_shift(num_steps, shift)
    sig64 = _unipc_sigmas_f64(num_steps, shift)
    timesteps = (sig64 * 1000).astype(np.int64).astype(np.float32)
    return unipc_sigmas(num_steps, shift), timesteps


def euler_sigmas(num_steps: int, shift: float) -> np.ndarray:
    """UniAnimate's FlowMatch-Euler grid ``shift(linspace(1, 0, N+1)[:N])`` plus a final 0.

    Built in float32 like UniAnimate's ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)``
    (torch float32 linspace, float32 shift). It starts at exactly 1.0. Wan's DPM++ solver uses the
    same grid (computed there in float64 then cast; the values agree to 1 ulp).

    Returns:
      float32 array ``[num_steps + 1]``; the last value is 0.
    """
    _check_steps_shift(num_steps, shift)
    base = torch_linspace_f32(1.0, 0.0, num_steps + 1)[:-1]
    sig = _shift_f32(base, shift)
    return np.concatenate([sig, np.zeros(1, np.float32)])


def wan_dpm_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Wan's DPM++ grid as ``generate.py`` builds it: ``(sigmas [N+1] float32, timesteps [N])``.

    ``get_sampling_sigmas``: ``shift(linspace(1, 0, N+1)[:N])`` in float64; the scheduler appends 0,
    casts the sigmas to float32 and truncates ``1000 * sigma`` (float64) to int64 for the model
    (returned as float32). The sigmas agree with :func:`euler_sigmas` to 1 ulp. (Only the grid is
    provided here, not the DPM++ solver.)
    """
    _check_steps_shift(num_steps, shift)
    sig = np.linspace(1.0, 0.0, num_steps + 1)[:num_steps]
    sig = shift * sig / (1 + (shift - 1) * sig)
    timesteps = (sig * 1000).astype(np.int64).astype(np.float32)
    return np.concatenate([sig, [0.0]]).astype(np.float32), timesteps


def flow_timesteps(sigmas) -> np.ndarray:
    """Fractional timesteps ``1000 * sigma`` in float32 (UniAnimate Euler, Self-Forcing grid)."""
    return (np.asarray(sigmas, np.float32) * np.float32(1000)).astype(np.float32)


def _shift_f32(base: np.ndarray, shift: float) -> np.ndarray:
    """The shift as torch evaluates ``s*x / (1 + (s-1)*x)`` on a float32 tensor: every op in float32."""
    base = np.asarray(base, np.float32)
    num = np.float32(shift) * base
    den = np.float32(1) + np.float32(shift - 1) * base
    return (num / den).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatchGrid:
    """Self-Forcing's (and UniAnimate's) 1000-point flow-matching training grid (self_forcing.md §4.1).

    ``FlowMatchScheduler(shift, sigma_min=0, sigma_max=1, extra_one_step=True)`` after
    ``set_timesteps(1000, training=True)``: ``sigmas[i] = shift(linspace(1, 0, 1001)[i])`` for
    i = 0..999, ``timesteps = 1000 * sigmas``, all float32 exactly as torch builds them.

    Attributes (numpy float32, ``[num_train_timesteps]``): ``sigmas``, ``timesteps``, ``weights``
    (the "bsmntw" bump ``exp(-2((t-500)/1000)^2)`` shifted to a minimum of 0 and scaled to mean 1).

    Methods taking ``t`` are jittable; ``t`` may be a scalar or any array (``[B]``, ``[B, F]``).
    Lookups use the nearest grid point (``argmin |timesteps - t|``, first index on ties) as torch
    does. UniAnimate's trainer looks up the *bf16-rounded* t: round it before calling
    (``t.astype(jnp.bfloat16).astype(jnp.float32)``).
    """

    shift: float = 5.0
    num_train_timesteps: int = 1000
    sigmas: np.ndarray = dataclasses.field(init=False, repr=False)
    timesteps: np.ndarray = dataclasses.field(init=False, repr=False)
    weights: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        _check_steps_shift(self.num_train_timesteps, self.shift)
        n = self.num_train_timesteps
        sig = _shift_f32(torch_linspace_f32(1.0, 0.0, n + 1)[:-1], self.shift)
        ts = (sig * np.float32(n)).astype(np.float32)
        z = (ts - np.float32(n / 2)) / np.float32(n)
        g = np.exp(np.float32(-2) * (z * z)).astype(np.float32)
        g = g - g.min()
        w = (g * (np.float32(n) / g.sum(dtype=np.float32))).astype(np.float32)
        for name, val in (("sigmas", sig), ("timesteps", ts), ("weights", w)):
            val.setflags(write=False)
            object.__setattr__(self, name, val)

    def lookup_index(self, t) -> jax.Array:
        """Nearest grid index for timestep(s) ``t`` (float32 distances). Returns int32 ``t.shape``."""
        t = jnp.asarray(t, jnp.float32)
        dist = jnp.abs(jnp.asarray(self.timesteps) - t[..., None])
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    def lookup_sigma(self, t) -> jax.Array:
        """Grid sigma nearest to timestep(s) ``t``; float32, shape ``t.shape``."""
        return jnp.asarray(self.sigmas)[self.lookup_index(t)]

    def training_weight(self, t) -> jax.Array:
        """Loss weight ("bsmntw", mean 1 over the grid) at the grid point nearest ``t``."""
        return jnp.asarray(self.weights)[self.lookup_index(t)]

    def add_noise(self, x0: jax.Array, eps: jax.Array, t) -> jax.Array:
        """``(1 - sigma) x0 + sigma eps`` with sigma looked up at ``t`` (shape a prefix of x0's).

        Computed in float32, returned in ``eps.dtype`` (torch's ``type_as(noise)``).
        """
        return renoise(x0, eps, self.lookup_sigma(t)).astype(eps.dtype)

    def euler_step(self, flow: jax.Array, t, x: jax.Array) -> jax.Array:
        """FlowMatch ``step``: ``x + flow * (sigma_{i+1} - sigma_i)``, sigma past the grid's end = 0."""
        idx = self.lookup_index(t)
        ext = jnp.concatenate([jnp.asarray(self.sigmas), jnp.zeros((1,), jnp.float32)])
        ds = _expand(ext[idx + 1] - ext[idx], x.ndim)
        return (x.astype(jnp.float32) + flow.astype(jnp.float32) * ds).astype(x.dtype)

    def warp_denoising_steps(self, steps: Sequence[int]) -> np.ndarray:
        """Self-Forcing's ``warp_denoising_step``: ``concat(timesteps, [0])[1000 - k]`` (float32).

        ``[1000, 750, 500, 250]`` -> ``[1000, 937.5, 833.333, 625]`` at shift 5 and
        ``[1000, 960, 888.889, 727.273]`` at shift 8 (self_forcing.md §4.2).
        """
        k = self._check_step_list(steps)
        ext = np.concatenate([self.timesteps, np.zeros(1, np.float32)])
        return ext[self.num_train_timesteps - k]

    def warp_sigmas(self, steps: Sequence[int]) -> np.ndarray:
        """Grid sigmas of the warped list (they equal ``lookup_sigma(warp_denoising_steps(steps))``)."""
        k = self._check_step_list(steps)
        ext = np.concatenate([self.sigmas, np.zeros(1, np.float32)])
        return ext[self.num_train_timesteps - k]

    def _check_step_list(self, steps) -> np.ndarray:
        k = np.asarray(steps)
        if k.ndim != 1 or not np.issubdtype(k.dtype, np.integer):
            if k.ndim == 1 and np.all(np.asarray(steps, np.float64) == np.round(steps)):
                k = np.asarray(np.round(steps), np.int64)
            else:
                raise ValueError(f"steps must be a 1-D list of integers, got {steps!r}")
        if np.any(k < 0) or np.any(k > self.num_train_timesteps):
            raise ValueError(f"steps must lie in [0, {self.num_train_timesteps}], got {steps!r}")
        return k


def student_schedule(shift: float = 5.0, steps: Sequence[int] = (1000, 750, 500, 250)
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Self-Forcing's few-step student schedule: ``(timesteps [S], sigmas [S])``, float32.

    Timesteps are the warped list (fractional, e.g. 937.5, fed to the DiT as is); sigmas are the grid
    values at those points. Sampling (self_forcing.md §4.4), see :func:`sample_few_step`: for step j
    the model gives ``x0_j = G(x_j, t_j)``; if j < S-1 the next input is
    ``renoise(x0_j, fresh_eps, sigmas[j+1])``. **The block output is x0 of the last step**; there is
    no final Euler step.
    """
    grid = FlowMatchGrid(shift=shift)
    return grid.warp_denoising_steps(steps), grid.warp_sigmas(steps)


# ----------------------------------------------------------------------------------------------
# Conversions and guidance (jax)
# ----------------------------------------------------------------------------------------------

def _expand(sigma, ndim: int) -> jax.Array:
    """float32 sigma of shape ``P`` (a prefix of the data shape) -> ``P + (1,) * (ndim - len(P))``."""
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.ndim > ndim:
        raise ValueError(f"sigma has {sigma.ndim} dims, more than the data's {ndim}")
    return sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def x0_from_flow(x_t: jax.Array, flow: jax.Array, sigma) -> jax.Array:
    """``x0 = x_t - sigma * flow`` in float32, returned in ``x_t.dtype``. sigma: prefix of x_t.shape."""
    s = _expand(sigma, x_t.ndim)
    return (x_t.astype(jnp.float32) - s * flow.astype(jnp.float32)).astype(x_t.dtype)


def flow_from_x0(x_t: jax.Array, x0: jax.Array, sigma) -> jax.Array:
    """``flow = (x_t - x0) / sigma`` in float32, returned in ``x_t.dtype`` (sigma must be > 0)."""
    s = _expand(sigma, x_t.ndim)
    return ((x_t.astype(jnp.float32) - x0.astype(jnp.float32)) / s).astype(x_t.dtype)


def renoise(x0: jax.Array, eps: jax.Array, sigma) -> jax.Array:
    """``(1 - sigma) * x0 + sigma * eps`` in float32, returned in ``x0.dtype``."""
    if x0.shape != eps.shape:
        raise ValueError(f"x0 {x0.shape} and eps {eps.shape} must have the same shape")
    s = _expand(sigma, x0.ndim)
    out = (1 - s) * x0.astype(jnp.float32) + s * eps.astype(jnp.float32)
    return out.astype(x0.dtype)


def cfg(v_uncond: jax.Array, v_cond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance on flows: ``u + g (c - u)`` (Wan, UniAnimate; no rescale).

    Wan and UniAnimate run two separate forward passes. **UniAnimate's branches are asymmetric**
    (unianimate_dit.md §6): the negative branch uses the negative prompt and *drops the pose tokens*
    (``add_condition``) but keeps CLIP and ``y`` (which already contains the reference-pose
    features), so guidance amplifies text and driving pose, never the reference image. Its scale is
    1.5 in the examples; 1.0 skips the negative pass (see :func:`make_cfg_model_fn`).
    """
    if v_uncond.shape != v_cond.shape:
        raise ValueError(f"shapes differ: {v_uncond.shape} vs {v_cond.shape}")
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_x0_dmd(x0_cond: jax.Array, x0_uncond: jax.Array, scale) -> jax.Array:
    """Self-Forcing's DMD real-score guidance on x0: ``c + g (c - u)`` (self_forcing.md §5.4).

    Equivalent to :func:`cfg` with ``1 + g``: the released ``guidance_scale`` 3.0 is 4.0 there.
    """
    if x0_uncond.shape != x0_cond.shape:
        raise ValueError(f"shapes differ: {x0_cond.shape} vs {x0_uncond.shape}")
    return x0_cond + scale * (x0_cond - x0_uncond)


def make_cfg_model_fn(cond_fn: Callable, uncond_fn: Callable, scale: float) -> Callable:
    """Build ``model_fn(x, t) = cfg(uncond_fn(x, t), cond_fn(x, t), scale)`` for the samplers.

    ``cond_fn`` / ``uncond_fn`` close over their own conditioning (for UniAnimate: ``uncond_fn`` is
    the DiT with the negative prompt, same CLIP and y, and no pose tokens). With a Python
    ``scale == 1.0`` the negative pass is skipped (UniAnimate's behaviour).
    """
    if isinstance(scale, (int, float)) and float(scale) == 1.0:
        return cond_fn

    def model_fn(x, t):
        return cfg(uncond_fn(x, t), cond_fn(x, t), scale)

    return model_fn


# ----------------------------------------------------------------------------------------------
# Flow UniPC (order 2, bh2, predict_x0, corrector, lower_order_final)
# ----------------------------------------------------------------------------------------------

class UniPCState(NamedTuple):
    """Carry of the flow-UniPC solver (all arrays have the sample's shape unless noted).

    sample:      x_i, the point the model is evaluated at in step i (before the corrector).
    last_sample: corrected x_{i-1}, base of the previous predictor step (unused at i = 0).
    x0_prev:     x0 prediction m_{i-1} of the previous step.
    x0_prev2:    x0 prediction m_{i-2}.
    step:        int32 scalar, the index i of the next step.
    """

    sample: jax.Array
    last_sample: jax.Array
    x0_prev: jax.Array
    x0_prev2: jax.Array
    step: jax.Array


def unipc_init(x: jax.Array) -> UniPCState:
    """Initial solver state for the starting noise ``x`` (any shape)."""
    z = jnp.zeros_like(x)
    return UniPCState(sample=x, last_sample=z, x0_prev=z, x0_prev2=z, step=jnp.zeros((), jnp.int32))


def _lam(sigma):
    """Half log-SNR of the flow process: ``log(1 - sigma) - log(sigma)``."""
    return jnp.log(1 - sigma) - jnp.log(sigma)


def _bh2(sig_s, sig_t, sig_p):
    """Scalar UniPC-bh2 coefficients for a step sig_s -> sig_t with an older point sig_p.

    Returns ``(ratio = sig_t/sig_s, a_phi = alpha_t*h_phi_1, a_b = alpha_t*B_h, r1, b1, b2)`` where
    ``h = lambda_t - lambda_s``, ``hh = -h``, ``h_phi_1 = B_h = expm1(hh)``,
    ``b1 = (h_phi_1/hh - 1)/B_h``, ``b2 = 2((h_phi_1/hh - 1)/hh - 1/2)/B_h`` and
    ``r1 = (lambda_p - lambda_s)/h``.
    """
    lam_s = _lam(sig_s)
    h = _lam(sig_t) - lam_s
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    b_h = h_phi_1
    phi_k = h_phi_1 / hh - 1
    b1 = phi_k / b_h
    phi_k = phi_k / hh - 0.5
    b2 = phi_k * 2 / b_h
    r1 = (_lam(sig_p) - lam_s) / h
    alpha_t = 1 - sig_t
    return sig_t / sig_s, alpha_t * h_phi_1, alpha_t * b_h, r1, b1, b2


def unipc_step(state: UniPCState, flow: jax.Array, sigmas, i=None) -> tuple[UniPCState, jax.Array]:
    """One step of Wan's flow UniPC (``FlowUniPCMultistepScheduler``; diffusers' UniPC with
    ``prediction_type="flow_prediction"``, ``solver_order=2``, ``solver_type="bh2"``,
    ``predict_x0=True``, ``lower_order_final=True``, no thresholding).

    Step i (N = len(sigmas) - 1 steps, i = 0..N-1), with ``m_i = x_i - sigma_i * flow``:

    1. Corrector (i >= 1, UniC): re-derives x_i from ``last_sample`` with m_{i-1} and the new m_i;
       order 1 at i = 1, order 2 (using m_{i-2}) after.
    2. Predictor (UniP): from the corrected x_i to sigma_{i+1}; order 1 at i = 0 and at the last step,
       order 2 (using m_{i-1}, rho = 1/2) in between. When sigma_{i+1} = 0 the result is m_i exactly.

    Args:
      state: :class:`UniPCState` whose ``sample`` is x_i.
      flow: model flow prediction at (x_i, t_i), shape of the sample (after CFG).
      sigmas: float32 ``[N + 1]`` grid (e.g. :func:`unipc_sigmas`), ``0 < sigmas[:-1] < 1``.
      i: step index (Python int or traced int32); defaults to ``state.step``.

    Returns:
      ``(new_state, x_next)`` with ``x_next = new_state.sample``. Arithmetic is float32; ``x_next``
      has the sample's dtype. Jittable, usable in ``lax.fori_loop``.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {sigmas.shape}")
    if flow.shape != state.sample.shape:
        raise ValueError(f"flow {flow.shape} must match the sample {state.sample.shape}")
    n = sigmas.shape[0] - 1
    i = state.step if i is None else jnp.asarray(i, jnp.int32)
    f32 = jnp.float32
    x = state.sample.astype(f32)
    m_prev, m_prev2 = state.x0_prev.astype(f32), state.x0_prev2.astype(f32)
    last = state.last_sample.astype(f32)

    s_cur = sigmas[i]
    s_prev = sigmas[jnp.maximum(i - 1, 0)]
    s_prev2 = sigmas[jnp.maximum(i - 2, 0)]
    s_next = sigmas[jnp.minimum(i + 1, n)]

    m = x - s_cur * flow.astype(f32)

    # Corrector: step s_prev -> s_cur, older point s_prev2. Branches that are not taken get harmless
    # stand-in sigmas so that no NaN/inf is formed (keeps gradients clean under jnp.where).
    use_corr = i >= 1
    corr_order2 = i >= 2
    cs = jnp.where(use_corr, s_prev, 0.5 * s_cur)
    cp = jnp.where(corr_order2, s_prev2, 0.25 * s_cur)
    ratio, a_phi, a_b, r1, b1, b2 = _bh2(cs, s_cur, cp)
    r1 = jnp.where(corr_order2, r1, -1.0)
    rho0 = (b1 - b2) / (1 - r1)                   # solves [[1, 1], [r1, 1]] @ rho = [b1, b2]
    rho1 = b1 - rho0
    d1_t = m - m_prev
    d1 = (m_prev2 - m_prev) / r1
    corr = jnp.where(corr_order2, rho0 * d1 + rho1 * d1_t, 0.5 * d1_t)
    x_corr = ratio * last - a_phi * m_prev - a_b * corr
    x_c = jnp.where(use_corr, x_corr, x)

    # Predictor: step s_cur -> s_next, older point s_prev.
    pred_order2 = (i >= 1) & (i <= n - 2)
    final = s_next <= 0
    pt = jnp.where(final, 0.5 * s_cur, s_next)
    pp = jnp.where(pred_order2, s_prev, 0.25 * s_cur)
    ratio, a_phi, a_b, r1, _, _ = _bh2(s_cur, pt, pp)
    r1 = jnp.where(pred_order2, r1, 1.0)
    x_pred = ratio * x_c - a_phi * m
    d1 = (m_prev - m) / r1
    x_pred = jnp.where(pred_order2, x_pred - a_b * (0.5 * d1), x_pred)
    x_next = jnp.where(final, m, x_pred).astype(state.sample.dtype)

    dt = state.sample.dtype
    new_state = UniPCState(sample=x_next, last_sample=x_c.astype(dt), x0_prev=m.astype(dt),
                           x0_prev2=m_prev.astype(dt), step=i + 1)
    return new_state, x_next


def _check_schedule(sigmas, timesteps) -> tuple[jax.Array, jax.Array, int]:
    sig = jnp.asarray(sigmas, jnp.float32)
    ts = jnp.asarray(timesteps, jnp.float32)
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D [N+1] with N >= 1, got shape {sig.shape}")
    n = sig.shape[0] - 1
    if ts.shape != (n,):
        raise ValueError(f"timesteps must have shape ({n},) for {n + 1} sigmas, got {ts.shape}")
    return sig, ts, n


def sample_unipc(model_fn: Callable, x: jax.Array, sigmas, timesteps, *, fori: bool = False
                 ) -> jax.Array:
    """Run the flow-UniPC solver over ``sigmas`` ``[N+1]``; ``model_fn(x, t_scalar) -> flow``.

    ``timesteps`` ``[N]`` are what the model sees (Wan: :func:`unipc_schedule`'s truncated ints);
    the solver uses the float32 ``sigmas``. CFG happens inside ``model_fn``. With ``fori=True`` the
    loop is a ``jax.lax.fori_loop`` (one traced model call); otherwise a Python loop.
    ``sigmas[0]`` must be < 1 (log-SNR is infinite at 1; Wan's grid starts at shift(0.999)).

    Returns:
      the final sample (= x0 of the last step), shape and dtype of ``x``.
    """
    sig, ts, n = _check_schedule(sigmas, timesteps)
    if not isinstance(sig, jax.core.Tracer) and not bool(jnp.all((sig[:-1] > 0) & (sig[:-1] < 1))):
        raise ValueError("UniPC needs 0 < sigmas[:-1] < 1 (use unipc_sigmas, not a grid starting at 1)")

    def body(i, state):
        state, _ = unipc_step(state, model_fn(state.sample, ts[i]), sig, i)
        return state

    state = unipc_init(x)
    if fori:
        state = jax.lax.fori_loop(0, n, body, state)
    else:
        for i in range(n):
            state = body(i, state)
    return state.sample


def sample_euler(model_fn: Callable, x: jax.Array, sigmas, timesteps) -> jax.Array:
    """FlowMatch Euler (UniAnimate): ``x <- x + flow * (sigma_{k+1} - sigma_k)``.

    ``sigmas`` ``[N+1]`` (e.g. :func:`euler_sigmas`), ``timesteps`` ``[N]`` (``1000*sigma``; UniAnimate
    feeds them to the DiT in bf16, which is ``model_fn``'s business). The update is rounded to
    ``x.dtype`` before the add, as torch does for a low-precision sample.
    """
    sig, ts, n = _check_schedule(sigmas, timesteps)
    for k in range(n):
        flow = model_fn(x, ts[k])
        upd = (flow.astype(jnp.float32) * (sig[k + 1] - sig[k])).astype(x.dtype)
        x = (x.astype(jnp.float32) + upd.astype(jnp.float32)).astype(x.dtype)
    return x


def sample_few_step(model_fn: Callable, noise: jax.Array, timesteps, sigmas, renoise_eps: jax.Array
                    ) -> jax.Array:
    """Self-Forcing's few-step student loop for one block (self_forcing.md §4.4, step 4).

    Args:
      model_fn: ``model_fn(x, t_scalar) -> x0`` (the generator's x0 prediction).
      noise: starting noise, any shape ``X``.
      timesteps, sigmas: ``[S]`` from :func:`student_schedule`.
      renoise_eps: ``[S - 1, *X]`` fresh Gaussian noise for the re-noising between steps.

    Returns:
      x0 of the last step (no final Euler step), shape ``X``.
    """
    ts = jnp.asarray(timesteps, jnp.float32)
    sig = jnp.asarray(sigmas, jnp.float32)
    s = ts.shape[0]
    if ts.ndim != 1 or sig.shape != (s,) or s < 1:
        raise ValueError(f"timesteps and sigmas must both be [S], got {ts.shape} and {sig.shape}")
    if renoise_eps.shape != (s - 1,) + noise.shape:
        raise ValueError(f"renoise_eps must be {(s - 1,) + noise.shape}, got {renoise_eps.shape}")
    x = noise
    x0 = None
    for j in range(s):
        x0 = model_fn(x, ts[j])
        if j < s - 1:
            x = renoise(x0, renoise_eps[j], sig[j + 1])
    return x0
