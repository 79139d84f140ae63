import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# XLA:CPU compile time dominates this suite of tiny models: LLVM -O0 roughly halves it and barely
# changes run time at these sizes. Code generation only: the HLO and its float semantics are the same.
jax.config.update("jax_disable_most_optimizations", True)

# `make test` runs the suite on two pytest-xdist workers, one test file per worker at a time
# (`--dist loadfile`, so module fixtures are built once). Files are handed out in collection order;
# starting with the slowest keeps one worker from being left with a long file at the end.
# (Measured on a 2-core machine, seconds per file; the order only affects wall time.)
_SLOW_FIRST = ("test_training_sharding.py", "test_world.py", "test_generate_cli.py", "test_causal.py",
               "test_pipeline.py", "test_multihost_teacher.py", "test_pose_modules.py", "test_distill_ode.py",
               "test_multihost.py", "test_training_ckpt.py", "test_dmd.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: test order within a file is kept
