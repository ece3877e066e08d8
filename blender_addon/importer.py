"""Import a DreamScene4D scene as animated Gaussian point clouds.

One collection per scene; one mesh object per DreamScene4D object whose vertices are the
Gaussians, with point attributes `opacity` (float), `scale` (linear, vector), `rotation`
(quaternion) and `splat_color` (linear RGB with the opacity in alpha).  A geometry-nodes modifier turns
the vertices into splats (spheres as a point cloud, or rotated ellipsoid instances) with a material
that reads `splat_color`; both Cycles and EEVEE render them and the viewport shows them.

Motion: the per-frame arrays stay memory-mapped in the scene's .npz files; a frame-change handler
writes the current frame's positions, scales and rotations into the meshes with foreach_set, so
playback, scrubbing and renders show the motion without baking keyframes.
"""

from __future__ import annotations

import math
from pathlib import Path

import bpy
import numpy as np
from bpy.app.handlers import persistent

from ._shared import coords, scene_format

NODE_GROUP_NAME = "DreamScene4D Splats"
MATERIAL_NAME = "DreamScene4D Splat"
SCENE_PATH_KEY = "ds4d_scene_path"
OBJECT_ID_KEY = "ds4d_object_id"
# Not plain "color": Cycles does not hand an attribute of that name to shaders on point clouds.
COLOR_ATTRIBUTE = "splat_color"
# Per splat, k in exp(-k (1 - cos^2)): the Gaussian's fall-off across the sphere or ellipsoid that
# stands in for it (written by the node group from its Size input).
FALLOFF_ATTRIBUTE = "splat_falloff"

# Scene folder -> Scene with memory-mapped arrays.  Rebuilt lazily after a .blend is reopened.
_loaded_scenes: dict[str, scene_format.Scene] = {}
# Object name -> key of what its mesh holds now, so repeated handler calls at one frame are free.
_written_state: dict[str, tuple] = {}


def load_scene(path: str | Path) -> scene_format.Scene:
    key = str(Path(bpy.path.abspath(str(path))).resolve())
    scene = _loaded_scenes.get(key)
    if scene is None:
        scene = scene_format.read_scene(key)
        _loaded_scenes[key] = scene
    return scene


def forget_loaded_scenes() -> None:
    _loaded_scenes.clear()
    _written_state.clear()


