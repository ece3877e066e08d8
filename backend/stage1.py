"""Stage 1: one object lifted to static 3D Gaussians from its first frame, then placed in the frame.

A function over explicit inputs: the object's first frame and mask, the config, a guidance model
(or None) and callbacks.  It returns the Gaussians, the object-to-world placement of frame 0 and
the reference-view metrics.  The caller saves checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backend.cameras import Camera, fit_long_side, input_camera, stack_cameras
from backend.config import Config
from backend.crop import CropWindow, crop_object
from backend.errors import JobCancelled
from backend.gaussians import (
    DensifyStrategy,
    GaussianModel,
    exponential_lr,
    final_prune,
    make_optimizer,
)
from backend.losses import WeightedLosses, balanced_mse, loss_values, mask_iou, psnr_in_mask
from backend.raster import rasterize

ProgressFn = Callable[[dict], None]
WHITE = (1.0, 1.0, 1.0)


@dataclass
class StaticResult:
    model: GaussianModel
    crop_window: CropWindow
    scale: float  # object -> world scale of frame 0 (kept by stage 2)
    translation: np.ndarray  # [3] object -> world translation of frame 0
    metrics: dict = field(default_factory=dict)

    def checkpoint(self) -> dict:
        """What stage 2 and a resumed run read back: the Gaussians, the placement, the metrics."""
        return {"gaussians": self.model.state(), "placement": self.placement_state(), "metrics": self.metrics}

    def placement_state(self) -> dict:
        return {
            "scale": float(self.scale),
            "translation": [float(v) for v in self.translation],
            "crop_window": self.crop_window.to_dict(),
        }


class StepTimer:
    """Moving-average step time for ETA figures in progress events."""

    def __init__(self, total: int):
        self.total = total
        self.start = time.perf_counter()
        self.last = self.start
        self.avg: float | None = None

    def tick(self, step: int) -> float:
        now = time.perf_counter()
        dt = now - self.last
        self.last = now
        self.avg = dt if self.avg is None else 0.9 * self.avg + 0.1 * dt
        return self.avg * max(self.total - step - 1, 0)


def report_every(total: int) -> int:
    return max(1, total // 50)


def render_views(model_tensors: dict, cameras: list[Camera], device, background=WHITE, backend="auto"):
    viewmats, Ks = stack_cameras(cameras, device)
    bg = torch.tensor(background, device=device, dtype=torch.float32)
    return rasterize(
        model_tensors["means"],
        model_tensors["quats"],
        model_tensors["scales"],
        model_tensors["opacities"],
        model_tensors["colors"],
        viewmats,
        Ks,
        cameras[0].width,
        cameras[0].height,
        background=bg,
        backend=backend,
    )


def sample_novel_cameras(cfg, count: int, resolution: int, rng: np.random.Generator):
    """Random orbit views around the reference (elevation 0, azimuth 0, radius 2)."""
    d_elev = rng.integers(int(cfg.elevation_range[0]), int(cfg.elevation_range[1]) + 1, size=count).astype(
        float
    )
    d_azim = rng.uniform(cfg.azimuth_range[0], cfg.azimuth_range[1], size=count)
    d_rad = rng.uniform(cfg.radius_range[0], cfg.radius_range[1], size=count)
    cams = [Camera.orbit(e, a, 2.0 + r, resolution, resolution) for e, a, r in zip(d_elev, d_azim, d_rad)]
    return cams, d_elev, d_azim, d_rad


def novel_resolution(schedule: list[list[float]], ratio: float) -> int:
    res = int(schedule[0][1])
    for start, value in schedule:
        if ratio >= start:
            res = int(value)
    return res


def to_chw(image: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(image, dtype=torch.float32, device=device).permute(2, 0, 1).contiguous()


@dataclass
class LiftInput:
    """One object's first frame [H,W,3] float in [0,1] and mask [H,W] bool, and its id."""

    image: np.ndarray
    mask: np.ndarray
    object_id: str = "001"


