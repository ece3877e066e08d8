"""Stage 3: the objects composed into one scene at consistent depth; renders, point tracks, scene file.

Input: per object the baked per-frame Gaussians of stage 2 in the input camera's world
(`backend.cameras.input_camera`), and the ORIGINAL frames and visible masks (never the inpainted
ones).  Steps (METHOD.md, "Stage 3: composition"):

1. Depth placement.  Scaling an object's Gaussians about the camera centre C by k (positions
   C - (C - mu) k, scales s k) leaves its image in the input view unchanged and multiplies its
   depth by k, so k only decides how far away the object sits.  The last object is the reference
   (k = 1).  Each other object starts from the ratio of estimated to rendered median depths and is
   refined by a sweep over [0.65, 1.5) minimising the L1 between rendered and estimated depth, both
   normalised by the reference object's median and 10-90 percentile range, inside the eroded union
   of the pair's masks where the rendered alpha > 0.75.  The sweep composites the two objects'
   separately rendered layers per pixel (nearer layer in front): exactly what a joint render gives
   when they do not interleave within a pixel, at the cost of two renders instead of one per
   candidate k.  Without a depth model every object keeps k = 1 (the report says so).
2. Metrics: all objects rasterised in one call per frame in the input view, on white; PSNR inside
   the union of the masks against the original frame, IoU of alpha > 0.5 against that union.
3. Renders at the video's aspect ratio: fixed (the input view), horizontal orbit (azimuth 0 -> 360)
   and elevation orbit (75 -> -75 -> 75), the video looped; MP4 + GIF + a PNG still each.
4. Point tracks: a grid in each object's first-frame mask, each point matched to a visible
   Gaussian of that object and projected over time; visibility from the rendered depth.
5. The scene on disk (shared/scene.py), optionally a per-frame PLY sequence per object.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from backend import render_video
from backend.cameras import Camera, fit_long_side, input_camera, stack_cameras
from backend.config import Config, Stage3Config
from backend.data import VideoInput
from backend.depth import DepthEstimate, DepthProvider, make_depth_provider
from backend.errors import JobCancelled
from backend.losses import mask_iou, psnr_in_mask
from backend.raster import rasterize
from shared import ply
from shared.scene import write_scene

EventFn = Callable[[dict], None]
WHITE = (1.0, 1.0, 1.0)
BAKED_KEYS = ("means", "quats", "scales", "opacities", "colors")
# The published mask erosion (7 px at 512 px frames; Stage3Config.mask_erosion overrides it) and
# how far (px, full frame) a track's grid point may be from its Gaussian's projected centre.
EROSION_AT_512 = 7
TRACK_MATCH_MAX_PX = 4.0
ELEVATION_ORBIT_LIMIT = 75.0
# Drawn tracks keep at least this fraction of the frame's long side between their start points,
# so small objects (with as many grid points as large ones) do not turn into a solid blob.
DRAWN_TRACK_SPACING = 1.0 / 48


# ---- Gaussians ------------------------------------------------------------------------------


def baked_tensors(object_id: str, entry: dict, num_frames: int, device) -> dict[str, torch.Tensor]:
    """motion[object_id] -> its baked arrays as float32 tensors, shapes checked."""
    baked = entry.get("baked") if isinstance(entry, dict) else None
    if baked is None:
        raise ValueError(f"object {object_id}: the stage-2 result has no 'baked' Gaussians")
    out = {name: torch.as_tensor(np.asarray(baked[name]) if not torch.is_tensor(baked[name]) else baked[name])
           for name in BAKED_KEYS}  # fmt: skip
    out = {name: value.detach().to(device=device, dtype=torch.float32) for name, value in out.items()}
    T, N = out["means"].shape[:2]
    expected = {
        "means": (T, N, 3),
        "quats": (T, N, 4),
        "scales": (T, N, 3),
        "opacities": (N,),
        "colors": (N, 3),
    }
    for name, shape in expected.items():
        if tuple(out[name].shape) != shape:
            raise ValueError(
                f"object {object_id}: baked {name} has shape {tuple(out[name].shape)}, expected {shape}"
            )
    if T != num_frames:
        raise ValueError(
            f"object {object_id}: baked Gaussians have {T} frames but the video has {num_frames}"
        )
    return out


def scale_about_center(g: dict[str, torch.Tensor], center: torch.Tensor, k: float) -> dict[str, torch.Tensor]:
    """Move Gaussians along the rays through `center` by factor k: positions C - (C - mu) k, sizes s k."""
    out = dict(g)
    out["means"] = center - (center - g["means"]) * k
    out["scales"] = g["scales"] * k
    return out


def frame_gaussians(objects: list[dict[str, torch.Tensor]], t: int) -> dict[str, torch.Tensor]:
    """All objects' Gaussians at frame t, concatenated for one rasterize call."""
    return {
        "means": torch.cat([g["means"][t] for g in objects]),
        "quats": torch.cat([g["quats"][t] for g in objects]),
        "scales": torch.cat([g["scales"][t] for g in objects]),
        "opacities": torch.cat([g["opacities"] for g in objects]),
        "colors": torch.cat([g["colors"] for g in objects]).clamp(0.0, 1.0),
    }


