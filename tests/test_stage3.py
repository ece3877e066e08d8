"""Stage 3: depth placement (k sweep), one-call composition, renders, point tracks, the scene file.

The inputs are synthetic scenes built here: Gaussian spheres or discs with known depths and
motion, rendered through the real rasterizer to make the frames and masks the stage compares to.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.cameras import input_camera, stack_cameras
from backend.config import Config, Stage3Config
from backend.data import VideoInput
from backend.depth import DepthEstimate, DepthProvider
from backend.errors import JobCancelled
from backend.raster import rasterize
from backend.render_video import read_video_frames
from backend.stage3 import (
    compose_scene,
    grid_points,
    orbit_angles,
    orbit_camera,
    scale_about_center,
)
from shared import ply
from shared.scene import read_scene

W, H, T = 144, 96, 4
CAMERA = input_camera(W, H)
CENTER = np.array([0.0, 0.0, 2.0])  # the input camera centre
FOCAL = float(CAMERA.K[1, 1])


def sphere(n: int, radius: float, centre, colour, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    points = direction * radius * rng.uniform(0.0, 1.0, size=(n, 1)) ** (1 / 3) + np.asarray(centre)
    return gaussians(points, np.full((n, 3), 0.05 * radius), colour)


def disc(n: int, radius: float, centre, colour, seed: int) -> dict[str, torch.Tensor]:
    """A flat disc facing the camera: every Gaussian at the same depth, so image motion is uniform."""
    rng = np.random.default_rng(seed)
    r = radius * np.sqrt(rng.uniform(size=n))
    a = rng.uniform(0, 2 * math.pi, size=n)
    points = np.stack([r * np.cos(a), r * np.sin(a), np.zeros(n)], axis=1) + np.asarray(centre)
    return gaussians(points, np.tile([0.04 * radius, 0.04 * radius, 0.002], (n, 1)), colour)


def gaussians(points: np.ndarray, scales: np.ndarray, colour) -> dict[str, torch.Tensor]:
    n = len(points)
    rng = np.random.default_rng(n)
    colours = np.clip(np.asarray(colour) + rng.uniform(-0.1, 0.1, size=(n, 3)), 0, 1)
    return {
        "means": torch.tensor(points, dtype=torch.float32),
        "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]] * n),
        "scales": torch.tensor(scales, dtype=torch.float32),
        "opacities": torch.full((n,), 0.9),
        "colors": torch.tensor(colours, dtype=torch.float32),
    }


def animate(g: dict[str, torch.Tensor], shift_per_frame) -> dict[str, torch.Tensor]:
    """Baked arrays [T, N, ...] of g translated by shift_per_frame * t."""
    shift = torch.tensor(shift_per_frame, dtype=torch.float32)
    return {
        "means": torch.stack([g["means"] + shift * t for t in range(T)]),
        "quats": g["quats"][None].repeat(T, 1, 1),
        "scales": g["scales"][None].repeat(T, 1, 1),
        "opacities": g["opacities"],
        "colors": g["colors"],
    }


def at_frame(baked: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    return {k: v[t] if k in ("means", "quats", "scales") else v for k, v in baked.items()}


def render_all(parts: list[dict[str, torch.Tensor]]):
    """One render of all parts on white; colour channels 3.. hold each part's composited weight."""
    count = len(parts)
    membership = torch.cat([torch.eye(count)[i].expand(len(p["means"]), count) for i, p in enumerate(parts)])
    g = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    colors = torch.cat([g["colors"], membership], dim=1)
    background = torch.cat([torch.ones(3), torch.zeros(count)])
    viewmats, Ks = stack_cameras([CAMERA])
    return rasterize(
        g["means"], g["quats"], g["scales"], g["opacities"], colors, viewmats, Ks, W, H, background=background
    )


