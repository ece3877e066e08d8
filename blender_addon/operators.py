"""Operators: connect, submit, cancel, import, camera paths, renders, and the local backend process.

Network work goes through backend_link.BackendLink (a worker thread); a `bpy.app.timers` callback
moves its messages onto Blender data on the main thread.  Background runs use the same
`apply_message` from a blocking loop (see cli.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

from . import camera_paths, importer, render
from .backend_link import BackendLink, build_spec
from .preferences import BackendProcess, curve_keys, get_preferences

TIMER_INTERVAL_S = 0.5


class Runtime:
    """Per-Blender-session state that must not live in the .blend (sockets, threads)."""

    link: BackendLink | None = None
    pending_import: dict[str, str] = {}  # job id -> local folder being fetched
    last_error: str = ""


def current_scene():
    return bpy.context.scene or bpy.data.scenes[0]


def job_scene_dir(job: str) -> Path:
    return Path(tempfile.gettempdir()) / "dreamscene4d-jobs" / job


def ensure_link(context=None) -> BackendLink:
    preferences = get_preferences(context)
    endpoint = preferences.address if preferences is not None else "tcp://127.0.0.1:5555"
    link = Runtime.link
    if link is not None and link.running and link.endpoint == endpoint:
        return link
    if link is not None:
        link.stop()
    Runtime.link = BackendLink(endpoint, keys=curve_keys(preferences)).start()
    if not bpy.app.background and not bpy.app.timers.is_registered(poll_timer):
        bpy.app.timers.register(poll_timer, first_interval=0.1, persistent=True)
    return Runtime.link


def stop_link() -> None:
    if Runtime.link is not None:
        Runtime.link.stop()
        Runtime.link = None
    if bpy.app.timers.is_registered(poll_timer):
        bpy.app.timers.unregister(poll_timer)


def _job_id(entry: dict) -> str:
    return str(entry.get("job") or entry.get("id") or "")


def _format_losses(losses: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(losses.items()) if isinstance(v, (int, float)))


def apply_event(settings, event: dict) -> None:
    """One pipeline event ({"type": "progress" | "stage_done" | "log", ...}) onto the progress list."""
    kind = event.get("type")
    if kind == "log":
        settings.job_message = str(event.get("message", ""))[:500]
        return
    if kind not in ("progress", "stage_done"):
        return
    object_id = str(event.get("object") or "scene")
    stage = str(event.get("stage", ""))
    key = f"{object_id}/{stage}"
    item = settings.progress.get(key)
    if item is None:
        item = settings.progress.add()
        item.name, item.object_id, item.stage = key, object_id, stage
    if kind == "stage_done":
        item.fraction, item.eta_s, item.phase = 1.0, 0.0, "done"
        return
    item.phase = str(event.get("phase", ""))
    item.step, item.total = int(event.get("step", 0)), int(event.get("total", 0))
    item.fraction = min(1.0, item.step / item.total) if item.total else 0.0
    item.eta_s = float(event.get("eta_s", 0.0) or 0.0)
    item.losses = _format_losses(event.get("losses", {}) or {})


def apply_message(settings, message) -> None:
    """A BackendLink message onto the scene's settings (main thread only)."""
    if message.kind == "connection":
        settings.connected = bool(message.data["connected"])
        settings.connection_message = message.data["message"][:300]
    elif message.kind == "hello":
        settings.backend_device = str(message.data.get("device", ""))
    elif message.kind == "jobs":
        seen = set()
        for entry in message.data:
            job = _job_id(entry)
            if not job:
                continue
            seen.add(job)
            item = settings.jobs.get(job) or settings.jobs.add()
            item.name = job
            item.state = str(entry.get("state", ""))
            item.label = str(entry.get("name", "") or entry.get("video", "") or "")
            progress = entry.get("progress")
            if isinstance(progress, (int, float)):
                item.progress = min(1.0, max(0.0, float(progress)))
        for index in reversed(range(len(settings.jobs))):
            if settings.jobs[index].name not in seen:
                settings.jobs.remove(index)
    elif message.kind == "status":
        if _job_id(message.data) == settings.job_id:
            settings.job_state = str(message.data.get("state", ""))
            error = message.data.get("error")
            if error:
                settings.job_message = str(error)[:500]
    elif message.kind == "event":
        payload = message.data
        if payload.get("job") == settings.job_id:
            if payload.get("state"):
                settings.job_state = str(payload["state"])
            apply_event(settings, payload.get("event", {}) or {})
    elif message.kind == "result":
        if message.request == "submit":
            settings.job_id = _job_id(message.data)
            settings.job_state = str(message.data.get("state", "queued"))
            settings.progress.clear()
            Runtime.link.watch(settings.job_id)
        elif message.request == "fetch_tree" and message.token:
            folder = message.token["folder"]
            scene = current_scene()
            collection = importer.import_scene(bpy.context, folder)
            scene.dreamscene4d.scene_job_id = message.token["job"]
            if settings.input_kind == "CLIP":
                from . import movie_masks

                movie_masks.finish_import(scene, settings, importer.load_scene(folder))
            settings.job_message = f"imported {collection.name}"
        elif message.request == "render_path" and message.token:
            token = message.token
            paths = render.write_frames(message.data, token["out_dir"])
            movie = render.write_movie(paths, Path(token["out_dir"]) / "backend.mp4", token["fps"])
            settings.job_message = f"backend render: {len(paths)} frames in {token['out_dir']}" + (
                f", movie {movie.name}" if movie else ""
            )
        elif message.request in ("cancel", "resume", "delete"):
            settings.job_message = f"{message.request}: {json.dumps(message.data)[:200]}"
    elif message.kind == "error":
        settings.job_message = f"{message.request}: {message.data}"[:500]
        Runtime.last_error = str(message.data)


