"""Renders a SyntheticScene with Blender's Cycles on the CPU (the `bpy` module from PyPI).

Cycles rather than EEVEE: headless EEVEE falls back to software OpenGL here and took ~14 s for a
384x256 frame, Cycles ~0.1 s.  The look is kept noise-free at few samples: only direct light from
a sun with a hard shadow (no bounces, no world lighting) plus a flat emission of a fraction of the
albedo; the samples only anti-alias edges.  The film is transparent, so every render carries its
own coverage in alpha and the backdrop is composited afterwards.

The input view additionally writes the Z (camera-axis depth) and object-index passes through a
compositor File Output node into a float EXR, read back through bpy's image loader.

All geometry arrives in the method's world and is converted once, through shared/coords.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import bpy
import numpy as np

from backend.synthetic.spec import SyntheticObject, SyntheticScene
from shared.coords import BACKEND_TO_BLENDER, blender_lens_from_K, viewmat_to_blender_matrix_world


def _to_matrix(m: np.ndarray):
    """numpy 4x4 -> mathutils.Matrix (rows); bpy reads a plain nested list column by column."""
    from mathutils import Matrix

    return Matrix(np.asarray(m, dtype=np.float64).tolist())


def _blender_matrix(pose: np.ndarray):
    """Object local->world in the method's world -> Blender matrix_world.

    Meshes are built in Blender axes of the object-local frame (W @ local), so the Blender matrix
    is W @ pose @ W^-1 with W the world rotation.
    """
    W = np.eye(4)
    W[:3, :3] = BACKEND_TO_BLENDER
    return _to_matrix(W @ pose @ W.T)


ANTIALIAS_FILTER_WIDTH = 1.5  # Blackman-Harris, Blender's default
PIXEL_CENTRE_FILTER_WIDTH = 0.01  # the smallest Blender allows: every sample through the pixel centre


def _read_exr(path: Path) -> np.ndarray:
    """Float RGBA [H, W, 4] of an EXR file (top row first); the file is removed after reading."""
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        pixels = np.empty(width * height * 4, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    os.remove(path)
    # Blender images are stored bottom row first.
    return pixels.reshape(height, width, 4)[::-1]


def encode_srgb_rgba(linear_premultiplied: np.ndarray) -> np.ndarray:
    """Linear, premultiplied float RGBA -> 8-bit sRGB with straight alpha (what a PNG holds)."""
    alpha = np.clip(linear_premultiplied[..., 3:4].astype(np.float64), 0.0, 1.0)
    rgb = np.where(alpha > 0, linear_premultiplied[..., :3] / np.maximum(alpha, 1e-12), 0.0)
    rgb = np.clip(rgb, 0.0, 1.0)
    srgb = np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)
    out = np.concatenate([srgb, alpha], axis=-1)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


class BlenderRenderer:
    def __init__(self, scene: SyntheticScene, samples: int = 16):
        self.spec = scene
        self.samples = samples
        self._tmp = Path(tempfile.mkdtemp(prefix="synthetic_render_"))
        bpy.ops.wm.read_factory_settings(use_empty=True)
        self.scene = bpy.context.scene
        self._setup_render(samples)
        self._objects = {
            obj.object_id: self._add_object(obj, index + 1) for index, obj in enumerate(scene.objects)
        }
        self._add_sun()
        cam_data = bpy.data.cameras.new("camera")
        cam_data.clip_start, cam_data.clip_end = 0.01, 100.0
        self.camera = bpy.data.objects.new("camera", cam_data)
        self.scene.collection.objects.link(self.camera)
        self.scene.camera = self.camera
        self._passes_node = self._setup_passes_output()

    # ---- scene construction -------------------------------------------------------------------
    def _setup_render(self, samples: int) -> None:
        sc = self.scene
        sc.render.engine = "CYCLES"
        sc.cycles.device = "CPU"
        sc.cycles.samples = samples
        sc.cycles.use_adaptive_sampling = False
        sc.cycles.pixel_filter_type = "BLACKMAN_HARRIS"
        sc.cycles.use_denoising = False
        sc.cycles.seed = 0
        sc.cycles.use_animated_seed = False
        sc.cycles.max_bounces = 0
        sc.cycles.caustics_reflective = False
        sc.cycles.caustics_refractive = False
        sc.render.film_transparent = True
        sc.render.dither_intensity = 0.0  # dithering adds noise to 8-bit output, and per-run noise at that
        sc.render.use_persistent_data = True
        sc.render.resolution_percentage = 100
        # Linear float out, encoded to 8-bit sRGB here: Blender's own 8-bit path rounds a pixel
        # differently now and then from one process to the next, which breaks byte-identical output.
        sc.render.image_settings.media_type = "IMAGE"
        sc.render.image_settings.file_format = "OPEN_EXR"
        sc.render.image_settings.color_mode = "RGBA"
        sc.render.image_settings.color_depth = "32"
        sc.render.image_settings.exr_codec = "ZIP"
        sc.view_settings.view_transform = "Standard"
        sc.view_settings.look = "None"
        world = bpy.data.worlds.new("world")
        world.color = (0.0, 0.0, 0.0)
        sc.world = world
        layer = sc.view_layers[0]
        layer.use_pass_z = True
        layer.use_pass_object_index = True

    def _material(self, obj: SyntheticObject) -> bpy.types.Material:
        mat = bpy.data.materials.new(f"mat_{obj.object_id}")
        # The emission is a flat ambient term, not a light: sampling it as one would add noise to
        # every surface it faces.
        mat.cycles.emission_sampling = "NONE"
        tree = mat.node_tree if mat.node_tree is not None else None
        if tree is None:
            mat.use_nodes = True
            tree = mat.node_tree
        nodes, links = tree.nodes, tree.links
        nodes.clear()
        coords = nodes.new("ShaderNodeTexCoord")
        mix = nodes.new("ShaderNodeMix")
        mix.data_type = "RGBA"
        mix.inputs["A"].default_value = (*obj.colors[0], 1.0)
        mix.inputs["B"].default_value = (*obj.colors[1], 1.0)
        if obj.pattern == "checker":
            checker = nodes.new("ShaderNodeTexChecker")
            checker.inputs["Scale"].default_value = obj.pattern_scale
            checker.inputs["Color1"].default_value = (1.0, 1.0, 1.0, 1.0)
            checker.inputs["Color2"].default_value = (0.0, 0.0, 0.0, 1.0)
            # Offset the lattice so that the cube's faces do not sit on a cell boundary.
            shift = nodes.new("ShaderNodeVectorMath")
            shift.operation = "ADD"
            shift.inputs[1].default_value = (0.013, 0.021, 0.017)
            links.new(coords.outputs["Object"], shift.inputs[0])
            links.new(shift.outputs["Vector"], checker.inputs["Vector"])
            links.new(checker.outputs["Fac"], mix.inputs["Factor"])
        else:
            # Bands across the object-local x axis: sin(scale * x) > 0.
            split = nodes.new("ShaderNodeSeparateXYZ")
            wave = nodes.new("ShaderNodeMath")
            wave.operation = "SINE"
            scale = nodes.new("ShaderNodeMath")
            scale.operation = "MULTIPLY"
            scale.inputs[1].default_value = obj.pattern_scale
            step = nodes.new("ShaderNodeMath")
            step.operation = "GREATER_THAN"
            step.inputs[1].default_value = 0.0
            links.new(coords.outputs["Object"], split.inputs["Vector"])
            links.new(split.outputs["X"], scale.inputs[0])
            links.new(scale.outputs["Value"], wave.inputs[0])
            links.new(wave.outputs["Value"], step.inputs[0])
            links.new(step.outputs["Value"], mix.inputs["Factor"])
        diffuse = nodes.new("ShaderNodeBsdfDiffuse")
        emission = nodes.new("ShaderNodeEmission")
        emission.inputs["Strength"].default_value = self.spec.ambient
        add = nodes.new("ShaderNodeAddShader")
        out = nodes.new("ShaderNodeOutputMaterial")
        links.new(mix.outputs["Result"], diffuse.inputs["Color"])
        links.new(mix.outputs["Result"], emission.inputs["Color"])
        links.new(diffuse.outputs["BSDF"], add.inputs[0])
        links.new(emission.outputs["Emission"], add.inputs[1])
        links.new(add.outputs["Shader"], out.inputs["Surface"])
        return mat

    def _add_object(self, obj: SyntheticObject, pass_index: int) -> bpy.types.Object:
        import bmesh

        mesh = bpy.data.meshes.new(f"mesh_{obj.object_id}")
        bm = bmesh.new()
        if obj.shape == "cube":
            bmesh.ops.create_cube(bm, size=obj.size)
        elif obj.shape == "sphere":
            bmesh.ops.create_uvsphere(bm, u_segments=64, v_segments=32, radius=obj.size)
            for face in bm.faces:
                face.smooth = True
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
        bm.to_mesh(mesh)
        bm.free()
        mesh.materials.append(self._material(obj))
        blender_obj = bpy.data.objects.new(f"object_{obj.object_id}", mesh)
        blender_obj.pass_index = pass_index
        self.scene.collection.objects.link(blender_obj)
        return blender_obj

    def _add_sun(self) -> None:
        sun = bpy.data.lights.new("sun", "SUN")
        sun.energy = 1.6  # diffuse radiance 0.51 albedo cos(theta): shading without dark sides
        sun.angle = 0.0  # hard shadow: no penumbra to sample, so no noise
        sun_obj = bpy.data.objects.new("sun", sun)
        direction = BACKEND_TO_BLENDER @ np.asarray(self.spec.sun_direction, dtype=np.float64)
        direction = direction / np.linalg.norm(direction)
        # A sun shines along its local -Z: point local +Z at the light.
        sun_obj.rotation_mode = "QUATERNION"
        from mathutils import Vector

        sun_obj.rotation_quaternion = Vector(direction.tolist()).to_track_quat("Z", "Y")
        self.scene.collection.objects.link(sun_obj)

    def _setup_passes_output(self):
        tree = bpy.data.node_groups.new("passes", "CompositorNodeTree")
        self.scene.compositing_node_group = tree
        layers = tree.nodes.new("CompositorNodeRLayers")
        combine = tree.nodes.new("CompositorNodeCombineColor")
        out = tree.nodes.new("CompositorNodeOutputFile")
        out.directory = str(self._tmp)
        out.file_name = "passes_"
        out.format.media_type = "IMAGE"
        out.format.file_format = "OPEN_EXR"
        out.format.color_depth = "32"
        out.format.exr_codec = "ZIP"
        out.file_output_items.new("RGBA", "zi")
        tree.links.new(layers.outputs["Depth"], combine.inputs["Red"])
        tree.links.new(layers.outputs["Object Index"], combine.inputs["Green"])
        tree.links.new(combine.outputs[0], out.inputs[0])
        return out

    # ---- rendering ----------------------------------------------------------------------------
    def set_frame(self, t: int, visible: list[str] | None = None) -> None:
        for obj in self.spec.objects:
            blender_obj = self._objects[obj.object_id]
            blender_obj.matrix_world = _blender_matrix(obj.poses[t])
            blender_obj.hide_render = visible is not None and obj.object_id not in visible

    def set_camera(self, viewmat: np.ndarray, K: np.ndarray, width: int, height: int) -> None:
        lens = blender_lens_from_K(K, width, height)
        data = self.camera.data
        data.sensor_fit = lens["sensor_fit"]
        data.sensor_width = lens["sensor_width"]
        data.sensor_height = lens["sensor_height"]
        data.lens = lens["lens"]
        data.shift_x, data.shift_y = lens["shift_x"], lens["shift_y"]
        self.scene.render.pixel_aspect_x = lens["pixel_aspect_x"]
        self.scene.render.pixel_aspect_y = lens["pixel_aspect_y"]
        self.scene.render.resolution_x, self.scene.render.resolution_y = width, height
        self.camera.matrix_world = _to_matrix(viewmat_to_blender_matrix_world(viewmat))

    def _render(self, samples: int, with_passes: bool, filter_width: float) -> np.ndarray:
        self.scene.cycles.samples = samples
        self.scene.cycles.filter_width = filter_width
        self.scene.render.use_compositing = with_passes
        self._passes_node.mute = not with_passes
        beauty_path = self._tmp / "beauty.exr"
        self.scene.render.filepath = str(beauty_path)
        bpy.ops.render.render(write_still=True)
        return _read_exr(beauty_path)

    def render_rgba(self, samples: int | None = None) -> np.ndarray:
        """Render the current setup -> RGBA uint8 [H, W, 4] (sRGB, straight alpha), anti-aliased."""
        linear = self._render(self.samples if samples is None else samples, False, ANTIALIAS_FILTER_WIDTH)
        return encode_srgb_rgba(linear)

    def render_passes(self) -> tuple[np.ndarray, np.ndarray]:
        """Depth [H, W] (camera-axis distance, inf where nothing was hit) and object index [H, W].

        The index is the object's 1-based position in the scene's object list (0 = nothing).  One
        sample through each pixel's centre (a box filter of ~zero width): the masks are then what
        a rasteriser gives, and a pixel's depth belongs to the ray through its centre, which is
        where the point tracks unproject their queries.
        """
        self._render(1, True, PIXEL_CENTRE_FILTER_WIDTH)
        pixels = _read_exr(self._tmp / "passes_zi.exr")
        depth = pixels[..., 0].astype(np.float64)
        depth[depth >= 1e9] = np.inf
        index = np.rint(pixels[..., 1]).astype(np.int32)
        return depth, index

    def close(self) -> None:
        for path in self._tmp.glob("*"):
            path.unlink()
        self._tmp.rmdir()
