"""The add-on's state: one PropertyGroup on the scene (`scene.dreamscene4d`) and its item types."""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)


def _refresh_object(self, context):
    from . import importer

    importer.apply_visibility(self)
    if context is not None and context.scene is not None:
        importer.update_objects(context.scene, force=True)


def _refresh_splats(self, context):
    from . import importer

    importer.apply_splat_settings(self)


def _refresh_frame(self, context):
    from . import importer

    if context is not None and context.scene is not None:
        importer.update_objects(context.scene, force=True)


class DS4D_ObjectItem(bpy.types.PropertyGroup):
    """One imported DreamScene4D object (item name = object id) and the artist's adjustments."""

    label: StringProperty(name="Name")
    object: PointerProperty(name="Object", type=bpy.types.Object)
    scene_path: StringProperty(name="Scene", subtype="DIR_PATH")
    visible: BoolProperty(name="Visible", default=True, update=_refresh_object)
    depth_scale: FloatProperty(
        name="Depth Scale",
        description="Scale the object's distance from the input camera (and its size), keeping its image footprint",
        default=1.0,
        min=0.05,
        soft_max=5.0,
        update=_refresh_object,
    )
    depth_offset: FloatProperty(
        name="Depth Offset",
        description="Move the object along the ray from the input camera through its centre (scene units)",
        default=0.0,
        soft_min=-5.0,
        soft_max=5.0,
        update=_refresh_object,
    )


class DS4D_JobItem(bpy.types.PropertyGroup):
    """A job known to the backend (item name = job id)."""

    state: StringProperty(name="State")
    label: StringProperty(name="Label")
    progress: FloatProperty(name="Progress", min=0.0, max=1.0, subtype="FACTOR")


class DS4D_ProgressItem(bpy.types.PropertyGroup):
    """Progress of one object and stage of the watched job (item name = "object/stage")."""

    object_id: StringProperty()
    stage: StringProperty()
    phase: StringProperty()
    step: IntProperty()
    total: IntProperty()
    fraction: FloatProperty(min=0.0, max=1.0, subtype="FACTOR")
    eta_s: FloatProperty()
    losses: StringProperty()


class DS4D_MaskItem(bpy.types.PropertyGroup):
    """One object of a Movie Clip input: the Mask data-block drawn over it (its name names the object)."""

    mask: PointerProperty(name="Mask", type=bpy.types.Mask)
    layer: StringProperty(
        name="Layer", description="Only this layer of the Mask is the object (empty: every layer)"
    )


PRESETS = [
    ("full", "Full", "The published settings (GPU)"),
    ("lite", "Lite", "Fewer iterations; a quick look on a GPU"),
    ("cpu-demo", "CPU Demo", "Tiny settings that finish on a CPU"),
]


