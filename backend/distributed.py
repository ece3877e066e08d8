"""Running jobs on a Ray cluster: per-object stages 1 and 2 as tasks with one GPU each, then the
composition of the video as one more task once all of its objects are finished.

Only `python -m backend run|serve --ray auto|ADDRESS` imports this module (Ray is an optional
dependency). The driver (the CLI, or a server job worker thread) keeps the report and the events;
the tasks do the work. Checkpoints go into the job's output folder, which every machine of the
cluster must see at the same path (a shared file system), as must the repository itself: a task
that dies (its worker process or its machine) loses only the stage it was running, and Ray runs
it again (`max_retries`); the retry finds the finished stages' checkpoints and skips them.

What travels how:
  the prepared job (config + decoded video arrays)  Ray's object store, once per job
  checkpoints, previews, scene files                 the output folder (shared path)
  progress events                                    a small actor per job, drained by the driver
  cancellation                                       a marker file in the output folder
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend.errors import InputError, JobCancelled

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_FILE = ".stop-requested"
ATTEMPTS_DIR = "attempts"  # out_dir/attempts/<object or "compose">.jsonl: one line per task attempt
EVENT_FLUSH_S = 0.25  # a task sends buffered progress events at most this often
STOP_CHECK_S = 0.5  # a task looks for the stop marker at most this often

__all__ = ["RayExecutor", "connect", "STOP_FILE", "ATTEMPTS_DIR"]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(
            "--ray needs the 'ray' package, which is not installed here: "
            "pip install 'ray[default]==2.60.0' (see requirements-dev.txt)"
        ) from None
    return ray


def connect(address: str = "auto", **init_kwargs: Any):
    """Join a Ray cluster and return the `ray` module.

    address "auto": the cluster started on this machine with `ray start`, else a new local one with
    this machine's CPUs and GPUs; "local": always a new local one (init_kwargs such as num_cpus,
    num_gpus go to it); anything else: that cluster ("HOST:6379" or "ray://HOST:10001").
    Workers import `backend` from this repository's path, so it must be the same on every machine.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    options = {"include_dashboard": False, "runtime_env": runtime_env, "log_to_driver": True}
    options.update(init_kwargs)
    if address == "local":
        ray.init(address="local", **options)
    elif address == "auto":
        if _recorded_cluster_answers():
            ray.init(address="auto", **options)
        else:  # none running here, or only the record of one that died (joining it would hang)
            ray.init(address="local", **options)
    else:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(
                f"cannot join the Ray cluster at {address!r} ({exc}); start it with `ray start --head` "
                "on the head machine, or use --ray auto"
            ) from None
    return ray


def _recorded_cluster_answers(timeout: float = 3.0) -> bool:
    """Whether the cluster that `address="auto"` would join (RAY_ADDRESS, or the one `ray start`
    recorded on this machine) accepts a TCP connection."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        recorded = canonicalize_bootstrap_address("auto")
    except ConnectionError:  # no cluster recorded at all
        return False
    except Exception:  # noqa: BLE001 (a Ray without this helper: let ray.init decide)
        return True
    if not recorded:
        return False
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def worker_device(name: str | None):
    """The device a task uses: Ray's CUDA_VISIBLE_DEVICES already narrows a task to its own GPU,
    so every 'cuda[:N]' means that GPU, and 'auto' is decided on the worker's machine."""
    from backend.pipeline import resolve_device

    name = name or "auto"
    if name.startswith("cuda"):
        name = "cuda"
    return resolve_device(name)


class _TaskEvents:
    """Emit function of a task: buffers progress events, sends them to the job's event actor."""

    def __init__(self, sink):
        self.sink = sink
        self.buffer: list[dict] = []
        self.last = time.monotonic()

    def __call__(self, event: dict) -> None:
        self.buffer.append(json.loads(json.dumps(event, default=str)))
        if event.get("type") != "progress" or time.monotonic() - self.last > EVENT_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.sink.push.remote(self.buffer)  # no wait: events are advisory
            self.buffer = []
        self.last = time.monotonic()


class _StopMarker:
    """should_stop of a task: true once the driver has written the stop marker into out_dir."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / STOP_FILE
        self.checked = 0.0
        self.stopped = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.stopped and now - self.checked > STOP_CHECK_S:
            self.checked = now
            self.stopped = self.path.exists()
        return self.stopped


def _record_attempt(out_dir: Path, name: str, stages: list[str]) -> None:
    import ray

    path = out_dir / ATTEMPTS_DIR / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "stages": stages,
        "time": time.time(),
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _task_job(job, spec_device: str | None, stages: list[str]):
    return dataclasses.replace(job, device=worker_device(spec_device), stages=stages)


def object_task(job, out_dir: str, object_index: int, stages: list[str], spec_device, sink) -> dict:
    """Stages 1 and/or 2 of one object (skipping checkpointed ones); returns its report entry."""
    from backend.pipeline import _run_stages

    out = Path(out_dir)
    job = _task_job(job, spec_device, stages)
    object_id = job.video.object_ids[object_index]
    _record_attempt(out, object_id, stages)
    events = _TaskEvents(sink)
    report: dict[str, Any] = {"objects": {}}
    try:
        _run_stages(
            job, out, report, events, _StopMarker(out), objects=[object_index], save_report=lambda *_: None
        )
    finally:
        events.flush()
    return {"object": object_id, "metrics": report["objects"].get(object_id, {}), "device": str(job.device)}


def compose_task(job, out_dir: str, spec_device, sink, *_objects_done) -> dict:
    """Stage 3 of the video from the objects' stage-2 checkpoints; returns the scene report.
    The trailing arguments are the object tasks' results, so Ray starts this only after them."""
    from backend.pipeline import _run_stages

    out = Path(out_dir)
    job = _task_job(job, spec_device, ["compose"])
    _record_attempt(out, "compose", ["compose"])
    events = _TaskEvents(sink)
    report: dict[str, Any] = {"objects": {}}

    def emit(event: dict) -> None:
        # Loading the objects' finished checkpoints is not news here (the object tasks said so).
        if not (event.get("type") == "log" and "already finished, skipping" in str(event.get("message"))):
            events(event)

    try:
        _run_stages(job, out, report, emit, _StopMarker(out), save_report=lambda *_: None)
    finally:
        events.flush()
    return {"scene": report.get("scene", {}), "device": str(job.device)}


