"""3D Gaussian model, its versioned state dict, densify/prune as a strategy object, PLY export.

Parameters are stored unconstrained (log-scales, opacity and colour logits, raw quaternions) and
`activated()` maps them to what the rasterizer takes: means [N,3], quats [N,4] (w,x,y,z, unit),
scales [N,3] linear, opacities [N] in (0,1), colors [N,3] in (0,1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backend.raster.torch_ref import quat_to_rotmat
from shared import ply

STATE_FORMAT = "dreamscene4d-gaussians"
STATE_VERSION = 1
PARAM_NAMES = ("means", "quats", "log_scales", "opacity_logits", "color_logits")


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-6, 1 - 1e-6)
    return torch.log(x / (1 - x))


def nearest_neighbour_rms(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Root mean squared distance of every point to its k nearest neighbours, [N]."""
    out = []
    for start in range(0, len(points), chunk):
        d2 = torch.cdist(points[start : start + chunk], points).square()
        # The smallest distance is the point to itself.
        nearest = d2.topk(k + 1, dim=1, largest=False).values[:, 1:]
        out.append(nearest.mean(dim=1).sqrt())
    return torch.cat(out)


class GaussianModel(nn.Module):
    def __init__(self, means, quats, log_scales, opacity_logits, color_logits):
        super().__init__()
        self.means = nn.Parameter(means)
        self.quats = nn.Parameter(quats)
        self.log_scales = nn.Parameter(log_scales)
        self.opacity_logits = nn.Parameter(opacity_logits)
        self.color_logits = nn.Parameter(color_logits)

    @classmethod
    def random_ball(
        cls, num: int, radius: float, generator: torch.Generator | None = None, device="cpu"
    ) -> GaussianModel:
        """METHOD.md init: uniform in a ball, grey, opacity 0.1, identity rotation, 3-NN scale."""
        direction = torch.randn(num, 3, generator=generator)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
        r = radius * torch.rand(num, 1, generator=generator).pow(1.0 / 3.0)
        means = direction * r
        scales = nearest_neighbour_rms(means).clamp_min(1e-7)
        return cls(
            means,
            torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(num, 1),
            torch.log(scales)[:, None].repeat(1, 3),
            inverse_sigmoid(torch.full((num,), 0.1)),
            torch.zeros(num, 3),
        ).to(device)

    def __len__(self) -> int:
        return self.means.shape[0]

    def activated(self) -> dict[str, torch.Tensor]:
        return {
            "means": self.means,
            "quats": torch.nn.functional.normalize(self.quats, dim=-1),
            "scales": torch.exp(self.log_scales),
            "opacities": torch.sigmoid(self.opacity_logits),
            "colors": torch.sigmoid(self.color_logits),
        }

    # ---- persistence -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "params": {name: getattr(self, name).detach().cpu().clone() for name in PARAM_NAMES},
        }

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> GaussianModel:
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a {STATE_FORMAT} v{STATE_VERSION} state dict "
                f"(found format={state.get('format')!r}, version={state.get('version')!r})"
            )
        params = state["params"]
        missing = [n for n in PARAM_NAMES if n not in params]
        if missing:
            raise ValueError(f"Gaussian state dict lacks {missing}")
        return cls(*(params[n].float() for n in PARAM_NAMES)).to(device)

    def save_ply(self, path: Path) -> None:
        a = {k: v.detach().cpu().numpy() for k, v in self.activated().items()}
        ply.write_ply(path, a["means"], a["quats"], a["scales"], a["opacities"], a["colors"])

    @classmethod
    def load_ply(cls, path: Path, device="cpu") -> GaussianModel:
        g = ply.read_ply(path)
        t = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in g.items()}
        return cls(
            t["means"],
            t["quats"],
            torch.log(t["scales"].clamp_min(1e-12)),
            inverse_sigmoid(t["opacities"]),
            inverse_sigmoid(t["colors"]),
        ).to(device)


# ---- optimiser with parameter surgery --------------------------------------------------------


def make_optimizer(model: GaussianModel, lrs: dict[str, float]) -> torch.optim.Optimizer:
    groups = [{"params": [getattr(model, name)], "lr": lrs[name], "name": name} for name in PARAM_NAMES]
    return torch.optim.Adam(groups, lr=0.0, eps=1e-15)


def exponential_lr(step: int, lr_init: float, lr_final: float, max_steps: int) -> float:
    ratio = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return math.exp(math.log(lr_init) * (1 - ratio) + math.log(lr_final) * ratio)


def _replace_params(model: GaussianModel, optimizer: torch.optim.Optimizer, fn) -> None:
    """Apply `fn(tensor) -> tensor` along dim 0 to every parameter and its Adam moments."""
    for group in optimizer.param_groups:
        old = group["params"][0]
        state = optimizer.state.pop(old, None)
        new = nn.Parameter(fn(old.detach()))
        if state is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = fn(state[key])
            optimizer.state[new] = state
        group["params"][0] = new
        setattr(model, group["name"], new)


def prune(model: GaussianModel, optimizer: torch.optim.Optimizer, keep: torch.Tensor) -> None:
    _replace_params(model, optimizer, lambda t: t[keep])


