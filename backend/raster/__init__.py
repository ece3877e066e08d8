"""Rasterizer interface: one function, two back ends (pure-PyTorch reference, gsplat on CUDA).

Shapes: N Gaussians, C cameras, D colour/feature channels, H x W pixels.

    means [N, 3] world positions; quats [N, 4] (w, x, y, z), any norm; scales [N, 3] linear
    (not log); opacities [N] in (0, 1); colors [N, D] (or [C, N, D] for per-view features, e.g.
    splatted 2D flow); viewmats [C, 4, 4] world->camera (OpenCV axes); Ks [C, 3, 3] in pixels
    with pixel centres at i + 0.5.

Both back ends use the same maths (gsplat 1.5 "classic" mode): EWA projection with a 0.3 px
low-pass dilation, near plane 0.01, far plane 100, opacity-aware 3-sigma boxes, 16x16 tiles,
front-to-back compositing sorted by camera depth, alpha clamped at 0.999 and skipped below 1/255.
The CPU reference is slower but differentiable end to end (means, quats, scales, opacities,
colors) and is what tests/bench/raster_agreement.py compares gsplat against.

gsplat is imported lazily, only when the gsplat back end is used, so CPU machines never need it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from backend.raster.torch_ref import FAR_PLANE, NEAR_PLANE, rasterize_torch

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "gsplat"]

__all__ = ["RenderOutput", "rasterize", "rasterize_batch", "gsplat_available", "NEAR_PLANE", "FAR_PLANE"]


@dataclass
class RenderOutput:
    """What one `rasterize` call returns.

    color:   [C, H, W, D] composited colour/features, background blended in.
    alpha:   [C, H, W, 1] accumulated opacity (1 - final transmittance).
    depth:   [C, H, W, 1] expected camera-space depth sum(w_i z_i) / alpha (0 where alpha = 0).
    means2d: [C, N, 2] projected centres in pixels (x right, y down).  When it requires grad,
             `.retain_grad()` has been called, so after `loss.backward()` its `.grad` holds the
             view-space gradient that densification reads.
    radii:   [C, N] int32 screen-space radius in pixels (the larger half-extent of the
             Gaussian's bounding box); 0 means culled / not visible in that view.
    """

    color: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    means2d: torch.Tensor
    radii: torch.Tensor


_gsplat_import_error: str | None = None
_gsplat_checked = False


def gsplat_available() -> bool:
    """True when gsplat imports (it JIT-builds its CUDA extension on first use)."""
    global _gsplat_checked, _gsplat_import_error
    if not _gsplat_checked:
        _gsplat_checked = True
        try:
            import gsplat  # noqa: F401
        except Exception as exc:  # ImportError, or a broken CUDA toolchain during import
            _gsplat_import_error = f"{type(exc).__name__}: {exc}"
            log.info("gsplat unavailable, using the PyTorch rasterizer (%s)", _gsplat_import_error)
    return _gsplat_import_error is None


def _check_inputs(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    background: torch.Tensor | None,
) -> torch.Tensor | None:
    """Validate shapes; returns the background expanded to [C, D] (or None)."""
    n = means.shape[0]
    n_cams = viewmats.shape[0]
    expected = {
        "means": (means, (n, 3)),
        "quats": (quats, (n, 4)),
        "scales": (scales, (n, 3)),
        "opacities": (opacities, (n,)),
        "viewmats": (viewmats, (n_cams, 4, 4)),
        "Ks": (Ks, (n_cams, 3, 3)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"rasterize: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not (
        (colors.dim() == 2 and colors.shape[0] == n)
        or (colors.dim() == 3 and colors.shape[:2] == (n_cams, n))
    ):
        raise ValueError(
            f"rasterize: colors has shape {tuple(colors.shape)}, expected [{n}, D] or [{n_cams}, {n}, D]"
        )
    n_channels = colors.shape[-1]
    if background is None:
        return None
    background = background.to(device=means.device, dtype=colors.dtype)
    if background.shape == (n_channels,):
        return background[None].expand(n_cams, n_channels)
    if background.shape == (n_cams, n_channels):
        return background
    raise ValueError(
        f"rasterize: background has shape {tuple(background.shape)}, expected [{n_channels}] or "
        f"[{n_cams}, {n_channels}] to match colors"
    )


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> RenderOutput:
    """Render N Gaussians into C views.

    means [N, 3], quats [N, 4], scales [N, 3] (linear), opacities [N], colors [N, D] or
    [C, N, D], viewmats [C, 4, 4], Ks [C, 3, 3]; background [D] or [C, D] or None (black).
    backend: "torch" (reference, any device), "gsplat" (CUDA tensors only), or "auto" = gsplat
    when the tensors are on CUDA and gsplat imports, else the reference.
    Returns a RenderOutput (shapes in its docstring).
    """
    backgrounds = _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, background)
    out = _render(_implementation(backend, means), (means, quats, scales, opacities, colors, viewmats, Ks),
                  width, height, backgrounds)  # fmt: skip
    if out.means2d.requires_grad:
        out.means2d.retain_grad()
    return out


def _render(
    rasterize_impl, gaussians_and_cameras: tuple, width: int, height: int, backgrounds
) -> RenderOutput:
    """One call of a back end with the shared near and far planes."""
    color, alpha, depth, means2d, radii = rasterize_impl(
        *gaussians_and_cameras, width, height, backgrounds, NEAR_PLANE, FAR_PLANE
    )
    return RenderOutput(color=color, alpha=alpha, depth=depth, means2d=means2d, radii=radii)


def _implementation(backend: Backend, means: torch.Tensor):
    if backend == "auto":
        backend = "gsplat" if means.is_cuda and gsplat_available() else "torch"
    if backend == "gsplat":
        if not means.is_cuda:
            raise ValueError("rasterize: backend='gsplat' needs CUDA tensors; use backend='torch' on CPU")
        from backend.raster.gsplat_backend import rasterize_gsplat

        return rasterize_gsplat
    if backend == "torch":
        return rasterize_torch
    raise ValueError(f"rasterize: backend must be 'auto', 'torch' or 'gsplat', got {backend!r}")


def rasterize_batch(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> RenderOutput:
    """Render B independent sets of N Gaussians (one deformed object per frame, say), each into
    its own C views.

    Every argument of `rasterize` gains a leading B: means [B, N, 3], quats [B, N, 4], scales
    [B, N, 3], opacities [B, N], colors [B, N, D] or [B, C, N, D], viewmats [B, C, 4, 4], Ks
    [B, C, 3, 3]; background [D] or [C, D] (shared by all B) or None.  Every RenderOutput field
    gains a leading B too.  gsplat renders all B in one call, which matters because a small
    render is launch-bound (a 256 px render costs about the same for 2k or 200k Gaussians); the
    PyTorch reference renders them one after another with the same maths.
    """
    if means.dim() != 3:
        raise ValueError(f"rasterize_batch: means has shape {tuple(means.shape)}, expected [B, N, 3]")
    n_sets = means.shape[0]
    for name, tensor in {"quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
                         "viewmats": viewmats, "Ks": Ks}.items():  # fmt: skip
        if tensor.shape[0] != n_sets:
            raise ValueError(
                f"rasterize_batch: {name} has {tensor.shape[0]} sets along dim 0, means has {n_sets}"
            )
    backgrounds = _check_inputs(
        means[0], quats[0], scales[0], opacities[0], colors[0], viewmats[0], Ks[0], background
    )
    rasterize_impl = _implementation(backend, means)
    if rasterize_impl is rasterize_torch:
        outs = [
            rasterize(means[b], quats[b], scales[b], opacities[b], colors[b], viewmats[b], Ks[b],
                      width, height, background=background, backend="torch")
            for b in range(n_sets)
        ]  # fmt: skip
        return RenderOutput(
            *(torch.stack([getattr(o, f) for o in outs]) for f in RenderOutput.__dataclass_fields__)
        )
    if backgrounds is not None:
        backgrounds = backgrounds[None].expand(n_sets, *backgrounds.shape)
    return _render(
        rasterize_impl, (means, quats, scales, opacities, colors, viewmats, Ks), width, height, backgrounds
    )
