"""HexPlane deformation field of stage 2: canonical Gaussians -> Gaussians at frame t.

A 4D point (x, y, z, tau) is looked up on six feature planes per spatial scale (xy, xz, yz,
xt, yt, zt); the six bilinear samples are multiplied per scale and the scales concatenated
(4 scales x 32 channels = 128 features).  A small MLP turns the features into offsets of the
position, the log-scale and the quaternion.  The offset heads end in zero-initialised layers,
so a freshly built field returns the canonical Gaussians unchanged.

Time: frame index t in 0..T-1 maps to tau = 2 (t / T - 0.5), i.e. tau in [-1, 1 - 2/T]
(the mapping of the released DreamScene4D code; the last frame does not reach +1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Plane order: pairs of coordinate axes (0=x, 1=y, 2=z, 3=time).
PLANE_AXES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
PLANE_NAMES: tuple[str, ...] = ("xy", "xz", "yz", "xt", "yt", "zt")


@dataclass
class DeformationConfig:
    plane_channels: int = 32
    spatial_resolutions: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    # Time resolution is max(min_time_resolution, int(time_resolution_ratio * T)).
    min_time_resolution: int = 25
    time_resolution_ratio: float = 0.8
    bounds: float = 1.6  # planes cover the cube [-bounds, bounds]^3
    hidden: int = 64
    # The paper gives the planes the high rate and the MLPs the low one; the released code
    # does the reverse.  We follow the paper: planes 6.4e-3, MLPs 6.4e-4.
    lr_planes: float = 6.4e-3
    lr_mlp: float = 6.4e-4
    # K-planes initialisation: spatial planes uniform in [a, b], planes with a time axis ones,
    # so at start the time planes leave the (static) spatial features untouched.
    spatial_init_low: float = 0.1
    spatial_init_high: float = 0.5

    def time_resolution(self, num_frames: int) -> int:
        return max(self.min_time_resolution, int(self.time_resolution_ratio * num_frames))


def normalised_time(frame: float | torch.Tensor, num_frames: int) -> float | torch.Tensor:
    """Frame index t in 0..T-1 -> tau = 2 (t / T - 0.5) in [-1, 1)."""
    return 2.0 * (frame / num_frames - 0.5)


class ResidualHead(nn.Module):
    """ReLU, residual Linear(W, W), Linear(W, k) with the last layer zero-initialised."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.residual = nn.Linear(width, width)
        self.out = nn.Linear(width, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.relu(h)
        h = h + self.residual(h)
        return self.out(h)


class DeformationField(nn.Module):
    """Deforms canonical Gaussians to frame t.

    Planes are stored as one ParameterList per scale with entries in PLANE_NAMES order; each
    plane tensor is [1, C, res(second axis), res(first axis)] as grid_sample expects (the
    first coordinate of a sample point indexes the last tensor dimension).
    """

    def __init__(self, num_frames: int, cfg: DeformationConfig | None = None):
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"DeformationField needs at least one frame, got num_frames={num_frames}")
        self.cfg = cfg = cfg or DeformationConfig()
        self.num_frames = num_frames
        self.time_resolution = cfg.time_resolution(num_frames)
        channels = cfg.plane_channels
        self.planes = nn.ModuleList()
        for res in cfg.spatial_resolutions:
            axis_res = (res, res, res, self.time_resolution)
            scale_planes = nn.ParameterList()
            for a, b in PLANE_AXES:
                plane = torch.empty(1, channels, axis_res[b], axis_res[a])
                if b == 3:
                    nn.init.ones_(plane)
                else:
                    nn.init.uniform_(plane, cfg.spatial_init_low, cfg.spatial_init_high)
                scale_planes.append(nn.Parameter(plane))
            self.planes.append(scale_planes)
        self.feature_dim = channels * len(cfg.spatial_resolutions)
        self.trunk = nn.Linear(self.feature_dim, cfg.hidden)
        self.position_head = ResidualHead(cfg.hidden, 3)
        self.log_scale_head = ResidualHead(cfg.hidden, 3)
        self.quat_head = ResidualHead(cfg.hidden, 4)

    def plane_features(self, means: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """means [N, 3] in world units, tau [N] in [-1, 1] -> features [N, 4C]."""
        coords = torch.cat([means / self.cfg.bounds, tau[:, None]], dim=-1)  # [N, 4] in [-1, 1]
        per_scale = []
        for scale_planes in self.planes:
            product = None
            for (a, b), plane in zip(PLANE_AXES, scale_planes):
                grid = coords[:, (a, b)].reshape(1, -1, 1, 2).to(plane.dtype)
                # Border padding: Gaussians straying outside the box read the edge features.
                sample = F.grid_sample(
                    plane, grid, mode="bilinear", padding_mode="border", align_corners=True
                )
                sample = sample[0, :, :, 0].t()  # [N, C]
                product = sample if product is None else product * sample
            per_scale.append(product)
        return torch.cat(per_scale, dim=-1)

    def forward(
        self,
        means: torch.Tensor,
        log_scales: torch.Tensor,
        quats: torch.Tensor,
        time: float | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deform canonical Gaussians.

        Args:
            means: [N, 3] canonical centres.  log_scales: [N, 3] canonical log-scales.
            quats: [N, 4] canonical (w, x, y, z) quaternions, any norm.
            time: frame index t in 0..T-1 (a number or a tensor [N], one frame per Gaussian so
                several frames can share one batched call); mapped to 2 (t / T - 0.5).
        Returns:
            (means [N, 3], log_scales [N, 3], quats [N, 4]) at frame t.  The returned
            quaternion is q + |q| dq: its direction is normalise(q / |q| + dq) ("added then
            normalised") and the normalisation itself is left to the consumers (the
            rasterizer and the rigidity loss normalise), so at dq = 0 the output is q exactly.
        """
        n = means.shape[0]
        if not torch.is_tensor(time):
            time = torch.full((n,), float(time), dtype=means.dtype, device=means.device)
        elif time.dim() == 0:
            time = time.expand(n)
        elif time.shape != (n,):
            raise ValueError(f"time must be a number or a tensor [N={n}], got shape {tuple(time.shape)}")
        tau = normalised_time(time.to(device=means.device, dtype=means.dtype), self.num_frames)
        features = self.plane_features(means, tau)
        hidden = self.trunk(features)
        d_means = self.position_head(hidden)
        d_log_scales = self.log_scale_head(hidden)
        d_quats = self.quat_head(hidden)
        quat_norm = quats.norm(dim=-1, keepdim=True)
        return means + d_means, log_scales + d_log_scales, quats + quat_norm * d_quats

    def plane_parameters(self) -> list[nn.Parameter]:
        return [p for scale_planes in self.planes for p in scale_planes]

    def mlp_parameters(self) -> list[nn.Parameter]:
        plane_ids = {id(p) for p in self.plane_parameters()}
        return [p for p in self.parameters() if id(p) not in plane_ids]

    def param_groups(self, cfg: DeformationConfig | None = None, lr_scale: float = 1.0) -> list[dict]:
        """Adam parameter groups; `lr_scale` serves phase C (0.1x fine-tuning)."""
        cfg = cfg or self.cfg
        return [
            {"params": self.plane_parameters(), "lr": cfg.lr_planes * lr_scale, "name": "deformation_planes"},
            {"params": self.mlp_parameters(), "lr": cfg.lr_mlp * lr_scale, "name": "deformation_mlp"},
        ]