class _ObjectLift:
    """One object's stage-1 state inside `lift_objects`: its reference crop, Gaussians, optimiser,
    densification and random streams (seeded by the object id, so an object's run is the same
    whichever others share the loop)."""

    def __init__(self, item: LiftInput, config: Config, device: torch.device, with_sds: bool):
        cfg = config.stage1
        self.object_id = item.object_id
        self.seed = seed = config.seed + int(item.object_id) if item.object_id.isdigit() else config.seed
        self.rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        self.frame = to_chw(item.image, device)
        self.frame_mask = torch.as_tensor(item.mask, dtype=torch.float32, device=device)[None]
        hwc = self.frame.permute(1, 2, 0)
        crop = crop_object(hwc, self.frame_mask[0], size=cfg.reference_size, fill_ratio=config.crop_fill)
        self.ref_img, self.ref_mask, self.window = crop.image, (crop.mask > 0.5).float(), crop.window
        # The SDS condition: the same window at the guidance's 256 px.
        self.sds_reference = (
            crop_object(hwc, self.frame_mask[0], size=256, window=_resized_window(self.window, 256)).image
            if with_sds
            else None
        )
        self.model = GaussianModel.random_ball(
            cfg.num_gaussians, cfg.init_radius, generator=gen, device=device
        )
        self.optimizer = make_optimizer(
            self.model,
            {
                "means": cfg.lr_position,
                "color_logits": cfg.lr_color,
                "opacity_logits": cfg.lr_opacity,
                "log_scales": cfg.lr_scale,
                "quats": cfg.lr_rotation,
            },
        )
        d = cfg.densify
        self.strategy = DensifyStrategy(
            interval=d.interval,
            max_gaussians=d.max_gaussians,
            grad_threshold=d.grad_threshold,
            clone_max_scale=d.clone_max_scale,
            split_factor=d.split_factor,
            prune_opacity=d.prune_opacity,
            prune_max_scale=d.prune_max_scale,
            until_step=int(d.until_ratio * cfg.iters),
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        self.timer = StepTimer(cfg.iters)
        self.start = time.perf_counter()


def lift_object(
    image: np.ndarray,
    mask: np.ndarray,
    config: Config,
    device: torch.device,
    guidance=None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    object_id: str = "001",
    raster_backend: str = "auto",
) -> StaticResult:
    """Stage 1 for one object. `image` [H,W,3] float in [0,1], `mask` [H,W] bool (frame 0)."""
    (result,) = lift_objects(
        [LiftInput(image, mask, object_id)],
        config,
        device,
        guidance,
        on_progress,
        should_stop,
        raster_backend,
    )
    return result


def lift_objects(
    items: list[LiftInput],
    config: Config,
    device: torch.device,
    guidance=None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    raster_backend: str = "auto",
) -> list[StaticResult]:
    """Stage 1 for several objects of a video in one loop: each step renders every object and
    scores all their novel views in one SDS batch, each view conditioned on its own object's
    reference crop.

    The objects share nothing but that batch: each has its own Gaussians, optimiser and
    densification, and the SDS term is the sum of the objects' per-view means, so each object
    gets the gradient it would get alone (up to the SDS noise draws).
    """
    if not items:
        return []
    cfg = config.stage1
    d = cfg.densify
    lifts = [_ObjectLift(item, config, device, guidance is not None) for item in items]
    # The global stream draws the SDS noise (shared by the batch): seeded by the first object.
    torch.manual_seed(lifts[0].seed)
    ref_cam = Camera.orbit(0.0, 0.0, 2.0, cfg.reference_size, cfg.reference_size)
    if guidance is not None:
        guidance.set_references(torch.stack([lift.sds_reference for lift in lifts]))
        # View v of object i is conditioned on reference i.
        reference_index = torch.arange(len(lifts), device=device).repeat_interleave(cfg.novel_views)
    active = ["rgb", "mask"] + (["sds"] if guidance is not None else [])
    weights = {k: v for k, v in cfg.loss_weights.items() if guidance is not None or k != "sds"}
    losses_spec = WeightedLosses(weights, active, "stage1.loss_weights")
    as_t = lambda a: torch.as_tensor(np.concatenate(a), dtype=torch.float32, device=device)  # noqa: E731
    names = ", ".join(lift.object_id for lift in lifts)

    every = report_every(cfg.iters)
    for step in range(cfg.iters):
        if should_stop is not None and should_stop():
            raise JobCancelled(f"object {names}: stopped in stage 1 at step {step}")
        ratio = (step + 1) / cfg.iters
        lr = exponential_lr(step, cfg.lr_position, cfg.lr_position_final, cfg.lr_position_steps)
        losses, renders, novel_images, views = [], [], [], ([], [], [])
        for lift in lifts:
            for group in lift.optimizer.param_groups:
                if group["name"] == "means":
                    group["lr"] = lr
            g = lift.model.activated()
            ref = render_views(g, [ref_cam], device, backend=raster_backend)
            losses.append(
                {
                    "rgb": balanced_mse(ref.color[0].permute(2, 0, 1), lift.ref_img, lift.ref_mask),
                    "mask": balanced_mse(ref.alpha[0].permute(2, 0, 1), lift.ref_mask, lift.ref_mask),
                }
            )
            renders.append([ref])
            if guidance is not None:
                res = novel_resolution(cfg.novel_resolution_schedule, ratio)
                cams, de, da, dr = sample_novel_cameras(cfg, cfg.novel_views, res, lift.rng)
                novel = render_views(g, cams, device, backend=raster_backend)
                images = novel.color.permute(0, 3, 1, 2)
                if res != 256:
                    images = F.interpolate(images, (256, 256), mode="bilinear", align_corners=False)
                novel_images.append(images)
                for acc, values in zip(views, (de, da, dr)):
                    acc.append(values)
                renders[-1].append(novel)
        total = torch.stack(
            [losses_spec.total(obj_losses, scale={"rgb": ratio, "mask": ratio}) for obj_losses in losses]
        ).sum()
        if guidance is not None:
            sds_sum, _ = guidance.sds_loss(
                torch.cat(novel_images),
                *(as_t(v) for v in views),
                step_ratio=ratio,
                reference_index=reference_index,
                reduction="sum",
            )
            # Sum over objects of each object's mean over its own views.
            sds = sds_sum / cfg.novel_views
            total = total + losses_spec.weights["sds"] * sds
            for obj_losses in losses:
                obj_losses["sds"] = sds.detach() / len(lifts)
        for lift in lifts:
            lift.optimizer.zero_grad(set_to_none=True)
        total.backward()
        for lift, outs, obj_losses in zip(lifts, renders, losses):
            for out in outs:
                lift.strategy.after_backward(
                    lift.model, out.means2d, out.radii, out.color.shape[2], out.color.shape[1]
                )
            lift.optimizer.step()
            if len(lift.model) < d.max_gaussians or step % d.interval == 0:
                lift.strategy.after_step(lift.model, lift.optimizer, step + 1)
            eta = lift.timer.tick(step)
            if on_progress is not None and (step % every == 0 or step == cfg.iters - 1):
                on_progress(
                    {
                        "type": "progress",
                        "object": lift.object_id,
                        "stage": "static",
                        "phase": "lift",
                        "step": step + 1,
                        "total": cfg.iters,
                        "losses": loss_values(obj_losses) | {"gaussians": len(lift.model)},
                        "eta_s": eta,
                    }
                )

    results = []
    for lift in lifts:
        model = lift.model
        final_prune(model, lift.optimizer, d.final_prune_opacity, d.final_prune_max_scale)
        with torch.no_grad():
            ref = render_views(model.activated(), [ref_cam], device, backend=raster_backend)
            metrics = {
                "psnr": psnr_in_mask(ref.color[0].permute(2, 0, 1), lift.ref_img, lift.ref_mask),
                "iou": mask_iou(ref.alpha[0].permute(2, 0, 1), lift.ref_mask),
                "gaussians": len(model),
            }
        scale, translation = place_frame0(
            model,
            lift.frame,
            lift.frame_mask,
            lift.window,
            config,
            device,
            on_progress,
            should_stop,
            lift.object_id,
            raster_backend,
        )
        metrics["seconds"] = time.perf_counter() - lift.start
        results.append(StaticResult(model, lift.window, scale, translation, metrics))
    return results


def _resized_window(window: CropWindow, size: int) -> CropWindow:
    return dataclasses.replace(window, size=size)


def transform_gaussians(g: dict, scale, translation) -> dict:
    """Object -> world: positions scaled about the object origin then translated; sizes scaled."""
    out = dict(g)
    out["means"] = g["means"] * scale + translation
    out["scales"] = g["scales"] * scale
    return out


def place_frame0(
    model: GaussianModel,
    frame: torch.Tensor,
    frame_mask: torch.Tensor,
    window: CropWindow,
    config: Config,
    device,
    on_progress: ProgressFn | None,
    should_stop,
    object_id: str,
    raster_backend: str,
) -> tuple[float, np.ndarray]:
    """Fit the frame-0 object-to-world translation against the full frame; the scale comes from the crop.

    The input camera shares Zero123's field of view across the frame height, so an object lifted
    in a crop of side c pixels has world scale c / H at the reference depth (camera distance 2).
    """
    cfg = config.stage1
    _, height, width = frame.shape
    scale = float(window.side) / height
    w, h = fit_long_side(width, height, cfg.placement_max_side)
    cam = input_camera(width, height)
    start = cam.unproject(np.array([[window.centre_x, window.centre_y]]), np.array([2.0]))[0]
    cam = cam.resized(w, h)
    target = F.interpolate(frame[None], (h, w), mode="area")[0]
    target_mask = (F.interpolate(frame_mask[None], (h, w), mode="area")[0] > 0.5).float()
    target = target * target_mask + (1 - target_mask)  # the object on white, as rendered
    translation = torch.tensor(start, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([translation], lr=cfg.placement_lr)
    weights = WeightedLosses(cfg.placement_loss_weights, ["rgb", "mask"], "stage1.placement_loss_weights")
    with torch.no_grad():
        g = {k: v.detach() for k, v in model.activated().items()}
    every = report_every(cfg.placement_iters)
    timer = StepTimer(cfg.placement_iters)
    for step in range(cfg.placement_iters):
        if should_stop is not None and should_stop():
            raise JobCancelled(f"object {object_id}: stopped in stage 1 placement at step {step}")
        out = render_views(transform_gaussians(g, scale, translation), [cam], device, backend=raster_backend)
        color = out.color[0].permute(2, 0, 1)
        alpha = out.alpha[0].permute(2, 0, 1)
        losses = {
            "rgb": balanced_mse(color, target, target_mask),
            "mask": balanced_mse(alpha, target_mask, target_mask),
        }
        total = weights.total(losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        eta = timer.tick(step)
        if on_progress is not None and (step % every == 0 or step == cfg.placement_iters - 1):
            on_progress(
                {
                    "type": "progress",
                    "object": object_id,
                    "stage": "static",
                    "phase": "placement",
                    "step": step + 1,
                    "total": cfg.placement_iters,
                    "losses": loss_values(losses),
                    "eta_s": eta,
                }
            )
    return scale, translation.detach().cpu().numpy().astype(np.float64)
