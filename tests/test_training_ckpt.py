"""Training checkpoints: exact resume (params, optimizer, EMA, step, RNG, data position), SIGTERM ->
save and exit -> resume, finished checkpoints never damaged, EMA export loadable by the inference
loaders, clear errors for bad input; plus the data iterator and the EMA rule."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wanjax  # noqa: F401
from wanjax.distill import objectives
from wanjax.training import BatchIterator, Checkpointer, DataError, LoopConfig, train
from wanjax.training import state as st
from wanjax.training.ckpt import CheckpointMismatch
from tests.test_distill_ode import F, h, w, make_inputs, tiny_cfg

N, K = 3, 3          # stop after N iterations, continue to N + K
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """A persistent compilation cache lets the restarted runs (new trainers, the same programs) skip
    recompiling (LLVM -O0 for the whole suite is set in conftest.py). Caching only: float semantics
    are unchanged. Restored after the module."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: jax.config.values[n] for n in names}
    new = (str(tmp_path_factory.mktemp("xla_cache")), 0.0, 0)
    for n, v in zip(names, new):
        jax.config.update(n, v)
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()   # later modules see no cache (it reinitialises from the config)


def random_targets(n: int, seed: int = 0) -> list[dict]:
    """Target records with random trajectories (the training mechanics do not need a real teacher)."""
    rng = np.random.default_rng(seed + 1)
    out = make_inputs(n, seed)
    for s in out:
        s.update(traj=rng.normal(size=(4, F, h, w, 16)).astype(np.float32),
                 traj_sigmas=np.asarray([1.0, 0.9375, 0.8333333, 0.625], np.float32),
                 x0=rng.normal(size=(F, h, w, 16)).astype(np.float32))
    return out


class Named(list):
    """A list dataset with ids (as TargetReader has) that fails after ``fail_at_read`` reads or on
    index ``bad_index``."""

    def __init__(self, items, fail_at_read: int | None = None, bad_index: int | None = None):
        super().__init__(items)
        self.ids = [f"sample{i}" for i in range(len(items))]
        self.reads = 0
        self.fail_at_read, self.bad_index = fail_at_read, bad_index

    def __getitem__(self, i):
        self.reads += 1
        if (self.fail_at_read is not None and self.reads > self.fail_at_read) or i == self.bad_index:
            raise OSError(f"corrupt shard for sample{i}")
        return list.__getitem__(self, i)


