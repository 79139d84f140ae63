"""Distillation training-step speed: the 1.3B pose student's ODE step, and the DMD generator and critic
steps with a stand-in (1.3B) or the 14B teacher, through ``wanjax.training.Trainer``.

    PYTHONPATH=. python -m bench.train                       # all three stages, 1.3B stand-in teacher
    PYTHONPATH=. python -m bench.train --teacher teacher_14b # DMD with the 14B teacher (2 GPUs: FSDP)
    PYTHONPATH=. python -m bench.train --only ode --frames 21 --height 480 --width 832 --repeats 5
    PYTHONPATH=. python -m bench.train --stages ode --remat_policy full,attention --pose_conv 3d,fold

Random weights and random targets at the real shapes (one sample per device: global batch =
devices; 21 latent frames = 81 pose frames, 480x832, CLIP 257 tokens, text 512 x 4096). fp32 master
weights, bf16 compute, remat per block (DiT) and on the pose stack's full-resolution layers, AdamW
(Self-Forcing's betas for DMD), all devices in one FSDP mesh. Each stage runs in its own process so
that its peak memory is its own. Prints one table: compile time, step time, peak device memory,
model TFLOP per step, MFU.

``--remat_policy`` (default ``attention``, as configs/distill.py) picks what a rematerialised block
keeps (``wanjax.models.dit.REMAT_POLICIES``) and ``--remat_dots_layers N`` lets the first N blocks keep
every matmul output instead; ``--unroll_layers`` unrolls the DiT's layer scans
(``WanDiTConfig.unroll_layers``); ``--pose_conv`` the pose stack's 3-D conv form;
``--pose_time_chunk`` (default 0 = whole video, as configs/distill.py) the latent frames per pass of
the pose stacks; ``--offload`` keeps optimizer state and EMA in pinned host memory (``Trainer(offload=True)``);
``--pose_trunk frozen`` keeps the pose stack's trunk out of the gradient (configs/distill.py
``pose_trunk_trainable=False``; its FLOPs then count once, forward only); ``--pose_trunk cached`` also
gives the batch the trunk's precomputed features instead of the pose frames (configs/distill.py
``pose_trunk_cached``; the trunk neither runs nor counts). ``--profile DIR`` traces one
more step and lists the ``--profile_top`` longest kernels; ``--hlo DIR`` writes the compiled step's
optimized HLO, which names the source of each fusion in such a list.

Two step times: "step" is the median of ``--repeats`` steps each dispatched and waited for alone, so
it includes the host's dispatch and the batch's host-to-device copy; "pipelined" is the mean over
``--pipelined`` steps dispatched back to back and waited for once, the steady state that
``train.distill`` runs (it fetches metrics only every ``log_every`` steps) and reports as
``step_time_s`` / ``mfu``.

MFU = model FLOPs of the step / (step time x devices x peak bf16 FLOP/s per device). Model FLOPs
(``wanjax.training.dit_forward_flops`` + ``pose_encoder_flops`` / ``pose_train_flops``; matmuls and
convolutions, 2 per multiply-add, remat not counted):

* ODE:       3 x (block-causal student forward over 21 frames + pose encoders).
* generator: the no-grad rollout (per block E[exit] + 2 = 3.5 cached forwards of 3 frames against
             the prefix), 3 x (the exit forwards + the student's pose encoders), one critic forward
             and two teacher forwards (CFG) over 21 frames, bidirectional.
* critic:    the no-grad rollout + student pose encoders + 3 x critic forward.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

# Training wants the whole accelerator: JAX's default lets a process use 75% of GPU memory (60 GiB
# of an 80 GB H100: a 1.3B ODE-step variant failed allocating 30 GiB of temporaries next to 24 GiB of
# training state). Set before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from bench.common import peak_bytes, print_table
from wanjax import sharding as shd
from wanjax.models.dit import RESIDUAL_DTYPES

STAGES = ("ode", "generator", "critic")


def _models(args, mesh):
    """(student, critic, teacher) PoseDiTs with random weights, created sharded on the mesh."""
    import dataclasses

    from wanjax.models import unianimate as ua

    def build(preset, dtype, param_dtype, remat, seed):
        pc = ua.PRESETS[preset]
        pc = pc.replace(dit=pc.dit.replace(dtype=dtype, param_dtype=param_dtype, attention=args.attention,
                                           remat=remat, remat_policy=args.remat_policy,
                                           remat_dots_layers=args.remat_dots_layers if remat else 0,
                                           residual_dtype=args.residual_dtype if remat else "float32",
                                           unroll_layers=args.unroll_layers,
                                           max_frames=max(args.frames, pc.dit.max_frames)),
                        pose=dataclasses.replace(pc.pose, remat=remat, time_chunk=args.pose_time_chunk or None,
                                                 train_trunk=args.pose_trunk == "trained"))
        abstract = nnx.eval_shape(lambda: ua.PoseDiT(pc, rngs=nnx.Rngs(seed)))
        gd, state = nnx.split(abstract)
        sh = shd.state_shardings(state, mesh)

        def init():
            m = ua.PoseDiT(pc, rngs=nnx.Rngs(seed))
            k = m.dit.head.head.kernel  # zero-initialised: give the head weights so outputs are not 0
            k[...] = (jax.random.normal(jax.random.key(seed), k.shape) * 0.02).astype(k.dtype)
            if m.pose.pose_proj is not None:
                p = m.pose.pose_proj.kernel
                p[...] = (jax.random.normal(jax.random.key(seed + 1), p.shape) * 0.02).astype(p.dtype)
            return nnx.state(m)

        state = jax.jit(init, out_shardings=sh)()
        m = nnx.merge(gd, state)
        m.pose.conv_impl = args.pose_conv
        return m

    student = build(args.student, "bfloat16", "float32", True, 0)
    if args.stage == "ode":
        return student, None, None
    critic = build(args.student, "bfloat16", "float32", True, 1)
    teacher = build(args.teacher, "bfloat16", "bfloat16", False, 2)
    return student, critic, teacher


def _batch(args, n: int, dcfg, pose_hidden: int = 16) -> dict:
    rng = np.random.default_rng(0)
    F, H, W = args.frames, args.height, args.width
    h, w = H // 8, W // 8
    T = 4 * (F - 1) + 1
    f32 = lambda *s: rng.standard_normal(s, dtype=np.float32)
    b = {"context": f32(n, dcfg.text_len, dcfg.text_dim), "clip_fea": f32(n, 257, dcfg.image_dim),
         "ref_y": f32(n, F, h, w, 20),
         "ref_pose": rng.random((n, H, W, 3), dtype=np.float32),
         "pose": rng.integers(0, 255, (n, T, H, W, 3), dtype=np.uint8)}
    if args.pose_trunk == "cached":  # the frozen trunk's features, precomputed per sample, instead of the frames
        del b["pose"]
        b["pose_trunk"] = rng.random((n, F, h, w, pose_hidden), dtype=np.float32)
    if args.stage == "ode":
        from wanjax import sampling
        _, sig = sampling.student_schedule()
        b.update(traj=f32(n, 4, F, h, w, 16), traj_sigmas=np.tile(sig, (n, 1)).astype(np.float32),
                 x0=f32(n, F, h, w, 16))
    else:
        b["neg_context"] = f32(n, dcfg.text_len, dcfg.text_dim)
    return b


def run_stage(args) -> dict:
    """One stage in this process: build, compile, time. Returns the row as a dict."""
    from wanjax.distill import objectives
    from wanjax.distill.ode import ODEConfig
    from wanjax.training import EMAConfig, Trainer, make_optimizer
    from wanjax.models.pose import frozen_params
    from wanjax.training.loop import peak_flops_per_device

    mesh = shd.make_mesh(data=-1, fsdp=1) if args.mesh == "data" else shd.make_mesh(data=1, fsdp=-1)
    n = len(jax.devices())
    t0 = time.perf_counter()
    student, critic, teacher = _models(args, mesh)
    batch = _batch(args, n, student.cfg.dit, student.cfg.pose.hidden)
    sample = {k: v[0] for k, v in batch.items()}
    ns = types.SimpleNamespace
    if args.stage == "ode":  # ODEConfig's defaults (UniAnimate's dropout), the phase and FLOPs train.distill builds
        cfg = ns(ode=ODEConfig(), pose_trunk_cached=args.pose_trunk == "cached")
        phases = objectives.ode_phases(cfg, student, sample)
        opt = make_optimizer(2e-5, mu_dtype=args.ode_mu_dtype or None, frozen=frozen_params(student.cfg.pose))
        trainer = Trainer({"student": student}, {"student": opt}, phases, mesh, ema={"student": EMAConfig(0.99, 0)},
                          offload=args.offload)
        phase = "ode"
    else:
        cfg = ns(dmd=ns(steps=(1000, 750, 500, 250), shift=5.0, score_shift=8.0, guidance_scale=3.0,
                        context_sigma=0.0, last_step_only=False, gen_update_ratio=1),
                 ode=ODEConfig(), pose_trunk_cached=args.pose_trunk == "cached")
        phases = objectives.dmd_phases(cfg, student, teacher, critic, sample)
        opt = lambda lr, m: make_optimizer(lr, b1=0.0, b2=0.999, mu_dtype=args.dmd_mu_dtype or None,
                                           frozen=frozen_params(m.cfg.pose))
        trainer = Trainer({"student": student, "critic": critic},
                          {"student": opt(2e-6, student), "critic": opt(4e-7, critic)},
                          phases, mesh, frozen={"teacher": teacher}, ema={"student": EMAConfig(0.99, 0)},
                          offload=args.offload)
        phase = args.stage
    del student, critic, teacher
    state = trainer.init_state(keep_initial=False)
    jax.block_until_ready(state)
    t_build = time.perf_counter() - t0
    mem = {}
    step = lambda s: trainer.update(s, phase, batch)  # noqa: E731
    t_compile = 0.0
    hlo_text = ""
    if args.memory or args.hlo:  # XLA's buffer assignment for the step (before running it: also for OOM cases)
        i = [p.name for p in trainer.phases].index(phase)
        b = trainer.micro_split(batch)
        fn, bsh = trainer._update_fn(i, b)
        tc = time.perf_counter()
        compiled = fn.lower(state, trainer.put_batch(b, bsh), trainer.frozen_params).compile()
        t_compile = time.perf_counter() - tc
        ma = compiled.memory_analysis()
        mem = {k: getattr(ma, k) / 2 ** 30 for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                      "temp_size_in_bytes", "alias_size_in_bytes")
               if hasattr(ma, k)}
        print("MEMORY " + json.dumps(mem), flush=True)
        if args.hlo:  # the optimized HLO: maps the profile's fusion / kernel names to their ops and source lines
            path = Path(args.hlo) / f"{phase}_{args.remat_policy}_{args.pose_trunk}.hlo.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            hlo_text = compiled.as_text()
            path.write_text(hlo_text)
        step = lambda s: compiled(s, trainer.put_batch(b, bsh), trainer.frozen_params)  # noqa: E731  (no 2nd compile)
    t0 = time.perf_counter()
    state, m = step(state)
    jax.block_until_ready(state)
    t_first = t_compile + time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, m = step(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    pipelined = None
    if args.pipelined:
        from bench.common import pipelined_time

        state, pipelined, m = pipelined_time(step, state, args.pipelined)
    prof = None
    if args.profile:  # one more step under the profiler: device time per XLA op and per category
        from bench.common import device_op_times

        d = os.path.join(args.profile, f"{phase}_{args.remat_policy}")
        with jax.profiler.trace(d):
            state, m = step(state)
            jax.block_until_ready(state)
        prof = device_op_times(d, top=args.profile_top)
        if args.hlo:  # the JAX op (with the model's named scopes) behind each listed kernel
            from bench.common import hlo_op_names

            prof["op_names"] = hlo_op_names(hlo_text, [r[0] for r in prof["top"]])
        print("PROFILE " + json.dumps(prof), flush=True)
    determinism = None
    if args.check_determinism:  # the same step twice from one state: are the results bit-identical?
        shardings = jax.tree.map(lambda x: x.sharding, state)
        host = jax.device_get(state)
        del state  # (only the host copy stays: each run gets a fresh device copy, which the step donates)
        determinism = step_is_deterministic(step, host, shardings)
    flops = next(p for p in trainer.phases if p.name == phase).flops_per_sample * n
    step = float(np.median(times))
    peak = peak_flops_per_device(args.peak_tflops * 1e12 if args.peak_tflops else None)
    loss = float(m[f"{phase}/loss"])
    return {"stage": phase, "devices": n, "device": jax.devices()[0].device_kind, "build_s": t_build,
            "compile_and_first_s": t_first, "step_s": step, "steps_s": times,
            "peak_gib": (peak_bytes() or 0) / 2 ** 30, "model_tflop": flops / 1e12,
            "mfu": flops / step / (peak * n) if peak else None, "loss": loss,
            "pipelined_step_s": pipelined,
            "pipelined_mfu": flops / pipelined / (peak * n) if peak and pipelined else None,
            "teacher": args.teacher if phase != "ode" else None, "remat_policy": args.remat_policy,
            "pose_conv": args.pose_conv, "pose_time_chunk": args.pose_time_chunk, "offload": args.offload,
            "pose_trunk": args.pose_trunk, "remat_dots_layers": args.remat_dots_layers,
            "residual_dtype": args.residual_dtype, "unroll_layers": args.unroll_layers,
            "mesh": args.mesh, "mu_dtype": (args.ode_mu_dtype if phase == "ode" else args.dmd_mu_dtype) or "float32",
            "memory_gib": mem, "determinism": determinism,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def fingerprint(tree) -> list[int]:
    """Per leaf, the uint32 sum of its bit patterns (wrapping): exact and independent of the
    summation order, so two runs agree on it iff (up to a 2^-32 chance) their bits agree."""
    def fp(x):
        bits = {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jnp.sum(jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32), dtype=jnp.uint32)
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.number) and x.dtype.itemsize in (2, 4)]
    return [int(v) for v in jax.device_get([fp(x) for x in leaves])]


def step_is_deterministic(step, host, shardings) -> dict:
    """Run ``step`` twice, each time on a fresh device copy (``shardings``) of the host state ``host``
    (the step donates its input), and compare the new states and the metrics bit for bit."""
    runs = []
    for _ in range(2):
        s, m = step(jax.device_put(host, shardings))
        runs.append((fingerprint(s), {k: float(v) for k, v in jax.device_get(m).items()}))
        del s
    (fa, ma), (fb, mb) = runs
    differ = sum(a != b for a, b in zip(fa, fb))
    return {"identical": differ == 0 and ma == mb, "leaves": len(fa), "leaves_differing": differ,
            "metrics_differing": sorted(k for k in ma if ma[k] != mb.get(k))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=STAGES, default=None, help="run one stage in this process")
    ap.add_argument("--student", default="student_1_3b_pose")
    ap.add_argument("--teacher", default="student_1_3b_pose",
                    help="DMD teacher preset: student_1_3b_pose (1.3B stand-in) or teacher_14b")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=21, help="latent frames")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pipelined", type=int, default=5,
                    help="also time N steps dispatched back to back, waited for once (as train.distill runs "
                         "between log steps: dispatch and the batch copy overlap the previous step); 0: off")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak (0: from the device kind)")
    ap.add_argument("--dmd_mu_dtype", default="bfloat16",
                    help="Adam first-moment dtype of the DMD stages (configs/distill.py: bfloat16; '' = fp32)")
    ap.add_argument("--mesh", choices=("fsdp", "data"), default="fsdp",
                    help="how the devices split the step: fsdp (parameters and optimizer state sharded) or data "
                         "(replicated; gradients all-reduced)")
    ap.add_argument("--ode_mu_dtype", default="",
                    help="Adam first-moment dtype of the ODE stage (configs/distill.py optim.mu_dtype; '' = fp32)")
    ap.add_argument("--remat_policy", default="attention",
                    help="comma-separated wanjax.models.dit.REMAT_POLICIES to compare (one row each)")
    ap.add_argument("--remat_dots_layers", type=int, default=0,
                    help="the first N DiT blocks keep every matmul output (WanDiTConfig.remat_dots_layers)")
    ap.add_argument("--residual_dtype", default="float32", choices=RESIDUAL_DTYPES,
                    help="the trained models' residual-stream storage (WanDiTConfig.residual_dtype)")
    ap.add_argument("--unroll_layers", action="store_true",
                    help="unroll the DiT's layer scans (WanDiTConfig.unroll_layers: no stacked residuals)")
    ap.add_argument("--pose_conv", default="3d",
                    help="comma-separated pose-stack conv implementations (3d, fold, auto) to compare")
    ap.add_argument("--pose_trunk", choices=("trained", "frozen", "cached"), default="trained",
                    help="frozen: the pose stack's trunk gets no gradient (configs/distill.py pose_trunk_trainable); "
                         "cached: frozen, and the batch carries its precomputed features instead of the pose frames")
    ap.add_argument("--pose_time_chunk", type=int, default=0,
                    help="latent frames per pass of the pose stacks (configs/distill.py pose_time_chunk; 0: whole)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages (without --only)")
    ap.add_argument("--memory", action="store_true", help="print XLA's memory analysis of the compiled step")
    ap.add_argument("--offload", action="store_true",
                    help="optimizer state + EMA in pinned host memory (configs/distill.py offload_state)")
    ap.add_argument("--profile", default="", help="trace one extra step into DIR and report device time per op")
    ap.add_argument("--hlo", default="", help="write the compiled step's optimized HLO text into DIR")
    ap.add_argument("--profile_top", type=int, default=30, help="how many of the longest ops --profile lists")
    ap.add_argument("--check_determinism", action="store_true",
                    help="run the step twice from one state and compare the results bit for bit (e.g. with and "
                         "without XLA_FLAGS=--xla_gpu_deterministic_ops=true)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.only:
        args.stage = args.only
        print("BENCH_ROW " + json.dumps(run_stage(args)), flush=True)
        return 0
    rows, profiles = [], []
    own = ("--json", "--remat_policy", "--pose_conv", "--stages")  # handled here, not passed on
    passthrough, skip = [], False
    for a in (argv if argv is not None else sys.argv[1:]):
        if skip:
            skip = False
        elif a in own:
            skip = True  # "--flag value": drop the value too
        elif not a.startswith(tuple(f + "=" for f in own)):
            passthrough.append(a)
    for stage in args.stages.split(","):
        for policy in args.remat_policy.split(","):
            for conv in args.pose_conv.split(","):
                cmd = [sys.executable, "-m", "bench.train", "--only", stage, f"--remat_policy={policy}",
                       f"--pose_conv={conv}"] + passthrough
                p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                line = [l for l in p.stdout.splitlines() if l.startswith("BENCH_ROW ")]
                mem = [l for l in p.stdout.splitlines() if l.startswith("MEMORY ")]
                prof = [l for l in p.stdout.splitlines() if l.startswith("PROFILE ")]
                if prof:
                    profiles.append((f"{stage} {policy} {conv}", json.loads(prof[-1][len("PROFILE "):])))
                if mem:
                    sys.stderr.write(f"{stage} {policy} {conv}: {mem[-1]}\n")
                if p.returncode or not line:
                    err = p.stderr.strip().splitlines()
                    sys.stderr.write(p.stderr[-3000:])
                    oom = next((l for l in err if "RESOURCE_EXHAUSTED" in l or "Out of memory" in l), "")
                    rows.append({"stage": stage, "remat_policy": policy, "pose_conv": conv,
                                 "error": ("OOM: " + oom[:120]) if oom else f"exit {p.returncode}"})
                    continue
                rows.append(json.loads(line[-1][len("BENCH_ROW "):]))
    table = [("stage", "remat", "pose conv", "devices", "compile+first (s)", "step (s)", "peak (GiB)",
              "TFLOP/step", "MFU", "pipelined step (s)", "pipelined MFU")]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in rows:
        if "error" in r:
            table.append((r["stage"], r["remat_policy"], r["pose_conv"], "-", r["error"]) + ("-",) * 6)
            continue
        name = r["stage"] + (f" (teacher {r['teacher']})" if r["teacher"] else "")
        table.append((name, r["remat_policy"], r["pose_conv"], r["devices"], f"{r['compile_and_first_s']:.1f}",
                      f"{r['step_s']:.3f}", f"{r['peak_gib']:.1f}", f"{r['model_tflop']:.1f}", pct(r["mfu"]),
                      "-" if r.get("pipelined_step_s") is None else f"{r['pipelined_step_s']:.3f}",
                      pct(r.get("pipelined_mfu"))))
    print_table("train", table)
    for r in rows:
        if r.get("determinism"):
            d = r["determinism"]
            sys.stderr.write(f"determinism ({r['stage']}, XLA_FLAGS={r['xla_flags']!r}): "
                             f"{'bit-identical' if d['identical'] else 'DIFFERENT'}; {d['leaves_differing']} of "
                             f"{d['leaves']} state leaves differ; metrics differing: {d['metrics_differing']}\n")
    for label, pr in profiles:  # --profile: where the traced step's device time went
        sys.stderr.write(f"\nprofile of {label}: {pr['total_ms']:.1f} ms of device ops "
                         f"(trace lines: {', '.join(pr.get('lines', [])[:12])})\n")
        for cat, ms in pr["by_category"].items():
            sys.stderr.write(f"  {cat:<32} {ms:9.1f} ms  {100 * ms / max(pr['total_ms'], 1e-9):5.1f}%\n")
        for name, cat, ms, count in pr["top"]:
            src = pr.get("op_names", {}).get(name, "")
            tail = f"  {src[-110:]}" if src else ""
            sys.stderr.write(f"    {name[:60]:<60} {cat:<30} {ms:8.1f} ms  x{count}{tail}\n")
    if rows and "device" in rows[0]:
        print(f"device: {rows[0]['device']}, {args.frames} latent frames, {args.height}x{args.width}, "
              f"pose time chunk {args.pose_time_chunk or 'off'}, offload {'on' if args.offload else 'off'}, "
              f"pose trunk {args.pose_trunk}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "profiles": dict(profiles)} if profiles else rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
