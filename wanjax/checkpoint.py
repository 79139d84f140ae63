"""Converted-checkpoint I/O: ``<dir>/config.json`` + Orbax ``<dir>/params``.

Loading is lazy and sharded: the model is first built abstractly with ``nnx.eval_shape`` (no
parameter memory), every abstract leaf gets its target ``NamedSharding`` from
``wanjax.sharding``, and Orbax restores each array straight into its shards.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from wanjax import sharding as shd


class CheckpointError(ValueError):
    pass


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    p = Path(ckpt_dir) / "config.json"
    if not p.exists():
        raise CheckpointError(f"{ckpt_dir}: not a wanjax checkpoint (no config.json); convert the "
                              f"PyTorch weights first with python -m converters.<model>")
    return json.loads(p.read_text())


def write_params(out_dir: str | os.PathLike, params: Mapping, config: dict, *, overwrite: bool = False) -> Path:
    """Atomically write ``config.json`` + Orbax ``params/`` (a nested pure dict of arrays, numpy
    memmaps included) to ``out_dir``: everything goes to a temporary sibling, renamed at the end."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # synchronous save with a bound on the bytes Orbax has in flight
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=2))
        ckptr.save(tmp / "params", args=ocp.args.StandardSave(params))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_model(model: nnx.Module, out_dir: str | os.PathLike, config: dict, *, overwrite: bool = False) -> Path:
    """Write the model's ``nnx.Param`` state and ``config`` atomically."""
    return write_params(out_dir, nnx.to_pure_dict(nnx.state(model, nnx.Param)), config, overwrite=overwrite)


def restore_params(model: nnx.Module, ckpt_dir: str | os.PathLike, mesh: Mesh | None = None,
                   *, dtype=None) -> nnx.Module:
    """Restore ``<ckpt_dir>/params`` into ``model`` (concrete or abstract), sharded over ``mesh``.

    Shapes are checked against the model; a mismatch names the parameter and both shapes.
    """
    import orbax.checkpoint as ocp

    mesh = mesh if mesh is not None else shd.make_mesh(devices=jax.devices()[:1])
    state = nnx.state(model, nnx.Param)
    shardings = nnx.to_pure_dict(shd.state_shardings(state, mesh))
    abstract = nnx.to_pure_dict(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable)))
    path = Path(ckpt_dir).absolute() / "params"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no params/ directory (is this a converted wanjax checkpoint?)")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    saved = flatten_params(_meta_tree(meta))
    want = flatten_params(abstract)
    problems = []
    for k, spec in want.items():
        if k not in saved:
            problems.append(f"missing parameter {k} {tuple(spec.shape)}")
        elif tuple(saved[k].shape) != tuple(spec.shape):
            problems.append(f"{k}: checkpoint has {tuple(saved[k].shape)}, model expects {tuple(spec.shape)}")
    for k in saved:
        if k not in want:
            problems.append(f"unexpected parameter {k} {tuple(saved[k].shape)}")
    if problems:
        raise CheckpointError(f"{ckpt_dir} does not match the model (wrong preset?):\n  - "
                              + "\n  - ".join(problems[:20]))
    target = jax.tree.map(
        lambda a, s, sv: jax.ShapeDtypeStruct(a.shape, dtype or sv.dtype, sharding=s),
        abstract, shardings, _unflat_like(abstract, saved))
    restored = ckptr.restore(path, target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def load_model(ckpt_dir: str | os.PathLike, build: Callable[[dict, nnx.Rngs], nnx.Module],
               mesh: Mesh | None = None, *, dtype=None) -> nnx.Module:
    """Build ``build(config, rngs)`` abstractly and restore the checkpoint into it (sharded)."""
    cfg = read_config(ckpt_dir)
    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    return restore_params(abstract, ckpt_dir, mesh, dtype=dtype)


def _meta_tree(meta) -> Any:
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return tree


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested pure dict -> {'a/b/c': leaf} (the path form used by converter plans)."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, path))
        else:
            out[path] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': leaf} -> nested dict (inverse of :func:`flatten_params`)."""
    root: dict = {}
    for path, v in flat.items():
        node = root
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return root


def _unflat_like(template, flat_saved):
    def walk(t, prefix):
        if isinstance(t, dict):
            return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in t.items()}
        return flat_saved[prefix]
    return walk(template, "")
