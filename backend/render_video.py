"""Writing rendered frame sequences: MP4 (H.264 through imageio-ffmpeg), GIF (PIL) and a PNG still.

Frames are [N, H, W, 3] arrays, float in [0, 1] or uint8.  H.264 with yuv420p needs even sides,
so odd frames are padded by one row/column repeating the edge (never resized, so the aspect ratio
and pixel grid stay those of the render).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] -> even H and W, repeating the last row/column where needed."""
    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = pad_to_even(to_uint8(frames))
    # macro_block_size=1: keep the exact size (the default rescales to multiples of 16).
    with imageio.get_writer(
        path,
        format="FFMPEG",
        mode="I",
        fps=float(fps),
        codec="libx264",
        pixelformat="yuv420p",
        quality=8,
        macro_block_size=1,
        ffmpeg_log_level="error",
    ) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def write_gif(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(frame) for frame in to_uint8(frames)]
    duration_ms = max(20, round(1000.0 / float(fps)))  # browsers clamp shorter GIF delays anyway
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, optimize=False
    )
    return path


def write_png(path: str | Path, frame: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(frame)).save(path)
    return path


def write_clip(stem: str | Path, frames: np.ndarray, fps: float) -> dict[str, Path]:
    """`stem`.mp4, `stem`.gif and `stem`_frame.png (the middle frame, for quick viewing)."""
    stem = Path(stem)
    frames = to_uint8(frames)
    written = {
        "gif": write_gif(stem.with_name(stem.name + ".gif"), frames, fps),
        "png": write_png(stem.with_name(stem.name + "_frame.png"), frames[len(frames) // 2]),
    }
    try:
        written["mp4"] = write_mp4(stem.with_name(stem.name + ".mp4"), frames, fps)
    except (ImportError, RuntimeError, OSError) as exc:
        # A machine without an H.264 encoder (no imageio-ffmpeg) still gets the GIF and stills.
        warnings.warn(f"{stem.name}.mp4 not written ({exc}); the GIF has the same frames", stacklevel=2)
    return written


def read_video_frames(path: str | Path) -> np.ndarray:
    """All frames of a video or GIF as uint8 [N, H, W, 3] (for tests and previews)."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.suffix.lower() == ".gif":
        with Image.open(path) as image:
            frames = []
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                frames.append(np.asarray(image.convert("RGB")))
        return np.stack(frames)
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([np.asarray(frame)[..., :3] for frame in reader])
    finally:
        reader.close()
