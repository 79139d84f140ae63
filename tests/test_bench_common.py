"""bench.common.hlo_op_names: the JAX op path (with named scopes) of an optimized HLO instruction,
which is how a profile's kernel names (HLO instruction names) are traced back to the model code."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import hlo_op_names


def test_hlo_op_names_finds_the_named_scope_of_an_instruction():
    def f(x):
        with jax.named_scope("my_scope"):
            y = jnp.sin(x) * 2.0 + 1.0
        return jnp.sum(y * y)

    text = jax.jit(f).lower(jnp.ones((64, 64))).compile().as_text()
    names = re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", text, flags=re.M)
    found = hlo_op_names(text, names + ["no_such_instruction"])
    assert "no_such_instruction" not in found
    scoped = [n for n, op in found.items() if "my_scope" in op]
    assert scoped, found  # the sin/mul/add ops (however XLA fused them) carry the scope


def test_hlo_op_names_matches_the_profile_spelling_of_numbered_instructions():
    """GPU profiles name the kernel of HLO instruction ``%fusion.559`` as ``fusion_559``."""
    text = "\n".join([
        "HloModule m",
        '  %fusion.559 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/cross_attn/add_any"}',
        '  %loop_convert_fusion.4 = bf16[4]{0} fusion(%q), kind=kLoop, metadata={op_name="jit(f)/ffn/convert"}',
        '  %fusion_7 = f32[4]{0} fusion(%r), kind=kLoop, metadata={op_name="jit(f)/plain"}',
    ])
    found = hlo_op_names(text, ["fusion_559", "loop_convert_fusion_4", "fusion_7", "fusion_8"])
    assert found == {"fusion_559": "jit(f)/cross_attn/add_any", "loop_convert_fusion_4": "jit(f)/ffn/convert",
                     "fusion_7": "jit(f)/plain"}


def test_determinism_check_tells_identical_from_different_runs():
    """bench.train --check_determinism: the same step twice from one (donated) state. A pure step is
    bit-identical; a step that reads a counter outside the state differs, in exactly the leaves and
    metrics it touches."""
    from bench.train import fingerprint, step_is_deterministic

    mesh = jax.sharding.Mesh(jax.devices(), ("x",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    state = {"w": jax.device_put(jnp.arange(16, dtype=jnp.float32) / 7, sh),
             "h": jnp.ones((3,), jnp.bfloat16), "step": jnp.zeros((), jnp.int32)}
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {k: v if k == "w" else jax.device_put(v, rep) for k, v in state.items()}
    host_copy = lambda s: (jax.device_get(s), jax.tree.map(lambda x: x.sharding, s))  # noqa: E731
    pure = jax.jit(lambda s: ({**s, "w": s["w"] * 1.5 + 1}, {"loss": jnp.sum(s["w"])}), donate_argnums=0)
    d = step_is_deterministic(pure, *host_copy(state))
    assert d == {"identical": True, "leaves": 3, "leaves_differing": 0, "metrics_differing": []}

    calls = []

    def noisy(s):  # the second call adds a tiny different number to w and to the loss
        calls.append(1)
        eps = jnp.float32(1e-7 * len(calls))
        return {**s, "w": s["w"] + eps}, {"loss": jnp.sum(s["w"]) + 1e4 * eps, "other": jnp.float32(2)}
    d = step_is_deterministic(noisy, *host_copy(state))
    assert d == {"identical": False, "leaves": 3, "leaves_differing": 1, "metrics_differing": ["loss"]}
    # the fingerprint sees a one-ulp change of one element
    w = jnp.arange(8, dtype=jnp.float32)
    assert fingerprint(w) != fingerprint(w.at[3].set(jnp.nextafter(w[3], 10.0)))
    assert fingerprint(w) == fingerprint(jnp.asarray(np.asarray(w)))


def test_pipelined_time_runs_n_donated_steps_and_returns_the_last_metrics():
    """bench.train --pipelined: n steps dispatched back to back on a donated state, one wait at the
    end. The state must have advanced exactly n times, the metrics must be the last step's, and the
    time per step is the total over n."""
    import time as _time

    import pytest

    from bench.common import pipelined_time

    step = jax.jit(lambda s: ({"w": s["w"] + 1, "n": s["n"] + 1}, {"loss": jnp.sum(s["w"])}), donate_argnums=0)
    state = {"w": jnp.zeros((64,), jnp.float32), "n": jnp.zeros((), jnp.int32)}
    state, _ = step(state)  # compile
    t = _time.perf_counter()
    state, per_step, m = pipelined_time(step, state, 4)
    total = _time.perf_counter() - t
    assert int(state["n"]) == 5 and float(state["w"][0]) == 5.0
    assert float(m["loss"]) == 64 * 4.0  # the 4th timed step saw w = 4
    assert 0 < per_step <= total / 4
    with pytest.raises(ValueError, match="n=0"):
        pipelined_time(step, state, 0)