def srgb_to_linear(colors: np.ndarray) -> np.ndarray:
    """Display colours to Blender's linear scene colours (the Standard view transform undoes this)."""
    c = np.clip(colors, 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _link(tree, from_socket, to_socket):
    tree.links.new(from_socket, to_socket)


def _math(tree, operation: str, a, b=None):
    """A Math node on sockets or constants; returns its output socket."""
    node = tree.nodes.new("ShaderNodeMath")
    node.operation = operation
    for index, value in enumerate((a, b)):
        if value is None:
            continue
        if isinstance(value, int | float):
            node.inputs[index].default_value = float(value)
        else:
            _link(tree, value, node.inputs[index])
    return node.outputs["Value"]


def _sum_of_lookups(tree, attribute: str, output: str):
    """The attribute as the splat carries it: on the point itself, or on the instancer of an
    ellipsoid.  A lookup that does not apply returns zero, so the sum is the one that does."""
    on_geometry = tree.nodes.new("ShaderNodeAttribute")
    on_geometry.attribute_type, on_geometry.attribute_name = "GEOMETRY", attribute
    on_instancer = tree.nodes.new("ShaderNodeAttribute")
    on_instancer.attribute_type, on_instancer.attribute_name = "INSTANCER", attribute
    return _math(tree, "ADD", on_geometry.outputs[output], on_instancer.outputs[output])


def ensure_splat_material() -> bpy.types.Material:
    """Emission coloured by the `splat_color` attribute, mixed with transparency by its alpha (the
    opacity), which in Cycles falls off across the splat as its Gaussian does."""
    material = bpy.data.materials.get(MATERIAL_NAME)
    if material is not None:
        return material
    material = bpy.data.materials.new(MATERIAL_NAME)
    if bpy.app.version < (5, 0, 0):  # node trees are always on from 5.0 (the flag is deprecated)
        material.use_nodes = True
    if hasattr(material, "surface_render_method"):  # EEVEE (4.2+): sort and blend the splats
        material.surface_render_method = "BLENDED"
    tree = material.node_tree
    tree.nodes.clear()
    # Points carry the attribute on their own geometry; ellipsoid instances get it from the
    # instancer.  A lookup that does not apply returns zero, so the sum is the one that does.
    on_geometry = tree.nodes.new("ShaderNodeAttribute")
    on_geometry.attribute_type, on_geometry.attribute_name = "GEOMETRY", COLOR_ATTRIBUTE
    on_instancer = tree.nodes.new("ShaderNodeAttribute")
    on_instancer.attribute_type, on_instancer.attribute_name = "INSTANCER", COLOR_ATTRIBUTE
    color_sum = tree.nodes.new("ShaderNodeVectorMath")
    color_sum.operation = "ADD"
    _link(tree, on_geometry.outputs["Color"], color_sum.inputs[0])
    _link(tree, on_instancer.outputs["Color"], color_sum.inputs[1])
    alpha_sum = tree.nodes.new("ShaderNodeMath")
    alpha_sum.operation, alpha_sum.use_clamp = "ADD", True
    _link(tree, on_geometry.outputs["Alpha"], alpha_sum.inputs[0])
    _link(tree, on_instancer.outputs["Alpha"], alpha_sum.inputs[1])
    # A splat is a sphere (or ellipsoid) of radius Size x sigma.  A point seen at distance r from
    # its centre on screen lies where cos(normal, view)^2 = 1 - (r / radius)^2, so
    # exp(-k (1 - cos^2)) with k = Size^2 / 2 is the Gaussian's exp(-r^2 / (2 sigma^2)): faint
    # wide Gaussians fade out towards their rim instead of showing as solid discs.
    falloff = _sum_of_lookups(tree, FALLOFF_ATTRIBUTE, "Fac")
    geometry = tree.nodes.new("ShaderNodeNewGeometry")
    cosine = tree.nodes.new("ShaderNodeVectorMath")
    cosine.operation = "DOT_PRODUCT"
    _link(tree, geometry.outputs["Normal"], cosine.inputs[0])
    _link(tree, geometry.outputs["Incoming"], cosine.inputs[1])
    cos2 = _math(tree, "MULTIPLY", cosine.outputs["Value"], cosine.outputs["Value"])
    sin2 = _math(tree, "SUBTRACT", 1.0, cos2)
    exponent = _math(tree, "MULTIPLY", _math(tree, "MULTIPLY", sin2, falloff), -1.0)
    weight = _math(tree, "EXPONENT", exponent)
    alpha = _math(tree, "MULTIPLY", alpha_sum.outputs["Value"], weight)
    emission = tree.nodes.new("ShaderNodeEmission")
    _link(tree, color_sum.outputs["Vector"], emission.inputs["Color"])
    transparent = tree.nodes.new("ShaderNodeBsdfTransparent")
    # Cycles shades a point as a true sphere, so the fall-off applies there.  EEVEE draws points
    # as flat camera-facing shapes whose normals do not follow a sphere (the fall-off there cut
    # the covered area: IoU with the Gaussians' alpha-0.5 footprint 0.94 -> 0.79), so EEVEE keeps
    # the plain opacity.
    for target, fac in (("CYCLES", alpha), ("EEVEE", alpha_sum.outputs["Value"])):
        mix = tree.nodes.new("ShaderNodeMixShader")
        _link(tree, fac, mix.inputs["Fac"])
        _link(tree, transparent.outputs[0], mix.inputs[1])
        _link(tree, emission.outputs[0], mix.inputs[2])
        output = tree.nodes.new("ShaderNodeOutputMaterial")
        output.target = target
        _link(tree, mix.outputs[0], output.inputs["Surface"])
    return material


def ensure_splat_node_group() -> bpy.types.NodeTree:
    """Geometry nodes: vertices -> splats.  Inputs: Size (x the Gaussian scale), Ellipsoids, Material."""
    group = bpy.data.node_groups.get(NODE_GROUP_NAME)
    if group is not None:
        return group
    group = bpy.data.node_groups.new(NODE_GROUP_NAME, "GeometryNodeTree")
    interface = group.interface
    interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    size = interface.new_socket("Size", in_out="INPUT", socket_type="NodeSocketFloat")
    size.default_value, size.min_value = 1.5, 0.0
    interface.new_socket("Ellipsoids", in_out="INPUT", socket_type="NodeSocketBool")
    interface.new_socket("Material", in_out="INPUT", socket_type="NodeSocketMaterial")
    interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    nodes = group.nodes
    group_in = nodes.new("NodeGroupInput")
    group_out = nodes.new("NodeGroupOutput")

    scale = nodes.new("GeometryNodeInputNamedAttribute")
    scale.data_type = "FLOAT_VECTOR"
    scale.inputs["Name"].default_value = "scale"
    rotation = nodes.new("GeometryNodeInputNamedAttribute")
    rotation.data_type = "QUATERNION"
    rotation.inputs["Name"].default_value = "rotation"

    # Points: a sphere whose radius is the RMS of the three axis scales times Size.
    length = nodes.new("ShaderNodeVectorMath")
    length.operation = "LENGTH"
    _link(group, scale.outputs["Attribute"], length.inputs[0])
    radius = nodes.new("ShaderNodeMath")
    radius.operation = "MULTIPLY"
    _link(group, length.outputs["Value"], radius.inputs[0])
    rms_size = nodes.new("ShaderNodeMath")
    rms_size.operation = "MULTIPLY"
    rms_size.inputs[1].default_value = 1.0 / math.sqrt(3.0)
    _link(group, group_in.outputs["Size"], rms_size.inputs[0])
    _link(group, rms_size.outputs["Value"], radius.inputs[1])
    to_points = nodes.new("GeometryNodeMeshToPoints")
    _link(group, group_in.outputs["Geometry"], to_points.inputs["Mesh"])
    _link(group, radius.outputs["Value"], to_points.inputs["Radius"])

    # Ellipsoids: a unit ico sphere per Gaussian, rotated and scaled by its attributes.
    sphere = nodes.new("GeometryNodeMeshIcoSphere")
    sphere.inputs["Radius"].default_value = 1.0
    sphere.inputs["Subdivisions"].default_value = 1
    axis_scale = nodes.new("ShaderNodeVectorMath")
    axis_scale.operation = "SCALE"
    _link(group, scale.outputs["Attribute"], axis_scale.inputs[0])
    _link(group, group_in.outputs["Size"], axis_scale.inputs["Scale"])
    instances = nodes.new("GeometryNodeInstanceOnPoints")
    _link(group, group_in.outputs["Geometry"], instances.inputs["Points"])
    _link(group, sphere.outputs["Mesh"], instances.inputs["Instance"])
    _link(group, rotation.outputs["Attribute"], instances.inputs["Rotation"])
    _link(group, axis_scale.outputs["Vector"], instances.inputs["Scale"])

    # k = Size^2 / 2 for the material's fall-off, on whichever domain the splats live.
    size_squared = nodes.new("ShaderNodeMath")
    size_squared.operation = "MULTIPLY"
    _link(group, group_in.outputs["Size"], size_squared.inputs[0])
    _link(group, group_in.outputs["Size"], size_squared.inputs[1])
    half = nodes.new("ShaderNodeMath")
    half.operation = "MULTIPLY"
    half.inputs[1].default_value = 0.5
    _link(group, size_squared.outputs["Value"], half.inputs[0])
    stored = {}
    for name, source, domain in (
        ("points", to_points.outputs["Points"], "POINT"),
        ("instances", instances.outputs["Instances"], "INSTANCE"),
    ):
        store = nodes.new("GeometryNodeStoreNamedAttribute")
        store.data_type, store.domain = "FLOAT", domain
        store.inputs["Name"].default_value = FALLOFF_ATTRIBUTE
        _link(group, source, store.inputs["Geometry"])
        _link(group, half.outputs["Value"], store.inputs["Value"])
        stored[name] = store.outputs["Geometry"]

    switch = nodes.new("GeometryNodeSwitch")
    switch.input_type = "GEOMETRY"
    _link(group, group_in.outputs["Ellipsoids"], switch.inputs["Switch"])
    _link(group, stored["points"], switch.inputs["False"])
    _link(group, stored["instances"], switch.inputs["True"])
    set_material = nodes.new("GeometryNodeSetMaterial")
    _link(group, switch.outputs["Output"], set_material.inputs["Geometry"])
    _link(group, group_in.outputs["Material"], set_material.inputs["Material"])
    _link(group, set_material.outputs["Geometry"], group_out.inputs["Geometry"])
    return group


def _set_modifier_input(modifier, name: str, value) -> None:
    for item in modifier.node_group.interface.items_tree:
        if getattr(item, "in_out", None) == "INPUT" and item.name == name:
            modifier[item.identifier] = value
            return
    raise KeyError(name)


def frame_index(blender_frame: int, frame_start: int, num_frames: int, loop: bool) -> int:
    """Scene frame shown at a Blender frame: frame_start shows frame 0; later frames loop or hold."""
    offset = blender_frame - frame_start
    if loop:
        return offset % num_frames
    return min(max(offset, 0), num_frames - 1)


def _adjustments(settings, object_id: str) -> tuple[float, float]:
    item = settings.objects.get(object_id) if settings is not None else None
    if item is None:
        return 1.0, 0.0
    return float(item.depth_scale), float(item.depth_offset)


def write_frame(
    obj: bpy.types.Object, ds_scene: scene_format.Scene, t: int, depth_scale: float, depth_offset: float
):
    """Write frame t of the object's Gaussians (converted to Blender's world) into its mesh."""
    object_id = obj[OBJECT_ID_KEY]
    arrays = ds_scene.objects[object_id]
    means, scales = coords.apply_depth_adjustment(
        np.asarray(arrays["means"][t]),
        np.asarray(arrays["scales"][t]),
        ds_scene.viewmat,
        depth_scale,
        depth_offset,
    )
    mesh = obj.data
    positions = coords.points_to_blender(np.asarray(means, dtype=np.float32))
    mesh.attributes["position"].data.foreach_set("vector", positions.ravel())
    mesh.attributes["scale"].data.foreach_set(
        "vector", np.ascontiguousarray(scales, dtype=np.float32).ravel()
    )
    rotations = coords.quats_to_blender(np.asarray(arrays["quats"][t], dtype=np.float32))
    mesh.attributes["rotation"].data.foreach_set("value", np.ascontiguousarray(rotations).ravel())
    mesh.update()


def update_objects(scene: bpy.types.Scene, force: bool = False) -> int:
    """Bring every imported object of this Blender scene to its current frame; returns how many changed."""
    settings = getattr(scene, "dreamscene4d", None)
    loop = bool(settings.loop_motion) if settings is not None else True
    changed = 0
    for obj in scene.objects:
        object_id = obj.get(OBJECT_ID_KEY)
        path = obj.get(SCENE_PATH_KEY)
        if object_id is None or path is None or obj.type != "MESH":
            continue
        try:
            ds_scene = load_scene(path)
        except scene_format.SceneFormatError as error:
            print(f"DreamScene4D: cannot animate {obj.name}: {error}")
            continue
        t = frame_index(scene.frame_current, scene.frame_start, ds_scene.num_frames, loop)
        depth_scale, depth_offset = _adjustments(settings, object_id)
        state = (id(ds_scene), obj.data.as_pointer(), t, depth_scale, depth_offset)
        if not force and _written_state.get(obj.name) == state:
            continue
        write_frame(obj, ds_scene, t, depth_scale, depth_offset)
        _written_state[obj.name] = state
        changed += 1
    return changed


@persistent
def on_frame_change(scene, depsgraph=None):
    # frame_change_pre: the meshes hold the new frame before the depsgraph evaluates it, so
    # final renders of animations see the motion too, not only the viewport.
    update_objects(scene)


@persistent
def on_load_post(*_args):
    forget_loaded_scenes()  # a reopened .blend maps its scenes again on the next frame change


def _new_point_mesh(name: str, count: int) -> bpy.types.Mesh:
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(count)
    for attribute, data_type in (
        ("opacity", "FLOAT"),
        ("scale", "FLOAT_VECTOR"),
        ("rotation", "QUATERNION"),
        (COLOR_ATTRIBUTE, "FLOAT_COLOR"),
    ):
        mesh.attributes.new(attribute, data_type, "POINT")
    return mesh


def import_scene(context, path: str | Path, name: str | None = None) -> bpy.types.Collection:
    """Import the scene folder (or scene.json) at path into context.scene; returns the new collection."""
    ds_scene = load_scene(path)
    scene = context.scene
    settings = scene.dreamscene4d
    folder = str(ds_scene.path)
    collection = bpy.data.collections.new(name or f"DreamScene4D {ds_scene.path.name}")
    collection[SCENE_PATH_KEY] = folder
    scene.collection.children.link(collection)
    group = ensure_splat_node_group()
    material = ensure_splat_material()

    for entry in ds_scene.meta["objects"]:
        object_id = entry["id"]
        arrays = ds_scene.objects[object_id]
        count = int(arrays["means"].shape[1])
        mesh = _new_point_mesh(f"DS4D {entry.get('name', object_id)}", count)
        opacities = np.ascontiguousarray(arrays["opacities"], dtype=np.float32)
        mesh.attributes["opacity"].data.foreach_set("value", opacities)
        rgba = np.empty((count, 4), dtype=np.float32)
        rgba[:, :3] = srgb_to_linear(np.asarray(arrays["colors"]))
        rgba[:, 3] = opacities
        mesh.attributes[COLOR_ATTRIBUTE].data.foreach_set("color", rgba.ravel())
        mesh.materials.append(material)
        obj = bpy.data.objects.new(mesh.name, mesh)
        obj[OBJECT_ID_KEY] = object_id
        obj[SCENE_PATH_KEY] = folder
        collection.objects.link(obj)
        modifier = obj.modifiers.new("Splats", "NODES")
        modifier.node_group = group
        _set_modifier_input(modifier, "Size", float(settings.splat_size))
        _set_modifier_input(modifier, "Ellipsoids", settings.splat_shape == "ELLIPSOIDS")
        _set_modifier_input(modifier, "Material", material)

        item = settings.objects.get(object_id)
        if item is None:
            item = settings.objects.add()
            item.name = object_id
        item.label = str(entry.get("name", object_id))
        item.object = obj
        item.scene_path = folder
        write_frame(obj, ds_scene, 0, *_adjustments(settings, object_id))

    settings.scene_path = folder
    scene.frame_start = 1
    scene.frame_end = ds_scene.num_frames
    scene.render.fps = max(1, round(ds_scene.fps))
    scene.render.fps_base = scene.render.fps / ds_scene.fps if ds_scene.fps > 0 else 1.0
    width, height = ds_scene.image_size
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    # Splat colours are display colours: show them as they are, not through Filmic/AgX.
    scene.view_settings.view_transform = "Standard"
    scene.frame_set(scene.frame_start)
    update_objects(scene, force=True)
    return collection


def apply_visibility(item) -> None:
    obj = item.object
    if obj is not None:
        obj.hide_viewport = not item.visible
        obj.hide_render = not item.visible


def apply_splat_settings(settings) -> None:
    for item in settings.objects:
        obj = item.object
        if obj is None:
            continue
        for modifier in obj.modifiers:
            if (
                modifier.type == "NODES"
                and modifier.node_group is not None
                and modifier.node_group.name.startswith(NODE_GROUP_NAME)
            ):
                _set_modifier_input(modifier, "Size", float(settings.splat_size))
                _set_modifier_input(modifier, "Ellipsoids", settings.splat_shape == "ELLIPSOIDS")
                obj.update_tag()


handlers = ((bpy.app.handlers.frame_change_pre, on_frame_change), (bpy.app.handlers.load_post, on_load_post))


def register_handlers() -> None:
    for handler_list, function in handlers:
        if function not in handler_list:
            handler_list.append(function)


def unregister_handlers() -> None:
    for handler_list, function in handlers:
        while function in handler_list:
            handler_list.remove(function)
    forget_loaded_scenes()
