"""A Movie Clip and one Mask data-block (or one Mask layer) per object as the backend's input.

Blender draws and animates masks in the Movie Clip Editor; the backend wants one binary mask
image per frame and object.  `rasterise` renders each Mask data-block at every frame used through
the compositor's Mask node into a File Output node (headless: a render with no Render Layers node
runs only the compositor).  It renders the given scene, which must be the active one: Blender
writes evaluated animation back to the Mask data-blocks only for the active depsgraph, and the
compositor reads them from there.  Every setting it changes on the scene is put back afterwards.

Frames: decoded frame i (0-based, what the backend calls frame i of the video) is clip frame
i + 1, shown at scene frame ``clip.frame_start + i - clip.frame_offset``.  Masks are written as
``<folder>/<mask name>/NNNNN.png`` (NNNNN = i; the layer's name when one layer is chosen), the
layout the backend's video input matches by name, so the object ids in the result are the mask
names.  The imported result starts at the scene frame showing the first frame used and advances
one video frame per scene frame: with a stride above 1 the clip in the background runs ahead.

With a shared disk the job names the clip's file and the mask folder (`input.kind == "video"`);
without one the clip's frames are written through the compositor's Movie Clip node too and both
are uploaded in the reference layout.  No torch here; numpy and bpy only.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import bpy
import numpy as np

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
TREE_NAME = "DreamScene4D Mask Raster"


class MovieMaskError(ValueError):
    """A Movie Clip or Mask set-up the backend cannot use; the message names the data-block and the fix."""


def object_name(mask_name: str) -> str:
    """The object id a mask becomes: its name, with characters other than letters, digits, '.', '_'
    and '-' replaced by '_' (ids are folder names on the backend)."""
    cleaned = _SAFE_NAME.sub("_", mask_name).strip("._-")
    return cleaned[:64] or "mask"


def clip_source_path(clip: bpy.types.MovieClip) -> str:
    """The file (movie) or folder (image sequence) the clip reads, as an absolute path."""
    path = Path(bpy.path.abspath(clip.filepath, library=clip.library)).resolve()
    return str(path.parent if clip.source == "SEQUENCE" else path)


def load_clip(path: str) -> bpy.types.MovieClip:
    """A Movie Clip for a video file (reusing one that already reads it)."""
    absolute = str(Path(bpy.path.abspath(path)).resolve())
    for clip in bpy.data.movieclips:
        if clip_source_path(clip) == absolute:
            return clip
    if not Path(absolute).is_file():
        raise MovieMaskError(f"video file {absolute} does not exist; pick a video file or a Movie Clip")
    try:
        clip = bpy.data.movieclips.load(absolute)
    except RuntimeError as error:
        raise MovieMaskError(
            f"Blender cannot open {absolute} as a movie ({error}); convert it to MP4"
        ) from None
    check_clip(clip)
    return clip


def check_clip(clip: bpy.types.MovieClip | None) -> None:
    if clip is None:
        raise MovieMaskError("no Movie Clip chosen: pick one (or a video file) as the input video")
    width, height = clip.size
    if clip.frame_duration < 1 or width < 1 or height < 1:
        raise MovieMaskError(
            f"Movie Clip '{clip.name}' ({clip_source_path(clip)}) has no readable frames; check the file "
            "opens in the Movie Clip Editor, or convert it to MP4 (H.264)"
        )


def frame_indices(
    clip: bpy.types.MovieClip, start: int = 0, end: int | None = None, stride: int = 1
) -> list[int]:
    """Decoded frame indices [start, end) every stride-th; the range must lie inside the clip."""
    check_clip(clip)
    total = int(clip.frame_duration)
    end = total if end is None or end <= 0 else end
    if stride < 1:
        raise MovieMaskError(f"stride {stride} must be at least 1")
    if not 0 <= start < end or end > total:
        raise MovieMaskError(
            f"frame range {start}:{end} is outside Movie Clip '{clip.name}', which has {total} frames "
            f"(0 to {total - 1}); use a range within 0:{total}"
        )
    return list(range(start, end, stride))


def scene_frame(clip: bpy.types.MovieClip, index: int) -> int:
    """The scene frame at which the clip (and a mask drawn over it) shows decoded frame `index`."""
    return int(clip.frame_start) + index - int(clip.frame_offset)


def mask_entry(entry) -> tuple:
    """(Mask, layer name or None) from a Mask or a (Mask, layer name) pair ("" = every layer)."""
    if isinstance(entry, tuple):
        mask, layer = entry
        return mask, (layer or None)
    return entry, None


def entry_label(entry) -> str:
    """The name an object takes: its layer's when one layer is chosen, else the Mask's."""
    mask, layer = mask_entry(entry)
    return layer if layer else mask.name


def check_masks(masks) -> None:
    """Each entry a Mask data-block (or one of its layers) holding at least one drawn spline point."""
    if not masks:
        raise MovieMaskError("no masks chosen: add one Mask data-block per object")
    seen: dict[str, str] = {}
    for entry in masks:
        mask, layer_name = mask_entry(entry)
        if mask is None:
            raise MovieMaskError("an object slot has no Mask data-block; pick one or remove the slot")
        if len(mask.layers) == 0:
            raise MovieMaskError(
                f"Mask '{mask.name}' has no layer; draw the object's outline in the Movie Clip Editor's "
                "Mask mode (which adds a layer) or remove the mask from the list"
            )
        layers = list(mask.layers)
        if layer_name is not None:
            layers = [layer for layer in layers if layer.name == layer_name]
            if not layers:
                raise MovieMaskError(
                    f"Mask '{mask.name}' has no layer '{layer_name}' (layers: "
                    f"{', '.join(layer.name for layer in mask.layers)}); pick one of those"
                )
        what = f"Mask '{mask.name}'" + (f" layer '{layer_name}'" if layer_name else "")
        if not any(len(spline.points) for layer in layers for spline in layer.splines):
            raise MovieMaskError(f"{what} has no drawn points; draw the object's outline")
        name = object_name(entry_label(entry))
        if name in seen:
            raise MovieMaskError(f"{seen[name]} and {what} would both be object '{name}'; rename one")
        seen[name] = what


def _single_layer_copy(mask, layer_name: str):
    """A temporary copy of `mask` keeping only one layer (the animation is shared with the original)."""
    copy = mask.copy()
    for layer in [layer for layer in copy.layers if layer.name != layer_name]:
        copy.layers.remove(layer)
    return copy


def _file_output(tree, directory: Path, colour_mode: str):
    node = tree.nodes.new("CompositorNodeOutputFile")
    node.file_output_items.new("FLOAT" if colour_mode == "BW" else "RGBA", "image")
    node.directory = str(directory) + os.sep
    node.file_name = ""
    node.format.media_type = "IMAGE"
    node.format.file_format = "PNG"
    node.format.color_mode = colour_mode
    node.format.color_depth = "8"
    return node


def _read_png_gray(path: Path) -> np.ndarray:
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        pixels = np.empty(width * height * image.channels, dtype=np.float32)
        image.pixels.foreach_get(pixels)
        return pixels.reshape(height, width, image.channels)[::-1, :, 0]
    finally:
        bpy.data.images.remove(image)


class _SceneState:
    """Saves the render settings `rasterise` touches and puts them back."""

    FIELDS = (
        (("render",), ("resolution_x", "resolution_y", "resolution_percentage", "use_compositing")),
        (("render",), ("use_sequencer", "pixel_aspect_x", "pixel_aspect_y")),
        (("view_settings",), ("view_transform", "look", "exposure", "gamma")),
        (("display_settings",), ("display_device",)),
        ((), ("frame_current",)),
    )

    def __init__(self, scene):
        self.scene = scene
        self.values = []
        for owner_path, names in self.FIELDS:
            owner = scene
            for part in owner_path:
                owner = getattr(owner, part)
            for name in names:
                self.values.append((owner, name, getattr(owner, name)))
        self.tree = scene.compositing_node_group

    def restore(self) -> None:
        for owner, name, value in self.values:
            try:
                setattr(owner, name, value)
            except (AttributeError, TypeError):
                pass
        self.scene.compositing_node_group = self.tree
        self.scene.frame_set(self.scene.frame_current)


def rasterise(
    scene,
    clip: bpy.types.MovieClip,
    masks,
    indices: list[int],
    masks_dir: str | Path,
    frames_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Render each mask at every frame in `indices` into masks_dir/<object name>/NNNNN.png (0/255).

    With frames_dir, the clip's frames go to frames_dir/NNNNN.png as well (sRGB, as displayed with
    the Standard view transform).  Masks are rendered at the clip's size.  Returns object name ->
    folder.  Raises MovieMaskError for an empty mask in the first frame used.
    """
    check_clip(clip)
    check_masks(masks)
    masks_dir = Path(masks_dir)
    width, height = (int(v) for v in clip.size)
    names = [object_name(entry_label(entry)) for entry in masks]
    folders = {name: masks_dir / name for name in names}
    for folder in folders.values():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    if frames_dir is not None:
        frames_dir = Path(frames_dir)
        frames_dir.mkdir(parents=True, exist_ok=True)

    state = _SceneState(scene)
    tree = bpy.data.node_groups.new(TREE_NAME, "CompositorNodeTree")
    staging = Path(tempfile.mkdtemp(prefix="ds4d-masks-"))
    copies = []
    try:
        outputs: list[tuple[Path, Path]] = []  # (staging folder, destination folder)
        for name, entry in zip(names, masks):
            mask, layer_name = mask_entry(entry)
            if layer_name is not None:
                mask = _single_layer_copy(mask, layer_name)
                copies.append(mask)
            node = tree.nodes.new("CompositorNodeMask")
            node.mask = mask
            node.inputs["Motion Blur"].default_value = False
            out = _file_output(tree, staging / name, "BW")
            tree.links.new(node.outputs["Mask"], out.inputs[0])
            outputs.append((staging / name, folders[name]))
        if frames_dir is not None:
            node = tree.nodes.new("CompositorNodeMovieClip")
            node.clip = clip
            out = _file_output(tree, staging / "_frames", "RGB")
            tree.links.new(node.outputs["Image"], out.inputs[0])
            outputs.append((staging / "_frames", frames_dir))

        scene.compositing_node_group = tree
        render = scene.render
        render.resolution_x, render.resolution_y, render.resolution_percentage = width, height, 100
        render.pixel_aspect_x = render.pixel_aspect_y = 1.0
        render.use_compositing, render.use_sequencer = True, False
        scene.view_settings.view_transform, scene.view_settings.look = "Standard", "None"
        scene.view_settings.exposure, scene.view_settings.gamma = 0.0, 1.0
        scene.display_settings.display_device = "sRGB"
        for index in indices:
            scene.frame_set(scene_frame(clip, index))
            result = bpy.ops.render.render(write_still=False, scene=scene.name)
            if "FINISHED" not in result:
                raise MovieMaskError(f"the compositor did not run for frame {index} ({result})")
            for source, destination in outputs:
                written = (
                    sorted(p for p in source.iterdir() if p.suffix.lower() == ".png")
                    if source.is_dir()
                    else []
                )
                if len(written) != 1:
                    raise MovieMaskError(
                        f"the compositor wrote {len(written)} images into {source} for frame {index}; expected 1"
                    )
                shutil.move(str(written[0]), str(destination / f"{index:05d}.png"))
    finally:
        state.restore()
        bpy.data.node_groups.remove(tree)
        for copy in copies:
            bpy.data.masks.remove(copy)
        shutil.rmtree(staging, ignore_errors=True)

    first = indices[0]
    for entry, name in zip(masks, names):
        mask, layer_name = mask_entry(entry)
        what = f"Mask '{mask.name}'" + (f" layer '{layer_name}'" if layer_name else "")
        if not (_read_png_gray(folders[name] / f"{first:05d}.png") > 0.5).any():
            raise MovieMaskError(
                f"{what} is empty in the first frame used (video frame {first}, scene frame "
                f"{scene_frame(clip, first)}); every object must show in the first frame: move its outline "
                "onto the object there, or start the frame range where it shows"
            )
    return folders