def make_video(true_objects: list[dict[str, torch.Tensor]]) -> tuple[VideoInput, list[np.ndarray]]:
    """Frames rendered from the true scene (on white, as stage 3 renders), each object's visible mask
    (where it holds most of the pixel's weight) and the true composed depth per frame (for a depth
    provider that knows it)."""
    frames, masks, depths = [], [[] for _ in true_objects], []
    for t in range(T):
        out = render_all([at_frame(o, t) for o in true_objects])
        frames.append(out.color[0, ..., :3].numpy())
        depths.append(out.depth[0, ..., 0].numpy())
        for i in range(len(true_objects)):
            masks[i].append(out.color[0, ..., 3 + i].numpy() > 0.5)
    ids = [f"{i + 1:03d}" for i in range(len(true_objects))]
    names = [f"{n:05d}" for n in range(10, 10 + T)]
    video = VideoInput(
        name="synthetic",
        frame_names=names,
        frames=np.stack(frames).astype(np.float32),
        object_ids=ids,
        masks=np.stack([np.stack(m) for m in masks]),
        inpainted_frames=None,
        inpainted_masks=None,
        inpainted_objects=[],
        frames_dir=Path("."),
        masks_dir=Path("."),
        mask_layout="per-object",
        frame_paths=[],
        mask_paths=[],
    )
    return video, depths


class KnownDepth(DepthProvider):
    """Stands in for a depth network: an affine map of the true depth (relative depth models are
    only known up to scale and shift), invalid off the objects."""

    name = "test:known-depth"

    def __init__(self, depth: np.ndarray, scale: float, shift: float):
        self.depth = depth
        self.scale, self.shift = scale, shift

    def estimate(self, image: np.ndarray) -> DepthEstimate:
        valid = self.depth > 0
        return DepthEstimate((self.depth * self.scale + self.shift).astype(np.float32), valid)


def small_config(loops: int = 1, **stage3) -> Config:
    config = Config()
    config.stage3 = Stage3Config(
        render_long_side=72, loops=loops, track_grid=16, work_long_side=144, **stage3
    )
    return config


TRUE_K = 1.3


@pytest.fixture(scope="module")
def two_spheres(tmp_path_factory):
    """Object 001 truly at depth 2.6, but handed over at depth 2 (scaled about the camera centre by
    1 / 1.3: the same image, the wrong depth); object 002, the reference, at depth 2.  The depth
    estimate is the true depth under an affine map, so the median-ratio start is off and only the
    normalised sweep recovers 1.3."""
    far = sphere(500, 0.39, [-0.45, 0.05, 2.0 - 2.6], (0.9, 0.3, 0.2), seed=1)
    near = sphere(500, 0.3, [0.35, 0.0, 0.0], (0.2, 0.4, 0.9), seed=2)
    true_far = animate(far, [0.03, 0.0, 0.0])
    true_near = animate(near, [-0.02, 0.01, 0.0])
    video, depths = make_video([true_far, true_near])
    center = torch.tensor(CENTER, dtype=torch.float32)
    wrong_far = scale_about_center(true_far, center, 1.0 / TRUE_K)
    motion = {"001": {"baked": wrong_far, "metrics": {}}, "002": {"baked": true_near, "metrics": {}}}
    out_dir = tmp_path_factory.mktemp("compose_spheres")
    events = []
    report = compose_scene(
        video, motion, small_config(loops=2), "cpu", out_dir, events.append, None,
        depth_provider=KnownDepth(depths[0], scale=2.0, shift=1.0),
    )  # fmt: skip
    return {"report": report, "out": out_dir, "video": video, "events": events, "true": [true_far, true_near]}


def test_k_sweep_recovers_the_true_depth_factor(two_spheres):
    report = two_spheres["report"]
    assert report["k"]["002"] == 1.0  # the last object is the reference
    assert abs(report["k"]["001"] - TRUE_K) < 0.02, report["k"]
    # The median-ratio start alone is biased by the depth estimate's shift; the sweep fixes it.
    assert abs(report["k_init"]["001"] - TRUE_K) > 0.05, report["k_init"]
    assert report["depth_provider"] == "test:known-depth"


