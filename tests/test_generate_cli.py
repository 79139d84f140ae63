"""infer.generate / infer.stream end to end on tiny random checkpoints: mp4 + sidecar, and bad inputs
that must fail with a clear error and leave no mp4 behind."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_pipeline import make_tiny_ckpt, pose_frames, ref_image


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_tiny_ckpt(d / "teacher", teacher=True)
    make_tiny_ckpt(d / "student", teacher=False)
    Image.fromarray(ref_image()).save(d / "ref.png")
    pose_dir = d / "pose"
    pose_dir.mkdir()
    for i, f in enumerate(pose_frames(21)):
        Image.fromarray(f).save(pose_dir / f"{i}.png")
    Image.fromarray(pose_frames(1, 9)[0]).save(pose_dir / "pose.png")
    return d


def _args(world, preset, out, *extra):
    root = world / ("student" if preset == "tiny_student" else "teacher")
    return ["--config", f"configs/infer.py:{preset}", f"--config.ckpt_dir={root}",
            f"--config.prompt_embeds_path={root / 'text.npz'}", "--ref", str(world / "ref.png"),
            "--pose", str(world / "pose"), "--out", str(out), "--no_progress", *extra]


def _count(mp4) -> int:
    import imageio.v2 as imageio

    r = imageio.get_reader(str(mp4), format="FFMPEG")
    try:
        return sum(1 for _ in r)
    finally:
        r.close()


def _no_video(out: Path):
    assert not out.exists()
    assert not out.with_name(out.stem + ".partial.mp4").exists()
    assert not out.with_name(out.stem + ".json").exists()


@pytest.mark.parametrize("preset,num_frames", [("tiny", 9), ("tiny_student", 21)])
def test_generate_writes_mp4_and_sidecar(world, tmp_path, preset, num_frames):
    from infer.generate import main

    out = tmp_path / "sub" / "out.mp4"
    assert main(_args(world, preset, out, "--num_frames", str(num_frames), "--seed", "4",
                      "--config.sampler.steps=2")) == 0
    assert _count(out) == num_frames == 1 + 4 * ((num_frames - 1) // 4)
    side = json.loads(out.with_name("out.json").read_text())
    assert side["frame_count"] == num_frames and side["seed"] == 4
    assert side["config"]["preset"] == preset and side["config"]["sampler"]["steps"] == 2
    assert side["first_frame_latency_s"] > 0 and side["peak_memory_bytes"] > 0
    n_blocks = (num_frames - 1) // 4 // 3 + 1
    assert len(side["block_timings"]) == n_blocks
    assert [t["frames"] for t in side["block_timings"]] == [9] + [12] * (n_blocks - 1)


def test_stream_cli_reads_growing_folder(world, tmp_path, capsys):
    from infer.stream import main

    import shutil
    import threading
    import time

    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(world / "pose" / "pose.png", live / "pose.png")

    def writer():  # frames appear one by one while the generator is already running
        for i in range(21):
            time.sleep(0.05)
            shutil.copy(world / "pose" / f"{i}.png", live / f"{i}.png")
        (live / "END").write_text("")

    th = threading.Thread(target=writer)
    th.start()
    out = tmp_path / "s.mp4"
    args = _args(world, "tiny_student", out, "--num_frames", "0", "--config.stream.timeout_s=20")
    args[args.index("--pose") + 1] = str(live)
    args += ["--config.model.local_attn_size=9", "--config.model.sink_size=3"]
    rc = main(args)
    th.join()
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "block 0: 9 frames, latency" in printed and "block 1: 12 frames" in printed
    assert _count(out) == 21


@pytest.mark.parametrize("case", ["bad_image", "short_pose", "unknown_preset", "wrong_ckpt", "bad_override"])
def test_bad_inputs_fail_cleanly(world, tmp_path, capsys, case):
    from infer.generate import main

    out = tmp_path / "bad.mp4"
    args = _args(world, "tiny_student", out, "--num_frames", "21")
    expect = {"bad_image": "--ref", "short_pose": "21 pose frames but --num_frames=33",
              "unknown_preset": "unknown inference preset 'nope'",
              "wrong_ckpt": "does not match preset 'tiny_student'", "bad_override": "unknown field 'nope'"}[case]
    if case == "bad_image":
        junk = tmp_path / "junk.png"
        junk.write_bytes(b"this is not a png")
        args[args.index("--ref") + 1] = str(junk)
    elif case == "short_pose":
        args[args.index("--num_frames") + 1] = "33"
    elif case == "unknown_preset":
        args[1] = "configs/infer.py:nope"
    elif case == "wrong_ckpt":
        args += ["--config.model.expect={'dim': 1536, 'num_layers': 30}"]
    else:
        args += ["--config.sampler.nope=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expect in err, err
    _no_video(out)


def test_failure_during_generation_leaves_no_mp4(world, tmp_path, monkeypatch):
    """An exception after frames were written (here in the second block) deletes the partial mp4."""
    from infer.generate import main
    from wanjax.pipeline import student

    real = student.StudentPipeline.stream

    def failing(self, *a, **k):
        for i, r in enumerate(real(self, *a, **k)):
            if i == 1:
                raise RuntimeError("device lost")
            yield r

    monkeypatch.setattr(student.StudentPipeline, "stream", failing)
    out = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError, match="device lost"):
        main(_args(world, "tiny_student", out, "--num_frames", "21"))
    _no_video(out)
