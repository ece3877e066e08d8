"""Image losses and metrics shared by the stages, and the named, weighted loss sum."""

from __future__ import annotations

import math

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` (broadcastable) is 1; 0 where the mask is empty."""
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def balanced_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE inside the mask plus MSE outside, each a masked mean, so small objects still count."""
    err = (a - b).square()
    return masked_mean(err, mask) + masked_mean(err, 1.0 - mask)


def psnr_in_mask(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR in dB over the pixels inside `mask` (images in [0, 1])."""
    mse = float(masked_mean((a - b).square(), mask))
    return 99.0 if mse <= 1e-10 else 10.0 * math.log10(1.0 / mse)


def mask_iou(alpha: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> float:
    pred = alpha > threshold
    true = mask > 0.5
    union = (pred | true).sum()
    return 1.0 if union == 0 else float((pred & true).sum()) / float(union)


class WeightedLosses:
    """Losses in a named dict with weights looked up by name.

    Built once per stage with the weights from the config and the names the stage will compute;
    a weight with no loss or a loss with no weight is an error before any step runs.
    """

    def __init__(self, weights: dict[str, float], active: list[str], where: str):
        missing = sorted(set(active) - set(weights))
        unused = sorted(set(weights) - set(active))
        if missing or unused:
            raise ValueError(
                f"{where}: loss weights and losses differ (losses without a weight: {missing}; "
                f"weights without a loss: {unused})"
            )
        self.weights = {name: weights[name] for name in active}

    def total(self, losses: dict[str, torch.Tensor], scale: dict[str, float] | None = None) -> torch.Tensor:
        unknown = sorted(set(losses) - set(self.weights))
        if unknown:
            raise KeyError(f"losses {unknown} have no weight")
        scale = scale or {}
        terms = [self.weights[n] * scale.get(n, 1.0) * v for n, v in losses.items()]
        return torch.stack(terms).sum()


def loss_values(losses: dict) -> dict[str, float]:
    """Plain floats for progress events and logs (one host sync per logged step)."""
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
