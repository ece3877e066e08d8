"""The evaluation views, built the same way for the ground truth and for a reconstruction.

METHOD.md evaluates appearance at 4 novel views (elevation, azimuth) = (0, +-45), (+-45, 0)
relative to the reference view.  A reconstruction's world differs from the ground truth's by the
monocular scale and depth, so the views are not fixed world cameras: both sides build them from
their own input camera and their own object centres with the functions below.  If a
reconstruction equals the ground truth up to a scaling about the camera centre (the ambiguity a
single view leaves), its views see exactly what the ground-truth views see.

- Whole scene: the pivot is the point on the input camera's optical axis at the mean camera-space
  depth of the object centres at the first frame; the cameras turn around it at the input
  camera's distance, with the input intrinsics and image size.
- One object at frame t: the pivot is that object's centre at frame t; the base view looks from
  the input camera's centre at the pivot (keeping the input camera's up); the cameras turn around
  the pivot at that distance, with a square image of the input's height and focal length
  `OBJECT_VIEW_ZOOM` times the input's, so the object appears larger than in the frame.

Orbit convention (METHOD.md): positive elevation is below, azimuth +90 looks from the base view's
right.  With the base view at the origin from +Z this is exactly `Camera.orbit`.
"""

from __future__ import annotations

import math

import numpy as np

from backend.cameras import look_at_c2w

# (name, elevation degrees, azimuth degrees); names are folder names of the ground truth.
EVAL_VIEWS: tuple[tuple[str, float, float], ...] = (
    ("e+00_a+45", 0.0, 45.0),
    ("e+00_a-45", 0.0, -45.0),
    ("e+45_a+00", 45.0, 0.0),
    ("e-45_a+00", -45.0, 0.0),
)
OBJECT_VIEW_ZOOM = 1.5


def camera_center(viewmat: np.ndarray) -> np.ndarray:
    viewmat = np.asarray(viewmat, dtype=np.float64)
    return -viewmat[:3, :3].T @ viewmat[:3, 3]


def orbit_about(
    viewmat: np.ndarray, pivot: np.ndarray, elevation_deg: float, azimuth_deg: float
) -> np.ndarray:
    """World->camera 4x4 of the view turned by (elevation, azimuth) about `pivot`.

    The base view sits at the input camera's centre looking at the pivot, with the input camera's
    up direction made orthogonal to the viewing direction.
    """
    viewmat = np.asarray(viewmat, dtype=np.float64)
    pivot = np.asarray(pivot, dtype=np.float64)
    back = camera_center(viewmat) - pivot
    distance = float(np.linalg.norm(back))
    z_axis = back / distance  # from the pivot towards the base camera
    up = -viewmat[1, :3]  # OpenCV y points down: the camera's up is -y
    up = up - float(up @ z_axis) * z_axis
    y_axis = up / np.linalg.norm(up)
    x_axis = np.cross(y_axis, z_axis)  # right-handed (x, y, z) = (right, up, towards the viewer)
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    offset = x_axis * math.cos(e) * math.sin(a) - y_axis * math.sin(e) + z_axis * math.cos(e) * math.cos(a)
    eye = pivot + distance * offset
    return np.linalg.inv(look_at_c2w(eye, pivot, up=y_axis))


def scene_pivot(viewmat: np.ndarray, first_frame_centers: np.ndarray) -> np.ndarray:
    """Point on the optical axis at the mean depth of the object centres [k, 3] (first frame)."""
    viewmat = np.asarray(viewmat, dtype=np.float64)
    centers = np.asarray(first_frame_centers, dtype=np.float64).reshape(-1, 3)
    depths = centers @ viewmat[2, :3] + viewmat[2, 3]
    forward = viewmat[2, :3]
    return camera_center(viewmat) + float(depths.mean()) * forward


def object_view_intrinsics(K: np.ndarray, height: int) -> tuple[np.ndarray, int, int]:
    """(K, width, height) of the per-object views: square, `height` pixels, zoomed focal length."""
    K = np.asarray(K, dtype=np.float64)
    focal = OBJECT_VIEW_ZOOM * 0.5 * (K[0, 0] + K[1, 1])
    K_object = np.array([[focal, 0.0, 0.5 * height], [0.0, focal, 0.5 * height], [0.0, 0.0, 1.0]])
    return K_object, height, height


def scene_view_matrices(viewmat: np.ndarray, first_frame_centers: np.ndarray) -> dict[str, np.ndarray]:
    pivot = scene_pivot(viewmat, first_frame_centers)
    return {name: orbit_about(viewmat, pivot, e, a) for name, e, a in EVAL_VIEWS}


def object_view_matrices(viewmat: np.ndarray, centers: np.ndarray) -> dict[str, np.ndarray]:
    """Object centres [T, 3] -> {view name: [T, 4, 4]}."""
    centers = np.asarray(centers, dtype=np.float64)
    return {name: np.stack([orbit_about(viewmat, c, e, a) for c in centers]) for name, e, a in EVAL_VIEWS}
