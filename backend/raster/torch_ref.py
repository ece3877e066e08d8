"""Pure-PyTorch differentiable 3D Gaussian splatting rasterizer (the reference for gsplat).

The maths follows gsplat 1.5 ("classic" mode, pinhole cameras) step by step so the two back ends
agree to float precision:

1. Projection (EWA): camera-space covariance R Sigma R^T, Jacobian of the pinhole projection with
   the camera-space x/y clamped to 1.3x the field of view (keeps off-screen Gaussians from
   exploding), 2D covariance J Sigma_c J^T plus a 0.3 px low-pass dilation on the diagonal.
2. Culling: depth outside [near, far], non-positive determinant, opacity below 1/255, or a
   bounding box entirely off-screen gives radius 0 (invisible).  The box half-extent is
   ceil(k * sqrt(Sigma_2d[i, i])) with k = min(3.33, sqrt(2 ln(255 opacity))): beyond it the
   Gaussian's alpha is below 1/255 anyway, so the box bounds exactly the pixels it can touch.
3. Rasterisation per 16x16 tile: only Gaussians whose box overlaps the tile, sorted front to back
   by camera depth; alpha = min(0.999, o exp(-sigma)) at pixel centres (i + 0.5), skipped when
   alpha < 1/255; compositing stops before the Gaussian that would take the transmittance to
   1e-4 or below.  gsplat clamps alpha at 0.999 (the Inria code at 0.99); we follow gsplat.

Projection is differentiated by autograd; compositing is vectorised over (tile, pixel, Gaussian)
with a hand-written backward that recomputes the per-pixel terms instead of storing them.  Tiles
go through in chunks of at most `chunk_elements` (tile, pixel, Gaussian) triples, sorted by their
Gaussian count so the padding stays small; memory is bounded by one chunk plus the per-(tile,
Gaussian) inputs kept for the backward pass.  Gradients reach means, quats, scales, opacities and
colours; `means2d` is a node of the graph, so its `.grad` is the screen-space gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE_SIZE = 16
EPS2D = 0.3  # low-pass dilation of the 2D covariance, px^2
ALPHA_THRESHOLD = 1.0 / 255.0
ALPHA_MAX = 0.999
TRANSMITTANCE_MIN = 1e-4
MAX_EXTENT_SIGMAS = 3.33
NEAR_PLANE = 0.01
FAR_PLANE = 100.0
# Field-of-view margin for the Jacobian clamp: 30 % of the half-extent of the image plane.
FOV_CLAMP_MARGIN = 0.3


@dataclass
class Projection:
    """Per-camera screen-space Gaussians.  Shapes for C cameras and N Gaussians."""

    means2d: torch.Tensor  # [C, N, 2] pixel coordinates of the centres
    conics: torch.Tensor  # [C, N, 3] inverse 2D covariance (xx, xy, yy)
    depths: torch.Tensor  # [C, N] camera-space z
    radii_xy: torch.Tensor  # [C, N, 2] int32 half-extent of the bounding box, 0 = culled


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Quaternions [N, 4] (w, x, y, z), any norm -> rotation matrices [N, 3, 3]."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z),
        2 * (x * y - w * z),
        2 * (x * z + w * y),
        2 * (x * y + w * z),
        1 - 2 * (x * x + z * z),
        2 * (y * z - w * x),
        2 * (x * z - w * y),
        2 * (y * z + w * x),
        1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariances_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """World covariance R diag(s^2) R^T: quats [N, 4], linear scales [N, 3] -> [N, 3, 3]."""
    m = quat_to_rotmat(quats) * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    near_plane: float = NEAR_PLANE,
    far_plane: float = FAR_PLANE,
) -> Projection:
    """EWA-project N Gaussians into C pinhole cameras (see the module docstring).

    means [N, 3], quats [N, 4], scales [N, 3], opacities [N], viewmats [C, 4, 4], Ks [C, 3, 3].
    """
    rot = viewmats[:, :3, :3]  # [C, 3, 3]
    trans = viewmats[:, :3, 3]  # [C, 3]
    means_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # [C, N, 3]
    covars_c = rot[:, None] @ covariances_3d(quats, scales)[None] @ rot.transpose(-1, -2)[:, None]

    x, y, z = means_c.unbind(-1)  # [C, N]
    depth_ok = (z >= near_plane) & (z <= far_plane)
    # Culled Gaussians may sit at z = 0; a safe divisor keeps NaNs out of the backward pass.
    z_safe = torch.where(depth_ok, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    half_tan_x = FOV_CLAMP_MARGIN * 0.5 * width / fx
    half_tan_y = FOV_CLAMP_MARGIN * 0.5 * height / fy
    tx = z_safe * torch.clamp(x / z_safe, min=-(cx / fx + half_tan_x), max=(width - cx) / fx + half_tan_x)
    ty = z_safe * torch.clamp(y / z_safe, min=-(cy / fy + half_tan_y), max=(height - cy) / fy + half_tan_y)
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [fx / z_safe, zero, -fx * tx / z_safe**2, zero, fy / z_safe, -fy * ty / z_safe**2], dim=-1
    ).reshape(z.shape + (2, 3))
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)  # [C, N, 2, 2]
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)  # [C, N, 2]

    a = cov2d[..., 0, 0] + EPS2D
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + EPS2D
    det = a * c - b * b
    det_ok = det > 0
    det_safe = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    with torch.no_grad():
        opac = opacities.detach()[None, :].expand_as(z)
        extent = torch.sqrt(2.0 * torch.log(opac.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extent = extent.clamp(max=MAX_EXTENT_SIGMAS)
        radius_x = torch.ceil(extent * torch.sqrt(a.detach().clamp(min=0)))
        radius_y = torch.ceil(extent * torch.sqrt(c.detach().clamp(min=0)))
        m2 = means2d.detach()
        on_screen = (
            (m2[..., 0] + radius_x > 0)
            & (m2[..., 0] - radius_x < width)
            & (m2[..., 1] + radius_y > 0)
            & (m2[..., 1] - radius_y < height)
        )
        visible = (
            depth_ok
            & det_ok
            & (opac >= ALPHA_THRESHOLD)
            & ((radius_x > 0) | (radius_y > 0))
            & torch.isfinite(radius_x)
            & torch.isfinite(radius_y)
            & on_screen
        )
        radii_xy = torch.stack([radius_x, radius_y], dim=-1) * visible[..., None]
        radii_xy = torch.nan_to_num(radii_xy, nan=0.0, posinf=0.0).to(torch.int32)
    return Projection(means2d=means2d, conics=conics, depths=z, radii_xy=radii_xy)


@torch.no_grad()
def _tile_lists(
    means2d: torch.Tensor, radii_xy: torch.Tensor, depths: torch.Tensor, tiles_x: int, tiles_y: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian/tile overlaps of one camera, sorted by tile then depth.

    means2d [N, 2], radii_xy [N, 2], depths [N] -> (gaussian ids [P], tile ids [P], counts per
    tile [tiles_y * tiles_x]); P is the number of (tile, Gaussian) overlaps.
    """
    device = means2d.device
    rx, ry = radii_xy[:, 0].to(means2d.dtype), radii_xy[:, 1].to(means2d.dtype)
    tile_x, tile_y = means2d[:, 0] / TILE_SIZE, means2d[:, 1] / TILE_SIZE
    x0 = torch.floor(tile_x - rx / TILE_SIZE).clamp(0, tiles_x).long()
    x1 = torch.ceil(tile_x + rx / TILE_SIZE).clamp(0, tiles_x).long()
    y0 = torch.floor(tile_y - ry / TILE_SIZE).clamp(0, tiles_y).long()
    y1 = torch.ceil(tile_y + ry / TILE_SIZE).clamp(0, tiles_y).long()
    span_x = x1 - x0
    counts = span_x * (y1 - y0)
    counts = torch.where((rx > 0) & (ry > 0), counts, torch.zeros_like(counts))

    gauss_ids = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(gauss_ids), device=device) - first[gauss_ids]
    local_y = torch.div(local, span_x[gauss_ids], rounding_mode="floor")
    local_x = local - local_y * span_x[gauss_ids]
    tile_ids = (y0[gauss_ids] + local_y) * tiles_x + x0[gauss_ids] + local_x

    # Key = tile, then depth rank; ranks are unique so any sort gives front-to-back order.
    depth_rank = torch.empty_like(depths, dtype=torch.long)
    depth_rank[torch.argsort(depths)] = torch.arange(len(depths), device=device)
    order = torch.argsort(tile_ids * len(depths) + depth_rank[gauss_ids])
    gauss_ids, tile_ids = gauss_ids[order], tile_ids[order]
    tile_counts = torch.bincount(tile_ids, minlength=tiles_x * tiles_y)
    return gauss_ids, tile_ids, tile_counts


