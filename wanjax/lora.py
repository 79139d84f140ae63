"""LoRA for the Wan DiT: UniAnimate's adapter names, the merge rule, and an unmerged runtime view.

Spec: /work/shared/docs/unianimate_dit.md section 7.

Names. A :class:`LoRAWeights` maps Wan-native module names, ``blocks.N.self_attn.{q,k,v,o}``,
``blocks.N.cross_attn.{q,k,v,o,k_img,v_img}``, ``blocks.N.ffn.0`` / ``blocks.N.ffn.2``, to a pair
``(A [r, in], B [out, r])`` in PyTorch orientation (PEFT ``lora_A`` / ``lora_B`` weights). UA's file
stores them as ``pipe.dit.blocks.N.<module>.lora_{A,B}.default.weight`` (:func:`parse_lora_key`).

Scale rule. UA's ``load_lora_v2`` merges ``W' = W + alpha_load * (B @ A)`` with ``alpha_load = 1.0``
and **no** PEFT ``alpha / r`` factor: it is right only because UA trained with ``lora_alpha = r``. Here
the update is ``alpha * scale * (B @ A)``: ``alpha`` is UA's ``alpha_load`` (the ``--alpha`` flag, 1.0),
``scale`` defaults to 1.0; pass ``scale = lora_alpha / r`` for adapters trained with alpha != r.
Our kernels are ``[in, out]``, so the kernel update is ``(B @ A).T``; it is computed in float32 and
cast once to the kernel dtype (UA adds in bf16, which rounds twice).

Two ways to use an adapter:

- :func:`apply_lora` -- a merged *view*: a new parameter pure dict with every adapted kernel replaced
  by ``W + alpha * scale * (B @ A).T``; the input dict is not modified.
- :func:`attach_lora` -- unmerged, applied to activations: returns a copy of the ``WanDiT`` whose
  adapted ``Linear`` modules are :class:`LoRALinear` (``x @ W + b + s * (x @ A.T) @ B.T``) and whose
  self-attention is :class:`LoRASelfAttention` (the fused q/k/v projection is replaced by three
  LoRA-aware projections; same arithmetic). The adapter tensors are stacked over layers
  (``[num_layers, r, in]`` / ``[num_layers, out, r]``, zeros for layers without an adapter for that
  module) and stored as :class:`LoRAParam` variables, which the DiT's layer scan slices like any
  other block state; they are *not* ``nnx.Param``, so ``nnx.state(model, nnx.Param)`` (checkpoints)
  is unchanged, and ``nnx.state(model, LoRAParam)`` selects only the adapter (LoRA-only training).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401  (flax config)
from wanjax.models.dit import SelfAttention, WanDiT, apply_rope

F32 = jnp.float32

# Wan-native module (inside a block) -> attribute path inside our Block
MODULES: dict[str, tuple[str, str]] = {
    "self_attn.q": ("self_attn", "q"), "self_attn.k": ("self_attn", "k"),
    "self_attn.v": ("self_attn", "v"), "self_attn.o": ("self_attn", "o"),
    "cross_attn.q": ("cross_attn", "q"), "cross_attn.k": ("cross_attn", "k"),
    "cross_attn.v": ("cross_attn", "v"), "cross_attn.o": ("cross_attn", "o"),
    "cross_attn.k_img": ("cross_attn", "k_img"), "cross_attn.v_img": ("cross_attn", "v_img"),
    "ffn.0": ("ffn", "fc1"), "ffn.2": ("ffn", "fc2"),
}
# UA's target_modules "q,k,v,o,ffn.0,ffn.2" (spec 7.1)
UA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
              "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

_KEY_RE = re.compile(r"^(?:pipe\.dit\.|dit\.|model\.diffusion_model\.|model\.)?"
                     r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$")
_MOD_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class LoRAError(ValueError):
    """An adapter does not fit the model; the message names the module and the shapes."""


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """``pipe.dit.blocks.3.ffn.0.lora_B.default.weight`` -> ``("blocks.3.ffn.0", "B")``; None for
    keys that are not LoRA weights."""
    m = _KEY_RE.match(key)
    if m is None:
        return None
    return m.group("module"), m.group("ab")


def split_module(name: str) -> tuple[int, str, str]:
    """``blocks.N.<module>`` -> (N, block attribute, linear attribute); error names unknown modules."""
    m = _MOD_RE.match(name)
    if m is None or m.group(2) not in MODULES:
        raise LoRAError(f"LoRA target {name!r} is not an adaptable DiT linear; expected blocks.N.<m> with "
                        f"<m> one of {sorted(MODULES)}")
    return int(m.group(1)), *MODULES[m.group(2)]


class LoRAWeights(Mapping):
    """``{Wan module name: (A [r, in], B [out, r])}`` (numpy or jax arrays, PyTorch orientation)."""

    def __init__(self, pairs: Mapping[str, tuple]):
        self._pairs = {}
        ranks = set()
        for name, (a, b) in pairs.items():
            split_module(name)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise LoRAError(f"LoRA {name}: A {tuple(a.shape)} and B {tuple(b.shape)} are not [r, in] / [out, r]")
            ranks.add(int(a.shape[0]))
            self._pairs[name] = (a, b)
        self.ranks = sorted(ranks)

    @property
    def rank(self) -> int:
        if len(self.ranks) != 1:
            raise LoRAError(f"adapter has mixed ranks {self.ranks}")
        return self.ranks[0]

    def __getitem__(self, k):
        return self._pairs[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, object], *, ignore_other: bool = True) -> "LoRAWeights":
        """From a flat ``{key: tensor}`` with PEFT names (torch tensors or arrays); non-LoRA keys are
        skipped when ``ignore_other``. A or B without its partner is an error naming the module."""
        a_, b_ = {}, {}
        for k, v in sd.items():
            p = parse_lora_key(k)
            if p is None:
                if not ignore_other:
                    raise LoRAError(f"{k!r} is not a LoRA weight key")
                continue
            arr = v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32)
            (a_ if p[1] == "A" else b_)[p[0]] = arr
        unpaired = sorted(set(a_) ^ set(b_))
        if unpaired:
            raise LoRAError(f"LoRA modules with only one of lora_A / lora_B: {unpaired[:10]}")
        return cls({m: (a_[m], b_[m]) for m in a_})


def delta_kernel(a, b, alpha: float, scale: float = 1.0) -> np.ndarray:
    """``alpha * scale * (B @ A).T`` in float32: the update of an ``[in, out]`` kernel."""
    d = np.asarray(b, np.float32) @ np.asarray(a, np.float32)
    return (np.float32(alpha * scale) * d).T


def apply_lora(params: Mapping, lora: Mapping[str, tuple], alpha: float = 1.0, scale: float = 1.0) -> dict:
    """Merged view of a WanDiT parameter pure dict (``nnx.to_pure_dict(nnx.state(dit, nnx.Param))``):
    a new dict in which each adapted kernel is ``W + alpha * scale * (B @ A).T`` (float32 sum, cast to
    the kernel dtype). Every adapted module must exist with matching shapes, else :class:`LoRAError`."""
    out = _copy_tree(params)
    blocks = out.get("blocks")
    if blocks is None:
        raise LoRAError(f"apply_lora: expected a WanDiT parameter dict with 'blocks', got keys {sorted(out)}")
    for name, (a, b) in lora.items():
        layer, grp, lin = split_module(name)
        node = blocks.get(grp, {}).get(lin)
        if node is None:
            raise LoRAError(f"LoRA target {name} does not exist in the model (no blocks/{grp}/{lin})")
        k = node["kernel"]
        if layer >= k.shape[0]:
            raise LoRAError(f"LoRA target {name}: the model has only {k.shape[0]} blocks")
        want = (k.shape[1], k.shape[2])
        if (a.shape[1], b.shape[0]) != want:
            raise LoRAError(f"LoRA {name}: A {tuple(a.shape)} / B {tuple(b.shape)} give a [{a.shape[1]}, "
                            f"{b.shape[0]}] update, the kernel blocks/{grp}/{lin}[{layer}] is {list(want)}")
        new = jnp.asarray(k[layer], F32) + jnp.asarray(delta_kernel(a, b, alpha, scale))
        node["kernel"] = jnp.asarray(k).at[layer].set(new.astype(k.dtype))
    return out


def _copy_tree(t):
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in t.items()}


# ----------------------------------------------------------------------------------------------
# Runtime (unmerged) LoRA
# ----------------------------------------------------------------------------------------------
class LoRAParam(nnx.Variable):
    """Adapter tensor (kept apart from ``nnx.Param`` so base checkpoints are unaffected)."""


class LoRALinear(nnx.Module):
    """``x @ W + b + s * (x @ A.T) @ B.T``; ``W``/``b`` are the wrapped Linear's variables (shared),
    ``A`` [r, in], ``B`` [out, r] (per layer inside the scan), ``s = alpha * scale``. The low-rank
    path runs in float32 and is cast to the activation dtype."""

    def __init__(self, base, a: jax.Array, b: jax.Array, s: float):
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kernel = base.kernel
        self.bias = base.bias
        self.lora_a = LoRAParam(a, out_sharding=("layers", None, None))
        self.lora_b = LoRAParam(b, out_sharding=("layers", None, None))
        self.s = float(s)

    def delta(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("...i,ri->...r", x.astype(F32), self.lora_a[...].astype(F32))
        return (self.s * jnp.einsum("...r,or->...o", h, self.lora_b[...].astype(F32))).astype(x.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y + self.delta(x)


class LoRASelfAttention(SelfAttention):
    """SelfAttention whose q/k/v may be :class:`LoRALinear`: three projections instead of the fused one."""

    def __init__(self, base: SelfAttention, q, k, v, o):  # noqa: super().__init__ would re-create params
        self.q, self.k, self.v, self.o = q, k, v, o
        self.norm_q, self.norm_k = base.norm_q, base.norm_k
        self.num_heads = base.num_heads

    def qkv(self, x, cos, sin):
        B, L, D = x.shape
        H = self.num_heads
        q = self.norm_q(self.q(x)).reshape(B, L, H, D // H)
        k = self.norm_k(self.k(x)).reshape(B, L, H, D // H)
        v = self.v(x).reshape(B, L, H, D // H)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def stacked_adapter(lora: Mapping[str, tuple], module: str, num_layers: int, din: int, dout: int,
                    rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A [L, r, in], B [L, out, r])`` for one module type, zeros for layers without an adapter;
    None if no layer adapts ``module``."""
    a = np.zeros((num_layers, rank, din), np.float32)
    b = np.zeros((num_layers, dout, rank), np.float32)
    hit = False
    for name, (la, lb) in lora.items():
        m = _MOD_RE.match(name)
        if m is None or m.group(2) != module:
            continue
        n = int(m.group(1))
        if n >= num_layers:
            raise LoRAError(f"LoRA target {name}: the model has only {num_layers} blocks")
        if tuple(la.shape) != (rank, din) or tuple(lb.shape) != (dout, rank):
            raise LoRAError(f"LoRA {name}: A {tuple(la.shape)} / B {tuple(lb.shape)}, expected "
                            f"A [{rank}, {din}] and B [{dout}, {rank}]")
        a[n], b[n] = np.asarray(la, np.float32), np.asarray(lb, np.float32)
        hit = True
    return (a, b) if hit else None


