"""Cameras and coordinate conventions of the method's object-centric world.

World: +Y up. Orbit camera position for elevation e, azimuth a, radius r:
    x = r cos(e) sin(a),  y = -r sin(e),  z = r cos(e) cos(a)
so negative elevation is above the object and azimuth 0 looks from +Z.

Camera axes follow OpenCV (and gsplat): x right, y down, z forward.  A `viewmat` maps
world to camera coordinates (4x4); `K` is the 3x3 pinhole matrix in pixels with the
pixel centre convention of gsplat (pixel (i, j) covers [i, i+1) and its centre is i + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ZERO123_FOVY_DEG = 49.1
ORBIT_RADIUS = 2.0
NEAR = 0.01
FAR = 100.0


def orbit_position(elevation_deg: float, azimuth_deg: float, radius: float) -> np.ndarray:
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    return np.array(
        [radius * math.cos(e) * math.sin(a), -radius * math.sin(e), radius * math.cos(e) * math.cos(a)],
        dtype=np.float64,
    )


def look_at_c2w(
    eye: np.ndarray, target: np.ndarray | None = None, up: np.ndarray | None = None
) -> np.ndarray:
    """Camera-to-world matrix (OpenCV axes) of a camera at `eye` looking at `target`."""
    target = np.zeros(3) if target is None else np.asarray(target, dtype=np.float64)
    up = np.array([0.0, 1.0, 0.0]) if up is None else np.asarray(up, dtype=np.float64)
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-8:
        # Straight above or below: any horizontal right vector works; pick the one that
        # continues the orbit smoothly from small elevations at azimuth 0.
        right = np.array([1.0, 0.0, 0.0])
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def orbit_c2w(elevation_deg: float, azimuth_deg: float, radius: float = ORBIT_RADIUS) -> np.ndarray:
    return look_at_c2w(orbit_position(elevation_deg, azimuth_deg, radius))


def intrinsics_from_fovy(fovy_deg: float, width: int, height: int) -> np.ndarray:
    """Square pixels; the vertical field of view spans the image height."""
    focal = 0.5 * height / math.tan(0.5 * math.radians(fovy_deg))
    return np.array([[focal, 0.0, 0.5 * width], [0.0, focal, 0.5 * height], [0.0, 0.0, 1.0]])


@dataclass
class Camera:
    """One pinhole camera. `viewmat` is world->camera (OpenCV axes), `K` in pixels."""

    viewmat: np.ndarray
    K: np.ndarray
    width: int
    height: int

    @classmethod
    def orbit(
        cls,
        elevation_deg: float,
        azimuth_deg: float,
        radius: float = ORBIT_RADIUS,
        width: int = 256,
        height: int = 256,
        fovy_deg: float = ZERO123_FOVY_DEG,
    ) -> Camera:
        c2w = orbit_c2w(elevation_deg, azimuth_deg, radius)
        return cls(np.linalg.inv(c2w), intrinsics_from_fovy(fovy_deg, width, height), width, height)

    @property
    def c2w(self) -> np.ndarray:
        return np.linalg.inv(self.viewmat)

    @property
    def center(self) -> np.ndarray:
        return self.c2w[:3, 3]

    def resized(self, width: int, height: int) -> Camera:
        K = self.K.copy()
        K[0] *= width / self.width
        K[1] *= height / self.height
        return Camera(self.viewmat.copy(), K, width, height)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [N, 3] -> pixel coordinates [N, 2] (x right, y down) and depth [N]."""
        pts = np.asarray(points, dtype=np.float64)
        cam = pts @ self.viewmat[:3, :3].T + self.viewmat[:3, 3]
        depth = cam[:, 2]
        uv = cam @ self.K.T
        return uv[:, :2] / uv[:, 2:3], depth

    def unproject(self, pixels: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Pixel coordinates [N, 2] at camera depth [N] -> world points [N, 3]."""
        pix = np.asarray(pixels, dtype=np.float64)
        d = np.asarray(depth, dtype=np.float64).reshape(-1, 1)
        rays = np.concatenate([pix, np.ones((len(pix), 1))], axis=1) @ np.linalg.inv(self.K).T
        cam = rays * d
        c2w = self.c2w
        return cam @ c2w[:3, :3].T + c2w[:3, 3]


def stack_cameras(
    cameras: list[Camera], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras -> (viewmats [C, 4, 4], Ks [C, 3, 3]) float32 tensors for the rasterizer."""
    viewmats = torch.tensor(np.stack([c.viewmat for c in cameras]), dtype=torch.float32, device=device)
    Ks = torch.tensor(np.stack([c.K for c in cameras]), dtype=torch.float32, device=device)
    return viewmats, Ks


def zero123_camera_embedding(
    d_elevation_deg: torch.Tensor, d_azimuth_deg: torch.Tensor, d_radius: torch.Tensor
) -> torch.Tensor:
    """[radians(d_elev), sin(d_azim), cos(d_azim), d_radius] per view -> [N, 4]."""
    return torch.stack(
        [
            torch.deg2rad(d_elevation_deg),
            torch.sin(torch.deg2rad(d_azimuth_deg)),
            torch.cos(torch.deg2rad(d_azimuth_deg)),
            d_radius,
        ],
        dim=-1,
    )


def input_camera(width: int, height: int, fovy_deg: float = ZERO123_FOVY_DEG) -> Camera:
    """The camera of the input video in the composed scene: the reference orbit pose (elevation 0,
    azimuth 0, radius 2) with Zero123's vertical field of view spanning the frame height, so an
    object lifted in a crop of side `c` pixels appears at the same size when scaled by c / height."""
    return Camera.orbit(0.0, 0.0, ORBIT_RADIUS, width, height, fovy_deg)


def fit_long_side(width: int, height: int, long_side: int) -> tuple[int, int]:
    """Size with the same aspect ratio whose longer side is at most `long_side`."""
    factor = min(1.0, long_side / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))
