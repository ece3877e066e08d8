"""Background runs of the add-on, without the UI.

    blender -b -P blender_addon/cli.py -- run --data ROOT --video NAME --out OUT [options]
    blender -b -P blender_addon/cli.py -- import --scene SCENE_DIR --out OUT [options]
    python -m blender_addon.cli run ...            (the same through the bpy module)

`run` starts a backend child process (--start-backend) or connects to one (--address), submits
the job, prints its progress from a blocking loop (timers never fire in background mode), fetches
and imports the scene, creates the input and the three path cameras, renders them with Blender
and with the backend, and saves OUT/scene.blend.  `import` does the Blender half on a scene
folder that already exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import bpy

# After a status poll reports the job's end, how long to keep reading its event stream for the
# events still on their way (the stream's own final "state" event ends the wait sooner).
FINAL_EVENTS_GRACE_S = 3.0


def _addon_package():
    """The add-on package, importing and registering it when Blender has not enabled it."""
    if __package__:  # python -m blender_addon.cli, or imported from the enabled extension
        package = importlib.import_module(__package__)
    else:
        # `blender -P path/cli.py` runs this file as a plain script: make its package importable.
        # Repository checkout: blender_addon/ beside shared/; extension folder: shared/ inside it.
        here = Path(__file__).resolve().parent
        sys.path.insert(0, str(here.parent))
        package = importlib.import_module(here.name)
    if not hasattr(bpy.types.Scene, "dreamscene4d"):
        package.register()
    return package


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--out", type=Path, required=True, help="renders and scene.blend go here")
        p.add_argument(
            "--loops", type=int, default=1, help="camera paths last the video looped this many times"
        )
        p.add_argument(
            "--engine", choices=["CYCLES", "EEVEE", "NONE"], default="CYCLES", help="Blender renders"
        )
        p.add_argument("--samples", type=int, default=16, help="Cycles samples")
        p.add_argument("--resolution-percent", type=int, default=100)
        p.add_argument("--splat-shape", choices=["POINTS", "ELLIPSOIDS"], default="POINTS")
        p.add_argument(
            "--paths", default="fixed,orbit_horizontal,orbit_elevation", help="camera paths to render"
        )

    run = sub.add_parser("run", help="submit to a backend, wait, import, render, save")
    common(run)
    run.add_argument(
        "--data", type=Path, help="reference-layout root (JPEGImages/<video>, Annotations/<video>)"
    )
    run.add_argument("--video")
    run.add_argument("--frames", type=Path, help="frames folder (instead of --data/--video)")
    run.add_argument("--masks", type=Path, help="masks folder (with --frames)")
    run.add_argument("--preset", default="lite")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--guidance", default=None, help="none | local folder | hub id (default: the preset's)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--upload", action="store_true", help="send the images (backend without this disk)")
    run.add_argument("--address", default="tcp://127.0.0.1:5555")
    run.add_argument("--server-key", type=Path, help="server public key file (remote backends)")
    run.add_argument("--client-key", type=Path, help="client secret key file (remote backends)")
    run.add_argument("--start-backend", action="store_true", help="run the backend as a child process")
    run.add_argument("--backend-python", default=None, help="Python with the backend (default: this one)")
    run.add_argument("--backend-root", type=Path, default=None, help="checkout holding backend/")
    run.add_argument(
        "--state", type=Path, default=None, help="backend state folder (default OUT/backend_state)"
    )
    run.add_argument("--no-backend-render", action="store_true")
    run.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the job")

    imp = sub.add_parser("import", help="import an existing scene folder, make cameras, render, save")
    common(imp)
    imp.add_argument("--scene", type=Path, required=True)
    return parser.parse_args(argv)


def _say(text: str) -> None:
    print(f"[dreamscene4d] {text}", flush=True)


def _configure_render(scene, args) -> None:
    if args.engine == "CYCLES":
        scene.render.engine = "CYCLES"
        scene.cycles.device = "CPU" if not _has_gpu_cycles() else "GPU"
        scene.cycles.samples = args.samples
        scene.cycles.use_denoising = False
    elif args.engine == "EEVEE":
        engines = bpy.types.RenderSettings.bl_rna.properties["engine"].enum_items.keys()
        scene.render.engine = "BLENDER_EEVEE_NEXT" if "BLENDER_EEVEE_NEXT" in engines else "BLENDER_EEVEE"
    scene.render.resolution_percentage = args.resolution_percent
    scene.render.film_transparent = True


def _has_gpu_cycles() -> bool:
    try:
        preferences = bpy.context.preferences.addons["cycles"].preferences
        preferences.refresh_devices()
        return any(device.type != "CPU" and device.use for device in preferences.devices)
    except (KeyError, AttributeError):
        return False


def blender_side(args, scene_dir: Path, job: str | None = None, link=None) -> dict:
    """Import, cameras, Blender renders, backend renders (when linked), save; returns what was written."""
    from . import camera_paths, importer, operators, render

    scene = bpy.context.scene
    settings = scene.dreamscene4d
    settings.splat_shape = args.splat_shape
    settings.path_loops = max(1, args.loops)
    collection = importer.import_scene(bpy.context, scene_dir)
    settings.scene_job_id = job or ""
    ds_scene = importer.load_scene(scene_dir)
    _say(f"imported {collection.name}: {len(ds_scene.objects)} objects, {ds_scene.num_frames} frames")
    _configure_render(scene, args)
    out = args.out.resolve()
    written: dict = {"renders": {}, "backend_renders": {}}
    input_camera = camera_paths.create_input_camera(scene, ds_scene)
    scene.camera = input_camera
    paths = [p for p in args.paths.split(",") if p]
    for path in paths:
        camera = camera_paths.create_path_camera(scene, ds_scene, path)
        frames = ds_scene.num_frames * settings.path_loops
        if args.engine != "NONE":
            folder = out / "renders" / f"blender_{path}"
            started = time.perf_counter()
            images = render.render_animation(
                scene, camera, folder, scene.frame_start, scene.frame_start + frames - 1
            )
            movie = render.write_movie(images, folder / f"{path}.mp4", ds_scene.fps)
            _say(f"Blender {path}: {len(images)} frames in {time.perf_counter() - started:.1f}s -> {folder}")
            written["renders"][path] = {"frames": len(images), "movie": str(movie) if movie else None}
        if link is not None and job:
            scene.camera = camera
            scene.frame_end = scene.frame_start + frames - 1
            arguments, token = operators.render_with_backend_request(scene)
            token["out_dir"] = str(out / "renders" / f"backend_{path}")
            started = time.perf_counter()
            result = call(link, "render_path", arguments, timeout=3600.0)
            images = render.write_frames(result, token["out_dir"])
            movie = render.write_movie(images, Path(token["out_dir"]) / f"{path}.mp4", ds_scene.fps)
            _say(
                f"backend {path}: {len(images)} frames in {time.perf_counter() - started:.1f}s -> {token['out_dir']}"
            )
            written["backend_renders"][path] = {"frames": len(images), "movie": str(movie) if movie else None}
    scene.camera = input_camera
    scene.frame_set(scene.frame_start)
    out.mkdir(parents=True, exist_ok=True)
    blend = out / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    _say(f"saved {blend}")
    written["blend"] = str(blend)
    return written


def call(link, name: str, arguments: dict, timeout: float):
    """A request through the link, waited for in a blocking loop; raises on an error reply."""
    token = object()
    link.call(name, token=token, **arguments)
    message = link.wait(lambda m: m.token is token, timeout=timeout)
    if message is None:
        raise TimeoutError(f"{name}: no answer from the backend within {timeout:.0f}s")
    if message.kind == "error":
        raise RuntimeError(f"{name}: {message.data}")
    return message.data


def _event_subject(event: dict) -> str:
    # Composition works on the whole scene: its events carry no object id.
    return "scene" if event.get("object") is None else str(event["object"])


def _print_progress(settings, message) -> None:
    if message.kind == "event" and message.data.get("job") == settings.job_id:
        event = message.data.get("event", {}) or {}
        if event.get("type") == "progress":
            losses = ", ".join(f"{k} {v:.4g}" for k, v in sorted((event.get("losses") or {}).items()))
            _say(
                f"{_event_subject(event)} {event.get('stage')} {event.get('phase', '')} "
                f"{event.get('step')}/{event.get('total')} eta {event.get('eta_s', 0):.0f}s {losses}"
            )
        elif event.get("type") == "stage_done":
            _say(f"{_event_subject(event)} {event.get('stage')} done in {event.get('seconds', 0):.1f}s")
        elif event.get("type") == "log":
            _say(str(event.get("message")))
    elif message.kind == "connection":
        _say(message.data["message"])


def run_backend_job(args) -> dict:
    from . import operators
    from .backend_link import BackendLink
    from .preferences import BackendProcess

    scene = bpy.context.scene
    settings = scene.dreamscene4d
    out = args.out.resolve()
    if args.start_backend:
        root = args.backend_root or Path(__file__).resolve().parent.parent
        state = args.state or out / "backend_state"
        log = BackendProcess.start(args.backend_python or sys.executable, str(root), args.address, str(state))
        _say(f"started backend pid {BackendProcess.process.pid}; log {log}")
    keys = None
    if args.server_key:
        from ._shared import client_module

        keys = client_module().CurveKeys.from_files(args.server_key, args.client_key)
    link = BackendLink(args.address, keys=keys, poll_interval=0.5).start()
    operators.Runtime.link = link
    try:
        connected = link.wait(
            lambda m: m.kind == "connection" and m.data["connected"],
            timeout=120.0,
            on_message=lambda m: m.kind != "result" and operators.apply_message(settings, m),
        )
        if connected is None:
            raise ConnectionError(f"no backend answered at {args.address} within 120s")
        if args.frames:
            settings.input_kind, settings.frames_dir, settings.masks_dir = (
                "FOLDERS",
                str(args.frames),
                str(args.masks),
            )
        else:
            settings.input_kind, settings.data_root, settings.video = "REFERENCE", str(args.data), args.video
        settings.preset = args.preset
        settings.extra_overrides = ",".join(args.overrides)
        settings.device = args.device
        settings.upload_inputs = args.upload
        spec, uploads = operators.submit_request(settings)
        if args.guidance is not None:
            spec["guidance"] = args.guidance
        reply = call(link, "submit", {"spec": spec, "uploads": uploads}, timeout=600.0)
        job = str(reply.get("id") or reply.get("job"))
        settings.job_id = job
        link.watch(job)
        _say(f"submitted job {job}")

        final_states = ("done", "failed", "cancelled")
        polled_final_at = None

        def finished(message) -> bool:
            nonlocal polled_final_at
            if message.kind != "result":  # results are claimed by call(); the rest updates the settings
                operators.apply_message(settings, message)
            _print_progress(settings, message)
            if message.kind == "event" and message.data.get("job") == job:
                event = message.data.get("event") or {}
                if event.get("type") == "state" and event.get("state") in final_states:
                    return True  # the job's last event: everything before it has been printed
            if settings.job_state not in final_states:
                return False
            # A status poll can report the end before the event stream has delivered the job's
            # last events (composition's "done", say); keep reading them for a moment.
            polled_final_at = polled_final_at or time.monotonic()
            return time.monotonic() - polled_final_at > FINAL_EVENTS_GRACE_S

        if link.wait(finished, timeout=args.timeout) is None:
            raise TimeoutError(
                f"job {job} did not finish within {args.timeout:.0f}s (state {settings.job_state})"
            )
        if settings.job_state != "done":
            raise RuntimeError(f"job {job} ended {settings.job_state}: {settings.job_message}")
        scene_dir = out / "scene"
        call(link, "fetch_tree", {"job": job, "path": "out", "dest_dir": scene_dir}, timeout=3600.0)
        _say(f"fetched the scene into {scene_dir}")
        written = blender_side(args, scene_dir, job, None if args.no_backend_render else link)
        written["job"] = job
        return written
    finally:
        link.stop()
        operators.Runtime.link = None
        if args.start_backend:
            _say(f"stopped backend ({BackendProcess.stop()})")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    args = parse_args(argv)
    _addon_package()
    if not bpy.data.filepath:
        # No .blend given on the command line: start from an empty scene, not the startup file's
        # cube, light and camera (keeps preferences and enabled add-ons).
        bpy.ops.wm.read_homefile(use_empty=True)
        if not hasattr(bpy.types.Scene, "dreamscene4d"):
            _addon_package()
    try:
        if args.command == "import":
            blender_side(args, args.scene.resolve())
        else:
            run_backend_job(args)
    except (OSError, RuntimeError, ValueError) as error:
        _say(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    if __package__:
        code = main()
    else:
        # Run as a plain script: hand over to this module inside its package, where the
        # add-on's relative imports work.
        code = importlib.import_module(f"{_addon_package().__name__}.cli").main()
    if bpy.app.background:
        sys.exit(code)
