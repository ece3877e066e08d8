"""Object-centric crops (backend/crop.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.crop import (
    CropWindow,
    crop_object,
    crop_track,
    mask_bbox,
    resample,
    track_windows,
    window_from_mask,
)
from backend.errors import InputError


def disc_frame(width, height, cx, cy, radius, colour=(0.9, 0.2, 0.1)):
    """Frame on a non-white ramp with a disc; the mask marks pixels whose centre is inside it."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    frame = np.stack([0.3 + 0.2 * xs / width, 0.5 + 0.0 * xs, 0.2 + 0.3 * ys / height], -1).astype(np.float32)
    frame[mask] = colour
    return frame, mask


def mask_stats(crop_mask: torch.Tensor):
    """Centroid (x, y) in continuous crop pixels, horizontal and vertical extent, area."""
    m = crop_mask[0].numpy()
    size = m.shape[0]
    coords = np.arange(size) + 0.5
    area = m.sum()
    cx = (m.sum(0) * coords).sum() / area
    cy = (m.sum(1) * coords).sum() / area
    on = m > 0.5
    width = np.flatnonzero(on.any(0)).ptp() + 1
    height = np.flatnonzero(on.any(1)).ptp() + 1
    return cx, cy, width, height, area


@pytest.mark.parametrize(
    "width,height,cx,cy,radius",
    [
        (320, 200, 200.0, 90.0, 30.0),  # landscape, window upsampled
        (120, 300, 50.0, 170.0, 25.0),  # portrait
        (1000, 800, 480.0, 420.0, 300.0),  # window larger than the crop: antialiased shrink
    ],
)
def test_disc_lands_centred_round_and_fills_65_percent(width, height, cx, cy, radius):
    frame, mask = disc_frame(width, height, cx, cy, radius)
    crop = crop_object(frame, mask)
    assert crop.image.shape == (3, 256, 256) and crop.mask.shape == (1, 256, 256)
    mx, my, extent_x, extent_y, area = mask_stats(crop.mask)
    assert abs(mx - 128) < 1.0 and abs(my - 128) < 1.0
    # The disc's diameter is 65% of the crop in both directions: round, not an ellipse.
    assert abs(extent_x - 0.65 * 256) <= 3 and abs(extent_y - 0.65 * 256) <= 3
    assert abs(extent_x - extent_y) <= 1
    assert area == pytest.approx(math.pi * (0.65 * 128) ** 2, rel=0.03)
    # Object colour in the middle, white (composited) well outside it.
    np.testing.assert_allclose(crop.image[:, 128, 128].numpy(), [0.9, 0.2, 0.1], atol=1e-3)
    np.testing.assert_allclose(crop.image[:, 5, 5].numpy(), [1.0, 1.0, 1.0], atol=1e-6)
    # The window is square in pixels with side max(w, h) / 0.65 around the bbox centre.
    x0, y0, x1, y1 = mask_bbox(mask)
    assert crop.window.side == pytest.approx(max(x1 - x0, y1 - y0) / 0.65)
    assert crop.window.centre_x == pytest.approx(cx, abs=0.5)
    assert crop.window.centre_y == pytest.approx(cy, abs=0.5)
    assert crop.window.normalised_centre == pytest.approx(
        (cx / width, cy / height), abs=0.5 / min(width, height)
    )


def test_window_past_the_frame_edge_stays_white_outside():
    frame, mask = disc_frame(160, 100, 30.0, 50.0, 25.0)  # the window (~78 px) reaches past x = 0
    crop = crop_object(frame, mask)
    left_of_frame = int(crop.window.frame_to_crop(np.array([0.0, 50.0]))[0])
    assert left_of_frame > 5
    assert crop.image[:, :, : left_of_frame - 1].min() == pytest.approx(1.0)
    assert crop.mask[:, :, : left_of_frame - 1].max() == 0.0


def test_crop_window_round_trip_and_matrix():
    window = CropWindow(centre_x=70.25, centre_y=33.5, side=91.0, size=256, frame_width=96, frame_height=64)
    rng = np.random.default_rng(0)
    crop_points = rng.uniform(0, 256, (10, 2))
    frame_points = window.crop_to_frame(crop_points)
    np.testing.assert_allclose(window.frame_to_crop(frame_points), crop_points, atol=1e-9)
    np.testing.assert_allclose(window.crop_to_frame(np.array([128.0, 128.0])), [70.25, 33.5])
    np.testing.assert_allclose(window.crop_to_frame(np.array([0.0, 0.0])), window.origin)
    np.testing.assert_allclose(window.crop_to_frame(np.array([256.0, 256.0])), [70.25 + 45.5, 33.5 + 45.5])
    homogeneous = np.c_[crop_points, np.ones(10)] @ window.crop_to_frame_matrix().T
    np.testing.assert_allclose(homogeneous[:, :2], frame_points)
    as_tensor = window.crop_to_frame(torch.tensor(crop_points, dtype=torch.float32))
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), frame_points, atol=1e-4)
    assert CropWindow.from_dict(window.to_dict()) == window


def test_frame_intrinsics_project_like_the_crop_camera():
    window = CropWindow(
        centre_x=400.0, centre_y=150.0, side=300.0, size=256, frame_width=640, frame_height=360
    )
    K_crop = np.array([[280.0, 0.0, 128.0], [0.0, 280.0, 128.0], [0.0, 0.0, 1.0]])
    points = np.array([[0.1, -0.2, 2.0], [-0.3, 0.25, 1.5]])
    in_crop = (points @ K_crop.T)[:, :2] / points[:, 2:]
    in_frame = (points @ window.frame_intrinsics(K_crop).T)[:, :2] / points[:, 2:]
    np.testing.assert_allclose(in_frame, window.crop_to_frame(in_crop))


