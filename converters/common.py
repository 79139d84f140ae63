"""Shared machinery of every PyTorch -> Orbax converter.

A converter module only says *what goes where* (a list of :class:`Assign`). This module does the
rest: lazy tensor reading (safetensors headers are parsed here, torch pickles go through
``torch.load(weights_only=True, mmap=True)``), strict key and shape checks with errors that name
the key and both shapes, streaming into disk-backed buffers so that peak memory stays near one
tensor, and an atomic Orbax write (temporary directory, then rename) that streams each buffer region
by region (``wanjax.checkpoint.write_params``), so the whole conversion runs in a few hundred MiB of
anonymous memory whatever the model size.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from wanjax.checkpoint import flatten_params, release_pages, unflatten_params  # noqa: F401  (re-exported)

log = logging.getLogger("wanjax.convert")


class ConversionError(ValueError):
    """A source checkpoint does not fit the target model. The message names key, file and shapes."""


# --------------------------------------------------------------------------------------------
# Lazy tensor sources
# --------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16", "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _bf16_to_f32(raw_u16: np.ndarray) -> np.ndarray:
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


class TensorSource:
    """Read-only mapping ``name -> np.ndarray`` over one or more checkpoint files.

    Tensors are read one at a time on ``get``; floating tensors come back as float32 (bf16 and
    fp16 are widened exactly). ``keys()``, ``shape()`` and ``where()`` never read tensor data.
    """

    def __init__(self):
        self._entries: dict[str, tuple[Callable[[], np.ndarray], tuple[int, ...], str]] = {}
        self.description = ""

    # registry -----------------------------------------------------------------------------
    def _add(self, key: str, loader: Callable[[], np.ndarray], shape, where: str):
        if key in self._entries:
            raise ConversionError(f"duplicate tensor {key!r} in {where} and {self._entries[key][2]}")
        self._entries[key] = (loader, tuple(int(s) for s in shape), where)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def where(self, key: str) -> str:
        return self._entries[key][2]

    def get(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise ConversionError(f"tensor {key!r} not found in {self.description}")
        loader, shape, where = self._entries[key]
        arr = loader()
        if tuple(arr.shape) != shape:
            raise ConversionError(f"{where}: tensor {key!r} has shape {arr.shape}, header says {shape}")
        return arr

    def renamed(self, fn: Callable[[str], str | None]) -> "TensorSource":
        """A view with keys renamed by ``fn`` (``None`` drops a key)."""
        out = TensorSource()
        out.description = self.description
        for k, (loader, shape, where) in self._entries.items():
            nk = fn(k)
            if nk is not None:
                out._add(nk, loader, shape, f"{where}")
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], description: str = "<memory>") -> "TensorSource":
        src = cls()
        src.description = description
        for k, v in arrays.items():
            a = _to_numpy(v)
            src._add(k, (lambda a=a: a), a.shape, description)
        return src


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v.astype(np.float32) if v.dtype in (np.float16,) else v
    mod = type(v).__module__
    if mod.startswith("torch"):
        import torch
        t = v.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        return t.contiguous().numpy()
    a = np.asarray(v)
    if a.dtype.kind == "f" and a.dtype != np.float64:
        a = a.astype(np.float32)
    return a


def _safetensors_entries(path: Path, src: TensorSource):
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or 8 + n > size:
            raise ConversionError(f"{path}: corrupt or truncated safetensors header "
                                  f"(header length {n}, file size {size}); re-download the file")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
    base = 8 + n

    def read(lo: int, hi: int) -> bytes:
        # plain reads (no mmap): resident memory stays at one tensor, not the whole file
        with open(path, "rb") as fh:
            fh.seek(base + lo)
            buf = fh.read(hi - lo)
        if len(buf) != hi - lo:
            raise ConversionError(f"{path}: short read at byte {base + lo}: the file is truncated")
        return buf

    for key, info in header.items():
        if key == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if base + end > size:
            raise ConversionError(f"{path}: tensor {key!r} ends at byte {base + end} but the file has only "
                                  f"{size} bytes: the file is truncated; re-download or re-export it")
        shape = tuple(info["shape"])

        def load(start=start, end=end, dt=dt, shape=shape):
            raw = read(start, end)
            if dt == "bf16":
                return _bf16_to_f32(np.frombuffer(raw, np.uint16)).reshape(shape)
            a = np.frombuffer(raw, dt).reshape(shape)
            return a.astype(np.float32) if a.dtype == np.float16 else a

        src._add(key, load, shape, str(path))


def _torch_pickle_entries(path: Path, src: TensorSource, container_keys: Sequence[str]):
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without the convert extra
        raise ConversionError(f"{path}: reading .pt/.pth/.ckpt files needs PyTorch; "
                              "install the converter extra: pip install 'wanjax[convert]'") from None
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                raise ConversionError(f"{path}: member {bad!r} of the checkpoint archive is corrupt")
        except zipfile.BadZipFile as e:
            raise ConversionError(f"{path}: corrupt checkpoint archive ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: refused to load. The file pickles objects other than tensors and plain "
            f"containers, and checkpoints are untrusted input, so wanjax never unpickles arbitrary "
            f"objects (torch.load weights_only=True said: {str(e).splitlines()[0]}). Re-save it as a "
            f"plain state dict (torch.save(model.state_dict(), ...)) or as safetensors.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConversionError(f"{path}: cannot read the checkpoint, it looks truncated or corrupt "
                              f"({str(e).splitlines()[0]})") from None
    sd = _unwrap_container(obj, container_keys, path)
    for k, v in sd.items():
        if not hasattr(v, "shape"):
            continue  # non-tensor entries (step counters, ...) are not parameters
        src._add(k, (lambda v=v: _to_numpy(v)), tuple(v.shape), str(path))


def _unwrap_container(obj, container_keys: Sequence[str], path: Path) -> dict:
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for ck in container_keys:
        if ck in obj and isinstance(obj[ck], dict):
            log.info("%s: using the %r entry of the checkpoint", path, ck)
            return obj[ck]
    if all(hasattr(v, "shape") or not isinstance(v, dict) for v in obj.values()):
        return obj
    nested = [k for k, v in obj.items() if isinstance(v, dict)]
    raise ConversionError(f"{path}: a container checkpoint with entries {nested}, none of which is "
                          f"one of {list(container_keys)}; pass the state dict itself")


def open_tensor_source(path: str | os.PathLike, *,
                       container_keys: Sequence[str] = ("generator_ema", "generator", "state_dict",
                                                        "model", "module")) -> TensorSource:
    """Open a checkpoint file or directory lazily.

    Accepts a ``.safetensors`` file, a directory of ``*.safetensors`` (sharded, with or without
    ``*.index.json``), or a torch pickle (``.pt``, ``.pth``, ``.ckpt``, ``.bin``). For container
    pickles the first of ``container_keys`` present is used (Self-Forcing: ``generator_ema``
    preferred over ``generator``).
    """
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{p}: no such file or directory")
    src = TensorSource()
    src.description = str(p)
    if p.is_dir():
        idx = sorted(p.glob("*.safetensors.index.json"))
        if idx:
            index = json.loads(idx[0].read_text())
            files = sorted({p / f for f in index["weight_map"].values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise ConversionError(f"{idx[0]} names shard(s) that are missing: {missing}")
        else:
            files = sorted(p.glob("*.safetensors"))
        if not files:
            pick = sorted(list(p.glob("*.pth")) + list(p.glob("*.pt")) + list(p.glob("*.ckpt")))
            if len(pick) == 1:
                return open_tensor_source(pick[0], container_keys=container_keys)
            raise ConversionError(f"{p}: no *.safetensors (or single .pth/.pt) checkpoint in this directory")
        for f in files:
            _safetensors_entries(f, src)
        if idx:
            extra = set(src.keys()) ^ set(index["weight_map"])
            if extra:
                raise ConversionError(f"{idx[0]} and its shards disagree on keys, e.g. {sorted(extra)[:5]}")
    elif p.suffix == ".safetensors":
        _safetensors_entries(p, src)
    elif p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        _torch_pickle_entries(p, src, container_keys)
    else:
        raise ConversionError(f"{p}: unknown checkpoint type {p.suffix!r}; expected .safetensors, "
                              f".pt, .pth, .ckpt or a directory of safetensors shards")
    if len(src) == 0:
        raise ConversionError(f"{p}: the checkpoint holds no tensors")
    return src


def _read_store(store, index) -> np.ndarray:
    a = store[index].read().result()
    return a.astype(np.float32) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a


def open_orbax_source(ckpt_dir: str | os.PathLike, *,
                      per_layer: Callable[[str], bool] = lambda path: False) -> tuple[TensorSource, dict]:
    """A converted wanjax checkpoint (``config.json`` + Orbax ``params/``) as a lazy TensorSource keyed by
    ``/``-joined parameter paths, and its config. Every ``get`` reads one array (or one layer) with
    TensorStore, nothing more; floats come back as float32. Arrays whose path satisfies ``per_layer``
    (stacked blocks) appear as one key per leading index, ``path[i]``, so a 1.65 GB stacked FFN kernel
    is read 55 MB at a time."""
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from etils import epath

    from wanjax.checkpoint import read_config

    root = Path(ckpt_dir).absolute()
    config = read_config(root)
    pdir = root / "params"
    try:
        meta = json.loads((pdir / "_METADATA").read_text())
        tree = meta["tree_metadata"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ConversionError(f"{root}: unreadable Orbax params/_METADATA ({e})") from None
    th = ocp.type_handlers
    use_ocdbt = bool(meta.get("use_ocdbt", True))
    context = th.get_ts_context(use_ocdbt=use_ocdbt)
    src = TensorSource()
    src.description = str(root)
    for entry in tree.values():
        parts = [str(k["key"]) for k in entry["key_metadata"]]
        info = th.ParamInfo(name=".".join(parts), parent_dir=epath.Path(pdir), is_ocdbt_checkpoint=use_ocdbt,
                            use_zarr3=bool(meta.get("use_zarr3", False)), ts_context=context)
        store = ts.open(th.get_json_tspec_read(info, use_ocdbt=use_ocdbt), open=True, context=context).result()
        path, shape = "/".join(parts), tuple(store.shape)

        if per_layer(path) and len(shape) >= 1:
            for i in range(shape[0]):
                src._add(f"{path}[{i}]", (lambda store=store, i=i: _read_store(store, i)), shape[1:], str(pdir))
        else:
            src._add(path, (lambda store=store: _read_store(store, ())), shape, str(pdir))
    if len(src) == 0:
        raise ConversionError(f"{root}: the checkpoint holds no arrays")
    return src, config


_WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrappers(key: str, prefixes: Sequence[str] = ()) -> str:
    """Remove FSDP / checkpoint / torch.compile wrapper tokens anywhere, then leading prefixes."""
    for tok in _WRAPPER_TOKENS:
        key = key.replace(tok, "")
    for pre in prefixes:
        if key.startswith(pre):
            key = key[len(pre):]
            break
    return key


# --------------------------------------------------------------------------------------------
# Conversion plans
# --------------------------------------------------------------------------------------------
def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_t(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return x.T


def conv_t(x: np.ndarray) -> np.ndarray:
    """torch ConvNd weight [out, in, *k] -> kernel [*k, in, out]."""
    nd = x.ndim - 2
    return np.transpose(x, tuple(range(2, 2 + nd)) + (1, 0))


@dataclasses.dataclass(frozen=True)
class Assign:
    """Fill ``target`` (``/``-joined param path) from source tensor(s) through ``fn``.

    ``index`` selects a position along the leading stacked-layer axis of the target.
    """
    target: str
    sources: tuple[str, ...]
    fn: Callable[..., np.ndarray] = identity
    index: int | None = None

    def __post_init__(self):
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))


def abstract_params(model_cls, cfg) -> dict[str, Any]:
    """``{'a/b/c': ShapeDtypeStruct}`` of ``model_cls(cfg, rngs=...)``'s ``nnx.Param``s, built with
    ``nnx.eval_shape`` (no parameter memory): the conversion targets of a model."""
    import jax
    from flax import nnx

    import wanjax  # noqa: F401  (flax config: no eager sharding)

    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    flat = flatten_params(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}


def check_plan(src: TensorSource, plan: Sequence[Assign], targets: Mapping[str, Any],
               ignore: Iterable[str] = ()) -> None:
    """Strict checks before any data is read: every source key used, every target filled, and the
    shapes of plain copies (``fn=identity``) equal to their targets'."""
    ignore_re = [re.compile(p) for p in ignore]
    used: set[str] = set()
    problems: list[str] = []
    mismatched: list[str] = []
    filled: dict[str, set] = {}
    for a in plan:
        if a.target not in targets:
            problems.append(f"plan targets unknown parameter {a.target!r}")
            continue
        for s in a.sources:
            if s not in src:
                problems.append(f"missing key {s!r} (needed for {a.target}"
                                f"{'' if a.index is None else f'[{a.index}]'}, expected shape "
                                f"{_expected_shape(targets[a.target], a.index)})")
            used.add(s)
        filled.setdefault(a.target, set()).add(a.index)
        if a.fn is identity and len(a.sources) == 1 and a.sources[0] in src:
            want = _expected_shape(targets[a.target], a.index)
            if src.shape(a.sources[0]) != want:  # caught before any data is read
                mismatched.append(f"shape mismatch for {a.target}{'' if a.index is None else f'[{a.index}]'}: "
                                  f"source {a.sources[0]} {src.shape(a.sources[0])}, the model expects {want}")
    problems += mismatched[:20]
    if len(mismatched) > 20:
        problems.append(f"... and {len(mismatched) - 20} more shape mismatches")
    unexpected = [k for k in src.keys() if k not in used and not any(r.fullmatch(k) for r in ignore_re)]
    for k in unexpected[:20]:
        problems.append(f"unexpected key {k!r} with shape {src.shape(k)} in {src.where(k)}")
    if len(unexpected) > 20:
        problems.append(f"... and {len(unexpected) - 20} more unexpected keys")
    for t, spec in targets.items():
        shape = tuple(spec.shape)
        got = filled.get(t)
        if not got:
            problems.append(f"parameter {t!r} {shape} is not filled by any source key")
        elif None not in got:
            want = set(range(shape[0]))
            if got != want:
                problems.append(f"stacked parameter {t!r} misses layer(s) {sorted(want - got)[:10]}")
    if problems:
        raise ConversionError(f"checkpoint {src.description} does not match the model:\n  - "
                              + "\n  - ".join(problems))


