"""The whole job: validate, then per object stage 1 (static) and stage 2 (motion), then stage 3.

`run_job` is what the CLI and the server both call.  Every finished stage of every object writes
a checkpoint into the output folder (atomically), and a rerun on the same folder skips it.
`report.json` says "running" while a run is in progress and only says "done" once everything
asked for exists.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.config import Config, load_config, save_config
from backend.data import VideoInput, load_folders, load_reference_layout
from backend.errors import InputError, JobCancelled

STAGES = ("static", "motion", "compose")
EventFn = Callable[[dict], None]

__all__ = ["STAGES", "JobCancelled", "run_job", "validate_job", "resolve_device"]


@dataclass
class PreparedJob:
    config: Config
    video: VideoInput
    stages: list[str]
    device: torch.device
    guidance_source: str


def _as_list(stages: Any) -> list[str]:
    if stages is None:
        return list(STAGES)
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise InputError(f"stages {unknown or stages} not understood; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def resolve_device(name: str | None) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for but CUDA is not available here; use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"device '{name}' not understood; use auto, cpu or cuda")
    return torch.device(name)


def load_input(spec_input: dict, work_dir: Path | None = None) -> VideoInput:
    """The validated input; a "video" input is decoded into `work_dir` (a temporary folder when None)."""
    if not isinstance(spec_input, dict):
        raise InputError("job field 'input' must be a mapping with 'kind': 'reference', 'folders' or 'video'")
    kind = spec_input.get("kind")
    if kind == "reference":
        for key in ("root", "video"):
            if not spec_input.get(key):
                raise InputError(f"job field 'input.{key}' is required for a reference-layout input")
        return load_reference_layout(Path(spec_input["root"]), spec_input["video"])
    if kind == "folders":
        for key in ("frames", "masks"):
            if not spec_input.get(key):
                raise InputError(f"job field 'input.{key}' is required for a folders input")
        optional = {
            k: Path(spec_input[k]) if spec_input.get(k) else None for k in ("inpainted", "inpainted_masks")
        }
        return load_folders(Path(spec_input["frames"]), Path(spec_input["masks"]), **optional)
    if kind == "video":
        from backend.video_input import load_video_input

        return load_video_input(spec_input, work_dir)
    raise InputError(
        f"job field 'input.kind' is {kind!r}; use 'reference' (root + video), 'folders' or 'video' (path + masks)"
    )


KNOWN_SPEC_KEYS = {"input", "preset", "overrides", "stages", "device", "guidance", "name"}


def prepare(spec: dict, out_dir: Path | None = None) -> PreparedJob:
    """Everything that can fail on bad input, before any optimisation.

    A video input's decoded frames go to out_dir/input (reference layout) when out_dir is given.
    """
    if not isinstance(spec, dict):
        raise InputError("a job spec must be a mapping")
    unknown = sorted(set(spec) - KNOWN_SPEC_KEYS)
    if unknown:
        raise InputError(
            f"unknown job field '{unknown[0]}'; valid fields: {', '.join(sorted(KNOWN_SPEC_KEYS))}"
        )
    overrides = spec.get("overrides") or {}
    if isinstance(overrides, dict):
        overrides = dict(overrides)
    elif not isinstance(overrides, list):
        raise InputError("job field 'overrides' must be a mapping like {'stage1.iters': 300}")
    config = load_config(spec.get("preset") or "full", overrides)
    if spec.get("guidance") is not None:
        config.guidance.model = str(spec["guidance"])
    stages = _as_list(spec.get("stages"))
    device = resolve_device(spec.get("device"))
    video = load_input(spec.get("input"), None if out_dir is None else Path(out_dir) / "input")
    if "motion" in stages and video.num_frames < 2:
        raise InputError(f"video '{video.name}' has 1 frame; motion needs at least 2 (use --stages static)")
    check_models_exist(config, stages)
    return PreparedJob(config, video, stages, device, config.guidance.model)


def check_models_exist(config: Config, stages: list[str]) -> None:
    """Missing weights are input errors found before any optimisation, not after stage 1."""
    from backend.depth import validate_depth_model
    from backend.guidance.zero123 import check_model_folder, resolve_model_folder

    source = config.guidance.model
    if source != "none" and ("static" in stages or "motion" in stages):
        check_model_folder(resolve_model_folder(source, config.guidance.cache_dir or None), source)
    if "compose" in stages:
        validate_depth_model(config.stage3.depth_model)


def validate_job(spec: dict) -> None:
    prepare(spec)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_report(out_dir: Path, report: dict) -> None:
    atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=2, default=float).encode())


def checkpoint_path(out_dir: Path, object_id: str, stage: str) -> Path:
    return out_dir / "checkpoints" / object_id / f"{stage}.pt"


def make_guidance(job: PreparedJob, emit: EventFn):
    source = job.config.guidance.model
    if source == "none":
        emit(
            {
                "type": "log",
                "message": "WARNING: guidance 'none': no Zero123 prior; novel views are unconstrained and will "
                "look wrong away from the input view. Pass --guidance PATH|HUBID for the real method.",
            }
        )
        return None
    from backend.guidance import zero123

    return zero123.make_guidance(job.config.guidance, job.device)


def run_job(
    spec: dict,
    out_dir: Path,
    on_event: EventFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    executor: Any = None,
) -> dict:
    """Run (or resume) a job into `out_dir`; returns the report (also in out_dir/report.json).

    `executor` (e.g. backend.distributed.RayExecutor) runs the stages elsewhere; None runs them here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def emit(event: dict) -> None:
        if on_event is not None:
            on_event(event)

    previous = {}
    if (out_dir / "report.json").is_file():
        try:
            previous = json.loads((out_dir / "report.json").read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
    report: dict[str, Any] = {
        "status": "running",
        "stages": [],
        "device": None,
        "guidance": None,
        "objects": previous.get("objects", {}) if isinstance(previous.get("objects"), dict) else {},
        "error": None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        job = prepare(spec, out_dir)
    except InputError as exc:
        report.update(status="failed", error=str(exc))
        write_report(out_dir, report)
        raise
    report.update(stages=job.stages, device=str(job.device), guidance=job.guidance_source)
    if job.guidance_source == "none":
        report["warnings"] = ["no guidance prior: novel views are unconstrained"]
    save_config(job.config, out_dir / "config.yaml")
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    write_report(out_dir, report)
    t0 = time.perf_counter()
    try:
        if executor is None:
            _run_stages(job, out_dir, report, emit, should_stop)
        else:
            executor.run_stages(job, out_dir, report, emit, should_stop, spec=spec)
    except JobCancelled as exc:
        report.update(status="cancelled", error=str(exc))
        write_report(out_dir, report)
        raise
    except InputError as exc:
        report.update(status="failed", error=str(exc))
        write_report(out_dir, report)
        raise
    except Exception as exc:
        report.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        write_report(out_dir, report)
        raise
    report["status"] = "done"
    report["seconds"] = time.perf_counter() - t0
    write_report(out_dir, report)
    emit({"type": "done", "status": "done", "report": "report.json"})
    return report


def _run_stages(
    job: PreparedJob,
    out_dir: Path,
    report: dict,
    emit: EventFn,
    should_stop,
    objects: list[int] | None = None,
    save_report: Callable[[Path, dict], None] = write_report,
) -> None:
    """The asked-for stages; `objects` (indices) limits stages 1-2 to those objects (a distributed
    worker runs one object), `save_report` replaces writing report.json (a worker must not)."""
    from backend import stage1

    video = job.video
    guidance = None
    guidance_loaded = False

    def get_guidance():
        nonlocal guidance, guidance_loaded
        if not guidance_loaded:
            guidance = make_guidance(job, emit)
            guidance_loaded = True
        return guidance

    static: dict[str, dict] = {}
    pending: list[int] = []
    for k, object_id in enumerate(video.object_ids):
        if objects is not None and k not in objects:
            continue
        path = checkpoint_path(out_dir, object_id, "static")
        obj_report = report["objects"].setdefault(object_id, {})
        if path.is_file():
            emit(
                {"type": "log", "message": f"object {object_id}: stage 1 already finished, skipping ({path})"}
            )
            static[object_id] = torch.load(path, map_location="cpu", weights_only=False)
            obj_report["static"] = static[object_id]["metrics"]
            continue
        if "static" not in job.stages:
            raise InputError(
                f"object {object_id} has no stage-1 checkpoint in {out_dir}; include 'static' in --stages"
            )
        pending.append(k)
    # Objects lifted together share each step's SDS batch (stage1.objects_together); otherwise
    # one after another, each finished object checkpointed before the next starts.
    groups = [pending] if job.config.stage1.objects_together else [[k] for k in pending]
    for group in groups:
        if not group:
            continue
        reset_peak_memory(job.device)
        items = [
            stage1.LiftInput(video.object_frames(k)[0], video.object_masks(k)[0], video.object_ids[k])
            for k in group
        ]
        results = stage1.lift_objects(items, job.config, job.device, get_guidance(), emit, should_stop)
        peak = peak_memory(job.device)
        for item, result in zip(items, results):
            object_id = item.object_id
            ckpt = result.checkpoint()
            atomic_torch_save(ckpt, checkpoint_path(out_dir, object_id, "static"))
            static_dir = out_dir / "static"
            static_dir.mkdir(exist_ok=True)
            result.model.save_ply(static_dir / f"{object_id}.ply")
            preview = write_turntable_preview(
                result.model, out_dir / "previews" / f"{object_id}_static.png", job.device
            )
            static[object_id] = ckpt
            result.metrics.update(peak)
            report["objects"][object_id]["static"] = result.metrics
            save_report(out_dir, report)
            emit(
                {
                    "type": "stage_done",
                    "object": object_id,
                    "stage": "static",
                    "previews": [str(preview.relative_to(out_dir))],
                    "seconds": result.metrics["seconds"],
                }
            )
    if "motion" not in job.stages and "compose" not in job.stages:
        return
    from backend import stage2, stage3

    motion: dict[str, dict] = {}
    for k, object_id in enumerate(video.object_ids):
        if objects is not None and k not in objects:
            continue
        path = checkpoint_path(out_dir, object_id, "motion")
        obj_report = report["objects"].setdefault(object_id, {})
        if path.is_file():
            emit(
                {"type": "log", "message": f"object {object_id}: stage 2 already finished, skipping ({path})"}
            )
            motion[object_id] = torch.load(path, map_location="cpu", weights_only=False)
            obj_report["motion"] = motion[object_id]["metrics"]
            continue
        if "motion" not in job.stages:
            raise InputError(
                f"object {object_id} has no stage-2 checkpoint in {out_dir}; include 'motion' in --stages"
            )
        reset_peak_memory(job.device)
        result = stage2.animate_object(
            video, k, static[object_id], job.config, job.device, get_guidance(), emit, should_stop
        )
        atomic_torch_save(result, path)
        motion[object_id] = result
        result["metrics"].update(peak_memory(job.device))
        obj_report["motion"] = result["metrics"]
        save_report(out_dir, report)
        emit(
            {
                "type": "stage_done",
                "object": object_id,
                "stage": "motion",
                "previews": [],
                "seconds": result["metrics"]["seconds"],
            }
        )
    if "compose" in job.stages:
        scene_report = stage3.compose_scene(video, motion, job.config, job.device, out_dir, emit, should_stop)
        report["scene"] = scene_report
        save_report(out_dir, report)
        emit(
            {
                "type": "stage_done",
                "object": None,
                "stage": "compose",
                "previews": scene_report.get("previews", []),
                "seconds": scene_report.get("seconds", 0.0),
            }
        )


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak GPU memory of the stage just run (CUDA only), for the report and benchmarks."""
    if device.type != "cuda":
        return {}
    return {"peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def write_turntable_preview(model, path: Path, device, views: int = 8, size: int = 128) -> Path:
    """A row of renders around the object at elevation 0, every 360/views degrees (white background)."""
    from PIL import Image

    from backend.cameras import Camera
    from backend.stage1 import render_views

    with torch.no_grad():
        cams = [Camera.orbit(0.0, 360.0 * i / views, 2.0, size, size) for i in range(views)]
        out = render_views(model.activated(), cams, device)
        row = torch.cat(list(out.color.clamp(0, 1)), dim=1).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((row * 255).round().astype(np.uint8)).save(path)
    return path
