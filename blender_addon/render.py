"""Rendering camera paths: with Blender's own engine, or as PNG frames returned by the backend."""

from __future__ import annotations

from pathlib import Path

import bpy


def render_animation(
    scene: bpy.types.Scene, camera_obj, out_dir: str | Path, frame_start: int, frame_end: int
):
    """Render frames [start, end] from camera_obj into out_dir/NNNN.png with the scene's engine."""
    out_dir = Path(bpy.path.abspath(str(out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    render = scene.render
    saved = (
        scene.camera,
        render.filepath,
        scene.frame_start,
        scene.frame_end,
        render.image_settings.file_format,
    )
    try:
        scene.camera = camera_obj
        render.filepath = str(out_dir / "####")
        render.image_settings.file_format = "PNG"
        scene.frame_start, scene.frame_end = frame_start, frame_end
        bpy.ops.render.render(animation=True, scene=scene.name)
    finally:
        (
            scene.camera,
            render.filepath,
            scene.frame_start,
            scene.frame_end,
            render.image_settings.file_format,
        ) = saved
    return sorted(out_dir.glob("*.png"))


def write_frames(frames: list[bytes], out_dir: str | Path, prefix: str = "") -> list[Path]:
    out_dir = Path(bpy.path.abspath(str(out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(frames):
        path = out_dir / f"{prefix}{i:04d}.png"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _strips(sequence_editor):
    # Blender 5.0 renamed sequences -> strips.
    return sequence_editor.strips if hasattr(sequence_editor, "strips") else sequence_editor.sequences


def write_movie(image_paths: list[Path], movie_path: str | Path, fps: float) -> Path | None:
    """Encode an image sequence as an H.264 MP4 with Blender's sequencer; None when ffmpeg is not built in."""
    if not image_paths or not bpy.app.build_options.codec_ffmpeg:
        return None
    movie_path = Path(bpy.path.abspath(str(movie_path)))
    movie_path.parent.mkdir(parents=True, exist_ok=True)
    scene = bpy.data.scenes.new("DS4D movie")
    try:
        first = bpy.data.images.load(str(image_paths[0]))
        width, height = first.size
        bpy.data.images.remove(first)
        scene.render.resolution_x, scene.render.resolution_y = width - width % 2, height - height % 2
        scene.render.resolution_percentage = 100
        scene.render.fps = max(1, round(fps))
        editor = scene.sequence_editor_create()
        strip = _strips(editor).new_image("frames", str(image_paths[0]), channel=1, frame_start=1)
        for path in image_paths[1:]:
            strip.elements.append(path.name)
        scene.frame_start, scene.frame_end = 1, len(image_paths)
        settings = scene.render.image_settings
        if hasattr(settings, "media_type"):  # Blender 5.0: pick "video" before the container
            settings.media_type = "VIDEO"
        settings.file_format = "FFMPEG"
        scene.render.ffmpeg.format = "MPEG4"
        scene.render.ffmpeg.codec = "H264"
        scene.render.filepath = str(movie_path)
        scene.render.use_file_extension = False
        bpy.ops.render.render(animation=True, scene=scene.name)
    finally:
        bpy.data.scenes.remove(scene)
    return movie_path if movie_path.exists() else None