def _cfg(workdir, **over):
    base = {"total_steps": N + K, "batch_size": BATCH, "log_every": 1, "ckpt_every": 0, "ema.start_step": 2,
            "ema.decay": 0.9}
    base.update(over)
    return tiny_cfg(workdir, **base)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _assert_same_state(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)   # bit-identical


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One trainer (compiled once) and its uninterrupted N + K iteration run."""
    data = Named(random_targets(6))
    cfg = _cfg(tmp_path_factory.mktemp("ref"))
    trainer, make_batches, _, _ = objectives.build(cfg, data)
    res = train(trainer, make_batches, LoopConfig(total_steps=N + K, log_every=1, progress=False),
                state=trainer.init_state())
    return dict(data=data, trainer=trainer, make_batches=make_batches, result=res)


def test_resume_is_bit_identical(reference, tmp_path):
    trainer, mb = reference["trainer"], reference["make_batches"]
    ck = Checkpointer(tmp_path / "ckpt", keep=2)
    first = train(trainer, mb, LoopConfig(total_steps=N, log_every=1, progress=False), state=trainer.init_state(),
                  checkpointer=ck, meta={"run": "test"})
    assert first.status == "done" and ck.all_steps() == [N]
    restored, meta = ck.restore(trainer.abstract_state())
    assert int(restored.step) == N and int(restored.data_pos) == N * BATCH == meta["data_pos"]
    # restored arrays land on the trainer's shardings
    p = restored.models["student"].params["dit"]["blocks"]["ffn"]["fc1"]["kernel"]
    assert p.sharding == trainer.state_shardings.models["student"].params["dit"]["blocks"]["ffn"]["fc1"]["kernel"]
    second = train(trainer, mb, LoopConfig(total_steps=N + K, log_every=1, progress=False), state=restored)
    ref = reference["result"]
    _assert_same_state(second.state, ref.state)   # params, Adam moments, EMA, step, rng, data position
    assert second.history[-1]["ode/loss"] == ref.history[-1]["ode/loss"]
    assert [r["ode/loss"] for r in second.history] == [r["ode/loss"] for r in ref.history[N:]]
    ck.close()


def write_targets(samples, out_dir) -> Path:
    """``samples`` through the real target store (one shard, in order), as generate_teacher writes them."""
    from wanjax.data.targets import TargetWriter

    with TargetWriter(out_dir) as w:
        for i, s in enumerate(samples):
            w.add(f"sample{i}", s, {"prompt": "test"})
    return Path(out_dir)


def test_sigterm_saves_and_resume_continues_exactly(reference, tmp_path):
    """The real signal path: SIGTERM during iteration N -> checkpoint N, clean return; a restarted run
    (objectives.run reading a target directory, as the CLI) resumes from it and ends bit-identical to
    the uninterrupted run."""
    data = None   # read from --config.data.dir (TargetReader), same samples and order as the reference
    targets = write_targets(list(reference["data"]), tmp_path / "targets")
    cfg = _cfg(tmp_path / "run", **{"export.enabled": True, "data.dir": str(targets)})
    sent = []
    before = signal.getsignal(signal.SIGTERM)

    def kill_at_n(step, _metrics):
        if step == N and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    r1 = objectives.run(cfg, dataset=data, on_step=kill_at_n)
    assert r1.status == "preempted" and int(r1.state.step) == N
    assert not (tmp_path / "run" / "export").exists()          # no export of an unfinished run
    assert Checkpointer(tmp_path / "run" / "ckpt").all_steps() == [N]
    assert signal.getsignal(signal.SIGTERM) == before         # the run's handler is removed again

    r2 = objectives.run(cfg, dataset=data)
    assert r2.status == "done" and r2.steps_run == K
    _assert_same_state(r2.state, reference["result"].state)

    # the EMA export loads through the inference loaders (infer.generate's path) with the same values
    from configs.infer import get_config as infer_config
    from wanjax.pipeline import load_dit, load_pose

    icfg = infer_config("tiny_student")
    icfg.ckpt_dir = str(tmp_path / "run" / "export")
    dit, pose = load_dit(icfg), load_pose(icfg)
    ema = r2.state.models["student"].ema
    np.testing.assert_array_equal(np.asarray(dit.blocks.ffn.fc1.kernel[...]),
                                  np.asarray(ema["dit"]["blocks"]["ffn"]["fc1"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(pose.pose_proj.kernel[...]), np.asarray(ema["pose"]["pose_proj"]["kernel"]))
    assert not np.array_equal(np.asarray(ema["dit"]["head"]["head"]["kernel"]),
                              np.asarray(r2.state.models["student"].params["dit"]["head"]["head"]["kernel"]))

    # resuming with a changed batch size, or a pose trunk frozen half-way, is refused with the setting named
    with pytest.raises(CheckpointMismatch, match="batch_size"):
        objectives.run(_cfg(tmp_path / "run", batch_size=4, **{"data.dir": str(targets)}))
    with pytest.raises(CheckpointMismatch, match="pose_trunk_trainable: checkpoint True, this run False"):
        objectives.run(_cfg(tmp_path / "run", pose_trunk_trainable=False, **{"data.dir": str(targets)}))


def test_finished_checkpoints_survive_failures(reference, tmp_path):
    trainer = reference["trainer"]
    data = Named(list(reference["data"]), fail_at_read=4 * BATCH)   # reads of iteration 4 fail
    mb = objectives.loop_lib.phase_batches(
        trainer, lambda pos: BatchIterator(data, BATCH, seed=0, start=pos, collate=_collate(trainer), prefetch=2))
    ck = Checkpointer(tmp_path / "ckpt", keep=5)
    with pytest.raises(DataError, match=r"training sample 'sample\d' .*corrupt shard"):
        train(trainer, mb, LoopConfig(total_steps=N + K, ckpt_every=2, progress=False),
              state=trainer.init_state(), checkpointer=ck)
    assert ck.all_steps() == [2, 4]
    # a save killed half-way leaves an Orbax temporary directory: ignored, the finished ones stay valid
    junk = tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-1234567"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\0" * 100)
    ck2 = Checkpointer(tmp_path / "ckpt")
    assert ck2.latest_step() == 4
    restored, meta = ck2.restore(trainer.abstract_state())
    clean = train(trainer, reference["make_batches"], LoopConfig(total_steps=4, progress=False),
                  state=trainer.init_state())
    _assert_same_state(restored, clean.state)
    assert meta["data_pos"] == 4 * BATCH
    ck.close()
    ck2.close()


def _collate(trainer):
    from wanjax.distill import ode

    return lambda s: ode.collate(s, text_len=512, keys=objectives.batch_keys("ode"))


def test_bad_inputs_name_the_item(tmp_path):
    from configs.distill import get_config

    with pytest.raises(ValueError, match="unknown distillation preset 'nope'.*tiny"):
        get_config("nope")
    cfg = tiny_cfg(tmp_path / "w", **{"data.dir": str(tmp_path / "missing")})
    with pytest.raises(objectives.DistillError, match=r"data\.dir=.*missing: no such directory"):
        objectives.run(cfg)
    cfg = tiny_cfg(tmp_path / "w", **{"student.preset": "huge"})
    with pytest.raises(objectives.DistillError, match=r"student\.preset='huge'.*tiny_student"):
        objectives.run(cfg, dataset=random_targets(2))
    cfg = tiny_cfg(tmp_path / "w", residual_dtype="float16")
    with pytest.raises(objectives.DistillError, match=r"--config\.residual_dtype='float16'.*bfloat16"):
        objectives.run(cfg, dataset=random_targets(2))
    # (and a valid one reaches the student's DiT)
    cfg = tiny_cfg(tmp_path / "w", residual_dtype="bfloat16", unroll_layers=True)
    assert objectives.student_config(cfg).dit.residual_dtype == "bfloat16"
    assert objectives.student_config(cfg).dit.unroll_layers is True
    assert objectives.student_config(tiny_cfg(tmp_path / "w")).dit.unroll_layers is False
    # a corrupt target shard: the data error names the sample and the shard file
    targets = write_targets(random_targets(2), tmp_path / "targets")
    shard = next(targets.glob("shard-*.safetensors"))
    raw = bytearray(shard.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])   # flip bits inside some tensor
    shard.write_bytes(bytes(raw))
    from wanjax.data.targets import TargetReader
    with pytest.raises(DataError, match=r"sample 'sample\d'.*shard-00000\.safetensors"):
        next(BatchIterator(TargetReader(targets), 2, prefetch=0))
    # the CLI: unknown preset -> non-zero exit naming it
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "train.distill", "--config", "configs/distill.py:nope"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "unknown distillation preset 'nope'" in p.stderr


def test_batch_iterator_positions_shuffles_and_slices():
    data = [{"i": np.int32(i)} for i in range(5)]
    it = BatchIterator(data, 4, seed=3, prefetch=0)
    seq = [int(x) for _ in range(5) for x in next(it)["i"]]
    # 20 positions = 4 epochs, each a permutation of the 5 samples, seeded per epoch
    for e in range(4):
        assert sorted(seq[5 * e:5 * e + 5]) == list(range(5))
        assert seq[5 * e:5 * e + 5] == list(np.random.default_rng([3, e]).permutation(5))
    # resuming at a position reproduces the stream (with and without the prefetch thread)
    it2 = BatchIterator(data, 4, seed=3, start=8, prefetch=2)
    assert [int(x) for x in next(it2)["i"]] == seq[8:12]
    it2.close()
    # two processes read disjoint halves of every global batch
    halves = [BatchIterator(data, 4, seed=3, start=8, prefetch=0, process_index=p, process_count=2) for p in (0, 1)]
    assert [int(x) for hv in halves for x in next(hv)["i"]] == seq[8:12]
    # on_error=skip replaces a bad sample by the next one of the permutation and records it
    bad = Named(data, bad_index=2)
    b = BatchIterator(bad, 5, seed=3, on_error="skip", prefetch=0)
    got = [int(x) for x in next(b)["i"]]
    assert 2 not in got and len(got) == 5 and b.skipped == ["'sample2'"]
    with pytest.raises(DataError, match="sample2.*on_error=skip"):
        next(BatchIterator(bad, 5, seed=3, prefetch=2))


def test_ema_rule():
    cfg = st.EMAConfig(decay=0.9, start_step=2)
    ema = {"w": jnp.zeros(3)}
    p = {"w": jnp.ones(3)}
    e1 = st.ema_update(ema, p, jnp.int32(1), cfg)            # before start: a copy of the params
    np.testing.assert_array_equal(np.asarray(e1["w"]), np.ones(3))
    e2 = st.ema_update(e1, {"w": jnp.full(3, 3.0)}, jnp.int32(2), cfg)
    np.testing.assert_allclose(np.asarray(e2["w"]), np.full(3, 0.9 * 1 + 0.1 * 3), rtol=1e-7)


def test_export_resets_the_training_only_dit_fields(tmp_path):
    """How the student spent memory on its backward pass (remat, remat_dots_layers, unroll_layers) does
    not change its function, so the inference export writes the defaults; the weights and everything
    else in the config are kept."""
    from wanjax.checkpoint import read_config
    from wanjax.models import dit as dit_lib
    from wanjax.training import export_inference
    from wanjax.training.ckpt import TRAINING_ONLY_DIT_FIELDS

    cfg = dit_lib.get_config("tiny", remat=True, remat_policy="attention", remat_dots_layers=1, unroll_layers=True,
                             residual_dtype="bfloat16")
    model = dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0))
    export_inference(model, tmp_path / "export")
    saved = read_config(tmp_path / "export" / "dit")
    assert {k: saved[k] for k in TRAINING_ONLY_DIT_FIELDS} == TRAINING_ONLY_DIT_FIELDS
    assert saved["residual_dtype"] == "bfloat16" and saved["num_layers"] == cfg.num_layers
    assert model.cfg.unroll_layers        # the trained model itself is untouched
