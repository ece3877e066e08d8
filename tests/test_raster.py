"""Tests of the rasterizer: geometry, compositing, depth, gradients, back-end agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.cameras import Camera, stack_cameras
from backend.raster import RenderOutput, rasterize, rasterize_batch
from backend.raster.torch_ref import (
    ALPHA_MAX,
    ALPHA_THRESHOLD,
    composite_tiles,
    composite_tiles_autograd,
    project_gaussians,
    rasterize_torch,
)

IDENTITY_QUAT = [1.0, 0.0, 0.0, 0.0]


def make_gaussians(points, scale=0.02, opacity=0.5, colors=None, dtype=torch.float32):
    points = torch.as_tensor(np.asarray(points, dtype=np.float64), dtype=dtype).reshape(-1, 3)
    n = len(points)
    quats = torch.tensor([IDENTITY_QUAT] * n, dtype=dtype)
    scales = torch.full((n, 3), float(scale), dtype=dtype)
    opacities = torch.as_tensor(np.broadcast_to(opacity, (n,)).copy(), dtype=dtype)
    colors = torch.ones(n, 3, dtype=dtype) if colors is None else torch.as_tensor(colors, dtype=dtype)
    return points, quats, scales, opacities, colors


def random_scene(n, seed=0, dtype=torch.float32, radius=0.5, scale_range=(0.01, 0.05)):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=gen, dtype=dtype)
    means = d / d.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=gen, dtype=dtype) ** (1 / 3) * radius
    quats = torch.randn(n, 4, generator=gen, dtype=dtype)
    lo, hi = scale_range
    scales = lo + (hi - lo) * torch.rand(n, 3, generator=gen, dtype=dtype)
    opacities = 0.1 + 0.8 * torch.rand(n, generator=gen, dtype=dtype)
    colors = torch.rand(n, 3, generator=gen, dtype=dtype)
    return means, quats, scales, opacities, colors


def render(gaussians, cameras, background=None, dtype=torch.float32, **kwargs) -> RenderOutput:
    viewmats, Ks = stack_cameras(cameras)
    cam = cameras[0]
    return rasterize(
        *gaussians,
        viewmats.to(dtype),
        Ks.to(dtype),
        cam.width,
        cam.height,
        background=background,
        backend="torch",
        **kwargs,
    )


def test_single_gaussian_lands_where_camera_projects_it():
    cam = Camera.orbit(-20.0, 30.0, width=64, height=48)
    point = np.array([[0.1, -0.05, 0.2]])
    out = render(make_gaussians(point, scale=0.03, opacity=0.5), [cam])
    (u, v), depth = (x[0] for x in cam.project(point))

    np.testing.assert_allclose(out.means2d[0, 0].detach().numpy(), [u, v], atol=1e-3)
    alpha = out.alpha[0, ..., 0].detach().numpy().astype(np.float64)
    row, col = np.unravel_index(np.argmax(alpha), alpha.shape)
    assert (col, row) == (math.floor(u), math.floor(v))
    # Pixel centres are at i + 0.5: the alpha-weighted centroid of a round blob is its centre.
    ys, xs = np.mgrid[0 : cam.height, 0 : cam.width] + 0.5
    assert abs((alpha * xs).sum() / alpha.sum() - u) < 0.02
    assert abs((alpha * ys).sum() / alpha.sum() - v) < 0.02
    np.testing.assert_allclose(out.depth[0, row, col, 0].item(), depth, rtol=1e-5)
    assert out.radii.shape == (1, 1) and out.radii[0, 0] > 0


def test_output_shapes_for_several_cameras_and_two_channels():
    cams = [Camera.orbit(0.0, a, width=40, height=24) for a in (0.0, 90.0, 200.0)]
    means, quats, scales, opacities, _ = random_scene(50)
    colors = torch.rand(50, 2)
    out = render((means, quats, scales, opacities, colors), cams)
    assert out.color.shape == (3, 24, 40, 2)
    assert out.alpha.shape == (3, 24, 40, 1)
    assert out.depth.shape == (3, 24, 40, 1)
    assert out.means2d.shape == (3, 50, 2)
    assert out.radii.shape == (3, 50) and out.radii.dtype == torch.int32
    # Batched cameras render exactly what each camera renders alone.
    for i, cam in enumerate(cams):
        single = render((means, quats, scales, opacities, colors), [cam])
        torch.testing.assert_close(single.color[0], out.color[i])
        torch.testing.assert_close(single.depth[0], out.depth[i])


def test_near_red_gaussian_hides_far_blue_one_whatever_the_input_order():
    cam = Camera.orbit(0.0, 0.0, width=32, height=32)  # at z = +2 looking at the origin
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    near, far = [0.0, 0.0, 0.3], [0.0, 0.0, -0.3]
    # Blue listed first: only the depth sort can put red in front.
    both = render(make_gaussians([far, near], scale=0.15, opacity=0.9, colors=[blue, red]), [cam])
    centre = both.color[0, 16, 16]
    assert centre[0] > 0.8 and centre[2] < 0.15

    a_red = render(make_gaussians([near], scale=0.15, opacity=0.9, colors=[red]), [cam]).alpha[0, 16, 16, 0]
    a_blue = render(make_gaussians([far], scale=0.15, opacity=0.9, colors=[blue]), [cam]).alpha[0, 16, 16, 0]
    expected = torch.tensor(red) * a_red + torch.tensor(blue) * (1 - a_red) * a_blue
    torch.testing.assert_close(centre, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both.alpha[0, 16, 16, 0], 1 - (1 - a_red) * (1 - a_blue))


def test_expected_depth_is_the_alpha_weighted_gaussian_depth():
    cam = Camera.orbit(-10.0, 45.0, width=32, height=32)
    target = np.zeros((1, 3))
    # Two Gaussians on the ray through the image centre at different depths.
    c2w = cam.c2w
    forward = c2w[:3, 2]
    points = np.stack([target[0] - 0.2 * forward, target[0] + 0.25 * forward])
    _, depths = cam.project(points)
    out = render(make_gaussians(points, scale=0.06, opacity=0.4), [cam])
    singles = [render(make_gaussians(points[i : i + 1], scale=0.06, opacity=0.4), [cam]) for i in range(2)]

    a0, a1 = (s.alpha[0, ..., 0].double() for s in singles)
    w0, w1 = a0, (1 - a0) * a1  # the nearer one (index 0) is composited first
    expected = (w0 * depths[0] + w1 * depths[1]) / (w0 + w1).clamp(min=1e-10)
    covered = out.alpha[0, ..., 0] > 0.05
    assert covered.sum() > 20
    torch.testing.assert_close(
        out.depth[0, ..., 0].double()[covered], expected[covered], rtol=1e-5, atol=1e-5
    )
    # A lone Gaussian's expected depth is its own camera depth wherever it is visible.
    seen = singles[1].alpha[0, ..., 0] > 0
    torch.testing.assert_close(
        singles[1].depth[0, ..., 0][seen], torch.full_like(singles[1].depth[0, ..., 0][seen], depths[1])
    )
    assert torch.all(out.depth[0][out.alpha[0] == 0] == 0)


def test_background_fills_the_uncovered_part():
    cams = [Camera.orbit(0.0, 0.0, width=32, height=32), Camera.orbit(0.0, 60.0, width=32, height=32)]
    scene = random_scene(20, seed=3, radius=0.2)
    plain = render(scene, cams)
    bg = torch.tensor([0.2, 0.5, 1.0])
    shared = render(scene, cams, background=bg)
    torch.testing.assert_close(shared.color, plain.color + (1 - plain.alpha) * bg)
    assert torch.allclose(shared.color[0, 0, 0], bg)  # the corner is empty
    per_cam = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    separate = render(scene, cams, background=per_cam)
    for i in range(2):
        torch.testing.assert_close(separate.color[i], plain.color[i] + (1 - plain.alpha[i]) * per_cam[i])
    torch.testing.assert_close(separate.alpha, plain.alpha)
    torch.testing.assert_close(separate.depth, plain.depth)


def test_channels_are_composited_independently():
    cam = Camera.orbit(-30.0, 10.0, width=48, height=32)
    means, quats, scales, opacities, colors = random_scene(60, seed=5)
    two = torch.rand(60, 2, generator=torch.Generator().manual_seed(1)) - 0.5  # flow-like, signed
    out2 = render((means, quats, scales, opacities, two), [cam])
    out1 = render((means, quats, scales, opacities, two[:, :1]), [cam])
    out5 = render((means, quats, scales, opacities, torch.cat([colors, two], 1)), [cam])
    torch.testing.assert_close(out1.color[..., 0], out2.color[..., 0])
    torch.testing.assert_close(out5.color[..., 3:], out2.color)
    # Per-view features [C, N, D] are accepted too.
    per_view = render((means, quats, scales, opacities, two[None]), [cam])
    torch.testing.assert_close(per_view.color, out2.color)


def dense_reference(means, quats, scales, opacities, colors, cam):
    """All Gaussians at every pixel, globally depth-sorted, no tiles: an independent compositor."""
    viewmats, Ks = stack_cameras([cam])
    viewmats, Ks = viewmats.to(means.dtype), Ks.to(means.dtype)
    proj = project_gaussians(means, quats, scales, opacities, viewmats, Ks, cam.width, cam.height)
    order = torch.argsort(proj.depths[0])
    order = order[proj.radii_xy[0, order, 0] > 0]
    ys, xs = torch.meshgrid(torch.arange(cam.height), torch.arange(cam.width), indexing="ij")
    px, py = xs.to(means.dtype) + 0.5, ys.to(means.dtype) + 0.5
    image = torch.zeros(cam.height, cam.width, colors.shape[1], dtype=means.dtype)
    trans = torch.ones(cam.height, cam.width, dtype=means.dtype)
    done = torch.zeros(cam.height, cam.width, dtype=torch.bool)
    for g in order.tolist():
        (mx, my), (a, b, c) = proj.means2d[0, g], proj.conics[0, g]
        dx, dy = mx - px, my - py
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = torch.clamp(opacities[g] * torch.exp(-sigma), max=ALPHA_MAX)
        use = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD) & ~done
        next_t = trans * (1 - alpha)
        done = done | (use & (next_t <= 1e-4))
        use = use & ~done
        image = image + torch.where(use, alpha * trans, 0)[..., None] * colors[g]
        trans = torch.where(use, next_t, trans)
    return image, 1 - trans


def test_tiled_rasterizer_matches_dense_compositing():
    # 50x37 is not a multiple of the 16 px tile; large opaque Gaussians cross tile borders and
    # drive transmittance to the 1e-4 cut-off.
    cam = Camera.orbit(-25.0, 140.0, radius=1.6, width=50, height=37)
    scene = list(random_scene(120, seed=11, dtype=torch.float64, scale_range=(0.02, 0.12)))
    scene[3] = scene[3].clamp(max=0.97) + 0.02
    viewmats, Ks = (t.double() for t in stack_cameras([cam]))
    ref_color, ref_alpha = dense_reference(*scene, cam)
    assert ref_alpha.max() > 0.999  # the cut-off really is exercised

    grads = []
    # Default chunks; several tiles a chunk; and tiles split into slices of pixels.
    for chunk_elements in (1 << 21, 4096, 1500):
        params = [t.clone().requires_grad_() for t in scene]
        color, alpha, depth, _, _ = rasterize_torch(
            *params, viewmats, Ks, cam.width, cam.height, chunk_elements=chunk_elements
        )
        torch.testing.assert_close(color[0], ref_color, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(alpha[0, ..., 0], ref_alpha, atol=1e-9, rtol=1e-9)
        (color.square().sum() + depth.sum()).backward()
        grads.append([p.grad for p in params])
    for other in grads[1:]:
        for g, g_other in zip(grads[0], other):
            torch.testing.assert_close(g_other, g, atol=1e-10, rtol=1e-9)


def test_gradients_reach_every_input_and_means2d():
    cams = [Camera.orbit(-15.0, 20.0, width=48, height=48), Camera.orbit(10.0, 200.0, width=48, height=48)]
    params = [t.clone().requires_grad_() for t in random_scene(80, seed=2)]
    out = render(params, cams, background=torch.tensor([1.0, 1.0, 1.0]))
    target = torch.rand_like(out.color)
    loss = ((out.color - target) ** 2).mean() + out.depth.mean() + (out.alpha - 0.5).abs().mean()
    loss.backward()
    visible = (out.radii > 0).any(dim=0)
    assert visible.sum() > 40
    for name, p in zip(["means", "quats", "scales", "opacities", "colors"], params):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        per_gaussian = p.grad.reshape(len(p.grad), -1).abs().sum(1)
        assert (per_gaussian[visible] > 0).float().mean() > 0.9, name
        assert torch.all(per_gaussian[~visible] == 0), name
    assert out.means2d.grad is not None and out.means2d.grad.shape == (2, 80, 2)
    assert out.means2d.grad[out.radii > 0].abs().sum() > 0


def test_hand_written_compositing_backward_matches_autograd():
    # Two 16x16 tiles, 80 depth-sorted Gaussians each (some opaque enough to hit the cut-off).
    gen = torch.Generator().manual_seed(0)
    t, k, f = 2, 80, 4
    means2d = (torch.rand(t, k, 2, generator=gen, dtype=torch.float64) * 24 - 4).requires_grad_()
    sx, sy = torch.rand(2, t, k, generator=gen, dtype=torch.float64) * 20 + 4
    corr = (torch.rand(t, k, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    det = sx * sy * (1 - corr**2)
    conics = torch.stack([sy / det, -corr * torch.sqrt(sx * sy) / det, sx / det], -1).requires_grad_()
    opacities = (0.3 + 0.7 * torch.rand(t, k, generator=gen, dtype=torch.float64)).requires_grad_()
    features = torch.randn(t, k, f, generator=gen, dtype=torch.float64).requires_grad_()
    pix = torch.arange(256, dtype=torch.float64)
    px = torch.stack([pix % 16 + 0.5, pix % 16 + 16.5])
    py = (pix // 16 + 0.5).expand(2, -1)
    inputs = (means2d, conics, opacities, features)
    grad_accum = torch.randn(t, 256, f, generator=gen, dtype=torch.float64)
    grad_alpha = torch.randn(t, 256, generator=gen, dtype=torch.float64)

    results = []
    for fn in (composite_tiles, composite_tiles_autograd):
        accum, alpha = fn(*inputs, px, py)
        grads = torch.autograd.grad((accum * grad_accum).sum() + (alpha * grad_alpha).sum(), inputs)
        results.append((accum, alpha, *grads))
    assert results[0][1].max() > 0.999  # the transmittance cut-off is reached
    for mine, oracle in zip(*results):
        torch.testing.assert_close(mine, oracle, rtol=1e-9, atol=1e-9)


def test_gradcheck_on_a_tiny_double_precision_scene():
    cam = Camera.orbit(-20.0, 35.0, width=20, height=18)
    viewmats, Ks = (t.double() for t in stack_cameras([cam]))
    means, quats, scales, opacities, colors = random_scene(4, seed=7, dtype=torch.float64, radius=0.15)
    scales = scales + 0.04
    inputs = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]

    def fn(m, q, s, o, c):
        color, alpha, depth, _, _ = rasterize_torch(
            m, q, s, o, c, viewmats, Ks, cam.width, cam.height, backgrounds=torch.full((1, 3), 0.3).double()
        )
        return color, alpha, depth

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_gaussian_behind_the_camera_is_culled_without_nans():
    cam = Camera.orbit(0.0, 0.0, width=32, height=32)  # camera at z = 2 looking towards -z
    points = [[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, -200.0]]
    params = [t.requires_grad_() for t in make_gaussians(points, scale=0.05, opacity=0.8)]
    out = render(params, [cam])
    assert out.radii[0].tolist()[1:] == [0, 0, 0] and out.radii[0, 0] > 0
    (out.color.sum() + out.depth.sum()).backward()
    for p in params:
        assert torch.isfinite(p.grad).all()
        assert torch.all(p.grad[1:] == 0)


def test_bad_shapes_are_rejected_with_the_field_name():
    cam = Camera.orbit(0.0, 0.0, width=16, height=16)
    means, quats, scales, opacities, colors = random_scene(5)
    with pytest.raises(ValueError, match="quats"):
        render((means, quats[:, :3], scales, opacities, colors), [cam])
    with pytest.raises(ValueError, match="background"):
        render((means, quats, scales, opacities, colors), [cam], background=torch.zeros(2))
    with pytest.raises(ValueError, match="CUDA"):
        viewmats, Ks = stack_cameras([cam])
        rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 16, 16, backend="gsplat")


def test_auto_backend_on_cpu_uses_the_reference():
    cam = Camera.orbit(0.0, 30.0, width=32, height=32)
    scene = random_scene(30, seed=4)
    viewmats, Ks = stack_cameras([cam])
    auto = rasterize(*scene, viewmats, Ks, 32, 32)
    ref = rasterize(*scene, viewmats, Ks, 32, 32, backend="torch")
    torch.testing.assert_close(auto.color, ref.color)


def _two_sets_with_their_own_views(device="cpu"):
    sets = [random_scene(40, seed=s) for s in (11, 12)]
    stacked = [torch.stack(parts).to(device) for parts in zip(*sets)]
    cams = [[Camera.orbit(0.0, a, width=32, height=24) for a in az] for az in ((0.0, 90.0), (45.0, -60.0))]
    views = [stack_cameras(c, device=device) for c in cams]
    viewmats = torch.stack([v for v, _ in views])
    Ks = torch.stack([k for _, k in views])
    return sets, stacked, views, viewmats, Ks


def test_batch_renders_each_set_into_its_own_views():
    sets, stacked, views, viewmats, Ks = _two_sets_with_their_own_views()
    bg = torch.tensor([0.2, 0.4, 0.6])
    out = rasterize_batch(*stacked, viewmats, Ks, 32, 24, background=bg)
    assert out.color.shape == (2, 2, 24, 32, 3) and out.radii.shape == (2, 2, 40)
    for b in range(2):
        one = rasterize(*sets[b], *views[b], 32, 24, background=bg)
        torch.testing.assert_close(out.color[b], one.color)
        torch.testing.assert_close(out.alpha[b], one.alpha)
    # The two sets differ, so a mix-up of sets and views would show.
    assert (out.color[0] - out.color[1]).abs().max() > 0.05
    with pytest.raises(ValueError, match="viewmats has 1 sets"):
        rasterize_batch(*stacked, viewmats[:1], Ks, 32, 24)
    with pytest.raises(ValueError, match=r"expected \[B, N, 3\]"):
        rasterize_batch(*sets[0], *views[0], 32, 24)


def _gsplat_importable() -> bool:
    if not torch.cuda.is_available():
        return False
    from backend.raster import gsplat_available

    return gsplat_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_matches_reference_on_cuda():
    if not _gsplat_importable():
        pytest.skip("gsplat is not installed on this CUDA machine")
    cams = [Camera.orbit(-20.0, a, width=128, height=96) for a in (0.0, 120.0)]
    viewmats, Ks = stack_cameras(cams, device="cuda")
    scene = [t.cuda() for t in random_scene(1500, seed=9)]
    bg = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    outs = {}
    grads = {}
    for backend in ("torch", "gsplat"):
        params = [t.clone().requires_grad_() for t in scene]
        out = rasterize(*params, viewmats, Ks, 128, 96, background=bg, backend=backend)
        (out.color.square().sum() + 0.1 * out.depth.sum() + out.alpha.sum()).backward()
        outs[backend] = out
        grads[backend] = [p.grad for p in params] + [out.means2d.grad]
    ref, fast = outs["torch"], outs["gsplat"]
    torch.testing.assert_close(fast.color, ref.color, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(fast.alpha, ref.alpha, atol=2e-3, rtol=1e-3)
    covered = ref.alpha > 0.5
    torch.testing.assert_close(fast.depth[covered], ref.depth[covered], atol=5e-3, rtol=1e-3)
    assert (fast.radii == ref.radii).float().mean() > 0.99
    for g_ref, g_fast in zip(grads["torch"], grads["gsplat"]):
        rel = (g_fast - g_ref).norm() / g_ref.norm()
        assert rel < 2e-2, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_batch_matches_one_call_per_set():
    if not _gsplat_importable():
        pytest.skip("gsplat is not installed on this CUDA machine")
    sets, stacked, views, viewmats, Ks = _two_sets_with_their_own_views("cuda")
    params = [t.clone().requires_grad_() for t in stacked]
    out = rasterize_batch(
        *params, viewmats, Ks, 32, 24, background=torch.ones(3, device="cuda"), backend="gsplat"
    )
    out.color.square().sum().backward()
    assert out.radii.shape == (2, 2, 40)
    for b in range(2):
        one_params = [t.cuda().requires_grad_() for t in sets[b]]
        one = rasterize(
            *one_params, *views[b], 32, 24, background=torch.ones(3, device="cuda"), backend="gsplat"
        )
        one.color.square().sum().backward()
        torch.testing.assert_close(out.color[b], one.color, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.radii[b], one.radii)
        for p, q in zip(params, one_params):
            torch.testing.assert_close(p.grad[b], q.grad, atol=1e-5, rtol=1e-4)
