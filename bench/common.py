"""Shared bench helpers: device peak memory, median timing, the one-table printout every bench ends
with, and reading profiles and optimized HLO."""
from __future__ import annotations

import time

import jax
import numpy as np


def peak_bytes() -> float | None:
    """Peak device memory in bytes since process start (None where the backend doesn't report it)."""
    try:
        stats = jax.devices()[0].memory_stats()
        return None if stats is None else stats.get("peak_bytes_in_use")
    except Exception:
        return None


def median_time(fn, *args, n: int = 10) -> float:
    """Median wall time in seconds of ``fn(*args)`` over ``n`` runs, after one warm-up (compilation)
    run; each run waits for its device work (``jax.block_until_ready``)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def pipelined_time(step, state, n: int):
    """Seconds per call of ``state = step(state)[0]`` when ``n`` calls are dispatched back to back and
    waited for once at the end, as a training loop that fetches metrics only when it logs runs them:
    each call's host work (dispatch, the batch's host-to-device copy) overlaps the previous call's
    device work. Returns ``(state, seconds_per_call, metrics_of_the_last_call)``; ``step`` must already
    be compiled (its first call is not timed here)."""
    if n < 1:
        raise ValueError(f"pipelined_time: n={n} calls; need at least 1")
    t = time.perf_counter()
    m = None
    for _ in range(n):
        state, m = step(state)
    jax.block_until_ready((state, m))
    return state, (time.perf_counter() - t) / n, m


def print_table(name: str, rows) -> None:
    """Print ``rows`` of (label, value) under ``== bench.<name> ==``, labels aligned."""
    rows = [tuple(r) for r in rows]
    width = max(len(r[0]) for r in rows)
    print(f"\n== bench.{name} ==")
    for r in rows:
        print(f"{r[0]:<{width}}  " + "  ".join(str(x) for x in r[1:]))


def _op_category(name: str, text: str) -> str:
    s = (name + " " + text).lower()
    if "fmha" in s or "flash" in s or "cudnn$fmha" in s or "dot_product_attention" in s:
        return "attention (cuDNN)"
    if "conv" in s and ("convolution" in s or "cudnn-conv" in s or "cudnn$conv" in s):
        return "convolution"
    if "gemm" in s or "cublas" in s or "matmul" in s or " dot(" in s or name.startswith("nvjet"):
        return "matmul"
    if any(c in s for c in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")):
        return "collective"
    if name.startswith(("copy", "transpose")) or "memcpy" in s or "memset" in s:
        return "copy / memset"
    if "fusion" in s or "loop_" in s or "input_" in s:
        return "fusion (elementwise / reduce)"
    return "other"


def device_op_times(trace_dir: str, top: int = 30) -> dict:
    """Device time per XLA op in a ``jax.profiler.trace`` directory (the newest ``*.xplane.pb``):
    ``{"total_ms", "by_category": {cat: ms}, "top": [[name, category, ms, count], ...], "lines"}``.
    Reads the device planes' "XLA Ops" lines (one event per executed HLO op), or, where a trace has
    none (jax 0.11's GPU traces), the kernels on their "Stream" lines; empty without device planes
    (the CPU). ``lines`` names the trace lines that were found."""
    import glob
    import os
    from collections import defaultdict

    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return {"total_ms": 0.0, "by_category": {}, "top": [], "note": f"no xplane.pb under {trace_dir}"}
    pd = ProfileData.from_file(files[-1])
    per_op: dict = defaultdict(lambda: [0.0, 0, ""])
    seen = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = list(plane.lines)
        seen += [f"{plane.name}:{line.name}" for line in lines]
        ops = [line for line in lines if "xla ops" in line.name.lower()]
        # without an "XLA Ops" line (older / other profilers): the kernels on the streams
        ops = ops or [line for line in lines if line.name.lower().startswith("stream")]
        for line in ops:
            for ev in line.events:
                text = ""
                for k, v in ev.stats:
                    if k in ("long_name", "hlo_category", "tf_op"):
                        text += f" {v}"
                r = per_op[ev.name]
                r[0] += ev.duration_ns / 1e6
                r[1] += 1
                r[2] = r[2] or text[:300]
    by_cat: dict = defaultdict(float)
    rows = []
    for name, (ms, count, text) in per_op.items():
        cat = _op_category(name, text)
        by_cat[cat] += ms
        rows.append([name, cat, ms, count])
    rows.sort(key=lambda r: -r[2])
    return {"total_ms": sum(by_cat.values()), "by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top": rows[:top], "lines": seen[:40]}


def hlo_op_names(hlo_text: str, names) -> dict[str, str]:
    """``{instruction name: its op_name metadata}`` for the given names (e.g. the fusions of a
    :func:`device_op_times` list, whose kernels carry their HLO instruction's name) in an optimized
    HLO module's text (``compiled.as_text()``). The op_name is the JAX path of the instruction's root
    op, with the model's ``jax.named_scope`` names in it; names not found are left out. A profile's
    kernel names spell the HLO's ``fusion.559`` as ``fusion_559``: both match."""
    import re

    want, out = set(names), {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if not m:
            continue
        name = next((n for n in (m.group(1), m.group(1).replace(".", "_")) if n in want and n not in out), None)
        if name is None:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        out[name] = op.group(1) if op else ""
    return out
