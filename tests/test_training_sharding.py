"""The training step on 8 fake CPU devices (mesh data=2, fsdp=4) equals the 1-device step; gradient
accumulation; the DMD objective (generator/critic alternation) runs through the same sharded loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import wanjax  # noqa: F401
from wanjax import sharding as shd
from wanjax.distill import objectives
from wanjax.nn import Linear
from wanjax.training import BatchIterator, EMAConfig, LoopConfig, Phase, Trainer, export_inference, make_optimizer
from wanjax.training import phase_batches, train
from wanjax.models import unianimate as ua
from wanjax.models.pose import is_trunk_param
from wanjax.training import state as st
from tests.test_distill_ode import make_inputs, make_teacher, tiny_cfg
from tests.test_training_ckpt import random_targets


def _perturbed(trainer: Trainer, seed: int = 0):
    """The initial state with a random head and pose projection (both start at zero, which would leave
    every other parameter with an exactly-zero first gradient), placed on the trainer's shardings."""
    host = jax.device_get(trainer.init_state())
    p = host.models["student"].params
    rng = np.random.default_rng(seed)
    for sub, name in ((p["dit"]["head"]["head"], "kernel"), (p["pose"]["pose_proj"], "kernel")):
        sub[name] = (rng.normal(size=sub[name].shape) * 0.1).astype(np.float32)
    ms = host.models["student"]
    host.models["student"] = st.ModelState(params=p, opt_state=ms.opt_state, ema=jax.tree.map(np.copy, p))
    return jax.device_put(host, trainer.state_shardings)