class _EventSink:
    """One per job: tasks push lists of events, the driver drains them in order of arrival."""

    def __init__(self):
        self.events: list[dict] = []

    def push(self, events: list[dict]) -> None:
        self.events.extend(events)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


def _unwrap(exc: BaseException) -> BaseException:
    """The task's own exception (InputError, JobCancelled, ...) out of Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayExecutor:
    """`run_job(..., executor=RayExecutor(...))` runs the stages as Ray tasks.

    gpus_per_task: GPUs each object task and the composition task ask for (1 by default; 0 when
    the cluster has no GPUs, so a CPU-only cluster still runs jobs). max_retries: how often Ray
    reruns a task whose worker died (application errors are not retried).
    """

    def __init__(
        self,
        address: str = "auto",
        gpus_per_task: float | None = None,
        max_retries: int = 3,
        poll_s: float = 0.2,
        **init_kwargs: Any,
    ):
        self.ray = connect(address, **init_kwargs)
        if gpus_per_task is None:
            gpus_per_task = 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self.gpus_per_task = gpus_per_task
        self.max_retries = max_retries
        self.poll_s = poll_s
        ray = self.ray
        common = {"num_gpus": gpus_per_task, "max_retries": max_retries, "retry_exceptions": False}
        self._object_task = ray.remote(**common)(object_task)
        self._compose_task = ray.remote(**common)(compose_task)
        self._sink_actor = ray.remote(num_cpus=0, max_restarts=0)(_EventSink)

    def describe(self) -> str:
        resources = self.ray.cluster_resources()
        return (
            f"Ray cluster: {len(self.ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs; {self.gpus_per_task:g} GPU per task"
        )

    def run_stages(
        self,
        job,
        out_dir: Path,
        report: dict,
        emit: Callable[[dict], None],
        should_stop: Callable[[], bool] | None,
        spec: dict | None = None,
    ) -> None:
        from backend.pipeline import write_report

        ray = self.ray
        out_dir = Path(out_dir).resolve()
        stop_marker = out_dir / STOP_FILE
        stop_marker.unlink(missing_ok=True)
        spec_device = (spec or {}).get("device")
        sink = self._sink_actor.remote()
        job_ref = ray.put(job)
        object_stages = [s for s in job.stages if s != "compose"]
        name = job.video.name
        emit(
            {
                "type": "log",
                "message": f"{self.describe()}; video {name}: {len(job.video.object_ids)} objects",
            }
        )
        devices: set[str] = set()
        try:
            refs = {
                self._object_task.options(name=f"{name}/{object_id}").remote(
                    job_ref, str(out_dir), k, object_stages, spec_device, sink
                ): object_id
                for k, object_id in enumerate(job.video.object_ids)
            }

            def object_finished(result: dict) -> None:
                report["objects"].setdefault(result["object"], {}).update(result["metrics"])
                devices.add(result["device"])
                write_report(out_dir, report)

            self._wait(refs, sink, emit, should_stop, stop_marker, object_finished)
            if "compose" in job.stages:
                if should_stop is not None and should_stop():
                    raise JobCancelled(f"video {name}: stopped before composition")
                ref = self._compose_task.options(name=f"{name}/compose").remote(
                    job_ref, str(out_dir), spec_device, sink
                )
                (scene,) = self._wait({ref: "compose"}, sink, emit, should_stop, stop_marker, None)
                report["scene"] = scene["scene"]
                devices.add(scene["device"])
                write_report(out_dir, report)  # the task itself sent the compose stage_done event
        finally:
            stop_marker.unlink(missing_ok=True)
            ray.kill(sink)
        if devices:
            report["device"] = ", ".join(sorted(devices))

    def _wait(self, refs: dict, sink, emit, should_stop, stop_marker: Path, on_result) -> list[dict]:
        """Results of all tasks in `refs`, forwarding their events meanwhile. On a cancel request
        or a failed task the others are told to stop (at their next step boundary) and waited for,
        so no task keeps a GPU after the job ends; then the first error is raised."""
        ray = self.ray
        pending = list(refs)
        results, errors = [], []
        stopping = False
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.poll_s)
            for event in ray.get(sink.drain.remote()):
                emit(event)
            for ref in done:
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 (re-raised below, after the others stop)
                    errors.append(_unwrap(exc))
                    continue
                results.append(result)
                if on_result is not None:
                    on_result(result)
            if not stopping and (errors or (should_stop is not None and should_stop())):
                stopping = True
                stop_marker.touch()
        for event in ray.get(sink.drain.remote()):
            emit(event)
        if errors:
            real = [e for e in errors if not isinstance(e, JobCancelled)]
            raise (real or errors)[0]
        return results
