"""gsplat (1.5.x) back end.  Imported only when used: CPU machines never import gsplat.

gsplat JIT-builds its CUDA extension on first call (about 90 s; set TORCH_CUDA_ARCH_LIST to the
card's architecture, e.g. "9.0" for H100/H200, to build only what is needed).
"""

from __future__ import annotations

import torch


def rasterize_gsplat(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    backgrounds: torch.Tensor | None,
    near_plane: float,
    far_plane: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render with gsplat.rasterization in "RGB+ED" mode (float32 CUDA tensors).

    means [N, 3], quats [N, 4], scales [N, 3], opacities [N], colors [N, D] or [C, N, D],
    viewmats [C, 4, 4], Ks [C, 3, 3], backgrounds [C, D] or None; every tensor may carry the same
    leading batch dimensions (independent sets of Gaussians, each into its own C views), and so
    do the outputs.
    Returns color [C, H, W, D], alpha [C, H, W, 1], expected depth [C, H, W, 1], means2d [C, N, 2]
    (gsplat's own tensor, so its gradient is the view-space gradient) and radii [C, N] int32.
    """
    from gsplat import rasterization

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.float().contiguous()

    renders, alphas, meta = rasterization(
        f32(means),
        f32(quats),
        f32(scales),
        f32(opacities),
        f32(colors),
        f32(viewmats),
        f32(Ks),
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=0.3,
        packed=False,
        absgrad=False,
        rasterize_mode="classic",
        render_mode="RGB+ED",
        backgrounds=None if backgrounds is None else f32(backgrounds),
    )
    radii = meta["radii"]
    if radii.dim() == meta["means2d"].dim():  # gsplat >= 1.5 returns per-axis radii [..., C, N, 2]
        radii = radii.amax(dim=-1)
    return renders[..., :-1], alphas, renders[..., -1:], meta["means2d"], radii.to(torch.int32)