def _settings_range(settings) -> tuple[int, int | None, int]:
    end = int(settings.clip_frame_end)
    return int(settings.clip_frame_start), (end if end > 0 else None), int(settings.clip_stride)


def settings_clip(settings) -> bpy.types.MovieClip:
    if settings.movie_clip is not None:
        check_clip(settings.movie_clip)
        return settings.movie_clip
    if settings.video_file:
        clip = load_clip(settings.video_file)
        settings.movie_clip = clip
        return clip
    raise MovieMaskError("pick a Movie Clip or a video file as the input video")


def settings_masks(settings) -> list:
    return [(item.mask, item.layer) for item in settings.clip_masks]


def build_clip_input(scene, settings, work_dir: str | Path, upload: bool) -> tuple[dict, dict | None]:
    """(spec input, uploads or None) for the scene's Movie Clip and masks; rasterises into work_dir.

    By path: {"kind": "video", "path": clip file, "masks": work_dir/masks, "start", "end", "stride",
    "max_side"}.  Uploaded: {"kind": "upload", "video": name} with the clip's frames and the masks
    in the reference layout (the frames at the clip's size: max_side applies to the by-path route).
    """
    clip = settings_clip(settings)
    masks = settings_masks(settings)
    check_masks(masks)
    start, end, stride = _settings_range(settings)
    indices = frame_indices(clip, start, end, stride)
    work_dir = Path(work_dir)
    name = object_name(Path(clip_source_path(clip)).stem)
    frames_dir = work_dir / "frames" if upload else None
    folders = rasterise(scene, clip, masks, indices, work_dir / "masks", frames_dir)
    if not upload:
        source = {
            "kind": "video",
            "path": clip_source_path(clip),
            "masks": str(work_dir / "masks"),
            "start": indices[0],
            "end": indices[-1] + 1,
            "stride": stride,
            "max_side": int(settings.clip_max_side) or None,
            "name": name,
        }
        return source, None
    uploads: dict[str, bytes] = {}
    for index in indices:
        uploads[f"JPEGImages/{name}/{index:05d}.png"] = (frames_dir / f"{index:05d}.png").read_bytes()
        for obj, folder in folders.items():
            uploads[f"Annotations/{name}/{obj}/{index:05d}.png"] = (folder / f"{index:05d}.png").read_bytes()
    return {"kind": "upload", "video": name}, uploads


