"""Optical-flow supervision of stage 2.

Target: OpenCV DIS optical flow between consecutive white-background crops, forward (t-1 -> t)
and backward (t -> t-1), kept where a forward-backward consistency check passes.  (The
published code uses GMFlow; the method only needs a good flow estimator.)

Prediction: each Gaussian's 2D displacement between frames t-1 and t, splatted as a 2-channel
colour with the t-1 geometry (the caller renders it with `backend.raster.rasterize`, black
background).

Flow layout everywhere: [2, H, W] with channel 0 = x (columns, to the right) and channel 1 = y
(rows, downwards), in pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def to_grey_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] RGB in [0, 1] (torch or numpy) -> [H, W] uint8 grey."""
    if torch.is_tensor(image):
        image = image.detach().cpu().float().numpy()
    rgb = np.clip(np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1) * 255.0 + 0.5, 0, 255).astype(
        np.uint8
    )
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def dis_flow(source: np.ndarray, target: np.ndarray, preset: str = "medium") -> np.ndarray:
    """Dense flow [H, W, 2] (OpenCV layout) taking grey uint8 `source` to `target`."""
    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
    return dis.calc(source, target, None)


def warp_by_flow(field: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample `field` [H, W, C] at x + flow(x) (bilinear, edge-clamped) -> [H, W, C]."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = xs + flow[..., 0]
    map_y = ys + flow[..., 1]
    return cv2.remap(field, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def forward_backward_consistency(
    fwd: np.ndarray, bwd: np.ndarray, alpha: float = 0.01, beta: float = 0.5
) -> np.ndarray:
    """Valid mask [H, W] (bool) of the forward flow.

    fwd [H, W, 2] takes frame a to frame b, bwd [H, W, 2] takes b back to a.  A pixel x is
    valid when |f(x) + b(x + f(x))|^2 < alpha (|f(x)|^2 + |b(x + f(x))|^2) + beta, and
    x + f(x) lands inside the image.  Occluded pixels have no true correspondence, so their
    round trip does not come back and they fail.
    """
    h, w = fwd.shape[:2]
    bwd_at_target = warp_by_flow(bwd.astype(np.float32), fwd.astype(np.float32))
    round_trip = fwd + bwd_at_target
    error = (round_trip**2).sum(-1)
    bound = alpha * ((fwd**2).sum(-1) + (bwd_at_target**2).sum(-1)) + beta
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    tx, ty = xs + fwd[..., 0], ys + fwd[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return (error < bound) & inside


def compute_flows(
    crops: torch.Tensor, preset: str = "medium", alpha: float = 0.01, beta: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow between consecutive crops.

    Args:
        crops: [T, 3, H, W] white-background RGB in [0, 1].
    Returns:
        flows [T-1, 2, H, W] float32 (entry t-1 takes frame t-1 to frame t, in pixels) and
        valid [T-1, H, W] bool (forward-backward consistent), on the device of `crops`.
        T = 1 gives empty tensors.
    """
    t_count, _, h, w = crops.shape
    greys = [to_grey_uint8(crops[t]) for t in range(t_count)]
    flows = np.zeros((max(t_count - 1, 0), 2, h, w), dtype=np.float32)
    valid = np.zeros((max(t_count - 1, 0), h, w), dtype=bool)
    for t in range(1, t_count):
        fwd = dis_flow(greys[t - 1], greys[t], preset)
        bwd = dis_flow(greys[t], greys[t - 1], preset)
        flows[t - 1] = np.moveaxis(fwd, -1, 0)
        valid[t - 1] = forward_backward_consistency(fwd, bwd, alpha, beta)
    return torch.from_numpy(flows).to(crops.device), torch.from_numpy(valid).to(crops.device)


def flow_loss(
    rendered_flow: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Balanced L1 flow loss.

    Args:
        rendered_flow: [2, H, W] splatted Gaussian displacements (pixels).
        flow: [2, H, W] estimated flow t-1 -> t (pixels).
        mask: [H, W] object mask of frame t-1 (bool, or float thresholded at 0.5).
        valid: [H, W] forward-backward consistency of `flow`.
    The x error is divided by the width and the y error by the height; the two channels are
    summed per pixel.  Result = mean over (mask & valid) + mean over ~mask, where outside the
    mask the target is zero motion (nothing of the object is there to move), as in the
    released code.  An empty region contributes 0.
    """
    _, h, w = rendered_flow.shape
    mask = mask > 0.5 if mask.dtype != torch.bool else mask
    valid = valid > 0.5 if valid.dtype != torch.bool else valid
    target = torch.where(mask[None], flow.to(rendered_flow.dtype), torch.zeros_like(rendered_flow))
    norm = torch.tensor([1.0 / w, 1.0 / h], dtype=rendered_flow.dtype, device=rendered_flow.device)
    error = ((rendered_flow - target).abs() * norm[:, None, None]).sum(0)  # [H, W]
    total = rendered_flow.new_zeros(())
    for region in (mask & valid, ~mask):
        count = region.sum()
        if count > 0:
            total = total + (error * region).sum() / count
    return total


def gaussian_displacement_colors(
    means2d_prev: torch.Tensor, means2d_now: torch.Tensor, detach_previous: bool = True
) -> torch.Tensor:
    """Per-Gaussian 2D displacement [N, 2] (pixels, now minus previous) to splat as colour.

    means2d_prev [N, 2] is the projection at t-1 and means2d_now [N, 2] at t, both in pixels
    of the same camera.  With `detach_previous` the flow loss moves only the frame-t
    positions (frame t-1 is trained by its own pair); False lets it move both, as the
    released code does.
    """
    prev = means2d_prev.detach() if detach_previous else means2d_prev
    return means2d_now - prev
