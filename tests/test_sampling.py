"""Schedules, CFG and samplers (wanjax/sampling.py) against the spec tables and diffusers/torch."""
import wanjax  # noqa: F401  (first, as everywhere)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from wanjax import sampling as S

# Published tables, wan_components.md §7.5 (N = 50).
UNIPC_T = {
    3.0: [999, 992, 985, 978, 971, 963, 956, 948, 939, 931, 922, 913, 904, 894, 884, 874, 864, 853, 841,
          829, 817, 805, 792, 778, 764, 749, 734, 718, 701, 684, 666, 647, 627, 606, 585, 562, 538, 512,
          486, 458, 428, 396, 363, 327, 290, 249, 206, 160, 111, 57],
    5.0: [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898,
          890, 882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636,
          611, 584, 555, 522, 487, 448, 405, 356, 302, 241, 172, 92],
}
DPM_T = {
    3.0: [1000, 993, 986, 979, 971, 964, 956, 948, 940, 931, 923, 914, 904, 895, 885, 874, 864, 853, 842,
          830, 818, 805, 792, 778, 764, 750, 734, 718, 702, 684, 666, 647, 627, 607, 585, 562, 538, 513,
          486, 458, 428, 397, 363, 328, 290, 249, 206, 160, 111, 57],
    5.0: [1000, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 921, 913, 906, 898,
          890, 882, 873, 864, 854, 844, 833, 821, 809, 797, 783, 769, 753, 737, 720, 701, 681, 660, 637,
          612, 585, 555, 523, 487, 448, 405, 357, 303, 241, 172, 92],
}
# First and last three sigmas (printed with 6 digits, hence atol 5e-7).
UNIPC_SIG = {3.0: ([0.999666, 0.992907, 0.985963], [0.111008, 0.057637, 0.0]),
             5.0: ([0.999800, 0.995732, 0.991530], [0.172265, 0.092507, 0.0])}
DPM_SIG = {3.0: ([1.0, 0.993243, 0.986301], [0.111111, 0.057692, 0.0]),
           5.0: ([1.0, 0.995935, 0.991736], [0.172414, 0.092593, 0.0])}


def _diffusers_unipc(n, shift):
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                  num_train_timesteps=1000, flow_shift=shift)
    sch.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, n + 1)[:-1])
    return sch


# ---------------------------------------------------------------------------------- (a) tables

@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_unipc_tables_published(shift):
    sig, ts = S.unipc_schedule(50, shift)
    assert sig.dtype == np.float32 and sig.shape == (51,) and ts.shape == (50,)
    np.testing.assert_array_equal(ts, np.array(UNIPC_T[shift], np.float32))
    np.testing.assert_array_equal(S.model_timesteps(S.unipc_sigmas(50, shift)[:-1]), ts)
    head, tail = UNIPC_SIG[shift]
    np.testing.assert_allclose(sig[:3], head, atol=5e-7, rtol=0)
    np.testing.assert_allclose(sig[-3:], tail, atol=5e-7, rtol=0)


@pytest.mark.parametrize("n,shift", [(50, 3.0), (50, 5.0), (40, 3.0), (4, 5.0), (1, 8.0)])
def test_unipc_schedule_matches_diffusers(n, shift):
    sch = _diffusers_unipc(n, shift)
    sig, ts = S.unipc_schedule(n, shift)
    # The spec (§7.4) found this diffusers route bit-identical to Wan; we ask for <= 1e-6.
    assert np.abs(sch.sigmas.numpy() - sig).max() <= 1e-6
    np.testing.assert_array_equal(sch.timesteps.numpy(), ts.astype(np.int64))


def test_model_timesteps_from_float32_sigmas_agree_with_wan():
    # model_timesteps works from float32 sigmas; Wan truncates its float64 ones. Same for these grids.
    for n in range(1, 201, 7):
        for shift in (3.0, 5.0, 8.0, 16.0):
            sig, ts = S.unipc_schedule(n, shift)
            np.testing.assert_array_equal(S.model_timesteps(sig[:-1]), ts)