def clip_work_dir(settings) -> Path:
    """Where a submission's rasterised masks live: beside the renders, one folder per submission."""
    base = Path(bpy.path.abspath(settings.output_dir or "//dreamscene4d_renders/"))
    if not base.is_absolute() or str(base).startswith("//"):
        base = Path(tempfile.gettempdir()) / "dreamscene4d_renders"
    return Path(tempfile.mkdtemp(prefix="clip_masks_", dir=_ensure(base)))


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def align_scene_to_clip(scene, clip: bpy.types.MovieClip, ds_scene, camera=None) -> None:
    """Make the imported result line up with the clip: the scene's first frame shows the first frame
    used, the frame rate is the clip's, the clip is the scene's active clip and the camera's
    background (so the splats can be compared with the footage through the input camera)."""
    frame_names = ds_scene.meta.get("frame_names") or [f"{i:05d}" for i in range(ds_scene.num_frames)]
    first = int(frame_names[0])
    start = scene_frame(clip, first)
    scene.frame_start = start
    scene.frame_end = start + ds_scene.num_frames - 1
    fps = float(clip.fps) if clip.fps else ds_scene.fps
    scene.render.fps = max(1, round(fps))
    scene.render.fps_base = scene.render.fps / fps
    scene.active_clip = clip
    if camera is not None:
        data = camera.data
        data.show_background_images = True
        background = next((b for b in data.background_images if b.source == "MOVIE_CLIP"), None)
        if background is None:
            background = data.background_images.new()
            background.source = "MOVIE_CLIP"
        background.clip = clip
        background.use_camera_clip = False
        background.frame_method = "FIT"
        background.alpha = 1.0
    scene.frame_set(scene.frame_start)


