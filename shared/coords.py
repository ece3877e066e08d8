"""The one place where the backend's world meets Blender's world (numpy only).

Backend (METHOD.md, backend/cameras.py): object-centric world with +Y up; cameras with OpenCV
axes (x right, y down, z forward); `viewmat` maps world to camera; `K` in pixels with pixel
centres at i + 0.5.

Blender: world with +Z up; camera objects look down their local -Z with +Y up and +X right;
intrinsics are a lens (mm) over a sensor (mm) with a sensor fit and a lens shift.

The world change is the rotation of +90 degrees about X (what glTF importers use):
    blender (x, y, z) = backend (x, -z, y)
so the backend's reference camera at (0, 0, 2) looking at the origin becomes Blender's front view
at (0, -2, 0) looking along +Y, and the backend's up (+Y) becomes Blender's up (+Z).

Everything that converts positions, rotations, camera poses or intrinsics between the two sides
calls these functions, so the add-on's importer and camera paths and the backend's renders of
Blender cameras cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np

# Rows: Blender axes written in backend coordinates.  Proper rotation (det +1).
BACKEND_TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
BLENDER_TO_BACKEND = BACKEND_TO_BLENDER.T

# The same rotation as a quaternion (w, x, y, z): +90 degrees about X.
BACKEND_TO_BLENDER_QUAT = np.array([math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0])

# OpenCV camera axes (x right, y down, z forward) -> Blender camera axes (x right, y up, -z forward).
OPENCV_TO_BLENDER_CAMERA = np.diag([1.0, -1.0, -1.0])

# Blender's default sensor width in mm; any value works as long as lens is scaled with it.
DEFAULT_SENSOR_WIDTH_MM = 36.0


def points_to_blender(points: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Backend points [..., 3] -> Blender points [..., 3] (same dtype as the input when `out` is None).

    Written as component copies instead of a matmul so that it allocates nothing when `out` is
    given: the frame-change handler calls it on 100k points every frame.
    """
    points = np.asarray(points)
    if out is None:
        out = np.empty_like(points)
    out[..., 0] = points[..., 0]
    out[..., 1] = -points[..., 2]
    out[..., 2] = points[..., 1]
    return out


def points_from_blender(points: np.ndarray) -> np.ndarray:
    """Blender points [..., 3] -> backend points [..., 3]."""
    points = np.asarray(points)
    out = np.empty_like(points)
    out[..., 0] = points[..., 0]
    out[..., 1] = points[..., 2]
    out[..., 2] = -points[..., 1]
    return out


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (w, x, y, z) quaternions, broadcasting over leading axes."""
    aw, ax, ay, az = np.moveaxis(np.asarray(a), -1, 0)
    bw, bx, by, bz = np.moveaxis(np.asarray(b), -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def quats_to_blender(quats: np.ndarray) -> np.ndarray:
    """Gaussian rotations (w, x, y, z) [..., 4] in the backend world -> in Blender's world.

    A Gaussian's covariance R S^2 R^T becomes W R S^2 R^T W^T under the world rotation W, so its
    rotation is W R: the world quaternion multiplies from the left.  Scales are unchanged.
    """
    quats = np.asarray(quats)
    return quat_multiply(BACKEND_TO_BLENDER_QUAT.astype(quats.dtype), quats).astype(quats.dtype)


def quats_from_blender(quats: np.ndarray) -> np.ndarray:
    quats = np.asarray(quats)
    inverse = BACKEND_TO_BLENDER_QUAT * np.array([1.0, -1.0, -1.0, -1.0])
    return quat_multiply(inverse.astype(quats.dtype), quats).astype(quats.dtype)


def viewmat_to_blender_matrix_world(viewmat: np.ndarray) -> np.ndarray:
    """Backend world->camera 4x4 (OpenCV axes) -> Blender camera object's matrix_world 4x4."""
    c2w = np.linalg.inv(np.asarray(viewmat, dtype=np.float64))
    matrix = np.eye(4)
    matrix[:3, :3] = BACKEND_TO_BLENDER @ c2w[:3, :3] @ OPENCV_TO_BLENDER_CAMERA
    matrix[:3, 3] = BACKEND_TO_BLENDER @ c2w[:3, 3]
    return matrix


