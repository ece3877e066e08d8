"""The pipeline and CLI end to end on tiny inputs: outputs, report, resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.cli import main as cli_main
from backend.errors import InputError, JobCancelled
from backend.pipeline import run_job, validate_job

REPO = Path(__file__).resolve().parents[1]

TINY_STATIC = [
    "stage1.iters=120",
    "stage1.num_gaussians=600",
    "stage1.reference_size=64",
    "stage1.placement_iters=40",
    "stage1.placement_max_side=96",
    "stage1.densify.interval=40",
    "crop_size=64",
]
TINY_MOTION = [
    "stage2.steps_per_frame=2",
    "stage2.frames_per_step=3",
    "stage2.placement_iters=10",
    "stage2.joint_iters=4",
    "stage2.knn=4",
    "stage2.deformation.spatial_resolutions=[16]",
    "stage2.deformation.plane_channels=8",
    "stage3.render_long_side=96",
    "stage3.track_grid=8",
]


def spec_for(video, stages="static", extra=()):
    return {
        "input": {"kind": "reference", "root": str(video.root), "video": video.name},
        "preset": "cpu-demo",
        "overrides": TINY_STATIC + list(extra),
        "stages": stages,
        "device": "cpu",
        "guidance": "none",
    }


@pytest.mark.slow
def test_stage1_lifts_both_objects_and_writes_outputs(tiny_video, tmp_path):
    video = tiny_video()
    events = []
    report = run_job(spec_for(video), tmp_path / "out", on_event=events.append)
    out = tmp_path / "out"
    assert report["status"] == "done"
    saved = json.loads((out / "report.json").read_text())
    assert saved["status"] == "done" and saved["guidance"] == "none" and saved["device"] == "cpu"
    for oid in ("001", "002"):
        static = saved["objects"][oid]["static"]
        assert static["psnr"] > 18.0, static  # a flat-coloured disc/square at 64 px
        assert static["iou"] > 0.75, static
        assert (out / "static" / f"{oid}.ply").stat().st_size > 1000
        assert (out / "checkpoints" / oid / "static.pt").is_file()
        preview = Image.open(out / "previews" / f"{oid}_static.png")
        assert preview.size[0] == 8 * preview.size[1]
    assert (out / "config.yaml").is_file()
    kinds = {e["type"] for e in events}
    assert {"progress", "stage_done", "log"} <= kinds
    assert any("unconstrained" in e.get("message", "") for e in events)
    progress = [e for e in events if e["type"] == "progress"]
    assert all({"step", "total", "eta_s", "losses"} <= set(e) for e in progress)

    # A rerun on the same folder skips the finished stage and says so.
    events.clear()
    run_job(spec_for(video), out, on_event=events.append)
    assert any("already finished, skipping" in e.get("message", "") for e in events)
    assert not [e for e in events if e["type"] == "progress"]


def test_cancel_stops_at_a_step_boundary(tiny_video, tmp_path):
    video = tiny_video()
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(JobCancelled):
        run_job(spec_for(video), tmp_path / "out", should_stop=should_stop)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "cancelled"
    assert not (tmp_path / "out" / "checkpoints" / "001" / "static.pt").exists()


def _break(video, how):
    frames = video.frames_dir
    masks = video.masks_dir
    if how == "missing_mask":
        (masks / "002" / f"{video.frame_names[2]}.png").unlink()
        return f"{video.frame_names[2]}"
    if how == "corrupt_frame":
        (frames / f"{video.frame_names[1]}.png").write_bytes(b"not a png at all")
        return f"{video.frame_names[1]}.png"
    if how == "empty_first_mask":
        Image.fromarray(np.zeros((video.height, video.width), np.uint8)).save(
            masks / "001" / f"{video.frame_names[0]}.png"
        )
        return "001"
    if how == "bad_name":
        (frames / f"{video.frame_names[0]}.png").rename(frames / "frame_a.png")
        return "frame_a.png"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_mask", "corrupt_frame", "empty_first_mask", "bad_name"])
def test_bad_input_fails_before_any_work_with_named_file(tiny_video, tmp_path, how):
    video = tiny_video()
    fragment = _break(video, how)
    with pytest.raises(InputError, match=fragment):
        validate_job(spec_for(video))
    with pytest.raises(InputError, match=fragment):
        run_job(spec_for(video), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "failed" and fragment in report["error"]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_cli_exit_code_and_message_on_bad_input(tiny_video, tmp_path, capsys):
    video = tiny_video()
    fragment = _break(video, "missing_mask")
    code = cli_main(
        [
            "run",
            "--data",
            str(video.root),
            "--video",
            video.name,
            "--out",
            str(tmp_path / "o"),
            "--preset",
            "cpu-demo",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "stage1.itres=3"], "stage1.itres"),
        (["--preset", "huge"], "huge"),
        (["--stages", "static,dance"], "dance"),
        (["--guidance", "/nonexistent/zero123"], "/nonexistent/zero123"),
    ],
)
def test_cli_rejects_bad_settings(tiny_video, tmp_path, capsys, args, fragment):
    video = tiny_video()
    base = [
        "run",
        "--data",
        str(video.root),
        "--video",
        video.name,
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    ]
    assert cli_main(base + args) == 2
    assert fragment in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "report.json").read_text())["status"] == "failed"


def test_cli_rejects_missing_input(tmp_path, capsys):
    assert cli_main(["run", "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "backend", "run", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0 and "--preset" in proc.stdout


@pytest.mark.slow
def test_full_run_static_motion_compose_and_resume(tiny_video, tmp_path):
    video = tiny_video(num_frames=4)
    out = tmp_path / "out"
    spec = spec_for(video, "static,motion,compose", TINY_MOTION)
    # Stop during stage 2: the stage-1 checkpoints stay and the rerun starts from them.
    calls = {"n": 0}

    def stop_in_motion():
        if (out / "checkpoints" / "002" / "static.pt").exists():
            calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(JobCancelled, match="stage 2"):
        run_job(spec, out, should_stop=stop_in_motion)
    events = []
    report = run_job(spec, out, on_event=events.append)
    assert sum("stage 1 already finished" in e.get("message", "") for e in events) == 2
    assert report["status"] == "done"
    for oid in ("001", "002"):
        motion = report["objects"][oid]["motion"]
        assert len(motion["per_frame"]) == 4 and motion["iou"] > 0.5
    assert (
        torch.load(out / "checkpoints" / "001" / "motion.pt", weights_only=False)["baked"]["means"].shape[0]
        == 4
    )
    assert (out / "scene.json").is_file()
