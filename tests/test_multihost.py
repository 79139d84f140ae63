"""A real multi-process run of ``python -m train.distill`` on the CPU: two processes (one device each)
joined by ``jax.distributed.initialize`` (Gloo collectives), each reading its own rows of every
global batch, writing one Orbax checkpoint together. It must equal the same run in one process with
two devices, bit for bit: the same global batches, the same sharded step, the same reductions."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from wanjax.training.distributed import DETERMINISTIC_FLAG

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ``WANJAX_MULTIHOST_PLATFORM=gpu`` runs these multi-process tests on real GPUs instead: a process with
# ``devices`` devices starting at GPU ``first`` sees exactly those (tests/test_multihost.py needs 2
# GPUs, tests/test_multihost_teacher.py 4). Bit-identity needs XLA's deterministic GPU kernels, so the
# processes get ``WANJAX_MULTIHOST_XLA_FLAGS`` (default ``--xla_gpu_deterministic_ops=true``); without
# them both tests differ in the last bits on 4 x H100 (2026-11-26, docs/PERFORMANCE.md).
#   WANJAX_MULTIHOST_PLATFORM=gpu pytest tests/test_multihost.py tests/test_multihost_teacher.py
PLATFORM = os.environ.get("WANJAX_MULTIHOST_PLATFORM", "cpu")
if PLATFORM not in ("cpu", "gpu"):
    raise ValueError(f"WANJAX_MULTIHOST_PLATFORM={PLATFORM!r}: use cpu (the default) or gpu")


def _env(devices: int, first: int = 0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    path = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(path), JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    if PLATFORM == "gpu":
        env.update(JAX_PLATFORMS="cuda", CUDA_VISIBLE_DEVICES=",".join(map(str, range(first, first + devices))),
                   XLA_FLAGS=os.environ.get("WANJAX_MULTIHOST_XLA_FLAGS", DETERMINISTIC_FLAG))
    else:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _cmd(workdir: Path, targets: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train.distill", "--config", "configs/distill.py:tiny",
            f"--config.workdir={workdir}", f"--config.data.dir={targets}", f"--config.total_steps={STEPS}",
            "--config.batch_size=2", "--config.progress=False", *extra]


def _restore(path: Path):
    import orbax.checkpoint as ocp

    c = ocp.PyTreeCheckpointer()
    meta = c.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return c.restore(path, restore_args=jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
    from tests.test_training_ckpt import random_targets, write_targets

    targets = write_targets(random_targets(8), tmp_path / "targets")
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = _cmd(tmp_path / "multi", targets, "--config.distributed.initialize=yes",
                   f"--config.distributed.coordinator_address=localhost:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(1, first=i), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
        assert "process %d of 2, 2 devices" % i in out, out[-2000:]
    single = subprocess.run(_cmd(tmp_path / "single", targets), cwd=REPO, env=_env(2), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    # process 0 wrote the metrics; the losses are the single-process ones
    def losses(run):
        return [r["ode/loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "ode/loss" in r]
    assert losses("multi") == losses("single") and losses("single")
    # the checkpoint both processes wrote == the single-process one, array for array
    a = _restore(tmp_path / "multi" / "ckpt" / str(STEPS) / "state")
    b = _restore(tmp_path / "single" / "ckpt" / str(STEPS) / "state")
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 100
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the inference export is left to a one-process run (said in the log), not written half-way
    assert not (tmp_path / "multi" / "export").exists() and "export skipped" in outs[0]


def test_deterministic_flag_reaches_xla_before_the_backends_start():
    """``--config.deterministic``: ``set_deterministic`` appends XLA's deterministic-kernels flag to
    ``XLA_FLAGS`` (keeping the flags already there) before the backends start; XLA accepts it (an unknown
    flag would abort the process) and still sees the earlier flag. Once the backends run, asking for it
    is an error that says to set ``XLA_FLAGS`` instead."""
    script = """
import os, jax
from wanjax.training.distributed import DETERMINISTIC_FLAG, set_deterministic
assert set_deterministic(False) is False and os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
assert set_deterministic(True) is True and set_deterministic(True) is False
assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=3", DETERMINISTIC_FLAG]
assert jax.device_count() == 3 and float(jax.numpy.ones(4).sum()) == 4.0
os.environ["XLA_FLAGS"] = ""
try:
    set_deterministic(True)
except RuntimeError as e:
    assert "XLA_FLAGS" in str(e) and "already started" in str(e), e
else:
    raise AssertionError("no error once the backends run")
print("ok")
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
