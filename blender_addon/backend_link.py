"""The add-on's connection to the backend: all socket work on one worker thread.

Blender's UI must never wait on the network, so every request (hello, list, status, submit,
cancel, fetch, render_path) runs on a worker thread that owns its own client; results and
progress events go into a queue.  The UI drains that queue from a `bpy.app.timers` callback on
the main thread (the only thread allowed to touch Blender data).  Background runs, where timers
never fire, call `wait()` in a blocking loop instead.  No bpy here.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ._shared import client_module

POLL_INTERVAL_S = 1.0  # how often the worker refreshes the job list and the watched job's status
REQUEST_TIMEOUT_S = 5.0


@dataclass
class Message:
    """Something the worker learned: kind is "connection", "jobs", "status", "event", "result" or "error"."""

    kind: str
    data: Any = None
    request: str | None = None  # for result / error: the request's name
    token: Any = None  # for result / error: what the caller passed along with the request


@dataclass
class _Command:
    name: str
    args: dict = field(default_factory=dict)
    token: Any = None


class BackendLink:
    """One backend endpoint; start() launches the worker, stop() ends it."""

    def __init__(self, endpoint: str, keys=None, poll_interval: float = POLL_INTERVAL_S):
        self.endpoint = endpoint
        self.keys = keys
        self.poll_interval = poll_interval
        self.messages: queue.Queue[Message] = queue.Queue()
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watched: set[str] = set()
        self.connected = False

    # -- called from the main thread
    def start(self) -> BackendLink:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dreamscene4d-backend", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call(self, name: str, token: Any = None, **args) -> None:
        """Queue a client call (e.g. call("submit", spec=...)); its result arrives as a Message."""
        self._commands.put(_Command(name, args, token))

    def watch(self, job: str) -> None:
        self._commands.put(_Command("_watch", {"job": job}))

    def drain(self) -> list[Message]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def wait(self, predicate, timeout: float | None = None, on_message=None) -> Message | None:
        """Blocking loop for background mode: hand each message to on_message until predicate(message)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                message = self.messages.get(timeout=0.2 if left is None else min(0.2, left))
            except queue.Empty:
                if not self.running:
                    return None
                continue
            if on_message is not None:
                on_message(message)
            if predicate(message):
                return message

    # -- the worker thread
    def _set_connected(self, connected: bool, text: str) -> None:
        if connected != self.connected or not connected:
            self.messages.put(Message("connection", {"connected": connected, "message": text}))
        self.connected = connected

    def _run(self) -> None:
        client_lib = client_module()
        client = client_lib.BackendClient(self.endpoint, timeout=REQUEST_TIMEOUT_S, keys=self.keys)
        subscriber = None
        next_poll = 0.0
        try:
            while not self._stop.is_set():
                # Commands first: a submit or cancel should not wait for the next poll.
                try:
                    command = self._commands.get(timeout=0.05)
                except queue.Empty:
                    command = None
                if command is not None:
                    if command.name == "_watch":
                        self._watched.add(command.args["job"])
                        if subscriber is not None:
                            subscriber.subscribe(command.args["job"])
                        next_poll = 0.0
                    else:
                        self._execute(client, command)
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.poll_interval
                    subscriber = self._poll(client, client_lib, subscriber)
                if subscriber is not None:
                    # Short receive: events stream in between polls without delaying commands.
                    for _ in range(100):
                        event = subscriber.recv(timeout=0.02)
                        if event is None:
                            break
                        self.messages.put(Message("event", event))
        finally:
            if subscriber is not None:
                subscriber.close()
            client.close()

    def _poll(self, client, client_lib, subscriber):
        try:
            if not self.connected:
                info = client.hello()
                self._set_connected(True, f"connected to {self.endpoint} ({info.get('device', '?')})")
                self.messages.put(Message("hello", info))
                if subscriber is not None:
                    subscriber.close()
                subscriber = client.subscribe(sorted(self._watched) or None)
            self.messages.put(Message("jobs", client.list_jobs()))
            for job in sorted(self._watched):
                self.messages.put(Message("status", client.status(job)))
        except client_lib.BackendUnavailable as error:
            self._set_connected(False, f"disconnected: {error}")
        except client_lib.RemoteError as error:
            self.messages.put(Message("error", str(error), request="poll"))
        except Exception as error:  # keep the worker alive; the UI shows what went wrong
            self._set_connected(False, f"disconnected: {type(error).__name__}: {error}")
        return subscriber

    def _execute(self, client, command: _Command) -> None:
        client_lib = client_module()
        try:
            result = getattr(client, command.name)(**command.args)
        except client_lib.BackendUnavailable as error:
            self._set_connected(False, f"disconnected: {error}")
            self.messages.put(Message("error", str(error), request=command.name, token=command.token))
        except Exception as error:
            self.messages.put(
                Message(
                    "error", f"{type(error).__name__}: {error}", request=command.name, token=command.token
                )
            )
        else:
            self.messages.put(Message("result", result, request=command.name, token=command.token))


def build_spec(settings) -> dict:
    """The job spec (backend/pipeline.py's format) from the panel's settings; no bpy types needed."""
    import os

    def path(value: str) -> str:
        return os.path.abspath(os.path.expanduser(value)) if value else value

    if settings.input_kind == "REFERENCE":
        if not settings.data_root or not settings.video:
            raise ValueError("set the data root and the video name (JPEGImages/<video> under the root)")
        source = {
            "kind": "reference",
            "root": path(settings.data_root.rstrip("/\\")),
            "video": settings.video,
        }
    else:
        if not settings.frames_dir or not settings.masks_dir:
            raise ValueError("set the frames folder and the masks folder")
        source = {
            "kind": "folders",
            "frames": path(settings.frames_dir),
            "masks": path(settings.masks_dir),
            "inpainted": path(settings.inpainted_dir) or None,
            "inpainted_masks": path(settings.inpainted_masks_dir) or None,
        }
    overrides: dict[str, Any] = {}
    if settings.stage1_iters:
        overrides["stage1.iters"] = int(settings.stage1_iters)
    if settings.stage2_steps_per_frame:
        overrides["stage2.steps_per_frame"] = int(settings.stage2_steps_per_frame)
    for part in filter(None, (p.strip() for p in settings.extra_overrides.split(","))):
        if "=" not in part:
            raise ValueError(f"override {part!r} must look like key=value, e.g. stage1.iters=300")
        key, value = (s.strip() for s in part.split("=", 1))
        overrides[key] = _parse_value(value)
    spec: dict[str, Any] = {
        "input": source,
        "preset": settings.preset,
        "overrides": overrides,
        "stages": ["static", "motion", "compose"],
        "device": settings.device,
    }
    if settings.guidance_kind == "NONE":
        spec["guidance"] = "none"
    elif settings.guidance_kind == "PATH":
        spec["guidance"] = path(settings.guidance_path)
    elif settings.guidance_kind == "HUB":
        spec["guidance"] = settings.guidance_hub_id
    return spec


def _parse_value(text: str):
    """Numbers and booleans as such; anything else stays a string (the backend parses it as YAML)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
