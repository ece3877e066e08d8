"""The Blender extension with the bpy module (CPU): registration, import, motion, cameras, renders.

Scenes are written with shared.scene from synthetic Gaussians whose projections are known, so
every check compares Blender against an independent numpy pinhole in the backend's conventions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

import blender_addon  # noqa: E402
from blender_addon import camera_paths, importer  # noqa: E402
from shared.scene import write_scene  # noqa: E402

WIDTH, HEIGHT = 80, 60
T = 4


def pinhole_K(width=WIDTH, height=HEIGHT, fx=70.0, fy=70.0, cx=None, cy=None) -> np.ndarray:
    cx = 0.5 * width if cx is None else cx
    cy = 0.5 * height if cy is None else cy
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def reference_viewmat(radius=2.0) -> np.ndarray:
    # The reference camera: at (0, 0, r) in the +Y-up world looking at the origin, OpenCV axes
    # (x right, y down, z forward), written out here instead of taken from the code under test.
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = [1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, radius]
    return np.linalg.inv(c2w)


def project(points: np.ndarray, viewmat: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:3], cam[:, 2]


def blob(rng, center, count, sigma, motion, color):
    base = center + rng.normal(scale=sigma, size=(count, 3))
    means = np.stack([base + t * np.asarray(motion) for t in range(T)]).astype(np.float32)
    quats = rng.normal(size=(T, count, 4)).astype(np.float32)
    return {
        "means": means,
        "quats": quats / np.linalg.norm(quats, axis=-1, keepdims=True),
        "scales": np.full((T, count, 3), 0.03, dtype=np.float32),
        "opacities": np.full(count, 0.99, dtype=np.float32),
        "colors": np.tile(np.asarray(color, dtype=np.float32), (count, 1)),
    }


@pytest.fixture(scope="module")
def registered():
    blender_addon.register()
    yield
    blender_addon.unregister()


@pytest.fixture
def blank(registered):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    importer.forget_loaded_scenes()
    yield bpy.context.scene


@pytest.fixture
def scene_dir(tmp_path):
    rng = np.random.default_rng(0)
    objects = {
        "001": blob(rng, [-0.35, 0.1, 0.0], 400, 0.12, [0.05, 0.0, 0.0], [0.9, 0.1, 0.1]),
        "002": blob(rng, [0.4, -0.15, -0.3], 250, 0.1, [0.0, 0.04, 0.0], [0.1, 0.2, 0.9]),
    }
    meta = {
        "fps": 10.0,
        "image_size": [WIDTH, HEIGHT],
        "camera": {"K": pinhole_K().tolist(), "viewmat": reference_viewmat().tolist()},
        "orbit_center": [0.0, 0.0, 0.0],
        "object_names": {"001": "red", "002": "blue"},
    }
    write_scene(tmp_path, meta, objects)
    return tmp_path, objects, meta


def mesh_positions(obj) -> np.ndarray:
    data = np.empty(len(obj.data.vertices) * 3, dtype=np.float32)
    obj.data.attributes["position"].data.foreach_get("vector", data)
    return data.reshape(-1, 3)


def test_register_unregister_register_leaves_nothing_behind():
    before = {name for name in dir(bpy.types) if name.startswith(("DREAMSCENE4D", "DS4D"))}
    handlers_before = len(bpy.app.handlers.frame_change_pre)
    blender_addon.register()
    assert hasattr(bpy.types.Scene, "dreamscene4d")
    assert hasattr(bpy.ops.dreamscene4d, "submit")
    assert importer.on_frame_change in bpy.app.handlers.frame_change_pre
    blender_addon.unregister()
    assert not hasattr(bpy.types.Scene, "dreamscene4d")
    assert importer.on_frame_change not in bpy.app.handlers.frame_change_pre
    assert len(bpy.app.handlers.frame_change_pre) == handlers_before
    assert {name for name in dir(bpy.types) if name.startswith(("DREAMSCENE4D", "DS4D"))} == before
    blender_addon.register()
    assert bpy.context.scene.dreamscene4d.splat_size == pytest.approx(1.5)
    blender_addon.unregister()


def test_import_gives_objects_points_attributes_and_frame_range(blank, scene_dir):
    path, objects, _ = scene_dir
    collection = importer.import_scene(bpy.context, path)
    scene = bpy.context.scene
    meshes = [o for o in collection.objects if o.type == "MESH"]
    assert sorted(o[importer.OBJECT_ID_KEY] for o in meshes) == ["001", "002"]
    for obj in meshes:
        count = objects[obj[importer.OBJECT_ID_KEY]]["means"].shape[1]
        assert len(obj.data.vertices) == count
        for name, domain in (
            ("opacity", "POINT"),
            ("scale", "POINT"),
            ("rotation", "POINT"),
            (importer.COLOR_ATTRIBUTE, "POINT"),
        ):
            assert obj.data.attributes[name].domain == domain
        opacity = np.empty(count, dtype=np.float32)
        obj.data.attributes["opacity"].data.foreach_get("value", opacity)
        np.testing.assert_allclose(opacity, 0.99, rtol=1e-6)
        # The evaluated object (after geometry nodes) is a point cloud with one point per Gaussian.
        evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        assert evaluated.data is not None
    assert (scene.frame_start, scene.frame_end) == (1, T)
    assert [item.name for item in scene.dreamscene4d.objects] == ["001", "002"]
    assert scene.dreamscene4d.objects["001"].label == "red"


def test_changing_frames_moves_points_to_stored_positions(blank, scene_dir):
    path, objects, meta = scene_dir
    importer.import_scene(bpy.context, path)
    scene = bpy.context.scene
    obj = scene.dreamscene4d.objects["001"].object
    for frame in (3, 1, 4, 2, 4 + T):  # scrub backwards and forwards; past the end loops
        scene.frame_set(frame)
        t = (frame - 1) % T
        expected = objects["001"]["means"][t]
        # Y-up (x, y, z) is Z-up (x, -z, y): written out, not through the converter under test.
        expected_blender = np.stack([expected[:, 0], -expected[:, 2], expected[:, 1]], axis=1)
        np.testing.assert_allclose(mesh_positions(obj), expected_blender, atol=1e-6)
    # Depth scale moves the object along the input camera's rays: its projection stays put.
    item = scene.dreamscene4d.objects["001"]
    scene.frame_set(2)
    item.depth_scale = 1.3
    moved = mesh_positions(obj)
    backend_points = np.stack([moved[:, 0], moved[:, 2], -moved[:, 1]], axis=1)
    K, viewmat = np.array(meta["camera"]["K"]), np.array(meta["camera"]["viewmat"])
    uv_moved, depth_moved = project(backend_points, viewmat, K)
    uv, depth = project(objects["001"]["means"][1].astype(np.float64), viewmat, K)
    np.testing.assert_allclose(uv_moved, uv, atol=1e-3)
    np.testing.assert_allclose(depth_moved, 1.3 * depth, rtol=1e-5)
    item.visible = False
    assert obj.hide_render and obj.hide_viewport


def test_motion_update_is_fast_for_100k_points(blank, tmp_path):
    rng = np.random.default_rng(1)
    count = 100_000
    big = blob(rng, [0, 0, 0], count, 0.3, [0.01, 0, 0], [0.5, 0.5, 0.5])
    meta = {
        "fps": 10.0,
        "image_size": [WIDTH, HEIGHT],
        "camera": {"K": pinhole_K().tolist(), "viewmat": reference_viewmat().tolist()},
    }
    write_scene(tmp_path, meta, {"001": big})
    importer.import_scene(bpy.context, tmp_path)
    scene = bpy.context.scene
    obj = scene.dreamscene4d.objects["001"].object
    import time

    start = time.perf_counter()
    for t in range(T):
        importer.write_frame(obj, importer.load_scene(tmp_path), t, 1.0, 0.0)
    per_frame = (time.perf_counter() - start) / T
    print(f"frame update for {count} Gaussians: {1000 * per_frame:.1f} ms")
    assert per_frame < 0.25


def test_orbit_camera_keyframes_are_at_the_backend_poses(blank, scene_dir):
    path, _, _ = scene_dir
    importer.import_scene(bpy.context, path)
    scene = bpy.context.scene
    ds_scene = importer.load_scene(path)
    frames = 8
    horizontal = camera_paths.create_path_camera(scene, ds_scene, "orbit_horizontal", num_frames=frames)
    elevation = camera_paths.create_path_camera(scene, ds_scene, "orbit_elevation", num_frames=frames)
    assert scene.frame_end == frames
    for i in range(frames):
        scene.frame_set(1 + i)
        azimuth = math.radians(360.0 * i / frames)
        # Backend orbit position r (cos e sin a, -sin e, cos e cos a) in Blender's Z-up world.
        expected = np.array([2 * math.sin(azimuth), -2 * math.cos(azimuth), 0.0])
        np.testing.assert_allclose(np.array(horizontal.matrix_world.translation), expected, atol=1e-5)
        look = -np.array(horizontal.matrix_world.col[2])[:3]  # Blender cameras look down -Z
        np.testing.assert_allclose(look, -expected / 2.0, atol=1e-5)
        up = np.array(horizontal.matrix_world.col[1])[:3]
        assert up[2] > 0.99  # level camera, world up is up in the image
        e = math.radians(75.0 - 300.0 * i / frames if i <= frames / 2 else -75.0 + 300.0 * (i / frames - 0.5))
        expected = np.array([0.0, -2 * math.cos(e), -2 * math.sin(e)])
        np.testing.assert_allclose(np.array(elevation.matrix_world.translation), expected, atol=1e-5)
    # The keys sit exactly on the frames (one per frame, linear).
    fcurves = camera_paths._fcurves(horizontal.animation_data.action)
    assert {len(fc.keyframe_points) for fc in fcurves} == {frames}
    # Render with backend sends what the Blender camera is: pose and K back in the backend's terms.
    cameras = camera_paths.backend_cameras(scene, horizontal, [1, 3], ds_scene.num_frames)
    np.testing.assert_allclose(cameras[0]["viewmat"], reference_viewmat(), atol=1e-5)
    np.testing.assert_allclose(cameras[1]["K"], pinhole_K(), atol=1e-6)
    assert cameras[1]["frame"] == 2 and (cameras[1]["width"], cameras[1]["height"]) == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    "K",
    [
        pinhole_K(),
        pinhole_K(fx=90.0, fy=90.0, cx=30.0, cy=38.0),
        pinhole_K(fx=80.0, fy=64.0, cx=44.0, cy=27.0),
    ],
    ids=["centred", "shifted", "non-square"],
)
def test_blender_camera_projects_like_the_backend_pinhole(blank, tmp_path, K):
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    rng = np.random.default_rng(2)
    viewmat = np.linalg.inv(
        np.linalg.inv(reference_viewmat(2.5))
        @ np.block([[_rotation(rng), np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]])
    )
    points = rng.uniform(-0.6, 0.6, size=(50, 3))
    uv_backend, depth = project(points, viewmat, K)
    meta = {
        "fps": 10.0,
        "image_size": [WIDTH, HEIGHT],
        "camera": {"K": K.tolist(), "viewmat": viewmat.tolist()},
    }
    write_scene(tmp_path, meta, {"001": blob(rng, [0, 0, 0], 3, 0.1, [0, 0, 0], [1, 1, 1])})
    scene = bpy.context.scene
    camera = camera_paths.create_input_camera(scene, importer.load_scene(tmp_path))
    bpy.context.view_layer.update()
    blender_points = np.stack([points[:, 0], -points[:, 2], points[:, 1]], axis=1)
    ndc = np.array([tuple(world_to_camera_view(scene, camera, Vector(p))) for p in blender_points])
    uv_blender = np.stack([ndc[:, 0] * WIDTH, (1.0 - ndc[:, 1]) * HEIGHT], axis=1)
    np.testing.assert_allclose(uv_blender, uv_backend, atol=1e-3)
    np.testing.assert_allclose(ndc[:, 2], depth, rtol=1e-6)


def _rotation(rng) -> np.ndarray:
    # A small random rotation of the camera about its own centre (about 10 degrees).
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = 0.18
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def footprint(objects: dict, meta: dict, t: int, splat_size: float) -> np.ndarray:
    """Pixels where the splats' accumulated alpha exceeds 0.5, projected through the backend camera.

    Each splat is its Gaussian, opacity x exp(-d^2 / (2 sigma^2)) with sigma the RMS axis scale in
    pixels, cut off at its splat radius (splat_size x sigma), as the splat material shades it.
    """
    K, viewmat = np.array(meta["camera"]["K"]), np.array(meta["camera"]["viewmat"])
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    transmittance = np.ones((HEIGHT, WIDTH))
    for arrays in objects.values():
        uv, depth = project(arrays["means"][t].astype(np.float64), viewmat, K)
        sigma = np.linalg.norm(arrays["scales"][t], axis=-1) / math.sqrt(3) * K[0, 0] / depth
        for (u, v), s, opacity in zip(uv, sigma, arrays["opacities"]):
            d2 = (xs - u) ** 2 + (ys - v) ** 2
            alpha = np.where(d2 <= (splat_size * s) ** 2, opacity * np.exp(-0.5 * d2 / s**2), 0.0)
            transmittance *= 1.0 - alpha
    return transmittance < 0.5


def test_cycles_splat_fades_towards_its_rim_like_its_gaussian(blank, tmp_path):
    # One wide Gaussian in front of the input camera: its splat is a disc of radius Size x sigma
    # on screen.  A solid disc would be as opaque at 0.9 of that radius as at the centre.
    K, viewmat = pinhole_K(), reference_viewmat(2.0)
    one = {
        "means": np.zeros((T, 1, 3), np.float32),
        "quats": np.tile(np.array([1, 0, 0, 0], np.float32), (T, 1, 1)),
        "scales": np.full((T, 1, 3), 0.12, np.float32),
        "opacities": np.full(1, 0.99, np.float32),
        "colors": np.array([[0.9, 0.2, 0.2]], np.float32),
    }
    meta = {
        "fps": 10.0,
        "image_size": [WIDTH, HEIGHT],
        "camera": {"K": K.tolist(), "viewmat": viewmat.tolist()},
    }
    write_scene(tmp_path, meta, {"001": one})
    scene = bpy.context.scene
    importer.import_scene(bpy.context, tmp_path)
    scene.camera = camera_paths.create_input_camera(scene, importer.load_scene(tmp_path))
    scene.render.engine = "CYCLES"
    scene.cycles.device, scene.cycles.samples, scene.cycles.use_denoising = "CPU", 16, False
    scene.render.film_transparent = True
    scene.render.image_settings.file_format, scene.render.image_settings.color_mode = "PNG", "RGBA"
    scene.render.filepath = str(tmp_path / "splat.png")
    scene.frame_set(1)
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(str(tmp_path / "splat.png"))
    alpha = np.array(image.pixels[:], dtype=np.float32).reshape(HEIGHT, WIDTH, 4)[::-1, :, 3]
    bpy.data.images.remove(image)
    radius_px = scene.dreamscene4d.splat_size * 0.12 * K[0, 0] / 2.0  # RMS of equal axes = 0.12
    u, v = K[0, 2], K[1, 2]
    centre = alpha[int(v) - 1 : int(v) + 1, int(u) - 1 : int(u) + 1].mean()
    near_rim = alpha[int(v), int(u + 0.9 * radius_px)]
    outside = alpha[int(v), min(WIDTH - 1, int(u + 1.2 * radius_px))]
    assert centre > 0.9, centre
    assert near_rim < 0.75 * centre, (near_rim, centre)
    assert outside < 0.05, outside


@pytest.mark.parametrize(
    "engine, shape", [("CYCLES", "POINTS"), ("CYCLES", "ELLIPSOIDS"), ("EEVEE", "POINTS")]
)
def test_render_from_the_input_camera_covers_the_objects(blank, scene_dir, tmp_path_factory, engine, shape):
    path, objects, meta = scene_dir
    scene = bpy.context.scene
    scene.dreamscene4d.splat_shape = shape
    importer.import_scene(bpy.context, path)
    scene.camera = camera_paths.create_input_camera(scene, importer.load_scene(path))
    if engine == "CYCLES":
        scene.render.engine = "CYCLES"
        scene.cycles.device = "CPU"
        scene.cycles.samples = 4
        scene.cycles.use_denoising = False
    else:
        scene.render.engine = "BLENDER_EEVEE"
        scene.eevee.taa_render_samples = 4
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    out = tmp_path_factory.mktemp("render")
    for frame in (1, 4):
        scene.frame_set(frame)
        scene.render.filepath = str(out / f"frame{frame}.png")
        try:
            bpy.ops.render.render(write_still=True)
        except RuntimeError as error:
            if engine == "EEVEE":  # EEVEE needs an OpenGL/EGL context; Cycles covers machines without one
                pytest.skip(f"EEVEE cannot render on this machine: {error}")
            raise
        image = bpy.data.images.load(str(out / f"frame{frame}.png"))
        pixels = np.array(image.pixels[:], dtype=np.float32).reshape(HEIGHT, WIDTH, 4)[::-1]  # top row first
        bpy.data.images.remove(image)
        rendered = pixels[..., 3] > 0.5
        expected = footprint(objects, meta, frame - 1, scene.dreamscene4d.splat_size)
        iou = (rendered & expected).sum() / (rendered | expected).sum()
        print(f"{engine} {shape} frame {frame}: coverage IoU with the projected footprint {iou:.3f}")
        assert iou > 0.8
        # Colours come through as stored: the red object renders red, the blue one blue.
        K, viewmat = np.array(meta["camera"]["K"]), np.array(meta["camera"]["viewmat"])
        for object_id, channel in (("001", 0), ("002", 2)):
            uv, _ = project(objects[object_id]["means"][frame - 1].astype(np.float64), viewmat, K)
            u, v = np.median(uv, axis=0).astype(int)
            others = [c for c in range(3) if c != channel]
            assert pixels[v, u, channel] > 0.75 and np.all(pixels[v, u, others] < 0.4), pixels[v, u]


INSTALL_CHECK = """
import json, sys
import bpy
result = bpy.ops.extensions.package_install_files(filepath=sys.argv[1], repo="user_default", enable_on_install=True)
module = sys.modules.get("bl_ext.user_default.dreamscene4d._shared")
print("RESULT " + json.dumps({
    "install": sorted(result),
    "enabled": "bl_ext.user_default.dreamscene4d" in bpy.context.preferences.addons,
    "props": hasattr(bpy.types.Scene, "dreamscene4d"),
    "shared_from": module._PREFIX if module else None,
    "extensions_dir": bpy.utils.user_resource("EXTENSIONS"),
}))
"""


def test_package_builds_validates_and_installs_in_a_fresh_user_folder(tmp_path):
    """The zip is built and checked by Blender's own extension tool, then installed and enabled.

    Wheels come from the cache a previous `build.py package` downloaded (no network in tests);
    without a cache the zip is built without foreign wheels and still goes through the validator.
    """
    import json
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from tools.package_extension import ROOT, build_extension, cached_wheels

    cache = ROOT / "dist" / "wheel_cache"
    version = __import__("importlib.metadata").metadata.version("pyzmq")
    mode = "cache" if cached_wheels(cache, version) else "none"
    zip_path = build_extension(ROOT, tmp_path / "dist", wheels=mode, wheel_cache=cache)
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
        manifest = archive.read("blender_manifest.toml").decode()
    assert {
        "__init__.py",
        "blender_manifest.toml",
        "shared/scene.py",
        "shared/coords.py",
        "importer.py",
    } <= names
    wheels = sorted(n for n in names if n.endswith(".whl"))
    assert all(f"./{w}" in manifest for w in wheels)
    if mode == "cache":
        tags = " ".join(wheels)
        for needed in ("cp311-cp311-win_amd64", "x86_64", "aarch64", "macosx", "abi3"):
            assert needed in tags, needed
    user = tmp_path / "user"
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(user))
    result = subprocess.run(
        [sys.executable, "-c", INSTALL_CHECK, str(zip_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(line[len("RESULT ") :])
    assert report["install"] == ["FINISHED"] and report["enabled"] and report["props"]
    assert (
        report["shared_from"] == "bl_ext.user_default.dreamscene4d.shared"
    )  # the bundled copy, not the repo's
    assert Path(report["extensions_dir"]).resolve() == (user / "extensions").resolve()
    assert (user / "extensions" / "user_default" / "dreamscene4d" / "shared" / "scene.py").is_file()


def test_background_cli_imports_makes_cameras_renders_and_saves(scene_dir, tmp_path):
    """`cli.py -- import` as Blender runs it with -P (a plain script), here through the bpy module."""
    import subprocess
    import sys
    from pathlib import Path

    path, _, _ = scene_dir
    out = tmp_path / "out"
    script = Path(blender_addon.__file__).parent / "cli.py"
    command = [
        sys.executable,
        str(script),
        "--",
        "import",
        "--scene",
        str(path),
        "--out",
        str(out),
        "--samples",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("fixed", "orbit_horizontal", "orbit_elevation"):
        frames = sorted((out / "renders" / f"blender_{name}").glob("*.png"))
        assert len(frames) == T, name  # one loop of the video per path (--loops 1)
    check = (
        "import bpy, json, sys; bpy.ops.wm.open_mainfile(filepath=sys.argv[1]); s = bpy.context.scene; "
        "print('RESULT ' + json.dumps({'cameras': sorted(o.name for o in s.objects if o.type == 'CAMERA'), "
        "'meshes': sorted(o.name for o in s.objects if o.type == 'MESH'), 'camera': s.camera.name}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(out / "scene.blend")], capture_output=True, text=True, timeout=120
    )
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
    report = __import__("json").loads(line[len("RESULT ") :])
    assert report["meshes"] == ["DS4D blue", "DS4D red"]  # nothing from the startup file
    assert report["cameras"] == [
        "DS4D Camera Elevation Orbit",
        "DS4D Camera Fixed",
        "DS4D Camera Horizontal Orbit",
        "DS4D Camera Input",
    ]
    assert report["camera"] == "DS4D Camera Input"


@pytest.mark.slow
def test_background_cli_runs_end_to_end_against_a_real_backend(tmp_path):
    """cli.py run: starts the backend as a child process on loopback, submits a tiny CPU job, waits
    in the blocking loop, fetches and imports the scene, renders the three paths with Blender and
    with the backend, saves the .blend.  About 4 minutes on a 2-core CPU."""
    pytest.importorskip("torch")
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    if importlib.util.find_spec("backend.server") is None:
        pytest.skip("backend.server is not in this checkout")
    data = tmp_path / "data"
    (data / "JPEGImages" / "clip").mkdir(parents=True)
    (data / "Annotations" / "clip" / "001").mkdir(parents=True)
    height, width = 48, 64
    ys, xs = np.mgrid[0:height, 0:width]
    masks = []
    for t in range(3):
        mask = (xs - (26 + 3 * t)) ** 2 + (ys - 24) ** 2 < 100
        image = np.full((height, width, 3), 200, np.uint8)
        image[mask] = [200, 40, 40]
        Image.fromarray(image).save(data / "JPEGImages" / "clip" / f"{t:05d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(
            data / "Annotations" / "clip" / "001" / f"{t:05d}.png"
        )
        masks.append(mask)
    out = tmp_path / "out"
    script = Path(blender_addon.__file__).parent / "cli.py"
    tiny = ["stage1.iters=20", "stage1.placement_iters=5", "stage2.steps_per_frame=2"]
    tiny += ["stage2.placement_iters=5", "stage2.joint_iters=2"]
    command = [
        sys.executable,
        str(script),
        "--",
        "run",
        "--data",
        str(data),
        "--video",
        "clip",
        "--out",
        str(out),
    ]
    command += [
        "--preset",
        "cpu-demo",
        "--device",
        "cpu",
        "--guidance",
        "none",
        "--samples",
        "2",
        "--start-backend",
    ]
    command += ["--address", "tcp://127.0.0.1:5617"]
    for override in tiny:
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "static done" in log and "motion done" in log and "stopped backend" in log
    assert "scene compose done" in log and "[dreamscene4d] None" not in log  # scene-wide events named
    assert (out / "scene.blend").is_file() and (out / "scene" / "scene.json").is_file()
    for path in ("fixed", "orbit_horizontal", "orbit_elevation"):
        blender_frames = sorted((out / "renders" / f"blender_{path}").glob("*.png"))
        backend_frames = sorted((out / "renders" / f"backend_{path}").glob("*.png"))
        assert len(blender_frames) == len(backend_frames) == 3
        for t, (ours, theirs) in enumerate(zip(blender_frames, backend_frames)):
            covered = np.asarray(Image.open(ours))[..., 3] > 127
            rendered = np.asarray(Image.open(theirs).convert("RGB")).max(-1) > 40  # black background
            iou = (covered & rendered).sum() / (covered | rendered).sum()
            assert iou > 0.7, (path, t, iou)  # Blender's splats sit where the backend's Gaussians render
            if path == "fixed":
                iou = (covered & masks[t]).sum() / (covered | masks[t]).sum()
                assert iou > 0.6, (t, iou)  # and from the input camera, over the input mask


def test_backend_that_is_not_there_shows_as_disconnected_without_blocking(blank):
    import time

    from blender_addon import operators
    from blender_addon.backend_link import BackendLink

    link = BackendLink("tcp://127.0.0.1:5699", poll_interval=0.5).start()  # nothing listens there
    settings = bpy.context.scene.dreamscene4d
    try:
        deadline = time.monotonic() + 15.0
        slowest = 0.0
        while time.monotonic() < deadline and not settings.connection_message.startswith("disconnected"):
            started = time.perf_counter()
            for message in link.drain():  # what the UI timer does on every tick
                operators.apply_message(settings, message)
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)
        assert settings.connection_message.startswith("disconnected") and not settings.connected
        assert slowest < 0.05  # the UI thread never waits on the network
    finally:
        link.stop()
