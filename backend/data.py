"""Loading and validating the input video: frames, per-object mask tracks, optional inpainting.

Two layouts are accepted (METHOD.md, "Input"):

* the reference layout, `load_reference_layout(root, video)`::

      <root>/JPEGImages/<video>/NNNNN.png|jpg
      <root>/Annotations/<video>/<obj>/NNNNN.png          (one folder per object: 001, 002, ...)
      <root>/InpaintedImages/<video>/<obj>/NNNNN.png      (optional, per object)
      <root>/InpaintedMasks/<video>/<obj>/NNNNN.png       (optional, per object, amodal masks)

* loose folders, `load_folders(frames_dir, masks_dir, ...)`, where `masks_dir` holds either one
  sub-folder per object or, DAVIS style, one indexed-colour PNG per frame (palette index k =
  object k, split into objects "001", "002", ... by index).

Frame files are named by a 5-digit number that sorts by time; the numbers need not start at 0
or be consecutive.  Frames keep their size and aspect ratio (never squashed to a square).
Masks are thresholded at 0.5 after scaling to [0, 1].

Everything is checked before anything is returned, and every problem is an `InputError` that
names the file or folder and the fix.  `validate_reference_layout` / `validate_folders` run the
same checks (every image is decoded, so corrupt files are caught) without keeping the decoded
arrays, for the server to call before it queues a job.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from backend.errors import InputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
FRAME_NAME = re.compile(r"^\d{5}$")
# VOC/DAVIS-style palettes use index 255 for "void" (unlabelled border pixels), not an object.
VOID_INDEX = 255
# Grayscale single-file masks whose values all stay below this are read as object indices
# (0 = background, 1 = first object, ...); brighter ones as one object's 0..255 mask.
MAX_GRAY_INDEX = 128
# More distinct colours than this in RGB indexed masks means a photo or a JPEG-compressed mask.
MAX_INDEXED_COLOURS = 254

Show = Callable[[Path], str]


@dataclass
class VideoInput:
    """One validated input video.

    Arrays are numpy (the loader has no torch dependency); shapes:
      frames            float32 [T, H, W, 3] in [0, 1]
      masks             bool    [K, T, H, W]  visible (modal) mask of each object
      inpainted_frames  float32 [K, T, H, W, 3] or None: per-object frames with occluders removed
      inpainted_masks   bool    [K, T, H, W] or None: per-object amodal masks
    When some objects have inpainting and others do not, the others get their original frames
    and visible masks in these arrays; `inpainted_objects` lists the ones that really have it.
    """

    name: str
    frame_names: list[str]
    frames: np.ndarray
    object_ids: list[str]
    masks: np.ndarray
    inpainted_frames: np.ndarray | None
    inpainted_masks: np.ndarray | None
    inpainted_objects: list[str]
    frames_dir: Path
    masks_dir: Path
    mask_layout: str  # "per-object" (one folder per object) or "indexed" (one PNG per frame)
    frame_paths: list[Path]
    mask_paths: list[list[Path]]  # [K][T]; in the indexed layout every object shares a file
    inpainted_dir: Path | None = None
    inpainted_masks_dir: Path | None = None

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def frame_numbers(self) -> list[int]:
        return [int(n) for n in self.frame_names]

    def object_frames(self, k: int) -> np.ndarray:
        """[T, H, W, 3] frames to fit object k to: its inpainted frames when given, else the video."""
        if self.inpainted_frames is not None and self.object_ids[k] in self.inpainted_objects:
            return self.inpainted_frames[k]
        return self.frames

    def object_masks(self, k: int) -> np.ndarray:
        """[T, H, W] masks to fit object k to: its amodal masks when given, else the visible ones."""
        if self.inpainted_masks is not None and self.object_ids[k] in self.inpainted_objects:
            return self.inpainted_masks[k]
        return self.masks[k]

    def summary(self) -> InputSummary:
        return InputSummary(
            name=self.name,
            frame_names=list(self.frame_names),
            object_ids=list(self.object_ids),
            width=self.width,
            height=self.height,
            inpainted_objects=list(self.inpainted_objects),
            mask_layout=self.mask_layout,
        )


@dataclass
class InputSummary:
    """What validation found, without the pixel data."""

    name: str
    frame_names: list[str]
    object_ids: list[str]
    width: int
    height: int
    inpainted_objects: list[str] = field(default_factory=list)
    mask_layout: str = "per-object"

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_reference_layout(
    root: str | Path, video: str, objects: Sequence[str | int] | None = None
) -> VideoInput:
    """Load `<root>/JPEGImages/<video>` with its `Annotations` (and optional inpainting).

    `objects` picks a subset of object ids ("001" or 1), in the order given; default all, sorted.
    """
    plan = _plan_reference_layout(Path(root), video, objects)
    return _read(plan, keep=True)


def validate_reference_layout(
    root: str | Path, video: str, objects: Sequence[str | int] | None = None
) -> InputSummary:
    """Run every check `load_reference_layout` runs, keeping no pixel data."""
    plan = _plan_reference_layout(Path(root), video, objects)
    return _read(plan, keep=False)


def load_folders(
    frames_dir: str | Path,
    masks_dir: str | Path,
    inpainted_dir: str | Path | None = None,
    inpainted_masks_dir: str | Path | None = None,
    objects: Sequence[str | int] | None = None,
) -> VideoInput:
    """Load frames from `frames_dir` and masks from `masks_dir` (per-object folders or indexed PNGs).

    `inpainted_dir` / `inpainted_masks_dir` hold one sub-folder per object (named like the
    object ids) and must be given together.
    """
    plan = _plan_folders(frames_dir, masks_dir, inpainted_dir, inpainted_masks_dir, objects, show=str)
    return _read(plan, keep=True)


def validate_folders(
    frames_dir: str | Path,
    masks_dir: str | Path,
    inpainted_dir: str | Path | None = None,
    inpainted_masks_dir: str | Path | None = None,
    objects: Sequence[str | int] | None = None,
) -> InputSummary:
    """Run every check `load_folders` runs, keeping no pixel data."""
    plan = _plan_folders(frames_dir, masks_dir, inpainted_dir, inpainted_masks_dir, objects, show=str)
    return _read(plan, keep=False)


# ----------------------------------------------------------------------------------------------
# Step 1: list files and check names and pairing (no decoding)


@dataclass
class _Plan:
    name: str
    show: Show
    frames_dir: Path
    masks_dir: Path
    frame_paths: dict[str, Path]
    layout: str
    requested: list[str] | None
    # per-object layout: object id -> frame name -> path
    object_mask_paths: dict[str, dict[str, Path]]
    # indexed layout: frame name -> path
    indexed_mask_paths: dict[str, Path]
    inpainted_dir: Path | None
    inpainted_masks_dir: Path | None
    # object id -> (frame name -> inpainted image path, frame name -> amodal mask path)
    inpainted: dict[str, tuple[dict[str, Path], dict[str, Path]]]


def _plan_reference_layout(root: Path, video: str, objects: Sequence[str | int] | None) -> _Plan:
    if not root.is_dir():
        raise InputError(
            f"dataset root {root} does not exist or is not a folder; pass the folder that holds "
            "JPEGImages/ and Annotations/"
        )
    if not video or Path(video).name != video or video in (".", ".."):
        raise InputError(f"video name {video!r} must be a plain folder name inside {root / 'JPEGImages'}")

    def show(path: Path) -> str:
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    images_root = root / "JPEGImages"
    frames_dir = images_root / video
    if not frames_dir.is_dir():
        videos = _subfolders(images_root) if images_root.is_dir() else []
        where = f"videos there: {', '.join(videos)}" if videos else "expected JPEGImages/<video>/NNNNN.png"
        raise InputError(f"{show(frames_dir)} not found: no video {video!r} under {root} ({where})")
    masks_dir = root / "Annotations" / video
    if not masks_dir.is_dir():
        raise InputError(
            f"{show(masks_dir)} not found: video {video!r} has frames but no masks; add "
            f"Annotations/{video}/<obj>/NNNNN.png (one folder per object, e.g. 001)"
        )
    inpainted_dir = root / "InpaintedImages" / video
    inpainted_masks_dir = root / "InpaintedMasks" / video
    has_images, has_masks = inpainted_dir.is_dir(), inpainted_masks_dir.is_dir()
    if has_images != has_masks:
        present, absent = (
            (inpainted_dir, inpainted_masks_dir) if has_images else (inpainted_masks_dir, inpainted_dir)
        )
        raise InputError(
            f"{show(present)} exists but {show(absent)} does not; inpainted frames and their amodal "
            "masks come together: add the missing folder or remove the other"
        )
    return _plan_folders(
        frames_dir,
        masks_dir,
        inpainted_dir if has_images else None,
        inpainted_masks_dir if has_masks else None,
        objects,
        show=show,
        name=video,
    )


def _plan_folders(
    frames_dir: str | Path,
    masks_dir: str | Path,
    inpainted_dir: str | Path | None,
    inpainted_masks_dir: str | Path | None,
    objects: Sequence[str | int] | None,
    show: Show,
    name: str | None = None,
) -> _Plan:
    frames_dir, masks_dir = Path(frames_dir), Path(masks_dir)
    if not frames_dir.is_dir():
        raise InputError(f"frames folder {show(frames_dir)} does not exist or is not a folder")
    if not masks_dir.is_dir():
        raise InputError(f"masks folder {show(masks_dir)} does not exist or is not a folder")
    if (inpainted_dir is None) != (inpainted_masks_dir is None):
        raise InputError(
            "inpainted frames and inpainted (amodal) masks come together: pass both "
            "inpainted_dir and inpainted_masks_dir, or neither"
        )
    frame_paths = _numbered_images(frames_dir, show, "frame")
    if not frame_paths:
        raise InputError(
            f"{show(frames_dir)} holds no frames; expected images named by a 5-digit frame number, "
            "e.g. 00000.png or 00054.jpg"
        )
    requested = _normalise_object_ids(objects)

    mask_folders = _subfolders(masks_dir)
    mask_files = _numbered_images(masks_dir, show, "mask") if not mask_folders else {}
    if mask_folders and any(_is_image(p) for p in masks_dir.iterdir()):
        raise InputError(
            f"{show(masks_dir)} holds both per-object folders ({', '.join(mask_folders)}) and mask "
            "images; use one layout: a folder per object, or one indexed PNG per frame"
        )
    object_mask_paths: dict[str, dict[str, Path]] = {}
    if mask_folders:
        layout = "per-object"
        chosen = _choose_objects(mask_folders, requested, show(masks_dir))
        for obj in chosen:
            paths = _numbered_images(masks_dir / obj, show, "mask")
            _check_pairing(frame_paths, frames_dir, paths, masks_dir / obj, show, f"object {obj}", "mask")
            object_mask_paths[obj] = paths
    elif mask_files:
        layout = "indexed"
        _check_pairing(frame_paths, frames_dir, mask_files, masks_dir, show, "the indexed masks", "mask")
    else:
        raise InputError(
            f"{show(masks_dir)} holds no masks; expected one folder per object (001/NNNNN.png, ...) or "
            "one indexed-colour PNG per frame named like the frames"
        )

    inpainted: dict[str, tuple[dict[str, Path], dict[str, Path]]] = {}
    if inpainted_dir is not None and inpainted_masks_dir is not None:
        inpainted_dir, inpainted_masks_dir = Path(inpainted_dir), Path(inpainted_masks_dir)
        for folder in (inpainted_dir, inpainted_masks_dir):
            if not folder.is_dir():
                raise InputError(f"inpainting folder {show(folder)} does not exist or is not a folder")
        image_objs, mask_objs = _subfolders(inpainted_dir), _subfolders(inpainted_masks_dir)
        if set(image_objs) != set(mask_objs):
            odd = sorted(set(image_objs) ^ set(mask_objs))[0]
            has, lacks = (
                (inpainted_dir, inpainted_masks_dir)
                if odd in image_objs
                else (inpainted_masks_dir, inpainted_dir)
            )
            raise InputError(
                f"{show(has / odd)} exists but {show(lacks / odd)} does not; each inpainted object "
                "needs both its frames and its amodal masks"
            )
        if layout == "per-object":
            unknown = [o for o in image_objs if o not in mask_folders]
            if unknown:
                raise InputError(
                    f"{show(inpainted_dir / unknown[0])} is inpainting for object {unknown[0]}, which has "
                    f"no masks in {show(masks_dir)} (objects: {', '.join(mask_folders)}); rename or remove it"
                )
        for obj in image_objs:
            if requested is not None and obj not in requested:
                continue
            if layout == "per-object" and obj not in object_mask_paths:
                continue
            images = _numbered_images(inpainted_dir / obj, show, "inpainted frame")
            amodal = _numbered_images(inpainted_masks_dir / obj, show, "inpainted mask")
            what = f"object {obj}"
            _check_pairing(
                frame_paths, frames_dir, images, inpainted_dir / obj, show, what, "inpainted frame"
            )
            _check_pairing(
                frame_paths, frames_dir, amodal, inpainted_masks_dir / obj, show, what, "amodal mask"
            )
            inpainted[obj] = (images, amodal)
    else:
        inpainted_dir = inpainted_masks_dir = None

    return _Plan(
        name=name or frames_dir.name,
        show=show,
        frames_dir=frames_dir,
        masks_dir=masks_dir,
        frame_paths=frame_paths,
        layout=layout,
        requested=requested,
        object_mask_paths=object_mask_paths,
        indexed_mask_paths=mask_files,
        inpainted_dir=inpainted_dir,
        inpainted_masks_dir=inpainted_masks_dir,
        inpainted=inpainted,
    )


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _subfolders(folder: Path) -> list[str]:
    names = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def _numbered_images(folder: Path, show: Show, what: str) -> dict[str, Path]:
    """Frame name ("00054") -> image path, sorted by number; other file types are ignored."""
    if not folder.is_dir():
        raise InputError(f"{show(folder)} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not _is_image(path):
            continue
        if not FRAME_NAME.match(path.stem):
            raise InputError(
                f"{show(path)}: {what} files must be named by a 5-digit frame number such as "
                f"00054{path.suffix}; rename {path.name}"
            )
        if path.stem in found:
            raise InputError(
                f"{show(path)} and {found[path.stem].name} are both frame {path.stem} in {show(folder)}; "
                "keep one of them"
            )
        found[path.stem] = path
    return dict(sorted(found.items(), key=lambda item: int(item[0])))


def _check_pairing(
    frames: dict[str, Path],
    frames_dir: Path,
    others: dict[str, Path],
    others_dir: Path,
    show: Show,
    owner: str,
    what: str,
) -> None:
    missing = [n for n in frames if n not in others]
    extra = [n for n in others if n not in frames]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(
            f"{show(others_dir)} has {len(others)} {what}s but {show(frames_dir)} has {len(frames)} "
            f"frames: {frames[missing[0]].name} has no {what} for {owner}{more}; add "
            f"{show(others_dir / (missing[0] + '.png'))} or remove the frame"
        )
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise InputError(
            f"{show(others[extra[0]])} has no frame: {show(frames_dir)} has no frame {extra[0]}{more}; "
            f"remove the {what} or add the frame"
        )


def _normalise_object_ids(objects: Sequence[str | int] | None) -> list[str] | None:
    if objects is None:
        return None
    if isinstance(objects, (str, int)):
        objects = [objects]
    ids = [f"{o:03d}" if isinstance(o, int) else str(o) for o in objects]
    if not ids:
        raise InputError("objects is empty: name at least one object id (e.g. '001') or pass None for all")
    dupes = sorted({o for o in ids if ids.count(o) > 1})
    if dupes:
        raise InputError(f"objects lists {dupes[0]} more than once; name each object once")
    return ids


def _choose_objects(available: list[str], requested: list[str] | None, where: str) -> list[str]:
    if requested is None:
        return list(available)
    unknown = [o for o in requested if o not in available]
    if unknown:
        raise InputError(
            f"object {unknown[0]} is not in {where}; objects there: {', '.join(available) or 'none'}"
        )
    return list(requested)


# ----------------------------------------------------------------------------------------------
# Step 2: decode every image, check sizes and first-frame masks, build the arrays


def _read(plan: _Plan, keep: bool) -> VideoInput | InputSummary:
    show = plan.show
    frame_names = list(plan.frame_paths)
    frame_paths = list(plan.frame_paths.values())
    num_frames = len(frame_names)

    frames: np.ndarray | None = None
    first = frame_paths[0]
    width = height = 0
    for t, path in enumerate(frame_paths):
        image = _open_image(path, show)
        if t == 0:
            width, height = image.size
            if keep:
                frames = np.empty((num_frames, height, width, 3), dtype=np.float32)
        elif image.size != (width, height):
            raise InputError(
                f"frame {show(path)} is {image.width}x{image.height} but {show(first)} is {width}x{height}; "
                "all frames of a video must have one size"
            )
        if keep:
            frames[t] = _rgb_array(image)

    def check_size(image: Image.Image, path: Path, frame_name: str, what: str) -> None:
        if image.size != (width, height):
            raise InputError(
                f"{what} {show(path)} is {image.width}x{image.height} but frame "
                f"{show(plan.frame_paths[frame_name])} is {width}x{height}; resize the {what} to the frame size"
            )

    def check_first_mask(mask: np.ndarray, obj: str, path: Path, what: str) -> None:
        if not mask.any():
            raise InputError(
                f"object {obj}: {what} {show(path)} for the first frame {frame_names[0]} is empty (no pixel "
                "above 0.5 after scaling to [0, 1]); every object must be visible in the first frame: fix "
                "the mask, start the video at a frame where the object shows, or leave the object out"
            )

    if plan.layout == "per-object":
        object_ids = list(plan.object_mask_paths)
        mask_paths = [list(plan.object_mask_paths[obj].values()) for obj in object_ids]
        masks = np.zeros((len(object_ids), num_frames, height, width), dtype=bool) if keep else None
        for k, obj in enumerate(object_ids):
            for t, path in enumerate(mask_paths[k]):
                image = _open_image(path, show)
                check_size(image, path, frame_names[t], "mask")
                if keep or t == 0:
                    mask = _binary_mask(image, path, show)
                    if t == 0:
                        check_first_mask(mask, obj, path, "mask")
                    if keep:
                        masks[k, t] = mask
    else:
        object_ids, masks = _read_indexed(plan, frame_names, check_size, check_first_mask, keep)
        mask_paths = [list(plan.indexed_mask_paths.values()) for _ in object_ids]

    inpainted_objects = [obj for obj in object_ids if obj in plan.inpainted]
    inpainted_frames = inpainted_masks = None
    if inpainted_objects and keep:
        # Objects without inpainting fall back to the video frames and visible masks.
        inpainted_frames = np.broadcast_to(frames, (len(object_ids), *frames.shape)).copy()
        inpainted_masks = masks.copy()
    for obj in inpainted_objects:
        k = object_ids.index(obj)
        image_paths, amodal_paths = plan.inpainted[obj]
        for t, name in enumerate(frame_names):
            image = _open_image(image_paths[name], show)
            check_size(image, image_paths[name], name, "inpainted frame")
            if keep:
                inpainted_frames[k, t] = _rgb_array(image)
            image = _open_image(amodal_paths[name], show)
            check_size(image, amodal_paths[name], name, "amodal mask")
            if keep or t == 0:
                mask = _binary_mask(image, amodal_paths[name], show)
                if t == 0:
                    check_first_mask(mask, obj, amodal_paths[name], "amodal mask")
                if keep:
                    inpainted_masks[k, t] = mask

    if not keep:
        return InputSummary(
            name=plan.name,
            frame_names=frame_names,
            object_ids=object_ids,
            width=width,
            height=height,
            inpainted_objects=inpainted_objects,
            mask_layout=plan.layout,
        )
    return VideoInput(
        name=plan.name,
        frame_names=frame_names,
        frames=frames,
        object_ids=object_ids,
        masks=masks,
        inpainted_frames=inpainted_frames,
        inpainted_masks=inpainted_masks,
        inpainted_objects=inpainted_objects,
        frames_dir=plan.frames_dir,
        masks_dir=plan.masks_dir,
        mask_layout=plan.layout,
        frame_paths=frame_paths,
        mask_paths=mask_paths,
        inpainted_dir=plan.inpainted_dir if inpainted_objects else None,
        inpainted_masks_dir=plan.inpainted_masks_dir if inpainted_objects else None,
    )


def _read_indexed(plan, frame_names, check_size, check_first_mask, keep):
    """Split one indexed mask per frame into per-object masks; object id = f"{index:03d}"."""
    show = plan.show
    paths = list(plan.indexed_mask_paths.values())
    images = []
    for t, path in enumerate(paths):
        image = _open_image(path, show)
        check_size(image, path, frame_names[t], "mask")
        images.append(image)
    labels = _label_maps(images, paths, show)
    present = sorted({int(v) for lab in labels for v in np.unique(lab) if v != 0})
    available = [f"{v:03d}" for v in present]
    if not available:
        raise InputError(
            f"the indexed masks in {show(plan.masks_dir)} are all background (index 0 or black); "
            "no object to reconstruct"
        )
    object_ids = _choose_objects(available, plan.requested, show(plan.masks_dir))
    unknown = [obj for obj in plan.inpainted if obj not in available]
    if unknown:
        raise InputError(
            f"{show(plan.inpainted_dir / unknown[0])} is inpainting for object {unknown[0]}, but the indexed "
            f"masks in {show(plan.masks_dir)} hold objects {', '.join(available)}; rename or remove it"
        )
    indices = [int(obj) for obj in object_ids]
    for obj, index in zip(object_ids, indices):
        if not (labels[0] == index).any():
            check_first_mask(np.zeros(1, dtype=bool), obj, paths[0], f"index {index} of the indexed mask")
    if not keep:
        return object_ids, None
    masks = np.stack([np.stack([lab == index for lab in labels]) for index in indices])
    return object_ids, masks


# ----------------------------------------------------------------------------------------------
# Decoding single images


def _open_image(path: Path, show: Show) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated or corrupt file fails here, not later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"cannot read image {show(path)} ({exc}); replace it with a valid PNG or JPEG"
        ) from exc
    if image.width < 1 or image.height < 1:
        raise InputError(f"image {show(path)} is empty ({image.width}x{image.height})")
    return image


def _rgb_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1]; alpha is dropped, grayscale and palette images expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def _binary_mask(image: Image.Image, path: Path, show: Show) -> np.ndarray:
    """One object's mask as bool [H, W]: value scaled to [0, 1] and thresholded at 0.5.

    Palette images: any non-zero index is the object.  Images with transparency: the alpha
    channel is the mask.  Colour images: the brightest channel, so coloured masks count.
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=bool).copy()
    if mode == "P":
        return np.asarray(image) != 0
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image, dtype=np.float32) / 65535.0 > 0.5
    if mode == "F":
        return np.asarray(image, dtype=np.float32) > 0.5
    if mode == "L":
        return np.asarray(image) > 127  # v / 255 > 0.5
    if mode in ("LA", "RGBA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        if (alpha < 255).any():
            return alpha > 127
        image = image.convert("RGB" if mode != "LA" else "L")
        return _binary_mask(image, path, show)
    return np.asarray(image.convert("RGB")).max(axis=-1) > 127


def _label_maps(images: list[Image.Image], paths: list[Path], show: Show) -> list[np.ndarray]:
    """Object index per pixel for each indexed mask image (0 = background).

    Palette images give their indices (255 = void, read as background).  Grayscale images whose
    values all stay below 128 are indices too; brighter grayscale is one object's 0..255 mask.
    Colour images map each distinct colour to its index in the DAVIS/VOC palette (other colours
    get the next free indices in sorted order); black is background.
    """
    labels: list[np.ndarray | None] = [None] * len(images)
    gray: list[int] = []
    colour: list[int] = []
    for t, image in enumerate(images):
        if image.mode == "P":
            lab = np.asarray(image).astype(np.int32)
            lab[lab == VOID_INDEX] = 0
            labels[t] = lab
        elif image.mode == "1":
            labels[t] = np.asarray(image, dtype=bool).astype(np.int32)
        elif image.mode in ("L", "I;16", "I;16B", "I;16L", "I"):
            gray.append(t)
        else:
            colour.append(t)

    if gray:
        values = [np.asarray(images[t]).astype(np.int64) for t in gray]
        as_indices = max(int(v.max()) for v in values) < MAX_GRAY_INDEX
        for t, v in zip(gray, values):
            if as_indices:
                labels[t] = v.astype(np.int32)
            else:
                labels[t] = _binary_mask(images[t], paths[t], show).astype(np.int32)

    if colour:
        packed = []
        for t in colour:
            rgb = np.asarray(images[t].convert("RGB")).astype(np.int32)
            packed.append((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
        colours = sorted({int(c) for p in packed for c in np.unique(p)} - {0})
        if len(colours) > MAX_INDEXED_COLOURS:
            raise InputError(
                f"indexed mask {show(paths[colour[0]])} and the others hold {len(colours)} distinct colours, "
                "too many for object labels (a photo or a JPEG-compressed mask?); save masks as PNG with "
                "one flat colour per object, or use one folder per object"
            )
        palette = _davis_palette_lookup()
        index_of = {c: palette[c] for c in colours if c in palette}
        next_index = max(index_of.values(), default=0) + 1
        for c in colours:
            if c not in index_of:
                index_of[c] = next_index
                next_index += 1
        lut_keys = np.array([0, *colours], dtype=np.int64)
        lut_vals = np.array([0, *(index_of[c] for c in colours)], dtype=np.int32)
        for t, p in zip(colour, packed):
            labels[t] = lut_vals[np.searchsorted(lut_keys, p)]
    return labels


def _davis_palette_lookup() -> dict[int, int]:
    """Packed RGB colour -> index for the standard VOC/DAVIS palette (indices 1..254)."""
    lookup = {}
    for index in range(1, VOID_INDEX):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        lookup.setdefault((r << 16) | (g << 8) | b, index)
    return lookup
