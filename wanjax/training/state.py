"""Training state: one pytree holding everything a run needs to resume bit-exactly.

Layout (all leaves are ``jax.Array``; pure dicts, so Orbax saves them as they are)::

    TrainState
      step       int32 []         iterations completed
      rng        uint32 [2]       raw key data of the run's base key (``jax.random.key_data``);
                                  the key of iteration s, phase p is fold_in(fold_in(key, s), p)
      data_pos   int32 []         global samples consumed (epoch = data_pos // len(dataset))
      models     {name: ModelState}
    ModelState
      params     nested pure dict of the model's ``nnx.Param`` arrays, in the master dtype
                 (float32 by default: master weights; the model computes in its cfg.dtype)
      opt_state  the optax state of ``params``
      ema        nested pure dict (float32) or None when the model keeps no EMA

The graph of each model (its ``nnx.GraphDef`` and non-parameter state) is static and lives next to
the state in a :class:`ModelDef`; ``ModelDef.merge(params)`` rebuilds the ``nnx.Module``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["EMAConfig", "ModelDef", "ModelState", "TrainState", "split_model", "init_model_state",
           "ema_update", "base_key", "step_key", "cast_tree"]


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of a model's parameters (Self-Forcing: decay 0.99 from step 200).

    Before ``start_step`` the EMA tracks the parameters exactly (it is (re)created from them); from
    ``start_step`` on, every optimizer update of the model applies
    ``ema <- decay * ema + (1 - decay) * params`` with the updated params (float32).
    """
    decay: float = 0.99
    start_step: int = 0


@flax.struct.dataclass
class ModelState:
    params: Any
    opt_state: Any
    ema: Any = None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    rng: jax.Array
    data_pos: jax.Array
    models: dict

    def params(self, name: str):
        return self.models[name].params

    def ema(self, name: str):
        return self.models[name].ema


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """Static part of an nnx model: ``graphdef`` + the non-``nnx.Param`` state (``rest``, usually
    empty). ``merge(params)`` builds the module from a pure dict of parameter arrays."""
    graphdef: Any
    rest: Any

    def merge(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)


def split_model(model: nnx.Module, master_dtype=jnp.float32) -> tuple[ModelDef, dict]:
    """``model`` -> (ModelDef, pure dict of its parameters cast to ``master_dtype``)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = cast_tree(nnx.to_pure_dict(params), master_dtype)
    return ModelDef(graphdef, rest), pure


def cast_tree(tree, dtype):
    """Cast every floating leaf of ``tree`` to ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def init_model_state(params, tx: optax.GradientTransformation, ema: EMAConfig | None) -> ModelState:
    """Fresh optimizer state (and an EMA equal to the float32 params) for ``params``."""
    return ModelState(params=params, opt_state=tx.init(params),
                      ema=None if ema is None else cast_tree(params, jnp.float32))


def ema_update(ema, params, step: jax.Array, cfg: EMAConfig):
    """EMA after an optimizer update made at iteration ``step`` (traced int32): a copy of
    ``params`` while ``step < start_step``, else ``decay * ema + (1 - decay) * params``."""
    started = step >= cfg.start_step
    d = jnp.float32(cfg.decay)

    def one(e, p):
        p = p.astype(jnp.float32)
        return jnp.where(started, d * e + (1 - d) * p, p)

    return jax.tree.map(one, ema, params)


def base_key(seed: int) -> jax.Array:
    """Raw uint32 key data for ``TrainState.rng`` from an integer seed."""
    return jax.random.key_data(jax.random.key(int(seed)))


def step_key(rng_data: jax.Array, step, phase: int) -> jax.Array:
    """The typed key of iteration ``step`` and phase index ``phase``. Every replica computes the same
    key (the state's rng is replicated), so draws from it (e.g. the DMD exit step) agree everywhere."""
    k = jax.random.wrap_key_data(rng_data)
    return jax.random.fold_in(jax.random.fold_in(k, step), phase)


def tree_bytes(tree) -> int:
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def make_state(models: Mapping[str, ModelState], *, seed: int, step: int = 0, data_pos: int = 0) -> TrainState:
    return TrainState(step=jnp.int32(step), rng=base_key(seed), data_pos=jnp.int32(data_pos), models=dict(models))
