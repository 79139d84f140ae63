"""Distillation configs: ``get_config(NAME)`` for ``python -m train.distill --config configs/distill.py:NAME``.

Presets:
  tiny            CPU test size: tiny PoseDiT student (random init), ODE objective.
  tiny_dmd        tiny, DMD objective (needs --config.teacher.ckpt_dir, a tiny teacher root).
  student_1_3b    the 1.3B causal pose student (``student_1_3b_pose``), ODE regression from the
                  14B teacher's targets, initialised from Wan2.1-T2V-1.3B (--config.student.init).
  student_1_3b_dmd  Self-Forcing DMD from the ODE-initialised student (--config.student.init = the
                  ODE run's export/) with the 14B UniAnimate teacher (--config.teacher.ckpt_dir).

Any field can be overridden with ``--config.a.b=VALUE``; ``--config.objective=dmd`` switches the
objective of any preset. Required per run: ``workdir`` and ``data.dir`` (teacher targets).
"""
from __future__ import annotations

import ml_collections

from wanjax.training.distributed import config as distributed_config

PRESETS = ("tiny", "tiny_dmd", "student_1_3b", "student_1_3b_dmd")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = ""
    c.objective = "ode"               # ode | dmd
    c.workdir = ""                    # ckpt/, metrics.jsonl, val/, export/
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 1                  # global batch per update (all hosts), a multiple of accum_steps
    c.accum_steps = 1                 # gradient accumulation micro-batches
    c.log_every = 10
    c.ckpt_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.progress = True
    c.peak_tflops = 0.0               # per-device peak for MFU (0: from the device kind)
    c.master_dtype = "float32"        # parameters / optimizer (master weights)
    c.compute_dtype = "bfloat16"      # activations and matmuls
    c.attention = "auto"              # xla | cudnn | splash | auto
    c.remat = True                    # rematerialise every transformer block (and the pose stacks)
    c.remat_policy = "attention"      # what a remat block keeps: full | attention | attention_proj | dots
                                      # (wanjax.models.dit.REMAT_POLICIES). "attention" keeps the cuDNN
                                      # self-attention outputs: ODE step 2.235 -> 2.037 s, +0.6 GiB (H100)
    c.remat_dots_layers = 0           # the first N DiT blocks of the student / critic keep every matmul output
                                      # ("dots") instead: ~1.3 GiB per block at 480x832 x 21 frames for ~1-2.5 ms
                                      # less recompute each (docs/PERFORMANCE.md, session 6). Spare memory only
    c.residual_dtype = "float32"      # the student's / critic's residual-stream storage: float32 (upstream Wan) or
                                      # bfloat16 (diffusers' layout; Self-Forcing trains with every add in bf16).
                                      # The adds still run in fp32. H100 ODE step: 1.750 -> 1.727 s, -2 GiB
                                      # (docs/PERFORMANCE.md, session 9)
    c.unroll_layers = False           # unroll the student's / critic's layer scans into straight-line code: no stacked
                                      # residual buffers (their zero-fills, copies and transposes). Same function.
                                      # H100 ODE step (remat_dots_layers 18 -> 25, which its lower memory allows,
                                      # residual_dtype bf16, pose_trunk_cached): 1.580 -> 1.516 s; compile 45 -> 95 s
                                      # (docs/PERFORMANCE.md, session 13). DMD steps not measured with it, so off
    c.pose_time_chunk = 0             # latent frames per pass of the pose stacks (0: whole video in one pass).
                                      # Exact. Measured on an H100 (21 frames, 480x832) at 3: ODE step 2.02 ->
                                      # 2.52 s and the DMD generator's temporaries 32.6 -> 40.0 GiB, so off
    c.pose_trunk_trainable = True     # False: the pose stack's trunk (dwpose_embedding.0-10, ~36 K params, e.g. from
                                      # UniAnimate's release) stays frozen; only its head, pose_proj and the DiT train.
                                      # Skips the full-resolution backward convs: see docs/PERFORMANCE.md
    c.pose_trunk_cached = False       # True (with pose_trunk_trainable=False): read each sample's pose_trunk features,
                                      # which generate_teacher stores, instead of running the frozen trunk over the
                                      # full-resolution pose frames every step. The student's (and teacher's) trunk
                                      # must be the one that wrote them (pose_trunk_sha256; pose_init from that
                                      # teacher). H100 ODE step 1.732 -> 1.684 s (docs/PERFORMANCE.md, session 10)
    c.offload_state = False           # optimizer state + EMA in pinned host memory; a phase moves only its own model's
                                      # to the device for its update (Trainer(offload=True)). Meant for the DMD steps,
                                      # whose other model's Adam state / EMA otherwise sit unused on the device. Set it
                                      # on 1 GPU (1.3B stand-in teacher) and 2 GPUs (14B teacher): both fit an H100 only
                                      # with it (docs/PERFORMANCE.md, session 5), at +3-9% step time
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = distributed_config()  # initialize auto | yes | no, coordinator_address, num_processes, process_id
    # XLA's deterministic GPU kernels (--xla_gpu_deterministic_ops): a resumed run then equals an uninterrupted
    # one bit for bit on GPUs too, for ~6% step time (H100, docs/PERFORMANCE.md session 7); CPU/TPU: no effect
    c.deterministic = False
    c.data = ml_collections.ConfigDict(dict(dir="", seed=0, on_error="stop", prefetch=2, verify=True,
                                            negative_embeds_path=""))
    c.student = ml_collections.ConfigDict(dict(preset="student_1_3b_pose", init="", num_frame_per_block=3,
                                               max_frames=21, pose_init=""))  # pose_init: a UniAnimate pose
    # checkpoint (e.g. the converted teacher's root) whose pose stacks the student starts from (pose_proj stays 0)
    c.teacher = ml_collections.ConfigDict(dict(preset="teacher_14b", ckpt_dir="", dtype="bfloat16"))
    c.critic = ml_collections.ConfigDict(dict(preset=""))   # "": the student's preset and initial weights
    c.optim = ml_collections.ConfigDict(dict(lr=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                             max_grad_norm=10.0, warmup_steps=0, mu_dtype=""))  # "": params'
    # (mu_dtype="bfloat16": Adam's first moment in bf16, 2.9 GiB less for the 1.3B student, which on one H100
    # lets all 30 blocks keep their matmul outputs: ODE step 1.530 -> 1.506 s, docs/PERFORMANCE.md session 14)
    c.ema = ml_collections.ConfigDict(dict(decay=0.99, start_step=200))   # decay 0: no EMA
    # ODE regression (and UniAnimate's dropout recipe, shared with dmd)
    c.ode = ml_collections.ConfigDict(dict(clean_context=True, pose_drop=0.05, image_drop=0.10))
    # Self-Forcing DMD (self_forcing.md 5.7)
    c.dmd = ml_collections.ConfigDict(dict(gen_update_ratio=5, lr_generator=2e-6, lr_critic=4e-7, b1=0.0, b2=0.999,
                                           guidance_scale=3.0, shift=5.0, score_shift=8.0,
                                           steps=(1000, 750, 500, 250), context_sigma=0.0, last_step_only=False))
    c.val = ml_collections.ConfigDict(dict(every=0, num_samples=1, vae_dir="", fps=16.0))
    c.export = ml_collections.ConfigDict(dict(enabled=True, dir="", link_from=""))
    return c


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown distillation preset {name!r}; choose one of {list(PRESETS)} "
                         f"(--config configs/distill.py:NAME)")
    c = _base()
    c.preset = name
    if name.startswith("tiny"):
        c.total_steps = 20
        c.batch_size = 2
        c.log_every = 5
        c.ckpt_every = 10
        c.master_dtype = c.compute_dtype = "float32"
        c.attention = "xla"
        c.remat = False
        c.student.preset = "tiny_student"
        c.teacher.preset = "tiny_teacher"
        c.teacher.dtype = "float32"
        c.optim.lr = 5e-3
        c.optim.weight_decay = 0.0
        c.optim.max_grad_norm = 1.0
        c.ema.start_step = 0
        c.val.fps = 8.0
    else:
        c.total_steps = 3000
        c.batch_size = 64
        c.mesh.fsdp = -1
    if name.endswith("dmd"):
        c.objective = "dmd"
        c.ema.start_step = 200 if not name.startswith("tiny") else 0
        c.total_steps = 600 if not name.startswith("tiny") else 4
        c.optim.max_grad_norm = 10.0
        c.optim.weight_decay = 0.01
        if not name.startswith("tiny"):
            c.optim.mu_dtype = "bfloat16"   # b1 = 0: Adam's first moment is the gradient itself
    return c
