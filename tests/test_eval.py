"""Evaluation metrics on hand-made cases, the synthetic generator, and eval end to end on its truth."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.cameras import Camera
from backend.eval import (
    PSNR_CAP_DB,
    add_eval_arguments,
    end_point_errors,
    eval_main,
    mask_iou,
    match_tracks,
    psnr,
    ssim,
)
from backend.synthetic.spec import build_scene
from backend.synthetic.views import EVAL_VIEWS, orbit_about, scene_pivot

HAS_BPY = importlib.util.find_spec("bpy") is not None
needs_bpy = pytest.mark.skipif(not HAS_BPY, reason="the synthetic generator needs the bpy module")


# ---- metrics with known answers -------------------------------------------------------------
def test_psnr_identical_is_infinite_and_capped_in_averages():
    rng = np.random.default_rng(0)
    img = rng.random((32, 48, 3))
    assert psnr(img, img) == math.inf
    from backend.eval import _mean_psnr

    assert _mean_psnr([math.inf, 30.0]) == pytest.approx((PSNR_CAP_DB + 30.0) / 2)


def test_psnr_known_noise_level():
    # A constant offset of 0.1 everywhere: MSE 0.01 -> exactly 20 dB.
    img = np.full((16, 16, 3), 0.5)
    assert psnr(img, img + 0.1) == pytest.approx(20.0, abs=1e-9)
    # Gaussian noise of sigma 0.05: PSNR ~ 10 log10(1 / 0.0025) = 26.02 dB.
    rng = np.random.default_rng(1)
    base = np.full((256, 256, 3), 0.5)
    noisy = base + rng.normal(0.0, 0.05, base.shape)
    assert psnr(base, noisy) == pytest.approx(26.02, abs=0.1)


def test_ssim_identical_is_one_and_drops_with_noise():
    rng = np.random.default_rng(2)
    img = rng.random((40, 50, 3))
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    smooth = np.tile(np.linspace(0.2, 0.8, 50), (40, 1))
    noisy = np.clip(smooth + rng.normal(0, 0.2, smooth.shape), 0, 1)
    assert ssim(smooth, noisy) < 0.3
    # Symmetric, and grayscale works.
    assert ssim(smooth, noisy) == pytest.approx(ssim(noisy, smooth))


def test_ssim_matches_a_direct_windowed_computation():
    # Straight from the definition: an 11x11 Gaussian window (sigma 1.5) at every valid position.
    rng = np.random.default_rng(4)
    a = rng.random((16, 18))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / g.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(16 - 10):
        for j in range(18 - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert ssim(a, b) == pytest.approx(np.mean(values), rel=1e-10)


def test_ssim_of_constant_images_matches_the_formula():
    # Flat images: variances and covariance vanish, so SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1).
    a, b = np.full((20, 20), 0.2), np.full((20, 20), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_mask_iou_known_cases():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert mask_iou(a, b) == 1.0  # both empty
    a[:5] = True
    assert mask_iou(a, a) == 1.0
    b[:, :5] = True
    # 25 shared pixels out of 75 covered.
    assert mask_iou(a, b) == pytest.approx(25 / 75)
    assert mask_iou(a, ~a) == 0.0


def test_shifted_track_has_the_known_end_point_error():
    T, P = 6, 10
    rng = np.random.default_rng(3)
    gt = rng.uniform(0, 100, (T, P, 2))
    visible = np.ones((T, P), bool)
    visible[3:, :4] = False  # four points occluded from frame 3 on
    pred = gt.copy()
    pred[1:] += np.array([3.0, 4.0])  # every frame after the query is off by 5 px
    pred[3:, :4] += np.array([6.0, 8.0])  # occluded points drift by 10 px more
    result = end_point_errors(pred, gt, visible)
    assert result["epe_visible"] == pytest.approx(5.0)
    assert result["epe_occluded"] == pytest.approx(15.0)
    assert result["num_occluded"] == 3 * 4
    # Frame 0 (the query frame) is excluded: an error there alone gives zero.
    only_first = gt.copy()
    only_first[0] += 50
    assert end_point_errors(only_first, gt, visible)["epe_visible"] == 0.0


def test_tracks_are_matched_per_object_by_their_start():
    queries = np.array([[10.0, 10.0], [50.0, 50.0]])
    objects = np.array(["001", "002"])
    recon = np.zeros((2, 3, 2))
    recon[0] = [[49.0, 50.0], [11.0, 10.0], [52.0, 50.0]]
    recon_objects = np.array(["002", "001", "002"])
    assert match_tracks(recon, recon_objects, queries, objects).tolist() == [1, 0]


# ---- views ------------------------------------------------------------------------------------
def test_orbit_about_reproduces_the_method_orbit_for_the_reference_camera():
    base = Camera.orbit(0.0, 0.0, 2.0, 384, 256)
    for _, e, a in EVAL_VIEWS:
        expected = Camera.orbit(e, a, 2.0, 384, 256).viewmat
        np.testing.assert_allclose(orbit_about(base.viewmat, np.zeros(3), e, a), expected, atol=1e-9)


def test_views_are_invariant_to_scaling_about_the_camera():
    # A reconstruction that is the truth scaled about the camera centre must see the same images.
    base = Camera.orbit(0.0, 0.0, 2.0, 384, 256)
    centers = np.array([[-0.4, -0.1, 0.4], [0.5, 0.3, -0.4]])
    point = np.array([0.1, 0.05, 0.35])
    C = base.center
    for k in (0.7, 1.6):
        pivot_a = scene_pivot(base.viewmat, centers)
        pivot_b = scene_pivot(base.viewmat, C + (centers - C) * k)
        for _, e, a in EVAL_VIEWS:
            va = Camera(orbit_about(base.viewmat, pivot_a, e, a), base.K, 384, 256)
            vb = Camera(orbit_about(base.viewmat, pivot_b, e, a), base.K, 384, 256)
            uv_a, _ = va.project(point[None])
            uv_b, _ = vb.project((C + (point - C) * k)[None])
            np.testing.assert_allclose(uv_a, uv_b, atol=1e-9)


def test_scene_spec_is_deterministic_and_the_objects_cross():
    a, b = build_scene(5, 16, 384, 256), build_scene(5, 16, 384, 256)
    for oa, ob in zip(a.objects, b.objects):
        np.testing.assert_array_equal(oa.poses, ob.poses)
    c = build_scene(6, 16, 384, 256)
    assert not np.array_equal(a.objects[0].poses, c.objects[0].poses)
    cube, sphere = a.objects
    # The cube is nearer the camera (+Z is towards it) and they swap sides in the image.
    assert np.all(cube.centers[:, 2] > sphere.centers[:, 2])
    assert cube.centers[0, 0] < sphere.centers[0, 0] and cube.centers[-1, 0] > sphere.centers[-1, 0]


# ---- generator --------------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    if not HAS_BPY:
        pytest.skip("the synthetic generator needs the bpy module")
    from backend.synthetic.generate import generate_scene

    out = tmp_path_factory.mktemp("synthetic") / "scene"
    generate_scene(out, seed=3, num_frames=5, width=96, height=64, samples=2, log=lambda *_: None)
    return out


@needs_bpy
def test_generator_is_deterministic_and_cached(tiny_scene, tmp_path):
    from backend.synthetic.generate import generate_scene

    again = tmp_path / "again"
    generate_scene(again, seed=3, num_frames=5, width=96, height=64, samples=2, log=lambda *_: None)
    assert _digest(tiny_scene) == _digest(again)
    # A matching manifest is reused as is: nothing is rewritten.
    messages = []
    stamp = (again / "gt" / "gt.json").stat().st_mtime_ns
    generate_scene(again, seed=3, num_frames=5, width=96, height=64, samples=2, log=messages.append)
    assert "cached" in messages[0]
    assert (again / "gt" / "gt.json").stat().st_mtime_ns == stamp


@needs_bpy
def test_generator_layout_masks_and_occlusion(tiny_scene):
    frames = sorted((tiny_scene / "JPEGImages" / "synthetic").glob("*.png"))
    assert [p.name for p in frames] == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png"]
    assert Image.open(frames[0]).size == (96, 64)
    gt = json.loads((tiny_scene / "gt" / "gt.json").read_text())
    occluded_pixels = 0
    for obj in gt["objects"]:
        for frame in frames:
            modal = (
                np.array(Image.open(tiny_scene / "Annotations" / "synthetic" / obj["id"] / frame.name)) > 127
            )
            amodal = np.array(Image.open(tiny_scene / "gt" / "amodal" / obj["id"] / frame.name)) > 127
            assert modal.any(), f"{obj['id']} {frame.name}: empty mask"
            # The visible part lies inside the whole silhouette (up to anti-aliasing at its rim).
            assert (modal & ~amodal).sum() <= 0.05 * modal.sum()
            occluded_pixels += int((amodal & ~modal).sum())
        assert np.array(
            Image.open(tiny_scene / "gt" / "views" / obj["id"] / EVAL_VIEWS[0][0] / frames[0].name)
        ).shape == (64, 64, 4)
    assert occluded_pixels > 20, "one object should pass partly in front of the other"
    for view, _, _ in EVAL_VIEWS:
        rgba = np.array(Image.open(tiny_scene / "gt" / "views" / "scene" / view / frames[-1].name))
        assert rgba.shape == (64, 96, 4) and (rgba[..., 3] > 0).any()
    assert len(gt["objects"][0]["poses"]) == 5


@needs_bpy
def test_generator_tracks_are_in_bounds_and_see_occlusion(tiny_scene):
    tracks = np.load(tiny_scene / "gt" / "tracks.npz")
    points, visible, objects = tracks["points"], tracks["visible"], tracks["object"]
    T, P, _ = points.shape
    assert T == 5 and P > 20 and set(objects.tolist()) == {"001", "002"}
    assert visible[0].all(), "queries are taken where the object is visible"
    inside = (points[..., 0] >= 0) & (points[..., 0] < 96) & (points[..., 1] >= 0) & (points[..., 1] < 64)
    assert inside[visible].all()
    assert (~visible[1:]).any(), "some points must become hidden"
    # Visible points land on their own object's mask.
    on_mask = []
    for t in range(T):
        for oid in ("001", "002"):
            mask = np.array(Image.open(tiny_scene / "Annotations" / "synthetic" / oid / f"{t:05d}.png")) > 127
            px = np.floor(points[t, visible[t] & (objects == oid)]).astype(int)
            on_mask.extend(mask[px[:, 1], px[:, 0]].tolist())
    assert len(on_mask) > 2 * P and np.mean(on_mask) > 0.95


# ---- eval end to end on a reconstruction built from the truth ---------------------------------
def _surface_points(shape: str, size: float, spacing: float) -> np.ndarray:
    if shape == "cube":
        h = size / 2
        g = np.arange(-h + spacing / 2, h, spacing)
        u, v = np.meshgrid(g, g, indexing="ij")
        u, v = u.ravel(), v.ravel()
        faces = []
        for axis in range(3):
            for sign in (-h, h):
                p = np.zeros((len(u), 3))
                p[:, axis] = sign
                p[:, (axis + 1) % 3], p[:, (axis + 2) % 3] = u, v
                faces.append(p)
        return np.concatenate(faces)
    n = int(4 * math.pi * size**2 / spacing**2)
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return size * np.stack([np.cos(theta) * np.sin(phi), np.cos(phi), np.sin(theta) * np.sin(phi)], 1)


def write_scene_from_truth(data_root: Path, out: Path) -> None:
    """Gaussians on the true surfaces, coloured from the first input frame that sees them."""
    from shared.scene import write_scene

    gt = json.loads((data_root / "gt" / "gt.json").read_text())
    W, H = gt["image_size"]
    cam = Camera(np.array(gt["camera"]["viewmat"]), np.array(gt["camera"]["K"]), W, H)
    depth = np.load(data_root / "gt" / "depth.npz")["depth"]
    frames = [
        np.asarray(Image.open(data_root / "JPEGImages" / "synthetic" / f"{n}.png"), dtype=np.float32) / 255
        for n in gt["frame_names"]
    ]
    spacing = gt["camera"]["viewmat"][2][3] / cam.K[1, 1]  # a pixel at the scene centre
    objects = {}
    for obj in gt["objects"]:
        local = _surface_points(obj["shape"], obj["size"], spacing)
        poses = np.array(obj["poses"])
        means = np.einsum("tij,nj->tni", poses[:, :3, :3], local) + poses[:, None, :3, 3]
        colors = np.full((len(local), 3), np.nan)
        for t in range(len(frames)):
            uv, z = cam.project(means[t])
            c = np.clip(np.floor(uv).astype(int), 0, [W - 1, H - 1])
            seen = (
                np.isnan(colors[:, 0])
                & (z <= depth[t][c[:, 1], c[:, 0]] * 1.02)
                & (depth[t][c[:, 1], c[:, 0]] > 0)
            )
            colors[seen] = frames[t][c[seen, 1], c[seen, 0]]
        colors[np.isnan(colors[:, 0])] = np.nanmean(colors, axis=0)
        T, N = len(poses), len(local)
        objects[obj["id"]] = {
            "means": means,
            "quats": np.tile([1.0, 0, 0, 0], (T, N, 1)),
            "scales": np.full((T, N, 3), spacing * 0.3),
            "opacities": np.full(N, 0.95),
            "colors": colors,
        }
    meta = {
        "fps": 8.0,
        "image_size": [W, H],
        "frame_names": gt["frame_names"],
        "camera": {"K": gt["camera"]["K"], "viewmat": gt["camera"]["viewmat"]},
    }
    write_scene(out, meta, objects)


def _eval_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


@needs_bpy
def test_eval_scores_a_reconstruction_made_from_the_truth(tiny_scene, tmp_path):
    scene_dir = tmp_path / "recon"
    write_scene_from_truth(tiny_scene, scene_dir)
    args = _eval_args(
        [
            "--scene",
            str(scene_dir),
            "--gt",
            str(tiny_scene / "gt"),
            "--out",
            str(tmp_path / "eval"),
            "--novel-frames",
            "2",
        ]
    )
    assert eval_main(args) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"input_view", "novel_view", "tracks", "seconds"}
    assert set(metrics["input_view"]) == {"psnr", "ssim", "iou"}
    assert set(metrics["novel_view"]) == {"psnr", "ssim"}
    assert set(metrics["tracks"]) == {"epe_visible", "epe_occluded"}
    assert metrics["input_view"]["iou"] > 0.75  # small masks at 96x64: a pixel of rim costs ~0.1
    assert metrics["input_view"]["psnr"] > 20
    assert metrics["novel_view"]["psnr"] > 17
    # Tracks of the true surface points: off only by the choice of Gaussian near each query.
    assert metrics["tracks"]["epe_visible"] < 1.5
    assert metrics["tracks"]["epe_occluded"] < 1.5
    sheet = Image.open(tmp_path / "eval" / "contact_sheet.png")
    assert sheet.width > 300 and sheet.height > 300

    # Without ground truth only the input view is scored.
    args = _eval_args(
        [
            "--scene",
            str(scene_dir),
            "--data",
            str(tiny_scene),
            "--video",
            "synthetic",
            "--out",
            str(tmp_path / "eval2"),
        ]
    )
    assert eval_main(args) == 0
    metrics2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert metrics2["input_view"] == pytest.approx(metrics["input_view"])
    assert metrics2["novel_view"] == {"psnr": None, "ssim": None}
    assert metrics2["tracks"] == {"epe_visible": None, "epe_occluded": None}


@needs_bpy
def test_eval_reports_a_wrongly_placed_reconstruction_as_worse(tiny_scene, tmp_path):
    from shared.scene import read_scene, write_scene

    good = tmp_path / "good"
    write_scene_from_truth(tiny_scene, good)
    scene = read_scene(good, mmap=False)
    shifted = {oid: {k: np.array(v) for k, v in arrays.items()} for oid, arrays in scene.objects.items()}
    shifted["001"]["means"] = shifted["001"]["means"] + np.array([0.08, 0.0, 0.0], dtype=np.float32)
    write_scene(tmp_path / "bad", dict(scene.meta), shifted)
    results = {}
    for name in ("good", "bad"):
        args = _eval_args(
            [
                "--scene",
                str(tmp_path / name),
                "--data",
                str(tiny_scene),
                "--video",
                "synthetic",
                "--out",
                str(tmp_path / f"e_{name}"),
            ]
        )
        assert eval_main(args) == 0
        results[name] = json.loads((tmp_path / f"e_{name}" / "metrics.json").read_text())
    assert results["bad"]["input_view"]["iou"] < results["good"]["input_view"]["iou"] - 0.05
    assert results["bad"]["input_view"]["psnr"] < results["good"]["input_view"]["psnr"]


def test_eval_without_ground_truth_or_data_is_an_input_error(tmp_path):
    from backend.errors import InputError
    from backend.eval import EvalInputs

    with pytest.raises(InputError, match="--gt DIR, or --data ROOT"):
        EvalInputs.from_args(_eval_args(["--scene", str(tmp_path)]))
    with pytest.raises(InputError, match="no gt.json"):
        EvalInputs.from_args(_eval_args(["--scene", str(tmp_path), "--gt", str(tmp_path)]))


def test_novel_frames_are_evenly_spaced_and_include_the_ends():
    from backend.eval import select_novel_frames

    assert select_novel_frames(16, 4) == [0, 5, 10, 15]
    assert select_novel_frames(16, 0) == list(range(16))
    assert select_novel_frames(3, 4) == [0, 1, 2]
