"""Config loading, camera conventions, the Gaussian model and its densify strategy, losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.cameras import Camera, input_camera, intrinsics_from_fovy, orbit_position
from backend.config import load_config, save_config
from backend.errors import InputError
from backend.gaussians import DensifyStrategy, GaussianModel, final_prune, make_optimizer
from backend.losses import WeightedLosses, balanced_mse, mask_iou, psnr_in_mask

# ---- config ------------------------------------------------------------------------------------


def test_presets_load_and_full_has_published_numbers():
    full = load_config("full")
    assert full.stage1.iters == 1000 and full.stage1.novel_views == 16
    assert full.stage1.loss_weights == {"rgb": 10000.0, "mask": 1000.0, "sds": 1.0}
    assert full.stage2.steps_per_frame == 100 and full.stage2.frames_per_step == 10
    assert full.stage2.deformation.spatial_resolutions == [64, 128, 256, 512]
    assert full.guidance.guidance_scale == 5.0
    lite, cpu = load_config("lite"), load_config("cpu-demo")
    assert lite.stage2.steps_per_frame == 30
    assert cpu.stage1.iters < full.stage1.iters and cpu.guidance.model == "none"


def test_override_sets_nested_leaf_and_keeps_siblings():
    cfg = load_config(
        "full", ["stage1.iters=300", "stage1.loss_weights.sds=0.5", "stage2.deformation.hidden=32"]
    )
    assert cfg.stage1.iters == 300
    assert cfg.stage1.loss_weights == {"rgb": 10000.0, "mask": 1000.0, "sds": 0.5}
    assert cfg.stage2.deformation.hidden == 32
    # A mapping the preset file does not restate keeps its other entries too.
    cfg = load_config("cpu-demo", ["stage2.loss_weights.flow=0"])
    assert cfg.stage2.loss_weights["flow"] == 0.0 and cfg.stage2.loss_weights["rigidity"] == 50000.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stage1.iterz=3", "stage1.iterz"),
        ("nonsense=1", "nonsense"),
        ("stage2.deformation.planes=3", "stage2.deformation.planes"),
        ("stage1.iters=many", "stage1.iters"),
        ("stage1.iters", "key=value"),
        ("stage2.placement_model=affine", "stage2.placement_model"),
    ],
)
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(InputError, match=fragment.replace(".", r"\.")):
        load_config("full", [override])


def test_unknown_preset_lists_choices():
    with pytest.raises(InputError, match="cpu-demo"):
        load_config("fastest")


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("stage1:\n  iters: 5\n  speed: 3\n")
    with pytest.raises(InputError, match=r"stage1\.speed"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("cpu-demo", ["stage1.iters=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


# ---- cameras -----------------------------------------------------------------------------------


def test_orbit_position_convention():
    np.testing.assert_allclose(orbit_position(0, 0, 2), [0, 0, 2], atol=1e-12)
    np.testing.assert_allclose(orbit_position(0, 90, 2), [2, 0, 0], atol=1e-12)
    np.testing.assert_allclose(orbit_position(-90, 0, 2), [0, 2, 0], atol=1e-12)  # negative = above
    np.testing.assert_allclose(orbit_position(30, 0, 2), [0, -1, math.sqrt(3)], atol=1e-12)


@pytest.mark.parametrize("elevation", [-60, -30, 0, 20, 45])
@pytest.mark.parametrize("azimuth", [-120, 0, 45, 90, 180])
def test_origin_projects_to_centre_and_up_is_up(elevation, azimuth):
    cam = Camera.orbit(elevation, azimuth, 2.0, 200, 100)
    (uv,), (depth,) = cam.project(np.zeros((1, 3)))
    np.testing.assert_allclose(uv, [100, 50], atol=1e-9)
    assert depth == pytest.approx(2.0)
    # World +Y shows above the centre from every orbit view that is not straight down.
    (uv_up,), _ = cam.project(np.array([[0.0, 0.1, 0.0]]))
    assert uv_up[1] < 50 and uv_up[0] == pytest.approx(100, abs=1e-6)


def test_known_points_land_on_expected_pixels():
    size = 256
    focal = 0.5 * size / math.tan(math.radians(49.1) / 2)
    # Reference view: +X to the right, +Y up.
    ref = Camera.orbit(0, 0, 2.0, size, size)
    (uv,), _ = ref.project(np.array([[0.5, 0.25, 0.0]]))
    np.testing.assert_allclose(uv, [128 + focal * 0.5 / 2, 128 - focal * 0.25 / 2], atol=1e-9)
    # From +X (azimuth 90): +Z appears on the left.
    side = Camera.orbit(0, 90, 2.0, size, size)
    (uv,), _ = side.project(np.array([[0.0, 0.0, 0.5]]))
    np.testing.assert_allclose(uv, [128 - focal * 0.5 / 2, 128], atol=1e-9)
    # Straight down from above (elevation -90): +X right, +Z down the image.
    top = Camera.orbit(-90, 0, 2.0, size, size)
    (uv,), _ = top.project(np.array([[0.5, 0.0, 0.25]]))
    np.testing.assert_allclose(uv, [128 + focal * 0.5 / 2, 128 + focal * 0.25 / 2], atol=1e-9)
    # From below at elevation 30 a point on the orbit direction stays at the centre.
    below = Camera.orbit(30, 0, 2.0, size, size)
    (uv,), (depth,) = below.project(orbit_position(30, 0, 1.0)[None])
    np.testing.assert_allclose(uv, [128, 128], atol=1e-9)
    assert depth == pytest.approx(1.0)


def test_unproject_inverts_project_and_input_camera_keeps_aspect():
    cam = input_camera(384, 256)
    assert cam.K[0, 0] == cam.K[1, 1] == pytest.approx(intrinsics_from_fovy(49.1, 384, 256)[1, 1])
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (10, 3))
    uv, depth = cam.project(pts)
    np.testing.assert_allclose(cam.unproject(uv, depth), pts, atol=1e-9)
    small = cam.resized(192, 128)
    np.testing.assert_allclose(small.project(pts)[0], uv / 2, atol=1e-9)


# ---- Gaussians ---------------------------------------------------------------------------------


def test_random_ball_init_follows_method():
    model = GaussianModel.random_ball(500, 0.5, generator=torch.Generator().manual_seed(0))
    a = model.activated()
    assert a["means"].norm(dim=1).max() <= 0.5 + 1e-6
    assert torch.allclose(a["opacities"], torch.full((500,), 0.1), atol=1e-5)
    assert torch.allclose(a["colors"], torch.full((500, 3), 0.5))
    assert torch.equal(a["quats"], torch.tensor([1.0, 0, 0, 0]).repeat(500, 1))
    assert (a["scales"] > 0.005).all() and (a["scales"] < 0.2).all()


def test_state_dict_is_versioned_and_round_trips():
    model = GaussianModel.random_ball(50, 0.5)
    state = model.state()
    assert state["format"] == "dreamscene4d-gaussians" and state["version"] == 1
    again = GaussianModel.from_state(state)
    for name, value in again.activated().items():
        assert torch.allclose(value, model.activated()[name])
    with pytest.raises(ValueError, match="version"):
        GaussianModel.from_state({**state, "version": 99})


def test_ply_round_trip(tmp_path):
    model = GaussianModel.random_ball(64, 0.5)
    with torch.no_grad():
        model.color_logits.uniform_(-2, 2)
        model.opacity_logits.uniform_(-2, 2)
    model.save_ply(tmp_path / "g.ply")
    again = GaussianModel.load_ply(tmp_path / "g.ply")
    for name, value in again.activated().items():
        assert torch.allclose(value, model.activated()[name], atol=1e-5), name


def _strategy_setup(n=100):
    model = GaussianModel.random_ball(n, 0.5, generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(
        model, {k: 1e-3 for k in ("means", "quats", "log_scales", "opacity_logits", "color_logits")}
    )
    return model, optimizer


def test_densify_clones_small_splits_large_and_keeps_adam_state_aligned():
    model, optimizer = _strategy_setup()
    with torch.no_grad():
        model.log_scales[:10] = math.log(0.002)  # small: cloned
        model.log_scales[10:20] = math.log(0.02)  # large: split
        model.log_scales[20:] = math.log(0.02)
    loss = sum(v.sum() for v in model.activated().values())
    loss.backward()
    optimizer.step()
    strategy = DensifyStrategy(interval=1, grad_threshold=0.01)
    means2d = torch.zeros(1, 100, 2, requires_grad=True)
    means2d.grad = torch.zeros(1, 100, 2)
    means2d.grad[0, :20] = 1.0  # hot only for the first 20
    strategy.after_backward(model, means2d, torch.ones(1, 100), 64, 64)
    stats = strategy.after_step(model, optimizer, 1)
    assert stats["cloned"] == 10 and stats["split"] == 10
    assert len(model) == 100 + 10 + 10  # 10 clones, 10 parents replaced by 20 children
    for group in optimizer.param_groups:
        (param,) = group["params"]
        assert param is getattr(model, group["name"])
        assert optimizer.state[param]["exp_avg"].shape == param.shape
    split_scales = model.activated()["scales"][-20:]
    assert torch.allclose(
        split_scales, torch.full_like(split_scales, 0.02 / 1.6), rtol=3e-3
    )  # one Adam step moved them by ~1e-3


def test_prune_removes_transparent_and_huge():
    model, optimizer = _strategy_setup()
    with torch.no_grad():
        model.opacity_logits[:5] = -10  # transparent
        model.log_scales[5:8] = math.log(0.5)  # huge
    removed = final_prune(model, optimizer, 0.01, 0.1)
    assert removed >= 8 and len(model) == 100 - removed


# ---- losses ------------------------------------------------------------------------------------


def test_balanced_mse_weights_inside_and_outside_equally():
    a = torch.zeros(1, 10, 10)
    b = torch.zeros(1, 10, 10)
    mask = torch.zeros(1, 10, 10)
    mask[0, 0, 0] = 1  # one pixel inside
    b[0, 0, 0] = 1.0
    assert balanced_mse(a, b, mask) == pytest.approx(1.0)  # the single wrong pixel counts fully


def test_psnr_and_iou():
    a = torch.full((3, 8, 8), 0.5)
    mask = torch.ones(1, 8, 8)
    assert psnr_in_mask(a, a + 0.1, mask) == pytest.approx(20.0, abs=1e-4)
    alpha = torch.zeros(1, 8, 8)
    alpha[:, :4] = 1
    assert mask_iou(alpha, mask) == pytest.approx(0.5)


def test_weighted_losses_reject_mismatched_names():
    with pytest.raises(ValueError, match="without a weight"):
        WeightedLosses({"rgb": 1.0}, ["rgb", "mask"], "stage1.loss_weights")
    with pytest.raises(ValueError, match="weights without a loss"):
        WeightedLosses({"rgb": 1.0, "extra": 2.0}, ["rgb"], "stage1.loss_weights")
    losses = WeightedLosses({"rgb": 2.0, "mask": 3.0}, ["rgb", "mask"], "x")
    total = losses.total({"rgb": torch.tensor(1.0), "mask": torch.tensor(1.0)}, scale={"rgb": 0.5})
    assert float(total) == pytest.approx(4.0)
