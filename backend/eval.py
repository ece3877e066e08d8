"""`python -m backend eval`: scores a reconstructed scene against its input and, when known, its truth.

    python -m backend eval --scene OUT --gt DATA/gt           synthetic scene with ground truth
    python -m backend eval --scene OUT --data ROOT --video V  any input in the reference layout

Writes `metrics.json` with exactly
    {"input_view": {"psnr", "ssim", "iou"}, "novel_view": {"psnr", "ssim"},
     "tracks": {"epe_visible", "epe_occluded"}, "seconds": {...}}
(values are null where there is nothing to compare against), `metrics_detail.json` with the
breakdowns, and `contact_sheet.png` (input / reconstruction / ground-truth novel views).

Definitions (the method reconstructs objects, not the backdrop, so every image comparison is on a
white background, which is also what the method trains against):
- input view: the reconstruction rendered at the scene's input camera over white, against the
  input frame composited on white with the union of the object masks; PSNR and SSIM over the
  whole frame, averaged over frames.  IoU: per object, the pixels where that object's share of
  the rendered opacity exceeds 0.5 against its mask, averaged over objects and frames.
- novel views: the 4 views of METHOD.md built by backend/synthetic/views.py from each side's own
  input camera and object centres (around the whole scene and around each object alone), on
  `--novel-frames` evenly spaced frames (default 4, 0 = every frame: each frame costs 12 renders);
  PSNR and SSIM averaged over all of those images.
- tracks: each ground-truth query point (frame 0) takes the reconstruction's track of the same
  object that starts nearest to it (the scene's tracks file, or else the front-most Gaussian
  under it), shifted to start at the query; end-point error in input pixels over frames >= 1,
  split by the ground truth's visibility (occluded = hidden by another object, by itself, or out
  of the frame), as in the paper's Kubric measure.
- PSNR of identical images is infinite; averages clip each image at PSNR_CAP_DB so one perfect
  frame cannot make the mean infinite.  SSIM: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
  data range 1, valid region only, channel mean.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from backend.errors import InputError
from backend.synthetic.views import (
    EVAL_VIEWS,
    object_view_intrinsics,
    object_view_matrices,
    scene_view_matrices,
)

PSNR_CAP_DB = 100.0
MASK_THRESHOLD = 0.5
DEFAULT_NOVEL_FRAMES = 4
TRACK_MIN_OPACITY = 0.1
METRICS_FILE = "metrics.json"
DETAIL_FILE = "metrics_detail.json"
CONTACT_SHEET = "contact_sheet.png"


# ---- metrics ------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, data_range]; inf when identical."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: np.ndarray, b: np.ndarray, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> float:
    """Structural similarity (Wang et al. 2004) of two [H, W] or [H, W, C] images; channel mean."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[0], a.shape[1]) < window:
        raise ValueError(f"ssim: images of {tuple(a.shape[:2])} are smaller than the {window}-pixel window")
    x = a.permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    y = b.permute(2, 0, 1)[:, None]
    g = _gaussian_window(window, sigma)

    def blur(img: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region
        img = F.conv2d(img, g.view(1, 1, 1, -1))
        return F.conv2d(img, g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1 when both are empty."""
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    union = np.logical_or(pred, target).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, target).sum() / union)


def end_point_errors(pred: np.ndarray, target: np.ndarray, visible: np.ndarray, from_frame: int = 1) -> dict:
    """Mean end-point error (pixels) of tracks [T, P, 2] split by visibility [T, P]; None when a set is empty."""
    err = np.linalg.norm(np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64), axis=-1)
    err, vis = err[from_frame:], np.asarray(visible, dtype=bool)[from_frame:]
    return {
        "epe_visible": float(err[vis].mean()) if vis.any() else None,
        "epe_occluded": float(err[~vis].mean()) if (~vis).any() else None,
        "num_visible": int(vis.sum()),
        "num_occluded": int((~vis).sum()),
    }


def _mean_psnr(values: list[float]) -> float | None:
    return float(np.mean([min(v, PSNR_CAP_DB) for v in values])) if values else None


# ---- inputs -------------------------------------------------------------------------------------
def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _load_rgba_on_white(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(path) as image:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + (1.0 - alpha), alpha[..., 0]


def _load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0 >= MASK_THRESHOLD


def _find_frame(folder: Path, name: str) -> Path:
    for ext in (".png", ".jpg", ".jpeg"):
        if (folder / f"{name}{ext}").is_file():
            return folder / f"{name}{ext}"
    raise InputError(f"{folder}: no frame named {name}.png or {name}.jpg (the scene lists frame {name})")


class EvalInputs:
    """Frames, masks and (optionally) ground truth for one evaluation."""

    def __init__(self, frames_dir: Path, masks_dir: Path, gt_dir: Path | None, gt: dict | None):
        self.frames_dir, self.masks_dir, self.gt_dir, self.gt = frames_dir, masks_dir, gt_dir, gt

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalInputs:
        if args.gt is not None:
            gt_file = Path(args.gt) / "gt.json"
            if not gt_file.is_file():
                raise InputError(
                    f"--gt {args.gt}: no gt.json there; pass the gt/ folder `python -m backend.synthetic` wrote"
                )
            gt = json.loads(gt_file.read_text())
            gt_dir = Path(args.gt)
            return cls(gt_dir / gt["files"]["frames"], gt_dir / gt["files"]["masks"], gt_dir, gt)
        if args.data is None or args.video is None:
            raise InputError("eval needs --gt DIR, or --data ROOT with --video NAME")
        root = Path(args.data)
        frames_dir, masks_dir = root / "JPEGImages" / args.video, root / "Annotations" / args.video
        if not frames_dir.is_dir():
            raise InputError(f"--data {root} --video {args.video}: {frames_dir} does not exist")
        return cls(frames_dir, masks_dir, None, None)


# ---- rendering ----------------------------------------------------------------------------------
class SceneRenderer:
    """The reconstruction's Gaussians, rendered with backend.raster at any camera and frame."""

    def __init__(self, scene, device: str = "cpu"):
        from backend.raster import rasterize

        self._rasterize = rasterize
        self.scene = scene
        self.device = torch.device(device)
        self.object_ids = list(scene.objects)

    def arrays(self, t: int, object_ids: list[str] | None = None):
        ids = self.object_ids if object_ids is None else object_ids
        parts = [self.scene.objects[i] for i in ids]

        def as_t(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.as_tensor(np.concatenate(arrays, 0), dtype=torch.float32, device=self.device)

        means = as_t([np.asarray(p["means"][t]) for p in parts])
        quats = as_t([np.asarray(p["quats"][t]) for p in parts])
        scales = as_t([np.asarray(p["scales"][t]) for p in parts])
        opacities = as_t([np.asarray(p["opacities"]) for p in parts])
        colors = as_t([np.asarray(p["colors"]) for p in parts])
        counts = [len(p["opacities"]) for p in parts]
        return means, quats, scales, opacities, colors, counts

    @torch.no_grad()
    def render(self, t, viewmats, Ks, width, height, object_ids=None, with_ids=False):
        """-> (rgb over white [C,H,W,3], alpha [C,H,W], per-object opacity share [C,H,W,k] or None)."""
        means, quats, scales, opacities, colors, counts = self.arrays(t, object_ids)
        if with_ids:
            onehot = torch.zeros(len(opacities), len(counts), device=self.device)
            start = 0
            for k, n in enumerate(counts):
                onehot[start : start + n, k] = 1.0
                start += n
            colors = torch.cat([colors, onehot], dim=1)
        background = torch.zeros(colors.shape[1], device=self.device)
        background[:3] = 1.0
        out = self._rasterize(
            means,
            quats,
            scales,
            opacities,
            colors,
            torch.as_tensor(np.asarray(viewmats), dtype=torch.float32, device=self.device),
            torch.as_tensor(np.asarray(Ks), dtype=torch.float32, device=self.device),
            width,
            height,
            background=background,
        )
        color = out.color.clamp(0, 1).cpu().numpy()
        alpha = out.alpha[..., 0].cpu().numpy()
        return color[..., :3], alpha, (color[..., 3:] if with_ids else None)

    def centers(self, t: int) -> np.ndarray:
        """Opacity-weighted mean position of each object's Gaussians at frame t -> [k, 3]."""
        out = []
        for object_id in self.object_ids:
            arrays = self.scene.objects[object_id]
            w = np.asarray(arrays["opacities"], dtype=np.float64)
            out.append((np.asarray(arrays["means"][t], dtype=np.float64) * w[:, None]).sum(0) / w.sum())
        return np.stack(out)


def _scaled_K(K: np.ndarray, from_size, to_size) -> np.ndarray:
    K = np.array(K, dtype=np.float64)
    K[0] *= to_size[0] / from_size[0]
    K[1] *= to_size[1] / from_size[1]
    return K


# ---- tracks -------------------------------------------------------------------------------------
def _project(points: np.ndarray, viewmat: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = cam @ K.T
    return uv[..., :2] / uv[..., 2:3], cam[..., 2]


def tracks_from_gaussians(
    renderer: SceneRenderer, viewmat, K, queries: np.ndarray, query_objects: np.ndarray
):
    """Per query (frame-0 pixel, object): the front-most Gaussian projecting within reach -> its track [T, P, 2]."""
    T = renderer.scene.num_frames
    pred = np.zeros((T, len(queries), 2))
    for object_id in np.unique(query_objects):
        sel = np.nonzero(query_objects == object_id)[0]
        if object_id not in renderer.scene.objects:
            raise InputError(
                f"ground truth has tracks on object {object_id}, which the scene does not contain"
            )
        arrays = renderer.scene.objects[object_id]
        keep = np.asarray(arrays["opacities"]) >= TRACK_MIN_OPACITY
        means = np.asarray(arrays["means"], dtype=np.float64)[:, keep]  # [T, N, 3]
        uv0, z0 = _project(means[0], viewmat, K)
        d = np.linalg.norm(uv0[None] - queries[sel, None], axis=-1)  # [Q, N]
        nearest = d.min(axis=1, keepdims=True)
        # Among Gaussians within a pixel of the nearest one, the closest to the camera is the surface.
        reach = d <= nearest + 1.0
        choice = np.argmin(np.where(reach, z0[None], np.inf), axis=1)
        for t in range(T):
            pred[t, sel], _ = _project(means[t, choice], viewmat, K)
    return pred


def match_tracks(recon_points, recon_objects, queries, query_objects, recon_visible=None) -> np.ndarray:
    """Each query takes the reconstructed track of its object starting nearest to it -> indices [P]."""
    recon_points = np.asarray(recon_points, dtype=np.float64)
    index = np.zeros(len(queries), dtype=np.int64)
    for object_id in np.unique(query_objects):
        sel = np.nonzero(query_objects == object_id)[0]
        candidates = np.nonzero(np.asarray(recon_objects) == object_id)[0]
        if recon_visible is not None:
            visible = candidates[np.asarray(recon_visible)[0, candidates]]
            candidates = visible if len(visible) else candidates
        if len(candidates) == 0:
            raise InputError(f"the scene's tracks file has no track on object {object_id}")
        d = np.linalg.norm(recon_points[0, candidates][None] - queries[sel, None], axis=-1)
        index[sel] = candidates[np.argmin(d, axis=1)]
    return index


def track_object_ids(data) -> np.ndarray:
    """Object id per track: the pipeline stores an index into `object_ids`; plain ids also work."""
    objects = np.asarray(data["object"])
    if "object_ids" in data and np.issubdtype(objects.dtype, np.integer):
        return np.asarray(data["object_ids"]).astype(str)[objects]
    return objects.astype(str)


def evaluate_tracks(renderer: SceneRenderer, gt_tracks: dict, viewmat, K, recon_size, gt_size) -> dict:
    gt_points = np.asarray(gt_tracks["points"], dtype=np.float64)
    gt_visible = np.asarray(gt_tracks["visible"], dtype=bool)
    gt_objects = np.asarray(gt_tracks["object"]).astype(str)
    queries = gt_points[0]
    tracks_rel = renderer.scene.meta.get("tracks")
    tracks_file = renderer.scene.path / tracks_rel if tracks_rel else None
    if tracks_file is not None and tracks_file.is_file():
        data = np.load(tracks_file)
        scale = np.array([gt_size[0] / recon_size[0], gt_size[1] / recon_size[1]])
        recon = np.asarray(data["points"], dtype=np.float64) * scale
        recon_visible = np.asarray(data["visible"], dtype=bool) if "visible" in data else None
        index = match_tracks(recon, track_object_ids(data), queries, gt_objects, recon_visible)
        pred = recon[:, index]
        source = str(tracks_rel)
    else:
        pred = tracks_from_gaussians(renderer, viewmat, K, queries, gt_objects)
        source = "gaussians"
    T = min(len(pred), len(gt_points))
    pred, gt_points, gt_visible = pred[:T], gt_points[:T], gt_visible[:T]
    offset = pred[0] - gt_points[0]
    result = end_point_errors(pred - offset[None], gt_points, gt_visible)
    result["source"] = source
    result["start_offset_px"] = float(np.linalg.norm(offset, axis=-1).mean())
    return result


# ---- contact sheet --------------------------------------------------------------------------------
def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)


def contact_sheet(rows: list[list[tuple[str, np.ndarray]]], path: Path, title: str) -> None:
    """Rows of (label, image in [0,1]) tiles, each row scaled to a common tile height, labelled."""
    tile_h, pad, label_h = 192, 6, 16
    rendered_rows = []
    for row in rows:
        tiles = []
        for label, img in row:
            image = Image.fromarray(_to_u8(img))
            w = max(1, round(image.width * tile_h / image.height))
            image = image.resize((w, tile_h), Image.BILINEAR)
            canvas = Image.new("RGB", (w, tile_h + label_h), (255, 255, 255))
            canvas.paste(image, (0, label_h))
            ImageDraw.Draw(canvas).text((3, 2), label, fill=(0, 0, 0))
            tiles.append(canvas)
        rendered_rows.append(tiles)
    width = max(sum(t.width for t in tiles) + pad * (len(tiles) + 1) for tiles in rendered_rows)
    height = 20 + sum(tile_h + label_h + pad for _ in rendered_rows) + pad
    sheet = Image.new("RGB", (width, height), (235, 235, 235))
    ImageDraw.Draw(sheet).text((pad, 4), title, fill=(0, 0, 0))
    y = 20 + pad
    for tiles in rendered_rows:
        x = pad
        for tile in tiles:
            sheet.paste(tile, (x, y))
            x += tile.width + pad
        y += tile_h + label_h + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


# ---- timing -------------------------------------------------------------------------------------
def timing_summary(scene_dir: Path) -> dict:
    """Seconds per stage from the run's report.json (in the scene folder or its parent)."""
    for candidate in (scene_dir / "report.json", scene_dir.parent / "report.json"):
        if candidate.is_file():
            report = json.loads(candidate.read_text())
            break
    else:
        return {"total": None, "note": "no report.json next to the scene"}
    objects = {}
    for object_id, stages in (report.get("objects") or {}).items():
        objects[object_id] = {
            stage: (values or {}).get("seconds")
            for stage, values in stages.items()
            if isinstance(values, dict)
        }
    return {
        "total": report.get("seconds"),
        "objects": objects,
        "compose": (report.get("scene") or {}).get("seconds"),
        "device": report.get("device"),
    }


# ---- main ---------------------------------------------------------------------------------------
def select_novel_frames(num_frames: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices including the first and last (all frames when count <= 0)."""
    if count <= 0 or count >= num_frames:
        return list(range(num_frames))
    return sorted({int(round(v)) for v in np.linspace(0, num_frames - 1, count)})


def evaluate(args: argparse.Namespace) -> dict:
    from shared.scene import SceneFormatError, read_scene

    started = time.perf_counter()
    try:
        scene = read_scene(args.scene)
    except SceneFormatError as error:
        raise InputError(f"--scene {args.scene}: {error}") from None
    inputs = EvalInputs.from_args(args)
    renderer = SceneRenderer(scene, device=args.device)
    recon_w, recon_h = scene.image_size
    T = scene.num_frames
    frame_names = scene.meta.get("frame_names") or (inputs.gt or {}).get("frame_names")
    if not frame_names:
        frame_names = sorted(
            p.stem for p in inputs.frames_dir.iterdir() if p.suffix.lower() in (".png", ".jpg")
        )[:T]
    if len(frame_names) != T:
        raise InputError(f"{args.scene}: scene has {T} frames but lists {len(frame_names)} frame names")
    first = _load_rgb(_find_frame(inputs.frames_dir, frame_names[0]))
    H, W = first.shape[:2]
    viewmat = scene.viewmat
    K = _scaled_K(scene.K, (recon_w, recon_h), (W, H))
    for object_id in renderer.object_ids:
        if not (inputs.masks_dir / object_id).is_dir():
            raise InputError(
                f"scene object {object_id} has no mask folder {inputs.masks_dir / object_id}; "
                "object ids must match the Annotations sub-folders"
            )
    detail: dict = {"frames": {}, "novel": {}}
    sheet_t = T // 2

    # Input view.
    psnrs, ssims, ious = [], [], []
    sheet: dict = {}
    for t, name in enumerate(frame_names):
        frame = _load_rgb(_find_frame(inputs.frames_dir, name))
        masks = [_load_mask(inputs.masks_dir / oid / f"{name}.png") for oid in renderer.object_ids]
        union = np.logical_or.reduce(masks)[..., None]
        target = np.where(union, frame, 1.0)
        rgb, _, share = renderer.render(t, viewmat[None], K[None], W, H, with_ids=True)
        rgb, share = rgb[0], share[0]
        p, s = psnr(rgb, target), ssim(rgb, target)
        frame_ious = [mask_iou(share[..., k] > MASK_THRESHOLD, m) for k, m in enumerate(masks)]
        psnrs.append(p)
        ssims.append(s)
        ious.extend(frame_ious)
        detail["frames"][name] = {
            "psnr": min(p, PSNR_CAP_DB),
            "ssim": s,
            "iou": dict(zip(renderer.object_ids, frame_ious)),
        }
        if t == sheet_t:
            sheet["input"], sheet["target"], sheet["recon"] = frame, target, rgb
    metrics = {
        "input_view": {"psnr": _mean_psnr(psnrs), "ssim": float(np.mean(ssims)), "iou": float(np.mean(ious))},
        "novel_view": {"psnr": None, "ssim": None},
        "tracks": {"epe_visible": None, "epe_occluded": None},
    }

    # Novel views: always rendered for the sheet; scored when there is ground truth.
    gt = inputs.gt
    # Without ground truth the novel views only feed the contact sheet: one frame is enough.
    novel_frames = select_novel_frames(T, args.novel_frames) if gt is not None else []
    if sheet_t not in novel_frames:
        novel_frames.append(sheet_t)
    detail["novel_frames"] = [frame_names[t] for t in sorted(novel_frames)]
    scene_views = scene_view_matrices(viewmat, renderer.centers(0))
    names = [n for n, _, _ in EVAL_VIEWS]
    K_obj, w_obj, h_obj = object_view_intrinsics(K, H)
    novel_psnr, novel_ssim = [], []
    sheet_novel: dict = {}
    per_object_centers = np.stack([renderer.centers(t) for t in range(T)], axis=1)  # [k, T, 3]
    for t in novel_frames:
        groups = [("scene", None, np.stack([scene_views[n] for n in names]), K, W, H)]
        for k, oid in enumerate(renderer.object_ids):
            views = object_view_matrices(viewmat, per_object_centers[k, t : t + 1])
            groups.append((oid, [oid], np.stack([views[n][0] for n in names]), K_obj, w_obj, h_obj))
        for group, ids, viewmats, Kv, w, h in groups:
            rgb, _, _ = renderer.render(t, viewmats, np.stack([Kv] * len(names)), w, h, object_ids=ids)
            for v, view_name in enumerate(names):
                if t == sheet_t:
                    sheet_novel[(group, view_name, "recon")] = rgb[v]
                if gt is None:
                    continue
                folder = (
                    gt["views"]["scene"]["folder"]
                    if group == "scene"
                    else gt["views"]["objects"][group]["folder"]
                )
                gt_path = inputs.gt_dir / folder / view_name / f"{frame_names[t]}.png"
                target, _ = _load_rgba_on_white(gt_path)
                if target.shape != rgb[v].shape:
                    raise InputError(
                        f"{gt_path}: size {target.shape[1]}x{target.shape[0]} differs from the eval view {w}x{h}"
                    )
                p, s = psnr(rgb[v], target), ssim(rgb[v], target)
                novel_psnr.append(p)
                novel_ssim.append(s)
                detail["novel"].setdefault(group, {}).setdefault(view_name, []).append(
                    {"frame": frame_names[t], "psnr": min(p, PSNR_CAP_DB), "ssim": s}
                )
                if t == sheet_t:
                    sheet_novel[(group, view_name, "gt")] = target
    if gt is not None:
        metrics["novel_view"] = {"psnr": _mean_psnr(novel_psnr), "ssim": float(np.mean(novel_ssim))}
        tracks = np.load(inputs.gt_dir / gt["files"]["tracks"])
        track_result = evaluate_tracks(renderer, tracks, viewmat, K, (recon_w, recon_h), (W, H))
        metrics["tracks"] = {
            "epe_visible": track_result["epe_visible"],
            "epe_occluded": track_result["epe_occluded"],
        }
        detail["tracks"] = track_result
    seconds = timing_summary(Path(args.scene))
    seconds["eval"] = time.perf_counter() - started
    metrics["seconds"] = seconds

    # Contact sheet: input row, then per group a reconstruction row and (if known) a truth row.
    rows = [
        [
            (f"input frame {frame_names[sheet_t]}", sheet["input"]),
            ("input, masked on white", sheet["target"]),
            ("reconstruction, input view", sheet["recon"]),
        ]
    ]
    for group in ["scene", *renderer.object_ids]:
        rows.append([(f"{group} {n} reconstruction", sheet_novel[(group, n, "recon")]) for n in names])
        if gt is not None:
            rows.append([(f"{group} {n} ground truth", sheet_novel[(group, n, "gt")]) for n in names])
    fmt = lambda v, unit="": "n/a" if v is None else f"{v:.3g}{unit}"  # noqa: E731
    title = (
        f"input PSNR {fmt(metrics['input_view']['psnr'], ' dB')}  SSIM {fmt(metrics['input_view']['ssim'])}  "
        f"IoU {fmt(metrics['input_view']['iou'])}   novel PSNR {fmt(metrics['novel_view']['psnr'], ' dB')}  "
        f"SSIM {fmt(metrics['novel_view']['ssim'])}   track EPE vis {fmt(metrics['tracks']['epe_visible'], ' px')}  "
        f"occ {fmt(metrics['tracks']['epe_occluded'], ' px')}"
    )
    out_dir = Path(args.out) if args.out is not None else Path(args.scene)
    contact_sheet(rows, out_dir / CONTACT_SHEET, title)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out_dir / DETAIL_FILE).write_text(json.dumps(detail, indent=1))
    return metrics


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scene", type=Path, required=True, help="reconstructed scene folder (holds scene.json)")
    p.add_argument(
        "--gt", type=Path, help="ground-truth folder written by `python -m backend.synthetic` (OUT/gt)"
    )
    p.add_argument(
        "--data", type=Path, help="without ground truth: root holding JPEGImages/<video>, Annotations/<video>"
    )
    p.add_argument("--video", help="video name inside --data")
    p.add_argument(
        "--out", type=Path, help="where metrics.json and contact_sheet.png go (default: the scene folder)"
    )
    p.add_argument("--device", default="cpu", help="torch device for rendering (cpu or cuda)")
    p.add_argument(
        "--novel-frames",
        type=int,
        default=DEFAULT_NOVEL_FRAMES,
        help=f"score novel views on this many evenly spaced frames, 0 = all (default {DEFAULT_NOVEL_FRAMES}: "
        "each frame costs 12 renders, slow with the CPU rasterizer)",
    )


def eval_main(args: argparse.Namespace) -> int:
    try:
        metrics = evaluate(args)
    except InputError as error:
        print(f"error: {error}")
        return 2
    out_dir = Path(args.out) if args.out is not None else Path(args.scene)
    print(json.dumps({k: v for k, v in metrics.items() if k != "seconds"}, indent=2))
    print(f"wrote {out_dir / METRICS_FILE} and {out_dir / CONTACT_SHEET}")
    return 0
