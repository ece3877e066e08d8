"""Blender cameras for the scene's input view and the backend's three camera paths.

Poses come from shared.coords (the backend's orbit definition and the one Y-up -> Z-up
conversion); intrinsics reproduce the input camera's K through lens, sensor fit and shift.
The inverse direction (a Blender camera -> viewmat and K per frame) feeds "Render with backend".
"""

from __future__ import annotations

import bpy
import numpy as np
from mathutils import Matrix

from ._shared import coords, scene_format

CAMERA_PREFIX = "DS4D Camera"
PATH_LABELS = {"fixed": "Fixed", "orbit_horizontal": "Horizontal Orbit", "orbit_elevation": "Elevation Orbit"}


def apply_intrinsics(
    camera_data: bpy.types.Camera, scene: bpy.types.Scene, K: np.ndarray, width: int, height: int
):
    lens = coords.blender_lens_from_K(K, width, height)
    camera_data.type = "PERSP"
    camera_data.sensor_fit = lens["sensor_fit"]
    camera_data.sensor_width = lens["sensor_width"]
    camera_data.sensor_height = lens["sensor_height"]
    camera_data.lens = lens["lens"]
    camera_data.shift_x = lens["shift_x"]
    camera_data.shift_y = lens["shift_y"]
    camera_data.clip_start, camera_data.clip_end = 0.01, 100.0  # the backend's near / far
    render = scene.render
    render.resolution_x, render.resolution_y, render.resolution_percentage = width, height, 100
    render.pixel_aspect_x, render.pixel_aspect_y = lens["pixel_aspect_x"], lens["pixel_aspect_y"]


def _new_camera(scene: bpy.types.Scene, name: str, collection=None) -> bpy.types.Object:
    existing = bpy.data.objects.get(name)
    if existing is not None and existing.type == "CAMERA":
        existing.animation_data_clear()
        return existing
    data = bpy.data.cameras.new(name)
    obj = bpy.data.objects.new(name, data)
    (collection or scene.collection).objects.link(obj)
    return obj


def create_input_camera(
    scene: bpy.types.Scene, ds_scene: scene_format.Scene, collection=None
) -> bpy.types.Object:
    """A static camera where the video was shot from, with the input K and image size."""
    obj = _new_camera(scene, f"{CAMERA_PREFIX} Input", collection)
    width, height = ds_scene.image_size
    apply_intrinsics(obj.data, scene, ds_scene.K, width, height)
    obj.matrix_world = Matrix(coords.viewmat_to_blender_matrix_world(ds_scene.viewmat).tolist())
    return obj


def path_viewmats(ds_scene: scene_format.Scene, path: str, num_frames: int) -> np.ndarray:
    """[F, 4, 4] backend world->camera matrices of a camera path (the backend's own definition)."""
    elevation, azimuth = coords.orbit_angles(path, num_frames)
    return np.stack(
        [
            coords.orbit_viewmat(ds_scene.viewmat, ds_scene.orbit_center, e, a)
            for e, a in zip(elevation, azimuth)
        ]
    )


def create_path_camera(
    scene: bpy.types.Scene,
    ds_scene: scene_format.Scene,
    path: str,
    num_frames: int | None = None,
    collection=None,
) -> bpy.types.Object:
    """A camera keyframed on every frame of the path from scene.frame_start; extends frame_end to fit.

    num_frames defaults to the video looped `loops` times (METHOD.md: 5), as the backend renders.
    """
    settings = scene.dreamscene4d
    if num_frames is None:
        num_frames = ds_scene.num_frames * max(1, int(settings.path_loops))
    obj = _new_camera(scene, f"{CAMERA_PREFIX} {PATH_LABELS[path]}", collection)
    width, height = ds_scene.image_size
    apply_intrinsics(obj.data, scene, ds_scene.K, width, height)
    obj.rotation_mode = "QUATERNION"
    # Keys on every frame: the pose at each rendered frame is exactly the backend's.
    for i, viewmat in enumerate(path_viewmats(ds_scene, path, num_frames)):
        frame = scene.frame_start + i
        matrix = Matrix(coords.viewmat_to_blender_matrix_world(viewmat).tolist())
        location, rotation, _ = matrix.decompose()
        if i > 0:  # keep quaternions on one hemisphere so interpolation never takes the long way
            previous = obj.rotation_quaternion
            if previous.dot(rotation) < 0:
                rotation.negate()
        obj.location, obj.rotation_quaternion = location, rotation
        obj.keyframe_insert("location", frame=frame)
        obj.keyframe_insert("rotation_quaternion", frame=frame)
    action = obj.animation_data.action
    for fcurve in _fcurves(action):
        for key in fcurve.keyframe_points:
            key.interpolation = "LINEAR"
    scene.frame_end = max(scene.frame_end, scene.frame_start + num_frames - 1)
    obj["ds4d_path"] = path
    return obj


def _fcurves(action):
    # Blender 4.4+ keeps F-curves in layered action channelbags; older versions on the action.
    if hasattr(action, "fcurves") and len(getattr(action, "fcurves", ())) > 0:
        return list(action.fcurves)
    curves = []
    for layer in getattr(action, "layers", ()):
        for strip in layer.strips:
            for bag in getattr(strip, "channelbags", ()):
                curves.extend(bag.fcurves)
    return curves


def blender_camera_K(camera_obj: bpy.types.Object, scene: bpy.types.Scene) -> tuple[np.ndarray, int, int]:
    render = scene.render
    width = int(render.resolution_x * render.resolution_percentage / 100)
    height = int(render.resolution_y * render.resolution_percentage / 100)
    data = camera_obj.data
    if data.type != "PERSP":
        raise ValueError(
            f"camera {camera_obj.name} is {data.type}; the backend renders perspective cameras only"
        )
    K = coords.K_from_blender_lens(
        data.lens,
        data.sensor_width,
        data.sensor_height,
        data.sensor_fit,
        data.shift_x,
        data.shift_y,
        width,
        height,
        render.pixel_aspect_x,
        render.pixel_aspect_y,
    )
    return K, width, height


def backend_cameras(
    scene: bpy.types.Scene, camera_obj: bpy.types.Object, frames: list[int], num_scene_frames: int
) -> list[dict]:
    """The camera's pose and intrinsics at each Blender frame, as render_path takes them."""
    settings = scene.dreamscene4d
    from .importer import frame_index

    current = scene.frame_current
    cameras = []
    try:
        for frame in frames:
            scene.frame_set(frame)
            K, width, height = blender_camera_K(camera_obj, scene)
            viewmat = coords.blender_matrix_world_to_viewmat(np.array(camera_obj.matrix_world))
            cameras.append(
                {
                    "viewmat": viewmat.tolist(),
                    "K": K.tolist(),
                    "width": width,
                    "height": height,
                    "frame": frame_index(
                        frame, scene.frame_start, num_scene_frames, bool(settings.loop_motion)
                    ),
                }
            )
    finally:
        scene.frame_set(current)
    return cameras


def object_adjustments(settings) -> dict[str, dict]:
    """Per-object visibility and depth values as render_path's `objects` argument."""
    return {
        item.name: {
            "visible": bool(item.visible),
            "depth_scale": float(item.depth_scale),
            "depth_offset": float(item.depth_offset),
        }
        for item in settings.objects
    }