@pytest.mark.parametrize("side", [40.0, 60.5, 700.0])
def test_resample_samples_where_the_window_says(side):
    # Frame whose channels hold each pixel centre's own x and y: the crop must read back the
    # frame position that `crop_to_frame` gives for every crop pixel centre.
    width, height = 1200, 900
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    image = torch.tensor(np.stack([xs, ys]), dtype=torch.float64)[None]
    window = CropWindow(600.3, 430.7, side, 256, width, height)
    out = resample(image, [window])[0]
    uv = np.stack(np.meshgrid(np.arange(256) + 0.5, np.arange(256) + 0.5), -1)
    expected = window.crop_to_frame(uv)
    np.testing.assert_allclose(out[0].numpy(), expected[..., 0], atol=0.02 * max(1.0, side / 256))
    np.testing.assert_allclose(out[1].numpy(), expected[..., 1], atol=0.02 * max(1.0, side / 256))


def test_numpy_torch_and_uint8_inputs_agree():
    frame, mask = disc_frame(96, 64, 40.0, 30.0, 12.0)
    a = crop_object(frame, mask)
    b = crop_object(torch.from_numpy(frame), torch.from_numpy(mask))
    c = crop_object(np.round(frame * 255).astype(np.uint8), mask.astype(np.uint8) * 255)
    torch.testing.assert_close(a.image, b.image)
    torch.testing.assert_close(a.mask, c.mask)
    torch.testing.assert_close(a.image, c.image, atol=2 / 255, rtol=0)


def test_crop_tiny_video_objects_centred(tiny_video):
    video = tiny_video()
    for k in range(2):
        crops = crop_track(video.frames, video.masks[k])
        assert crops.images.shape == (5, 3, 256, 256) and crops.masks.shape == (5, 1, 256, 256)
        for t in range(5):
            # The crop mask's centroid, mapped back to the frame, is the object's true centre
            # (to within the pixelation of a 14-20 px object).
            mx, my, *_ = mask_stats(crops.masks[t])
            centroid = crops.windows[t].crop_to_frame(np.array([mx, my]))
            np.testing.assert_allclose(centroid, video.centres[k, t], atol=0.5)
            np.testing.assert_allclose(
                [crops.windows[t].centre_x, crops.windows[t].centre_y], video.centres[k, t], atol=0.75
            )


def test_track_follows_the_object_and_keeps_the_first_side():
    frames, masks = [], []
    for t in range(4):
        frame, mask = disc_frame(200, 120, 50.0 + 30 * t, 60.0 - 5 * t, 20.0 - 2 * t)  # moving, shrinking
        frames.append(frame)
        masks.append(mask)
    crops = crop_track(np.stack(frames), np.stack(masks))
    sides = [w.side for w in crops.windows]
    assert sides == [sides[0]] * 4
    for t in range(4):
        assert crops.windows[t].centre_x == pytest.approx(50.0 + 30 * t, abs=0.5)
        mx, my, *_ = mask_stats(crops.masks[t])
        assert abs(mx - 128) < 1 and abs(my - 128) < 1


def test_track_grows_the_window_only_when_the_object_would_be_clipped():
    radii = [20.0, 24.0, 28.0, 35.0, 40.0]
    masks = np.stack([disc_frame(300, 200, 150.0, 100.0, r)[1] for r in radii])
    windows = track_windows(masks)
    s0 = windows[0].side
    for mask, window in zip(masks, windows):
        x0, y0, x1, y1 = mask_bbox(mask)
        extent = max(x1 - x0, y1 - y0)
        assert window.side == pytest.approx(max(s0, extent / 0.975))
        assert extent <= window.side  # never clipped
    assert windows[2].side == s0 and windows[4].side > s0


def test_track_reuses_the_previous_window_when_the_object_is_hidden():
    masks = np.stack([disc_frame(100, 80, 30.0 + 10 * t, 40.0, 10.0)[1] for t in range(3)])
    masks[1] = False
    windows = track_windows(masks)
    assert windows[1] == windows[0]
    assert windows[2].centre_x == pytest.approx(50.0, abs=0.5)
    masks[0] = False
    with pytest.raises(InputError, match="first-frame mask is empty"):
        track_windows(masks)
    with pytest.raises(InputError, match="empty"):
        window_from_mask(np.zeros((10, 10), bool))


def test_davis_crops(davis_root):
    from backend.data import load_reference_layout

    data = load_reference_layout(davis_root, "kid-football")
    # The ball (002) is inside the frame: its longer side fills 65% of the crop.
    ball = crop_object(data.frames[0], data.masks[1, 0])
    _, _, extent_x, extent_y, _ = mask_stats(ball.mask)
    assert abs(max(extent_x, extent_y) - 0.65 * 256) <= 4
    # The kid (001) is cut by the bottom edge of the frame.  Border padding (the published
    # choice) repeats the last row below the frame; white padding leaves nothing there.
    kid_border = crop_object(data.frames[0], data.masks[0, 0])
    kid_white = crop_object(data.frames[0], data.masks[0, 0], padding="white")
    below = int(kid_white.window.frame_to_crop(np.array([0.0, 512.0]))[1]) + 2
    assert below < 250
    assert kid_border.mask[0, below:].max() == 1.0
    assert kid_white.mask[0, below:].max() == 0.0
    assert kid_white.image[:, below:].min() == pytest.approx(1.0)
    torch.testing.assert_close(kid_white.image[:, : below - 4], kid_border.image[:, : below - 4])
