"""Movie Clip + Mask data-blocks as input, with the bpy module (CPU).

The clip is an MP4 encoded here from known frames; the masks are polygons (vector handles, so
straight edges) keyframed at every frame, whose pixel footprint a numpy point-in-polygon test at
pixel centres gives independently of Blender.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

import blender_addon  # noqa: E402
from blender_addon import importer, movie_masks, operators  # noqa: E402
from tests.test_video_input import MAX_MEAN_ABS_ERROR, SHORT_STATIC, encode_mp4  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FRAMES = 96, 64, 5
CLIP_START = 11  # the clip starts at scene frame 11, so frame mapping errors show
# Blender's mask rasteriser anti-aliases outwards: after the 0.5 threshold a shape gains about half
# a pixel on every side (a 20 px square covers 21x21 pixels, IoU 0.91).  A frame off by one (5 px)
# scores about 0.6.
MIN_IOU = 0.88


def ball_polygon(t: int) -> np.ndarray:
    """A square moving right, in pixel coordinates (x right, y down)."""
    # Edges a quarter pixel off pixel boundaries: a pixel is in or out by its centre, never on the edge.
    x0, y0 = 14.25 + 5.0 * t, 18.25
    return np.array([[x0, y0], [x0 + 20, y0], [x0 + 20, y0 + 20], [x0, y0 + 20]])


def box_polygon(t: int) -> np.ndarray:
    """A triangle moving down."""
    x0, y0 = 62.25, 6.25 + 4.0 * t
    return np.array([[x0, y0], [x0 + 24, y0 + 6], [x0 + 8, y0 + 26]])


def to_mask_space(points: np.ndarray) -> np.ndarray:
    """Pixels -> Blender mask coordinates: x over the width, y up, aspect kept about the centre."""
    fx, fy = points[:, 0] / WIDTH, 1.0 - points[:, 1] / HEIGHT
    return np.stack([fx, (fy - 0.5) * HEIGHT / WIDTH + 0.5], axis=-1)


def reference_raster(polygon: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixel centres inside the polygon (even-odd rule)."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    inside = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y1 > ys) != (y2 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


def source_frames() -> np.ndarray:
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    frames = np.empty((FRAMES, HEIGHT, WIDTH, 3), dtype=np.float32)
    for t in range(FRAMES):
        image = np.stack([0.3 + 0.3 * xs / WIDTH, 0.5 + 0.2 * ys / HEIGHT, np.full_like(xs, 0.4)], -1)
        image[reference_raster(ball_polygon(t))] = (0.9, 0.15, 0.1)
        image[reference_raster(box_polygon(t))] = (0.1, 0.2, 0.9)
        frames[t] = np.round(image * 255) / 255
    return frames


def animated_mask(name: str, polygon_at, clip, frames=range(FRAMES)) -> bpy.types.Mask:
    mask = bpy.data.masks.new(name)
    add_animated_layer(mask, "outline", polygon_at, clip, frames)
    return mask


def add_animated_layer(mask, layer_name: str, polygon_at, clip, frames=range(FRAMES)) -> None:
    layer = mask.layers.new(name=layer_name)
    spline = layer.splines.new()
    count = len(polygon_at(0))
    spline.points.add(count - 1)  # a new spline starts with one point
    for point in spline.points:
        point.handle_left_type = point.handle_right_type = "FREE"
    for t in frames:
        corners = to_mask_space(polygon_at(t))
        for j, point in enumerate(spline.points):
            # Handles a third of the way to the neighbours (what vector handles are): straight edges.
            # Keyed like co, as the Mask editor keys a point, so each frame's shape is exact.
            point.co = corners[j]
            point.handle_left = corners[j] + (corners[j - 1] - corners[j]) / 3
            point.handle_right = corners[j] + (corners[(j + 1) % count] - corners[j]) / 3
            for prop in ("co", "handle_left", "handle_right"):
                mask.keyframe_insert(
                    f'layers["{layer_name}"].splines[0].points[{j}].{prop}',
                    frame=movie_masks.scene_frame(clip, t),
                )


@pytest.fixture(scope="module")
def registered():
    blender_addon.register()
    yield
    blender_addon.unregister()


@pytest.fixture(scope="module")
def movie(tmp_path_factory):
    folder = tmp_path_factory.mktemp("movie")
    frames = source_frames()
    return encode_mp4(folder / "walk.mp4", frames), frames


@pytest.fixture
def clip_scene(registered, movie):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    importer.forget_loaded_scenes()
    path, frames = movie
    clip = bpy.data.movieclips.load(str(path))
    clip.frame_start = CLIP_START
    ball = animated_mask("Ball", ball_polygon, clip)
    box = animated_mask("Box", box_polygon, clip)
    scene = bpy.context.scene
    settings = scene.dreamscene4d
    settings.input_kind, settings.movie_clip = "CLIP", clip
    for mask in (ball, box):
        settings.clip_masks.add().mask = mask
    settings.preset, settings.device, settings.guidance_kind = "cpu-demo", "cpu", "NONE"
    settings.extra_overrides = ",".join(SHORT_STATIC)
    return scene, clip, (ball, box), frames


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L")) > 127


def test_two_animated_masks_become_two_mask_tracks_matching_their_shapes(clip_scene, tmp_path):
    scene, clip, masks, _ = clip_scene
    assert clip.frame_duration == FRAMES and tuple(clip.size) == (WIDTH, HEIGHT)
    before = (scene.render.resolution_x, scene.render.resolution_y, scene.frame_current)
    indices = movie_masks.frame_indices(clip, start=1, end=5, stride=1)
    folders = movie_masks.rasterise(scene, clip, masks, indices, tmp_path / "masks")
    assert sorted(folders) == ["Ball", "Box"]
    for name, polygon_at in (("Ball", ball_polygon), ("Box", box_polygon)):
        files = sorted(p.name for p in folders[name].iterdir())
        assert files == [f"{i:05d}.png" for i in indices]
        for i in indices:
            got = read_mask(folders[name] / f"{i:05d}.png")
            assert got.shape == (HEIGHT, WIDTH)
            assert iou(got, reference_raster(polygon_at(i))) > MIN_IOU, (name, i)
            # And not the shape of a neighbouring frame (the animation is evaluated per frame).
            other = i - 1 if i > 0 else i + 1
            assert iou(got, reference_raster(polygon_at(i))) > iou(got, reference_raster(polygon_at(other)))
    # The scene's own settings are as they were.
    assert (scene.render.resolution_x, scene.render.resolution_y, scene.frame_current) == before
    assert scene.compositing_node_group is None
    assert movie_masks.TREE_NAME not in bpy.data.node_groups


def test_one_mask_with_a_layer_per_object(clip_scene, tmp_path):
    scene, clip, _, _ = clip_scene
    actors = bpy.data.masks.new("Actors")
    add_animated_layer(actors, "Ball", ball_polygon, clip)
    add_animated_layer(actors, "Box", box_polygon, clip)
    count = len(bpy.data.masks)
    indices = [0, 3]
    folders = movie_masks.rasterise(scene, clip, [(actors, "Ball"), (actors, "Box")], indices, tmp_path)
    assert sorted(folders) == ["Ball", "Box"] and len(bpy.data.masks) == count  # copies removed
    for i in indices:
        ball, box = (read_mask(folders[name] / f"{i:05d}.png") for name in ("Ball", "Box"))
        assert iou(ball, reference_raster(ball_polygon(i))) > MIN_IOU, i
        assert iou(box, reference_raster(box_polygon(i))) > MIN_IOU, i
        assert not (ball & reference_raster(box_polygon(i))).any()  # each holds its own layer only
    with pytest.raises(
        movie_masks.MovieMaskError, match="Mask 'Actors' has no layer 'Cat' \\(layers: Ball, Box\\)"
    ):
        movie_masks.check_masks([(actors, "Cat")])


def test_bad_inputs_are_clear_errors_before_anything_is_sent(clip_scene, tmp_path):
    scene, clip, masks, _ = clip_scene
    settings = scene.dreamscene4d
    settings.output_dir = str(tmp_path / "renders")

    settings.clip_frame_start, settings.clip_frame_end = 3, 9
    with pytest.raises(
        movie_masks.MovieMaskError, match=r"frame range 3:9 is outside Movie Clip .* 5 frames"
    ):
        operators.submit_request(settings)
    settings.clip_frame_start, settings.clip_frame_end = 0, 0

    bpy.data.masks.new("Nothing")
    settings.clip_masks.add().mask = bpy.data.masks["Nothing"]
    with pytest.raises(movie_masks.MovieMaskError, match="Mask 'Nothing' has no layer"):
        operators.submit_request(settings)
    settings.clip_masks.remove(len(settings.clip_masks) - 1)

    late = animated_mask("Late", lambda t: ball_polygon(t) + (200.0 if t == 0 else 0.0), clip)
    settings.clip_masks.add().mask = late
    with pytest.raises(
        movie_masks.MovieMaskError, match=r"Mask 'Late' is empty in the first frame used \(video frame 0"
    ):
        operators.submit_request(settings)
    settings.clip_frame_start = 1  # the fix the message names
    spec, uploads = operators.submit_request(settings)
    assert uploads is None and spec["input"]["start"] == 1

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a movie\n" * 100)
    with pytest.raises(movie_masks.MovieMaskError, match=r"broken\.mp4"):
        movie_masks.load_clip(str(broken))
    settings.movie_clip, settings.video_file = None, str(broken)
    with pytest.raises(movie_masks.MovieMaskError, match=r"broken\.mp4"):
        operators.submit_request(settings)


def test_import_lines_the_result_up_with_the_clip(clip_scene, tmp_path):
    from shared.scene import write_scene

    scene, clip, _, _ = clip_scene
    settings = scene.dreamscene4d
    rng = np.random.default_rng(0)
    T = 4

    def blob(offset):
        means = rng.normal(scale=0.1, size=(T, 50, 3)).astype(np.float32) + np.float32(offset)
        quats = np.tile(np.float32([1, 0, 0, 0]), (T, 50, 1))
        return {
            "means": means,
            "quats": quats,
            "scales": np.full((T, 50, 3), 0.02, np.float32),
            "opacities": np.full(50, 0.9, np.float32),
            "colors": np.full((50, 3), 0.5, np.float32),
        }

    K = [[80.0, 0, WIDTH / 2], [0, 80.0, HEIGHT / 2], [0, 0, 1]]
    viewmat = np.diag([1.0, -1.0, -1.0, 1.0])
    viewmat[2, 3] = 2.0
    meta = {
        "fps": 10.0,
        "image_size": [WIDTH, HEIGHT],
        "frame_names": [f"{i:05d}" for i in range(1, 1 + T)],  # video frames 1..4 were used
        "camera": {"K": K, "viewmat": viewmat.tolist()},
    }
    write_scene(tmp_path / "scene", meta, {"Ball": blob([-0.3, 0, 0]), "Box": blob([0.3, 0, 0])})
    importer.import_scene(bpy.context, tmp_path / "scene")
    camera = movie_masks.finish_import(scene, settings, importer.load_scene(tmp_path / "scene"))
    assert sorted(o.name for o in bpy.data.objects if o.type == "MESH") == ["DS4D Ball", "DS4D Box"]
    assert scene.frame_start == movie_masks.scene_frame(clip, 1) == CLIP_START + 1
    assert scene.frame_end == scene.frame_start + T - 1
    assert scene.render.fps / scene.render.fps_base == pytest.approx(clip.fps)
    assert scene.active_clip == clip and scene.camera == camera
    backgrounds = list(camera.data.background_images)
    assert camera.data.show_background_images and backgrounds[0].clip == clip
    assert (scene.render.resolution_x, scene.render.resolution_y) == tuple(clip.size)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_job_from_clip_and_masks_completes_on_a_real_backend(clip_scene, tmp_path):
    pytest.importorskip("torch")
    from PIL import Image

    from shared.client import BackendClient

    scene, clip, _, frames = clip_scene
    settings = scene.dreamscene4d
    settings.output_dir = str(tmp_path / "renders")
    settings.clip_frame_start, settings.clip_frame_end = 1, 4
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "backend", "serve", "--bind", address, "--state", str(tmp_path / "state")],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = BackendClient(address, timeout=5.0)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client.hello()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)

        # Shared disk: the clip's file and the rasterised masks by path.
        spec, uploads = operators.submit_request(settings)
        assert uploads is None and spec["input"]["kind"] == "video"
        assert (spec["input"]["start"], spec["input"]["end"], spec["input"]["stride"]) == (1, 4, 1)
        spec["stages"] = ["static"]
        job = client.submit(spec)["job"]

        # No shared disk: the clip's frames and the masks are uploaded in the reference layout.
        settings.upload_inputs = True
        spec_up, uploads = operators.submit_request(settings)
        name = spec_up["input"]["video"]
        assert sorted(k for k in uploads if k.startswith("JPEGImages/")) == [
            f"JPEGImages/{name}/{i:05d}.png" for i in (1, 2, 3)
        ]
        for i in (1, 2, 3):
            frame = np.asarray(
                Image.open(__import__("io").BytesIO(uploads[f"JPEGImages/{name}/{i:05d}.png"]))
            )
            assert np.abs(frame[..., :3] / 255.0 - frames[i]).mean() < MAX_MEAN_ABS_ERROR, i
            ball = np.asarray(
                Image.open(__import__("io").BytesIO(uploads[f"Annotations/{name}/Ball/{i:05d}.png"]))
            )
            assert iou(ball > 127, reference_raster(ball_polygon(i))) > MIN_IOU
        spec_up["stages"] = ["static"]
        queued = client.submit(spec_up, uploads=uploads)["job"]  # validated by the server on submit
        client.cancel(queued)

        deadline = time.monotonic() + 600
        while (state := client.status(job))["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, state
            time.sleep(1.0)
        assert state["state"] == "done", state
        client.fetch_file(job, "out/report.json", tmp_path / "report.json")
        report = json.loads((tmp_path / "report.json").read_text())
        assert sorted(report["objects"]) == ["Ball", "Box"]  # the objects are named after the masks
        assert all(report["objects"][o]["static"]["iou"] > 0.3 for o in ("Ball", "Box")), report["objects"]
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
