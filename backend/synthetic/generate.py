"""Writes a synthetic scene: the input in the reference layout plus its ground truth.

    OUT/manifest.json                         what was generated (seed, frames, size, version): the cache key
    OUT/JPEGImages/synthetic/NNNNN.png        input frames (RGB, objects over a flat backdrop)
    OUT/Annotations/synthetic/<obj>/NNNNN.png modal masks (L, 0/255) from Cycles' object-index pass
                                              (one sample through each pixel centre)
    OUT/gt/gt.json                            poses, cameras, views, world relation, file index
    OUT/gt/amodal/<obj>/NNNNN.png             amodal masks at the input view (object rendered alone)
    OUT/gt/views/scene/<view>/NNNNN.png       all objects from the 4 evaluation views (RGBA)
    OUT/gt/views/<obj>/<view>/NNNNN.png       each object alone from its 4 evaluation views (RGBA)
    OUT/gt/depth.npz                          depth [T,H,W] float32 at the input view (0 = nothing)
    OUT/gt/tracks.npz                         points [T,P,2] px, visible [T,P] bool, object [P] ids,
                                              points3d [T,P,3] (method's world); queries at frame 0

Everything is a function of (seed, frames, size, samples): the same arguments give byte-identical
files.  Generation happens in a sibling temporary folder that is renamed into place at the end,
so an interrupted run never leaves a half-written OUT behind that looks cached.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from backend.synthetic.spec import GENERATOR_VERSION, VIDEO_NAME, SyntheticScene, build_scene
from backend.synthetic.views import (
    EVAL_VIEWS,
    object_view_intrinsics,
    object_view_matrices,
    scene_view_matrices,
)

MANIFEST = "manifest.json"
GT_FORMAT = "dreamscene4d-synthetic-gt"
DEPTH_TOLERANCE = 0.02  # relative: a track point deeper than the rendered surface by more is hidden

WORLD_RELATION = (
    "The ground truth is expressed in the method's world (METHOD.md, backend/cameras.py): +Y up, "
    "OpenCV camera axes, the input camera is the reference orbit view (elevation 0, azimuth 0, "
    "radius 2, vertical fov 49.1 deg) looking at the origin, which is the scene centre. Units are "
    "those of that camera distance. Blender renders used shared/coords.py: blender (x, y, z) = "
    "world (x, -z, y). A reconstruction matches this world up to a scaling about the camera "
    "centre, which is why the evaluation views are built from each side's own object centres "
    "(backend/synthetic/views.py)."
)


def manifest_for(seed: int, num_frames: int, width: int, height: int, samples: int) -> dict:
    return {
        "generator": "backend.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_frames": int(num_frames),
        "image_size": [int(width), int(height)],
        "samples": int(samples),
        "video": VIDEO_NAME,
    }


def is_cached(out: Path, manifest: dict) -> bool:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == manifest
    except (OSError, json.JSONDecodeError):
        return False


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def _composite(rgba: np.ndarray, background: tuple[float, float, float]) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32) * 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _query_points(scene: SyntheticScene, depth: np.ndarray, index: np.ndarray, stride: int):
    """Pixel-grid queries inside each object's first-frame mask, away from its silhouette.

    Returns (object ids [P], local points [P, 3] in each object's frame).
    """
    ids, local = [], []
    H, W = index.shape
    for k, obj in enumerate(scene.objects, start=1):
        inside = index == k
        # Keep pixels whose 3x3 neighbourhood is all this object: depth at silhouettes mixes surfaces.
        core = inside.copy()
        core[1:-1, 1:-1] &= (
            inside[:-2, 1:-1]
            & inside[2:, 1:-1]
            & inside[1:-1, :-2]
            & inside[1:-1, 2:]
            & inside[:-2, :-2]
            & inside[2:, 2:]
            & inside[:-2, 2:]
            & inside[2:, :-2]
        )
        core[[0, -1], :] = False
        core[:, [0, -1]] = False
        grid = np.zeros_like(core)
        grid[stride // 2 :: stride, stride // 2 :: stride] = True
        v, u = np.nonzero(core & grid)
        pixels = np.stack([u + 0.5, v + 0.5], axis=1)
        world = scene.camera.unproject(pixels, depth[v, u])
        to_local = np.linalg.inv(obj.poses[0])
        local.append(world @ to_local[:3, :3].T + to_local[:3, 3])
        ids.extend([obj.object_id] * len(u))
    return np.array(ids), np.concatenate(local, axis=0)


def _tracks(scene: SyntheticScene, ids, local, depths, indices):
    T, P = scene.num_frames, len(ids)
    W, H = scene.width, scene.height
    points = np.zeros((T, P, 2), dtype=np.float32)
    points3d = np.zeros((T, P, 3), dtype=np.float32)
    visible = np.zeros((T, P), dtype=bool)
    object_number = {obj.object_id: k for k, obj in enumerate(scene.objects, start=1)}
    numbers = np.array([object_number[i] for i in ids])
    for t in range(T):
        world = np.empty((P, 3))
        for obj in scene.objects:
            sel = ids == obj.object_id
            pose = obj.poses[t]
            world[sel] = local[sel] @ pose[:3, :3].T + pose[:3, 3]
        uv, z = scene.camera.project(world)
        points[t], points3d[t] = uv, world
        col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        inside = (col >= 0) & (col < W) & (row >= 0) & (row < H) & (z > 0)
        c, r = np.clip(col, 0, W - 1), np.clip(row, 0, H - 1)
        surface = depths[t][r, c]
        same_object = indices[t][r, c] == numbers
        visible[t] = inside & same_object & (z <= surface * (1.0 + DEPTH_TOLERANCE))
    return points, visible, points3d


def generate_scene(
    out: str | Path,
    seed: int = 0,
    num_frames: int = 16,
    width: int = 384,
    height: int = 256,
    samples: int = 4,
    force: bool = False,
    log=print,
) -> Path:
    """Generate (or reuse) the synthetic scene in `out`; returns `out`."""
    out = Path(out)
    manifest = manifest_for(seed, num_frames, width, height, samples)
    if not force and is_cached(out, manifest):
        log(f"{out}: cached (manifest matches), nothing to do")
        return out
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not a synthetic scene (no {MANIFEST}); choose another folder"
        )

    from backend.synthetic.blender_render import BlenderRenderer  # needs bpy; imported only here

    started = time.perf_counter()
    scene = build_scene(seed, num_frames, width, height)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    frames_dir = tmp / "JPEGImages" / VIDEO_NAME
    masks_dir = tmp / "Annotations" / VIDEO_NAME
    gt_dir = tmp / "gt"
    renderer = BlenderRenderer(scene, samples=samples)
    timings = {}
    try:
        # Input view: frames, modal masks, depth and index for the tracks.
        tick = time.perf_counter()
        depths, indices = [], []
        cam = scene.camera
        renderer.set_camera(cam.viewmat, cam.K, width, height)
        for t, name in enumerate(scene.frame_names):
            renderer.set_frame(t)
            rgba = renderer.render_rgba()
            depth, index = renderer.render_passes()
            _save_png(frames_dir / f"{name}.png", _composite(rgba, scene.background))
            for k, obj in enumerate(scene.objects, start=1):
                _save_png(masks_dir / obj.object_id / f"{name}.png", ((index == k) * 255).astype(np.uint8))
            depths.append(depth)
            indices.append(index)
        timings["input_frames"] = time.perf_counter() - tick

        # Amodal masks: each object alone at the input view.
        tick = time.perf_counter()
        for obj in scene.objects:
            for t, name in enumerate(scene.frame_names):
                renderer.set_frame(t, visible=[obj.object_id])
                # Only coverage is kept: one sample per pixel is enough for a mask.
                rgba = renderer.render_rgba(samples=1)
                _save_png(
                    gt_dir / "amodal" / obj.object_id / f"{name}.png",
                    ((rgba[..., 3] >= 128) * 255).astype(np.uint8),
                )
        timings["amodal_masks"] = time.perf_counter() - tick

        # Whole-scene evaluation views.
        tick = time.perf_counter()
        first_centers = np.stack([obj.centers[0] for obj in scene.objects])
        scene_views = scene_view_matrices(cam.viewmat, first_centers)
        for view_name, viewmat in scene_views.items():
            renderer.set_camera(viewmat, cam.K, width, height)
            for t, name in enumerate(scene.frame_names):
                renderer.set_frame(t)
                rgba = renderer.render_rgba()
                _save_png(gt_dir / "views" / "scene" / view_name / f"{name}.png", rgba)
        timings["scene_views"] = time.perf_counter() - tick

        # Per-object evaluation views (object alone, pivot at its centre at each frame).
        tick = time.perf_counter()
        K_obj, w_obj, h_obj = object_view_intrinsics(cam.K, height)
        object_views = {}
        for obj in scene.objects:
            object_views[obj.object_id] = object_view_matrices(cam.viewmat, obj.centers)
            for view_name, viewmats in object_views[obj.object_id].items():
                for t, name in enumerate(scene.frame_names):
                    renderer.set_camera(viewmats[t], K_obj, w_obj, h_obj)
                    renderer.set_frame(t, visible=[obj.object_id])
                    rgba = renderer.render_rgba()
                    _save_png(gt_dir / "views" / obj.object_id / view_name / f"{name}.png", rgba)
        timings["object_views"] = time.perf_counter() - tick
    finally:
        renderer.close()

    tick = time.perf_counter()
    stride = max(2, round(height / 64))
    ids, local = _query_points(scene, depths[0], indices[0], stride)
    points, visible, points3d = _tracks(scene, ids, local, depths, indices)
    gt_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        gt_dir / "tracks.npz", points=points, visible=visible, object=ids.astype("<U8"), points3d=points3d
    )
    depth_stack = np.stack(depths).astype(np.float32)
    depth_stack[~np.isfinite(depth_stack)] = 0.0
    np.savez_compressed(gt_dir / "depth.npz", depth=depth_stack)
    timings["tracks"] = time.perf_counter() - tick

    gt = {
        "format": GT_FORMAT,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "video": VIDEO_NAME,
        "num_frames": num_frames,
        "image_size": [width, height],
        "frame_names": scene.frame_names,
        "world": {
            "description": WORLD_RELATION,
            "up": "+Y",
            "camera_axes": "opencv",
            "blender_from_world": [[1, 0, 0], [0, 0, -1], [0, 1, 0]],
            "scene_center": [0.0, 0.0, 0.0],
        },
        "camera": {"K": cam.K.tolist(), "viewmat": cam.viewmat.tolist()},
        "background": list(scene.background),
        "objects": [
            {
                "id": obj.object_id,
                "shape": obj.shape,
                "size": obj.size,
                "size_meaning": "edge length" if obj.shape == "cube" else "radius",
                "pattern": obj.pattern,
                "colors": [list(c) for c in obj.colors],
                "poses": obj.poses.tolist(),
            }
            for obj in scene.objects
        ],
        "views": {
            "list": [{"name": n, "elevation": e, "azimuth": a} for n, e, a in EVAL_VIEWS],
            "definition": "backend/synthetic/views.py",
            "scene": {
                "K": cam.K.tolist(),
                "image_size": [width, height],
                "viewmats": {n: v.tolist() for n, v in scene_views.items()},
                "folder": "views/scene",
            },
            "objects": {
                oid: {
                    "K": K_obj.tolist(),
                    "image_size": [w_obj, h_obj],
                    "viewmats": {n: v.tolist() for n, v in views.items()},
                    "folder": f"views/{oid}",
                }
                for oid, views in object_views.items()
            },
        },
        "files": {
            "frames": f"../JPEGImages/{VIDEO_NAME}",
            "masks": f"../Annotations/{VIDEO_NAME}",
            "amodal_masks": "amodal",
            "depth": "depth.npz",
            "tracks": "tracks.npz",
        },
        "tracks": {
            "query_frame": 0,
            "num_points": int(len(ids)),
            "visibility": f"in the frame, on the object's index pass pixel and at most {DEPTH_TOLERANCE:.0%} "
            "deeper than the rendered depth",
        },
    }
    (gt_dir / "gt.json").write_text(json.dumps(gt, indent=1))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    total = time.perf_counter() - started
    log(
        f"{out}: {num_frames} frames {width}x{height}, {len(ids)} tracks, "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + f", total {total:.1f}s"
    )
    return out