@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_dpm_and_euler_grids(shift):
    sig, ts = S.wan_dpm_schedule(50, shift)
    np.testing.assert_array_equal(ts, np.array(DPM_T[shift], np.float32))
    head, tail = DPM_SIG[shift]
    np.testing.assert_allclose(sig[:3], head, atol=5e-7, rtol=0)
    np.testing.assert_allclose(sig[-3:], tail, atol=5e-7, rtol=0)
    eul = S.euler_sigmas(50, shift)
    assert eul[0] == 1.0 and eul[-1] == 0.0 and eul.dtype == np.float32
    # float32 (UniAnimate) vs float64-then-cast (Wan) construction: at most 1 ulp (<= 1.2e-7 below 1).
    assert np.abs(eul - sig).max() <= 1.2e-7
    # UniAnimate build it in torch float32: must be bit-identical.
    base = torch.linspace(1.0, 0.0, 51)[:-1]
    ref = (shift * base / (1 + (shift - 1) * base)).numpy()
    np.testing.assert_array_equal(eul[:-1], ref)
    np.testing.assert_array_equal(S.flow_timesteps(eul[:-1]), (torch.from_numpy(ref) * 1000).numpy())


def test_torch_linspace_emulation_bit_exact():
    for start, end, steps in [(1.0, 0.0, 1001), (1.0, 0.0, 51), (0.999, 0.0, 41), (1.0, 0.0, 1000),
                              (0.3, 2.7, 333), (5.0, -1.0, 2), (1.0, 0.0, 1)]:
        ref = torch.linspace(start, end, steps).numpy()
        np.testing.assert_array_equal(S.torch_linspace_f32(start, end, steps), ref)


def test_shift_sigma_and_bad_input():
    assert S.shift_sigma(0.5, 3.0) == 0.75
    np.testing.assert_allclose(np.asarray(S.shift_sigma(jnp.array([0.0, 1.0]), 5.0)), [0.0, 1.0])
    with pytest.raises(ValueError):
        S.unipc_sigmas(0, 5.0)
    with pytest.raises(ValueError):
        S.shift_sigma(0.5, -1.0)


# ---------------------------------------------------------------------------------- (b) UniPC

def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("n,shift", [(50, 5.0), (4, 3.0)])
def test_unipc_trajectory_random_outputs(n, shift):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 3, 5)).astype(np.float32)
    outs = rng.standard_normal((n, 1, 4, 3, 5)).astype(np.float32)
    sch = _diffusers_unipc(n, shift)
    sig, _ = S.unipc_schedule(n, shift)
    xt = torch.from_numpy(x)
    state = S.unipc_init(jnp.asarray(x))
    step = jax.jit(S.unipc_step)       # one compile: the step index is traced (read from the state)
    worst = 0.0
    for i, t in enumerate(sch.timesteps):
        xt = sch.step(torch.from_numpy(outs[i]), t, xt).prev_sample
        state, x_next = step(state, jnp.asarray(outs[i]), sig)
        worst = max(worst, _rel(x_next, xt.numpy()))
    # Same float32 formulas; only the scalar log/expm1/2x2-solve roundings differ (measured <= 6e-7).
    assert worst <= 1e-5, worst
    assert int(state.step) == n


def _affine_model(x, t):
    return -1.1 * x + 0.2 + 0.5 * (t / 1000.0)


@pytest.mark.parametrize("n,shift", [(50, 5.0), (4, 3.0)])
def test_unipc_trajectory_affine_model(n, shift):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    sch = _diffusers_unipc(n, shift)
    xt = torch.from_numpy(x)
    for t in sch.timesteps:
        xt = sch.step(_affine_model(xt, t.float()), t, xt).prev_sample
    sig, ts = S.unipc_schedule(n, shift)
    # Python loop (eager) on the short schedule only, to keep the test fast; fori/jit on both.
    got = S.sample_unipc(_affine_model, jnp.asarray(x), sig, ts) if n <= 4 else None
    got_fori = jax.jit(lambda x0: S.sample_unipc(_affine_model, x0, sig, ts, fori=True))(jnp.asarray(x))
    # float32 throughout; measured <= 4e-7 relative.
    assert got is None or _rel(got, xt.numpy()) <= 1e-5
    assert _rel(got_fori, xt.numpy()) <= 1e-5


