"""Teacher-target store: safetensors shards + a JSON index (format ``wanjax-targets-v1``).

Layout of ``OUT/``::

    shard-00000.safetensors   tensors named "<sample_id>/<key>"; header metadata {"wanjax": JSON of
                              {"format", "ids"}} (a single key, so the header bytes are deterministic)
    shard-00001.safetensors
    index-p00000.json         per-host index of the shards written by process 0 (and so on)
    index.json                merged index (all hosts), written at the end of a run

Index (``index-p*.json`` and ``index.json`` have the same structure)::

    {"format": "wanjax-targets-v1",
     "shards":  {"shard-00000.safetensors": {"bytes": 1234, "ids": ["a", "b"]}, ...},
     "samples": {"a": {"shard": "shard-00000.safetensors", "pos": 0, "keys": ["noise", ...],
                       "shapes": {"noise": [3, 4, 4, 16], ...}, "dtypes": {"noise": "float32", ...},
                       "crc32": {"noise": 123, ...}, "meta": {...}}, ...}}

Guarantees:

* **Atomic**: a shard is written to ``.<name>.p<k>.tmp``, fsynced and renamed; only then is it added
  to the host's index, which is itself replaced atomically (tmp + rename). A shard file that no
  index names (a run killed between the two renames) is ignored and rewritten on resume.
* **Resumable**: :meth:`TargetWriter.done_ids` / :meth:`TargetWriter.done_shards` read every index in
  the directory; callers skip finished work. Writing a shard name that is already indexed raises.
* **Deterministic**: shard bytes and index text depend only on the added arrays, metadata and shard
  names (sorted JSON keys, no timestamps), so a resumed run reproduces an uninterrupted one.
* **Multiple hosts**: each process writes only its own ``index-p{k:05d}.json`` and shard names that no
  other process uses (explicit numbers from a disjoint partition, e.g. one shard per group of manifest
  rows with groups dealt round-robin to hosts, or automatic numbers ``k + process_count * j``).
  :func:`read_index` (used by :class:`TargetReader`) merges ``index.json`` and all ``index-p*.json``
  files, so a directory is readable while hosts are still writing; :func:`merge_index` writes the
  merged ``index.json`` (process 0 after all hosts finish; :meth:`TargetWriter.close` does it for a
  single process).
* **Validated reads**: :class:`TargetReader` checks the shard's byte size, every key's shape and dtype
  and (``verify=True``) its CRC-32 against the index; anything wrong raises :class:`TargetError`
  naming the shard file and the sample id.
"""
from __future__ import annotations

import json
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

log = logging.getLogger("wanjax.data.targets")

FORMAT = "wanjax-targets-v1"
INDEX_NAME = "index.json"
HOST_INDEX_GLOB = "index-p*.json"
SHARD_PATTERN = re.compile(r"^shard-\d{5,}\.safetensors$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
ID_PATTERN = re.compile(r"^[^/\s][^/]*$")


class TargetError(ValueError):
    """A corrupt, truncated or inconsistent target shard / index, or a bad write. The message names the
    file and the sample id."""


def shard_name(number: int) -> str:
    """``shard-00042.safetensors``."""
    if number < 0:
        raise TargetError(f"shard number must be >= 0, got {number}")
    return f"shard-{number:05d}.safetensors"


def host_index_name(process_index: int) -> str:
    return f"index-p{process_index:05d}.json"


def _empty_index() -> dict:
    return {"format": FORMAT, "shards": {}, "samples": {}}


def _write_atomic(path: Path, data: bytes, tmp: Path) -> None:
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _dump_index(index: Mapping) -> bytes:
    return (json.dumps(index, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _load_index_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TargetError(f"{path}: unreadable target index ({e}); delete it and the run rebuilds it from "
                          f"scratch for this host") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("shards"), dict) \
            or not isinstance(data.get("samples"), dict):
        raise TargetError(f"{path}: not a {FORMAT} index (expected keys format, shards, samples)")
    return data


def _merge_into(dst: dict, src: Mapping, src_name: str) -> None:
    for name, rec in src["shards"].items():
        old = dst["shards"].get(name)
        if old is not None and old != rec:
            raise TargetError(f"{src_name}: shard {name} disagrees with another index (two hosts wrote the same "
                              f"shard name); keep one writer per shard name")
        dst["shards"][name] = rec
    for sid, rec in src["samples"].items():
        old = dst["samples"].get(sid)
        if old is not None and old != rec:
            raise TargetError(f"{src_name}: sample {sid!r} is indexed in both {old['shard']} and {rec['shard']}; "
                              f"sample ids must be unique across the dataset")
        dst["samples"][sid] = rec


def read_index(out_dir: str | os.PathLike) -> dict:
    """Merged index of ``index.json`` and every ``index-p*.json`` in ``out_dir`` (empty if none)."""
    d = Path(out_dir)
    merged = _empty_index()
    files = ([d / INDEX_NAME] if (d / INDEX_NAME).is_file() else []) + sorted(d.glob(HOST_INDEX_GLOB))
    for f in files:
        _merge_into(merged, _load_index_file(f), str(f))
    for sid, rec in merged["samples"].items():
        if rec.get("shard") not in merged["shards"]:
            raise TargetError(f"{d}: sample {sid!r} points at shard {rec.get('shard')!r}, which no index lists")
    return merged


def merge_index(out_dir: str | os.PathLike) -> Path:
    """Write the merged index of all hosts to ``out_dir/index.json`` (atomic); returns its path."""
    d = Path(out_dir)
    merged = read_index(d)
    path = d / INDEX_NAME
    _write_atomic(path, _dump_index(merged), d / f".{INDEX_NAME}.merge.tmp")
    return path


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).data) & 0xFFFFFFFF


