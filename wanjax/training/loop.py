"""Generic sharded training loop over Flax NNX models.

A run trains one or more models (``Trainer(models={...})``) through *phases*. A :class:`Phase` names
the model that gets the gradient, its loss and how often it runs::

    loss_fn(model, batch, key, **others) -> (loss [], aux {name: scalar})

``model`` is the nnx module rebuilt from the current parameters, ``batch`` one micro-batch (a dict
of arrays with a leading batch axis), ``key`` a typed PRNG key (identical on every replica),
``others`` the models listed in ``Phase.uses``: other trainable models (current parameters, under
``stop_gradient``) or frozen ones (``Trainer(frozen={...})``, e.g. a teacher). One phase = one jitted
update: gradient accumulation (a ``lax.scan`` over ``accum_steps`` micro-batches), global-norm
clipping and the optimizer (optax), then the EMA. An *iteration* runs every phase whose
``every``/``offset`` matches the step (Self-Forcing DMD: the generator every 5th iteration, the
critic every iteration), each on its own fresh batch, then increments ``TrainState.step``.

Sharding: a ``(data, fsdp, tensor)`` mesh (``wanjax.sharding``). Parameters, optimizer moments and
EMA carry the ``NamedSharding`` of each parameter's logical axes (FSDP over ``embed``, tensor
parallel over ``heads``/``mlp``); batches are split over ``data x fsdp`` on their batch axis; the
step counter and RNG are replicated. Every jitted update has explicit ``in_shardings`` and
``out_shardings`` and donates the state.

Numerics: the state keeps ``master_dtype`` (float32) parameters; each model computes in its own
config dtype (bf16 on accelerators: ``wanjax.nn.Linear`` casts the weights to the activation
dtype). Remat per transformer block is the model's ``remat`` config flag.

Data: any ``dataset`` with ``len()`` and ``dataset[i] -> dict[str, np.ndarray]`` (e.g.
``wanjax.data.targets.TargetReader``). :class:`BatchIterator` walks seeded per-epoch permutations
from a global sample position (``TrainState.data_pos``), so a resumed run reads exactly the samples
the uninterrupted run would have; each process loads only its slice of every global batch.

Observability: :func:`train` appends one JSON line per ``log_every`` iterations to
``<workdir>/metrics.jsonl`` (loss terms, grad norms, step time, tokens/s, MFU), shows a tqdm bar on
stderr and calls the validation hook every ``val_every`` iterations.

MFU = model FLOPs per iteration / (step time x devices x peak FLOP/s per device). Model FLOPs
count matmuls and convolutions (2 per multiply-add) of the forward pass times 3 for
forward + backward, excluding rematerialisation; see :func:`dit_forward_flops`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wanjax import sharding as shd
from wanjax.training import state as st

log = logging.getLogger("wanjax.training")

__all__ = ["Phase", "Trainer", "BatchIterator", "LoopConfig", "DataError", "train", "make_optimizer",
           "dit_forward_flops", "pose_encoder_flops", "peak_flops_per_device", "MetricsWriter"]


class DataError(ValueError):
    """A training sample could not be read (names the sample and the file)."""


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------
def param_path(path) -> str:
    """A pytree key path (of an ``nnx.State``) as the '/'-joined names, e.g. ``pose/dwpose_embedding/0/kernel``."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return "/".join(names)


def make_optimizer(lr: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01, max_grad_norm: float | None = 10.0,
                   warmup_steps: int = 0, mu_dtype=None,
                   frozen: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (None: off) then AdamW with an optional linear warm-up, constant after.
    ``mu_dtype`` (e.g. bfloat16) stores Adam's first moment in that dtype (None: the parameters'):
    with Self-Forcing's b1 = 0 the first moment is just the current gradient, so bf16 costs nothing
    but saves 2 bytes per parameter. ``frozen(path)`` (path as in :func:`param_path`) marks
    parameters that never change: their update is zero, weight decay included (their Adam moments
    are still kept, and stay zero where, as for a frozen pose trunk, their gradient is zero)."""
    sched = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None))
    if frozen is not None:
        parts.append(zero_updates_where(frozen))
    return optax.chain(*parts)


def zero_updates_where(frozen: Callable[[str], bool]) -> optax.GradientTransformation:
    """Zero the updates of the parameters whose path satisfies ``frozen`` (stateless; placed last, so
    nothing -- not even weight decay -- moves them). The state keeps the parameters' structure, so
    it shards like any other optimizer state."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: jnp.zeros_like(u) if frozen(param_path(p)) else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------------------------------