class DS4D_Settings(bpy.types.PropertyGroup):
    # Input
    input_kind: EnumProperty(
        name="Input",
        items=[
            ("REFERENCE", "Reference Layout", "A root with JPEGImages/<video> and Annotations/<video>"),
            ("FOLDERS", "Folders", "A folder of frames and a folder of per-object masks"),
            ("CLIP", "Movie Clip", "A Movie Clip (or video file) and one Mask data-block per object"),
        ],
    )
    movie_clip: PointerProperty(name="Movie Clip", type=bpy.types.MovieClip)
    video_file: StringProperty(
        name="Video File",
        description="Loaded as a Movie Clip when no Movie Clip is chosen",
        subtype="FILE_PATH",
    )
    clip_masks: CollectionProperty(type=DS4D_MaskItem)
    clip_masks_index: IntProperty()
    clip_frame_start: IntProperty(
        name="First Frame", description="First video frame used (0 = the clip's first frame)", min=0
    )
    clip_frame_end: IntProperty(
        name="End Frame", description="Video frame after the last one used (0 = to the clip's end)", min=0
    )
    clip_stride: IntProperty(name="Stride", description="Use every N-th frame", default=1, min=1)
    clip_max_side: IntProperty(
        name="Max Side",
        description="Scale frames so the longest side is at most this (0 = keep the clip's size)",
        default=0,
        min=0,
    )
    data_root: StringProperty(name="Data Root", subtype="DIR_PATH")
    video: StringProperty(name="Video", description="Video name under the data root")
    frames_dir: StringProperty(name="Frames", subtype="DIR_PATH")
    masks_dir: StringProperty(name="Masks", subtype="DIR_PATH")
    inpainted_dir: StringProperty(name="Inpainted Frames", subtype="DIR_PATH")
    inpainted_masks_dir: StringProperty(name="Inpainted Masks", subtype="DIR_PATH")
    upload_inputs: BoolProperty(
        name="Upload Inputs",
        description="Send the images to the backend (a remote backend that does not share this disk)",
        default=False,
    )
    # Run settings
    preset: EnumProperty(name="Preset", items=PRESETS, default="lite")
    stage1_iters: IntProperty(name="Stage 1 Iterations", description="0 keeps the preset's value", min=0)
    stage2_steps_per_frame: IntProperty(
        name="Stage 2 Steps / Frame", description="0 keeps the preset's value", min=0
    )
    extra_overrides: StringProperty(
        name="Overrides", description="More overrides, comma separated key=value (e.g. stage3.loops=2)"
    )
    guidance_kind: EnumProperty(
        name="Guidance",
        items=[
            ("PRESET", "Preset", "The preset's guidance model"),
            ("NONE", "None", "No diffusion guidance (fast, worse novel views)"),
            ("PATH", "Local Folder", "A Zero123 model folder on the backend's disk"),
            ("HUB", "Hub Id", "A model id the backend can load from its cache"),
        ],
    )
    guidance_path: StringProperty(name="Model Folder", subtype="DIR_PATH")
    guidance_hub_id: StringProperty(name="Hub Id")
    device: EnumProperty(
        name="Device", items=[("auto", "Auto", ""), ("cuda", "CUDA", ""), ("cpu", "CPU", "")], default="auto"
    )
    # Backend connection and the watched job (written by the poller on the main thread)
    connected: BoolProperty(name="Connected")
    connection_message: StringProperty(name="Connection")
    backend_device: StringProperty(name="Backend Device")
    job_id: StringProperty(name="Job")
    job_state: StringProperty(name="State")
    job_message: StringProperty(name="Message")
    progress: CollectionProperty(type=DS4D_ProgressItem)
    jobs: CollectionProperty(type=DS4D_JobItem)
    jobs_index: IntProperty()
    # Imported scene
    scene_path: StringProperty(name="Scene Folder", subtype="DIR_PATH")
    scene_job_id: StringProperty(name="Scene Job", description="The backend job the imported scene came from")
    import_path: StringProperty(
        name="Import", description="A scene folder (with scene.json)", subtype="DIR_PATH"
    )
    objects: CollectionProperty(type=DS4D_ObjectItem)
    objects_index: IntProperty()
    splat_size: FloatProperty(
        name="Splat Size",
        description="Splat radius as a multiple of each Gaussian's scale",
        default=1.5,
        min=0.0,
        update=_refresh_splats,
    )
    splat_shape: EnumProperty(
        name="Shape",
        items=[
            ("POINTS", "Points", "Round point-cloud splats (fast; Cycles and EEVEE)"),
            ("ELLIPSOIDS", "Ellipsoids", "Rotated, scaled ellipsoid instances (closer to the Gaussians)"),
        ],
        update=_refresh_splats,
    )
    loop_motion: BoolProperty(
        name="Loop Motion",
        description="Frames past the end start the motion again",
        default=True,
        update=_refresh_frame,
    )
    path_loops: IntProperty(
        name="Path Loops", description="Camera paths last the video looped this many times", default=5, min=1
    )
    output_dir: StringProperty(name="Output", subtype="DIR_PATH", default="//dreamscene4d_renders/")


classes = (DS4D_ObjectItem, DS4D_JobItem, DS4D_ProgressItem, DS4D_MaskItem, DS4D_Settings)


def register_properties() -> None:
    bpy.types.Scene.dreamscene4d = PointerProperty(type=DS4D_Settings)


def unregister_properties() -> None:
    del bpy.types.Scene.dreamscene4d
