"""Converted-checkpoint I/O: ``<dir>/config.json`` + Orbax ``<dir>/params``.

Loading is lazy and sharded: the model is first built abstractly with ``nnx.eval_shape`` (no
parameter memory), every abstract leaf gets its target ``NamedSharding`` from
``wanjax.sharding``, and Orbax restores each array straight into its shards.
"""
from __future__ import annotations

import asyncio
import functools
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


# Host (numpy) leaves -- the disk-backed buffers of the converters -- are written by Orbax's own
# PyTree handler with one change, the numpy type handler below: arrays go to TensorStore one at a
# time and region by region, each region committed before the next is read. The stock handler
# deep-copies every host array up front and then writes all of them concurrently, each as a single
# chunk (up to 2 GiB), so its peak memory is about twice the checkpoint (docs/PERFORMANCE.md). The
# format is unchanged (OCDBT + zarr2 + zstd, value type "np.ndarray", same handler typestr): only
# arrays larger than ``chunk_bytes`` are stored in several chunks, which the restore path reads as is.
CHUNK_BYTES = 64 * 2**20     # storage chunk bound for host arrays larger than this
WRITE_BYTES = 256 * 2**20    # bytes handed to TensorStore per write (whole chunks)


def c_order_chunks(shape, itemsize: int, limit: int) -> tuple[int, ...]:
    """Chunk shape of at most ``limit`` bytes whose chunks are contiguous runs of a C-order array:
    ones on the leading axes, a block of the first axis whose trailing sub-array fits, the trailing
    axes whole (``[1, 2427, 13824]`` for a bf16 ``[40, 5120, 13824]`` at 64 MiB)."""
    shape = tuple(max(1, int(d)) for d in shape)
    if int(np.prod(shape)) * itemsize <= limit:
        return shape
    chunk = list(shape)
    for k in range(len(shape)):
        inner = int(np.prod(shape[k + 1:])) * itemsize
        if inner <= limit:
            chunk[k] = max(1, min(shape[k], limit // inner))
            break
        chunk[k] = 1
    return tuple(chunk)


def write_regions(shape, chunk, itemsize: int, budget: int):
    """Boxes (tuples of slices) of whole chunks covering ``shape`` in C order, each at most ``budget``
    bytes or a single chunk; with :func:`c_order_chunks` every box is contiguous in memory."""
    shape, chunk = tuple(shape), tuple(chunk)
    if not shape:
        yield ()
        return
    grid = [-(-s // c) for s, c in zip(shape, chunk)]
    k = max((i for i, g in enumerate(grid) if g > 1), default=0)  # the last axis cut into chunks
    per = max(1, budget // max(1, int(np.prod(chunk)) * itemsize))  # chunks per box along axis k
    for idx in np.ndindex(*grid[:k]):
        lead = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunk, shape))
        for j in range(0, grid[k], per):
            box = slice(j * chunk[k], min((j + per) * chunk[k], shape[k]))
            yield lead + (box,) + tuple(slice(0, s) for s in shape[k + 1:])


def release_pages(arr: np.ndarray) -> None:
    """Drop the pages of ``arr`` from this process's resident set if it is (a view of) a shared
    ``np.memmap``: the data stays in the file and the page cache (dirty pages are still written back), it
    just stops counting as this process's memory. A no-op for anything else."""
    import mmap

    base = arr
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or getattr(base, "mode", "c") == "c" or arr.nbytes == 0:  # private (copy-on-write) maps keep
        return
    mm = base._mmap
    view = np.frombuffer(mm, np.uint8)
    start = arr.__array_interface__["data"][0] - view.__array_interface__["data"][0]
    del view
    lo = start - start % mmap.PAGESIZE
    hi = min(len(mm), start + (arr.nbytes if arr.flags.c_contiguous else base.nbytes - start))
    if 0 <= lo < hi:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


@functools.cache
def _streaming_numpy_handler_cls():
    """The streaming numpy TypeHandler class, built on first use (orbax is imported lazily)."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
        """``np.ndarray`` leaves without the defensive deep copy, one array at a time, region by region."""

        def __init__(self, chunk_bytes: int, write_bytes: int):
            try:
                super().__init__(deepcopy_host_arrays=False)
            except TypeError:  # older Orbax: no defensive copy to switch off
                super().__init__()
            self._chunk_bytes, self._write_bytes = chunk_bytes, write_bytes
            self._one_at_a_time = asyncio.Lock()

        async def _open_and_write(self, value, tspec, ts_context):
            chunk = c_order_chunks(value.shape, value.dtype.itemsize, self._chunk_bytes)
            if value.nbytes > self._chunk_bytes:  # smaller arrays keep Orbax's layout (one chunk)
                if tspec.get("driver") != "zarr" or "chunks" not in tspec.get("metadata", {}):
                    raise CheckpointError(f"streaming write expects a zarr v2 spec, got {tspec.get('driver')!r}")
                tspec = {**tspec, "metadata": {**tspec["metadata"], "chunks": list(chunk)}}
            async with self._one_at_a_time:
                t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
                for box in write_regions(value.shape, chunk, value.dtype.itemsize, self._write_bytes):
                    # awaiting the write waits for its commit: at most one region is in flight
                    await t[box].write(np.asarray(value[box]), can_reference_source_data_indefinitely=True)
                    release_pages(value[box])

    return StreamingNumpyHandler


def _streaming_standard_handler(chunk_bytes: int, write_bytes: int):
    """A ``StandardCheckpointHandler`` (so the checkpoint metadata names the standard handler) whose
    inner PyTree handler gets a type registry with the streaming numpy handler."""
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    numpy_handler = _streaming_numpy_handler_cls()(chunk_bytes, write_bytes)
    registry = th.create_type_handler_registry(*[
        (ty, numpy_handler if ty is np.ndarray else th.get_type_handler(ty)) for ty in th.supported_types()])
    handler = ocp.StandardCheckpointHandler(save_concurrent_gb=2)
    if not isinstance(getattr(handler, "_impl", None), ocp.PyTreeCheckpointHandler):  # orbax 0.12 layout
        raise CheckpointError("unsupported orbax-checkpoint version: StandardCheckpointHandler has no inner "
                              "PyTreeCheckpointHandler to give the streaming numpy handler to")
    handler._impl = ocp.PyTreeCheckpointHandler(save_concurrent_gb=2, use_ocdbt=True, type_handler_registry=registry)
    return handler


def write_params(out_dir: str | os.PathLike, params: Mapping, config: dict, *, overwrite: bool = False,
                 chunk_bytes: int = CHUNK_BYTES, write_bytes: int = WRITE_BYTES) -> Path:
    """Atomically write ``config.json`` + Orbax ``params/`` (a nested pure dict of arrays, numpy
    memmaps included) to ``out_dir``: everything goes to a temporary sibling, renamed at the end.

    Host arrays are streamed (see :data:`CHUNK_BYTES`): peak memory is about ``write_bytes`` plus
    TensorStore's encode buffers, independent of the model size.
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ckptr = ocp.Checkpointer(_streaming_standard_handler(chunk_bytes, write_bytes))  # synchronous save
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


def mesh_processes(mesh: Mesh) -> set[int]:
    """The ``jax.process_index`` of every process owning a device of ``mesh``."""
    return {int(d.process_index) for d in mesh.devices.flat}


def _restorer(mesh: Mesh):
    """A ``StandardCheckpointer`` whose barriers involve only the processes that own ``mesh``.

    Orbax's default meets *every* process of the job at a barrier after each restore (a device
    collective over all global devices); a process restoring onto its own devices while the others
    do something else (teacher-target generation: each host loads the teacher on a local mesh, or
    has nothing to do) would wait there forever. Restricting ``active_processes`` to the mesh's owners
    keeps the default for a global mesh and skips the barrier for a host-local one.
    """
    import orbax.checkpoint as ocp

    owners = mesh_processes(mesh)
    if jax.process_count() == 1 or len(owners) == jax.process_count():
        return ocp.StandardCheckpointer()
    if jax.process_index() not in owners:
        raise CheckpointError(f"process {jax.process_index()} owns no device of the restore mesh (devices of "
                              f"processes {sorted(owners)}); pass a mesh that includes its own devices")
    opts = ocp.options.MultiprocessingOptions(primary_host=min(owners), active_processes=owners,
                                              barrier_sync_key_prefix=f"wanjax_p{'_'.join(map(str, sorted(owners)))}")
    return ocp.StandardCheckpointer(multiprocessing_options=opts)


def restore_params(model: nnx.Module, ckpt_dir: str | os.PathLike, mesh: Mesh | None = None,
                   *, dtype=None) -> nnx.Module:
    """Restore ``<ckpt_dir>/params`` into ``model`` (concrete or abstract), sharded over ``mesh``.

    Shapes are checked against the model; a mismatch names the parameter and both shapes.
    ``mesh`` None: this process's first local device. Multi-process (``jax.distributed``): the
    processes that own the mesh's devices restore together (Orbax meets them at a barrier after the
    read); a mesh of this process's devices only (a host-local mesh) is restored by this process
    alone, with no cross-host barrier, so hosts that work independently may load different models,
    or none, at different times.
    """
    mesh = mesh if mesh is not None else shd.make_mesh(devices=jax.local_devices()[:1])
    state = nnx.state(model, nnx.Param)
    shardings = nnx.to_pure_dict(shd.state_shardings(state, mesh))
    abstract = nnx.to_pure_dict(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable)))
    path = Path(ckpt_dir).absolute() / "params"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no params/ directory (is this a converted wanjax checkpoint?)")
    ckptr = _restorer(mesh)
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
