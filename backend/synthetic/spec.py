"""What the synthetic scene contains, decided from a seed (numpy only, no bpy).

Everything here lives in the method's world (backend/cameras.py): +Y up, the input camera is the
reference orbit view (elevation 0, azimuth 0, radius 2) looking at the origin, OpenCV camera
axes, vertical field of view 49.1 degrees.  So the synthetic world *is* the method's world with
units fixed by the camera distance; the Blender side converts once through shared/coords.py.

Object-local frame: the object's centre is the local origin; a pose is the 4x4 local->world
matrix.  Motion is a function of normalised time u = t / (T - 1), so more frames sample the same
path more finely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from backend.cameras import Camera

GENERATOR_VERSION = 1
VIDEO_NAME = "synthetic"


@dataclass
class SyntheticObject:
    object_id: str  # "001", "002": also the Annotations sub-folder
    shape: str  # "cube" (edge `size`) or "sphere" (radius `size`)
    size: float
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]  # texture's two albedos
    pattern: str  # "checker" or "stripes"
    pattern_scale: float  # checks / stripes per unit length in object-local coordinates
    poses: np.ndarray  # [T, 4, 4] local -> world (method's world)

    @property
    def centers(self) -> np.ndarray:
        return self.poses[:, :3, 3]


@dataclass
class SyntheticScene:
    seed: int
    num_frames: int
    width: int
    height: int
    camera: Camera
    objects: list[SyntheticObject] = field(default_factory=list)
    background: tuple[float, float, float] = (0.58, 0.63, 0.70)  # sRGB of the input frames' backdrop
    sun_direction: tuple[float, float, float] = (-0.45, 0.75, 0.5)  # towards the light, world
    ambient: float = 0.55  # flat fraction of the albedo, so shadowed sides keep their texture

    @property
    def frame_names(self) -> list[str]:
        return [f"{t:05d}" for t in range(self.num_frames)]


def rotation_about_axis(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    skew = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return c * np.eye(3) + s * skew + (1.0 - c) * np.outer(axis, axis)


def _poses_along(
    start: np.ndarray,
    end: np.ndarray,
    bob: float,
    axis: np.ndarray,
    start_angle_deg: float,
    total_angle_deg: float,
    num_frames: int,
) -> np.ndarray:
    u = np.linspace(0.0, 1.0, num_frames)
    poses = np.tile(np.eye(4), (num_frames, 1, 1))
    for t, ut in enumerate(u):
        poses[t, :3, 3] = (1.0 - ut) * start + ut * end + np.array([0.0, bob * math.sin(math.pi * ut), 0.0])
        angle = math.radians(start_angle_deg + total_angle_deg * ut)
        poses[t, :3, :3] = rotation_about_axis(axis, angle)
    return poses


def build_scene(seed: int, num_frames: int = 16, width: int = 384, height: int = 256) -> SyntheticScene:
    """Two textured objects crossing in front of a static camera; a different seed moves them a little.

    The cube travels left to right near the camera (depth ~1.6), the sphere right to left behind it
    (depth ~2.4) and somewhat higher, so around the middle frames the cube covers the lower part of
    the sphere: occlusion is partial by construction, for every seed.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2, got {num_frames}")
    rng = np.random.default_rng(seed)
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731

    camera = Camera.orbit(0.0, 0.0, 2.0, width, height)
    # Keep both paths inside the frame whatever the aspect: the cube is nearest, so its path is
    # bounded by the visible half-width at its depth.
    aspect = width / height
    cube_depth = 1.6 + jitter(0.05)
    sphere_depth = 2.4 + jitter(0.05)
    half_fov = math.tan(math.radians(49.1) / 2)
    cube_x = min(0.65, 0.8 * cube_depth * half_fov * aspect - 0.3)
    sphere_x = min(0.85, 0.8 * sphere_depth * half_fov * aspect - 0.3)

    cube_axis = np.array([0.3 + jitter(0.1), 1.0, 0.2 + jitter(0.1)])
    cube = SyntheticObject(
        object_id="001",
        shape="cube",
        size=0.42 + jitter(0.02),
        colors=((0.92, 0.45, 0.08), (0.10, 0.28, 0.80)),
        pattern="checker",
        pattern_scale=9.0,
        poses=_poses_along(
            start=np.array([-cube_x + jitter(0.05), -0.13 + jitter(0.02), 2.0 - cube_depth]),
            end=np.array([cube_x + jitter(0.05), -0.11 + jitter(0.02), 2.0 - cube_depth - 0.1]),
            bob=0.06,
            axis=cube_axis,
            start_angle_deg=25.0 + jitter(10.0),
            total_angle_deg=75.0 + jitter(15.0),
            num_frames=num_frames,
        ),
    )
    sphere_axis = np.array([jitter(0.15), 1.0, 0.35 + jitter(0.1)])
    sphere = SyntheticObject(
        object_id="002",
        shape="sphere",
        size=0.30 + jitter(0.02),
        colors=((0.12, 0.62, 0.28), (0.95, 0.85, 0.25)),
        pattern="stripes",
        pattern_scale=14.0,
        poses=_poses_along(
            start=np.array([sphere_x + jitter(0.05), 0.40 + jitter(0.02), 2.0 - sphere_depth]),
            end=np.array([-sphere_x + jitter(0.05), 0.36 + jitter(0.02), 2.0 - sphere_depth + 0.15]),
            bob=-0.05,
            axis=sphere_axis,
            start_angle_deg=jitter(30.0),
            total_angle_deg=-(95.0 + jitter(15.0)),
            num_frames=num_frames,
        ),
    )
    return SyntheticScene(
        seed=seed, num_frames=num_frames, width=width, height=height, camera=camera, objects=[cube, sphere]
    )