def blender_matrix_world_to_viewmat(matrix_world: np.ndarray) -> np.ndarray:
    """Blender camera matrix_world 4x4 -> backend world->camera 4x4 (OpenCV axes).

    Any scale in the Blender matrix is removed: a camera's pose is only a rotation and a position.
    """
    matrix = np.asarray(matrix_world, dtype=np.float64)
    rotation = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0, keepdims=True)
    c2w = np.eye(4)
    c2w[:3, :3] = BLENDER_TO_BACKEND @ rotation @ OPENCV_TO_BLENDER_CAMERA
    c2w[:3, 3] = BLENDER_TO_BACKEND @ matrix[:3, 3]
    return np.linalg.inv(c2w)


def _fit_is_horizontal(sensor_fit: str, width: float, height: float) -> bool:
    if sensor_fit == "HORIZONTAL":
        return True
    if sensor_fit == "VERTICAL":
        return False
    return width >= height  # AUTO: the larger image side spans the sensor width


def blender_lens_from_K(
    K: np.ndarray, width: int, height: int, sensor_width: float = DEFAULT_SENSOR_WIDTH_MM
) -> dict:
    """Pinhole K (pixels) -> Blender camera settings that project exactly like it.

    Returns {"sensor_fit", "sensor_width", "sensor_height", "lens", "shift_x", "shift_y",
    "pixel_aspect_x", "pixel_aspect_y"}.  The horizontal fit makes Blender's shifts and lens
    relative to the image width; fy != fx is expressed as a pixel aspect ratio.
    """
    K = np.asarray(K, dtype=np.float64)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    # Blender's pixel aspect scales the image's y extent: a pixel is aspect_y/aspect_x tall, so
    # fy (in pixels) = fx * aspect_x / aspect_y.
    aspect_x, aspect_y = (1.0, fx / fy) if fx >= fy else (fy / fx, 1.0)
    return {
        "sensor_fit": "HORIZONTAL",
        "sensor_width": float(sensor_width),
        "sensor_height": float(sensor_width * height / width),
        "lens": float(fx * sensor_width / width),
        # The view window moves right by shift_x * width pixels, so the optical axis lands at
        # x = width / 2 - shift_x * width; y is measured upwards in Blender, downwards in K.
        "shift_x": float((0.5 * width - cx) / width),
        "shift_y": float((cy - 0.5 * height) * (fx / fy) / width),
        "pixel_aspect_x": float(aspect_x),
        "pixel_aspect_y": float(aspect_y),
    }


def K_from_blender_lens(
    lens: float,
    sensor_width: float,
    sensor_height: float,
    sensor_fit: str,
    shift_x: float,
    shift_y: float,
    width: int,
    height: int,
    pixel_aspect_x: float = 1.0,
    pixel_aspect_y: float = 1.0,
) -> np.ndarray:
    """Blender camera settings (perspective) -> pinhole K in pixels; the inverse of blender_lens_from_K."""
    # Blender compares the aspect-corrected sizes when it picks the fit (AUTO) and sizes the
    # sensor along the fitted side.
    w_eff, h_eff = width * pixel_aspect_x, height * pixel_aspect_y
    horizontal = _fit_is_horizontal(sensor_fit, w_eff, h_eff)
    sensor = sensor_width if sensor_fit in ("AUTO", "HORIZONTAL") else sensor_height
    if horizontal:
        fx = lens / sensor * width
        fy = fx * pixel_aspect_x / pixel_aspect_y
        window = width  # shifts are in units of the fitted side, in pixels along x
        cx = 0.5 * width - shift_x * window
        cy = 0.5 * height + shift_y * window * pixel_aspect_x / pixel_aspect_y
    else:
        fy = lens / sensor * height
        fx = fy * pixel_aspect_y / pixel_aspect_x
        window = height
        cx = 0.5 * width - shift_x * window * pixel_aspect_y / pixel_aspect_x
        cy = 0.5 * height + shift_y * window
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def camera_center(viewmat: np.ndarray) -> np.ndarray:
    """World position of a camera from its world->camera matrix."""
    viewmat = np.asarray(viewmat, dtype=np.float64)
    return -viewmat[:3, :3].T @ viewmat[:3, 3]


