"""Inference configs: ``get_config(name)`` for ``teacher_14b``, ``student_1_3b``, ``tiny`` and
``tiny_student``.

Checkpoints: ``ckpt_dir`` is a root holding ``dit/ pose/ vae/ clip/ t5/ tokenizer/`` (each a
converted wanjax checkpoint, see converters/); any of ``model_dir``, ``pose_dir``, ``vae_dir``,
``clip_dir``, ``t5_dir``, ``tokenizer_dir`` overrides its sub-directory. ``prompt_embeds_path`` (a
.npz with ``prompt`` / ``negative`` arrays [n, text_dim]) replaces T5 entirely.

``model.expect`` lists DiT fields the checkpoint must have (a mismatch is an error naming the
checkpoint and the preset). ``tiny`` / ``tiny_student`` are random-weight test models whose
directory is given with ``--config.ckpt_dir``.
"""
from __future__ import annotations

import ml_collections

UA_NEGATIVE = ("细节模糊不清，字幕，作品，画作，画面，静止，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
               "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，杂乱的背景，三条腿，背景人很多，倒着走")

PRESETS = ("teacher_14b", "student_1_3b", "tiny", "tiny_student")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = ""
    c.pipeline = "teacher"            # teacher | student
    c.ckpt_dir = ""
    c.model_dir = ""
    c.pose_dir = ""
    c.vae_dir = ""
    c.clip_dir = ""
    c.t5_dir = ""
    c.tokenizer_dir = ""
    c.prompt = "a person is dancing"
    c.negative_prompt = UA_NEGATIVE
    c.prompt_embeds_path = ""
    c.ref_pose = ""                   # reference pose drawing (default: pose.jpg in the pose folder)
    c.height = 832
    c.width = 480
    c.num_frames = 81
    c.seed = 0
    c.fps = 16.0
    c.attention = "auto"              # xla | cudnn | splash | auto
    c.dtype = "bfloat16"              # DiT compute/param dtype
    c.residual_dtype = ""             # DiT residual-stream storage: "" = the checkpoint's (float32 unless trained
                                      # with bfloat16), or float32 | bfloat16 (WanDiTConfig.residual_dtype)
    c.vae_dtype = "float32"
    c.t5_dtype = "bfloat16"
    c.sampler = ml_collections.ConfigDict(dict(name="euler", steps=50, shift=5.0, cfg_scale=1.5,
                                               student_steps=(1000, 750, 500, 250)))
    c.conditioning = ml_collections.ConfigDict(dict(mode="pose+image", y_frames=21))
    c.model = ml_collections.ConfigDict(dict(expect={}, num_frame_per_block=3, local_attn_size=-1,
                                             sink_size=0, max_frames=21))
    c.window = ml_collections.ConfigDict(dict(size=21, overlap=4))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.pose = ml_collections.ConfigDict(dict(pad_last=False, start=0))
    c.stream = ml_collections.ConfigDict(dict(poll_s=0.1, timeout_s=30.0))
    return c


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown inference preset {name!r}; choose one of {list(PRESETS)} "
                         f"(--config configs/infer.py:NAME)")
    c = _base()
    c.preset = name
    if name == "teacher_14b":
        c.model.expect = dict(dim=5120, num_layers=40, in_dim=36, i2v=True)
    elif name == "student_1_3b":
        c.pipeline = "student"
        c.height, c.width = 480, 832
        c.sampler.name = "student"
        c.sampler.cfg_scale = 1.0
        c.model.expect = dict(dim=1536, num_layers=30)
        c.model.local_attn_size = -1
        c.model.max_frames = 21
    elif name in ("tiny", "tiny_student"):
        c.height = c.width = 32
        c.num_frames = 9
        c.dtype = "float32"
        c.t5_dtype = "float32"
        c.attention = "xla"
        c.fps = 8.0
        c.sampler.steps = 3
        c.model.expect = dict(dim=64, num_layers=2)
        c.model.max_frames = 12
        c.conditioning.y_frames = 6
        c.window.size = 6
        c.window.overlap = 2
        if name == "tiny_student":
            c.pipeline = "student"
            c.sampler.name = "student"
            c.sampler.cfg_scale = 1.0
    return c
