"""Per-frame object-to-world placement (stage 2, phases B and C).

The object lives in its own normalised frame; at frame t it is placed in the world by a
uniform scale s_t and a translation c_t:  x_world = s_t x_object + c_t,  scale_world = s_t scale
(the published "similarity" placement).

Departure, on purpose: the crop that stages 1-2 fit is a window of the video frame, i.e. the
video camera with its principal point moved to the window and its focal length scaled by s_t.
A similarity placement instead looks at an off-centre object obliquely (its near and far parts
shift apart by up to tan(off-axis angle) of its depth) and with s_t times weaker perspective.
Two placements correct this (`mode`):

- "ray_aligned" (our default): slide each point along the ray through the object's centre by
  its depth offset, instead of along the optical axis.  The object keeps its shape (uniform
  scale); only the perspective strength still differs from the crop's.
- "projective": also keep depth offsets unscaled (x 1 / s_t relative to the lateral scale), so
  the video camera sees every point exactly where the crop camera did.  The object is then
  stretched in depth by 1 / s_t, which shows in orbit views (a small, far object grows long).

Measured on the synthetic demo's first frame with its stage-1 objects, full-resolution mask
IoU: similarity 0.86 / 0.83 (at 192 px), ray_aligned 0.968 / 0.937, projective 0.995 / 0.991.
Gaussian shapes get the lateral scale only (the shear and depth stretch move the centres),
which these measurements include.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PLACEMENT_MODES = ("ray_aligned", "projective", "similarity")


class FramePlacement(nn.Module):
    """Translation [T, 3] and log-scale [T] per frame.

    The released code optimises only the translation and keeps the crop-derived scale fixed;
    `learn_scale=False` (the default) does the same, `True` lets the scale be fitted too.
    """

    def __init__(
        self,
        translation: np.ndarray | torch.Tensor,
        scale: np.ndarray | torch.Tensor,
        learn_scale: bool = False,
        camera_center: np.ndarray | None = None,
        camera_forward: np.ndarray | None = None,
        mode: str = "similarity",
    ):
        """`mode` "ray_aligned" and "projective" need `camera_center` / `camera_forward` (world,
        the video camera's centre and viewing direction)."""
        super().__init__()
        if mode not in PLACEMENT_MODES:
            raise ValueError(f"mode must be one of {', '.join(PLACEMENT_MODES)}, not {mode!r}")
        if mode != "similarity" and (camera_center is None or camera_forward is None):
            raise ValueError(f"mode {mode!r} needs both camera_center and camera_forward")
        translation = torch.as_tensor(np.asarray(translation), dtype=torch.float32)
        scale = torch.as_tensor(np.asarray(scale), dtype=torch.float32).reshape(-1)
        if translation.dim() != 2 or translation.shape[1] != 3:
            raise ValueError(f"translation must be [T, 3], got {tuple(translation.shape)}")
        if scale.shape[0] != translation.shape[0]:
            raise ValueError(
                f"scale has {scale.shape[0]} frames but translation has {translation.shape[0]}; "
                "give one scale per frame"
            )
        if not bool((scale > 0).all()):
            raise ValueError(f"scales must be positive, got min {float(scale.min())}")
        self.translation = nn.Parameter(translation.clone())
        self.log_scale = nn.Parameter(scale.log(), requires_grad=learn_scale)
        self.mode = mode
        center = np.zeros(3) if camera_center is None else np.asarray(camera_center, dtype=np.float64)
        forward = np.array([0.0, 0.0, -1.0]) if camera_forward is None else np.asarray(camera_forward)
        forward = forward / np.linalg.norm(forward)
        self.register_buffer("camera_center", torch.as_tensor(center, dtype=torch.float32))
        self.register_buffer("camera_forward", torch.as_tensor(forward, dtype=torch.float32))

    @property
    def num_frames(self) -> int:
        return self.translation.shape[0]

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def apply(
        self, means: torch.Tensor, scales: torch.Tensor, t: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Object frame -> world at frame t.

        means [N, 3], scales [N, 3] LINEAR; t a frame index or a LongTensor [N] (one frame per
        Gaussian).  Returns (means [N, 3], scales [N, 3]); rotations are unchanged.
        """
        s = self.log_scale[t].exp()
        c = self.translation[t]
        if s.dim() == 1:
            s = s[:, None]
        if self.mode == "similarity":
            return means * s + c, scales * s
        n = self.camera_forward
        offset = means * s
        if self.mode == "projective":
            # Depth offsets keep the crop camera's perspective: unscaled, where lateral ones get s.
            depth = means @ n
            offset = offset + (depth[:, None] * (1 - s)) * n
        else:
            depth = offset @ n
        ray = c - self.camera_center
        ray = ray / (ray * n).sum(-1, keepdim=True)
        # Sliding by the depth offset along the centre's ray instead of the optical axis removes
        # the oblique look of an off-centre object.
        return c + offset + depth[:, None] * (ray - n), scales * s