def append(model: GaussianModel, optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> None:
    """Concatenate new Gaussians (raw parameters by name); their Adam moments start at zero."""
    names = {id(getattr(model, n)): n for n in PARAM_NAMES}

    for group in optimizer.param_groups:
        old = group["params"][0]
        name = names[id(old)]
        state = optimizer.state.pop(old, None)
        new = nn.Parameter(torch.cat([old.detach(), extra[name].to(old)]))
        if state is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.cat([state[key], torch.zeros_like(extra[name]).to(state[key])])
            optimizer.state[new] = state
        group["params"][0] = new
        setattr(model, name, new)


@dataclass
class DensifyStrategy:
    """Clone / split / prune on accumulated view-space gradients (3DGS rules, METHOD.md numbers).

    The training step stays: render -> losses -> backward -> strategy.after_backward -> optimiser
    step -> strategy.after_step.  View-space gradients are measured in NDC units (pixel gradient
    times half the image size), which is what the published 0.01 threshold refers to.
    """

    interval: int = 100
    max_gaussians: int = 15000
    grad_threshold: float = 0.01
    clone_max_scale: float = 0.005
    split_factor: float = 1.6
    prune_opacity: float = 0.01
    prune_max_scale: float = 0.05
    until_step: int = 10**9
    # Draws the split children's offsets; None uses the global generator of the model's device.
    # Objects lifted together each bring their own, so each object's run does not depend on
    # which others share its loop.
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.grad_sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def after_backward(
        self, model: GaussianModel, means2d: torch.Tensor, radii: torch.Tensor, width: int, height: int
    ):
        """Accumulate |d loss / d means2d| in NDC for every camera where a Gaussian was visible."""
        if means2d.grad is None:
            return
        n = len(model)
        if self.grad_sum is None or self.grad_sum.shape[0] != n:
            self.grad_sum = torch.zeros(n, device=model.means.device)
            self.count = torch.zeros(n, device=model.means.device)
        grad = means2d.grad.detach().reshape(-1, n, 2)
        scale = torch.tensor([width / 2.0, height / 2.0], device=grad.device)
        norms = (grad * scale).norm(dim=-1)
        visible = (radii.reshape(-1, n) > 0).float()
        self.grad_sum += (norms * visible).sum(0)
        self.count += visible.sum(0)

    def after_step(self, model: GaussianModel, optimizer: torch.optim.Optimizer, step: int) -> dict[str, int]:
        """At every `interval` steps: densify while below the budget, then prune. Returns counts."""
        if step == 0 or step % self.interval or step > self.until_step or self.grad_sum is None:
            return {}
        stats = {"cloned": 0, "split": 0, "pruned": 0}
        with torch.no_grad():
            if len(model) < self.max_gaussians:
                mean_grad = self.grad_sum / self.count.clamp_min(1)
                stats.update(self._densify(model, optimizer, mean_grad))
            a = model.activated()
            remove = (a["opacities"] < self.prune_opacity) | (a["scales"].amax(dim=1) > self.prune_max_scale)
            if remove.all():
                remove[:] = False  # never empty the model; the losses will recover it
            stats["pruned"] = int(remove.sum())
            prune(model, optimizer, ~remove)
        self.grad_sum = None
        self.count = None
        return stats

    def _densify(self, model, optimizer, mean_grad) -> dict[str, int]:
        a = model.activated()
        max_scale = a["scales"].amax(dim=1)
        hot = mean_grad > self.grad_threshold
        budget = self.max_gaussians - len(model)
        clone = hot & (max_scale <= self.clone_max_scale)
        split = hot & (max_scale > self.clone_max_scale)
        # Respect the budget: keep the hottest candidates.
        for mask in (clone, split):
            if mask.sum() > budget:
                idx = torch.nonzero(mask).squeeze(1)
                top = mean_grad[idx].topk(max(budget, 0)).indices
                mask[:] = False
                mask[idx[top]] = True
            budget -= int(mask.sum())
        raw = {name: getattr(model, name).detach() for name in PARAM_NAMES}
        cloned = {name: t[clone] for name, t in raw.items()}
        # Split: two children sampled inside the parent, each shrunk by split_factor; the parent goes.
        rot = quat_to_rotmat(raw["quats"][split])
        std = a["scales"][split]
        children = []
        for _ in range(2):
            noise = torch.randn(std.shape, generator=self.generator, device=std.device, dtype=std.dtype)
            offset = (rot @ (noise * std).unsqueeze(-1)).squeeze(-1)
            child = {name: t[split].clone() for name, t in raw.items()}
            child["means"] = child["means"] + offset
            child["log_scales"] = child["log_scales"] - math.log(self.split_factor)
            children.append(child)
        n_split = int(split.sum())
        keep = ~split
        prune(model, optimizer, keep)
        extra = {name: torch.cat([cloned[name]] + [c[name] for c in children]) for name in PARAM_NAMES}
        if len(extra["means"]):
            append(model, optimizer, extra)
        return {"cloned": int(clone.sum()), "split": n_split}


def final_prune(
    model: GaussianModel, optimizer: torch.optim.Optimizer | None, opacity: float, max_scale: float
) -> int:
    with torch.no_grad():
        a = model.activated()
        remove = (a["opacities"] < opacity) | (a["scales"].amax(dim=1) > max_scale)
        if remove.all():
            return 0
        if optimizer is None:
            optimizer = make_optimizer(model, {n: 0.0 for n in PARAM_NAMES})
        prune(model, optimizer, ~remove)
        return int(remove.sum())