def test_composed_scene_matches_the_frames_and_masks(two_spheres):
    report = two_spheres["report"]
    assert len(report["per_frame"]) == T
    assert [p["frame"] for p in report["per_frame"]] == two_spheres["video"].frame_names
    # Frames were rendered from the true scene; once the depth is right the composition matches them.
    assert report["psnr"] > 30.0, report["per_frame"]
    assert report["iou"] > 0.93, report["per_frame"]
    assert report["summary"] == {"psnr": report["psnr"], "iou": report["iou"]}


def test_scene_on_disk_round_trips(two_spheres):
    out, report = two_spheres["out"], two_spheres["report"]
    scene = read_scene(out)
    assert scene.num_frames == T
    assert scene.image_size == (W, H)
    assert scene.meta["frame_names"] == two_spheres["video"].frame_names
    np.testing.assert_allclose(scene.K, CAMERA.K)
    np.testing.assert_allclose(scene.viewmat, CAMERA.viewmat)
    true_far, true_near = two_spheres["true"]
    # Object arrays are the placed (post-k) Gaussians: the far sphere is back at its true depth.
    np.testing.assert_allclose(scene.objects["001"]["means"], true_far["means"].numpy(), atol=0.03)
    np.testing.assert_allclose(scene.objects["002"]["means"], true_near["means"].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        scene.objects["001"]["scales"], true_far["scales"].numpy() * report["k"]["001"] / TRUE_K, rtol=1e-4
    )
    for name in ("fixed", "orbit_horizontal", "orbit_elevation"):
        assert (out / scene.meta["renders"][name]).is_file()
    assert (out / scene.meta["tracks"]).is_file()
    assert scene.meta["composition"]["k"] == report["k"]
    # The orbit centre lies on the optical axis, between the objects' depths.
    cx, cy, cz = scene.orbit_center
    assert abs(cx) < 1e-9 and abs(cy) < 1e-9 and -0.7 < cz < 0.1