def _tile_pixel_centres(
    tile_ids: torch.Tensor, tiles_x: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (x, y), each [T, 256], of the tiles `tile_ids` [T] (row-major)."""
    pix = torch.arange(TILE_SIZE * TILE_SIZE, device=tile_ids.device)
    tx = (tile_ids % tiles_x)[:, None] * TILE_SIZE
    ty = torch.div(tile_ids, tiles_x, rounding_mode="floor")[:, None] * TILE_SIZE
    return (tx + pix % TILE_SIZE + 0.5).to(dtype), (ty + pix // TILE_SIZE + 0.5).to(dtype)


# The compositing works on [T, P, K] arrays (tile, pixel, depth-sorted Gaussian): the running
# products along K then scan the contiguous last axis, several times faster on CPU than a scan
# along a middle axis.


def _alphas(means2d, conics, opacities, px, py):
    """Per (tile, pixel, Gaussian) terms of the compositing, without autograd (in-place maths).

    means2d [T, K, 2], conics [T, K, 3], opacities [T, K], px/py [T, P] -> dx, dy, exp(-sigma),
    alpha = min(o exp(-sigma), 0.999) zeroed where the Gaussian does not count (sigma < 0 or
    o exp(-sigma) < 1/255), and the mask where alpha counts and is not clamped; all [T, P, K].
    """
    dx = means2d[:, None, :, 0] - px[:, :, None]
    dy = means2d[:, None, :, 1] - py[:, :, None]
    a, b, c = (conics[:, None, :, i] for i in range(3))
    # Same evaluation order as gsplat's kernel: 0.5 (a dx dx + c dy dy) + b dx dy.
    sigma = torch.mul(dx, a).mul_(dx)
    tmp = torch.mul(dy, c).mul_(dy)
    sigma.add_(tmp).mul_(0.5)
    sigma.add_(torch.mul(dx, b, out=tmp).mul_(dy))
    counted = sigma >= 0
    # sigma < 0 never counts; clamping keeps exp finite so masked products stay 0, not NaN.
    gauss = torch.neg(sigma.clamp_min_(0.0), out=tmp).exp_()
    raw = gauss * opacities[:, None, :]
    counted &= raw >= ALPHA_THRESHOLD
    live = counted & (raw <= ALPHA_MAX)
    alpha = raw.clamp_max_(ALPHA_MAX).mul_(counted)
    return dx, dy, gauss, alpha, live


def _weights(alpha: torch.Tensor):
    """1 - alpha, inclusive transmittance, kept mask and weights alpha_k T_{k-1} ([T, P, K]).

    gsplat stops *before* the Gaussian that would take transmittance to <= 1e-4; the inclusive
    transmittance only decreases, so that is one threshold on it.  A running product (not a
    log-space sum) keeps float32 rounding, and so the cut-off decisions, close to gsplat's.
    """
    one_minus = 1.0 - alpha
    t_incl = torch.cumprod(one_minus, dim=-1)
    kept = t_incl > TRANSMITTANCE_MIN
    weights = torch.empty_like(alpha)
    weights[..., 0] = alpha[..., 0]
    torch.mul(alpha[..., 1:], t_incl[..., :-1], out=weights[..., 1:])
    weights.mul_(kept)
    return one_minus, t_incl, kept, weights


class _CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing of a chunk of tiles with a hand-written backward.

    Nothing of size [T, P, K] is kept between forward and backward (it is recomputed), so memory
    held for the backward pass is only the per-(tile, Gaussian) inputs.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, px, py):
        alpha = _alphas(means2d, conics, opacities, px, py)[3]
        weights = _weights(alpha)[-1]  # [T, P, K]
        ctx.save_for_backward(means2d, conics, opacities, features, px, py)
        return torch.bmm(weights, features), weights.sum(dim=-1)

    @staticmethod
    def backward(ctx, grad_accum, grad_alpha):
        means2d, conics, opacities, features, px, py = ctx.saved_tensors
        dx, dy, gauss, alpha, live = _alphas(means2d, conics, opacities, px, py)
        one_minus, t_incl, kept, weights = _weights(alpha)

        # accum = sum_k w_k f_k and out_alpha = sum_k w_k, so dL/dw_k = <g_accum, f_k> + g_alpha.
        grad_features = torch.bmm(grad_accum.transpose(1, 2), weights).transpose(1, 2)  # [T, K, F]
        grad_w = torch.baddbmm(grad_alpha[:, :, None], grad_accum, features.transpose(1, 2)).mul_(kept)
        # w_k = a_k T_{k-1} with T_{k-1} = prod_{j<k} (1 - a_j):
        # dL/da_k = dL/dw_k T_{k-1} - sum_{j>k} dL/dw_j w_j / (1 - a_k).
        contrib = grad_w * weights
        total = contrib.sum(dim=-1, keepdim=True)
        behind = contrib.cumsum_(dim=-1).neg_().add_(total)  # sum over j > k
        grad_w[..., 1:].mul_(t_incl[..., :-1])
        # alpha = min(o exp(-sigma), 0.999) where counted; no gradient through the clamp.
        grad_raw = grad_w.sub_(behind.div_(one_minus)).mul_(live)
        grad_opacities = (gauss * grad_raw).sum(dim=1)
        grad_sigma = grad_raw.mul_(alpha).neg_()  # alpha = raw wherever grad_raw != 0
        # sigma = 0.5 a dx^2 + 0.5 c dy^2 + b dx dy with dx = mx - px, dy = my - py; a, b, c are
        # constant over the tile's pixels, so the mean gradients reduce to two sums.
        gs_dx = grad_sigma * dx
        gs_dy = grad_sigma.mul_(dy)
        grad_conics = torch.stack(
            [0.5 * (gs_dx * dx).sum(dim=1), dx.mul_(gs_dy).sum(dim=1), 0.5 * dy.mul_(gs_dy).sum(dim=1)],
            dim=-1,
        )
        sum_x, sum_y = gs_dx.sum(dim=1), gs_dy.sum(dim=1)
        a, b, c = conics.unbind(-1)
        grad_means2d = torch.stack([a * sum_x + b * sum_y, b * sum_x + c * sum_y], dim=-1)
        return grad_means2d, grad_conics, grad_opacities, grad_features, None, None


def composite_tiles_autograd(means2d, conics, opacities, features, px, py):
    """The same compositing as `composite_tiles`, written plainly and differentiated by autograd.

    A test oracle for the hand-written backward.  Shapes as in `composite_tiles`.
    """
    dx = means2d[:, None, :, 0] - px[:, :, None]  # [T, P, K]
    dy = means2d[:, None, :, 1] - py[:, :, None]
    a, b, c = (conics[:, None, :, i] for i in range(3))
    sigma = 0.5 * (a * dx**2 + c * dy**2) + b * dx * dy
    raw = opacities[:, None, :] * torch.exp(-sigma)
    counted = (sigma >= 0) & (raw >= ALPHA_THRESHOLD)
    alpha = torch.where(counted, raw.clamp_max(ALPHA_MAX), torch.zeros_like(raw))
    t_incl = torch.cumprod(1.0 - alpha, dim=-1)
    t_excl = torch.cat([torch.ones_like(t_incl[..., :1]), t_incl[..., :-1]], dim=-1)
    weights = torch.where(t_incl.detach() > TRANSMITTANCE_MIN, alpha * t_excl, torch.zeros_like(alpha))
    return torch.bmm(weights, features), weights.sum(dim=-1)


def composite_tiles(means2d, conics, opacities, features, px, py):
    """Front-to-back compositing of T tiles, each with K depth-sorted Gaussians and P pixels.

    means2d [T, K, 2], conics [T, K, 3], opacities [T, K], features [T, K, F], px/py [T, P]
    pixel centres -> accumulated features [T, P, F] (no background), alpha [T, P].
    Padding entries must have zero opacity.
    """
    return _CompositeTiles.apply(means2d, conics, opacities, features, px, py)


def rasterize_one_camera(
    proj_means2d: torch.Tensor,
    conics: torch.Tensor,
    depths: torch.Tensor,
    radii_xy: torch.Tensor,
    opacities: torch.Tensor,
    features: torch.Tensor,
    width: int,
    height: int,
    chunk_elements: int = 1 << 21,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite one camera's projected Gaussians.

    proj_means2d [N, 2], conics [N, 3], depths [N], radii_xy [N, 2], opacities [N], features
    [N, F] -> (accumulated features [H, W, F] without background, alpha [H, W, 1]).
    """
    device, dtype = proj_means2d.device, proj_means2d.dtype
    n_feat = features.shape[-1]
    tiles_x, tiles_y = math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)
    n_tiles = tiles_x * tiles_y
    tile_pixels = TILE_SIZE * TILE_SIZE

    gauss_ids, tile_ids, tile_counts = _tile_lists(
        proj_means2d.detach(), radii_xy, depths.detach(), tiles_x, tiles_y
    )
    out = torch.zeros(n_tiles, tile_pixels, n_feat + 1, device=device, dtype=dtype)
    if len(gauss_ids) > 0:
        # Extra row N is a dummy Gaussian (zero opacity) that pads the per-tile lists.
        n = len(opacities)
        means_ext = torch.cat([proj_means2d, proj_means2d.new_zeros(1, 2)])
        conics_ext = torch.cat([conics, conics.new_zeros(1, 3)])
        opac_ext = torch.cat([opacities, opacities.new_zeros(1)])
        feat_ext = torch.cat([features, features.new_zeros(1, n_feat)])

        with torch.no_grad():
            busy = torch.nonzero(tile_counts > 0).squeeze(1)
            busy = busy[torch.argsort(tile_counts[busy], descending=True)]
            busy_counts = tile_counts[busy].tolist()
            rank_of_tile = torch.full((n_tiles,), -1, dtype=torch.long, device=device)
            rank_of_tile[busy] = torch.arange(len(busy), device=device)
            first_in_tile = torch.cumsum(tile_counts, 0) - tile_counts
            slot = torch.arange(len(gauss_ids), device=device) - first_in_tile[tile_ids]
            table = torch.full((len(busy), busy_counts[0]), n, dtype=torch.long, device=device)
            table[rank_of_tile[tile_ids], slot] = gauss_ids

        pieces, piece_tiles = [], []
        start = 0
        while start < len(busy):
            k = busy_counts[start]  # the largest count in this chunk (tiles sorted descending)
            stop = min(len(busy), start + max(1, chunk_elements // (k * tile_pixels)))
            index = table[start:stop, :k]
            px, py = _tile_pixel_centres(busy[start:stop], tiles_x, dtype)
            inputs = (means_ext[index], conics_ext[index], opac_ext[index], feat_ext[index])
            # Pixels composite independently: a tile with more Gaussians than the budget allows
            # goes through in slices of its pixels.
            step = max(1, chunk_elements // (k * (stop - start)))
            parts = [
                composite_tiles(*inputs, px[:, p : p + step], py[:, p : p + step])
                for p in range(0, tile_pixels, step)
            ]
            accum = torch.cat([part[0] for part in parts], dim=1)
            alpha = torch.cat([part[1] for part in parts], dim=1)
            pieces.append(torch.cat([accum, alpha[..., None]], dim=-1))
            piece_tiles.append(busy[start:stop])
            start = stop
        out = out.index_copy(0, torch.cat(piece_tiles), torch.cat(pieces))

    image = out.reshape(tiles_y, tiles_x, TILE_SIZE, TILE_SIZE, n_feat + 1)
    image = image.permute(0, 2, 1, 3, 4).reshape(tiles_y * TILE_SIZE, tiles_x * TILE_SIZE, n_feat + 1)
    image = image[:height, :width]
    return image[..., :n_feat], image[..., n_feat:]


def rasterize_torch(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    backgrounds: torch.Tensor | None = None,
    near_plane: float = NEAR_PLANE,
    far_plane: float = FAR_PLANE,
    chunk_elements: int = 1 << 21,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render C views of N Gaussians with expected depth.

    means [N, 3], quats [N, 4], scales [N, 3] (linear), opacities [N], colors [N, D] or [C, N, D],
    viewmats [C, 4, 4], Ks [C, 3, 3], backgrounds [C, D] or None.
    Returns color [C, H, W, D], alpha [C, H, W, 1], expected depth [C, H, W, 1],
    means2d [C, N, 2] (the tensor the images were rendered from) and radii [C, N] (int32).
    """
    proj = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane
    )
    n_cams = viewmats.shape[0]
    colors_per_cam = colors if colors.dim() == 3 else colors[None].expand(n_cams, -1, -1)
    out_colors, out_alphas, out_depths = [], [], []
    for cam in range(n_cams):
        # Depth rides along as one more feature channel, as in gsplat's "RGB+ED" mode.
        features = torch.cat([colors_per_cam[cam], proj.depths[cam][:, None]], dim=-1)
        accum, alpha = rasterize_one_camera(
            proj.means2d[cam],
            proj.conics[cam],
            proj.depths[cam],
            proj.radii_xy[cam],
            opacities,
            features,
            width,
            height,
            chunk_elements,
        )
        color = accum[..., :-1]
        if backgrounds is not None:
            color = color + (1.0 - alpha) * backgrounds[cam]
        out_colors.append(color)
        out_alphas.append(alpha)
        out_depths.append(accum[..., -1:] / alpha.clamp(min=1e-10))
    radii = proj.radii_xy.amax(dim=-1)
    return torch.stack(out_colors), torch.stack(out_alphas), torch.stack(out_depths), proj.means2d, radii
