"""Per-frame object-to-world placement (stage 2, phases B and C).

The object lives in its own normalised frame; at frame t it is placed in the world by a
uniform scale s_t and a translation c_t:  x_world = s_t x_object + c_t,  scale_world = s_t scale.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


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
    ):
        super().__init__()
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
        return means * s + c, scales * s