def test_renders_keep_the_aspect_ratio_and_frame_counts(two_spheres):
    out = two_spheres["out"]
    for name in ("fixed", "orbit_horizontal", "orbit_elevation"):
        for suffix in (".mp4", ".gif"):
            frames = read_video_frames(out / "renders" / f"{name}{suffix}")
            assert frames.shape[0] == T * 2, (name, suffix, frames.shape)  # looped twice
            assert frames.shape[1:3] == (48, 72), (name, suffix, frames.shape)
        assert (out / "renders" / f"{name}_frame.png").is_file()
    gif = read_video_frames(out / "renders" / "fixed.gif").astype(float)
    # The fixed path is the input view: frame t looks like the (downsampled) input frame t on white.
    assert gif[0].std() > 10 and np.abs(gif[0] - gif[T]).max() == 0
    horizontal = read_video_frames(out / "renders" / "orbit_horizontal.gif").astype(float)
    np.testing.assert_array_equal(horizontal[0], gif[0])  # orbit frame 0 is the input view
    assert np.abs(horizontal[T // 2] - gif[T // 2]).mean() > 3  # half-way round the scene differs
    report = two_spheres["report"]
    assert set(report["previews"]) >= {"renders/fixed_frame.png", "tracks/tracks_overlay_frame.png"}
    for preview in report["previews"]:
        assert (out / preview).is_file()


def test_progress_events_cover_the_sweep_and_renders(two_spheres):
    events = two_spheres["events"]
    progress = [e for e in events if e.get("type") == "progress"]
    assert {e["phase"] for e in progress} >= {"depth", "k_sweep", "render"}
    assert all(e["stage"] == "compose" and e["object"] is None for e in progress)
    last_render = [e for e in progress if e["phase"] == "render"][-1]
    assert last_render["step"] == last_render["total"] == T


@pytest.fixture(scope="module")
def translating_disc(tmp_path_factory):
    """A flat disc moving right by a known amount per frame, and a static disc in front of it that
    it slides behind; no depth model (the fallback keeps the given depths)."""
    moving = disc(900, 0.3, [-0.35, 0.0, 0.0], (0.9, 0.7, 0.1), seed=3)
    blocker = disc(600, 0.12, [0.2, 0.0, 0.8], (0.1, 0.8, 0.3), seed=4)
    step = [0.08, 0.0, 0.0]
    baked = [animate(moving, step), animate(blocker, [0.0, 0.0, 0.0])]
    video, _ = make_video(baked)
    motion = {"001": {"baked": baked[0]}, "002": {"baked": baked[1]}}
    out_dir = tmp_path_factory.mktemp("compose_discs")
    config = small_config(depth_model="none", write_ply_sequence=True)
    report = compose_scene(video, motion, config, "cpu", out_dir, lambda e: None, None)
    return {"report": report, "out": out_dir, "video": video, "step": step}


def test_depth_fallback_is_named_and_keeps_a_consistent_placement(translating_disc):
    report = translating_disc["report"]
    assert report["depth_provider"] == "fallback:occlusion-order"
    assert "none" in report["depth_note"]
    # The blocker is already in front where the masks say it is: nothing moves.
    assert report["k"] == {"001": 1.0, "002": 1.0}


def test_depth_fallback_puts_the_occluder_in_front(tmp_path):
    """Disc 001 truly at depth 1.8 covers part of disc 002 (depth 2), but arrives at depth 2.3 (same
    image, behind 002).  Without a depth model the masks still show 001 in front, so the fallback
    brings it just in front: k slightly below 2.0 / 2.3."""
    front = disc(500, 0.25, [-0.15, 0.0, 0.2], (0.9, 0.2, 0.2), seed=7)
    back = disc(500, 0.3, [0.2, 0.0, 0.0], (0.2, 0.2, 0.9), seed=8)
    baked_front, baked_back = animate(front, [0.0, 0.0, 0.0]), animate(back, [0.0, 0.0, 0.0])
    video, _ = make_video([baked_front, baked_back])
    wrong = scale_about_center(baked_front, torch.tensor(CENTER, dtype=torch.float32), 2.3 / 1.8)
    motion = {"001": {"baked": wrong}, "002": {"baked": baked_back}}
    report = compose_scene(video, motion, small_config(depth_model="none"), "cpu", tmp_path, lambda e: None)
    k = report["k"]["001"]
    assert 0.8 < k < 2.0 / 2.3, report["notes"]
    assert report["iou"] > 0.95 and report["psnr"] > 30.0, report["per_frame"]
    assert any("agree 100%" in note for note in report["notes"]), report["notes"]


def test_tracks_follow_a_translating_disc(translating_disc):
    data = np.load(translating_disc["out"] / "tracks" / "tracks.npz")
    points, visible, objects = data["points"], data["visible"], data["object"]
    assert points.shape[0] == T and points.shape[2] == 2 and visible.shape == points.shape[:2]
    moving = objects == 0
    assert moving.sum() > 50 and (objects == 1).sum() > 10
    # The disc sits at depth 2 facing the camera: its image moves by f * dx / 2 pixels a frame.
    shift = FOCAL * translating_disc["step"][0] / 2.0
    for t in range(T):
        displacement = points[t, moving] - points[0, moving]
        np.testing.assert_allclose(displacement[:, 0], shift * t, atol=1.0)
        np.testing.assert_allclose(displacement[:, 1], 0.0, atol=1.0)
    # Frame 0 positions are the matched Gaussians, within the matching radius of the grid points.
    assert np.abs(points[0] - data["query"]).max() < 4.0
    assert visible[0].all()
    # Later the moving disc slides behind the blocker: tracks under it are hidden, the rest are not.
    video = translating_disc["video"]
    blocker_mask = video.masks[1, T - 1]
    last = points[T - 1, moving]
    ix, iy = np.floor(last[:, 0]).astype(int), np.floor(last[:, 1]).astype(int)
    under = blocker_mask[np.clip(iy, 0, H - 1), np.clip(ix, 0, W - 1)]
    assert under.sum() > 5 and (~under).sum() > 5
    assert not visible[T - 1, moving][under].any()
    assert visible[T - 1, moving][~under].mean() > 0.95
    assert (translating_disc["out"] / "tracks" / "tracks_overlay.mp4").is_file()
    overlay = read_video_frames(translating_disc["out"] / "tracks" / "tracks_overlay.gif")
    assert overlay.shape == (T, H, W, 3)


def test_grid_points_lie_inside_the_mask():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 5:25] = True
    mask[15:20, 10:15] = False
    points = grid_points(mask, 48)
    assert len(points) > 100
    assert mask[points[:, 1].astype(int), points[:, 0].astype(int)].all()
    np.testing.assert_allclose(points % 1.0, 0.5)  # pixel centres


def test_orbit_paths_start_at_the_input_view_and_keep_the_radius():
    center = np.array([0.0, 0.0, -0.4])
    radius = np.linalg.norm(CAMERA.center - center)
    first = orbit_camera(CAMERA, center, *orbit_angles("horizontal", 12)[0])
    np.testing.assert_allclose(first.viewmat, CAMERA.viewmat, atol=1e-12)
    for path in ("horizontal", "elevation"):
        angles = orbit_angles(path, 12)
        for e, a in angles:
            cam = orbit_camera(CAMERA, center, e, a)
            assert abs(np.linalg.norm(cam.center - center) - radius) < 1e-9
            # The orbit centre stays in the middle of the view.
            uv, depth = cam.project(center[None])
            np.testing.assert_allclose(uv[0], [W / 2, H / 2], atol=1e-6)
    elevations = [e for e, _ in orbit_angles("elevation", 12)]
    assert elevations[0] == 75.0 and min(elevations) == -75.0
    azimuths = [a for _, a in orbit_angles("horizontal", 12)]
    assert azimuths[0] == 0.0 and azimuths[-1] == pytest.approx(330.0)
    # Negative elevation looks from above (+Y), as in cameras.py.
    above = orbit_camera(CAMERA, center, -45.0, 0.0)
    assert above.center[1] > 0


def test_cancel_stops_the_composition(tmp_path):
    g = animate(sphere(50, 0.3, [0.0, 0.0, 0.0], (0.5, 0.5, 0.5), seed=5), [0.0, 0.0, 0.0])
    video, _ = make_video([g])
    with pytest.raises(JobCancelled):
        compose_scene(
            video, {"001": {"baked": g}}, small_config(), "cpu", tmp_path, lambda e: None, lambda: True
        )
    assert not (tmp_path / "scene.json").exists()


def test_single_object_needs_no_depth(tmp_path):
    g = animate(sphere(80, 0.3, [0.0, 0.0, 0.0], (0.5, 0.5, 0.5), seed=6), [0.01, 0.0, 0.0])
    video, _ = make_video([g])
    report = compose_scene(video, {"001": {"baked": g}}, small_config(), "cpu", tmp_path, lambda e: None)
    assert report["depth_provider"] == "unused:single-object"
    assert report["k"] == {"001": 1.0}
    assert read_scene(tmp_path).objects["001"]["means"].shape == (T, 80, 3)


def test_ply_sequence_has_one_file_per_frame(translating_disc):
    out, video = translating_disc["out"], translating_disc["video"]
    scene = read_scene(out)
    plys = sorted((out / "objects" / "001_ply").glob("*.ply"))
    assert [p.stem for p in plys] == video.frame_names
    last = ply.read_ply(plys[-1])
    np.testing.assert_allclose(last["means"], scene.objects["001"]["means"][-1], atol=1e-6)