class _ReferenceView:
    """The settings as build_spec sees them for the run options; the input is replaced afterwards."""

    def __init__(self, settings):
        self._settings = settings

    input_kind = "REFERENCE"
    data_root = video = "clip"

    def __getattr__(self, name):
        return getattr(self._settings, name)


def submit_request(scene, settings) -> tuple[dict, dict | None]:
    """(spec, uploads or None) for a Movie Clip input: the panel's run options, the masks rasterised."""
    from .backend_link import build_spec

    spec = build_spec(_ReferenceView(settings))
    spec["input"], uploads = build_clip_input(
        scene, settings, clip_work_dir(settings), settings.upload_inputs
    )
    return spec, uploads


def finish_import(scene, settings, ds_scene):
    """After importing a Movie Clip job: input camera with the clip as background, scene timed to the clip."""
    from . import camera_paths

    clip = settings.movie_clip
    if settings.input_kind != "CLIP" or clip is None:
        return None
    camera = camera_paths.create_input_camera(scene, ds_scene)
    if scene.camera is None:
        scene.camera = camera
    align_scene_to_clip(scene, clip, ds_scene, camera)
    labels = [entry_label((item.mask, item.layer)) for item in settings.clip_masks if item.mask is not None]
    names = {object_name(label): label for label in labels}
    for item in settings.objects:
        if item.name in names:
            item.label = names[item.name]  # the mask's own name, spaces and all
    return camera
