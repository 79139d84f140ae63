"""bench.common.hlo_op_names: the JAX op path (with named scopes) of an optimized HLO instruction,
which is how a profile's kernel names (HLO instruction names) are traced back to the model code."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

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