def _expected_shape(spec, index):
    shape = tuple(spec.shape)
    return shape if index is None else shape[1:]


def materialize(src: TensorSource, plan: Sequence[Assign], targets: Mapping[str, Any],
                dtype=None, workdir: Path | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Run a checked plan. With ``workdir`` the targets are disk-backed ``np.memmap`` buffers (peak
    memory ~ one tensor); without, plain arrays. Returns ``{path: array}``."""
    out: dict[str, np.ndarray] = {}

    def buffer(t: str) -> np.ndarray:
        if t not in out:
            spec = targets[t]
            dt = np.dtype(dtype if dtype is not None else spec.dtype)
            if workdir is None:
                out[t] = np.zeros(tuple(spec.shape), dt)
            else:
                fn = workdir / (re.sub(r"[^A-Za-z0-9_.-]", "_", t) + ".bin")
                out[t] = np.memmap(fn, dtype=dt, mode="w+", shape=tuple(spec.shape))
        return out[t]

    it: Iterable[Assign] = plan
    if progress:
        from tqdm import tqdm
        it = tqdm(plan, desc="converting", unit="tensor", file=None)
    for a in it:
        arrays = [src.get(s) for s in a.sources]
        val = np.asarray(a.fn(*arrays))
        buf = buffer(a.target)
        want = tuple(buf.shape) if a.index is None else tuple(buf.shape[1:])
        if tuple(val.shape) != want:
            srcs = ", ".join(f"{s} {src.shape(s)}" for s in a.sources)
            raise ConversionError(f"shape mismatch for {a.target}"
                                  f"{'' if a.index is None else f'[{a.index}]'}: source {srcs} gives "
                                  f"{tuple(val.shape)} but the model expects {want} "
                                  f"(in {src.where(a.sources[0])}); is the --preset right?")
        dst = buf if a.index is None else buf[a.index]
        copy_cast(dst, val)
        release_pages(dst)
        del arrays, val, dst
    return out


def copy_cast(dst: np.ndarray, val: np.ndarray, block_bytes: int = 16 * 2**20) -> None:
    """``dst[...] = val`` cast to ``dst.dtype``, a block of leading rows at a time, so the cast's
    temporaries stay small even for a 283 MB (14B FFN, fp32) tensor."""
    rows = max(1, block_bytes // max(1, val[0].nbytes)) if val.ndim else 1
    if val.ndim == 0 or rows >= val.shape[0]:
        dst[...] = val.astype(dst.dtype)
        return
    for r in range(0, val.shape[0], rows):
        dst[r:r + rows] = val[r:r + rows].astype(dst.dtype)


def write_checkpoint(out_dir: str | os.PathLike, params: Mapping[str, np.ndarray], config: dict,
                     *, overwrite: bool = False) -> Path:
    """Atomically write ``config.json`` + Orbax ``params/`` ({path: array}) to ``out_dir``."""
    from wanjax.checkpoint import write_params

    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite or choose another --out")
    return write_params(out, unflatten_params(dict(params)), config, overwrite=overwrite)


def convert(src: TensorSource, plan: Sequence[Assign], targets: Mapping[str, Any], out_dir,
            config: dict, *, dtype=None, ignore: Iterable[str] = (), overwrite: bool = False,
            progress: bool = True) -> Path:
    """check_plan + materialize (disk-backed) + atomic write. Nothing is left behind on error."""
    check_plan(src, plan, targets, ignore)
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:  # before any work
        raise ConversionError(f"{out} already exists; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        t0 = time.time()
        with AnonMemorySampler() as mem_read:
            params = materialize(src, plan, targets, dtype=dtype, workdir=work, progress=progress)
        t1 = time.time()
        with AnonMemorySampler() as mem_write:
            written = write_checkpoint(out, params, config, overwrite=overwrite)
        log.info("phases: materialize %.1f s (peak anonymous %.0f MiB), checkpoint write %.1f s (peak "
                 "anonymous %.0f MiB)", t1 - t0, mem_read.peak_mib, time.time() - t1, mem_write.peak_mib)
        return written
    finally:
        shutil.rmtree(work, ignore_errors=True)


class AnonMemorySampler:
    """Samples this process's anonymous resident memory (RssAnon: memory that cannot be reclaimed,
    unlike file-backed pages of mapped checkpoints) in a background thread; ``peak_mib``."""

    def __init__(self, interval: float = 0.05):
        import threading
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval):
        while not self._stop.is_set():
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak_mib = max(self.peak_mib, int(line.split()[1]) / 1024.0)
            except OSError:
                return
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_measured(convert_fn: Callable[[], Any], errors: tuple = (ConversionError,)) -> int:
    """CLI tail: run one conversion; ``errors`` print ``error: ...`` on stderr and give exit code 2,
    success prints the peak memory (RSS and anonymous) on stderr and gives 0."""
    try:
        with AnonMemorySampler() as mem:
            convert_fn()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"peak RSS {peak_rss_mib():.0f} MiB (anonymous, non-reclaimable: {mem.peak_mib:.0f} MiB)",
          file=sys.stderr)
    return 0
