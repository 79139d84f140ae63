"""A real multi-process run of ``python -m train.generate_teacher`` on the CPU: two processes (two
devices each) joined by ``jax.distributed.initialize``, each loading the tiny teacher on its own
host-local mesh and generating its own groups of the manifest, then meeting once at the end for the
merged index. The output directory must equal a one-process run with the same per-host mesh and batch
byte for byte (every shard and ``index.json``): each batch of samples goes through the same compiled
program on the same inputs whichever process runs it, so no tolerance is needed.

The loads must not meet the other process anywhere: before the fix Orbax restored the encoders onto
global device 0 and met every process at a barrier after each restore, which hung as soon as the hosts'
loads differed (process 1 cannot place arrays on process 0's device; a host with nothing to generate
loads nothing). The second run here gives host 1 no group at all while host 0 loads and generates.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_multihost import _env, _free_port
from tests.test_generate_teacher import _frames_dir, teacher_inputs
from tests.test_pipeline import pose_frames

REPO = Path(__file__).resolve().parents[1]
NUM_FRAMES = 9
TIMEOUT = 240  # seconds per launch; a hang is reported with every process's stacks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny teacher + a 5-row manifest (groups of 2 rows: [s0 s1] [s2 s3] [s4]) and its first 2 rows."""
    root = tmp_path_factory.mktemp("mh_teacher")
    ckpt, data = teacher_inputs(root)
    rows = [{"id": f"s{i}", "ref": "ref.png" if i % 2 == 0 else "ref2.png",
             "pose": _frames_dir(data / f"p{i}", pose_frames(NUM_FRAMES, seed=i)), "prompt": "dance"}
            for i in range(5)]
    lines = [json.dumps(r) + "\n" for r in rows]
    (data / "m.jsonl").write_text("".join(lines))
    (data / "m2.jsonl").write_text("".join(lines[:2]))
    return {"root": root, "ckpt": ckpt, "data": data}


def _cmd(world, manifest: str, out: Path, *extra: str) -> list[str]:
    # -X faulthandler: SIGABRT on a timeout prints where every thread of the process waits
    return [sys.executable, "-X", "faulthandler", "-m", "train.generate_teacher",
            "--config", "configs/teacher.py:tiny", f"--config.ckpt_dir={world['ckpt']}",
            f"--config.prompt_embeds_path={world['ckpt'] / 'text.npz'}",
            f"--config.data.manifest={world['data'] / manifest}", f"--config.out_dir={out}",
            "--config.data.rows_per_shard=2", "--config.batch_size=2", "--config.mesh.data=1",
            "--config.mesh.fsdp=2", "--config.progress=false", *extra]


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            stacks = []
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGABRT)
                try:
                    stacks.append(q.communicate(timeout=30)[0])
                except subprocess.TimeoutExpired:
                    q.kill()
                    stacks.append(q.communicate()[0])
            pytest.fail("generate_teacher hung; output of each process:\n" +
                        "\n".join(f"--- process {i}\n{s[-6000:]}" for i, s in enumerate(stacks)))
    return outs


def _launch(world, manifest: str, out: Path) -> tuple[list[subprocess.Popen], list[str]]:
    """Two processes of one jax.distributed job; their return codes and outputs."""
    port = _free_port()
    procs = [subprocess.Popen(_cmd(world, manifest, out, f"--config.distributed.coordinator_address=localhost:{port}",
                                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                              cwd=REPO, env=_env(2, first=2 * i), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    return procs, _wait(procs)


def _two_processes(world, manifest: str, out: Path) -> list[str]:
    procs, outs = _launch(world, manifest, out)
    for i, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{o[-4000:]}"
        assert f"process {i} of 2, 4 devices" in o, o[-2000:]
    return outs


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_two_processes_write_what_one_process_writes(world):
    from wanjax.data.targets import TargetReader

    root = world["root"]
    single = subprocess.run(_cmd(world, "m.jsonl", root / "single"), cwd=REPO, env=_env(2), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-4000:]

    # host 0: groups 0 and 2 (s0 s1, then s4 in a padded batch); host 1: group 1 (s2 s3)
    outs = _two_processes(world, "m.jsonl", root / "multi")
    assert "host 0/2: 0 of its 2 shards already written, 2 to generate" in outs[0]
    assert "host 1/2: 0 of its 1 shards already written, 1 to generate" in outs[1]
    a, b = _files(root / "single"), _files(root / "multi")
    assert sorted(b) == ["index-p00000.json", "index-p00001.json", "index.json", "shard-00000.safetensors",
                         "shard-00001.safetensors", "shard-00002.safetensors"]
    for name in ["index.json"] + [n for n in a if n.startswith("shard-")]:
        assert a[name] == b[name], name  # same samples, metadata and arrays, byte for byte
    ra, rb = TargetReader(root / "single"), TargetReader(root / "multi")
    assert ra.ids == rb.ids == ["s0", "s1", "s2", "s3", "s4"]
    for sid in ra.ids:
        da, db = ra.get(sid), rb.get(sid)
        assert sorted(da) == sorted(db) and all(np.array_equal(da[k], db[k]) for k in da), sid
        assert ra.meta(sid) == rb.meta(sid)
    assert not np.array_equal(ra.get("s0")["x0"], ra.get("s1")["x0"])

    # a finished directory: both hosts have nothing to do and only meet at the end; nothing is rewritten
    outs = _two_processes(world, "m.jsonl", root / "multi")
    assert all("0 new samples" in o for o in outs)
    assert _files(root / "multi") == b

    # one group in all: host 0 loads the teacher and generates it, host 1 loads nothing and waits at the end
    outs = _two_processes(world, "m2.jsonl", root / "one_group")
    assert "host 1/2: 0 of its 0 shards already written, 0 to generate" in outs[1]
    c = _files(root / "one_group")
    assert sorted(c) == ["index-p00000.json", "index.json", "shard-00000.safetensors"]
    assert c["shard-00000.safetensors"] == a["shard-00000.safetensors"]
    assert TargetReader(root / "one_group").ids == ["s0", "s1"]


def test_a_failing_host_stops_the_others_with_an_error_naming_it(world):
    """Host 1's group holds a row whose pose frame is corrupt (on_bad_row=stop): host 1 raises while
    reading it; host 0 finishes its own groups and, instead of waiting at the final barrier until the
    coordination timeout, raises an error naming host 1 and its cause. Host 0's shards are written,
    the merged index is not (the run is incomplete), and both processes exit non-zero."""
    import time

    root, data = world["root"], world["data"]
    bad = data / "p_bad"
    bad.mkdir(exist_ok=True)
    for f in sorted((data / "p2").iterdir()):
        (bad / f.name).write_bytes(f.read_bytes())
    first = sorted(bad.iterdir())[0]
    first.write_bytes(b"not a png")
    rows = [json.loads(line) for line in (data / "m.jsonl").read_text().splitlines()]
    rows[2]["pose"] = str(bad)  # s2: group 1, host 1's
    (data / "m_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "failing"
    t0 = time.monotonic()
    procs, outs = _launch(world, "m_bad.jsonl", out)  # a hang fails inside, after TIMEOUT, with stacks
    assert time.monotonic() - t0 < TIMEOUT
    assert procs[0].returncode != 0 and procs[1].returncode != 0, outs
    assert first.name in outs[1], outs[1][-3000:]
    assert "host(s) 1 of 2 failed" in outs[0] and first.name in outs[0], outs[0][-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert "shard-00000.safetensors" in files and "shard-00002.safetensors" in files, files
    assert "shard-00001.safetensors" not in files and "index.json" not in files, files