def test_unipc_last_step_returns_x0_and_rejects_sigma_one():
    sig, ts = S.unipc_schedule(3, 5.0)
    x = jnp.arange(6.0).reshape(2, 3) / 7
    state = S.unipc_init(x)
    flows = [jnp.full((2, 3), 0.1 * (k + 1)) for k in range(3)]
    for k in range(2):
        state, _ = S.unipc_step(state, flows[k], sig, k)
    x_last = state.sample
    _, out = S.unipc_step(state, flows[2], sig, 2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x_last - sig[2] * flows[2]))
    # Stand-in sigmas in the branches not taken keep gradients finite (d x_final / d x0 here).
    grad = jax.grad(lambda x0: S.sample_unipc(_affine_model, x0, sig, ts, fori=True).sum())(x)
    assert np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError):
        S.sample_unipc(_affine_model, x, S.euler_sigmas(3, 5.0), ts)
    with pytest.raises(ValueError):
        S.sample_unipc(_affine_model, x, sig, ts[:2])


# ---------------------------------------------------------------------------------- (c) grid

def _torch_grid(shift):
    """Self-Forcing / UniAnimate training grid built in torch from the spec's recipe (§4.1)."""
    base = torch.linspace(1.0, 0.0, 1001)[:-1]
    sig = shift * base / (1 + (shift - 1) * base)
    ts = sig * 1000
    g = torch.exp(-2 * ((ts - 500) / 1000) ** 2)
    g = g - g.min()
    return sig.numpy(), ts.numpy(), (g * (1000 / g.sum())).numpy()


@pytest.mark.parametrize("shift,t999,warped", [
    (5.0, 4.98008, [1000.0, 937.5, 833.333, 625.0]),
    (8.0, 7.94439, [1000.0, 960.0, 888.889, 727.273]),
])
def test_flow_match_grid(shift, t999, warped):
    grid = S.FlowMatchGrid(shift)
    sig, ts, w = _torch_grid(shift)
    np.testing.assert_array_equal(grid.sigmas, sig)     # bit-identical to torch float32
    np.testing.assert_array_equal(grid.timesteps, ts)
    # exp / sum orderings differ between numpy and torch: a few float32 ulps of values <= ~1.6.
    np.testing.assert_allclose(grid.weights, w, rtol=0, atol=2e-6)
    assert grid.timesteps[0] == 1000.0
    # Spec values are printed with 5 decimals.
    assert abs(grid.timesteps[999] - t999) <= 5e-6
    wl = grid.warp_denoising_steps([1000, 750, 500, 250])
    np.testing.assert_allclose(wl, warped, atol=5e-4, rtol=0)
    # The warped values are grid points: lookups are exact hits.
    idx = np.asarray(grid.lookup_index(wl))
    np.testing.assert_array_equal(idx, [0, 250, 500, 750])
    np.testing.assert_array_equal(np.asarray(grid.lookup_sigma(wl)), grid.sigmas[idx])
    t_s, s_s = S.student_schedule(shift)
    np.testing.assert_array_equal(t_s, wl)
    np.testing.assert_array_equal(s_s, grid.sigmas[idx])


def test_grid_lookup_noise_weight():
    grid = S.FlowMatchGrid(5.0)
    t = jnp.array([0.0, 20.0, 625.0, 937.5, 980.0, 1000.0])
    sig = np.asarray(grid.lookup_sigma(t))
    assert abs(sig[0] - 0.00498) < 5e-6                       # self_forcing.md §10 test 2
    ref = grid.sigmas[np.argmin(np.abs(grid.timesteps[None] - np.asarray(t)[:, None]), axis=1)]
    np.testing.assert_array_equal(sig, ref)
    assert sig[2] == 0.625 and sig[3] == 0.9375 and sig[5] == 1.0
    # add_noise with a per-frame t: [B=2, F=3] prefix of x [2, 3, 4, 5].
    rng = np.random.default_rng(2)
    x0, eps = (jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32) for _ in range(2))
    tf = jnp.array([[1000.0, 937.5, 625.0], [20.0, 0.0, 500.0]])
    s = np.asarray(grid.lookup_sigma(tf))[..., None, None]
    ref = (1 - s) * np.asarray(x0) + s * np.asarray(eps)
    np.testing.assert_allclose(np.asarray(grid.add_noise(x0, eps, tf)), ref, rtol=0, atol=1e-6)
    # Training weight ("bsmntw"): mean 1 over the grid, minimum 0, peak nearest t = 500.
    assert abs(float(grid.weights.mean()) - 1.0) < 1e-5
    assert grid.weights.min() == 0.0
    w = np.asarray(grid.training_weight(jnp.array([500.0, 1000.0])))
    assert w[0] == grid.weights.max() and w[1] == grid.weights[0]
    # Euler step on the grid moves to the next grid sigma; the end of the grid goes to 0.
    v = jnp.ones((2,))
    out = np.asarray(grid.euler_step(v, grid.timesteps[999], jnp.zeros((2,))))
    np.testing.assert_allclose(out, -grid.sigmas[999], rtol=1e-6)
    with pytest.raises(ValueError):
        grid.warp_denoising_steps([1001])


