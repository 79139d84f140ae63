"""Generic sharded training infrastructure (state, loop, checkpoints) for wanjax models.

API in one screen::

    from wanjax.training import Trainer, Phase, LoopConfig, BatchIterator, Checkpointer, train
    from wanjax.training import EMAConfig, make_optimizer, phase_batches, export_inference

    def loss_fn(model, batch, key):            # model: nnx.Module rebuilt from the current params
        pred = model(batch["x"])               # batch: dict of arrays, leading batch axis
        return jnp.mean((pred - batch["y"]) ** 2), {"mse": ...}

    mesh = wanjax.sharding.make_mesh(data=2, fsdp=4)
    trainer = Trainer({"net": model}, {"net": make_optimizer(1e-4)}, [Phase("net", "net", loss_fn)],
                      mesh, ema={"net": EMAConfig(0.999, 0)}, accum_steps=1, seed=0)
    ckpt = Checkpointer(workdir / "ckpt", keep=3)
    data = lambda pos: BatchIterator(dataset, global_batch=8, seed=0, start=pos)
    result = train(trainer, phase_batches(trainer, data), LoopConfig(total_steps=1000, ckpt_every=100),
                   checkpointer=ckpt, metrics_path=workdir / "metrics.jsonl")
    export_inference(trainer.model(result.state, "net", ema=True), out_dir)

* :mod:`wanjax.training.state` - the ``TrainState`` pytree (params in the master dtype, optax state,
  EMA, step, RNG, data position) and EMA math.
* :mod:`wanjax.training.loop` - ``Trainer`` (jitted, explicitly sharded updates with gradient
  accumulation; several models and phases, e.g. generator/critic alternation), ``BatchIterator``
  (seeded, resumable, per-process slices), ``train`` (JSONL metrics, tqdm, MFU, validation hook,
  SIGTERM -> save and exit), FLOP formulas.
* :mod:`wanjax.training.ckpt` - Orbax ``CheckpointManager`` wrapper (async, keep-N, exact sharded
  resume), ``PreemptionGuard`` and ``export_inference``.
"""
from wanjax.training.ckpt import Checkpointer, CheckpointMismatch, PreemptionGuard, export_inference
from wanjax.training.loop import (BatchIterator, DataError, LoopConfig, Phase, Trainer, dit_forward_flops,
                                  make_optimizer, param_path, phase_batches, pose_encoder_flops, pose_train_flops,
                                  train)
from wanjax.training.state import EMAConfig, ModelState, TrainState

__all__ = ["Checkpointer", "CheckpointMismatch", "PreemptionGuard", "export_inference", "BatchIterator",
           "DataError", "LoopConfig", "Phase", "Trainer", "dit_forward_flops", "make_optimizer",
           "param_path", "phase_batches", "pose_encoder_flops", "pose_train_flops", "train", "EMAConfig",
           "ModelState", "TrainState"]
