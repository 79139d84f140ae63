"""PoseConditioner vs a PyTorch oracle built from the spec's layer tables (unianimate_dit.md 3, 4),
weights converted with converters.pose.pose_plan + converters.common; fold_pose_proj; the converter CLI."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import wanjax  # noqa: F401
from converters.common import (ConversionError, TensorSource, check_plan, materialize,
                               unflatten_params)
from converters.pose import LORA_IGNORE, main as convert_main, pose_plan, pose_targets
from wanjax.checkpoint import load_model
from wanjax.models.pose import PoseConditioner, PoseConfig, create_pose_conditioner, fold_pose_proj

torch.manual_seed(0)


class TorchPose(torch.nn.Module):
    """The UA modules written directly from the spec tables (PyTorch NCTHW layout)."""

    def __init__(self, out_dim: int, ref_dim: int = 20, proj_dim: int | None = None):
        super().__init__()
        c3 = torch.nn.Conv3d
        self.dwpose_embedding = torch.nn.Sequential(
            c3(3, 16, (3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)), torch.nn.SiLU(),
            c3(16, 16, (3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)), torch.nn.SiLU(),
            c3(16, 16, (3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1)), torch.nn.SiLU(),
            c3(16, 16, (3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1)), torch.nn.SiLU(),
            c3(16, 16, (3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1)), torch.nn.SiLU(),
            c3(16, 16, (3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1)), torch.nn.SiLU(),
            c3(16, out_dim, (1, 2, 2), stride=(1, 2, 2), padding=0))
        c2 = torch.nn.Conv2d
        self.randomref_embedding_pose = torch.nn.Sequential(
            c2(3, 16, 3, stride=1, padding=1), torch.nn.SiLU(),
            c2(16, 16, 3, stride=1, padding=1), torch.nn.SiLU(),
            c2(16, 16, 3, stride=1, padding=1), torch.nn.SiLU(),
            c2(16, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
            c2(16, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
            c2(16, ref_dim, 3, stride=2, padding=1))
        self.pose_proj = torch.nn.Linear(out_dim, proj_dim) if proj_dim else None

    def pose(self, x_nthwc: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(x_nthwc).permute(0, 4, 1, 2, 3)
        y = self.dwpose_embedding(x).permute(0, 2, 3, 4, 1)
        if self.pose_proj is not None:
            y = self.pose_proj(y)
        return y.detach().numpy()

    def ref(self, x_nhwc: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
        return self.randomref_embedding_pose(x).permute(0, 2, 3, 1).detach().numpy()


def _ours_from_torch(tm: TorchPose, cfg: PoseConfig) -> PoseConditioner:
    src = TensorSource.from_arrays(tm.state_dict())
    plan = pose_plan(src, cfg)
    targets = pose_targets(cfg)
    check_plan(src, plan, targets)
    params = materialize(src, plan, targets)
    model = nnx.eval_shape(lambda: PoseConditioner(cfg, rngs=nnx.Rngs(1)))  # filled below, no init cost
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, nnx.restore_int_paths(unflatten_params(params)))
    nnx.update(model, state)
    return model


def _rand(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# Tolerance 1e-5: float32 throughout; the two implementations differ only in convolution summation
# order (<= 16*27 products per output, 7 layers, activations O(1)), i.e. a few ulp of O(1) values.
TOL = 1e-5


@pytest.mark.parametrize("impl", ["3d", "fold"])
def test_pose_stack_matches_torch(impl):
    """Both ways of computing the 3-D stack (one 3-D conv per layer, or the time-folded 2-D conv
    that "auto" picks on the CPU, incl. the temporal stride-2 layers) match the oracle."""
    cfg = PoseConfig(out_dim=24)
    tm = TorchPose(out_dim=24)
    ours = _ours_from_torch(tm, cfg)
    ours.conv_impl = impl
    x = _rand((1, 8, 32, 32, 3))  # 8 frames (4 * F_lat), F_lat = 2
    want = tm.pose(x)
    got = ours.pose_features(jnp.asarray(x))
    assert got.shape == (1, 2, 2, 2, 24) == want.shape
    assert _max_err(got, want) <= TOL
    # time-chunked evaluation (halo of 2 latent frames) is exact, not approximate
    x3 = _rand((1, 16, 16, 16, 3), seed=3)
    full = np.asarray(ours.pose_features(jnp.asarray(x3)))
    assert _max_err(full, tm.pose(x3)) <= TOL
    assert _max_err(ours.pose_features(jnp.asarray(x3), time_chunk=1), full) <= TOL


def test_ref_stack_matches_torch():
    cfg = PoseConfig(out_dim=24)
    tm = TorchPose(out_dim=24)
    ours = _ours_from_torch(tm, cfg)
    x = _rand((2, 32, 24, 3), seed=1)
    want = tm.ref(x)
    got = ours.ref_pose_features(jnp.asarray(x))
    assert got.shape == (2, 4, 3, 20) == want.shape
    assert _max_err(got, want) <= TOL


def test_pose_proj_matches_torch_and_folds():
    cfg = PoseConfig(out_dim=24, proj_dim=12)
    tm = TorchPose(out_dim=24, proj_dim=12)
    ours = _ours_from_torch(tm, cfg)
    x = _rand((1, 8, 16, 32, 3), seed=2)
    want = tm.pose(x)
    got = np.asarray(ours.pose_features(jnp.asarray(x)))
    assert got.shape == (1, 2, 1, 2, 12)
    assert _max_err(got, want) <= TOL
    folded = fold_pose_proj(ours)
    assert folded.pose_proj is None
    assert folded.dwpose_embedding[12].kernel[...].shape == (1, 2, 2, 16, 12)
    f = np.asarray(folded.pose_features(jnp.asarray(x)))
    # relative 1e-5: W' = W P and b' = b P + c only re-associate float32 sums of 24 terms
    assert _max_err(f, got) <= 1e-5 * float(np.max(np.abs(got)))
    assert _max_err(folded.ref_pose_features(jnp.asarray(x[:, 0])), ours.ref_pose_features(jnp.asarray(x[:, 0]))) == 0.0


def test_student_zero_init_proj_outputs_zeros():
    cfg = PoseConfig(out_dim=24, proj_dim=12)  # zero_init_proj defaults to True
    model = create_pose_conditioner(cfg, seed=jax.random.key(0, impl="rbg"))
    x = jnp.asarray(_rand((1, 8, 16, 16, 3)))
    y = model.pose_features(x)
    assert y.shape == (1, 2, 1, 1, 12)
    assert np.all(np.asarray(y) == 0.0)
    # the trunk itself is not zero (default PyTorch-style init)
    assert float(jnp.max(jnp.abs(model._encode3d(x)))) > 0.0
    assert np.all(np.asarray(fold_pose_proj(model).pose_features(x)) == 0.0)


def test_spec_shapes_and_param_counts():
    """Spec table 3.2 at 1/16 of 832x480 per side would not divide; use 64x48 and 17 pixel frames."""
    cfg = PoseConfig()  # the 14B teacher sizes
    model = nnx.eval_shape(lambda: PoseConditioner(cfg, rngs=nnx.Rngs(0)))
    n3 = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model.dwpose_embedding, nnx.Param))))
    n2 = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model.randomref_embedding_pose, nnx.Param))))
    assert (n3, n2) == (368_752, 12_628)  # spec sections 3 and 4
    pose = jax.ShapeDtypeStruct((1, 17 + 3, 64, 48, 3), jnp.float32)
    out = jax.eval_shape(lambda m, p: m.pose_features(p), model, pose)
    assert out.shape == (1, 5, 4, 3, 5120)
    ref = jax.eval_shape(lambda m, p: m.ref_pose_features(p), model, jax.ShapeDtypeStruct((1, 64, 48, 3), jnp.float32))
    assert ref.shape == (1, 8, 6, 20)
    student = nnx.eval_shape(lambda: PoseConditioner(PoseConfig(proj_dim=1536), rngs=nnx.Rngs(0)))
    out = jax.eval_shape(lambda m, p: m.pose_features(p), student, pose)
    assert out.shape == (1, 5, 4, 3, 1536)


def test_bad_inputs_raise_clear_errors():
    # abstract model: the input checks run before any computation
    model = nnx.eval_shape(lambda: PoseConditioner(PoseConfig(hidden=4, out_dim=8, ref_dim=6), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="multiple of 4"):
        model.pose_features(jnp.zeros((1, 7, 16, 16, 3)))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.pose_features(jnp.zeros((1, 8, 24, 16, 3)))
    with pytest.raises(ValueError, match="channels last"):
        model.pose_features(jnp.zeros((1, 3, 8, 16, 16)))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.ref_pose_features(jnp.zeros((1, 12, 16, 3)))


def test_plan_prefix_and_strictness():
    cfg = PoseConfig(out_dim=24)
    sd = TorchPose(out_dim=24).state_dict()
    src = TensorSource.from_arrays(sd)
    plan = pose_plan(src, cfg, prefix="pose")
    assert plan[0].target == "pose/dwpose_embedding/0/kernel"
    check_plan(src, plan, pose_targets(cfg, prefix="pose"))
    lora = {"pipe.dit.blocks.0.self_attn.q.lora_A.default.weight": np.zeros((4, 8), np.float32)}
    src2 = TensorSource.from_arrays({**sd, **lora, "inpaint_embedding.0.weight": np.zeros(3, np.float32)})
    check_plan(TensorSource.from_arrays({**sd, **lora}), pose_plan(src, cfg), pose_targets(cfg), LORA_IGNORE)
    with pytest.raises(ConversionError, match="unexpected key 'inpaint_embedding.0.weight'"):
        check_plan(src2, pose_plan(src2, cfg), pose_targets(cfg), LORA_IGNORE)
    bad = dict(sd)
    del bad["dwpose_embedding.12.bias"]
    with pytest.raises(ConversionError, match="missing key 'dwpose_embedding.12.bias'"):
        check_plan(TensorSource.from_arrays(bad), pose_plan(src, cfg), pose_targets(cfg))


def test_cli_converts_ua_checkpoint(tmp_path):
    tm = TorchPose(out_dim=24)
    sd = dict(tm.state_dict())
    sd["pipe.dit.blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(4, 8)
    sd["pipe.dit.blocks.0.self_attn.q.lora_B.default.weight"] = torch.zeros(8, 4)
    ckpt = tmp_path / "UniAnimate-tiny.ckpt"
    torch.save(sd, ckpt)
    assert convert_main(["--src", str(ckpt), "--out", str(tmp_path / "pose")]) == 0
    assert convert_main(["--src", str(ckpt), "--out", str(tmp_path / "pose")]) == 1  # exists, no --overwrite
    build = lambda c, rngs: PoseConditioner(PoseConfig.from_dict(c), rngs=rngs)  # noqa: E731
    model = load_model(tmp_path / "pose", build)
    x = _rand((1, 8, 16, 16, 3), seed=5)
    assert model.cfg.out_dim == 24 and model.pose_proj is None
    assert _max_err(model.pose_features(jnp.asarray(x)), tm.pose(x)) <= TOL
    # --proj-dim without pose_proj in the source: zero head (student starts unchanged)
    assert convert_main(["--src", str(ckpt), "--out", str(tmp_path / "student"), "--proj-dim", "12"]) == 0
    student = load_model(tmp_path / "student", build)
    assert student.pose_features(jnp.asarray(x)).shape == (1, 2, 1, 1, 12)
    assert np.all(np.asarray(student.pose_features(jnp.asarray(x))) == 0.0)
    assert _max_err(student._encode3d(jnp.asarray(x)), tm.pose(x)) <= TOL


def test_auto_implementations_follow_the_device_the_work_is_placed_on(monkeypatch):
    """In a GPU process, work placed on the host CPU (``jax.default_device(cpu)``, how the world times
    both models on the CPU) must get the CPU choices: time-folded pose convs and XLA attention. Before
    this, "auto" looked only at the default backend, so the host-CPU timing ran XLA:CPU's slow 3-D
    convolution."""
    from wanjax import attention
    from wanjax.models.pose import resolve_conv_impl
    from wanjax.sharding import current_platform

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as in a CUDA process
    assert current_platform() == "gpu"
    assert resolve_conv_impl("auto") == "3d" and attention.default_backend() == "cudnn"
    for dev in (jax.devices("cpu")[0], "cpu"):
        with jax.default_device(dev):
            assert current_platform() == "cpu"
            assert resolve_conv_impl("auto") == "fold" and attention.default_backend() == "xla"
    assert resolve_conv_impl("3d") == "3d"  # an explicit choice is kept


@pytest.mark.parametrize("chunk", [1, 2])
def test_config_time_chunk_is_exact_for_values_and_gradients(chunk):
    """``PoseConfig.time_chunk`` (the default of ``pose_features``; 0 passed explicitly = the whole
    video) runs the stack chunk by chunk with halos of 2 latent frames (7 latent frames: chunk 2 keeps
    [0,2) [2,4) [4,6) [6,7), the last one short). Under remat it gives the whole-video value and the
    same gradients for the parameters and the input (float32; tolerance as TOL: only the
    convolutions' summation order differs)."""
    whole = PoseConditioner(PoseConfig(hidden=4, out_dim=6, remat=True), rngs=nnx.Rngs(0))
    chunked = PoseConditioner(PoseConfig(hidden=4, out_dim=6, remat=True, time_chunk=chunk), rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand((1, 28, 16, 16, 3), seed=5))  # 7 latent frames
    w = jnp.asarray(_rand((1, 7, 1, 1, 6), seed=6))

    def loss(m, v):
        return jnp.sum(m.pose_features(v) * w)

    lw, (gw_m, gw_x) = nnx.value_and_grad(loss, argnums=(0, 1))(whole, x)
    lc, (gc_m, gc_x) = nnx.value_and_grad(loss, argnums=(0, 1))(chunked, x)
    assert abs(float(lw - lc)) <= TOL * max(1.0, abs(float(lw)))
    assert _max_err(gc_x, gw_x) <= TOL * max(1.0, float(jnp.abs(gw_x).max()))
    for a, b in zip(jax.tree.leaves(nnx.state(gc_m, nnx.Param)), jax.tree.leaves(nnx.state(gw_m, nnx.Param))):
        assert _max_err(a, b) <= TOL * max(1.0, float(jnp.abs(b).max()))
    # the explicit 0 overrides the config: one pass, same value
    assert _max_err(chunked.pose_features(x, time_chunk=0), whole.pose_features(x)) <= TOL
    with pytest.raises(ValueError, match="time_chunk"):
        chunked.pose_features(x, time_chunk=-1)



def test_frozen_trunk_same_values_no_trunk_gradient_and_optimizer_keeps_it():
    """``PoseConfig(train_trunk=False)``: the same pose tokens; under ``grad`` the trunk
    (dwpose_embedding.0-10) gets an exactly-zero gradient while the head, ``pose_proj`` and the
    reference stack get the trainable model's gradients (float32, TOL: the frozen path skips the
    remat, same arithmetic). ``make_optimizer(frozen=is_trunk_param)`` then leaves the trunk
    untouched (weight decay included) and updates the rest exactly as plain AdamW. The training
    FLOPs count the frozen trunk once (forward only)."""
    import optax

    from wanjax.models.pose import is_trunk_param
    from wanjax.checkpoint import flatten_params
    from wanjax.training import make_optimizer, pose_encoder_flops, pose_train_flops

    cfg = PoseConfig(hidden=4, out_dim=6, proj_dim=5, zero_init_proj=False, remat=True)
    trained = PoseConditioner(cfg, rngs=nnx.Rngs(0))
    frozen = PoseConditioner(dataclasses.replace(cfg, train_trunk=False), rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand((1, 8, 16, 16, 3), seed=7))
    ref = jnp.asarray(_rand((1, 16, 16, 3), seed=8))
    w = jnp.asarray(_rand((1, 2, 1, 1, 5), seed=9))
    wr = jnp.asarray(_rand((1, 2, 2, 20), seed=10))

    def loss(m):
        return jnp.sum(m.pose_features(x) * w) + jnp.sum(m.ref_pose_features(ref) * wr)

    lt, gt = nnx.value_and_grad(loss)(trained)
    lf, gf = nnx.value_and_grad(loss)(frozen)
    assert abs(float(lt - lf)) <= TOL * max(1.0, abs(float(lt)))
    flat = lambda t: {k: np.asarray(v) for k, v in flatten_params(nnx.to_pure_dict(t)).items()}  # noqa: E731
    ft, ff = flat(gt), flat(gf)
    trunk = sorted(k for k in ff if is_trunk_param(k))
    assert trunk == sorted(f"dwpose_embedding/{i}/{n}" for i in range(0, 12, 2) for n in ("kernel", "bias"))
    for k, g in ff.items():
        if k in trunk:
            assert not np.any(g), k
            assert np.any(ft[k]), k  # the trainable trunk does get a gradient
        else:
            assert _max_err(g, ft[k]) <= TOL * max(1.0, float(np.abs(ft[k]).max())), k

    params = nnx.state(frozen, nnx.Param)
    grads = nnx.state(gt, nnx.Param)  # non-zero everywhere, so a missing freeze would show
    tx_frozen = make_optimizer(1e-2, weight_decay=0.1, frozen=is_trunk_param)
    tx_plain = make_optimizer(1e-2, weight_decay=0.1)
    new_f = optax.apply_updates(params, tx_frozen.update(grads, tx_frozen.init(params), params)[0])
    new_p = optax.apply_updates(params, tx_plain.update(grads, tx_plain.init(params), params)[0])
    p0, nf, npl = flat(params), flat(new_f), flat(new_p)
    for k in p0:
        if k in trunk:
            np.testing.assert_array_equal(nf[k], p0[k], err_msg=k)
        else:
            np.testing.assert_array_equal(nf[k], npl[k], err_msg=k)
            assert not np.array_equal(nf[k], p0[k]), k

    full = pose_encoder_flops(cfg, 81, 480, 832)
    trunk_f = pose_encoder_flops(cfg, 81, 480, 832, trunk_only=True)
    assert 0 < trunk_f < full
    assert pose_train_flops(cfg, 81, 480, 832) == 3 * full
    assert pose_train_flops(frozen.cfg, 81, 480, 832) == 3 * (full - trunk_f) + trunk_f


def test_cached_trunk_features_give_the_same_tokens_and_gradients():
    """A frozen trunk is a function of the data alone, so ``trunk_features`` can be computed once
    per sample and ``pose_features_from_trunk`` reuses it. The two halves are the same ops as
    ``pose_features`` (the frozen path already splits there), so tokens and gradients must be
    bit-identical, whole-video and time-chunked. A trainable trunk, or features of the wrong width,
    raise; the training FLOPs of a cached trunk leave the trunk out."""
    from wanjax.training import pose_encoder_flops, pose_train_flops

    cfg = PoseConfig(hidden=4, out_dim=6, proj_dim=5, zero_init_proj=False, train_trunk=False)
    m = PoseConditioner(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand((1, 12, 16, 32, 3), seed=3))
    w = jnp.asarray(_rand((1, 3, 1, 2, 5), seed=4))
    for chunk in (0, 1):
        trunk = m.trunk_features(x, time_chunk=chunk)
        assert trunk.shape == (1, 3, 2, 4, 4) and trunk.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(m.pose_features_from_trunk(trunk)),
                                      np.asarray(m.pose_features(x, time_chunk=chunk)))

    def loss_video(mod):
        return jnp.sum(mod.pose_features(x) * w)

    def loss_cached(mod, t):
        return jnp.sum(mod.pose_features_from_trunk(t) * w)

    lv, gv = nnx.value_and_grad(loss_video)(m)
    lc, gc = nnx.value_and_grad(loss_cached)(m, m.trunk_features(x))
    assert float(lv) == float(lc)
    for a, b in zip(jax.tree.leaves(nnx.state(gv, nnx.Param)), jax.tree.leaves(nnx.state(gc, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(ValueError, match="trunk_features: time_chunk must be >= 0"):
        m.trunk_features(x, time_chunk=-1)
    trainable = PoseConditioner(dataclasses.replace(cfg, train_trunk=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="trains its trunk"):
        trainable.pose_features_from_trunk(trunk)
    with pytest.raises(ValueError, match=r"expected trunk features \[B, F_lat, H/8, W/8, 4\]"):
        m.pose_features_from_trunk(jnp.zeros((1, 3, 2, 4, 6)))
    full = pose_encoder_flops(cfg, 81, 480, 832)
    trunk_f = pose_encoder_flops(cfg, 81, 480, 832, trunk_only=True)
    assert pose_train_flops(cfg, 81, 480, 832, cached_trunk=True) == 3 * (full - trunk_f)
    assert pose_encoder_flops(cfg, 81, 480, 832, cached_trunk=True) == pytest.approx(full - trunk_f, rel=1e-12)
    with pytest.raises(ValueError, match="frozen trunk"):
        pose_train_flops(trainable.cfg, 81, 480, 832, cached_trunk=True)
