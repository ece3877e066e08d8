"""Jobs on a local Ray cluster with declared (logical) GPUs and device cpu: per-object tasks, two
videos at once through the job queue, a worker killed mid-stage, and Ray staying optional."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.distributed import ATTEMPTS_DIR, STOP_FILE
from backend.errors import JobCancelled
from backend.jobs import OUT_DIR, JobManager, JobStore
from backend.pipeline import checkpoint_path, run_job, validate_job

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]

# Small enough for two loaded cores; the point here is where the work runs, not its quality.
MICRO = [
    "stage1.iters=12",
    "stage1.num_gaussians=150",
    "stage1.reference_size=32",
    "stage1.placement_iters=4",
    "stage1.placement_max_side=48",
    "stage1.densify.interval=40",
    "crop_size=32",
    "stage2.steps_per_frame=1",
    "stage2.frames_per_step=2",
    "stage2.placement_iters=2",
    "stage2.joint_iters=2",
    "stage2.knn=4",
    "stage2.deformation.spatial_resolutions=[8]",
    "stage2.deformation.plane_channels=4",
    "stage3.render_long_side=48",
    "stage3.work_long_side=96",
    "stage3.track_grid=4",
    "stage3.k_sweep_steps=50",
    "stage3.depth_model=none",
]
# Stage 2 long enough (seconds) that a worker can be killed in the middle of it.
LONG_MOTION = ["stage2.steps_per_frame=12", "stage2.placement_iters=20", "stage2.joint_iters=40"]


def spec_for(video, extra=()):
    return {
        "input": {"kind": "reference", "root": str(video.root), "video": video.name},
        "preset": "cpu-demo",
        "overrides": MICRO + list(extra),
        "stages": "static,motion,compose",
        "device": "cpu",
        "guidance": "none",
    }


@pytest.fixture(scope="module")
def executor():
    from backend.distributed import RayExecutor

    ex = RayExecutor("local", num_cpus=2, num_gpus=2)
    yield ex
    ray.shutdown()


def attempts(out: Path, name: str) -> list[dict]:
    path = out / ATTEMPTS_DIR / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def structure(out: Path) -> dict:
    """What a finished job folder holds, without timings: report fields, metric names, scene file,
    array shapes, and the set of files."""
    report = json.loads((out / "report.json").read_text())
    scene = json.loads((out / "scene.json").read_text())
    files = sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and ATTEMPTS_DIR not in p.relative_to(out).parts
    )
    arrays = {}
    for entry in scene["objects"]:
        with np.load(out / entry["file"]) as z:
            arrays[entry["id"]] = {k: z[k].shape for k in z.files}
    return {
        "status": report["status"],
        "report_keys": sorted(report),
        "objects": {
            oid: {stage: sorted(m) for stage, m in stages.items()}
            for oid, stages in report["objects"].items()
        },
        "per_frame": {oid: len(o["motion"]["per_frame"]) for oid, o in report["objects"].items()},
        "scene_report_keys": sorted(report["scene"]),
        "scene_file": {k: v for k, v in scene.items() if k not in ("camera", "orbit_center")},
        "arrays": arrays,
        "files": files,
    }


def wait_for_jobs(manager: JobManager, job_ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {j: manager.status(j) for j in job_ids}
        if all(s["state"] in ("done", "failed", "cancelled", "interrupted") for s in states.values()):
            return states
        time.sleep(0.2)
    raise AssertionError(f"jobs not finished in {timeout}s: {[manager.status(j)['state'] for j in job_ids]}")


def test_two_videos_through_the_job_queue_match_the_single_process_run(executor, tiny_video, tmp_path):
    video_a = tiny_video(num_frames=3, name="va")
    video_b = tiny_video(num_frames=4, name="vb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker (one CPU per task): same arithmetic, no oversubscription
    try:
        reference = run_job(spec_for(video_a), tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    assert reference["status"] == "done"

    store = JobStore(tmp_path / "state" / "jobs")
    events: list[tuple[str, dict]] = []
    manager = JobManager(
        store,
        partial(run_job, executor=executor),
        lambda job_id, payload: events.append((job_id, payload)),
        device_slots=[None, None],
    )
    manager.start()
    try:
        ids = [manager.submit(spec_for(v), v.name, {}, validate_job)["id"] for v in (video_a, video_b)]
        states = wait_for_jobs(manager, ids, timeout=240)
    finally:
        manager.stop()
    assert [s["state"] for s in states.values()] == ["done", "done"], states
    out_a, out_b = (store.job_dir(j) / OUT_DIR for j in ids)

    # Same folder contents, report fields, scene file and array shapes as the single-process run.
    assert structure(out_a) == structure(tmp_path / "single")
    got_b = structure(out_b)
    assert got_b["status"] == "done" and set(got_b["objects"]) == {"001", "002"}
    assert got_b["per_frame"] == {"001": 4, "002": 4}
    assert all(shapes["means"][0] == 4 for shapes in got_b["arrays"].values())
    # The work itself did not change either (same seed, same steps): the baked motion agrees.
    for oid in ("001", "002"):
        with (
            np.load(tmp_path / "single" / "objects" / f"{oid}.npz") as want,
            np.load(out_a / "objects" / f"{oid}.npz") as got,
        ):
            np.testing.assert_allclose(got["means"], want["means"], atol=1e-3)

    # Every object was one task with one (logical) GPU; composition ran after both objects.
    gpus_seen = set()
    for out in (out_a, out_b):
        for oid in ("001", "002"):
            (attempt,) = attempts(out, oid)
            assert len(attempt["gpu_ids"]) == 1 and attempt["pid"] != os.getpid()
            gpus_seen.update(attempt["gpu_ids"])
        (compose,) = attempts(out, "compose")
        finished = max(checkpoint_path(out, oid, "motion").stat().st_mtime for oid in ("001", "002"))
        assert compose["time"] >= finished
        assert not (out / STOP_FILE).exists()
    assert gpus_seen == {"0", "1"}
    # The tasks' progress and stage_done events reached the job queue's subscribers.
    for job_id in ids:
        done = [p["event"] for j, p in events if j == job_id and p["event"]["type"] == "stage_done"]
        assert sorted((e["object"] or "", e["stage"]) for e in done) == [
            ("", "compose"),
            ("001", "motion"),
            ("001", "static"),
            ("002", "motion"),
            ("002", "static"),
        ]
        assert any(p["event"]["type"] == "progress" for j, p in events if j == job_id)


def test_a_worker_killed_mid_stage_costs_only_that_stage(executor, tiny_video, tmp_path):
    video = tiny_video(num_frames=3, name="vk")
    out = tmp_path / "out"
    killed: dict = {}
    events: list[dict] = []

    def on_event(event: dict) -> None:
        events.append(event)
        if killed or event.get("object") != "001" or event.get("stage") != "motion":
            return
        if event.get("type") != "progress":
            return
        # Object 001 is in stage 2 now: kill its worker process (SIGKILL, as if the machine died).
        (attempt,) = attempts(out, "001")
        killed.update(
            pid=attempt["pid"],
            motion_done=checkpoint_path(out, "001", "motion").exists(),
            static_mtime=checkpoint_path(out, "001", "static").stat().st_mtime_ns,
            events_before=len(events),
        )
        os.kill(attempt["pid"], signal.SIGKILL)

    report = run_job(spec_for(video, LONG_MOTION), out, on_event=on_event, executor=executor)
    assert killed, "never saw object 001 in stage 2"
    assert not killed["motion_done"], "the kill came after stage 2 had finished; make LONG_MOTION longer"
    assert report["status"] == "done"
    first, second = attempts(out, "001")  # Ray ran the object's task again in a new worker
    assert first["pid"] == killed["pid"] and second["pid"] != killed["pid"]
    assert len(attempts(out, "002")) == 1  # the other object was not touched
    # The retry found stage 1's checkpoint and kept it; only stage 2 was done again.
    assert checkpoint_path(out, "001", "static").stat().st_mtime_ns == killed["static_mtime"]
    after = events[killed["events_before"] :]
    assert any("object 001: stage 1 already finished" in e.get("message", "") for e in after)
    assert not any(e.get("object") == "001" and e.get("stage") == "static" for e in after)
    assert report["objects"]["001"]["motion"]["per_frame"] and (out / "scene.json").is_file()


def test_cancel_stops_the_remote_tasks(executor, tiny_video, tmp_path):
    video = tiny_video(num_frames=3, name="vc")
    out = tmp_path / "out"
    seen = []

    def should_stop() -> bool:
        return len(seen) > 0

    def on_event(event):
        if event["type"] == "progress" and event.get("stage") == "motion":
            seen.append(event)

    with pytest.raises(JobCancelled):
        run_job(
            spec_for(video, LONG_MOTION), out, on_event=on_event, should_stop=should_stop, executor=executor
        )
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "cancelled"
    assert not (out / "scene.json").exists() and not (out / STOP_FILE).exists()
    # Resume on the same folder picks up from the checkpoints.
    again = run_job(spec_for(video, LONG_MOTION), out, executor=executor)
    assert again["status"] == "done" and (out / "scene.json").is_file()


def test_without_ray_flag_ray_is_never_imported(tiny_video, tmp_path):
    video = tiny_video(num_frames=2, name="vn")
    script = f"""
import sys
from backend.cli import build_parser, main
import backend.server, backend.jobs, backend.pipeline
build_parser().parse_args(["serve"])
code = main(["run", "--data", {str(video.root)!r}, "--video", {video.name!r}, "--out", {str(tmp_path / "out")!r},
             "--preset", "cpu-demo", "--device", "cpu", "--guidance", "none", "--stages", "static",
             *sum((["--set", s] for s in {MICRO!r}), [])])
assert code == 0, code
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
assert not loaded, loaded
print("no ray")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "no ray" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "001" / "static.pt").is_file()
