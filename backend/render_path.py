"""Render a finished scene along a list of cameras (the `render_path` request).

Cameras are {viewmat 4x4 world->camera (OpenCV axes), K 3x3 in pixels, width, height, frame}.
Per-object adjustments mirror the artist's depth controls of stage 3: `depth_scale` k scales an
object along the rays of the scene's INPUT camera about its centre C (positions C - (C - mu) k,
scales s k, so the object looks unchanged from the input view while its depth changes), and
`depth_offset` moves the object rigidly along the ray from C through its per-frame centroid.
The input camera is used, not each render camera, so an adjusted object stays put along a path.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from backend.raster import rasterize
from shared.coords import apply_depth_adjustment
from shared.scene import read_scene

MAX_BATCH = 8  # cameras of one frame and size rendered in one rasterize call


def _frame_gaussians(scene, frame: int, adjustments: dict[str, dict]) -> list[np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("means", "quats", "scales", "opacities", "colors")}
    for object_id, arrays in scene.objects.items():
        adj = adjustments.get(object_id, {})
        if not adj.get("visible", True):
            continue
        means = np.asarray(arrays["means"][frame], dtype=np.float64)
        scales = np.asarray(arrays["scales"][frame], dtype=np.float64)
        # The same rule as the add-on's preview (shared.coords), so both sides agree.
        means, scales = apply_depth_adjustment(
            means,
            scales,
            scene.viewmat,
            float(adj.get("depth_scale", 1.0)),
            float(adj.get("depth_offset", 0.0)),
        )
        parts["means"].append(means)
        parts["scales"].append(scales)
        parts["quats"].append(np.asarray(arrays["quats"][frame]))
        parts["opacities"].append(np.asarray(arrays["opacities"]))
        parts["colors"].append(np.asarray(arrays["colors"]))
    if not parts["means"]:
        return [np.zeros((0, d), np.float32) for d in (3, 4, 3)] + [
            np.zeros(0, np.float32),
            np.zeros((0, 3), np.float32),
        ]
    return [
        np.concatenate(parts[k]).astype(np.float32)
        for k in ("means", "quats", "scales", "opacities", "colors")
    ]


def encode_png(color: np.ndarray, alpha: np.ndarray | None) -> bytes:
    """color [H,W,3] float in [0,1] RGB (alpha [H,W,1] or None) -> PNG bytes (RGB or RGBA)."""
    rgb = np.clip(np.rint(color * 255.0), 0, 255).astype(np.uint8)
    image = rgb[..., ::-1]  # OpenCV writes BGR
    if alpha is not None:
        a = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
        image = np.concatenate([image, a], axis=-1)
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def render_path(
    scene_dir: str | Path,
    cameras: list[dict],
    objects: dict[str, dict] | None = None,
    background: list[float] | None = None,
    alpha: bool = False,
    device: str | None = None,
) -> list[bytes]:
    """One PNG per camera, in order. Raises ValueError naming a bad frame or object id."""
    scene = read_scene(scene_dir)
    objects = objects or {}
    unknown = sorted(set(objects) - set(scene.objects))
    if unknown:
        raise ValueError(f"objects {unknown} are not in the scene; it has {sorted(scene.objects)}")
    num_frames = scene.num_frames
    for i, cam in enumerate(cameras):
        if not 0 <= int(cam.get("frame", 0)) < num_frames:
            raise ValueError(
                f"cameras[{i}].frame is {cam.get('frame')}; the scene has frames 0..{num_frames - 1}"
            )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    bg = torch.tensor(
        background if background is not None else [0.0, 0.0, 0.0], dtype=torch.float32, device=device
    )
    pngs: list[bytes | None] = [None] * len(cameras)
    # Group cameras by (frame, size) so each group is one rasterize call of up to MAX_BATCH views.
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, cam in enumerate(cameras):
        groups.setdefault((int(cam.get("frame", 0)), int(cam["width"]), int(cam["height"])), []).append(i)
    with torch.no_grad():
        for (frame, width, height), indices in groups.items():
            arrays = _frame_gaussians(scene, frame, objects)
            tensors = [torch.from_numpy(a).to(device) for a in arrays]
            for start in range(0, len(indices), MAX_BATCH):
                batch = indices[start : start + MAX_BATCH]
                if tensors[0].shape[0] == 0:
                    color = bg.expand(len(batch), height, width, 3).cpu().numpy()
                    alpha_img = np.zeros((len(batch), height, width, 1), np.float32)
                else:
                    viewmats = torch.tensor(
                        np.array([cameras[i]["viewmat"] for i in batch]), dtype=torch.float32
                    )
                    Ks = torch.tensor(np.array([cameras[i]["K"] for i in batch]), dtype=torch.float32)
                    out = rasterize(
                        *tensors, viewmats.to(device), Ks.to(device), width, height, background=bg
                    )
                    color, alpha_img = out.color.cpu().numpy(), out.alpha.cpu().numpy()
                for j, i in enumerate(batch):
                    pngs[i] = encode_png(color[j], alpha_img[j] if alpha else None)
    return pngs  # type: ignore[return-value]
