"""A video file (or a numbered image sequence) plus per-object masks as a job input.

The job spec's input::

    {"kind": "video", "path": "clip.mp4" | "folder/of/numbered/images",
     "masks": "masks/",                  # one sub-folder per object, or one indexed PNG per frame
     "start": 0, "end": None,            # frame range [start, end) in decoded frame indices (0-based)
     "stride": 1,                        # keep every stride-th frame of the range
     "max_side": None}                   # longest side of the frames used (aspect kept); None = as is

Videos (MP4, MOV, WebM, AVI, ...) are decoded with OpenCV's FFmpeg reader.  An image sequence is
a folder whose images carry a number in their name (``shot_0001.png``, ``12.jpg``); they are
ordered by that number (the last group of digits) and counted from 0 like a video's frames.

The frames used are written into the job folder in the reference layout (`materialise`)::

    <work>/JPEGImages/<name>/NNNNN.png        NNNNN = decoded frame index in the source
    <work>/Annotations/<name>/<obj>/NNNNN.png
    <work>/video.json                         source, range, stride, size, fps

so every later stage and the report refer to real files, and `backend.data.load_reference_layout`
reads them with all its checks.

Masks are matched to the frames used, in this order of preference:

1. by name: the files' numbers include every frame used (``00012.png`` is frame 12);
2. by order, the range already applied: as many masks as frames used;
3. by order, over the whole source: as many masks as the source has frames;

otherwise the error names the first frame used that has no mask.  Masks come at the source size
or at the output size; they are scaled like the frames (area average, then thresholded at 0.5).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from backend.errors import InputError

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv", ".gif"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
SPEC_KEYS = ("kind", "path", "masks", "start", "end", "stride", "max_side", "name")
_DIGITS = re.compile(r"(\d+)")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class FrameSelection:
    """Which decoded frames to use: indices start, start + stride, ... < end (end None = to the end)."""

    start: int = 0
    end: int | None = None
    stride: int = 1
    max_side: int | None = None

    @classmethod
    def from_spec(cls, spec_input: dict) -> FrameSelection:
        def integer(key: str, lo: int, default, allow_none: bool) -> int | None:
            value = spec_input.get(key, default)
            if value is None and allow_none:
                return None
            if type(value) is not int or value < lo:
                kind = "an integer" + (" or null" if allow_none else "")
                raise InputError(f"job field 'input.{key}' is {value!r}; it must be {kind} >= {lo}")
            return value

        selection = cls(
            start=integer("start", 0, 0, False),
            end=integer("end", 1, None, True),
            stride=integer("stride", 1, 1, False),
            max_side=integer("max_side", 8, None, True),
        )
        if selection.end is not None and selection.end <= selection.start:
            raise InputError(
                f"frame range {selection.start}:{selection.end} is empty; the end (exclusive) must be "
                "greater than the start"
            )
        return selection

    def describe(self) -> str:
        return f"range {self.start}:{'' if self.end is None else self.end} stride {self.stride}"


@dataclass
class DecodedVideo:
    indices: list[int]  # decoded frame index in the source of each frame used
    frames: list[np.ndarray]  # uint8 [H, W, 3] at the output size
    source_frames: int  # how many frames the source has
    source_size: tuple[int, int]  # (W, H) before scaling
    size: tuple[int, int]  # (W, H) after scaling
    fps: float | None


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(W, H) with the longest side at most max_side, the aspect ratio kept (rounded to whole pixels)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if (image.shape[1], image.shape[0]) == size:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _check_range(selection: FrameSelection, total: int, source: str) -> list[int]:
    if total == 0:
        raise InputError(f"cannot read any frame from {source}; is it a video file or an image sequence?")
    if selection.start >= total or (selection.end is not None and selection.end > total):
        end = "end" if selection.end is None else selection.end
        raise InputError(
            f"frame range {selection.start}:{end} is outside {source}, which has {total} frames "
            f"(0 to {total - 1}); use a range within 0:{total}"
        )
    end = total if selection.end is None else selection.end
    return list(range(selection.start, end, selection.stride))


def numbered_sequence(folder: Path) -> list[Path]:
    """Images in `folder` ordered by the last number in their names; names without one are errors."""
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        numbers = _DIGITS.findall(path.stem)
        if not numbers:
            raise InputError(
                f"{path} in the image sequence {folder} has no frame number in its name; name the images "
                "with their frame numbers (e.g. shot_0001.png) or remove it"
            )
        number = int(numbers[-1])
        if number in found:
            raise InputError(
                f"{path.name} and {found[number].name} in {folder} are both frame {number}; keep one"
            )
        found[number] = path
    return [found[n] for n in sorted(found)]


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path} ({exc}); replace it with a valid PNG or JPEG") from exc


def decode(path: str | Path, selection: FrameSelection) -> DecodedVideo:
    """Decode the frames `selection` picks from a video file or an image-sequence folder."""
    path = Path(path)
    if path.is_dir():
        return _decode_sequence(path, selection)
    if not path.is_file():
        raise InputError(
            f"video {path} does not exist; pass a video file (MP4, MOV, WebM) or an image folder"
        )
    return _decode_video_file(path, selection)


def _decode_sequence(folder: Path, selection: FrameSelection) -> DecodedVideo:
    files = numbered_sequence(folder)
    indices = _check_range(selection, len(files), f"image sequence {folder}")
    first = _read_rgb(files[indices[0]])
    source_size = (first.shape[1], first.shape[0])
    size = output_size(*source_size, selection.max_side)
    frames = []
    for i in indices:
        image = first if i == indices[0] else _read_rgb(files[i])
        if (image.shape[1], image.shape[0]) != source_size:
            raise InputError(
                f"{files[i]} is {image.shape[1]}x{image.shape[0]} but {files[indices[0]]} is "
                f"{source_size[0]}x{source_size[1]}; all frames of a sequence must have one size"
            )
        frames.append(_resize(image, size))
    return DecodedVideo(indices, frames, len(files), source_size, size, None)


def _decode_video_file(path: Path, selection: FrameSelection) -> DecodedVideo:
    import cv2

    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise InputError(
                f"cannot open video {path}: not a video file, or a codec FFmpeg does not read; convert it to "
                "MP4 (H.264) or pass a folder of numbered images"
            )
        fps = float(capture.get(cv2.CAP_PROP_FPS)) or None
        # Frame counts in containers can be estimates, so read to the end (or to the range's end)
        # and count what really decodes; frames outside the selection are only grabbed, not converted.
        wanted_end = selection.end
        kept: dict[int, np.ndarray] = {}
        source_size = size = None
        index = 0
        while wanted_end is None or index < wanted_end:
            if not capture.grab():
                break
            if index >= selection.start and (index - selection.start) % selection.stride == 0:
                ok, bgr = capture.retrieve()
                if not ok or bgr is None:
                    raise InputError(
                        f"video {path}: frame {index} does not decode (damaged file?); re-encode it"
                    )
                if source_size is None:
                    source_size = (bgr.shape[1], bgr.shape[0])
                    size = output_size(*source_size, selection.max_side)
                # Scaled as they arrive: only the output-size frames are ever held.
                kept[index] = _resize(np.ascontiguousarray(bgr[..., ::-1]), size)
            index += 1
        total = index
        if wanted_end is not None and total == wanted_end:
            # The range ends inside the video; the true length only matters for the message.
            while capture.grab():
                total += 1
    finally:
        capture.release()
    if total == 0:
        raise InputError(
            f"cannot read any frame from video {path}: not a video file, or damaged; convert it to MP4 (H.264)"
        )
    indices = _check_range(selection, total, f"video {path}")
    return DecodedVideo(indices, [kept[i] for i in indices], total, source_size, size, fps)


# ----------------------------------------------------------------------------------------------
# Masks


def _mask_array(path: Path, video: DecodedVideo) -> np.ndarray:
    """bool [H, W] at the output size, using backend.data's reading rules (alpha, palette, colour)."""
    from backend.data import _binary_mask, _open_image

    image = _open_image(path, str)
    mask = _binary_mask(image, path, str)
    shape = (mask.shape[1], mask.shape[0])
    if shape == video.size:
        return mask
    if shape != video.source_size:
        raise InputError(
            f"mask {path} is {shape[0]}x{shape[1]} but the video frames are {video.source_size[0]}x"
            f"{video.source_size[1]}"
            + (f" (used at {video.size[0]}x{video.size[1]})" if video.size != video.source_size else "")
            + "; make the masks the size of the video"
        )
    return _resize(mask.astype(np.float32), video.size) > 0.5


