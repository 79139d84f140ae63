"""Teacher-target generation configs (``python -m train.generate_teacher --config configs/teacher.py:NAME``).

Presets:

* ``teacher_14b`` - UniAnimate-DiT on Wan2.1-I2V-14B: FlowMatch Euler, 50 steps, shift 5, CFG 1.5
  (unianimate_dit.md 8), mode ``pose+image``, 81 frames (21 latents) at 480 x 832 (H x W: the
  student's training size, latents [21, 60, 104, 16]; UniAnimate itself was trained portrait 832 x 480,
  use ``--config.height=832 --config.width=480`` for that). Trajectory recorded at the Self-Forcing
  4-step student sigmas (shift 5: timesteps 1000, 937.5, 833.3, 625). Mesh: all local devices on
  ``fsdp`` (parameters FSDP-sharded, the batch of one sample per device sharded over data x fsdp).
* ``tiny`` - the random tiny teacher of the tests (``tests.test_pipeline.make_tiny_ckpt``): 32 x 32,
  9 frames, 4 Euler steps, float32, 2 rows per shard; give ``--config.ckpt_dir``,
  ``--config.prompt_embeds_path``, ``--config.data.manifest`` and ``--config.out_dir``.

Checkpoint fields are those of configs/infer.py (``ckpt_dir`` root with dit/ pose/ vae/ clip/ t5/
tokenizer/, each overridable). ``data.on_bad_row``: ``stop`` (raise on a row with a missing or
unreadable file) or ``skip`` (log and leave it out). ``data.rows_per_shard``: manifest rows per output
shard (the unit of resumption). ``batch_size`` 0 = one sample per local device. ``seed``: base seed
for rows without their own (a row's seed is hashed from its id and this base).
"""
from __future__ import annotations

import ml_collections

from wanjax.training.distributed import config as distributed_config

from configs.infer import UA_NEGATIVE, _base as _infer_base  # noqa: F401  (UA_NEGATIVE re-exported)

PRESETS = ("teacher_14b", "tiny")


def _base() -> ml_collections.ConfigDict:
    """configs/infer.py's fields (checkpoints, sizes, dtypes, model / mesh / pose sections: the same
    loaders read them) plus the target-generation ones."""
    c = _infer_base()
    for field in ("prompt", "pipeline", "window", "stream", "fps"):  # per row / inference only
        del c[field]
    c.out_dir = ""
    c.data = ml_collections.ConfigDict(dict(manifest="", on_bad_row="stop", rows_per_shard=8))
    c.prompt_embeds_path = ""         # .npz {prompt, negative}: skips T5 (all rows must share one prompt)
    c.height = 480
    c.width = 832
    c.batch_size = 0
    c.progress = True
    c.sampler = ml_collections.ConfigDict(dict(name="euler", steps=50, shift=5.0, cfg_scale=1.5))
    c.student = ml_collections.ConfigDict(dict(steps=(1000, 750, 500, 250), shift=5.0))
    # multi-host (each host generates its share of the manifest): wanjax.training.distributed
    c.distributed = distributed_config()
    # XLA's deterministic GPU kernels: a killed and restarted run then writes the same bytes as an
    # uninterrupted one on GPUs too (the default kernels differ in the last bits; CPU/TPU: no effect)
    c.deterministic = False
    return c


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown teacher-target preset {name!r}; choose one of {list(PRESETS)} "
                         f"(--config configs/teacher.py:NAME)")
    c = _base()
    c.preset = name
    if name == "teacher_14b":
        c.model.expect = dict(dim=5120, num_layers=40, in_dim=36, i2v=True)
    elif name == "tiny":
        c.height = c.width = 32
        c.num_frames = 9
        c.dtype = "float32"
        c.t5_dtype = "float32"
        c.attention = "xla"
        c.sampler.steps = 4
        c.model.expect = dict(dim=64, num_layers=2)
        c.model.max_frames = 12
        c.data.rows_per_shard = 2
    return c
