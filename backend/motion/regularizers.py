"""Regularisers of the deformation (stage 2), after Dynamic 3D Gaussians (Luiten et al.).

Neighbourhoods are built once on the canonical Gaussians: the k nearest other Gaussians of
each one, weighted by exp(-10 d) with d the Euclidean distance (as in the released
DreamScene4D code).  Each local term is sqrt(w * |residual|^2), averaged over all (i, j)
pairs, i.e. a weighted L2 norm per pair rather than a squared error.
"""

from __future__ import annotations

import torch

from backend.raster.torch_ref import quat_to_rotmat

PAIR_EPS = 1e-20  # keeps the per-pair sqrt differentiable at zero residual


@torch.no_grad()
def knn(
    points: torch.Tensor, k: int = 16, max_chunk_elements: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours of every point, excluding the point itself.

    Args:
        points: [N, 3].  k: neighbours per point (clipped to N - 1).
        max_chunk_elements: bound on the [rows, N] distance block held in memory at once.
    Returns:
        indices [N, k] (long) and Euclidean distances [N, k], nearest first.
    """
    n = points.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return (
            torch.empty(n, 0, dtype=torch.long, device=points.device),
            torch.empty(n, 0, dtype=points.dtype, device=points.device),
        )
    rows = max(1, max_chunk_elements // n)
    squared_norms = (points * points).sum(-1)
    indices = torch.empty(n, k, dtype=torch.long, device=points.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        chunk = points[start:stop]
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one matmul per block; only used for ranking,
        # exact distances of the winners are recomputed below.
        d2 = squared_norms[start:stop, None] + squared_norms[None, :] - 2.0 * chunk @ points.t()
        rows_here = torch.arange(stop - start, device=points.device)
        d2[rows_here, rows_here + start] = float("inf")  # a point is not its own neighbour
        indices[start:stop] = torch.topk(d2, k, dim=1, largest=False, sorted=True).indices
    distances = (points[indices] - points[:, None, :]).norm(dim=-1)
    # Re-sort on the exact distances (the expanded form can swap near-ties).
    distances, order = distances.sort(dim=1)
    return indices.gather(1, order), distances


def neighbour_weights(distances: torch.Tensor) -> torch.Tensor:
    """exp(-10 d) per neighbour pair."""
    return torch.exp(-10.0 * distances)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of (w, x, y, z) quaternions, [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def quat_conjugate(q: torch.Tensor) -> torch.Tensor:
    return torch.cat([q[..., :1], -q[..., 1:]], dim=-1)


def _weighted_pair_norm(residual: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean over pairs of sqrt(w |r|^2); residual [N, k, D], weights [N, k]."""
    return torch.sqrt((residual * residual).sum(-1) * weights + PAIR_EPS).mean()


def scale_deviation_loss(delta_log_scales: torch.Tensor) -> torch.Tensor:
    """mean |s_t - s_canonical| over Gaussians and axes (log-scales)."""
    return delta_log_scales.abs().mean()


def local_scale_consistency_loss(
    delta_log_scales: torch.Tensor, neighbours: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Neighbours should change their log-scale alike.

    delta_log_scales [N, 3] (deformed minus canonical) or [F, N, 3] for F frames at once (the
    mean over all frames' pairs, which is the mean of the per-frame values), neighbours [N, k],
    weights [N, k].
    """
    residual = delta_log_scales[..., neighbours, :] - delta_log_scales[..., :, None, :]
    return _weighted_pair_norm(residual, weights)


def local_rigidity_loss(
    canonical_means: torch.Tensor,
    deformed_means: torch.Tensor,
    canonical_quats: torch.Tensor,
    deformed_quats: torch.Tensor,
    neighbours: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Each neighbourhood should move rigidly with its centre Gaussian's rotation.

    With R_i the rotation of Gaussian i from the reference state (canonical, or frame t-1) to
    the deformed one, R_i = rot(q_def) rot(q_can)^T, the offset of neighbour j should satisfy
        R_i^T (x'_j - x'_i) = x_j - x_i.
    A common rotation + translation of all Gaussians (means and quaternions alike) gives zero.
    Quaternions may have any norm.  Shapes: means [N, 3], quats [N, 4], neighbours/weights [N, k];
    the deformed means and quats may be [F, N, 3] and [F, N, 4] for F frames at once (the mean
    over all frames' pairs, which is the mean of the per-frame values).
    """
    relative = quat_multiply(
        torch.nn.functional.normalize(deformed_quats, dim=-1),
        quat_conjugate(torch.nn.functional.normalize(canonical_quats, dim=-1)),
    )
    rot = quat_to_rotmat(relative)  # [(F,) N, 3, 3]
    canonical_offsets = canonical_means[neighbours] - canonical_means[:, None, :]  # [N, k, 3]
    deformed_offsets = deformed_means[..., neighbours, :] - deformed_means[..., :, None, :]
    # R^T applied to row vectors: v R  (== (R^T v^T)^T).
    unrotated = deformed_offsets @ rot
    return _weighted_pair_norm(unrotated - canonical_offsets, weights)