def test_ode_step_on_8_devices_matches_1_device(tmp_path):
    assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    data = random_targets(8)
    # eps = 1: the first Adam step is lr * m / (sqrt(v) + eps), a smooth function of the gradient; with
    # eps = 1e-8 it is lr * sign(g), which turns float noise on near-zero gradients into +-lr jumps
    cfg = tiny_cfg(tmp_path, batch_size=8, **{"optim.eps": 1.0})
    results = {}
    for name, mesh in (("1", shd.make_mesh(devices=jax.devices()[:1])), ("8", shd.make_mesh(data=2, fsdp=4))):
        trainer, _, _, _ = objectives.build(cfg, data, mesh=mesh)
        batch = objectives.make_collate(cfg, 512, None)([data[i] for i in range(8)])
        state, metrics = trainer.step(_perturbed(trainer), {"ode": batch}, 0)
        results[name] = (trainer, jax.device_get(state), {k: float(v) for k, v in metrics.items()})

    tr8, s8, m8 = results["8"]
    _, s1, m1 = results["1"]
    # the layout is really sharded: FSDP over the embed dim, Adam moments alike, batch over data x fsdp
    k = tr8.state_shardings.models["student"].params["dit"]["blocks"]["ffn"]["fc1"]["kernel"]
    assert k.spec == P(None, "fsdp", None)
    mu8 = tr8.state_shardings.models["student"].opt_state[1][0].mu["dit"]["blocks"]["ffn"]["fc1"]["kernel"]
    assert mu8.spec == k.spec
    assert objectives.loop_lib.batch_sharding(tr8.mesh, (8, 6), False).spec == P(("data", "fsdp"), None)
    # same loss and gradient norm (float32; only the reduction order differs: relative 1e-5)
    for key in ("ode/loss", "ode/grad_norm", "ode/x0_mse_0"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
    # gradients (Adam's first moment = (1 - b1) g) and updated parameters agree leaf by leaf, relative
    # to each leaf's scale: 1e-4 of max|leaf| covers float32 reduction-order differences
    for a, b in zip(jax.tree.leaves(s8.models["student"].opt_state), jax.tree.leaves(s1.models["student"].opt_state)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, atol=1e-4 * max(float(np.abs(b).max()), 1e-12), rtol=0)
    for a, b in zip(jax.tree.leaves(s8.models["student"].params), jax.tree.leaves(s1.models["student"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert int(s8.step) == int(s1.step) == 1 and int(s8.data_pos) == 8


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.a = Linear(8, 32, rngs=rngs, axes=(None, "embed"))
        self.b = Linear(32, 4, rngs=rngs, axes=("embed", None))

    def __call__(self, x):
        return self.b(jax.nn.gelu(self.a(x)))


def test_gradient_accumulation_equals_full_batch():
    """accum_steps=2 over a global batch of 8 = one full-batch step (per-sample-mean loss, no RNG)."""
    def loss_fn(m, b, k):
        err = jnp.mean(jnp.square(m(b["x"]) - b["y"]))
        return err, {"mse": err}

    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=8).astype(np.float32), "y": rng.normal(size=4).astype(np.float32)} for _ in range(8)]
    mesh = shd.make_mesh(data=2, fsdp=4)
    out = []
    for accum in (1, 2):
        tr = Trainer({"net": MLP(nnx.Rngs(0))}, {"net": optax.sgd(0.1)}, [Phase("net", "net", loss_fn)], mesh,
                     ema={"net": EMAConfig(0.5, 0)}, accum_steps=accum)
        mb = phase_batches(tr, lambda pos: BatchIterator(data, 8, seed=0, start=pos, prefetch=0))
        res = train(tr, mb, LoopConfig(total_steps=2, log_every=1, progress=False, handle_sigterm=False))
        out.append((jax.device_get(res.state), res.history))
    (s1, h1), (s2, h2) = out
    for a, b in zip(jax.tree.leaves(s1.models), jax.tree.leaves(s2.models)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)   # float32 sums
    np.testing.assert_allclose([r["net/loss"] for r in h1], [r["net/loss"] for r in h2], rtol=1e-6)


def test_offloaded_optimizer_state_and_ema_give_the_same_run(tmp_path):
    """``Trainer(offload=True)``: the optimizer state and EMA of both models live in pinned host memory
    (sharded like the parameters), each phase moves only its own model's to the device and back, and
    the run is bit-identical to the on-device one (the moves are copies). Two models, each phase using
    the other's parameters, check the pass-through of the other model's state; a checkpoint of the offloaded state
    restores onto the host shardings and continues identically."""
    from wanjax.training.ckpt import Checkpointer
    from wanjax.training.loop import HOST

    def loss_gen(m, mb, k, crit):
        return jnp.mean(jnp.square(m(mb["x"]) - mb["y"] + 0.1 * crit(mb["x"]))), {}

    def loss_crit(m, mb, k, gen):
        return jnp.mean(jnp.square(m(mb["x"]) + mb["y"] - 0.1 * gen(mb["x"]))), {}

    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=8).astype(np.float32), "y": rng.normal(size=4).astype(np.float32)} for _ in range(8)]
    mesh = shd.make_mesh(data=2, fsdp=4)
    batch = {k: np.stack([d[k] for d in data]) for k in ("x", "y")}

    def run(offload, steps=3, state=None):
        tr = Trainer({"gen": MLP(nnx.Rngs(0)), "crit": MLP(nnx.Rngs(1))},
                     {"gen": make_optimizer(1e-2), "crit": make_optimizer(1e-2, mu_dtype=jnp.bfloat16)},
                     [Phase("gen", "gen", loss_gen, uses=("crit",)), Phase("crit", "crit", loss_crit, uses=("gen",))],
                     mesh, ema={"gen": EMAConfig(0.9, 0)}, offload=offload)
        state = tr.init_state() if state is None else state
        for i in range(steps):
            state, _ = tr.step(state, {"gen": batch, "crit": batch}, i)
        return tr, state

    tr_dev, s_dev = run(False)
    tr_off, s_off = run(True)
    kinds = lambda tree: {a.sharding.memory_kind for a in jax.tree.leaves(tree)}
    for n in ("gen", "crit"):
        assert kinds(s_off.models[n].opt_state) == {HOST} and kinds(s_off.models[n].params) == {"device"}
        assert kinds(s_dev.models[n].opt_state) == {"device"}
    assert kinds(s_off.models["gen"].ema) == {HOST}
    mu = jax.tree.leaves(s_off.models["gen"].opt_state)
    assert {a.sharding.spec for a in mu if a.ndim == 2} == {P(None, "fsdp"), P("fsdp", None)}  # sharded like the params
    for x, y in zip(jax.tree.leaves(jax.device_get(s_off)), jax.tree.leaves(jax.device_get(s_dev))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # checkpoint round trip of the offloaded state, then one more step on each side
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(3, s_off, {"step": 3}, wait=True)
    restored, _ = ck.restore(tr_off.abstract_state())
    assert kinds(restored.models["gen"].opt_state) == {HOST}
    s_off2, _ = tr_off.step(restored, {"gen": batch, "crit": batch}, 3)
    s_dev2, _ = tr_dev.step(s_dev, {"gen": batch, "crit": batch}, 3)
    for x, y in zip(jax.tree.leaves(jax.device_get(s_off2)), jax.tree.leaves(jax.device_get(s_dev2))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("offload", [False, True])
def test_dmd_steps_run_on_the_sharded_mesh(tmp_path, offload):
    """Two DMD iterations on data=2 x fsdp=4: iteration 0 updates generator then critic, iteration 1
    the critic only (dfake_gen_update_ratio 5); every loss is finite; the exit step is the one drawn
    from the replicated run key (so every replica agrees); the student's EMA moves only with it. Also
    with ``offload_state`` (optimizer state and EMA in pinned host memory), as train.distill runs it,
    together with ``pose_trunk_trainable=False``: the pose trunks of student and critic stay at their
    initial values (bit for bit, weight decay included) while other parameters update."""
    teacher_root = tmp_path / "teacher"
    export_inference(make_teacher(0), teacher_root)       # also exercises the teacher loader
    neg = tmp_path / "neg.npz"
    np.savez(neg, negative=np.random.default_rng(0).normal(size=(7, 32)).astype(np.float32))
    cfg = tiny_cfg(tmp_path / "run", **{"objective": "dmd", "total_steps": 2, "batch_size": 2, "log_every": 1,
                                        "ckpt_every": 0, "teacher.ckpt_dir": str(teacher_root),
                                        "data.negative_embeds_path": str(neg), "mesh.data": 2, "mesh.fsdp": 4,
                                        "export.enabled": False, "offload_state": offload,
                                        "pose_trunk_trainable": not offload,
                                        "student.pose_init": str(teacher_root) if offload else ""})
    assert cfg.dmd.gen_update_ratio == 5 and cfg.dmd.b1 == 0.0 and cfg.dmd.b2 == 0.999
    assert (cfg.dmd.lr_generator, cfg.dmd.lr_critic) == (2e-6, 4e-7)
    res = objectives.run(cfg, dataset=make_inputs(4))
    h0, h1 = res.history
    assert {"generator/loss", "critic/loss"} <= set(h0) and "generator/loss" not in h1 and "critic/loss" in h1
    for rec in (h0, h1):
        assert all(np.isfinite(v) for k, v in rec.items() if k.endswith("loss") or k.endswith("grad_norm"))
    # the generator's exit step: phase 0 key of iteration 0 -> (dropout key, loss key) -> split(loss key, 4)[2]
    key = st.step_key(st.base_key(cfg.seed), 0, 0)
    k_loss = jax.random.split(key)[1]
    want = int(jax.random.randint(jax.random.split(k_loss, 4)[2], (), 0, 4))
    assert h0["generator/exit_step"] == want
    trainer = res.trainer
    assert [p.name for p in trainer.active_phases(5)] == ["generator", "critic"]
    assert [p.name for p in trainer.active_phases(6)] == ["critic"]
    assert trainer.frozen_params["teacher"]["dit"]["blocks"]["ffn"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", None)
    want = "pinned_host" if offload else "device"
    for n in ("student", "critic"):
        assert {a.sharding.memory_kind for a in jax.tree.leaves(res.state.models[n].opt_state)} == {want}, n
    assert {a.sharding.memory_kind for a in jax.tree.leaves(res.state.models["student"].ema)} == {want}
    if offload:  # the trunk came from the teacher's pose/ and stayed frozen in both models, which did update
        teacher = {"pose/" + k: v for k, v in ua.param_arrays(make_teacher(0).pose).items()}
        start = ua.param_arrays(objectives.build_student(cfg))
        trunk = sorted(k for k in teacher if is_trunk_param(k))
        assert len(trunk) == 12, trunk  # dwpose_embedding.{0,2,...,10} kernel + bias
        for n in ("student", "critic"):
            end = ua.param_arrays(res.trainer.model(res.state, n))
            for k in trunk:
                np.testing.assert_array_equal(end[k], teacher[k], err_msg=f"{n}: {k}")
            assert any(not np.array_equal(v, start[k]) for k, v in end.items()), n  # (the updates did happen)
        with pytest.raises(objectives.DistillError, match="student.pose_init"):
            objectives.init_pose(res.trainer.model(res.state, "student"), str(tmp_path / "missing"))