def apply_depth_adjustment(
    means: np.ndarray,
    scales: np.ndarray | None,
    viewmat: np.ndarray,
    depth_scale: float = 1.0,
    depth_offset: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Move one frame of an object's Gaussians along the input camera's rays (backend world).

    depth_scale k scales positions about the input camera's centre C (mu -> C + (mu - C) k) and
    the scales by k, so the object keeps its image footprint from the input view while its depth
    changes (the composition stage's placement); depth_offset d then moves the object rigidly by
    d along the ray from C through its centroid.  The add-on's preview calls this with the
    artist's per-object values; the backend's render_path applies the same rule.
    """
    means = np.asarray(means)
    if depth_scale == 1.0 and depth_offset == 0.0:
        return means, scales
    center = camera_center(viewmat).astype(means.dtype)
    moved = center + (means - center) * np.asarray(depth_scale, dtype=means.dtype)
    if depth_offset != 0.0 and len(moved):
        direction = moved.mean(axis=0) - center
        norm = float(np.linalg.norm(direction))
        if norm > 1e-9:
            moved = moved + (direction / norm * depth_offset).astype(means.dtype)
    if scales is not None:
        scales = np.asarray(scales) * np.asarray(depth_scale, dtype=np.asarray(scales).dtype)
    return moved, scales


ORBIT_PATHS = ("fixed", "orbit_horizontal", "orbit_elevation")


def orbit_angles(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(elevation, azimuth) in degrees per frame of a camera path, METHOD.md's three renders.

    fixed: (0, 0) throughout; orbit_horizontal: azimuth 0 -> 360 (the last frame stops one step
    short of 360, so a looped video does not repeat the first view); orbit_elevation: 75 -> -75 -> 75
    (linear), azimuth 0.  Negative elevation is above the object.
    """
    if path not in ORBIT_PATHS:
        raise ValueError(f"unknown camera path {path!r}; expected one of {list(ORBIT_PATHS)}")
    u = np.arange(num_frames, dtype=np.float64) / max(num_frames, 1)
    zeros = np.zeros(num_frames)
    if path == "fixed":
        return zeros, zeros.copy()
    if path == "orbit_horizontal":
        return zeros, 360.0 * u
    elevation = np.where(u <= 0.5, 75.0 - 300.0 * u, -75.0 + 300.0 * (u - 0.5))
    return elevation, zeros


def _rotation_x(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rotation_y(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def orbit_viewmat(
    input_viewmat: np.ndarray, center: np.ndarray, elevation_deg: float, azimuth_deg: float
) -> np.ndarray:
    """World->camera matrix of the input camera orbited about `center` (backend world).

    The camera is turned rigidly about the centre by R_y(azimuth) R_x(elevation).  For the
    reference camera (elevation 0, azimuth 0 at distance r from the centre, looking at it) this is
    exactly backend.cameras.orbit_c2w(elevation, azimuth, r) shifted to the centre: the position
    r (cos e sin a, -sin e, cos e cos a) and a level camera looking at the centre.
    """
    center = np.asarray(center, dtype=np.float64)
    rotation = _rotation_y(azimuth_deg) @ _rotation_x(elevation_deg)
    c2w = np.linalg.inv(np.asarray(input_viewmat, dtype=np.float64))
    turned = np.eye(4)
    turned[:3, :3] = rotation @ c2w[:3, :3]
    turned[:3, 3] = center + rotation @ (c2w[:3, 3] - center)
    return np.linalg.inv(turned)