def _jsonable(x: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(x, sort_keys=True, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TargetError(f"{where}: metadata is not JSON-serialisable ({e})") from None


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (Path, os.PathLike)):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


class TargetWriter:
    """Buffered, atomic, resumable writer of one host's shards (see the module doc).

    >>> w = TargetWriter(out, process_index=0, process_count=1)
    >>> if "a" not in w.done_ids():
    ...     w.add("a", {"x0": np.zeros((3, 4, 4, 16), np.float32)}, {"prompt": "..."})
    >>> w.flush(shard=0)      # -> out/shard-00000.safetensors, indexed in out/index-p00000.json
    >>> w.close()             # flushes the rest; one process: also writes out/index.json
    """

    def __init__(self, out_dir: str | os.PathLike, *, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise TargetError(f"process_index={process_index} must lie in [0, process_count={process_count})")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.process_index, self.process_count = int(process_index), int(process_count)
        for stale in self.out_dir.glob(f".*.p{self.process_index:05d}.tmp"):
            log.info("removing %s left by an interrupted run", stale)
            stale.unlink(missing_ok=True)
        own = self.out_dir / host_index_name(self.process_index)
        self._own = _load_index_file(own) if own.is_file() else _empty_index()
        self._all = read_index(self.out_dir)
        self._buffer: list[tuple[str, dict[str, np.ndarray], dict]] = []
        self._closed = False

    # -- state -----------------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """Sample ids already in a completely written, indexed shard (any host)."""
        return set(self._all["samples"])

    def done_shards(self) -> set[str]:
        """Indexed shard file names (any host)."""
        return set(self._all["shards"])

    @property
    def pending(self) -> int:
        return len(self._buffer)

    # -- writing ---------------------------------------------------------------------------------
    def add(self, sample_id: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Buffer one sample (arrays without a batch dim) until the next :meth:`flush`."""
        if self._closed:
            raise TargetError(f"{self.out_dir}: TargetWriter is closed")
        if not isinstance(sample_id, str) or not ID_PATTERN.match(sample_id):
            raise TargetError(f"sample id {sample_id!r}: must be a non-empty string without '/' or leading space")
        if sample_id in self._all["samples"] or any(s == sample_id for s, _, _ in self._buffer):
            raise TargetError(f"{self.out_dir}: sample {sample_id!r} was already written; skip ids in done_ids()")
        if not arrays:
            raise TargetError(f"sample {sample_id!r}: no arrays")
        arrs = {}
        for k, v in arrays.items():
            if not isinstance(k, str) or not KEY_PATTERN.match(k):
                raise TargetError(f"sample {sample_id!r}: array key {k!r} must match {KEY_PATTERN.pattern}")
            a = np.ascontiguousarray(np.asarray(v))
            if a.dtype == object:
                raise TargetError(f"sample {sample_id!r}: array {k!r} has dtype object; pass numeric arrays")
            arrs[k] = a
        self._buffer.append((sample_id, arrs, _jsonable(dict(meta), f"sample {sample_id!r}")))

    def _auto_number(self) -> int:
        j = 0
        while shard_name(self.process_index + self.process_count * j) in self._all["shards"]:
            j += 1
        return self.process_index + self.process_count * j

    def flush(self, shard: int | None = None) -> Path | None:
        """Write the buffered samples as one shard and index it.

        ``shard``: the shard number (the caller guarantees that no other host uses it); None picks
        ``process_index + process_count * j`` for the smallest unused j, and does nothing when the
        buffer is empty. An explicit number with an empty buffer writes an empty shard (marking, for
        instance, a group of rows that were all skipped as done).
        """
        if self._closed:
            raise TargetError(f"{self.out_dir}: TargetWriter is closed")
        if shard is None and not self._buffer:
            return None
        name = shard_name(self._auto_number() if shard is None else int(shard))
        if name in self._all["shards"]:
            raise TargetError(f"{self.out_dir / name}: shard is already written and indexed; resumed runs "
                              f"must skip it (TargetWriter.done_shards)")
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        records: dict[str, dict] = {}
        ids = [sid for sid, _, _ in self._buffer]
        for pos, (sid, arrs, meta) in enumerate(self._buffer):
            for k, a in arrs.items():
                tensors[f"{sid}/{k}"] = a
            records[sid] = {"shard": name, "pos": pos, "keys": list(arrs),
                            "shapes": {k: list(a.shape) for k, a in arrs.items()},
                            "dtypes": {k: a.dtype.name for k, a in arrs.items()},
                            "crc32": {k: _crc(a) for k, a in arrs.items()}, "meta": meta}
        path = self.out_dir / name
        tmp = self.out_dir / f".{name}.p{self.process_index:05d}.tmp"
        try:
            # one metadata key: safetensors stores the metadata map in hash order (not deterministic)
            save_file(tensors, str(tmp), metadata={"wanjax": json.dumps({"format": FORMAT, "ids": ids})})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shard_rec = {"bytes": path.stat().st_size, "ids": ids}
        for idx in (self._own, self._all):
            idx["shards"][name] = shard_rec
            idx["samples"].update(records)
        own = self.out_dir / host_index_name(self.process_index)
        _write_atomic(own, _dump_index(self._own), self.out_dir / f".{own.name}.p{self.process_index:05d}.tmp")
        self._buffer.clear()
        log.info("wrote %s (%d samples)", path, len(ids))
        return path

    def abort(self) -> None:
        """Drop buffered samples without writing (what a killed run loses)."""
        self._buffer.clear()
        self._closed = True

    def close(self) -> None:
        """Flush what is buffered; with a single process also write the merged ``index.json``."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self.process_count == 1:
            merge_index(self.out_dir)

    def __enter__(self) -> "TargetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class TargetReader:
    """Random access to the samples of a target directory (all hosts' indexes merged).

    ``ids`` are ordered by shard name, then position in the shard. ``reader[i]`` / ``reader.get(id)``
    return ``dict[str, np.ndarray]``; ``reader.meta(id)`` the sample's metadata.
    """

    def __init__(self, out_dir: str | os.PathLike, *, verify: bool = True):
        self.dir = Path(out_dir)
        if not self.dir.is_dir():
            raise TargetError(f"{self.dir}: no such target directory (run python -m train.generate_teacher)")
        self.index = read_index(self.dir)
        if not self.index["shards"]:
            raise TargetError(f"{self.dir}: no target index ({INDEX_NAME} / {HOST_INDEX_GLOB}) or an empty one")
        self.verify = verify
        samples = self.index["samples"]
        self.ids: list[str] = sorted(samples, key=lambda s: (samples[s]["shard"], samples[s]["pos"]))

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for sid in self.ids:
            yield self.get(sid)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.get(self.ids[i])

    def record(self, sample_id: str) -> dict:
        try:
            return self.index["samples"][sample_id]
        except KeyError:
            raise KeyError(f"{self.dir}: no sample {sample_id!r} in the target index") from None

    def meta(self, sample_id: str) -> dict:
        return self.record(sample_id)["meta"]

    def shard_path(self, sample_id: str) -> Path:
        return self.dir / self.record(sample_id)["shard"]

    def get(self, sample_id: str) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        rec = self.record(sample_id)
        path = self.dir / rec["shard"]
        what = f"{path}: sample {sample_id!r}"
        if not path.is_file():
            raise TargetError(f"{what}: the shard file is missing; regenerate it (delete its entries from the "
                              f"index files and rerun generate_teacher)")
        want = self.index["shards"][rec["shard"]]["bytes"]
        size = path.stat().st_size
        if size != want:
            raise TargetError(f"{what}: the shard has {size} bytes, the index says {want} (truncated or "
                              f"overwritten); regenerate the shard")
        out: dict[str, np.ndarray] = {}
        key = None
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in rec["keys"]:
                    out[key] = f.get_tensor(f"{sample_id}/{key}")
        except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError, ...
            raise TargetError(f"{what}: corrupt shard, cannot read key {key!r} ({type(e).__name__}: {e}); "
                              f"regenerate the shard") from None
        for key, a in out.items():
            if list(a.shape) != rec["shapes"][key] or a.dtype.name != rec["dtypes"][key]:
                raise TargetError(f"{what}: key {key!r} is {a.dtype.name}{list(a.shape)}, the index says "
                                  f"{rec['dtypes'][key]}{rec['shapes'][key]}; the shard does not match its index")
            if self.verify and _crc(a) != rec["crc32"][key]:
                raise TargetError(f"{what}: key {key!r} fails its CRC-32 check (corrupt shard); regenerate it")
        return out


__all__ = ["TargetError", "TargetWriter", "TargetReader", "read_index", "merge_index", "shard_name",
           "host_index_name", "FORMAT", "INDEX_NAME"]
