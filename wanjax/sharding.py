"""The one place where logical axis names become mesh axes.

Mesh axes are ``(data, fsdp, tensor)``. Parameters are FSDP-sharded over their ``embed`` dim and
tensor-parallel over ``heads``/``mlp``; the stacked ``layers`` axis is never sharded. A logical
dim whose size the mesh axes do not divide is replicated instead (tiny test models on 8 devices).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def current_platform() -> str:
    """Platform ("cpu", "gpu", "tpu") that un-placed work runs on here: the device of an enclosing
    ``jax.default_device(...)`` (e.g. timing on the host CPU inside a GPU process), else JAX's
    default backend. Implementation choices that depend on the device (conv layout, attention
    kernel) resolve "auto" with this, so they follow the device the work is placed on."""
    d = jax.config.jax_default_device
    if d is None:
        return jax.default_backend()
    plat = d if isinstance(d, str) else d.platform
    return "gpu" if plat in ("cuda", "rocm") else plat

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated)
LOGICAL_RULES: dict[str, Any] = {
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "norm": None,
    "layers": None,
    "conv_in": None,
    "conv_out": "fsdp",
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one of the sizes may be -1 (use the remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{math.prod(sizes)} devices, found {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _mesh_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    if isinstance(axis, tuple):
        return math.prod(mesh.shape[a] for a in axis)
    return mesh.shape[axis]


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
    """PartitionSpec for one array; dims that don't divide (or reuse a mesh axis) stay replicated."""
    if axes is None:
        return P()
    used: set = set()
    out = []
    for name, dim in zip(axes, shape):
        mesh_axis = rules.get(name) if name is not None else None
        names = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis or ())
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        while names and dim % math.prod(mesh.shape[a] for a in names):
            names = names[:-1]  # shard over the longest prefix of mesh axes that divides the dim
        if not names:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return P(*out)


def named_sharding(mesh: Mesh, *axes: str | None, shape: Sequence[int] | None = None,
                   rules: Mapping[str, Any] = LOGICAL_RULES) -> NamedSharding:
    """Sharding for an activation described by logical names (shape enables divisibility checks)."""
    shape = shape if shape is not None else [0] * len(axes)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = LOGICAL_RULES):
    """A tree (same structure as ``state``) of ``NamedSharding`` from each Variable's logical axes."""
    def one(var):
        axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        shape = var.shape if hasattr(var, "shape") else np.shape(var[...])
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Any] = LOGICAL_RULES) -> nnx.Module:
    """Place every variable of ``model`` on ``mesh`` according to its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    placed = jax.tree.map(lambda v, s: jax.device_put(v, s), nnx.to_pure_dict(state),
                          nnx.to_pure_dict(shardings))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model


class MeshJit:
    """A jitted function called (and lowered) inside ``jax.set_mesh(mesh)``, so code traced in it
    sees the mesh (``jax.sharding.get_abstract_mesh``: e.g. ``wanjax.attention.co_shard``)."""

    def __init__(self, jitted, mesh: Mesh | None):
        self.jitted, self.mesh = jitted, mesh

    def _ctx(self):
        import contextlib
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        with self._ctx():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with self._ctx():
            return self.jitted.lower(*args, **kwargs)