def _tag_redraw() -> None:
    window_manager = bpy.context.window_manager
    if window_manager is None:
        return
    for window in window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


def poll_timer():
    """Timer callback: drain the worker's queue without waiting; returns the next interval."""
    link = Runtime.link
    if link is None:
        return None
    settings = current_scene().dreamscene4d
    messages = link.drain()
    for message in messages:
        try:
            apply_message(settings, message)
        except Exception as error:  # a bad reply must not kill the timer
            settings.job_message = f"{type(error).__name__}: {error}"[:500]
    if messages:
        _tag_redraw()
    return TIMER_INTERVAL_S


class DREAMSCENE4D_OT_connect(bpy.types.Operator):
    bl_idname = "dreamscene4d.connect"
    bl_label = "Connect"
    bl_description = "Connect to the backend and keep watching its jobs"

    def execute(self, context):
        try:
            ensure_link(context)
        except (ValueError, OSError, RuntimeError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        context.scene.dreamscene4d.connection_message = "connecting..."
        return {"FINISHED"}


class DREAMSCENE4D_OT_disconnect(bpy.types.Operator):
    bl_idname = "dreamscene4d.disconnect"
    bl_label = "Disconnect"

    def execute(self, context):
        stop_link()
        settings = context.scene.dreamscene4d
        settings.connected, settings.connection_message = False, "disconnected"
        return {"FINISHED"}


def submit_request(settings) -> tuple[dict, dict | None]:
    """(spec, uploads or None) for the current settings; uploads read the images when asked to."""
    if settings.input_kind == "CLIP":
        from . import movie_masks

        return movie_masks.submit_request(settings.id_data, settings)
    spec = build_spec(settings)
    if not settings.upload_inputs:
        return spec, None
    if spec["input"]["kind"] != "reference":
        raise ValueError("uploading works for the reference layout (data root + video); use that input")
    from ._shared import client_module

    uploads = client_module().collect_reference_uploads(spec["input"]["root"], spec["input"]["video"])
    spec["input"] = {"kind": "upload", "video": spec["input"]["video"]}
    return spec, uploads


class DREAMSCENE4D_OT_submit(bpy.types.Operator):
    bl_idname = "dreamscene4d.submit"
    bl_label = "Submit"
    bl_description = "Send the job to the backend"

    def execute(self, context):
        settings = context.scene.dreamscene4d
        try:
            spec, uploads = submit_request(settings)
            link = ensure_link(context)
        except (ValueError, OSError, RuntimeError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        link.call("submit", spec=spec, uploads=uploads)
        settings.job_state, settings.job_message = "submitting", ""
        return {"FINISHED"}


class DREAMSCENE4D_OT_clip_mask_add(bpy.types.Operator):
    bl_idname = "dreamscene4d.clip_mask_add"
    bl_label = "Add Mask"
    bl_description = "Add an object slot for a Mask data-block (the mask's name names the object)"

    def execute(self, context):
        settings = context.scene.dreamscene4d
        settings.clip_masks.add()
        settings.clip_masks_index = len(settings.clip_masks) - 1
        return {"FINISHED"}


class DREAMSCENE4D_OT_clip_mask_remove(bpy.types.Operator):
    bl_idname = "dreamscene4d.clip_mask_remove"
    bl_label = "Remove Mask"

    def execute(self, context):
        settings = context.scene.dreamscene4d
        if 0 <= settings.clip_masks_index < len(settings.clip_masks):
            settings.clip_masks.remove(settings.clip_masks_index)
            settings.clip_masks_index = max(0, settings.clip_masks_index - 1)
        return {"FINISHED"}


class DREAMSCENE4D_OT_cancel(bpy.types.Operator):
    bl_idname = "dreamscene4d.cancel"
    bl_label = "Cancel"
    bl_description = "Stop the job at its next step (its checkpoints are kept)"
    job: StringProperty()

    def execute(self, context):
        settings = context.scene.dreamscene4d
        job = self.job or settings.job_id
        if not job:
            self.report({"ERROR"}, "no job to cancel")
            return {"CANCELLED"}
        ensure_link(context).call("cancel", job=job)
        return {"FINISHED"}


class DREAMSCENE4D_OT_watch(bpy.types.Operator):
    bl_idname = "dreamscene4d.watch"
    bl_label = "Watch"
    bl_description = "Show this job's progress"
    job: StringProperty()

    def execute(self, context):
        settings = context.scene.dreamscene4d
        settings.job_id, settings.job_state = self.job, ""
        settings.progress.clear()
        ensure_link(context).watch(self.job)
        return {"FINISHED"}


class DREAMSCENE4D_OT_import_job(bpy.types.Operator):
    bl_idname = "dreamscene4d.import_job"
    bl_label = "Import Result"
    bl_description = "Fetch the finished job's scene from the backend and import it"
    job: StringProperty()

    def execute(self, context):
        settings = context.scene.dreamscene4d
        job = self.job or settings.job_id
        if not job:
            self.report({"ERROR"}, "no job selected")
            return {"CANCELLED"}
        folder = job_scene_dir(job)
        ensure_link(context).call(
            "fetch_tree", token={"job": job, "folder": str(folder)}, job=job, path="out", dest_dir=folder
        )
        settings.job_message = f"fetching {job}..."
        return {"FINISHED"}


class DREAMSCENE4D_OT_import_scene(bpy.types.Operator):
    bl_idname = "dreamscene4d.import_scene"
    bl_label = "Import Scene Folder"
    bl_description = "Import a scene folder (scene.json + objects/) written by the backend"
    directory: StringProperty(subtype="DIR_PATH")

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        path = self.directory or context.scene.dreamscene4d.import_path
        try:
            collection = importer.import_scene(context, bpy.path.abspath(path))
        except (ValueError, OSError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, f"imported {collection.name}")
        return {"FINISHED"}


PATH_ITEMS = [
    ("input", "Input Camera", "The camera the video was shot from"),
    ("fixed", "Fixed", "The input view, for the whole looped video"),
    ("orbit_horizontal", "Horizontal Orbit", "Azimuth 0 -> 360 around the orbit centre"),
    ("orbit_elevation", "Elevation Orbit", "Elevation 75 -> -75 -> 75 around the orbit centre"),
]


def _imported_scene(context):
    settings = context.scene.dreamscene4d
    if not settings.scene_path:
        raise ValueError("import a scene first")
    return importer.load_scene(settings.scene_path)


class DREAMSCENE4D_OT_create_camera(bpy.types.Operator):
    bl_idname = "dreamscene4d.create_camera"
    bl_label = "Create Camera"
    bl_description = "A keyframed camera matching the backend's camera path, made the active camera"
    path: EnumProperty(items=PATH_ITEMS)

    def execute(self, context):
        try:
            ds_scene = _imported_scene(context)
        except (ValueError, OSError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        if self.path == "input":
            camera = camera_paths.create_input_camera(context.scene, ds_scene)
        else:
            camera = camera_paths.create_path_camera(context.scene, ds_scene, self.path)
        context.scene.camera = camera
        return {"FINISHED"}


class DREAMSCENE4D_OT_render_blender(bpy.types.Operator):
    bl_idname = "dreamscene4d.render_blender"
    bl_label = "Render Path"
    bl_description = (
        "Render the active camera over the scene's frame range with Blender into the output folder"
    )

    def execute(self, context):
        scene = context.scene
        if scene.camera is None:
            self.report({"ERROR"}, "no active camera")
            return {"CANCELLED"}
        out_dir = Path(bpy.path.abspath(scene.dreamscene4d.output_dir)) / f"blender_{scene.camera.name}"
        paths = render.render_animation(scene, scene.camera, out_dir, scene.frame_start, scene.frame_end)
        movie = render.write_movie(paths, out_dir / "blender.mp4", scene.render.fps / scene.render.fps_base)
        self.report({"INFO"}, f"{len(paths)} frames in {out_dir}" + (f", {movie.name}" if movie else ""))
        return {"FINISHED"}


def render_with_backend_request(scene) -> tuple[dict, dict]:
    """(render_path arguments, token) for the active camera over the scene's frame range."""
    settings = scene.dreamscene4d
    job = settings.scene_job_id or settings.job_id
    if not job:
        raise ValueError(
            "the imported scene has no backend job; import it from a job to render with the backend"
        )
    if scene.camera is None:
        raise ValueError("no active camera")
    ds_scene = importer.load_scene(settings.scene_path)
    frames = list(range(scene.frame_start, scene.frame_end + 1))
    cameras = camera_paths.backend_cameras(scene, scene.camera, frames, ds_scene.num_frames)
    out_dir = Path(bpy.path.abspath(settings.output_dir)) / f"backend_{scene.camera.name}"
    arguments = {"job": job, "cameras": cameras, "objects": camera_paths.object_adjustments(settings)}
    token = {"out_dir": str(out_dir), "fps": scene.render.fps / scene.render.fps_base}
    return arguments, token


class DREAMSCENE4D_OT_render_backend(bpy.types.Operator):
    bl_idname = "dreamscene4d.render_backend"
    bl_label = "Render with Backend"
    bl_description = (
        "Send the active camera's pose and intrinsics per frame to the backend and save its frames"
    )

    def execute(self, context):
        try:
            arguments, token = render_with_backend_request(context.scene)
            ensure_link(context).call("render_path", token=token, **arguments)
        except (ValueError, OSError, RuntimeError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        context.scene.dreamscene4d.job_message = f"backend rendering {len(arguments['cameras'])} frames..."
        return {"FINISHED"}


class DREAMSCENE4D_OT_backend_start(bpy.types.Operator):
    bl_idname = "dreamscene4d.backend_start"
    bl_label = "Start Backend"
    bl_description = "Run the backend as a child process of Blender (stopped when Blender quits)"

    def execute(self, context):
        preferences = get_preferences(context)
        if preferences is None:
            self.report({"ERROR"}, "the add-on preferences are not available")
            return {"CANCELLED"}
        bind = preferences.address.replace("localhost", "127.0.0.1")
        try:
            log = BackendProcess.start(
                bpy.path.abspath(preferences.backend_python),
                bpy.path.abspath(preferences.backend_root),
                bind,
                bpy.path.abspath(preferences.state_dir),
            )
        except (OSError, RuntimeError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        self.report({"INFO"}, f"backend started; log {log}")
        return {"FINISHED"}


class DREAMSCENE4D_OT_backend_stop(bpy.types.Operator):
    bl_idname = "dreamscene4d.backend_stop"
    bl_label = "Stop Backend"

    def execute(self, context):
        code = BackendProcess.stop()
        self.report({"INFO"}, "no backend was started here" if code is None else f"backend stopped ({code})")
        return {"FINISHED"}


class DREAMSCENE4D_OT_backend_show_log(bpy.types.Operator):
    bl_idname = "dreamscene4d.backend_show_log"
    bl_label = "Show Log"
    bl_description = (
        "Load the backend process's log into a text block (Text Editor: 'DreamScene4D backend log')"
    )

    def execute(self, context):
        if BackendProcess.log_path is None or not BackendProcess.log_path.exists():
            self.report({"WARNING"}, "no backend log yet")
            return {"CANCELLED"}
        text = bpy.data.texts.get("DreamScene4D backend log") or bpy.data.texts.new(
            "DreamScene4D backend log"
        )
        text.from_string(BackendProcess.log_path.read_text(errors="replace"))
        self.report({"INFO"}, f"log loaded ({BackendProcess.log_path})")
        return {"FINISHED"}


classes = (
    DREAMSCENE4D_OT_connect,
    DREAMSCENE4D_OT_disconnect,
    DREAMSCENE4D_OT_submit,
    DREAMSCENE4D_OT_clip_mask_add,
    DREAMSCENE4D_OT_clip_mask_remove,
    DREAMSCENE4D_OT_cancel,
    DREAMSCENE4D_OT_watch,
    DREAMSCENE4D_OT_import_job,
    DREAMSCENE4D_OT_import_scene,
    DREAMSCENE4D_OT_create_camera,
    DREAMSCENE4D_OT_render_blender,
    DREAMSCENE4D_OT_render_backend,
    DREAMSCENE4D_OT_backend_start,
    DREAMSCENE4D_OT_backend_stop,
    DREAMSCENE4D_OT_backend_show_log,
)