def _label_array(path: Path, video: DecodedVideo) -> np.ndarray:
    """int32 [H, W] object index per pixel of an indexed mask, at the output size (nearest)."""
    import cv2

    from backend.data import _label_maps, _open_image

    image = _open_image(path, str)
    labels = _label_maps([image], [path], str)[0]
    shape = (labels.shape[1], labels.shape[0])
    if shape == video.size:
        return labels
    if shape != video.source_size:
        raise InputError(
            f"indexed mask {path} is {shape[0]}x{shape[1]} but the video frames are "
            f"{video.source_size[0]}x{video.source_size[1]}; make the masks the size of the video"
        )
    return cv2.resize(labels.astype(np.float32), video.size, interpolation=cv2.INTER_NEAREST).astype(np.int32)


def _numbered_masks(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        numbers = _DIGITS.findall(path.stem)
        if not numbers:
            raise InputError(
                f"mask {path} has no frame number in its name; name it like 00012.png or remove it"
            )
        number = int(numbers[-1])
        if number in found:
            raise InputError(
                f"{path.name} and {found[number].name} in {folder} are both frame {number}; keep one"
            )
        found[number] = path
    return dict(sorted(found.items()))


def match_masks(folder: Path, video: DecodedVideo, selection: FrameSelection, owner: str) -> list[Path]:
    """The mask file for each frame used, by the rules in the module docstring."""
    masks = _numbered_masks(folder)
    if not masks:
        raise InputError(f"{folder} holds no mask images for {owner}; add one PNG per frame (00000.png, ...)")
    numbers = list(masks)
    if all(i in masks for i in video.indices) and numbers[-1] < video.source_frames:
        return [masks[i] for i in video.indices]
    if len(numbers) == len(video.indices):
        return list(masks.values())
    if len(numbers) == video.source_frames:
        return [masks[numbers[i]] for i in video.indices]
    missing = next((i for i in video.indices if i not in masks), None)
    if missing is None:
        extra = next(n for n in numbers if n >= video.source_frames)
        raise InputError(
            f"{masks[extra]} is frame {extra} but the video has {video.source_frames} frames (0 to "
            f"{video.source_frames - 1}); remove the mask or number the masks from 0"
        )
    raise InputError(
        f"{folder} has {len(numbers)} masks for {owner} but the video gives {len(video.indices)} frames "
        f"({selection.describe()}, {video.source_frames} in the source): frame {missing:05d} has no mask; "
        f"add {folder / f'{missing:05d}.png'}, or give one mask per frame used, or change the frame range"
    )


def safe_name(name: str) -> str:
    cleaned = _SAFE_NAME.sub("_", name).strip("._-")
    return cleaned[:64] or "video"


# ----------------------------------------------------------------------------------------------
# Writing the reference layout


def materialise(spec_input: dict, work_dir: str | Path) -> tuple[Path, str]:
    """Decode the video and its masks into `work_dir` in the reference layout; returns (root, name).

    Raises InputError (naming the file and the fix) before anything is optimised.
    """
    if not isinstance(spec_input, dict):
        raise InputError("job field 'input' must be a mapping")
    unknown = sorted(set(spec_input) - set(SPEC_KEYS))
    if unknown:
        raise InputError(
            f"unknown field 'input.{unknown[0]}' for a video input; valid: {', '.join(SPEC_KEYS)}"
        )
    for key in ("path", "masks"):
        if not spec_input.get(key) or not isinstance(spec_input[key], str):
            raise InputError(
                f"job field 'input.{key}' is required for a video input (a path on the backend's disk)"
            )
    selection = FrameSelection.from_spec(spec_input)
    source = Path(spec_input["path"])
    masks_dir = Path(spec_input["masks"])
    if not masks_dir.is_dir():
        raise InputError(f"masks folder {masks_dir} does not exist or is not a folder")
    name = safe_name(spec_input.get("name") or source.stem)
    video = decode(source, selection)

    work_dir = Path(work_dir)
    frames_dir = work_dir / "JPEGImages" / name
    annotations_dir = work_dir / "Annotations" / name
    for folder in (frames_dir, annotations_dir):
        if folder.exists():
            shutil.rmtree(folder)  # a rerun rewrites what the spec selects now
    frames_dir.mkdir(parents=True)
    annotations_dir.mkdir(parents=True)

    object_folders = sorted(p for p in masks_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if object_folders:
        for folder in object_folders:
            obj = safe_name(folder.name)
            paths = match_masks(folder, video, selection, f"object {folder.name}")
            out = annotations_dir / obj
            out.mkdir()
            for index, path in zip(video.indices, paths):
                mask = _mask_array(path, video)
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{index:05d}.png")
    else:
        paths = match_masks(masks_dir, video, selection, "the indexed masks")
        labels = [_label_array(path, video) for path in paths]
        present = sorted({int(v) for lab in labels for v in np.unique(lab) if v != 0})
        if not present:
            raise InputError(f"the indexed masks in {masks_dir} are all background; no object to reconstruct")
        for value in present:
            out = annotations_dir / f"{value:03d}"
            out.mkdir()
            for index, lab in zip(video.indices, labels):
                Image.fromarray((lab == value).astype(np.uint8) * 255).save(out / f"{index:05d}.png")
    for index, frame in zip(video.indices, video.frames):
        Image.fromarray(frame).save(frames_dir / f"{index:05d}.png", compress_level=1)
    info = {
        "source": str(source),
        "masks": str(masks_dir),
        "source_frames": video.source_frames,
        "source_size": list(video.source_size),
        "size": list(video.size),
        "fps": video.fps,
        "start": selection.start,
        "end": selection.end,
        "stride": selection.stride,
        "max_side": selection.max_side,
        "frames": video.indices,
    }
    (work_dir / "video.json").write_text(json.dumps(info, indent=2))
    return work_dir, name


def load_video_input(spec_input: dict, work_dir: str | Path | None = None):
    """Materialise the video input into `work_dir` (a temporary folder when None) and load it.

    Returns a backend.data.VideoInput; with work_dir None the arrays stay valid but the files do not.
    """
    from backend.data import load_reference_layout

    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="ds4d-video-") as tmp:
            root, name = materialise(spec_input, tmp)
            return load_reference_layout(root, name)
    root, name = materialise(spec_input, work_dir)
    return load_reference_layout(root, name)
