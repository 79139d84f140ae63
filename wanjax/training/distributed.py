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
