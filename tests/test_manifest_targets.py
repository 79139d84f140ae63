"""Manifest validation, the teacher-target store (writer / reader / corruption) and the pure helpers of
wanjax.distill.targets (no models here)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wanjax.data.manifest import ManifestError, load_manifest, parse_manifest, read_row
from wanjax.data.targets import TargetError, TargetReader, TargetWriter, merge_index, read_index

H = W = 32


def _write_frames(d: Path, n: int, seed: int = 0, ref_pose: bool = False) -> Path:
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), np.uint8)).save(d / f"{i}.png")
    if ref_pose:
        Image.fromarray(np.full((48, 40, 3), 77, np.uint8)).save(d / "pose.png")
    return d


def _write_manifest(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.fixture
def data(tmp_path):
    _write_frames(tmp_path / "p0", 9, 0, ref_pose=True)
    _write_frames(tmp_path / "p1", 5, 1)
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "ref.png")
    return tmp_path


def test_manifest_structure_errors_name_line_and_field(data):
    good = {"id": "a", "ref": "ref.png", "pose": "p0", "prompt": "x"}
    cases = [
        (['{"id": "a", "ref": '], r":1: not valid JSON"),
        ([good, "", "[1, 2]"], r":3: expected a JSON object"),
        ([good, {"id": "b", "ref": "ref.png", "pose": "p0"}], r":2: missing required field 'prompt'"),
        ([good, {**good, "id": "b", "promt": "y"}], r":2: unknown field 'promt'"),
        ([good, {**good, "id": "b", "seed": -1}], r":2: field 'seed'"),
        ([good, {**good, "id": "b/c"}], r":2: field 'id'"),
        ([good, {**good, "ref": 3, "id": "b"}], r":2: field 'ref' must be a string"),
        ([good, good], r":2: field 'id' = 'a' repeats line 1"),
        ([""], r"no rows"),
    ]
    for lines, pattern in cases:
        m = _write_manifest(data / "m.jsonl", lines)
        with pytest.raises(ManifestError, match=pattern):
            parse_manifest(m)
    # blank lines are not rows but line numbers still count them
    m = _write_manifest(data / "m.jsonl", ["", good, {**good, "id": "b", "seed": 7, "ref_pose": "ref.png"}])
    rows = parse_manifest(m)
    assert [(r.index, r.line, r.id, r.seed) for r in rows] == [(0, 2, "a", None), (1, 3, "b", 7)]
    assert rows[0].ref == data.resolve() / "ref.png" and rows[1].ref_pose == data.resolve() / "ref.png"
    assert dict(rows[0].raw) == {"ref": "ref.png", "pose": "p0"}


def test_manifest_missing_file_skip_vs_stop(data, caplog):
    m = _write_manifest(data / "m.jsonl", [
        {"id": "a", "ref": "ref.png", "pose": "p0", "prompt": "x"},
        {"id": "b", "ref": "ref.png", "pose": "nope.mp4", "prompt": "x"},
        {"id": "c", "ref": str(data / "ref.png"), "pose": "p1", "prompt": "x"},
    ])
    with pytest.raises(ManifestError,
                       match=r"m.jsonl:2 \(id 'b'\): field 'pose': .*nope.mp4 does not exist.*on_bad_row=skip"):
        load_manifest(m, on_bad_row="stop")
    with caplog.at_level(logging.WARNING, logger="wanjax.data.manifest"):
        man = load_manifest(m, on_bad_row="skip")
    assert [r.id for r in man.rows] == ["a", "c"] and [r.index for r in man.rows] == [0, 2]
    assert man.num_rows == 3 and man.skipped[0][0].id == "b"
    assert "skipping" in caplog.text and "nope.mp4" in caplog.text
    with pytest.raises(ManifestError, match="on_bad_row='maybe'"):
        load_manifest(m, on_bad_row="maybe")


def test_read_row_sources_and_unreadable_inputs(data):
    from wanjax.pose import PoseSequence, save_keypoints
    from wanjax.pose.keypoints import invisible_hands

    body = np.zeros((6, 20, 3), np.float32)
    body[..., 0], body[..., 1], body[..., 2] = 0.5, np.linspace(0.1, 0.9, 20), 1.0
    save_keypoints(data / "kp.json", PoseSequence(body, invisible_hands(6), 64, 64))
    (data / "bad.mp4").write_bytes(b"not a video")
    m = _write_manifest(data / "m.jsonl", [
        {"id": "a", "ref": "ref.png", "pose": "p0", "prompt": "x"},
        {"id": "b", "ref": "ref.png", "pose": "kp.json", "prompt": "x", "ref_pose": "kp.json"},
        {"id": "c", "ref": "ref.png", "pose": "p1", "prompt": "x"},
        {"id": "d", "ref": "ref.png", "pose": "bad.mp4", "prompt": "x"},
    ])
    a, b, c, d = parse_manifest(m)
    ra = read_row(a, H, W, 5)
    assert ra.ref.shape == (H, W, 3) and ra.pose.shape == (5, H, W, 3) and ra.pose.dtype == np.uint8
    assert ra.ref_pose_source == "pose.jpg" and np.allclose(ra.ref_pose, 77 / 255.0)
    rb = read_row(b, H, W, 5)
    assert rb.ref_pose_source == "ref_pose" and rb.pose.max() > 0
    np.testing.assert_array_equal(rb.ref_pose, rb.pose[0] / np.float32(255.0))
    rc = read_row(c, H, W, 5)
    assert rc.ref_pose_source == "first_pose_frame"
    with pytest.raises(ManifestError, match=r"m.jsonl:3 \(id 'c'\), field 'pose'.*5 pose frames but --num_frames=9"):
        read_row(c, H, W, 9)
    assert read_row(c, H, W, 9, pad_last=True).pose.shape[0] == 9
    with pytest.raises(ManifestError, match=r"m.jsonl:4 \(id 'd'\), field 'pose'.*unreadable video"):
        read_row(d, H, W, 5)


def _sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"x0": rng.normal(size=(3, 4, 4, 16)).astype(np.float32),
            "pose": rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8),
            "traj_sigmas": np.array([1.0, 0.5], np.float32)}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_writer_reader_round_trip_resume_and_hosts(tmp_path):
    out = tmp_path / "t"
    with TargetWriter(out) as w:
        assert w.done_ids() == set()
        for i in range(3):
            w.add(f"s{i}", _sample(i), {"prompt": "p", "seed": np.int64(i)})
        w.flush(shard=4)
        w.add("s3", _sample(3), {"prompt": "q"})
        with pytest.raises(TargetError, match="already written"):
            w.add("s0", _sample(0), {})
        with pytest.raises(TargetError, match="already written and indexed"):
            w.flush(shard=4)
        w.flush(shard=5)
        w.flush(shard=6)  # an empty shard: a group whose rows were all skipped
    assert sorted(p.name for p in out.iterdir()) == ["index-p00000.json", "index.json", "shard-00004.safetensors",
                                                    "shard-00005.safetensors", "shard-00006.safetensors"]
    r = TargetReader(out)
    assert len(r) == 4 and r.ids == ["s0", "s1", "s2", "s3"]
    for i in range(4):
        got, want = r[i], _sample(i)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])
    assert r.meta("s1") == {"prompt": "p", "seed": 1} and r.shard_path("s3").name == "shard-00005.safetensors"
    assert r.index["shards"]["shard-00006.safetensors"]["ids"] == []
    # resume: a new writer sees everything as done; dropping an unflushed buffer writes nothing
    w2 = TargetWriter(out)
    assert w2.done_ids() == {"s0", "s1", "s2", "s3"} and "shard-00005.safetensors" in w2.done_shards()
    w2.add("s9", _sample(9), {})
    w2.abort()
    assert not (out / "shard-00000.safetensors").exists() and len(TargetReader(out)) == 4
    # two hosts: automatic shard numbers are disjoint, per-host indexes are merged by the reader
    hosts = tmp_path / "h"
    w0, w1 = TargetWriter(hosts, process_index=0, process_count=2), TargetWriter(hosts, process_index=1,
                                                                                process_count=2)
    for j in range(2):
        w0.add(f"a{j}", _sample(j), {})
        w0.flush()
        w1.add(f"b{j}", _sample(10 + j), {})
        w1.flush()
    w0.close()
    w1.close()
    assert sorted(p.name for p in hosts.glob("shard-*")) == [f"shard-{n:05d}.safetensors" for n in range(4)]
    assert not (hosts / "index.json").exists()  # multi-host: process 0 merges after a barrier
    assert TargetReader(hosts).ids == ["a0", "b0", "a1", "b1"]
    merge_index(hosts)
    assert set(json.loads((hosts / "index.json").read_text())["samples"]) == {"a0", "a1", "b0", "b1"}
    np.testing.assert_array_equal(TargetReader(hosts).get("b1")["x0"], _sample(11)["x0"])
    # the same shard name from two hosts is caught when indexes are merged
    bad = json.loads((hosts / "index-p00001.json").read_text())
    bad["shards"]["shard-00000.safetensors"] = bad["shards"]["shard-00001.safetensors"]
    (hosts / "index-p00001.json").write_text(json.dumps(bad))
    with pytest.raises(TargetError, match="shard-00000.safetensors disagrees"):
        read_index(hosts)


def test_writer_is_atomic_and_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        w = TargetWriter(out)
        if out == b:  # leftovers of a killed write are removed and never indexed
            (out / ".shard-00000.safetensors.p00000.tmp").write_bytes(b"partial")
            w = TargetWriter(out)
        for i in range(2):
            w.add(f"s{i}", _sample(i), {"z": 1, "a": [1, 2]})
        w.flush(shard=0)
        w.close()
    assert _files(a) == _files(b)


def test_corrupt_or_truncated_shard_raises_target_error(tmp_path):
    out = tmp_path / "t"
    with TargetWriter(out) as w:
        for i in range(2):
            w.add(f"s{i}", _sample(i), {})
        w.flush(shard=0)
    shard = out / "shard-00000.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-100])  # truncated
    with pytest.raises(TargetError, match=r"shard-00000.safetensors: sample 's1'.*truncated"):
        TargetReader(out).get("s1")
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # a bit flip in s?/x0 or pose data: same size, caught by CRC-32
    shard.write_bytes(bytes(flipped))
    r = TargetReader(out)
    errs = []
    for sid in r.ids:
        try:
            r.get(sid)
        except TargetError as e:
            errs.append(str(e))
    assert len(errs) == 1 and "shard-00000.safetensors" in errs[0] and "CRC-32" in errs[0]
    assert all(TargetReader(out, verify=False).get(s) for s in r.ids)  # no CRC check: reads the flipped data
    garbage = bytearray(good)
    garbage[8:40] = b"x" * 32  # broken JSON header
    shard.write_bytes(bytes(garbage))
    with pytest.raises(TargetError, match=r"shard-00000.safetensors: sample 's0': corrupt shard"):
        TargetReader(out)[0]
    shard.unlink()
    with pytest.raises(TargetError, match=r"shard-00000.safetensors: sample 's0': the shard file is missing"):
        TargetReader(out)[0]
    (out / "index-p00000.json").write_text("{oops")
    with pytest.raises(TargetError, match="index-p00000.json: unreadable target index"):
        TargetReader(out)


def test_trajectory_plan_seeds_and_groups():
    from wanjax import sampling
    from wanjax.data.manifest import ManifestRow
    from wanjax.distill.targets import (host_groups, row_groups, sample_seed, teacher_schedule,
                                        trajectory_plan)

    _, st_sig = sampling.student_schedule(5.0)
    sig, ts = teacher_schedule("euler", 50, 5.0)
    assert sig.shape == (51,) and ts.shape == (50,) and sig[0] == 1.0
    p = trajectory_plan("euler", sig, st_sig)
    np.testing.assert_array_equal(p.sigmas, st_sig)  # exact: interpolation on the Euler path
    assert p.mode == "exact_sigma" and p.steps[0] == 0
    for k, s in zip(p.steps, st_sig):
        assert sig[k] >= s > sig[k + 1]
    assert trajectory_plan("euler", *teacher_schedule("euler", 48, 5.0)[:1], st_sig).steps == (0, 12, 24, 36)
    usig, _ = teacher_schedule("unipc", 50, 5.0)
    q = trajectory_plan("unipc", usig, st_sig)
    assert q.mode == "nearest_step" and all(np.abs(usig[:50] - s).min() == abs(usig[k] - s)
                                            for k, s in zip(q.steps, st_sig))
    np.testing.assert_array_equal(q.sigmas, usig[list(q.steps)])
    assert sample_seed("a") == sample_seed("a") != sample_seed("b") and sample_seed("a", 1) != sample_seed("a")
    assert 0 <= sample_seed("x") < 2 ** 31
    rows = [ManifestRow(index=i, line=i + 1, id=str(i), ref=Path("r"), pose=Path("p"), prompt="")
            for i in (0, 1, 3, 4, 6)]  # rows 2 and 5 skipped
    groups = row_groups(rows, 7, 3)
    assert [[r.index for r in g] for g in groups] == [[0, 1], [3, 4], [6]]
    assert host_groups(5, 1, 2) == [1, 3] and host_groups(5, 0, 1) == [0, 1, 2, 3, 4]


def test_trajectory_recorder_exact_euler_path_and_unipc_nearest_state():
    import jax.numpy as jnp

    from wanjax import sampling
    from wanjax.distill.targets import TrajectoryRecorder, teacher_schedule, trajectory_plan

    _, st_sig = sampling.student_schedule(5.0)
    rng = np.random.default_rng(0)
    x0, eps = (jnp.asarray(rng.normal(size=(2, 3)), jnp.float32) for _ in range(2))
    sig, ts = teacher_schedule("euler", 7, 3.0)  # a grid that hits none of the student sigmas but 1
    plan = trajectory_plan("euler", sig, st_sig)
    assert not set(st_sig[1:]) & set(sig)
    # constant flow: the Euler path is the straight line (1 - s) x0 + s eps, at every s
    rec = TrajectoryRecorder(plan, sig)
    steps = []
    out = sampling.sample_euler(rec.wrap(lambda x, t: eps - x0, lambda k, n: steps.append((k, n))), eps, sig, ts)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-6)
    want = np.stack([(1 - s) * np.asarray(x0) + s * np.asarray(eps) for s in st_sig])
    np.testing.assert_allclose(np.asarray(rec.stack()), want, atol=1e-6)
    assert steps == [(k, 7) for k in range(1, 8)]
    # state-dependent flow: traj[j] = x_k + v_k (s_j - sigma_k) on the piecewise-linear Euler path
    f = lambda x: 0.3 * x + x0  # noqa: E731
    rec = TrajectoryRecorder(plan, sig)
    sampling.sample_euler(rec.wrap(lambda x, t: f(x)), eps, sig, ts)
    x, path = eps, []
    for k in range(7):
        path.append((x, f(x)))
        x = x + f(x) * (sig[k + 1] - sig[k])
    for j, (k, s) in enumerate(zip(plan.steps, st_sig)):
        xk, vk = path[k]
        np.testing.assert_allclose(np.asarray(rec.stack()[j]), np.asarray(xk + vk * (s - sig[k])), atol=1e-6)
    # UniPC: the latent the teacher was evaluated at, at the nearest step
    usig, uts = teacher_schedule("unipc", 6, 5.0)
    uplan = trajectory_plan("unipc", usig, st_sig)
    seen = []
    rec = TrajectoryRecorder(uplan, usig)
    sampling.sample_unipc(rec.wrap(lambda x, t: (seen.append(x), 0.5 * x)[1]), eps, usig, uts)
    for j, k in enumerate(uplan.steps):
        np.testing.assert_array_equal(np.asarray(rec.stack()[j]), np.asarray(seen[k]))
    with pytest.raises(RuntimeError, match="were not recorded"):
        TrajectoryRecorder(uplan, usig).stack()


def test_text_contexts_encode_each_prompt_once(monkeypatch, tmp_path):
    import types

    import jax.numpy as jnp

    from configs.teacher import get_config
    from wanjax.distill.targets import text_contexts
    from wanjax.pipeline import PipelineError

    calls = []

    class FakeT5:  # rows [0, len(prompt)) non-zero, zero padding after, as TextEncoder.encode
        cfg = types.SimpleNamespace(dim=4)

        def encode(self, prompts):
            calls.append(list(prompts))
            out = np.zeros((len(prompts), 8, 4), np.float32)
            for i, p in enumerate(prompts):
                out[i, :min(len(p), 8)] = ord(p[0])
            return jnp.asarray(out)

    monkeypatch.setattr("wanjax.text.load_text_encoder", lambda *a, **k: FakeT5())
    cfg = get_config("tiny")
    cfg.ckpt_dir = str(tmp_path)
    ctx, neg = text_contexts(cfg, ["a", "bb", "a", "ccc"], 8, 4, need_negative=True, chunk=2)
    assert calls == [["a", "bb"], ["ccc"], [cfg.negative_prompt]]
    assert {p: c.shape for p, c in ctx.items()} == {"a": (1, 4), "bb": (2, 4), "ccc": (3, 4)}
    assert neg.shape == (8, 4) and (ctx["bb"] == ord("b")).all()
    cfg.prompt_embeds_path = str(tmp_path / "text.npz")
    np.savez(cfg.prompt_embeds_path, prompt=np.ones((3, 4), np.float32))
    ctx, neg = text_contexts(cfg, ["a", "a"], 8, 4, need_negative=True)
    assert ctx["a"].shape == (3, 4) and neg.shape == (8, 4) and not neg.any()
    with pytest.raises(PipelineError, match=r"text.npz holds one prompt embedding but the manifest rows have 2"):
        text_contexts(cfg, ["a", "b"], 8, 4, need_negative=False)
