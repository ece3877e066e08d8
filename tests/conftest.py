"""Shared pytest fixtures.

`tiny_video` -- factory that writes a small synthetic video in the reference layout to tmp_path
and returns a `TinyVideo` with the paths and the ground truth::

    def test_something(tiny_video):
        video = tiny_video()                       # 5 frames, 96x64 (W x H), 2 objects
        data = load_reference_layout(video.root, video.name)
        assert data.masks.shape == (2, 5, 64, 96)

  Objects: "001" a red disc (radius 10 px) moving right, "002" a blue square (side 14 px) moving
  down and left; they never overlap.  The background is a smooth grey-green ramp (not white, so
  compositing on white is visible).  Files::

      <root>/JPEGImages/<name>/NNNNN.png
      <root>/Annotations/<name>/<obj>/NNNNN.png          (mode L, 0/255)
      <root>/InpaintedImages/<name>/<obj>/NNNNN.png      (with inpainted=True: the frame with the
      <root>/InpaintedMasks/<name>/<obj>/NNNNN.png        other object painted over; mask = own mask)

  Options (all keyword): num_frames=5, width=96, height=64, first_number=54, step=1 (frame
  numbers first_number + i * step), name="tiny", ext="png" ("jpg" writes JPEG frames; masks
  stay PNG), inpainted=False, indexed_masks=False (also write DAVIS-style palette masks, one
  PNG per frame with index 1 = disc, 2 = square, to `<root>/IndexedAnnotations/<name>/`), and
  root (default tmp_path / name; call the factory twice with different names for two videos).

  Ground truth on the returned object: frames float32 [T, H, W, 3] in [0, 1] exactly as written
  (PNG is lossless), masks bool [K, T, H, W], centres float [K, T, 2] (x, y) in continuous pixel
  coordinates (pixel centres at i + 0.5), sizes [K] (disc diameter, square side) in pixels.

`davis_root` -- Path of the real DAVIS clips (../shared/data/davis next to the repo); skips the
test when they are absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DAVIS_ROOT = REPO_ROOT.parent / "shared" / "data" / "davis"

DISC_COLOUR = (0.9, 0.1, 0.1)
SQUARE_COLOUR = (0.1, 0.2, 0.9)


@dataclass
class TinyVideo:
    root: Path
    name: str
    frame_names: list[str]
    object_ids: list[str]
    width: int
    height: int
    frames: np.ndarray  # float32 [T, H, W, 3]
    masks: np.ndarray  # bool [K, T, H, W]
    centres: np.ndarray  # float64 [K, T, 2] (x, y)
    sizes: np.ndarray  # float64 [K]: disc diameter, square side

    @property
    def frames_dir(self) -> Path:
        return self.root / "JPEGImages" / self.name

    @property
    def masks_dir(self) -> Path:
        return self.root / "Annotations" / self.name

    @property
    def inpainted_dir(self) -> Path:
        return self.root / "InpaintedImages" / self.name

    @property
    def inpainted_masks_dir(self) -> Path:
        return self.root / "InpaintedMasks" / self.name

    @property
    def indexed_masks_dir(self) -> Path:
        return self.root / "IndexedAnnotations" / self.name

    def frame_path(self, t: int) -> Path:
        return next(self.frames_dir.glob(f"{self.frame_names[t]}.*"))

    def mask_path(self, k: int, t: int) -> Path:
        return self.masks_dir / self.object_ids[k] / f"{self.frame_names[t]}.png"


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_tiny_video(
    root: Path,
    num_frames: int = 5,
    width: int = 96,
    height: int = 64,
    first_number: int = 54,
    step: int = 1,
    name: str = "tiny",
    ext: str = "png",
    inpainted: bool = False,
    indexed_masks: bool = False,
) -> TinyVideo:
    frame_names = [f"{first_number + i * step:05d}" for i in range(num_frames)]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    background = np.stack([0.35 + 0.3 * xs / width, 0.55 + 0.2 * ys / height, np.full_like(xs, 0.4)], axis=-1)
    radius, half = 10.0, 7.0
    centres = np.zeros((2, num_frames, 2))
    frames = np.zeros((num_frames, height, width, 3), dtype=np.float32)
    masks = np.zeros((2, num_frames, height, width), dtype=bool)
    for t in range(num_frames):
        u = t / max(num_frames - 1, 1)
        # Disc in the left half moving right; square in the right half moving down-left.
        disc = (0.2 * width + 0.25 * width * u, 0.5 * height)
        square = (0.8 * width - 0.1 * width * u, 0.3 * height + 0.35 * height * u)
        centres[0, t], centres[1, t] = disc, square
        # Square mask on half-pixel centres: pixels whose centre lies inside [c - half, c + half).
        masks[0, t] = (xs - disc[0]) ** 2 + (ys - disc[1]) ** 2 <= radius**2
        masks[1, t] = (np.abs(xs - square[0]) < half) & (np.abs(ys - square[1]) < half)
        image = background.copy()
        image[masks[0, t]] = DISC_COLOUR
        image[masks[1, t]] = SQUARE_COLOUR
        frames[t] = _to_uint8(image) / 255.0

    object_ids = ["001", "002"]
    frames_dir = root / "JPEGImages" / name
    frames_dir.mkdir(parents=True)
    for t, frame_name in enumerate(frame_names):
        Image.fromarray(_to_uint8(frames[t])).save(frames_dir / f"{frame_name}.{ext}", quality=95)
        for k, obj in enumerate(object_ids):
            mask_dir = root / "Annotations" / name / obj
            mask_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(masks[k, t].astype(np.uint8) * 255).save(mask_dir / f"{frame_name}.png")
    if ext != "png":
        # Lossy frames: report what was actually written.
        for t, frame_name in enumerate(frame_names):
            frames[t] = np.asarray(Image.open(frames_dir / f"{frame_name}.{ext}").convert("RGB")) / 255.0

    if inpainted:
        for k, obj in enumerate(object_ids):
            image_dir = root / "InpaintedImages" / name / obj
            amodal_dir = root / "InpaintedMasks" / name / obj
            image_dir.mkdir(parents=True)
            amodal_dir.mkdir(parents=True)
            other = masks[1 - k]
            for t, frame_name in enumerate(frame_names):
                image = frames[t].copy()
                image[other[t]] = background[other[t]]
                Image.fromarray(_to_uint8(image)).save(image_dir / f"{frame_name}.png")
                Image.fromarray(masks[k, t].astype(np.uint8) * 255).save(amodal_dir / f"{frame_name}.png")

    if indexed_masks:
        indexed_dir = root / "IndexedAnnotations" / name
        indexed_dir.mkdir(parents=True)
        palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 253
        for t, frame_name in enumerate(frame_names):
            labels = np.zeros((height, width), dtype=np.uint8)
            labels[masks[0, t]] = 1
            labels[masks[1, t]] = 2
            image = Image.frombytes("P", (width, height), labels.tobytes())
            image.putpalette(palette)
            image.save(indexed_dir / f"{frame_name}.png")

    return TinyVideo(
        root=root,
        name=name,
        frame_names=frame_names,
        object_ids=object_ids,
        width=width,
        height=height,
        frames=frames,
        masks=masks,
        centres=centres,
        sizes=np.array([2 * radius, 2 * half]),
    )


@pytest.fixture
def tiny_video(tmp_path):
    """Factory: `tiny_video(**options) -> TinyVideo`; see the module docstring for the options."""

    def make(root: Path | None = None, **options) -> TinyVideo:
        name = options.get("name", "tiny")
        return write_tiny_video(root if root is not None else tmp_path / name, **options)

    return make


@pytest.fixture
def davis_root() -> Path:
    """The real DAVIS clips next to the repo (../shared/data/davis); skips when absent."""
    if not (DAVIS_ROOT / "JPEGImages").is_dir():
        pytest.skip(f"DAVIS test data not found at {DAVIS_ROOT}")
    return DAVIS_ROOT
