"""Stage 2: motion of one object.

Phase A (deformation): a HexPlane field deforms the frozen stage-1 Gaussians per frame so that,
seen from the reference orbit view, they match each frame's own object-centric crop (RGB, mask,
optical flow, SDS per frame, local rigidity and scale regularisers).
Phase B (object-to-world): per-frame translation (scale from the crop) fitted on full frames.
Phase C (joint): deformation (stage2.joint_lr_factor, 0.1x as published) and translation
fine-tuned together in the world frame; optionally also the canonical colours, opacities and
scales (stage2.joint_color_lr, joint_shape_lr; off in the published presets).
The result is baked: per-frame world-space Gaussians for composition.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from backend.cameras import Camera, fit_long_side, input_camera, stack_cameras
from backend.config import Config
from backend.crop import crop_track
from backend.data import VideoInput
from backend.errors import JobCancelled
from backend.gaussians import GaussianModel, exponential_lr
from backend.losses import WeightedLosses, balanced_mse, loss_values, mask_iou, psnr_in_mask
from backend.motion.flow import compute_flows, flow_loss, gaussian_displacement_colors
from backend.motion.frames import sample_frames
from backend.motion.hexplane import DeformationField
from backend.motion.placement import FramePlacement
from backend.motion.regularizers import (
    knn,
    local_rigidity_loss,
    local_scale_consistency_loss,
    neighbour_weights,
    scale_deviation_loss,
)
from backend.raster import rasterize_batch
from backend.stage1 import WHITE, StepTimer, render_views, report_every

PHASE_A_LOSSES = ("rgb", "mask", "flow", "scale_deviation", "scale_consistency", "rigidity")


def project(means: torch.Tensor, camera: Camera) -> torch.Tensor:
    """World points [..., N, 3] -> pixel coordinates [..., N, 2] (differentiable)."""
    view = torch.as_tensor(camera.viewmat, dtype=means.dtype, device=means.device)
    K = torch.as_tensor(camera.K, dtype=means.dtype, device=means.device)
    cam = means @ view[:3, :3].T + view[:3, 3]
    uv = cam @ K.T
    return uv[..., :2] / uv[..., 2:3].clamp_min(1e-6)


class Progress:
    def __init__(self, emit, object_id: str, phase: str, total: int):
        self.emit, self.object_id, self.phase, self.total = emit, object_id, phase, total
        self.timer = StepTimer(total)
        self.every = report_every(total)

    def __call__(self, step: int, losses: dict) -> None:
        eta = self.timer.tick(step)
        if self.emit is not None and (step % self.every == 0 or step == self.total - 1):
            self.emit(
                {
                    "type": "progress",
                    "object": self.object_id,
                    "stage": "motion",
                    "phase": self.phase,
                    "step": step + 1,
                    "total": self.total,
                    "losses": loss_values(losses),
                    "eta_s": eta,
                }
            )


def check_stop(should_stop, object_id: str, phase: str, step: int) -> None:
    if should_stop is not None and should_stop():
        raise JobCancelled(f"object {object_id}: stopped in stage 2 ({phase}) at step {step}")


def animate_object(
    video: VideoInput,
    k: int,
    static_ckpt: dict,
    config: Config,
    device: torch.device,
    guidance=None,
    emit: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    cfg = config.stage2
    object_id = video.object_ids[k]
    seed = config.seed + 1000 + k
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()
    T = video.num_frames

    canonical = GaussianModel.from_state(static_ckpt["gaussians"], device)
    for p in canonical.parameters():
        p.requires_grad_(False)
    can = canonical.activated()
    frames_np = video.object_frames(k)
    masks_np = video.object_masks(k)

    crop_size = config.crop_size
    track = crop_track(
        torch.as_tensor(frames_np, device=device),
        torch.as_tensor(masks_np.astype(np.float32), device=device),
        size=crop_size,
        fill_ratio=config.crop_fill,
    )
    crops = track.images  # [T,3,S,S] on white
    crop_masks = (track.masks > 0.5).float()  # [T,1,S,S]
    flows, valid = compute_flows(crops)
    ref_cam = Camera.orbit(0.0, 0.0, 2.0, crop_size, crop_size)
    if guidance is not None:
        sds_track = crop_track(
            torch.as_tensor(frames_np, device=device),
            torch.as_tensor(masks_np.astype(np.float32), device=device),
            size=256,
            fill_ratio=config.crop_fill,
        )
        guidance.set_references(sds_track.images)

    field = DeformationField(T, cfg.deformation).to(device)
    neighbours, distances = knn(can["means"], cfg.knn)
    weights_nn = neighbour_weights(distances)
    # Phase C may refine these (stage2.joint_shape_lr); until then they are stage 1's.
    log_scales0 = canonical.log_scales.detach().clone()
    opacity_logits = canonical.opacity_logits.detach().clone()

    def deform(times: list[int]):
        n = len(canonical)
        t = torch.tensor(times, device=device, dtype=torch.float32).repeat_interleave(n)
        rep = len(times)
        means, log_s, quats = field(
            can["means"].repeat(rep, 1), log_scales0.repeat(rep, 1), canonical.quats.repeat(rep, 1), t
        )
        return means.view(rep, n, 3), log_s.view(rep, n, 3), quats.view(rep, n, 4)

    # Phase C may refine the colours (stage2.joint_color_lr); until then they are stage 1's.
    color_logits = canonical.color_logits.detach().clone()

    def frame_gaussians(means, log_s, quats) -> dict:
        """One set of Gaussians per frame: deformed [F, N, ...] plus the shared appearance."""
        n_frames = means.shape[0]
        return {
            "means": means,
            "quats": quats,
            "scales": log_s.exp(),
            "opacities": torch.sigmoid(opacity_logits).expand(n_frames, -1),
            "colors": torch.sigmoid(color_logits).expand(n_frames, -1, -1),
        }

    ref_viewmat, ref_K = stack_cameras([ref_cam], device)
    white = torch.tensor(WHITE, dtype=torch.float32, device=device)

    def render_reference(g: dict, colors=None, background=white):
        n_frames = g["means"].shape[0]
        return rasterize_batch(
            g["means"], g["quats"], g["scales"], g["opacities"], g["colors"] if colors is None else colors,
            ref_viewmat.expand(n_frames, -1, -1, -1), ref_K.expand(n_frames, -1, -1, -1),
            crop_size, crop_size, background=background,
        )  # fmt: skip

    # ---- phase A: deformation in the object-centric frame ---------------------------------------
    # Every frame of a step is rendered in one batched call per kind of view (reference, flow,
    # novel) and the regularisers run on all frames at once: a small render is launch-bound, so
    # one call per frame cost more than the renders themselves on a GPU.
    active = list(PHASE_A_LOSSES) + (["sds"] if guidance is not None else [])
    weights = {n: w for n, w in cfg.loss_weights.items() if n in active}
    losses_a = WeightedLosses(weights, active, "stage2.loss_weights")
    optimizer = torch.optim.Adam(field.param_groups(cfg.deformation), eps=1e-15)
    iters_a = cfg.steps_per_frame * T
    progress = Progress(emit, object_id, "deformation", iters_a)
    for step in range(iters_a):
        check_stop(should_stop, object_id, "deformation", step)
        ratio = (step + 1) / iters_a
        sample = sample_frames(T, cfg.frames_per_step, rng)
        needed = sorted(set(sample.frames) | {a for a, _ in sample.flow_pairs})
        index = {t: i for i, t in enumerate(needed)}
        means, log_s, quats = deform(needed)
        losses: dict[str, torch.Tensor] = {}
        sel = torch.tensor([index[t] for t in sample.frames], device=device)
        g_sel = frame_gaussians(means[sel], log_s[sel], quats[sel])
        losses.update(rgb_and_mask_losses(render_reference(g_sel), sample.frames, crops, crop_masks))
        if sample.flow_pairs:
            prev = torch.tensor([index[a] for a, _ in sample.flow_pairs], device=device)
            now = torch.tensor([index[b] for _, b in sample.flow_pairs], device=device)
            disp = gaussian_displacement_colors(
                project(means[prev].detach(), ref_cam), project(means[now], ref_cam)
            )
            g_prev = frame_gaussians(means[prev].detach(), log_s[prev].detach(), quats[prev].detach())
            flow_imgs = render_reference(g_prev, colors=disp, background=None).color[:, 0].permute(0, 3, 1, 2)
            losses["flow"] = torch.stack(
                [
                    flow_loss(flow_imgs[j], flows[a], crop_masks[a, 0], valid[a])
                    for j, (a, _) in enumerate(sample.flow_pairs)
                ]
            ).mean()
        else:
            losses["flow"] = means.new_zeros(())
        d_log = log_s[sel] - log_scales0
        losses["scale_deviation"] = scale_deviation_loss(d_log)
        losses["scale_consistency"] = local_scale_consistency_loss(d_log, neighbours, weights_nn)
        losses["rigidity"] = local_rigidity_loss(
            can["means"], means[sel], canonical.quats, quats[sel], neighbours, weights_nn
        )
        if guidance is not None:
            losses["sds"] = sds_for_frames(guidance, cfg, sample.frames, g_sel, ratio, rng, device)
        total = losses_a.total(losses, scale={"rgb": ratio, "mask": ratio})
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        progress(step, losses)

    # ---- phase B: per-frame object-to-world translation -----------------------------------------
    H, W = video.height, video.width
    full_cam = input_camera(W, H)
    w, h = fit_long_side(W, H, config.stage1.placement_max_side)
    cam = full_cam.resized(w, h)
    targets, target_masks = full_frame_targets(frames_np, masks_np, w, h, device)
    # The crop keeps frame 0's side unless the object would be clipped, so this is stage 1's scale
    # for every frame where the object stays about its first size.
    scales_t = np.array([win.side / H for win in track.windows])
    centres = np.array([[win.centre_x, win.centre_y] for win in track.windows])
    translation0 = full_cam.unproject(centres, np.full(T, 2.0))
    placement = FramePlacement(
        translation0,
        scales_t,
        camera_center=full_cam.center,
        camera_forward=full_cam.c2w[:3, 2],
        mode=cfg.placement_model,
    ).to(device)
    with torch.no_grad():
        frozen = deform(list(range(T)))
    losses_b = WeightedLosses(cfg.placement_loss_weights, ["rgb", "mask"], "stage2.placement_loss_weights")
    opt_b = torch.optim.Adam([placement.translation], lr=cfg.placement_lr)
    progress = Progress(emit, object_id, "placement", cfg.placement_iters)
    for step in range(cfg.placement_iters):
        check_stop(should_stop, object_id, "placement", step)
        for group in opt_b.param_groups:
            group["lr"] = exponential_lr(step, cfg.placement_lr, cfg.placement_lr_final, 500)
        frames_b = sample_frames(T, cfg.frames_per_step, rng).frames
        losses = world_losses(
            frames_b, frozen, placement, frame_gaussians, cam, targets, target_masks, device
        )
        total = losses_b.total(losses)
        opt_b.zero_grad(set_to_none=True)
        total.backward()
        opt_b.step()
        progress(step, losses)

    # ---- phase C: joint fine-tuning in the world frame ------------------------------------------
    groups_c = field.param_groups(cfg.deformation, lr_scale=cfg.joint_lr_factor) + [
        {"params": [placement.translation], "lr": cfg.placement_lr_final, "name": "translation"}
    ]
    if cfg.joint_color_lr > 0:
        color_logits.requires_grad_(True)
        groups_c.append({"params": [color_logits], "lr": cfg.joint_color_lr, "name": "colors"})
    if cfg.joint_shape_lr > 0:
        log_scales0.requires_grad_(True)
        opacity_logits.requires_grad_(True)
        groups_c.append({"params": [log_scales0, opacity_logits], "lr": cfg.joint_shape_lr, "name": "shape"})
    if cfg.joint_max_side and cfg.joint_max_side != max(w, h):
        w_c, h_c = fit_long_side(W, H, cfg.joint_max_side)
        cam_c = full_cam.resized(w_c, h_c)
        targets_c, target_masks_c = full_frame_targets(frames_np, masks_np, w_c, h_c, device)
    else:
        cam_c, targets_c, target_masks_c = cam, targets, target_masks
    opt_c = torch.optim.Adam(groups_c, eps=1e-15)
    progress = Progress(emit, object_id, "joint", cfg.joint_iters)
    for step in range(cfg.joint_iters):
        check_stop(should_stop, object_id, "joint", step)
        frames_c = sample_frames(T, cfg.frames_per_step, rng).frames
        deformed = deform(frames_c)
        local = {t: i for i, t in enumerate(frames_c)}
        losses = world_losses(
            frames_c, deformed, placement, frame_gaussians, cam_c, targets_c, target_masks_c, device, local
        )
        total = losses_b.total(losses)
        opt_c.zero_grad(set_to_none=True)
        total.backward()
        opt_c.step()
        progress(step, losses)

    # ---- bake and measure --------------------------------------------------------------------
    canonical_state = static_ckpt["gaussians"]
    refined = {}
    if cfg.joint_color_lr > 0:
        refined["color_logits"] = color_logits
    if cfg.joint_shape_lr > 0:
        refined.update(log_scales=log_scales0, opacity_logits=opacity_logits)
    if refined:  # a new state: the static checkpoint's tensors stay untouched
        params = {**canonical_state["params"], **{n: v.detach().cpu().clone() for n, v in refined.items()}}
        canonical_state = {**canonical_state, "params": params}
    with torch.no_grad():
        means, log_s, quats = deform(list(range(T)))
        placed = [placement.apply(means[t], log_s[t].exp(), t) for t in range(T)]
        baked = {
            "means": torch.stack([m for m, _ in placed]).float().cpu(),
            "quats": F.normalize(quats, dim=-1).float().cpu(),
            "scales": torch.stack([s for _, s in placed]).float().cpu(),
            "opacities": torch.sigmoid(opacity_logits).float().cpu(),
            "colors": torch.sigmoid(color_logits).float().cpu(),
        }
        per_frame = []
        for t in range(T):
            g = {k2: v.to(device) for k2, v in baked.items()}
            g = {
                "means": g["means"][t],
                "quats": g["quats"][t],
                "scales": g["scales"][t],
                "opacities": g["opacities"],
                "colors": g["colors"],
            }
            out = render_views(g, [cam], device)
            per_frame.append(
                {
                    "frame": video.frame_names[t],
                    "psnr": psnr_in_mask(out.color[0].permute(2, 0, 1), targets[t], target_masks[t]),
                    "iou": mask_iou(out.alpha[0].permute(2, 0, 1), target_masks[t]),
                }
            )
    metrics = {
        "psnr": float(np.mean([p["psnr"] for p in per_frame])),
        "iou": float(np.mean([p["iou"] for p in per_frame])),
        "seconds": time.perf_counter() - t_start,
        "per_frame": per_frame,
    }
    return {
        "format": "dreamscene4d-motion",
        "version": 1,
        "gaussians": canonical_state,
        "deformation": {k2: v.detach().cpu() for k2, v in field.state_dict().items()},
        "placement": {
            "translation": placement.translation.detach().cpu().numpy(),
            "scale": placement.scale.detach().cpu().numpy(),
        },
        "baked": baked,
        "metrics": metrics,
    }


def full_frame_targets(frames_np, masks_np, w: int, h: int, device):
    """Frames [T,H,W,3] and masks [T,H,W] -> the object on white [T,3,h,w] and its mask [T,1,h,w]."""
    frames = torch.as_tensor(frames_np, device=device).permute(0, 3, 1, 2)
    masks = torch.as_tensor(masks_np.astype(np.float32), device=device)[:, None]
    frames = F.interpolate(frames, (h, w), mode="area")
    masks = (F.interpolate(masks, (h, w), mode="area") > 0.5).float()
    return frames * masks + (1 - masks), masks


def world_losses(
    frames, deformed, placement, frame_gaussians, cam, targets, target_masks, device, local=None
):
    """RGB and mask balanced MSE of the placed object against full frames, averaged over `frames`;
    all frames rendered in one batched call."""
    means, log_s, quats = deformed
    rows = torch.tensor([local[t] if local is not None else t for t in frames], device=device)
    means, log_s, quats = means[rows], log_s[rows], quats[rows]
    n_frames, n = means.shape[:2]
    frame_of_each = torch.tensor(frames, device=device).repeat_interleave(n)
    world_means, world_scales = placement.apply(
        means.reshape(-1, 3), log_s.exp().reshape(-1, 3), frame_of_each
    )
    g = frame_gaussians(world_means.view(n_frames, n, 3), log_s, quats)
    g["scales"] = world_scales.view(n_frames, n, 3)
    viewmat, K = stack_cameras([cam], device)
    out = rasterize_batch(
        g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
        viewmat.expand(n_frames, -1, -1, -1), K.expand(n_frames, -1, -1, -1), cam.width, cam.height,
        background=torch.tensor(WHITE, dtype=torch.float32, device=device),
    )  # fmt: skip
    return rgb_and_mask_losses(out, frames, targets, target_masks)


def rgb_and_mask_losses(out, frames, targets, target_masks) -> dict[str, torch.Tensor]:
    """Balanced MSE of each frame's render (out: one set per entry of `frames`, first view) against
    that frame's target and mask, averaged over the frames."""
    rgb, mask = [], []
    for j, t in enumerate(frames):
        rgb.append(balanced_mse(out.color[j, 0].permute(2, 0, 1), targets[t], target_masks[t]))
        mask.append(balanced_mse(out.alpha[j, 0].permute(2, 0, 1), target_masks[t], target_masks[t]))
    return {"rgb": torch.stack(rgb).mean(), "mask": torch.stack(mask).mean()}


