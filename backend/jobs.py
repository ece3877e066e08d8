"""Job store on disk and the worker that runs jobs one at a time per GPU, in submission order.

    <state>/jobs/<job id>/spec.json     the spec as submitted (uploads: input.kind == "upload")
    <state>/jobs/<job id>/state.json    state, timestamps, error, last progress per object/stage
    <state>/jobs/<job id>/input/        uploaded images, reference layout (JPEGImages/<video>/...)
    <state>/jobs/<job id>/out/          the pipeline's out dir: checkpoints, previews, scene

States: queued -> running -> done | failed | cancelled | interrupted. A job is "interrupted" when
the server stopped (or died) while it ran; the next server start resumes it from its last finished
stage (the pipeline skips checkpointed stages). A job folder appears atomically (built under
jobs/.incoming/ and renamed), so a crash mid-submit never leaves a half-made job behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import protocol as P

log = logging.getLogger("backend.jobs")

STATE_FILE = "state.json"
SPEC_FILE = "spec.json"
INPUT_DIR = "input"
OUT_DIR = "out"
INCOMING = ".incoming"
PROGRESS_FLUSH_S = 1.0  # progress events are persisted at most this often (state changes always)
MAX_LISTED_FILES = 20000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class JobError(Exception):
    """A request about a job that cannot be served; `code` is a protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def inside(base: Path, relative: str) -> Path:
    """base/relative resolved, refusing anything (.., absolute, symlink) that ends up outside base."""
    P.check_relative_path(relative, allow_empty=True)
    base = base.resolve()
    target = (base / relative).resolve() if relative else base
    if target != base and base not in target.parents:
        raise JobError("invalid_payload", f"path {relative!r} leaves the job folder")
    return target


def pipeline_spec(spec: dict, job_dir: Path) -> dict:
    """The spec handed to backend.pipeline: uploads become a reference input inside the job folder."""
    out = json.loads(json.dumps(spec))
    if out["input"].get("kind") == "upload":
        out["input"] = {"kind": "reference", "root": str(job_dir / INPUT_DIR), "video": out["input"]["video"]}
    out.setdefault("overrides", {})
    return out