def attach_lora(model: WanDiT, lora: LoRAWeights | Mapping[str, tuple], alpha: float = 1.0,
                scale: float = 1.0) -> WanDiT:
    """A copy of ``model`` running ``lora`` unmerged (see the module docstring). The base weights are
    shared by value with a clone; ``model`` itself is not modified."""
    if not isinstance(lora, LoRAWeights):
        lora = LoRAWeights(lora)
    for name in lora:
        layer, grp, lin = split_module(name)
        if getattr(getattr(model.blocks, grp), lin, None) is None:
            raise LoRAError(f"LoRA target {name} does not exist in the model (no blocks/{grp}/{lin}; "
                            f"i2v={model.cfg.i2v})")
    model = nnx.clone(model)
    s = alpha * scale
    L = model.cfg.num_layers
    r = lora.rank
    wrapped: dict[tuple[str, str], LoRALinear] = {}
    for module, (grp, lin) in MODULES.items():
        base = getattr(getattr(model.blocks, grp), lin, None)
        if base is None:
            continue
        ab = stacked_adapter(lora, module, L, base.in_features, base.out_features, r)
        if ab is not None:
            wrapped[(grp, lin)] = LoRALinear(base, jnp.asarray(ab[0]), jnp.asarray(ab[1]), s)
    for (grp, lin), mod in wrapped.items():
        if grp != "self_attn":
            setattr(getattr(model.blocks, grp), lin, mod)
    sa = model.blocks.self_attn
    if any(g == "self_attn" for g, _ in wrapped):
        model.blocks.self_attn = LoRASelfAttention(
            sa, *(wrapped.get(("self_attn", n), getattr(sa, n)) for n in "qkvo"))
    return model


def lora_from_modules(names: Iterable[str], shapes: Mapping[str, tuple[int, int]], rank: int,
                      seed: int = 0, std: float = 0.05) -> LoRAWeights:
    """Random adapter (both A and B nonzero) for tests: ``shapes[name] = (in, out)``."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for n in names:
        din, dout = shapes[n]
        pairs[n] = (rng.standard_normal((rank, din)).astype(np.float32) * std,
                    rng.standard_normal((dout, rank)).astype(np.float32) * std)
    return LoRAWeights(pairs)