def sds_for_frames(guidance, cfg, frames, frame_gaussians: dict, ratio, rng, device):
    """SDS on `novel_views_per_frame` random views of each sampled frame, each view conditioned on
    its own frame's crop; all views rendered in one batched call and scored in one guidance batch.
    frame_gaussians holds one set of Gaussians per entry of `frames` ([F, N, ...])."""
    cams, de, da, dr, refs = [], [], [], [], []
    n = cfg.novel_views_per_frame
    for t in frames:
        d_elev = rng.integers(-30, 31, size=n).astype(float)
        d_azim = rng.uniform(-180, 180, size=n)
        d_rad = np.zeros(n)
        cams += [Camera.orbit(e, a, 2.0 + r, 256, 256) for e, a, r in zip(d_elev, d_azim, d_rad)]
        de.append(d_elev)
        da.append(d_azim)
        dr.append(d_rad)
        refs += [t] * n
    viewmats, Ks = stack_cameras(cams, device)
    g = frame_gaussians
    out = rasterize_batch(
        g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
        viewmats.view(len(frames), n, 4, 4), Ks.view(len(frames), n, 3, 3), 256, 256,
        background=torch.tensor(WHITE, dtype=torch.float32, device=device),
    )  # fmt: skip
    as_t = lambda a: torch.as_tensor(np.concatenate(a), dtype=torch.float32, device=device)  # noqa: E731
    loss, _ = guidance.sds_loss(
        out.color.flatten(0, 1).permute(0, 3, 1, 2),
        as_t(de),
        as_t(da),
        as_t(dr),
        step_ratio=ratio,
        reference_index=torch.tensor(refs, device=device),
        t_range=tuple(cfg.sds_t_range),
        # Linear anneal clipped to [20, 500] holds t at 500 for the first half, as published.
        anneal="linear",
    )
    return loss
