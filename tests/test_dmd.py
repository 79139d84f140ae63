"""Self-Forcing DMD math (wanjax.distill.dmd) on tiny float32 PoseDiT models.

* dmd_grad_loss and its x0-gradient equal the spec formulas computed in numpy float64.
* critic_flow_loss equals the formula with the documented t / eps draws of a fixed key, with the
  shift-5 (generator) and shift-8 (critic) sigma lookups done in numpy.
* The rollout's exit-step gradients equal an independent reference: a Python loop over blocks and
  steps with explicit stop_gradient on the earlier steps, where every forward is the **full
  block-masked forward** (causal=True over all frames so far, no KV cache). The cached rollout
  treats earlier blocks' K/V as constants (they come from stop-gradient context passes); the
  reference reproduces that by stop-gradienting the context rows' K and V inside the masked
  attention (a test-local wrapper of wanjax.attention.block_causal_attention). Both the values and
  the gradients are compared, for exit steps 0, 1 and 3.
  (Without that K/V stop-gradient the reference gradient differs by ~3e-2 relative, while the
  rollout matches the reference to ~5e-7: the comparison does see the gradient truncation.)
* rollout at the last exit step equals StudentPipeline's latents for the same seed (the rollout
  uses the pipeline's fold_in key schedule by design), with and without its gradient pass.
* generator_loss / critic_loss run under jax.jit(jax.grad(...)), give finite values and non-zero
  gradients (the student's pose encoder included) and draw t / the exit step as documented.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wanjax  # noqa: F401
from wanjax import attention as attn_lib
from wanjax import sampling
from wanjax.distill import dmd
from wanjax.models import unianimate as ua

B, F_LAT, H, W = 1, 6, 32, 32            # pixels; latent 4 x 4, tokens 2 x 2, 2 blocks of 3 frames
h, w = H // 8, W // 8
NFB = 3
N_CLIP = 4


def _random_model(cfg: ua.PoseDiTConfig, seed: int) -> ua.PoseDiT:
    """A PoseDiT with random numpy weights (no JAX init programs to compile): kernels
    N(0, 1/fan_in), biases N(0, 0.05^2), norm weights 1 + N(0, 0.1^2), modulation tables N(0, 0.1^2).
    Every path is live (no zero-initialised head / pose projection / v_img)."""
    gdef, abstract = nnx.split(nnx.eval_shape(lambda: ua.PoseDiT(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def init(path, a):
        names = [str(getattr(p, "key", p)) for p in path]
        shape = a.shape
        z = rng.standard_normal(shape).astype(np.float32)
        if names[-1] == "kernel":
            core = shape[1:] if names[:2] == ["dit", "blocks"] else shape
            return z / np.sqrt(np.prod(core[:-1]))
        if names[-1] == "bias":
            return 0.05 * z
        if names[-1] == "weight":                 # LayerNorm / RMSNorm scales
            return 1.0 + 0.1 * z
        return 0.1 * z                            # modulation tables

    pure = jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(gdef, abstract)


def _student(seed=0, remat=True):
    """The tiny student (remat as in training: the exit forwards' layer bodies are checkpointed).
    The weights depend on the seed only, not on ``remat``."""
    cfg = ua.get_config("tiny_student")
    return _random_model(cfg.replace(dit=cfg.dit.replace(max_frames=F_LAT, attention="xla", remat=remat)), seed)


def _teacher(seed=7):
    cfg = ua.get_config("tiny_teacher")
    return _random_model(cfg.replace(dit=cfg.dit.replace(attention="xla")), seed)


def _context(rng, n=5):
    ctx = np.zeros((B, 512, 32), np.float32)
    ctx[:, :n] = rng.standard_normal((B, n, 32))
    return jnp.asarray(ctx)


def _cond(model, seed=1):
    rng = np.random.default_rng(seed)
    D = model.cfg.dit.dim
    return dmd.Cond(
        context=_context(rng),
        clip_fea=jnp.asarray(rng.standard_normal((B, N_CLIP, 1280)), jnp.float32),
        y=jnp.asarray(rng.standard_normal((B, F_LAT, h, w, 20)), jnp.float32),
        pose_tokens=jnp.asarray(0.5 * rng.standard_normal((B, F_LAT, h // 2, w // 2, D)), jnp.float32))


# ----------------------------------------------------------------------------------------------
# dmd_grad_loss
# ----------------------------------------------------------------------------------------------
def test_dmd_grad_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    shape = (2, 3, 4, 4, 2)
    x0, real, fake = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    fake = (real + 0.3 * fake).astype(np.float32)
    x64, r64, f64 = (a.astype(np.float64) for a in (x0, real, fake))
    norm = np.abs(x64 - r64).mean(axis=(1, 2, 3, 4), keepdims=True)       # per sample
    grad = (f64 - r64) / norm
    want_loss = 0.5 * np.mean(grad ** 2)
    want_dx = grad / grad.size

    (loss, aux), dx = jax.value_and_grad(lambda x: dmd.dmd_grad_loss(x, real, fake), has_aux=True)(jnp.asarray(x0))
    # float32 vs float64: x - (x - grad) loses ~1 ulp of |x| ~ 1e-7 relative to |grad| ~ 1; 1e-5 is ample
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5 * np.abs(want_dx).max())
    np.testing.assert_allclose(float(aux["dmd_grad_norm"]), np.abs(grad).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["dmd_normalizer"]), norm.mean(), rtol=1e-5)
    # the real / fake predictions get no gradient
    dr, df = jax.grad(lambda r, f: dmd.dmd_grad_loss(jnp.asarray(x0), r, f)[0], argnums=(0, 1))(
        jnp.asarray(real), jnp.asarray(fake))
    assert float(jnp.abs(dr).max()) == 0.0 and float(jnp.abs(df).max()) == 0.0


# ----------------------------------------------------------------------------------------------
# critic_flow_loss
# ----------------------------------------------------------------------------------------------
def _np_dmd_t(k_t):
    """Spec 5.4: u ~ randint[0, 1000) from the key, t = clamp(1000 shift5(u / 1000), 20, 980), float32."""
    u = np.asarray(jax.random.randint(k_t, (B,), 0, 1000)).astype(np.float32)
    s = u / np.float32(1000)
    t = np.float32(5) * s / (np.float32(1) + np.float32(4) * s) * np.float32(1000)
    return np.clip(t, 20, 980).astype(np.float32)


def _np_lookup(grid, t):
    return grid.sigmas[np.argmin(np.abs(grid.timesteps[None, :] - t[:, None]), axis=1)].astype(np.float64)


def test_critic_flow_loss_matches_formula(rolled):
    critic = rolled[0]
    cond = _cond(critic, seed=4)
    x0 = jnp.asarray(np.random.default_rng(5).standard_normal((B, F_LAT, h, w, 16)), jnp.float32)
    key = jax.random.key(11)
    g5, g8 = sampling.FlowMatchGrid(5.0), sampling.FlowMatchGrid(8.0)
    loss, aux = jax.jit(lambda x, k: dmd.critic_flow_loss(critic, x, cond, k, g5, score_grid=g8))(x0, key)

    # the documented draws of the key
    k_t, k_eps = jax.random.split(key)
    t = _np_dmd_t(k_t)
    np.testing.assert_allclose(np.asarray(aux["critic_t"]), t, rtol=1e-6)
    eps = np.asarray(jax.random.normal(k_eps, x0.shape, jnp.float32)).astype(np.float64)
    sg_, sc = _np_lookup(g5, t), _np_lookup(g8, t)
    assert np.all(sg_ != sc)     # the two grids differ at t, so the test sees both lookups
    xs = np.asarray(x0, np.float64)
    x_t = (1 - sg_[:, None, None, None, None]) * xs + sg_[:, None, None, None, None] * eps
    fwd = jax.jit(lambda x, tt: critic(x, tt, cond.context, clip_fea=cond.clip_fea, y=cond.y,
                                       pose_tokens=cond.pose_tokens, causal=False))
    v = np.asarray(fwd(jnp.asarray(x_t, jnp.float32), jnp.broadcast_to(jnp.asarray(t)[:, None], (B, F_LAT))),
                   np.float64)
    x0_hat = x_t - sc[:, None, None, None, None] * v
    v_hat = (x_t - x0_hat) / sg_[:, None, None, None, None]
    want = np.mean((v_hat - (eps - xs)) ** 2)
    # float32 network and noising vs a float64 formula around the same float32 network output:
    # differences ~1e-6 relative; 1e-5 leaves margin
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Rollout: exit-step gradients vs the full block-masked reference; last step vs the pipeline
# ----------------------------------------------------------------------------------------------
_CTX_ROWS = {"n": 0}


def _attention_with_constant_context(orig):
    """block_causal_attention that treats the K/V rows of the first ``_CTX_ROWS['n']`` tokens (the
    already generated blocks) as constants, as the KV cache filled by stop-gradient context passes is."""

    def patched(q, k, v, spec, **kw):
        const = (jnp.arange(k.shape[1]) < _CTX_ROWS["n"])[None, :, None, None]
        sg = jax.lax.stop_gradient
        return orig(q, jnp.where(const, sg(k), k), jnp.where(const, sg(v), v), spec, **kw)

    return patched


def _masked_block_flow(model, cond, seq, start, t):
    """Full causal=True forward over all F_LAT frames ``seq`` = [generated blocks (t = 0) | this
    block at t | later frames]; returns the flow of this block's frames [start, start + NFB). By
    causality the later frames do not matter (they are zeros here)."""
    f = jnp.arange(F_LAT)
    tt = jnp.where(f < start, 0.0, t).astype(jnp.float32)[None].repeat(B, 0)
    flow = model(seq, tt, cond.context, clip_fea=cond.clip_fea, y=cond.y, pose_tokens=cond.pose_tokens,
                 causal=True)
    return jax.lax.dynamic_slice_in_dim(flow, start, NFB, axis=1)


class _Reference:
    """The rollout as a plain Python loop over blocks and steps. Every forward is the full
    block-masked forward; the earlier steps run on stop-gradient parameters and their outputs are
    stop-gradient; only the exit forward is differentiated, with the context rows' K/V constant.
    Because no gradient crosses blocks, d(sum_b <proj_b, x0_b>)/dparams is the sum over blocks of
    each exit forward's gradient with its (constant) inputs. The two pieces are jitted once."""

    def __init__(self, gdef):
        T = (h // 2) * (w // 2)

        def fwd(state, cond, seq, start, t):
            return _masked_block_flow(nnx.merge(gdef, jax.lax.stop_gradient(state)), cond, seq, start, t)

        def exit_vg(state, cond, seq, start, t, sigma, proj_b):
            x = jax.lax.dynamic_slice_in_dim(seq, start, NFB, axis=1)

            def f(st):
                _CTX_ROWS["n"] = start * T           # (traced) token count of the generated blocks
                x0 = x - sigma * _masked_block_flow(nnx.merge(gdef, st), cond, seq, start, t)
                _CTX_ROWS["n"] = 0
                return jnp.sum(x0 * proj_b), x0
            return jax.value_and_grad(f, has_aux=True)(state)

        self.fwd = jax.jit(fwd)
        self.exit_vg = jax.jit(exit_vg)

    def __call__(self, state, noise, cond, key, exit_step, ts, sig, proj):
        sg = jax.lax.stop_gradient
        outs, total, grad = [], 0.0, None
        for b in range(F_LAT // NFB):
            s, e = b * NFB, (b + 1) * NFB
            kb = jax.random.fold_in(key, b)
            later = jnp.zeros((B, F_LAT - e, h, w, 16), jnp.float32)
            seq = lambda x: jnp.concatenate(outs + [x, later], axis=1)
            x = noise[:, s:e]
            for j in range(exit_step):
                x0 = sg(x - sig[j] * self.fwd(state, cond, seq(x), s, ts[j]))
                eps = jax.random.normal(jax.random.fold_in(kb, j + 1), x.shape, jnp.float32)
                x = (1 - sig[j + 1]) * x0 + sig[j + 1] * eps
            (val, x0), g = self.exit_vg(state, cond, seq(sg(x)), s, ts[exit_step], sig[exit_step], proj[:, s:e])
            outs.append(sg(x0))
            total = total + val
            grad = g if grad is None else jax.tree.map(jnp.add, grad, g)
        return total, jnp.concatenate(outs, axis=1), grad


@pytest.fixture(scope="module")
def rolled():
    """The student, its conditioning and one compiled value-and-grad of the rollout (exit step, noise,
    conditioning and key are arguments, so every test below reuses the same executable)."""
    student = _student(0)
    gdef, state = nnx.split(student)
    ts, sig = sampling.student_schedule(5.0)

    def roll(state, noise, cond, key, exit_step, proj):
        x0 = dmd.rollout(nnx.merge(gdef, state), noise, cond, key, exit_step=exit_step, sigmas=sig,
                         timesteps=ts, nfb=NFB)
        return jnp.sum(x0 * proj), x0

    vg = jax.jit(jax.value_and_grad(roll, has_aux=True))
    return student, gdef, state, vg, [float(v) for v in ts], [float(v) for v in sig]


def test_rollout_exit_step_gradients_match_masked_reference(rolled, monkeypatch):
    student, gdef, state, roll_vg, ts, sig = rolled
    monkeypatch.setattr(attn_lib, "block_causal_attention",
                        _attention_with_constant_context(attn_lib.block_causal_attention))
    cond = _cond(student, seed=1)
    rng = np.random.default_rng(2)
    noise = jnp.asarray(rng.standard_normal((B, F_LAT, h, w, 16)), jnp.float32)
    proj = jnp.asarray(rng.standard_normal((B, F_LAT, h, w, 16)), jnp.float32)
    key = jax.random.key(5)
    ref = _Reference(nnx.split(_student(0, remat=False))[0])  # same weights, plain (no remat) forward
    grads = {}
    for ex in (0, 1, 3):
        (val, x0), g = roll_vg(state, noise, cond, key, jnp.int32(ex), proj)
        rval, rx0, rg = ref(state, noise, cond, key, ex, ts, sig, proj)
        # same float32 arithmetic; the masked and the cached softmax differ only in which keys are
        # summed (masked-out vs absent), so values agree to ~1e-6 of their scale: use 1e-5
        scale = float(jnp.abs(rx0).max())
        assert scale > 0.1
        assert float(jnp.abs(x0 - rx0).max()) <= 1e-5 * scale, ex
        gl, rl = jax.tree.leaves(g), jax.tree.leaves(rg)
        gmax = max(float(jnp.abs(r).max()) for r in rl)
        assert gmax > 1e-2
        for a, r in zip(gl, rl):
            # gradients go through one more reduction layer than the values: 1e-5 of the largest entry
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5 * gmax)
        grads[ex] = gl
    # the exit step matters: different exits give different gradients
    for a, b_ in ((0, 1), (1, 3)):
        assert max(float(jnp.abs(x - y).max()) for x, y in zip(grads[a], grads[b_])) > 1e-3


def test_rollout_last_step_equals_student_pipeline(rolled):
    """The rollout draws its noise exactly like StudentPipeline (block key fold_in(key(seed), b),
    re-noising draw j from fold_in(block key, j + 1)), so at the last exit step it reproduces the
    pipeline. The pipeline runs one block (9 pixel frames: its compile is the expensive part of this
    file); by causality the rollout's first block does not depend on the later frames."""
    from wanjax.pipeline import Reference
    from wanjax.pipeline.student import StudentPipeline

    student, gdef, state, roll_vg, ts, sig = rolled
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 255, (4 * (NFB - 1) + 1, H, W, 3), dtype=np.uint8)
    padded = np.concatenate([np.repeat(frames[:1], 3, 0), frames]).astype(np.float32)[None] / 255.0
    base = _cond(student, seed=7)
    pose0 = student.encode_pose(jnp.asarray(padded))                          # [B, 3, 2, 2, D]
    cond = base._replace(pose_tokens=jnp.concatenate([pose0, base.pose_tokens[:, NFB:]], axis=1))
    seed = 3
    key = jax.random.key(seed)
    noise = jnp.concatenate([jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, b), 0),
                                               (B, NFB, h, w, 16), jnp.float32)
                             for b in range(F_LAT // NFB)], axis=1)
    (_, x0), _ = roll_vg(state, noise, cond, key, jnp.int32(len(ts) - 1), jnp.zeros_like(noise))
    x0_ng = jax.jit(lambda n: dmd.rollout(student, n, cond, key, exit_step=len(ts) - 1, sigmas=sig,
                                          timesteps=ts, nfb=NFB, with_grad=False))(noise)
    out = StudentPipeline(student).generate(base.context, frames, reference=Reference(base.y, base.clip_fea),
                                            num_frames=4 * NFB - 3, seed=seed, decode=False)["latents"]
    assert out.shape == (B, NFB, h, w, 16)
    scale = float(jnp.abs(out).max())
    assert scale > 0.1
    # identical float32 computations compiled in different programs: ~1e-6 of the scale
    assert float(jnp.abs(out - x0[:, :NFB]).max()) <= 1e-5 * scale
    # the critic's rollout (no exit-forward recomputation) gives the same values for every block
    assert float(jnp.abs(x0_ng - x0).max()) <= 1e-5 * scale


# ----------------------------------------------------------------------------------------------
# generator_loss / critic_loss under jit + grad
# ----------------------------------------------------------------------------------------------
def _batch(seed=8, keep_pose=None):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dmd.DMDBatch(
        context=_context(rng), neg_context=_context(rng, 7), clip_fea=f(B, N_CLIP, 1280),
        ref_latent_y=f(B, F_LAT, h, w, 20),
        pose_video=jnp.asarray(rng.uniform(0, 1, (B, 4 * F_LAT, H, W, 3)), jnp.float32),
        ref_pose=jnp.asarray(rng.uniform(0, 1, (B, H, W, 3)), jnp.float32), keep_pose=keep_pose)


def test_generator_and_critic_losses_jit_grad_finite():
    student, teacher = _student(0, remat=False), _teacher(7)   # (remat=True is covered above)
    cfg = dmd.DMDConfig(num_frame_per_block=NFB)
    gd_s, st_s = nnx.split(student)
    # the critic: the documented choice, the student's config and (initial) weights, run bidirectionally
    gd_c, st_c = gd_s, jax.tree.map(jnp.copy, st_s)
    gd_t, st_t = nnx.split(teacher)
    batch = _batch()

    @jax.jit
    def gen_grad(st_s, st_t, st_c, batch, key):
        f = lambda s: dmd.generator_loss(nnx.merge(gd_s, s), nnx.merge(gd_t, st_t), nnx.merge(gd_c, st_c),
                                         batch, key, cfg)
        return jax.value_and_grad(f, has_aux=True)(st_s)

    @jax.jit
    def crit_grad(st_c, st_s, batch, key):
        f = lambda c: dmd.critic_loss(nnx.merge(gd_c, c), nnx.merge(gd_s, st_s), batch, key, cfg)
        return jax.value_and_grad(f, has_aux=True)(st_c)

    (loss, aux), g = gen_grad(st_s, st_t, st_c, batch, jax.random.key(0))
    gl = jax.tree.leaves(g)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in gl)
    assert max(float(jnp.abs(x).max()) for x in gl) > 0
    # the documented key derivation: split(key, 4) = (noise, rollout, exit step, score), score -> (t, eps)
    keys = jax.random.split(jax.random.key(0), 4)
    assert int(aux["exit_step"]) == int(jax.random.randint(keys[2], (), 0, 4))
    np.testing.assert_allclose(np.asarray(aux["t"]), _np_dmd_t(jax.random.split(keys[3])[0]), rtol=1e-6)
    # the student's pose encoder is trained through the exit forwards
    pose_g = jax.tree.leaves(nnx.state(nnx.merge(gd_s, g), nnx.Param)["pose"])
    assert max(float(jnp.abs(x).max()) for x in pose_g) > 0

    batch_drop = _batch(keep_pose=jnp.zeros((B,), jnp.float32))._replace(pose_video=None)  # no pose tokens
    (closs, caux), cg = crit_grad(st_c, st_s, batch_drop, jax.random.key(1))
    cl = jax.tree.leaves(cg)
    assert np.isfinite(float(closs)) and float(closs) > 0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in cl)
    assert max(float(jnp.abs(x).max()) for x in cl) > 0
    keys = jax.random.split(jax.random.key(1), 4)
    assert int(caux["exit_step"]) == int(jax.random.randint(keys[2], (), 0, 4))
    np.testing.assert_allclose(np.asarray(caux["critic_t"]), _np_dmd_t(jax.random.split(keys[3])[0]), rtol=1e-6)