def test_flow_x0_conversions():
    rng = np.random.default_rng(3)
    x0, eps = (jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32) for _ in range(2))
    sigma = jnp.array([[0.9, 0.5, 0.1], [1.0, 0.3, 0.7]])
    xt = S.renoise(x0, eps, sigma)
    v = eps - x0
    # float32 round trip of O(1) numbers: a few ulps.
    np.testing.assert_allclose(np.asarray(S.x0_from_flow(xt, v, sigma)), np.asarray(x0), atol=2e-6)
    np.testing.assert_allclose(np.asarray(S.flow_from_x0(xt, x0, sigma)), np.asarray(v), atol=2e-5)
    with pytest.raises(ValueError):
        S.x0_from_flow(xt, v, jnp.zeros((2, 3, 4, 1)))


# ---------------------------------------------------------------------------------- (d) CFG, Euler

def test_cfg_equations():
    u = jnp.array([1.0, -2.0, 0.5])
    c = jnp.array([3.0, 0.0, 0.5])
    np.testing.assert_array_equal(np.asarray(S.cfg(u, c, 5.0)), [11.0, 8.0, 0.5])
    np.testing.assert_array_equal(np.asarray(S.cfg(u, c, 1.0)), np.asarray(c))
    # DMD: cond + g (cond - uncond), g = 3  <=>  cfg with 4.
    np.testing.assert_array_equal(np.asarray(S.cfg_x0_dmd(c, u, 3.0)), [9.0, 6.0, 0.5])
    np.testing.assert_array_equal(np.asarray(S.cfg_x0_dmd(c, u, 3.0)), np.asarray(S.cfg(u, c, 4.0)))
    calls = []

    def cond(x, t):
        calls.append("c")
        return x + 1.0

    def uncond(x, t):
        calls.append("u")
        return x * 0.0

    x = jnp.array([2.0])
    np.testing.assert_array_equal(np.asarray(S.make_cfg_model_fn(cond, uncond, 1.5)(x, 0.0)), [4.5])
    assert calls == ["u", "c"]
    calls.clear()
    np.testing.assert_array_equal(np.asarray(S.make_cfg_model_fn(cond, uncond, 1.0)(x, 0.0)), [3.0])
    assert calls == ["c"]            # scale 1: negative pass skipped
    with pytest.raises(ValueError):
        S.cfg(u, c[:2], 2.0)


def test_sample_euler_vs_hand_loop():
    n, shift = 10, 5.0
    sig = S.euler_sigmas(n, shift)
    ts = S.flow_timesteps(sig[:-1])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    got = S.sample_euler(_affine_model, jnp.asarray(x), sig, ts)
    ref = x.copy()
    for k in range(n):
        v = (-1.1 * ref + 0.2 + 0.5 * (ts[k] / 1000.0)).astype(np.float32)
        ref = (ref + v * np.float32(sig[k + 1] - sig[k])).astype(np.float32)
    # Same float32 ops; XLA may fuse multiply-add (1 ulp per step over 10 steps).
    assert _rel(got, ref) <= 1e-6


def test_sample_few_step_vs_hand_loop():
    t_s, s_s = S.student_schedule(5.0)
    rng = np.random.default_rng(5)
    noise = jnp.asarray(rng.standard_normal((1, 3, 2, 2)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((3, 1, 3, 2, 2)), jnp.float32)
    seen = []

    def gen(x, t):
        seen.append(float(t))
        return 0.5 * x + t / 1000.0

    out = S.sample_few_step(gen, noise, t_s, s_s, eps)
    assert seen == [1000.0, 937.5, pytest.approx(833.3333, abs=1e-3), 625.0]
    ref = np.asarray(noise)
    for j in range(4):
        x0 = 0.5 * ref + t_s[j] / 1000.0
        if j < 3:
            ref = (1 - s_s[j + 1]) * x0 + s_s[j + 1] * np.asarray(eps[j])
    # The block output is x0 of the last step (no final Euler step). float32: a few ulps.
    np.testing.assert_allclose(np.asarray(out), x0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        S.sample_few_step(gen, noise, t_s, s_s, eps[:2])