def render(g: dict[str, torch.Tensor], cameras: list[Camera], device, background=WHITE):
    viewmats, Ks = stack_cameras(cameras, device)
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    with torch.no_grad():
        return rasterize(
            g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], viewmats, Ks,
            cameras[0].width, cameras[0].height, background=bg,
        )  # fmt: skip


# ---- depth placement ------------------------------------------------------------------------


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def erode(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask.astype(bool)
    return cv2.erode(mask.astype(np.uint8), np.ones((size, size), np.uint8), borderValue=0).astype(bool)


def erosion_size(width: int, height: int, at_512: int = EROSION_AT_512) -> int:
    return max(1, round(at_512 * max(width, height) / 512))


def median_and_range(values: np.ndarray) -> tuple[float, float]:
    """Median and 10-90 percentile range (the normalisation of METHOD.md)."""
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    return float(q50), float(q90 - q10)


@dataclass
class DepthLayer:
    """One object rendered alone in the input view at frame 0 (k = 1)."""

    alpha: np.ndarray  # [h, w]
    depth: np.ndarray  # [h, w] expected depth, 0 where alpha = 0


def composite_depth(near_first: tuple, far_second: tuple, k: np.ndarray) -> np.ndarray:
    """Expected depth of two layers (a_i, z_i scaled by k [K, 1]) and (a_r, z_r), nearer in front.

    Returns [K, P]: (a_f z_f + (1 - a_f) a_b z_b) / (1 - (1 - a_f)(1 - a_b)) per pixel and k.
    """
    a_i, z_i = near_first
    a_r, z_r = far_second
    zi = k * z_i[None]  # [K, P]
    covered = 1.0 - (1.0 - a_i) * (1.0 - a_r)
    i_front = (zi <= z_r[None]) | (a_r[None] <= 0)
    i_first = a_i * zi + (1.0 - a_i) * a_r * z_r
    r_first = a_r * z_r + (1.0 - a_r) * a_i * zi
    return np.where(i_front, i_first, r_first) / np.maximum(covered, 1e-6)


def sweep_candidates(cfg: Stage3Config) -> np.ndarray:
    return np.linspace(cfg.k_sweep_min, cfg.k_sweep_max, cfg.k_sweep_steps, endpoint=False)


def fit_occlusion_order(
    layers: list[DepthLayer],
    masks: list[np.ndarray],
    cfg: Stage3Config,
    names: list[str],
    min_pixels: int = 16,
) -> tuple[list[float], list[str]]:
    """The weight-free fallback: keep k = 1 unless the visible masks contradict the depth order.

    Where two objects' renders overlap (both alpha > 0.5) in frame 0, the visible mask says which
    one is in front.  For each non-reference object the sweep's candidates (and 1) are scored by the
    fraction of those pixels whose rendered order (k z_i against z_ref) agrees; of the best, the k
    closest to 1 wins: the smallest move along the rays that respects the occlusions.
    Returns (k per object, notes).
    """
    count = len(layers)
    ref = count - 1
    ks = [1.0] * count
    notes: list[str] = []
    candidates = np.concatenate([[1.0], sweep_candidates(cfg)])
    for i in range(count - 1):
        both = (layers[i].alpha > 0.5) & (layers[ref].alpha > 0.5)
        i_front = both & masks[i] & ~masks[ref]
        ref_front = both & masks[ref] & ~masks[i]
        total = int(i_front.sum() + ref_front.sum())
        if total < min_pixels:
            continue
        k = candidates[:, None]
        agree = (k * layers[i].depth[i_front][None] < layers[ref].depth[i_front][None]).sum(axis=1)
        agree = agree + (k * layers[i].depth[ref_front][None] > layers[ref].depth[ref_front][None]).sum(
            axis=1
        )
        score = agree / total
        best = candidates[score >= score.max() - 1e-9]
        ks[i] = float(best[np.argmin(np.abs(np.log(best)))])
        notes.append(
            f"object {names[i]}: occlusions in frame 0 ({total} overlap pixels) agree {score.max():.0%} "
            f"with the depth order at k = {ks[i]:.3f} (at k = 1: {score[0]:.0%})"
        )
    return ks, notes


def fit_depth_scales(
    layers: list[DepthLayer],
    masks: list[np.ndarray],
    estimate: DepthEstimate,
    cfg: Stage3Config,
    erosion: int,
    on_object: Callable[[int], None] | None = None,
    names: list[str] | None = None,
) -> tuple[list[float], list[float], list[str]]:
    """k per object (last = reference, k = 1): init from the median-depth ratio, refined by the sweep.

    layers/masks: per object at the working size; estimate: depth at the same size.
    Returns (k, k_init, notes).
    """
    count = len(layers)
    ref = count - 1
    names = names or [str(i) for i in range(count)]
    ks = [1.0] * count
    k_init = [1.0] * count
    notes: list[str] = []
    valid = estimate.valid
    est_stats: list[tuple[float, float] | None] = []
    ren_stats: list[tuple[float, float] | None] = []
    for layer, mask in zip(layers, masks):
        est_region = erode(mask, erosion) & valid
        if not est_region.any():
            est_region = mask & valid
        ren_region = erode(layer.alpha > cfg.alpha_threshold, erosion) & valid
        if not ren_region.any():
            ren_region = (layer.alpha > cfg.alpha_threshold) & valid
        est_stats.append(median_and_range(estimate.depth[est_region]) if est_region.any() else None)
        ren_stats.append(median_and_range(layer.depth[ren_region]) if ren_region.any() else None)
    if est_stats[ref] is None or ren_stats[ref] is None:
        notes.append("reference object has no valid depth pixels; every object keeps k = 1")
        return ks, k_init, notes
    est_med_ref, est_rng_ref = est_stats[ref]
    ren_med_ref, ren_rng_ref = ren_stats[ref]
    est_rng_ref = max(est_rng_ref, 1e-6 * max(abs(est_med_ref), 1e-6))
    ren_rng_ref = max(ren_rng_ref, 1e-6 * max(abs(ren_med_ref), 1e-6))
    est_norm_full = (estimate.depth - est_med_ref) / est_rng_ref
    grid = sweep_candidates(cfg)
    for i in range(count - 1):
        if on_object is not None:
            on_object(i)
        if est_stats[i] is None or ren_stats[i] is None:
            notes.append(f"object {names[i]}: no valid depth pixels inside its mask; keeps k = 1")
            continue
        k0 = (est_stats[i][0] / est_med_ref) * (ren_med_ref / ren_stats[i][0])
        k_init[i] = float(k0)
        region = erode(masks[i] | masks[ref], erosion) & valid
        a_i, a_r = layers[i].alpha, layers[ref].alpha
        covered = 1.0 - (1.0 - a_i) * (1.0 - a_r)
        # The published rule: restrict to covered pixels when that leaves any.
        if (region & (covered > cfg.alpha_threshold)).any():
            region = region & (covered > cfg.alpha_threshold)
        if not region.any():
            ks[i] = float(k0)
            notes.append(f"object {names[i]}: empty comparison region; k from the median ratio only")
            continue
        pix = (a_i[region], layers[i].depth[region]), (a_r[region], layers[ref].depth[region])
        target = est_norm_full[region]
        candidates = np.concatenate([[k0], grid])  # the initial value wins ties, as in the published sweep
        losses = np.empty(len(candidates))
        chunk = max(1, 4_000_000 // max(1, len(target)))
        for start in range(0, len(candidates), chunk):
            k = candidates[start : start + chunk, None]
            rendered = (composite_depth(pix[0], pix[1], k) - ren_med_ref) / ren_rng_ref
            losses[start : start + chunk] = np.abs(rendered - target[None]).mean(axis=1)
        ks[i] = float(candidates[int(np.argmin(losses))])
    return ks, k_init, notes


# ---- cameras --------------------------------------------------------------------------------


def rotation_xy(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """R_y(azimuth) R_x(elevation): maps the +Z offset r to the orbit position of cameras.py."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    return ry @ rx


def orbit_center_of(objects: list[dict[str, torch.Tensor]], camera: Camera) -> tuple[np.ndarray, float]:
    """The point the orbits turn about: on the input camera's optical axis at the median camera
    depth of all frame-0 Gaussians (so orbit frame 0 is exactly the input view, as in the published
    renders, which orbit the on-axis origin); returns (centre, radius)."""
    means = torch.cat([g["means"][0] for g in objects]).cpu().numpy().astype(np.float64)
    _, depth = camera.project(means)
    radius = float(np.median(depth))
    if not np.isfinite(radius) or radius <= 1e-3:
        radius = float(np.linalg.norm(camera.center))
    c2w = camera.c2w
    return c2w[:3, 3] + radius * c2w[:3, 2], radius


def orbit_camera(base: Camera, center: np.ndarray, elevation_deg: float, azimuth_deg: float) -> Camera:
    """`base` turned about `center` by (elevation, azimuth): the same orbit convention as cameras.py
    (negative elevation looks from above), and the identity at (0, 0)."""
    rotation = np.eye(4)
    rotation[:3, :3] = rotation_xy(elevation_deg, azimuth_deg)
    to_center, from_center = np.eye(4), np.eye(4)
    to_center[:3, 3], from_center[:3, 3] = center, -center
    c2w = to_center @ rotation @ from_center @ base.c2w
    return Camera(np.linalg.inv(c2w), base.K.copy(), base.width, base.height)


def orbit_angles(path: str, count: int) -> list[tuple[float, float]]:
    """(elevation, azimuth) per frame: "horizontal" 0 -> 360 azimuth, "elevation" 75 -> -75 -> 75."""
    out = []
    for i in range(count):
        phase = i / count
        if path == "horizontal":
            out.append((0.0, 360.0 * phase))
        else:
            swing = 4.0 * ELEVATION_ORBIT_LIMIT  # down and back up over the clip
            e = (
                ELEVATION_ORBIT_LIMIT - swing * phase
                if phase <= 0.5
                else -ELEVATION_ORBIT_LIMIT + swing * (phase - 0.5)
            )
            out.append((e, 0.0))
    return out


# ---- tracks ---------------------------------------------------------------------------------


def grid_points(mask: np.ndarray, size: int) -> np.ndarray:
    """A size x size grid of pixel-centre points over the mask's bounding box, kept inside the mask.

    Coordinates are continuous pixels (x right, y down), pixel (i, j) centred at (i + 0.5, j + 0.5).
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros((0, 2))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    gx = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size
    gy = y0 + (np.arange(size) + 0.5) * (y1 - y0) / size
    px, py = np.meshgrid(gx, gy, indexing="xy")
    points = np.stack([px.ravel(), py.ravel()], axis=1)
    inside = mask[points[:, 1].astype(int), points[:, 0].astype(int)]
    # Snap to pixel centres so every point names one pixel unambiguously.
    return np.unique(np.floor(points[inside]) + 0.5, axis=0)


def sample_map(image: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of image [H, W] at the pixels containing uv [P, 2]; (values, inside-frame flags)."""
    height, width = image.shape
    ix, iy = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    values = image[np.clip(iy, 0, height - 1), np.clip(ix, 0, width - 1)]
    return values, inside


def match_points(
    points: np.ndarray,
    uv0: np.ndarray,
    z0: np.ndarray,
    depth0: np.ndarray,
    alpha0: np.ndarray,
    erosion: int,
    covered_alpha: float = 0.75,
    depth_tolerance: float = 0.1,
    map_scale: float | np.ndarray = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Match grid points to visible Gaussians of one object in frame 0.

    Candidates are Gaussians whose centre lands on an eroded covered pixel and whose depth is within
    `depth_tolerance` of the rendered depth there (the published rule, with the tolerance that
    decides visibility later, so every matched track starts visible); each point takes the nearest
    candidate centre, kept if closer than TRACK_MATCH_MAX_PX.  points and uv0 are full-frame
    pixels; depth0 and alpha0 may be rendered smaller (map_scale = their width / the frame width).
    Returns (Gaussian index per kept point, kept flags [P]).
    """
    covered = erode(alpha0 > covered_alpha, erosion)
    on_covered, inside = sample_map(covered.astype(np.float32), uv0 * map_scale)
    rendered, _ = sample_map(depth0, uv0 * map_scale)
    candidate = inside & (on_covered > 0.5) & (np.abs(z0 - rendered) < depth_tolerance) & (z0 > 0)
    index = np.nonzero(candidate)[0]
    if len(index) == 0 or len(points) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(len(points), dtype=bool)
    centres = torch.as_tensor(uv0[index], dtype=torch.float64)
    query = torch.as_tensor(points, dtype=torch.float64)
    best_d, best_i = [], []
    for start in range(0, len(query), 512):
        d = torch.cdist(query[start : start + 512], centres)
        value, arg = d.min(dim=1)
        best_d.append(value)
        best_i.append(arg)
    dist = torch.cat(best_d).numpy()
    nearest = index[torch.cat(best_i).numpy()]
    keep = dist < TRACK_MATCH_MAX_PX
    return nearest[keep], keep


@dataclass
class Tracks:
    points: np.ndarray  # [T, P, 2] float32 pixel coordinates in the full frame
    visible: np.ndarray  # [T, P] bool
    object: np.ndarray  # [P] int32 index into the object list
    gaussian: np.ndarray  # [P] int64 index of the followed Gaussian within its object
    query: np.ndarray  # [P, 2] the grid point each track started from


def draw_tracks(
    frames: np.ndarray, tracks: Tracks, spacing: float = DRAWN_TRACK_SPACING, trail: int = 3
) -> np.ndarray:
    """Tracks over the (dimmed) input frames: filled dot when visible, ring when occluded, short trail."""
    T, height, width, _ = frames.shape
    scale = min(1.0, 720.0 / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    count = tracks.points.shape[1]
    chosen = []
    if count:
        # One track per (object, cell) of a grid with the given spacing over the start points.
        cell = max(1e-6, spacing * max(width, height))
        keys = np.stack([tracks.object, *np.floor(tracks.points[0] / cell).astype(np.int64).T], axis=1)
        _, first = np.unique(keys, axis=0, return_index=True)
        chosen = np.sort(first)
    # Colour by starting height then object, so neighbouring tracks differ and objects stand apart.
    hues = np.zeros(count)
    if count:
        start_y = tracks.points[0, :, 1]
        hues = (start_y - start_y.min()) / max(np.ptp(start_y), 1e-6) * 150 + 30 * tracks.object
    colours = {}
    for p in chosen:
        hsv = np.uint8([[[int(hues[p]) % 180, 230, 255]]])
        colours[p] = tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    shift = 4  # sub-pixel drawing: coordinates in 1/16 px
    out = []
    for t in range(T):
        image = render_video.to_uint8(frames[t] * 0.5 + 0.25)
        if scale != 1.0:
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        image = np.ascontiguousarray(image)
        for p in chosen:
            colour = colours[p]
            for s in range(max(0, t - trail), t):
                a = (tracks.points[s, p] * scale - 0.5) * (1 << shift)
                b = (tracks.points[s + 1, p] * scale - 0.5) * (1 << shift)
                cv2.line(
                    image, tuple(int(v) for v in a), tuple(int(v) for v in b), colour, 1, cv2.LINE_AA, shift
                )
            centre = tuple(int(v) for v in (tracks.points[t, p] * scale - 0.5) * (1 << shift))
            filled = -1 if tracks.visible[t, p] else 1
            cv2.circle(image, centre, 2 << shift, colour, filled, cv2.LINE_AA, shift)
        out.append(image)
    return np.stack(out)


# ---- the stage ------------------------------------------------------------------------------


class Progress:
    def __init__(self, emit: EventFn, should_stop):
        self.emit = emit
        self.should_stop = should_stop
        self.start = time.perf_counter()

    def __call__(self, phase: str, step: int, total: int, phase_start: float) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobCancelled(f"composition stopped in phase '{phase}' at step {step} of {total}")
        elapsed = time.perf_counter() - phase_start
        eta = elapsed / step * (total - step) if step > 0 else 0.0
        self.emit(
            {
                "type": "progress",
                "object": None,
                "stage": "compose",
                "phase": phase,
                "step": step,
                "total": total,
                "losses": {},
                "eta_s": eta,
            }
        )


def compose_scene(
    video: VideoInput,
    motion: dict[str, dict],
    config: Config,
    device,
    out_dir: Path,
    emit: EventFn,
    should_stop: Callable[[], bool] | None = None,
    depth_provider: DepthProvider | None = None,
) -> dict:
    """Compose all objects, render, track and write the scene; returns the scene report.

    `depth_provider` defaults to `make_depth_provider(config.stage3.depth_model)`.
    """
    cfg = config.stage3
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    progress = Progress(emit, should_stop)
    device = torch.device(device)
    object_ids = list(video.object_ids)
    missing = [o for o in object_ids if o not in motion]
    if missing:
        raise ValueError(f"composition: no stage-2 result for objects {missing}")
    T, H, W = video.num_frames, video.height, video.width
    objects = [baked_tensors(o, motion[o], T, device) for o in object_ids]
    cam_full = input_camera(W, H)
    center = torch.tensor(cam_full.center, dtype=torch.float32, device=device)
    masks = np.asarray(video.masks, dtype=bool)  # [K, T, H, W], the visible masks of the original video
    # Input-view work (depth sweep, metrics, track visibility) at no more than work_long_side pixels.
    work_size = fit_long_side(W, H, cfg.work_long_side)
    cam_work = cam_full.resized(*work_size)
    to_work = np.array([work_size[0] / W, work_size[1] / H])  # full-frame pixels -> work-size pixels (x, y)

    # ---- 1. depth placement ------------------------------------------------------------------
    phase_start = time.perf_counter()
    progress("depth", 0, 1, phase_start)
    ks = [1.0] * len(objects)
    k_init = [1.0] * len(objects)
    notes: list[str] = []
    depth_preview = None
    if len(objects) == 1:
        provider_name, provider_note = "unused:single-object", "one object: it is the reference (k = 1)"
    else:
        provider = depth_provider or make_depth_provider(cfg.depth_model, device)
        provider_name, provider_note = provider.name, provider.note
        suffix = f" ({provider_note})" if provider_note else ""
        emit({"type": "log", "message": f"composition depth: {provider_name}{suffix}"})
        estimate_full = provider.estimate(video.frames[0])
        del provider  # the depth network is not needed again; free its memory before rendering
        if device.type == "cuda":
            torch.cuda.empty_cache()
        w, h = work_size
        layers = []
        for g in objects:
            out = render({k: (v[0] if v.dim() == 3 else v) for k, v in g.items()}, [cam_work], device)
            layers.append(DepthLayer(out.alpha[0, ..., 0].cpu().numpy(), out.depth[0, ..., 0].cpu().numpy()))
        small_masks = [resize_mask(masks[i, 0], w, h) for i in range(len(objects))]
        if estimate_full is None:
            ks, notes = fit_occlusion_order(layers, small_masks, cfg, object_ids)
        else:
            estimate = DepthEstimate(
                cv2.resize(estimate_full.depth, (w, h), interpolation=cv2.INTER_NEAREST),
                resize_mask(estimate_full.valid, w, h),
            )
            ks, k_init, notes = fit_depth_scales(
                layers,
                small_masks,
                estimate,
                cfg,
                erosion_size(w, h, cfg.mask_erosion),
                on_object=lambda i: progress("k_sweep", i, len(objects) - 1, phase_start),
                names=object_ids,
            )
            depth_preview = estimate  # at the work size, like the composed depth it is shown beside
        for note in notes:
            emit({"type": "log", "message": f"composition: {note}"})
    objects = [scale_about_center(g, center, k) for g, k in zip(objects, ks)]
    timings["depth_placement"] = time.perf_counter() - phase_start

    # ---- 2-4. one pass over time: metrics, renders, track visibility --------------------------
    phase_start = time.perf_counter()
    rw, rh = fit_long_side(W, H, cfg.render_long_side)
    cam_render = cam_full.resized(rw, rh)
    orbit_center, orbit_radius = orbit_center_of(objects, cam_full)
    loops = max(1, cfg.loops)
    n_fixed = T * loops
    n_orbit = cfg.orbit_frames if cfg.orbit_frames > 0 else n_fixed
    paths = {
        "orbit_horizontal": [
            orbit_camera(cam_render, orbit_center, e, a) for e, a in orbit_angles("horizontal", n_orbit)
        ],
        "orbit_elevation": [
            orbit_camera(cam_render, orbit_center, e, a) for e, a in orbit_angles("elevation", n_orbit)
        ],
    }
    clips = {name: np.zeros((n_orbit, rh, rw, 3), np.uint8) for name in paths}
    fixed_unique = np.zeros((T, rh, rw, 3), np.uint8)
    fixed_from_work = (rw, rh) == work_size
    union = masks.any(axis=0)  # [T, H, W]
    per_frame = []
    sizes = [int(g["means"].shape[1]) for g in objects]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    grid = [grid_points(masks[i, 0], cfg.track_grid) for i in range(len(objects))]
    track_parts: list[dict] = []
    visible_t = []
    composed_depth0 = None
    for t in range(T):
        progress("render", t, T, phase_start)
        g = frame_gaussians(objects, t)
        out = render(g, [cam_work], device)
        color = out.color[0].permute(2, 0, 1)
        alpha = out.alpha[0].permute(2, 0, 1)
        frame_np, union_np = video.frames[t], union[t]
        if work_size != (W, H):  # area resampling, as stages 1 and 2 compare at their working size
            frame_np = cv2.resize(frame_np, work_size, interpolation=cv2.INTER_AREA)
            union_np = cv2.resize(union_np.astype(np.float32), work_size, interpolation=cv2.INTER_AREA) > 0.5
        frame = torch.as_tensor(frame_np, device=device).permute(2, 0, 1)
        mask_t = torch.as_tensor(union_np, device=device, dtype=torch.float32)[None]
        per_frame.append(
            {
                "frame": video.frame_names[t],
                "psnr": psnr_in_mask(color, frame, mask_t),
                "iou": mask_iou(alpha, mask_t),
            }
        )
        alpha_np = out.alpha[0, ..., 0].cpu().numpy()
        depth_np = out.depth[0, ..., 0].cpu().numpy()
        if t == 0:
            composed_depth0 = (depth_np, alpha_np, union_np)
        # Track points: matched in frame 0, visibility tested against this frame's rendered depth.
        means_t = g["means"].cpu().numpy().astype(np.float64)
        uv_all, z_all = cam_full.project(means_t)
        if t == 0:
            for i in range(len(objects)):
                sl = slice(offsets[i], offsets[i + 1])
                gauss, keep = match_points(
                    grid[i],
                    uv_all[sl],
                    z_all[sl],
                    depth_np,
                    alpha_np,
                    erosion_size(*work_size, cfg.mask_erosion),
                    cfg.alpha_threshold,
                    cfg.track_depth_tolerance,
                    to_work,
                )
                track_parts.append(
                    {"object": i, "gaussian": gauss, "global": gauss + offsets[i], "query": grid[i][keep]}
                )
            followed = np.concatenate([p["global"] for p in track_parts]).astype(np.int64)
            track_uv = np.zeros((T, len(followed), 2))
        uv = uv_all[followed]
        z = z_all[followed]
        track_uv[t] = uv
        rendered_depth, inside = sample_map(depth_np, uv * to_work)
        rendered_alpha, _ = sample_map(alpha_np, uv * to_work)
        visible_t.append(
            inside & (rendered_alpha > 0.5) & (z > 0) & (z <= rendered_depth + cfg.track_depth_tolerance)
        )

        # The fixed view (unless the work render is it) and every orbit frame showing time t: one call.
        frames_here = list(range(t, n_orbit, T))
        cams = ([] if fixed_from_work else [cam_render]) + [
            paths[name][i] for name in paths for i in frames_here
        ]
        views = render_video.to_uint8(render(g, cams, device).color.cpu().numpy()) if cams else []
        if fixed_from_work:
            fixed_unique[t] = render_video.to_uint8(out.color[0].cpu().numpy())
        else:
            fixed_unique[t], views = views[0], views[1:]
        for j, name in enumerate(paths if frames_here else []):
            clips[name][frames_here] = views[j * len(frames_here) : (j + 1) * len(frames_here)]
    progress("render", T, T, phase_start)
    timings["render"] = time.perf_counter() - phase_start

    # ---- writing: videos, tracks, scene --------------------------------------------------------
    phase_start = time.perf_counter()
    progress("write", 0, 1, phase_start)
    renders_dir = out_dir / "renders"
    fixed = np.concatenate([fixed_unique] * loops)
    written = {"fixed": render_video.write_clip(renders_dir / "fixed", fixed, cfg.fps)}
    for name, frames in clips.items():
        written[name] = render_video.write_clip(renders_dir / name, frames, cfg.fps)
    previews = [str(written[name]["png"].relative_to(out_dir)) for name in written]

    tracks = Tracks(
        points=track_uv.astype(np.float32),
        visible=np.stack(visible_t).astype(bool),
        object=np.concatenate([np.full(len(p["gaussian"]), p["object"]) for p in track_parts]).astype(
            np.int32
        ),
        gaussian=np.concatenate([p["gaussian"] for p in track_parts]).astype(np.int64),
        query=np.concatenate([p["query"] for p in track_parts]).astype(np.float32).reshape(-1, 2),
    )
    tracks_dir = out_dir / "tracks"
    tracks_dir.mkdir(parents=True, exist_ok=True)
    np.savez(
        tracks_dir / "tracks.npz",
        points=tracks.points,
        visible=tracks.visible,
        object=tracks.object,
        gaussian=tracks.gaussian,
        query=tracks.query,
        object_ids=np.array(object_ids),
        frame_names=np.array(video.frame_names),
        image_size=np.array([W, H]),
    )
    overlay = draw_tracks(video.frames, tracks)
    overlay_files = render_video.write_clip(tracks_dir / "tracks_overlay", overlay, cfg.fps)
    previews.append(str(overlay_files["png"].relative_to(out_dir)))
    if depth_preview is not None and composed_depth0 is not None:
        path = write_depth_preview(renders_dir / "depth_frame0.png", depth_preview, *composed_depth0)
        previews.append(str(path.relative_to(out_dir)))

    arrays = {}
    for object_id, g in zip(object_ids, objects):
        arrays[object_id] = {
            "means": g["means"].cpu().numpy(),
            "quats": g["quats"].cpu().numpy(),
            "scales": g["scales"].cpu().numpy(),
            "opacities": g["opacities"].cpu().numpy(),
            "colors": g["colors"].clamp(0.0, 1.0).cpu().numpy(),
        }
    meta = {
        "fps": float(cfg.fps),
        "image_size": [W, H],
        "frame_names": list(video.frame_names),
        "camera": {"K": cam_full.K.tolist(), "viewmat": cam_full.viewmat.tolist()},
        "orbit_center": [float(v) for v in orbit_center],
        "renders": {
            name: str(files.get("mp4", files["gif"]).relative_to(out_dir)) for name, files in written.items()
        },
        "tracks": str((tracks_dir / "tracks.npz").relative_to(out_dir)),
        "composition": {
            "depth_provider": provider_name,
            "k": dict(zip(object_ids, ks)),
            "orbit_radius": orbit_radius,
        },
    }
    write_scene(out_dir, meta, arrays)
    if cfg.write_ply_sequence:
        for object_id, a in arrays.items():
            for t, name in enumerate(video.frame_names):
                ply.write_ply(
                    out_dir / "objects" / f"{object_id}_ply" / f"{name}.ply",
                    a["means"][t], a["quats"][t], a["scales"][t], a["opacities"], a["colors"],
                )  # fmt: skip
    timings["write"] = time.perf_counter() - phase_start

    psnr = float(np.mean([p["psnr"] for p in per_frame]))
    iou = float(np.mean([p["iou"] for p in per_frame]))
    return {
        "psnr": psnr,
        "iou": iou,
        "per_frame": per_frame,
        "depth_provider": provider_name,
        "depth_note": provider_note,
        "k": dict(zip(object_ids, ks)),
        "k_init": dict(zip(object_ids, k_init)),
        "notes": notes,
        "orbit_center": [float(v) for v in orbit_center],
        "tracks": {
            "count": int(tracks.points.shape[1]),
            "visible_fraction": float(tracks.visible.mean()) if tracks.visible.size else 0.0,
        },
        "work_size": list(work_size),
        "timings": timings,
        "seconds": time.perf_counter() - t_start,
        "previews": previews,
        "summary": {"psnr": psnr, "iou": iou},
    }


def write_depth_preview(
    path: Path, estimate: DepthEstimate, rendered: np.ndarray, alpha: np.ndarray, mask: np.ndarray
) -> Path:
    """Estimated depth | rendered composed depth, each normalised by its own 2-98 % range inside the
    union mask (same colour map: near = bright), for judging the placement by eye."""

    def colourise(depth: np.ndarray, region: np.ndarray) -> np.ndarray:
        values = depth[region]
        lo, hi = np.quantile(values, [0.02, 0.98]) if values.size else (0.0, 1.0)
        norm = 1.0 - np.clip((depth - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        image = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
        image[~region] = 40  # outside the compared region: flat dark grey
        return image

    left = colourise(estimate.depth, mask & estimate.valid)
    right = colourise(rendered, alpha > 0.5)
    return render_video.write_png(path, np.concatenate([left, right], axis=1))
