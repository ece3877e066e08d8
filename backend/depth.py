"""Monocular depth for composing objects (METHOD.md, stage 3), behind one small interface.

    provider = make_depth_provider("auto" | "none" | <local folder> | <hub id>, device)
    estimate = provider.estimate(image)   # image float [H, W, 3] in [0, 1]
    estimate.depth [H, W] float32, estimate.valid [H, W] bool   (or None: no estimate available)

`TransformersDepth` runs a transformers depth-estimation model (Depth-Anything in the published
code) loaded with `local_files_only=True`: weights are never fetched here.  Relative models
predict disparity; it is normalised by its maximum, median-filtered over (H/64, W/64) pixels,
inverted to depth and marked invalid where the disparity is <= 0.01 (sky, far background).
Metric models (`depth_estimation_type == "metric"`) predict depth directly.

`PlacementFallback` is the weight-free fallback: it gives no estimate, and composition then keeps
the stage-1/2 placement (every object at the depth its crop implies, k = 1) except where the
visible masks show one object occluding another in a way the placement contradicts; then the
non-reference object moves the least distance along its rays that puts the occluder in front
(`backend.stage3.fit_occlusion_order`).  Its name, "fallback:occlusion-order", is what the scene
report shows, so a run without a depth model says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from backend.errors import InputError

# The published code uses Depth-Anything small; "auto" looks for either release in the local cache.
AUTO_CANDIDATES = ("LiheYoung/depth-anything-small-hf", "depth-anything/Depth-Anything-V2-Small-hf")
MIN_DISPARITY = 0.01
FALLBACK_NAME = "fallback:occlusion-order"


@dataclass
class DepthEstimate:
    depth: np.ndarray  # [H, W] float32, larger = farther; arbitrary scale
    valid: np.ndarray  # [H, W] bool


class DepthProvider:
    """Interface: `name` (shown in the report) and `estimate(image) -> DepthEstimate | None`."""

    name: str = "abstract"
    note: str = ""

    def estimate(self, image: np.ndarray) -> DepthEstimate | None:
        raise NotImplementedError


class PlacementFallback(DepthProvider):
    """No depth model: no estimate; objects keep their stage-1/2 depths but for mask occlusions."""

    name = FALLBACK_NAME

    def __init__(self, reason: str):
        self.note = reason

    def estimate(self, image: np.ndarray) -> DepthEstimate | None:
        return None


def disparity_to_depth(disparity: np.ndarray) -> DepthEstimate:
    """Relative disparity [H, W] -> depth with validity, as the published composition does.

    The median filter removes speckle before the inversion amplifies it; normalising by the
    (filtered) maximum then makes the 0.01 threshold relative: 1 % of the nearest disparity.
    """
    disparity = np.asarray(disparity, dtype=np.float32)
    height, width = disparity.shape
    size = (max(1, height // 64), max(1, width // 64))
    if size != (1, 1):
        disparity = ndimage.median_filter(disparity, size=size)
    peak = float(disparity.max()) if disparity.size else 0.0
    if peak > 0:
        disparity = disparity / peak
    valid = disparity > MIN_DISPARITY
    depth = 1.0 / np.maximum(disparity, MIN_DISPARITY)
    return DepthEstimate(depth.astype(np.float32), valid)


class TransformersDepth(DepthProvider):
    """A transformers depth-estimation model from a local folder or the local hub cache."""

    def __init__(self, source: str, device: torch.device | str = "cpu", cache_dir: str | Path | None = None):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.name = str(source)
        self.device = torch.device(device)
        where = {"local_files_only": True, "cache_dir": str(cache_dir) if cache_dir is not None else None}
        try:
            self.processor = AutoImageProcessor.from_pretrained(source, **where)
            self.model = AutoModelForDepthEstimation.from_pretrained(source, **where)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"depth model '{source}' not found: looked for a local folder of that name and in the Hugging Face "
                f"cache ({cache_dir or _hf_cache_dir()}), without network access. Download it once (e.g. "
                f"`huggingface-cli download {AUTO_CANDIDATES[0]}`), pass a local folder with "
                f"stage3.depth_model=PATH, or use stage3.depth_model=none to keep the stage-1/2 placement "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self.model.eval().to(self.device)
        self.metric = getattr(self.model.config, "depth_estimation_type", "relative") == "metric"

    @torch.no_grad()
    def estimate(self, image: np.ndarray) -> DepthEstimate:
        image = np.asarray(image, dtype=np.float32)
        height, width = image.shape[:2]
        pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        inputs = self.processor(images=pixels, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        predicted = self.model(**inputs).predicted_depth  # [1, h, w]
        predicted = F.interpolate(
            predicted[:, None].float(), (height, width), mode="bilinear", align_corners=False
        )
        prediction = predicted[0, 0].cpu().numpy()
        if self.metric:
            valid = np.isfinite(prediction) & (prediction > 0)
            return DepthEstimate(np.where(valid, prediction, 0.0).astype(np.float32), valid)
        return disparity_to_depth(prediction)


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return "~/.cache/huggingface/hub"


def _in_local_cache(repo_id: str, cache_dir: str | Path | None = None) -> bool:
    """True when the hub cache holds a config for `repo_id` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return isinstance(found, str)


def make_depth_provider(
    name: str, device: torch.device | str = "cpu", cache_dir: str | Path | None = None
) -> DepthProvider:
    """The provider a config names.

    "auto": Depth-Anything small from the local cache, else the fallback; "none": the fallback;
    anything else: a local folder or hub id that must load (an InputError says where it looked).
    `cache_dir`: the Hugging Face hub cache to look in (default: the standard one).
    """
    name = (name or "auto").strip()
    if name == "none":
        return PlacementFallback("stage3.depth_model is 'none'")
    if name == "auto":
        for candidate in AUTO_CANDIDATES:
            if _in_local_cache(candidate, cache_dir):
                return TransformersDepth(candidate, device, cache_dir)
        return PlacementFallback(
            f"no depth model in the local Hugging Face cache ({cache_dir or _hf_cache_dir()}; looked for "
            f"{', '.join(AUTO_CANDIDATES)}); objects keep their stage-1/2 depths unless the masks show "
            "them occluding each other the other way round"
        )
    if Path(name).expanduser().exists():
        return TransformersDepth(str(Path(name).expanduser()), device)
    return TransformersDepth(name, device, cache_dir)


def validate_depth_model(name: str, cache_dir: str | Path | None = None) -> None:
    """Fail early (before any optimisation) when a named depth model cannot be found locally.

    "auto" and "none" always pass (auto falls back); a folder needs its config.json; a hub id must be
    in the local cache.  Nothing is loaded and nothing is fetched.
    """
    name = (name or "auto").strip()
    if name in ("auto", "none"):
        return
    folder = Path(name).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise InputError(
                f"depth model folder {folder} has no config.json; point stage3.depth_model at a saved "
                "transformers depth-estimation model (config.json, weights, preprocessor_config.json)"
            )
        return
    if not _in_local_cache(name, cache_dir):
        raise InputError(
            f"depth model '{name}' not found: it is not a local folder and not in the Hugging Face cache "
            f"({cache_dir or _hf_cache_dir()}); download it once, pass a local folder with "
            "stage3.depth_model=PATH, or use stage3.depth_model=auto|none"
        )
