"""Stage-2 building blocks: deformation field, frame sampling, flow, regularisers, placement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.motion.flow import (
    compute_flows,
    flow_loss,
    forward_backward_consistency,
    gaussian_displacement_colors,
)
from backend.motion.frames import sample_frames
from backend.motion.hexplane import DeformationConfig, DeformationField, normalised_time
from backend.motion.placement import FramePlacement
from backend.motion.regularizers import (
    knn,
    local_rigidity_loss,
    local_scale_consistency_loss,
    neighbour_weights,
    quat_multiply,
    quat_to_rotmat,
    scale_deviation_loss,
)

SMALL = DeformationConfig(plane_channels=8, spatial_resolutions=[8, 16], hidden=16)


def random_gaussians(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 2.0
    log_scales = torch.randn(n, 3, generator=g) - 3.0
    quats = torch.randn(n, 4, generator=g) * 2.0  # deliberately not unit length
    return means, log_scales, quats


# ---------------------------------------------------------------- deformation field


def test_default_config_matches_method():
    cfg = DeformationConfig()
    assert cfg.plane_channels == 32 and list(cfg.spatial_resolutions) == [64, 128, 256, 512]
    assert cfg.bounds == 1.6 and cfg.hidden == 64
    assert cfg.time_resolution(10) == 25 and cfg.time_resolution(100) == 80 and cfg.time_resolution(33) == 26
    field = DeformationField(num_frames=40)
    assert field.feature_dim == 128
    assert field.trunk.in_features == 128 and field.trunk.out_features == 64
    shapes = [tuple(p.shape) for p in field.planes[3]]
    assert shapes == [(1, 32, 512, 512)] * 3 + [(1, 32, 32, 512)] * 3  # xy xz yz, then xt yt zt (T res 32)
    # K-planes init: spatial planes in [0.1, 0.5], time planes ones.
    xy, xt = field.planes[0][0], field.planes[0][3]
    assert 0.1 <= xy.min().item() and xy.max().item() <= 0.5 and xy.std().item() > 0.05
    assert torch.all(xt == 1.0)


def test_published_presets_keep_the_canonical_gaussians_frozen():
    from backend.config import load_config

    # Appearance and shape refinement in phase C are departures for the prior-free preset only.
    for preset in ("full", "lite"):
        stage2 = load_config(preset).stage2
        assert stage2.joint_color_lr == 0 and stage2.joint_shape_lr == 0, preset
        assert stage2.joint_lr_factor == 0.1 and stage2.joint_max_side == 0, preset
    cpu = load_config("cpu-demo").stage2
    assert cpu.joint_color_lr > 0 and cpu.joint_shape_lr > 0 and cpu.joint_max_side >= 512


def test_identity_at_start():
    field = DeformationField(num_frames=7, cfg=SMALL)
    means, log_scales, quats = random_gaussians(300)
    for t in (0, 3, 6, torch.randint(0, 7, (300,))):
        m, s, q = field(means, log_scales, quats, t)
        assert torch.equal(m, means) and torch.equal(s, log_scales) and torch.equal(q, quats)


def test_time_mapping():
    assert normalised_time(0, 10) == -1.0
    assert normalised_time(5, 10) == 0.0
    assert math.isclose(normalised_time(9, 10), 0.8)
    assert torch.allclose(normalised_time(torch.tensor([0.0, 2.0]), 4), torch.tensor([-1.0, 0.0]))


def test_gradients_reach_heads_then_planes():
    torch.manual_seed(0)
    field = DeformationField(num_frames=5, cfg=SMALL)
    means, log_scales, quats = random_gaussians(200)
    target = means + 0.1

    def backward_once():
        field.zero_grad(set_to_none=True)
        m, s, q = field(means, log_scales, quats, 2)
        ((m - target) ** 2).sum().add(s.sum()).add(q.sum()).backward()

    backward_once()
    # Zero-initialised last layers get gradient at once ...
    for head in (field.position_head, field.log_scale_head, field.quat_head):
        assert head.out.weight.grad.abs().sum() > 0
    # ... and, since they are zero, nothing upstream does yet.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in field.plane_parameters())
    opt = torch.optim.Adam(field.param_groups())
    opt.step()
    backward_once()
    assert field.trunk.weight.grad.abs().sum() > 0
    assert field.position_head.residual.weight.grad.abs().sum() > 0
    for scale_planes in field.planes:
        for plane in scale_planes:
            assert plane.grad is not None and plane.grad.abs().sum() > 0


def test_field_depends_on_time_after_training_step():
    torch.manual_seed(0)
    field = DeformationField(num_frames=5, cfg=SMALL)
    means, log_scales, quats = random_gaussians(100)
    opt = torch.optim.Adam(field.param_groups())
    for _ in range(100):
        opt.zero_grad()
        m0, _, _ = field(means, log_scales, quats, 0)
        m4, _, _ = field(means, log_scales, quats, 4)
        # frame 0 stays, frame 4 moves +x
        loss = ((m0 - means) ** 2).sum() + ((m4 - means - torch.tensor([0.2, 0, 0])) ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        d0 = (field(means, log_scales, quats, 0)[0] - means).mean(0)
        d4 = (field(means, log_scales, quats, 4)[0] - means).mean(0)
    assert abs((d4[0] - d0[0]).item() - 0.2) < 0.02


def test_param_groups_learning_rates():
    field = DeformationField(num_frames=3, cfg=SMALL)
    groups = field.param_groups()
    by_name = {g["name"]: g for g in groups}
    assert by_name["deformation_planes"]["lr"] == pytest.approx(6.4e-3)
    assert by_name["deformation_mlp"]["lr"] == pytest.approx(6.4e-4)
    assert len(by_name["deformation_planes"]["params"]) == 6 * 2
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(field.parameters()))
    assert field.param_groups(lr_scale=0.1)[0]["lr"] == pytest.approx(6.4e-4)


def test_quaternion_offset_direction_is_added_then_normalised():
    field = DeformationField(num_frames=3, cfg=SMALL)
    with torch.no_grad():
        field.quat_head.out.bias.copy_(torch.tensor([0.0, 0.3, 0.0, 0.0]))
    means, log_scales, quats = random_gaussians(50)
    _, _, q = field(means, log_scales, quats, 1)
    unit = torch.nn.functional.normalize(quats, dim=-1)
    expected = torch.nn.functional.normalize(unit + torch.tensor([0.0, 0.3, 0.0, 0.0]), dim=-1)
    assert torch.allclose(torch.nn.functional.normalize(q, dim=-1), expected, atol=1e-6)


# ---------------------------------------------------------------- frame sampling


@pytest.mark.parametrize("num_frames", [1, 2, 3, 9, 10, 11, 50])
def test_sample_frames_any_length(num_frames):
    rng = np.random.default_rng(0)
    for _ in range(20):
        sample = sample_frames(num_frames, k=10, rng=rng)
        assert len(sample.frames) == min(10, num_frames)
        assert len(set(sample.frames)) == len(sample.frames)
        assert all(0 <= t < num_frames for t in sample.frames)
        assert sample.flow_pairs == [(t - 1, t) for t in sample.frames if t > 0]


def test_sample_frames_covers_all_frames():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(50):
        seen.update(sample_frames(30, k=10, rng=rng).frames)
    assert seen == set(range(30))
    assert sample_frames(1, rng=rng).flow_pairs == []
    with pytest.raises(ValueError, match="num_frames"):
        sample_frames(0)


# ---------------------------------------------------------------- flow


def sinusoid_texture(h: int, w: int, seed: int, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Smooth random texture in [0, 1] sampled at (x - dx, y - dy): an exact sub-pixel shift."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = xs - dx, ys - dy
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w))
    for _ in range(30):
        fx, fy = rng.uniform(-0.4, 0.4, 2)
        image += np.sin(fx * x + fy * y + rng.uniform(0, 2 * np.pi))
    return (image - image.min()) / (image.max() - image.min())


def as_crops(greys: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(greys)[:, None].repeat(3, 1)).float()


@pytest.mark.parametrize("dx,dy", [(3.0, -2.0), (2.5, 1.5), (-4.3, 0.7)])
def test_flow_recovers_translation(dx, dy):
    h, w = 96, 128
    crops = as_crops([sinusoid_texture(h, w, 1), sinusoid_texture(h, w, 1, dx, dy)])
    flows, valid = compute_flows(crops)
    assert flows.shape == (1, 2, h, w) and valid.shape == (1, h, w) and valid.dtype == torch.bool
    interior = flows[0, :, 16:-16, 16:-16]
    error = ((interior[0] - dx) ** 2 + (interior[1] - dy) ** 2).sqrt()
    assert error.max() < 0.5
    assert valid[0, 16:-16, 16:-16].float().mean() > 0.95


def test_compute_flows_single_frame_is_empty():
    flows, valid = compute_flows(torch.ones(1, 3, 16, 20))
    assert flows.shape == (0, 2, 16, 20) and valid.shape == (0, 16, 20)


def test_consistency_marks_occluded_band_invalid():
    # Everything moves 4 px right except a band of frame b that stays put (an occluder):
    # pixels of frame a landing in it have no way back.
    fwd = np.zeros((64, 64, 2), np.float32)
    fwd[..., 0] = 4.0
    bwd = -fwd.copy()
    bwd[:, 30:40] = 0.0
    valid = forward_backward_consistency(fwd, bwd)
    assert valid[:, 10:25].all()
    assert not valid[:, 27:35].any()
    assert valid[:, 40:55].all()
    assert not valid[:, 61:].any()  # leaves the image


def test_consistency_on_estimated_flow_with_occlusion():
    # A textured square slides 12 px right over a static textured background; the background
    # strip it covers in frame 1 is occluded and must fail the check.
    h = w = 128
    background = sinusoid_texture(h, w, 1) * 0.5
    frames = []
    for shift in (0, 12):
        image = background.copy()
        square = sinusoid_texture(h, w, 2, dx=shift) * 0.5 + 0.5
        image[40:88, 40 + shift : 88 + shift] = square[40:88, 40 + shift : 88 + shift]
        frames.append(image)
    flows, valid = compute_flows(as_crops(frames))
    valid = valid[0].numpy()
    assert valid[44:84, 89:99].mean() < 0.2  # occluded strip
    assert valid[8:32, 8:120].mean() > 0.9  # static background
    assert valid[44:84, 44:84].mean() > 0.9  # moving square
    assert abs(np.median(flows[0, 0, 48:80, 48:80].numpy()) - 12.0) < 0.5


def test_flow_loss_normalisation_and_regions():
    h, w = 10, 20
    flow = torch.zeros(2, h, w)
    flow[0] = 4.0  # 4 px right inside the mask
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:, :10] = True
    valid = torch.ones(h, w, dtype=torch.bool)
    rendered = torch.zeros(2, h, w, requires_grad=True)
    # inside: |0 - 4| / W = 0.2; outside target is zero motion: 0
    assert flow_loss(rendered, flow, mask, valid).item() == pytest.approx(4.0 / w)
    # a y error is divided by H
    rendered2 = torch.zeros(2, h, w)
    rendered2[0, :, :10] = 4.0
    rendered2[1, :, 10:] = 1.0
    assert flow_loss(rendered2, flow, mask, valid).item() == pytest.approx(1.0 / h)
    # invalid pixels inside the mask do not count; an empty region contributes 0
    assert flow_loss(rendered, flow, mask, torch.zeros(h, w, dtype=torch.bool)).item() == 0.0
    loss = flow_loss(rendered, flow, mask.float(), valid.float())
    loss.backward()
    assert rendered.grad[0, :, :10].lt(0).all()


def test_gaussian_displacement_colors():
    prev = torch.randn(5, 2, requires_grad=True)
    now = torch.randn(5, 2, requires_grad=True)
    colors = gaussian_displacement_colors(prev, now)
    assert torch.allclose(colors, now - prev)
    colors.sum().backward()
    assert prev.grad is None and torch.all(now.grad == 1)


# ---------------------------------------------------------------- regularisers


def test_knn_matches_brute_force():
    torch.manual_seed(0)
    points = torch.rand(700, 3, dtype=torch.float64)
    idx, dist = knn(points, k=16, max_chunk_elements=700 * 50)  # force many chunks
    full = torch.cdist(points, points)
    full.fill_diagonal_(float("inf"))
    ref_dist, ref_idx = full.topk(16, dim=1, largest=False)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(dist, ref_dist)
    assert not (idx == torch.arange(700)[:, None]).any()


def test_knn_20k_points_quick():
    import time

    points = torch.rand(20000, 3)
    start = time.perf_counter()
    idx, dist = knn(points, k=16)
    assert time.perf_counter() - start < 15.0
    assert idx.shape == (20000, 16) and torch.all(dist[:, 1:] >= dist[:, :-1])


def random_rotation(seed: int) -> torch.Tensor:
    q = torch.nn.functional.normalize(torch.randn(4, generator=torch.Generator().manual_seed(seed)), dim=0)
    return q


def test_rigidity_zero_for_rigid_motion_positive_for_warp():
    means, _, quats = random_gaussians(400, seed=3)
    means = means * 0.3
    idx, dist = knn(means, k=16)
    weights = neighbour_weights(dist)
    q_rigid = random_rotation(5)
    rot = quat_to_rotmat(q_rigid)
    moved = means @ rot.T + torch.tensor([0.3, -0.2, 0.5])
    moved_quats = quat_multiply(q_rigid.expand_as(quats), quats)
    rigid = local_rigidity_loss(means, moved, quats, moved_quats, idx, weights)
    assert rigid.item() < 1e-5
    assert local_rigidity_loss(means, means, quats, quats, idx, weights).item() < 1e-9
    # translating without rotating the Gaussians is rigid too
    shifted = local_rigidity_loss(means, means + 1.0, quats, quats * 3.0, idx, weights)
    assert shifted.item() < 1e-5
    # a bend (rotation angle varying along x) is not
    angle = 2.0 * means[:, 0:1]
    bent = torch.cat(
        [means[:, 0:1], means[:, 1:2] * torch.cos(angle) - means[:, 2:3] * torch.sin(angle),
         means[:, 1:2] * torch.sin(angle) + means[:, 2:3] * torch.cos(angle)],
        dim=1,
    )  # fmt: skip
    assert local_rigidity_loss(means, bent, quats, quats, idx, weights).item() > 1e-3
    # rotating the points but not the Gaussians' frames is also penalised
    assert local_rigidity_loss(means, moved, quats, quats, idx, weights).item() > 1e-3
    stretched = means * torch.tensor([1.5, 1.0, 1.0])
    assert local_rigidity_loss(means, stretched, quats, quats, idx, weights).item() > 1e-3


def test_rigidity_gradient_is_finite_at_identity():
    means, _, quats = random_gaussians(100, seed=4)
    idx, dist = knn(means, k=8)
    deformed = means.clone().requires_grad_(True)
    local_rigidity_loss(means, deformed, quats, quats, idx, neighbour_weights(dist)).backward()
    assert torch.isfinite(deformed.grad).all()


def test_scale_losses():
    means, _, _ = random_gaussians(200, seed=5)
    idx, dist = knn(means, k=16)
    weights = neighbour_weights(dist)
    assert torch.allclose(weights, torch.exp(-10 * dist))
    uniform = torch.full((200, 3), 0.3)
    assert scale_deviation_loss(uniform).item() == pytest.approx(0.3)
    assert local_scale_consistency_loss(uniform, idx, weights).item() < 1e-9
    noisy = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    assert local_scale_consistency_loss(noisy, idx, weights).item() > 0.05


def test_regularisers_over_several_frames_are_the_mean_of_the_per_frame_values():
    means, _, quats = random_gaussians(150, seed=6)
    idx, dist = knn(means, k=8)
    weights = neighbour_weights(dist)
    g = torch.Generator().manual_seed(1)
    deformed = means + 0.05 * torch.randn(4, 150, 3, generator=g)
    deformed_quats = quats + 0.2 * torch.randn(4, 150, 4, generator=g)
    d_log = 0.3 * torch.randn(4, 150, 3, generator=g)
    per_frame = [
        local_rigidity_loss(means, deformed[f], quats, deformed_quats[f], idx, weights) for f in range(4)
    ]
    batched = local_rigidity_loss(means, deformed, quats, deformed_quats, idx, weights)
    assert batched.item() == pytest.approx(torch.stack(per_frame).mean().item(), rel=1e-5)
    assert min(p.item() for p in per_frame) < batched.item() < max(p.item() for p in per_frame)
    per_frame = [local_scale_consistency_loss(d_log[f], idx, weights) for f in range(4)]
    batched = local_scale_consistency_loss(d_log, idx, weights)
    assert batched.item() == pytest.approx(torch.stack(per_frame).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- placement


def test_frame_placement():
    translation = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]])
    scale = np.array([1.0, 2.0, 0.5])
    placement = FramePlacement(translation, scale)
    means = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    scales = torch.full((2, 3), 0.1)
    m, s = placement.apply(means, scales, 1)
    assert torch.allclose(m, means * 2.0 + torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(s, scales * 2.0)
    m_per, s_per = placement.apply(means, scales, torch.tensor([2, 0]))
    assert torch.allclose(m_per[0], means[0] * 0.5 + torch.tensor([-1.0, 0.0, 0.5]))
    assert torch.allclose(m_per[1], means[1]) and torch.allclose(s_per[1], scales[1])
    # translation learns; scale only when asked
    m.sum().backward()
    assert placement.translation.grad[1].abs().sum() > 0 and not placement.log_scale.requires_grad
    learned = FramePlacement(translation, scale, learn_scale=True)
    learned.apply(means, scales, 2)[0].sum().backward()
    assert learned.log_scale.grad[2] != 0
    with pytest.raises(ValueError, match="one scale per frame"):
        FramePlacement(translation, scale[:2])


def _crop_view_in_frame(points: np.ndarray, window) -> np.ndarray:
    """Where the crop camera of stages 1-2 puts object points, in frame pixels."""
    from backend.cameras import Camera

    crop_cam = Camera.orbit(0.0, 0.0, 2.0, window.size, window.size)
    uv, _ = crop_cam.project(points)
    return window.crop_to_frame(uv)


@pytest.mark.parametrize("mode", ["projective", "ray_aligned", "similarity"])
def test_placement_of_several_frames_at_once_matches_frame_by_frame(mode):
    from backend.cameras import input_camera

    video_cam = input_camera(384, 256)
    rng = np.random.default_rng(1)
    translation = video_cam.unproject(rng.uniform(50, 300, (4, 2)), rng.uniform(1.5, 2.5, 4))
    placement = FramePlacement(
        translation, rng.uniform(0.3, 0.6, 4), mode=mode,
        camera_center=video_cam.center, camera_forward=video_cam.c2w[:3, 2],
    )  # fmt: skip
    means = torch.as_tensor(rng.uniform(-0.5, 0.5, (3, 50, 3)), dtype=torch.float32)
    scales = torch.full_like(means, 0.02)
    frames = [2, 0, 3]
    per_gaussian = torch.tensor(frames).repeat_interleave(50)
    world, world_scales = placement.apply(means.reshape(-1, 3), scales.reshape(-1, 3), per_gaussian)
    for j, t in enumerate(frames):
        one, one_scales = placement.apply(means[j], scales[j], t)
        torch.testing.assert_close(world.view(3, 50, 3)[j], one)
        torch.testing.assert_close(world_scales.view(3, 50, 3)[j], one_scales)


@pytest.mark.parametrize("centre", [(296.5, 82.0), (40.0, 230.0), (192.0, 128.0)])
def test_placements_against_the_crop_view(centre):
    from backend.cameras import input_camera
    from backend.crop import CropWindow

    W, H = 384, 256
    window = CropWindow(centre[0], centre[1], side=109.2, size=128, frame_width=W, frame_height=H)
    video_cam = input_camera(W, H)
    points = np.random.default_rng(0).uniform(-0.5, 0.5, (300, 3))
    expected = _crop_view_in_frame(points, window)
    translation = video_cam.unproject(np.array([centre]), np.array([2.0]))
    scale = np.array([window.side / H])
    camera = {"camera_center": video_cam.center, "camera_forward": video_cam.c2w[:3, 2]}
    means = torch.as_tensor(points, dtype=torch.float32)
    errors, shapes = {}, {}
    for mode in ("projective", "ray_aligned", "similarity"):
        placement = FramePlacement(translation, scale, mode=mode, **camera)
        world, _ = placement.apply(means, torch.full_like(means, 0.01), 0)
        world = world.detach().double().numpy()
        uv, _ = video_cam.project(world)
        errors[mode] = np.abs(uv - expected).max()
        shapes[mode] = np.ptp(world @ video_cam.c2w[:3, 2])  # the object's depth along the optical axis
    assert errors["projective"] < 1e-3
    # the published similarity placement leaves the near and far parts apart by several pixels;
    # sliding along the centre's ray removes most of that without changing the object's shape
    assert errors["similarity"] > 2.0
    assert errors["ray_aligned"] <= errors["similarity"] + 1e-6
    if centre != (192.0, 128.0):  # off-centre
        assert errors["ray_aligned"] < 0.4 * errors["similarity"]
    # ray_aligned keeps the uniformly scaled object's depth; projective stretches it by 1 / scale
    assert shapes["ray_aligned"] == pytest.approx(shapes["similarity"], rel=1e-5)
    assert shapes["projective"] == pytest.approx(shapes["similarity"] / scale[0], rel=1e-4)
    with pytest.raises(ValueError, match="needs both camera_center and camera_forward"):
        FramePlacement(translation, scale, mode="ray_aligned", camera_center=video_cam.center)
    with pytest.raises(ValueError, match="mode must be one of"):
        FramePlacement(translation, scale, mode="affine")


def test_phase_c_colour_refinement_is_opt_in(tiny_video):
    from backend.config import load_config
    from backend.data import load_reference_layout
    from backend.gaussians import GaussianModel
    from backend.stage2 import animate_object

    tiny = tiny_video(num_frames=3)
    video = load_reference_layout(tiny.root, tiny.name)
    state = GaussianModel.random_ball(300, 0.5, torch.Generator().manual_seed(0)).state()
    short = [
        "crop_size=48",
        "stage1.placement_max_side=64",
        "stage2.steps_per_frame=1",
        "stage2.placement_iters=5",
        "stage2.joint_iters=15",
        "stage2.joint_max_side=0",
        "stage2.knn=4",
        "stage2.deformation.spatial_resolutions=[8]",
        "stage2.deformation.plane_channels=4",
    ]
    grey = torch.sigmoid(state["params"]["color_logits"])

    config = load_config("cpu-demo", [*short, "stage2.joint_color_lr=0", "stage2.joint_shape_lr=0"])
    frozen = animate_object(video, 0, {"gaussians": state}, config, torch.device("cpu"))
    assert torch.equal(frozen["baked"]["colors"], grey)
    assert frozen["gaussians"] is state

    config = load_config("cpu-demo", [*short, "stage2.joint_color_lr=0.05", "stage2.joint_shape_lr=0"])
    refined = animate_object(video, 0, {"gaussians": state}, config, torch.device("cpu"))
    colours = refined["baked"]["colors"]
    assert (colours - grey).abs().max() > 0.05  # the grey start moved towards the video's colours
    # The canonical state carries the refined colours too, so everything that reads it agrees.
    assert torch.allclose(torch.sigmoid(refined["gaussians"]["params"]["color_logits"]), colours, atol=1e-6)
    assert torch.equal(state["params"]["color_logits"], torch.logit(grey))  # the input is untouched
    assert refined["metrics"]["psnr"] > frozen["metrics"]["psnr"] + 1.0

    # Shape refinement (opacities and log-scales), at a larger phase-C working size than phase B's.
    shape_keys = ("log_scales", "opacity_logits")
    before = {n: state["params"][n].clone() for n in shape_keys}
    config = load_config("cpu-demo", [*short, "stage2.joint_shape_lr=0.02", "stage2.joint_max_side=96"])
    reshaped = animate_object(video, 0, {"gaussians": state}, config, torch.device("cpu"))
    for n in shape_keys:
        assert (reshaped["gaussians"]["params"][n] - before[n]).abs().max() > 1e-3, n
        assert torch.equal(state["params"][n], before[n]), n  # the input is untouched
    opacities = torch.sigmoid(reshaped["gaussians"]["params"]["opacity_logits"])
    assert torch.allclose(reshaped["baked"]["opacities"], opacities, atol=1e-6)
    assert torch.equal(frozen["baked"]["opacities"], torch.sigmoid(before["opacity_logits"]))
    # More freedom in the same number of steps fits the frames better than colours alone.
    assert reshaped["metrics"]["psnr"] > refined["metrics"]["psnr"] + 1.0


def test_learning_rates_must_not_be_negative():
    from backend.config import load_config
    from backend.errors import InputError

    with pytest.raises(InputError, match="stage2.joint_shape_lr.*>= 0"):
        load_config("cpu-demo", ["stage2.joint_shape_lr=-0.1"])
    with pytest.raises(InputError, match="stage2.placement_lr.*>= 0"):
        load_config("full", ["stage2.placement_lr=-1e-3"])
    assert load_config("full", ["stage2.placement_lr=2e-3"]).stage2.placement_lr == 2e-3


@pytest.mark.parametrize(
    "override, message",
    [
        ("crop_size=-5", "'crop_size' must be an integer >= 1, got -5"),
        ("stage2.frames_per_step=0", "'stage2.frames_per_step' must be an integer >= 1"),
        ("stage2.joint_max_side=-1", "'stage2.joint_max_side' must be an integer >= 0"),
        ("seed=-2", "'seed' must be an integer >= 0"),
    ],
)
def test_counts_and_sizes_are_range_checked(override, message):
    from backend.config import load_config
    from backend.errors import InputError

    with pytest.raises(InputError, match=message):
        load_config("cpu-demo", [override])
    # Zero stays valid where it means "off" or "the default".
    config = load_config(
        "cpu-demo", ["stage2.joint_iters=0", "stage2.joint_max_side=0", "guidance.encode_chunk=0"]
    )
    assert config.stage2.joint_iters == 0
    assert load_config("cpu-demo", ["stage2.joint_color_lr=0"]).stage2.joint_color_lr == 0
