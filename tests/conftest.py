import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# XLA:CPU compile time dominates this suite of tiny models: LLVM -O0 roughly halves it and barely
# changes run time at these sizes. Code generation only: the HLO and its float semantics are the same.
jax.config.update("jax_disable_most_optimizations", True)
