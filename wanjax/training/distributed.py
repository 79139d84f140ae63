"""Multi-host start: ``jax.distributed.initialize`` from a config block, shared by the CLIs
(``train.distill``, ``train.generate_teacher``).

``config()`` is the block (``--config.distributed.*``):

* ``initialize``: ``auto`` (initialize when a cluster is detected: ``JAX_COORDINATOR_ADDRESS`` /
  ``COORDINATOR_ADDRESS`` set, a SLURM job of several tasks, a TPU pod slice of several hosts),
  ``yes`` or ``no``;
* ``coordinator_address`` (``host:port``; setting it implies ``yes``), ``num_processes`` and
  ``process_id`` (-1: let JAX detect them; needed where no cluster environment tells them).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("wanjax")

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def config():
    import ml_collections

    return ml_collections.ConfigDict(dict(initialize="auto", coordinator_address="", num_processes=-1,
                                          process_id=-1))


def wanted(d) -> bool:
    """Should this process call ``jax.distributed.initialize``?"""
    if d.initialize == "yes" or d.coordinator_address:
        return True
    if d.initialize == "no":
        return False
    if d.initialize != "auto":
        raise ValueError(f"--config.distributed.initialize={d.initialize!r}: choose auto, yes or no")
    if any(os.environ.get(k) for k in _CLUSTER_ENV):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:          # multi-node GPU job (srun)
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")          # TPU pod slice, one process per host
    return "," in hosts


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def set_deterministic(enabled: bool) -> bool:
    """``--config.deterministic``: XLA's deterministic GPU kernels, so that a resumed (or re-run) job
    reproduces an uninterrupted one bit for bit on GPUs as it does on the CPU. The default kernels
    (cuDNN's flash backward, atomic reductions) differ run to run in the last bits; the flag costs ~6%
    of an H100 ODE step (docs/PERFORMANCE.md, session 7). No effect on CPUs and TPUs.

    XLA reads ``XLA_FLAGS`` when its backends start, so this must run before any JAX computation;
    it appends the flag to ``XLA_FLAGS`` and returns whether it was added."""
    if not enabled:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_FLAG in flags.split():
        return False
    from jax._src import xla_bridge  # (no public API tells whether the backends have started)

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"--config.deterministic=True: JAX's backends already started, so {DETERMINISTIC_FLAG} "
                           f"would not take effect; set XLA_FLAGS='{DETERMINISTIC_FLAG}' in the environment instead")
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
    log.info("deterministic XLA GPU kernels (%s)", DETERMINISTIC_FLAG)
    return True


def init_distributed(d) -> bool:
    """``jax.distributed.initialize`` (before any other JAX call) when configured or detected.
    Returns whether it ran."""
    import jax

    if not wanted(d):
        return False
    kw = {}
    if d.coordinator_address:
        kw["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kw["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kw["process_id"] = d.process_id
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d, %d devices", jax.process_index(), jax.process_count(),
             len(jax.devices()))
    return True


def exchange_status(name: str, status: str, *, wait: bool = True, poll_s: float = 0.5) -> dict[int, str]:
    """Tell the other processes of a ``jax.distributed`` job how this one finished, and hear theirs.

    Each process stores ``status`` ("ok" or an error message) under ``<name>/<process index>`` in the
    coordination service's key-value store. ``wait``: poll until every process has reported, or until
    one reports anything but "ok" (then return at once, so a failed host stops the others instead of
    leaving them at a barrier until the coordination timeout). A process that dies without reporting
    (SIGKILL) is left to the coordination service's heartbeat check (not tested here). Returns
    ``{process index: status}`` of the reports seen (only this process's without ``jax.distributed``).
    """
    import time

    import jax
    from jax._src import distributed as _dist  # the coordination client (as Orbax uses it)

    me = jax.process_index()
    client = _dist.global_state.client
    if client is None or jax.process_count() == 1:
        return {me: status}
    client.key_value_set(f"{name}/{me}", status)
    while True:
        seen = {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(f"{name}/")}
        if not wait or len(seen) == jax.process_count() or any(v != "ok" for v in seen.values()):
            return seen
        time.sleep(poll_s)