class JobStore:
    """Folders and JSON files; every method is safe to call from any thread (holds no state)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        incoming = self.root / INCOMING
        if incoming.exists():  # half-made jobs of a server that died during submit
            shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir()

    def job_dir(self, job_id: str) -> Path:
        if not P.job_id_ok(job_id):
            raise JobError("invalid_payload", f"{job_id!r} is not a job id")
        return self.root / job_id

    def job_ids(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if P.job_id_ok(p.name) and (p / STATE_FILE).is_file()]

    def read_state(self, job_id: str) -> dict:
        return json.loads((self.job_dir(job_id) / STATE_FILE).read_text())

    def write_state(self, state: dict) -> None:
        write_json_atomic(self.job_dir(state["id"]) / STATE_FILE, state)

    def read_spec(self, job_id: str) -> dict:
        return json.loads((self.job_dir(job_id) / SPEC_FILE).read_text())

    def new_job_id(self) -> str:
        while True:
            job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            if not (self.root / job_id).exists():
                return job_id

    def stage_new_job(self, job_id: str, spec: dict, uploads: dict[str, bytes]) -> Path:
        """Make jobs/.incoming/<id> with spec.json and uploaded files; returns that folder."""
        staging = self.root / INCOMING / job_id
        (staging / OUT_DIR).mkdir(parents=True)
        for relative, data in uploads.items():
            P.check_upload_path(relative, spec["input"]["video"])
            if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
                raise JobError(
                    "invalid_input", f"upload {relative} is not a PNG or JPEG file (bad magic bytes)"
                )
            target = inside(staging / INPUT_DIR, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        write_json_atomic(staging / SPEC_FILE, spec)
        return staging

    def commit_new_job(self, staging: Path, state: dict) -> Path:
        write_json_atomic(staging / STATE_FILE, state)
        final = self.job_dir(state["id"])
        os.rename(staging, final)
        return final

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def delete(self, job_id: str) -> None:
        job_dir = self.job_dir(job_id)
        # Rename first so a crash during rmtree leaves no folder that looks like a job.
        doomed = self.root / INCOMING / f"deleted-{job_id}-{secrets.token_hex(2)}"
        os.rename(job_dir, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def artifact(self, job_id: str, relative: str) -> Path:
        job_dir = self.job_dir(job_id)
        if not job_dir.is_dir():
            raise JobError("not_found", f"no job {job_id}")
        target = inside(job_dir, relative)
        if not target.exists():
            raise JobError("not_found", f"job {job_id} has no {relative!r}")
        return target

    def list_files(self, job_id: str, relative: str) -> list[dict]:
        base = self.job_dir(job_id).resolve()
        top = self.artifact(job_id, relative)
        entries = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # a file being written atomically right now
                try:
                    real = path.resolve()
                except OSError:
                    continue
                if base not in real.parents or not real.is_file():
                    continue  # symlinks out of the job folder are not served
                entries.append({"path": path.relative_to(base).as_posix(), "size": real.stat().st_size})
                if len(entries) >= MAX_LISTED_FILES:
                    return entries
        return entries


class JobManager:
    """Owns the in-memory job table, the queue and the worker threads (one per device slot).

    run_job(spec, out_dir, on_event, should_stop) is backend.pipeline.run_job; publish(job_id,
    payload) sends an event to subscribers (it must be thread-safe and must not block).
    """

    def __init__(
        self,
        store: JobStore,
        run_job: Callable[..., dict],
        publish: Callable[[str, dict], None],
        device_slots: list[int | None] | None = None,
        auto_resume: bool = True,
    ):
        self.store = store
        self._run_job = run_job
        self._publish = publish
        self._slots = device_slots or [None]
        self._auto_resume = auto_resume
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, dict] = {}
        self._stops: dict[str, threading.Event] = {}
        self._last_flush: dict[str, float] = {}
        self._next_seq = 0
        self._closing = False
        self._threads: list[threading.Thread] = []

    # -- startup / shutdown
    def start(self) -> None:
        with self._lock:
            for job_id in self.store.job_ids():
                try:
                    state = self.store.read_state(job_id)
                except (OSError, ValueError) as exc:
                    log.warning("skipping job %s: unreadable state.json (%s)", job_id, exc)
                    continue
                self._jobs[job_id] = state
                self._next_seq = max(self._next_seq, int(state.get("seq", 0)) + 1)
                if state["state"] == "running":
                    # The previous server died (or was killed) while this job ran.
                    self._set_state(state, "interrupted", note="the server stopped while the job was running")
                    if self._auto_resume:
                        self._set_state(state, "queued", note="resumed after a server restart")
        for index, slot in enumerate(self._slots):
            thread = threading.Thread(
                target=self._worker, args=(slot,), name=f"job-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; a running job stops at its next step boundary and becomes interrupted."""
        with self._lock:
            self._closing = True
            for stop in self._stops.values():
                stop.set()
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- state bookkeeping (caller holds the lock)
    def _set_state(self, state: dict, new: str, error: str | None = None, note: str | None = None) -> None:
        now = time.time()
        state["state"] = new
        state["updated"] = now
        if new == "running":
            state["started"] = now
            state["error"] = None
        if new in P.FINAL_STATES or new == "interrupted":
            state["finished"] = now
        if new == "queued":
            state["finished"] = None
        if error is not None:
            state["error"] = error
        history = state.setdefault("history", [])
        history.append({"state": new, "time": now, **({"note": note} if note else {})})
        del history[:-50]
        self.store.write_state(state)
        self._emit(state, {"type": "state", "state": new, "error": state.get("error"), "note": note})
        self._wake.notify_all()

    def _emit(self, state: dict, event: dict) -> None:
        state["event_seq"] = state.get("event_seq", 0) + 1
        payload = {"job": state["id"], "seq": state["event_seq"], "state": state["state"], "event": event}
        try:
            self._publish(state["id"], payload)
        except Exception:  # a broken subscriber path must not stop the job
            log.exception("could not publish an event of job %s", state["id"])

    def summary(self, state: dict) -> dict:
        keys = ("id", "name", "state", "seq", "created", "started", "finished", "updated", "error")
        return {k: state.get(k) for k in keys}

    # -- requests
    def submit(
        self, spec: dict, name: str | None, uploads: dict[str, bytes], validate: Callable[[dict], None]
    ) -> dict:
        job_id = self.store.new_job_id()
        staging = self.store.stage_new_job(job_id, spec, uploads)
        try:
            validate(pipeline_spec(spec, staging))
        except BaseException:
            self.store.discard_staging(staging)
            raise
        with self._lock:
            if self._closing:
                self.store.discard_staging(staging)
                raise JobError("conflict", "the server is shutting down")
            now = time.time()
            state = {
                "id": job_id,
                "name": name,
                "state": "queued",
                "seq": self._next_seq,
                "created": now,
                "updated": now,
                "started": None,
                "finished": None,
                "error": None,
                "event_seq": 0,
                "progress": {},
                "stages_done": [],
                "log": [],
                "history": [{"state": "queued", "time": now}],
            }
            self._next_seq += 1
            self.store.commit_new_job(staging, state)
            self._jobs[job_id] = state
            self._emit(state, {"type": "state", "state": "queued", "error": None, "note": "submitted"})
            self._wake.notify_all()
            return self._with_position(state)

    def _get(self, job_id: str) -> dict:
        state = self._jobs.get(job_id)
        if state is None:
            raise JobError("not_found", f"no job {job_id}; 'list' shows the jobs this server has")
        return state

    def _with_position(self, state: dict) -> dict:
        out = json.loads(json.dumps(state))
        if state["state"] == "queued":
            out["queue_position"] = sum(
                1 for s in self._jobs.values() if s["state"] == "queued" and s["seq"] < state["seq"]
            )
        return out

    def status(self, job_id: str) -> dict:
        with self._lock:
            return self._with_position(self._get(job_id))

    def list(self, states: list[str] | None = None) -> list[dict]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda s: s["seq"])
            return [self.summary(s) for s in jobs if states is None or s["state"] in states]

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(P.JOB_STATES, 0)
            for state in self._jobs.values():
                counts[state["state"]] = counts.get(state["state"], 0) + 1
            return counts

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            state = self._get(job_id)
            if state["state"] == "queued":
                self._set_state(state, "cancelled", note="cancelled before it started")
            elif state["state"] == "running":
                # The worker marks it cancelled when the pipeline stops at its next step boundary.
                state["cancel_requested"] = time.time()
                self._stops[job_id].set()
            elif state["state"] == "interrupted":
                self._set_state(state, "cancelled", note="cancelled while interrupted")
            else:
                raise JobError(
                    "conflict",
                    f"job {job_id} is {state['state']}; only queued or running jobs can be cancelled",
                )
            return self._with_position(state)

    def resume(self, job_id: str, validate: Callable[[dict], None]) -> dict:
        with self._lock:
            state = self._get(job_id)
            if state["state"] not in ("interrupted", "cancelled", "failed"):
                raise JobError(
                    "conflict",
                    f"job {job_id} is {state['state']}; only interrupted, cancelled or failed jobs resume",
                )
        spec = self.store.read_spec(job_id)
        validate(pipeline_spec(spec, self.store.job_dir(job_id)))
        with self._lock:
            if state["state"] not in ("interrupted", "cancelled", "failed"):
                raise JobError("conflict", f"job {job_id} is {state['state']}")
            state.pop("cancel_requested", None)
            self._set_state(state, "queued", note="resumed on request")
            return self._with_position(state)

    def delete(self, job_id: str) -> dict:
        with self._lock:
            state = self._get(job_id)
            if state["state"] == "running":
                raise JobError("conflict", f"job {job_id} is running; cancel it first")
            self.store.delete(job_id)
            del self._jobs[job_id]
            return {"job": job_id, "deleted": True}

    # -- the worker
    def _next_job(self) -> dict | None:
        with self._lock:
            while not self._closing:
                queued = [s for s in self._jobs.values() if s["state"] == "queued"]
                if queued:
                    state = min(queued, key=lambda s: s["seq"])
                    self._stops[state["id"]] = threading.Event()
                    self._set_state(state, "running")
                    return state
                self._wake.wait(1.0)
            return None

    def _worker(self, device_index: int | None) -> None:
        if device_index is not None:
            import torch

            torch.cuda.set_device(device_index)  # per thread: "cuda" in the spec means this GPU
        while True:
            try:
                state = self._next_job()
                if state is None:
                    return
                self._run(state)
            except Exception:  # e.g. a full disk while writing state.json: keep serving the queue
                log.exception("job worker error")
                time.sleep(1.0)

    def _on_event(self, state: dict, event: dict) -> None:
        try:
            event = json.loads(json.dumps(event, default=str))
            with self._lock:
                kind = event.get("type")
                if kind == "progress":
                    key = f"{event.get('object')}/{event.get('stage')}"
                    state.setdefault("progress", {})[key] = event
                    state["last_progress"] = event
                elif kind == "stage_done":
                    state.setdefault("stages_done", []).append(event)
                elif kind == "log":
                    state.setdefault("log", []).append(str(event.get("message", ""))[:2000])
                    del state["log"][:-50]
                self._emit(state, event)
                now = time.monotonic()
                if kind != "progress" or now - self._last_flush.get(state["id"], 0.0) > PROGRESS_FLUSH_S:
                    self._last_flush[state["id"]] = now
                    self.store.write_state(state)
        except Exception:  # never let bookkeeping break a running optimisation
            log.exception("could not record an event of job %s", state.get("id"))

    def _run(self, state: dict) -> None:
        from backend.errors import InputError, JobCancelled

        job_id = state["id"]
        job_dir = self.store.job_dir(job_id)
        stop = self._stops[job_id]
        new_state, error = "done", None
        try:
            spec = pipeline_spec(self.store.read_spec(job_id), job_dir)
            report = self._run_job(
                spec, job_dir / OUT_DIR, on_event=lambda e: self._on_event(state, e), should_stop=stop.is_set
            )
            status = (report or {}).get("status", "done")
            if status == "cancelled":
                raise JobCancelled("the pipeline reported it was cancelled")
            if status != "done":
                new_state, error = (
                    "failed",
                    str((report or {}).get("error") or f"pipeline finished with {status!r}"),
                )
        except JobCancelled:
            new_state = "cancelled" if "cancel_requested" in state else "interrupted"
        except InputError as exc:
            new_state, error = "failed", str(exc)
        except Exception as exc:
            new_state, error = "failed", f"{type(exc).__name__}: {exc}"
            (job_dir / "error.log").write_text(traceback.format_exc())
            log.exception("job %s failed", job_id)
        if new_state != "cancelled" and stop.is_set() and self._closing and new_state != "done":
            new_state, error = "interrupted", None
        with self._lock:
            self._stops.pop(job_id, None)
            if job_id in self._jobs:
                note = "cancel took effect" if new_state == "cancelled" else None
                if new_state == "interrupted":
                    note = "the server is shutting down; the job resumes on the next start"
                self._set_state(state, new_state, error=error, note=note)