# Phases and the trainer
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Phase:
    """One optimizer update of ``model`` with ``loss_fn`` (see the module docstring).

    ``every``/``offset``: the phase runs at iterations s with ``s % every == offset``.
    ``flops_per_sample`` / ``tokens_per_sample``: model FLOPs (forward + backward) and DiT tokens of
    one sample, for MFU and tokens/s (None: not reported).
    """
    name: str
    model: str
    loss_fn: Callable
    every: int = 1
    offset: int = 0
    uses: tuple[str, ...] = ()
    flops_per_sample: float | None = None
    tokens_per_sample: int | None = None

    def active(self, step: int) -> bool:
        return step % self.every == self.offset


HOST = "pinned_host"  # the memory kind of offloaded optimizer state / EMA


def _with_kind(shardings, kind: str):
    """``shardings`` (a pytree of NamedSharding, None leaves kept) in memory ``kind``."""
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, shape: Sequence[int], accum: bool) -> NamedSharding:
    """Leading batch axis (after the micro-batch axis when ``accum``) over ``data x fsdp``."""
    names = ((None, "batch") if accum else ("batch",)) + (None,) * (len(shape) - (2 if accum else 1))
    return shd.named_sharding(mesh, *names, shape=tuple(shape))


class Trainer:
    """Holds the static parts of a run and its jitted updates.

    Args:
      models: trainable nnx models by name (may be abstract, from ``nnx.eval_shape``, when the state
        is restored instead of initialised).
      optimizers: optax transformation per trainable model.
      phases: the updates of one iteration, in order.
      mesh: ``(data, fsdp, tensor)`` mesh.
      frozen: non-trained models by name (teacher); placed once, sharded like parameters.
      ema: :class:`~wanjax.training.state.EMAConfig` per model that keeps an EMA.
      master_dtype: dtype of the parameters in the state (float32: master weights).
      accum_steps: micro-batches per update (gradient accumulation).
      seed: base of the run's RNG.
      offload: keep every model's optimizer state and EMA in pinned host memory (JAX memory kind
        ``pinned_host``, sharded as on the device). A phase moves only its own model's optimizer
        state and EMA to the device for the update, once the gradients exist, and back afterwards;
        the other models' pass through on the host. Device memory then holds the parameters (and the
        step's temporaries) only, at the price of those transfers. Same numbers as without.
    """

    def __init__(self, models: Mapping[str, nnx.Module], optimizers: Mapping[str, optax.GradientTransformation],
                 phases: Sequence[Phase], mesh: Mesh, *, frozen: Mapping[str, nnx.Module] | None = None,
                 ema: Mapping[str, st.EMAConfig] | None = None, master_dtype=jnp.float32,
                 accum_steps: int = 1, seed: int = 0, offload: bool = False):
        self.mesh = mesh
        self.offload = bool(offload)
        if self.offload:
            kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
            if HOST not in kinds:
                raise ValueError(f"offload=True needs the {HOST!r} memory kind, which "
                                 f"{mesh.devices.flat[0].platform} devices here lack (they have {sorted(kinds)}); "
                                 f"set --config.offload_state=false")
        self.phases = list(phases)
        self.optimizers = dict(optimizers)
        self.ema_cfg = dict(ema or {})
        self.accum_steps = int(accum_steps)
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        self.seed = int(seed)
        self.master_dtype = master_dtype
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        self.defs: dict[str, st.ModelDef] = {}
        self._init_params: dict[str, Any] = {}
        self.param_shardings: dict[str, Any] = {}
        for name, model in models.items():
            if name not in self.optimizers:
                raise ValueError(f"trainable model {name!r} has no optimizer")
            self.defs[name], self._init_params[name] = st.split_model(model, master_dtype)
            self.param_shardings[name] = nnx.to_pure_dict(
                shd.state_shardings(nnx.state(model, nnx.Param), mesh))
        self.frozen_defs: dict[str, st.ModelDef] = {}
        self.frozen_params: dict[str, Any] = {}
        for name, model in (frozen or {}).items():
            d, p = st.split_model(model, None)
            shard = nnx.to_pure_dict(shd.state_shardings(nnx.state(model, nnx.Param), mesh))
            self.frozen_defs[name] = d
            self.frozen_params[name] = jax.tree.map(jax.device_put, p, shard)
        for ph in self.phases:
            if ph.model not in self.defs:
                raise ValueError(f"phase {ph.name!r} trains unknown model {ph.model!r}")
            for u in ph.uses:
                if u not in self.defs and u not in self.frozen_defs:
                    raise ValueError(f"phase {ph.name!r} uses unknown model {u!r}")
        self.state_shardings = self._state_shardings()
        self._compiled: dict = {}
        self._advance = jax.jit(lambda s: s.replace(step=s.step + 1), in_shardings=(self.state_shardings,),
                                out_shardings=self.state_shardings, donate_argnums=(0,))

    # -- state --------------------------------------------------------------------------------------
    def _init_fn(self, params: Mapping[str, Any]) -> st.TrainState:
        models = {n: st.init_model_state(p, self.optimizers[n], self.ema_cfg.get(n)) for n, p in params.items()}
        return st.TrainState(step=jnp.int32(0), rng=st.base_key(self.seed), data_pos=jnp.int32(0), models=models)

    def _state_shardings(self) -> st.TrainState:
        abstract = jax.eval_shape(self._init_fn, self._init_params)
        repl = _replicated(self.mesh)
        models = {}
        for n, ms in abstract.models.items():
            ps = self.param_shardings[n]
            opt = optax.tree_map_params(self.optimizers[n], lambda _, s: s, ms.opt_state, ps,
                                        transform_non_params=lambda _: repl)
            ema = None if ms.ema is None else ps
            if self.offload:
                opt, ema = _with_kind((opt, ema), HOST)
            models[n] = st.ModelState(params=ps, opt_state=opt, ema=ema)
        return st.TrainState(step=repl, rng=repl, data_pos=repl, models=models)

    def abstract_state(self) -> st.TrainState:
        """Shapes, dtypes and target shardings of the state (for a sharded restore)."""
        abstract = jax.eval_shape(self._init_fn, self._init_params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_shardings)

    def init_state(self, *, keep_initial: bool = True) -> st.TrainState:
        """A fresh, sharded state from the models given at construction (must be concrete).
        ``keep_initial=False`` drops the trainer's reference to the initial parameters afterwards (their
        device memory is freed once the caller's models are gone; init_state cannot run again)."""
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self._init_params)):
            raise ValueError("the models are abstract (nnx.eval_shape) or their initial parameters were "
                             "released; restore a checkpoint instead of init_state, or build concrete models")
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        state = init(self._init_params)
        if not keep_initial:
            self._init_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self._init_params)
        return state

    def model(self, state: st.TrainState, name: str, *, ema: bool = False) -> nnx.Module:
        """The nnx model ``name`` with the state's (EMA) parameters."""
        ms = state.models[name]
        params = ms.ema if ema else ms.params
        if params is None:
            raise ValueError(f"model {name!r} keeps no EMA")
        return self.defs[name].merge(params)

    # -- updates ------------------------------------------------------------------------------------
    def _update_impl(self, phase_idx: int, state: st.TrainState, batch, frozen):
        phase = self.phases[phase_idx]
        name = phase.model
        mdef = self.defs[name]
        ms = state.models[name]
        tx = self.optimizers[name]
        key = st.step_key(state.rng, state.step, phase_idx)
        host = self.state_shardings.models[name]
        others = {}
        for u in phase.uses:
            if u in self.defs:
                others[u] = self.defs[u].merge(jax.lax.stop_gradient(state.models[u].params))
            else:
                others[u] = self.frozen_defs[u].merge(frozen[u])

        def loss_of(params, mb, k):
            loss, aux = phase.loss_fn(mdef.merge(params), mb, k, **others)
            return loss.astype(jnp.float32), {a: jnp.asarray(v, jnp.float32) for a, v in aux.items()}

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if self.accum_steps == 1:
            (loss, aux), grads = grad_fn(ms.params, batch, key)
        else:
            n = self.accum_steps
            first = jax.tree.map(lambda a: a[0], batch)
            (l_s, a_s), g_s = jax.eval_shape(grad_fn, ms.params, first, key)
            zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)

            def micro(carry, xs):
                mb, i = xs
                (l, a), g = grad_fn(ms.params, mb, jax.random.fold_in(key, i))
                gc, lc, ac = carry
                return (jax.tree.map(jnp.add, gc, g), lc + l, jax.tree.map(jnp.add, ac, a)), None

            (grads, loss, aux), _ = jax.lax.scan(micro, (zeros(g_s), zeros(l_s), zeros(a_s)),
                                                 (batch, jnp.arange(n, dtype=jnp.int32)))
            grads = jax.tree.map(lambda g: g / n, grads)
            loss = loss / n
            aux = jax.tree.map(lambda a: a / n, aux)
        if self.offload:  # this model's optimizer state and EMA onto the device for the update, only
            # once the gradients exist: the barrier keeps XLA from prefetching them into the
            # forward/backward pass, where they would sit next to its activations at the peak
            grads, opt_in, ema_in = jax.lax.optimization_barrier((grads, ms.opt_state, ms.ema))
            ms = ms.replace(opt_state=jax.device_put(opt_in, _with_kind(host.opt_state, "device")),
                            ema=None if ema_in is None else jax.device_put(ema_in, _with_kind(host.ema, "device")))
        gnorm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, ms.opt_state, ms.params)
        params = optax.apply_updates(ms.params, updates)
        params = jax.tree.map(lambda p, q: p.astype(q.dtype), params, ms.params)
        ema = ms.ema
        if ema is not None:
            ema = st.ema_update(ema, params, state.step, self.ema_cfg[name])
        samples = jax.tree.leaves(batch)[0].shape[0] * (jax.tree.leaves(batch)[0].shape[1]
                                                        if self.accum_steps > 1 else 1)
        if self.offload:  # ... and back to the host
            opt_state = jax.device_put(opt_state, host.opt_state)
            ema = None if ema is None else jax.device_put(ema, host.ema)
        models = dict(state.models)
        models[name] = st.ModelState(params=params, opt_state=opt_state, ema=ema)
        new = state.replace(models=models, data_pos=state.data_pos + samples)
        metrics = {f"{phase.name}/loss": loss, f"{phase.name}/grad_norm": gnorm,
                   **{f"{phase.name}/{k}": v for k, v in aux.items()}}
        return new, metrics

    def _update_fn(self, phase_idx: int, batch):
        shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), batch)
        key = (phase_idx, json.dumps(jax.tree.map(str, shapes), sort_keys=True))
        if key not in self._compiled:
            bsh = jax.tree.map(lambda a: batch_sharding(self.mesh, self.global_shape(a.shape), self.accum_steps > 1),
                               batch)
            fsh = {n: jax.tree.map(lambda a: a.sharding, p) for n, p in self.frozen_params.items()}
            fn = shd.MeshJit(jax.jit(lambda s, b, f: self._update_impl(phase_idx, s, b, f),
                                 in_shardings=(self.state_shardings, bsh, fsh),
                                 out_shardings=(self.state_shardings, _replicated(self.mesh)),
                                 donate_argnums=(0,)), self.mesh)
            self._compiled[key] = (fn, bsh)
        return self._compiled[key]

    def global_shape(self, local_shape: Sequence[int]) -> tuple[int, ...]:
        """The global shape of a batch array of which this process holds ``local_shape`` (its rows)."""
        g = list(local_shape)
        g[1 if self.accum_steps > 1 else 0] *= jax.process_count()
        return tuple(g)

    def put_batch(self, batch: Mapping[str, np.ndarray], shardings) -> dict:
        """Host batch (this process's rows of every global batch) -> global sharded arrays."""
        def one(a, s):
            a = np.asarray(a)
            if jax.process_count() == 1:
                return jax.device_put(a, s)
            return jax.make_array_from_process_local_data(s, a, self.global_shape(a.shape))
        return jax.tree.map(one, dict(batch), shardings)

    def micro_split(self, batch: Mapping[str, np.ndarray]) -> dict:
        """[G, ...] -> [accum, G / accum, ...] (identity without accumulation)."""
        n = self.accum_steps
        if n == 1:
            return dict(batch)
        out = {}
        for k, a in batch.items():
            if a.shape[0] % n:
                raise ValueError(f"batch of {a.shape[0]} samples is not divisible into accum_steps={n} "
                                 f"micro-batches (--config.batch_size must be a multiple of accum_steps)")
            out[k] = a.reshape((n, a.shape[0] // n) + a.shape[1:])
        return out

    def step(self, state: st.TrainState, batches: Mapping[str, Mapping[str, np.ndarray]], step: int):
        """One iteration: every active phase on its batch, then ``step += 1``. Returns (state, metrics)
        with metrics as device scalars (fetch them only when logging)."""
        metrics = {}
        for i, ph in enumerate(self.phases):
            if not ph.active(step):
                continue
            b = self.micro_split(batches[ph.name])
            fn, bsh = self._update_fn(i, b)
            state, m = fn(state, self.put_batch(b, bsh), self.frozen_params)
            metrics.update(m)
        return self._advance(state), metrics

    def update(self, state: st.TrainState, phase: str, batch: Mapping[str, np.ndarray]):
        """Run one phase by name on ``batch`` (no step increment): (state, metrics). For benchmarks."""
        i = [p.name for p in self.phases].index(phase)
        b = self.micro_split(batch)
        fn, bsh = self._update_fn(i, b)
        return fn(state, self.put_batch(b, bsh), self.frozen_params)

    def active_phases(self, step: int) -> list[Phase]:
        return [p for p in self.phases if p.active(step)]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class BatchIterator:
    """Deterministic, resumable global batches from a map-style dataset.

    Sample position p (global, counted from the start of training) reads
    ``perm_e[p % N]`` with ``e = p // N`` and ``perm_e = default_rng([seed, e]).permutation(N)``.
    A global batch of G samples at position p covers positions p .. p+G-1 (across an epoch boundary
    if needed); process i of P reads rows [i G/P, (i+1) G/P) of it. ``on_error="skip"`` replaces an
    unreadable sample by the next readable one of the same permutation (logged), ``"stop"`` raises
    :class:`DataError`. ``prefetch`` batches are read ahead in a background thread.
    """

    def __init__(self, dataset, global_batch: int, *, seed: int = 0, start: int = 0,
                 collate: Callable[[list[dict]], dict] | None = None, on_error: str = "stop",
                 prefetch: int = 2, process_index: int | None = None, process_count: int | None = None):
        self.dataset = dataset
        self.n = len(dataset)
        if self.n == 0:
            raise DataError("the training dataset is empty")
        if on_error not in ("stop", "skip"):
            raise ValueError(f"data.on_error={on_error!r}: choose 'stop' or 'skip'")
        self.pc = jax.process_count() if process_count is None else process_count
        self.pi = jax.process_index() if process_index is None else process_index
        if global_batch % self.pc:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.pc} processes")
        self.global_batch = global_batch
        self.local = global_batch // self.pc
        self.seed = int(seed)
        self.position = int(start)
        self.collate = collate or stack_samples
        self.on_error = on_error
        self.skipped: list[str] = []
        self._perm_cache: dict[int, np.ndarray] = {}
        self._prefetch = prefetch
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm_cache[epoch]

    def index_at(self, pos: int) -> int:
        return int(self._perm(pos // self.n)[pos % self.n])

    def _read(self, pos: int) -> dict:
        epoch, j = divmod(pos, self.n)
        perm = self._perm(epoch)
        for attempt in range(self.n):
            idx = int(perm[(j + attempt) % self.n])
            try:
                return self.dataset[idx]
            except Exception as e:  # noqa: BLE001 - any reader error becomes a DataError / skip
                name = _sample_name(self.dataset, idx)
                if self.on_error == "stop":
                    raise DataError(f"training sample {name} (index {idx}) is unreadable: {e}; fix or remove "
                                    f"it, or set --config.data.on_error=skip") from e
                log.warning("skipping unreadable training sample %s: %s", name, e)
                self.skipped.append(name)
        raise DataError("no readable training sample in the dataset")

    def _batch_at(self, pos: int) -> dict:
        start = pos + self.pi * self.local
        return self.collate([self._read(p) for p in range(start, start + self.local)])

    def _worker(self, pos: int):
        try:
            while not self._stop.is_set():
                item = (pos, self._batch_at(pos))
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                pos += self.global_batch
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._q.put((pos, e))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._prefetch <= 0:
            b = self._batch_at(self.position)
            self.position += self.global_batch
            return b
        if self._thread is None:
            self._q = queue.Queue(maxsize=self._prefetch)
            self._thread = threading.Thread(target=self._worker, args=(self.position,), daemon=True)
            self._thread.start()
        pos, item = self._q.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        assert pos == self.position
        self.position += self.global_batch
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None


def _sample_name(dataset, idx: int) -> str:
    ids = getattr(dataset, "ids", None)
    try:
        return repr(ids[idx]) if ids is not None else f"#{idx}"
    except Exception:  # noqa: BLE001
        return f"#{idx}"


def stack_samples(samples: list[dict]) -> dict:
    """[{k: array}] -> {k: stacked array} (keys of the first sample)."""
    return {k: np.stack([np.asarray(s[k]) for s in samples]) for k in samples[0]}


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------------
def dit_forward_flops(cfg, frames: int, tokens_per_frame: int, *, frames_per_block: int | None = None,
                      text_tokens: int | None = None, image_tokens: int = 0, kv_frames: int | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one Wan DiT forward for one sample.

    With L = frames * tokens_per_frame query tokens, D = dim, Dff = ffn_dim, Lc = text (+ image)
    tokens, K = sum over queries of visible keys, per layer::

        8 L D^2             self-attention q, k, v, o
        4 D K               QK^T and PV   (K = L^2 bidirectional; block-causal with blocks of
                                           b frames: T_b^2 nb (nb+1) / 2, T_b = b * tokens_per_frame;
                                           a cached block against kv_frames frames: L * kv_frames * T)
        4 L D^2 + 4 Lc D^2  cross-attention q, o and k, v of the context
        4 L Lc D            cross-attention scores and values
        4 L D Dff           FFN

    plus the patch embedding (2 L D in_dim*4) and the head (2 L D out_dim*4). Time/text embeddings
    are negligible and omitted.
    """
    D, Dff, nl = cfg.dim, cfg.ffn_dim, cfg.num_layers
    L = frames * tokens_per_frame
    Lc = (cfg.text_len if text_tokens is None else text_tokens) + image_tokens
    if kv_frames is not None:
        K = L * kv_frames * tokens_per_frame
    elif frames_per_block:
        nb = frames // frames_per_block
        tb = frames_per_block * tokens_per_frame
        K = tb * tb * nb * (nb + 1) // 2
    else:
        K = L * L
    per_layer = 8 * L * D * D + 4 * D * K + 4 * L * D * D + 4 * Lc * D * D + 4 * L * Lc * D + 4 * L * D * Dff
    pp = math.prod(cfg.patch)
    return float(nl * per_layer + 2 * L * D * cfg.in_dim * pp + 2 * L * D * cfg.out_dim * pp)


def pose_encoder_flops(pcfg, pixel_frames: int, height: int, width: int, *, trunk_only: bool = False,
                       cached_trunk: bool = False) -> float:
    """Forward conv FLOPs of the pose stacks (3D on ``pixel_frames + 3`` padded frames, 2D on the
    reference pose), 2 per multiply-add, plus the optional projection. ``trunk_only``: just the 3D
    stack's trunk (every conv before its head); ``cached_trunk``: everything but the trunk (its
    features come precomputed, ``DMDBatch.pose_trunk``)."""
    from wanjax.models.pose import POSE3D_LAYERS, REF2D_STRIDES

    T, H, W = pixel_frames + 3, height, width
    cin, total = pcfg.in_channels, 0.0
    for i, (k, s, p) in enumerate(POSE3D_LAYERS):
        if trunk_only and i == len(POSE3D_LAYERS) - 1:
            return total
        cout = pcfg.out_dim if i == len(POSE3D_LAYERS) - 1 else pcfg.hidden
        T = (T + 2 * p[0] - k[0]) // s[0] + 1
        H = (H + 2 * p[1] - k[1]) // s[1] + 1
        W = (W + 2 * p[2] - k[2]) // s[2] + 1
        if not (cached_trunk and i < len(POSE3D_LAYERS) - 1):
            total += 2.0 * math.prod(k) * cin * cout * T * H * W
        cin = cout
    if pcfg.proj_dim:
        total += 2.0 * T * H * W * pcfg.out_dim * pcfg.proj_dim
    h, w, cin = height, width, pcfg.in_channels
    for i, s in enumerate(REF2D_STRIDES):
        cout = pcfg.ref_dim if i == len(REF2D_STRIDES) - 1 else pcfg.hidden
        h, w = (h + 2 - 3) // s + 1, (w + 2 - 3) // s + 1
        total += 2.0 * 9 * cin * cout * h * w
        cin = cout
    return total


def pose_train_flops(pcfg, pixel_frames: int, height: int, width: int, *, cached_trunk: bool = False) -> float:
    """Forward + backward FLOPs of the pose stacks under a gradient: 3x the forward, except that a
    frozen trunk (``PoseConfig.train_trunk=False``) runs forward only, and not at all when its
    features come precomputed (``cached_trunk``: ``DMDBatch.pose_trunk``)."""
    total = pose_encoder_flops(pcfg, pixel_frames, height, width)
    if getattr(pcfg, "train_trunk", True):
        if cached_trunk:
            raise ValueError("pose_train_flops: cached trunk features need a frozen trunk (train_trunk=False)")
        return 3 * total
    trunk = pose_encoder_flops(pcfg, pixel_frames, height, width, trunk_only=True)
    return 3 * (total - trunk) + (0.0 if cached_trunk else trunk)


_PEAK_BF16 = {  # dense bf16 FLOP/s per device
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
    "TPU v4": 275e12, "TPU v6": 918e12,
}


def peak_flops_per_device(override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of device 0 (``override`` wins; None on CPU / unknown devices)."""
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for k, v in _PEAK_BF16.items():
        if k.lower() in kind.lower():
            return v
    return None


# ----------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 10
    ckpt_every: int = 0          # 0: only at the end / on SIGTERM
    val_every: int = 0           # 0: never
    progress: bool = True
    peak_flops: float | None = None
    handle_sigterm: bool = True


class MetricsWriter:
    """Appends JSON lines to ``path`` (flushed per line; process 0 only)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is not None and jax.process_index() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")

    def write(self, record: Mapping[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, sort_keys=True) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclasses.dataclass
class TrainResult:
    state: Any
    status: str                      # "done" | "preempted"
    steps_run: int
    last_metrics: dict
    history: list
    trainer: Any = None


def _to_float(v) -> float:
    return float(np.asarray(jax.device_get(v)))


def replicate(tree, mesh: Mesh):
    """Host arrays (the same on every process) -> global arrays replicated over ``mesh``."""
    sh = _replicated(mesh)

    def one(a):
        a = np.asarray(a)
        if jax.process_count() == 1:
            return jax.device_put(a, sh)
        return jax.make_array_from_process_local_data(sh, a, a.shape)
    return jax.tree.map(one, tree)


def train(trainer: Trainer, make_batches: Callable[[int, int], Iterator[Mapping[str, dict]]], cfg: LoopConfig, *,
          state: st.TrainState | None = None, checkpointer=None, meta: Mapping[str, Any] | None = None,
          metrics_path: str | os.PathLike | None = None, validate: Callable | None = None,
          on_step: Callable[[int, dict], None] | None = None, guard=None) -> TrainResult:
    """Run iterations ``state.step .. cfg.total_steps - 1``.

    Args:
      trainer: the :class:`Trainer`.
      make_batches: ``make_batches(data_pos, step) -> iterator`` yielding, per iteration from
        ``step`` on, ``{phase name: host batch}`` for the phases active at that iteration (see
        :func:`phase_batches`).
      state: the state to continue from (a fresh or restored one). None: restore the newest
        checkpoint of ``checkpointer`` if there is one, else ``trainer.init_state()``.
      checkpointer: :class:`~wanjax.training.ckpt.Checkpointer` (None: no checkpoints).
      meta: JSON-able run description saved with every checkpoint.
      validate: ``validate(trainer, state, step)`` every ``val_every`` iterations; returns a dict of
        metrics (logged) or None.
      on_step: ``on_step(step_done, metrics)`` after each iteration (host side; tests use it to send
        SIGTERM).
      guard: a :class:`~wanjax.training.ckpt.PreemptionGuard` (default: a new one when
        ``cfg.handle_sigterm``).
    Returns :class:`TrainResult`; status "preempted" when a SIGTERM stopped the run (a checkpoint of
    the last completed iteration was written first).
    """
    from tqdm import tqdm

    from wanjax.training.ckpt import PreemptionGuard

    meta = dict(meta or {})
    if state is None:
        if checkpointer is not None and checkpointer.latest_step() is not None:
            state, _ = checkpointer.restore(trainer.abstract_state())
            log.info("resumed from %s at step %d", checkpointer.directory, int(state.step))
        else:
            state = trainer.init_state()
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(metrics_path)
    own_guard = guard is None and cfg.handle_sigterm
    guard = guard or (PreemptionGuard() if cfg.handle_sigterm else None)
    if own_guard:
        guard.install()
    batches = make_batches(int(jax.device_get(state.data_pos)), start)
    n_dev = len(jax.devices())
    peak = peak_flops_per_device(cfg.peak_flops)
    pbar = tqdm(total=cfg.total_steps, initial=start, file=sys.stderr, disable=not cfg.progress,
                dynamic_ncols=True, desc="train")
    history: list = []
    last: dict = {}
    status = "done"
    saved_at = None
    t_last, steps_since = time.perf_counter(), 0
    flops_acc = tokens_acc = 0.0
    history_first: dict = {}
    step = start

    def save(step_done: int, wait: bool = False):
        nonlocal saved_at
        if checkpointer is not None and saved_at != step_done:
            checkpointer.save(step_done, state, {**meta, "step": step_done,
                                                 "data_pos": int(jax.device_get(state.data_pos)),
                                                 "time": time.time()}, wait=wait)
            saved_at = step_done

    try:
        while step < cfg.total_steps:
            host = next(batches)
            state, metrics = trainer.step(state, host, step)
            for ph in trainer.active_phases(step):
                gb = next(iter(host[ph.name].values())).shape[0] * jax.process_count()
                if ph.flops_per_sample:
                    flops_acc += ph.flops_per_sample * gb
                if ph.tokens_per_sample:
                    tokens_acc += ph.tokens_per_sample * gb
            step += 1
            steps_since += 1
            pbar.update(1)
            if step == start + 1:
                # the first iteration compiles: time it apart, so step time / MFU measure steady state
                jax.block_until_ready(metrics)
                first_s = time.perf_counter() - t_last
                log.info("first iteration (compilation included): %.1f s", first_s)
                history_first = {"first_step_s": first_s}
                if step < cfg.total_steps and step % cfg.log_every:
                    t_last, steps_since, flops_acc, tokens_acc = time.perf_counter(), 0, 0.0, 0.0
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                vals = {k: _to_float(v) for k, v in metrics.items()}
                dt = (time.perf_counter() - t_last) / steps_since
                rec = {"step": step, **vals, "step_time_s": dt, **history_first}
                history_first = {}
                if tokens_acc:
                    rec["tokens_per_s"] = tokens_acc / steps_since / dt
                if flops_acc:
                    rec["model_flops_per_step"] = flops_acc / steps_since
                    if peak:
                        rec["mfu"] = flops_acc / steps_since / dt / (peak * n_dev)
                writer.write(rec)
                history.append(rec)
                last = rec
                pbar.set_postfix({k.split("/")[0] + "/loss": f"{v:.4g}" for k, v in vals.items()
                                  if k.endswith("/loss")})
                t_last, steps_since, flops_acc, tokens_acc = time.perf_counter(), 0, 0.0, 0.0
            if on_step is not None:
                on_step(step, metrics)
            if validate is not None and cfg.val_every and step % cfg.val_every == 0:
                vrec = validate(trainer, state, step)
                if vrec:
                    writer.write({"step": step, **{f"val/{k}": v for k, v in vrec.items()}})
            if guard is not None and guard.should_stop():
                save(step, wait=True)
                status = "preempted"
                log.warning("stopped at step %d on request; checkpoint saved", step)
                break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save(step)
        if status == "done":
            save(step, wait=True)
    finally:
        pbar.close()
        writer.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        if own_guard:
            guard.uninstall()
        if checkpointer is not None:
            checkpointer.wait()
    return TrainResult(state=state, status=status, steps_run=step - start, last_metrics=last, history=history,
                       trainer=trainer)


def phase_batches(trainer: Trainer, iterator_factory: Callable[[int], Iterator[dict]]
                  ) -> Callable[[int, int], Iterator[Mapping[str, dict]]]:
    """Adapter: one data stream (``iterator_factory(data_pos)``, e.g. a :class:`BatchIterator`), one
    batch per active phase, in phase order, per iteration."""
    def make(data_pos: int, start_step: int):
        it = iterator_factory(data_pos)

        def gen():
            step = start_step
            try:
                while True:
                    yield {ph.name: next(it) for ph in trainer.active_phases(step)}
                    step += 1
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

        return gen()
    return make
