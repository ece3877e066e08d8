"""Backend (+Y up, OpenCV cameras) <-> Blender (+Z up) conversions in shared/coords.py."""

from __future__ import annotations

import numpy as np

from shared.coords import (
    BACKEND_TO_BLENDER,
    K_from_blender_lens,
    apply_depth_adjustment,
    blender_lens_from_K,
    blender_matrix_world_to_viewmat,
    camera_center,
    points_from_blender,
    points_to_blender,
    quats_from_blender,
    quats_to_blender,
    viewmat_to_blender_matrix_world,
)


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def test_world_rotation_keeps_up_and_handedness():
    assert np.isclose(np.linalg.det(BACKEND_TO_BLENDER), 1.0)
    np.testing.assert_allclose(points_to_blender(np.array([0.0, 1.0, 0.0])), [0, 0, 1])  # up stays up
    np.testing.assert_allclose(points_to_blender(np.array([0.0, 0.0, 2.0])), [0, -2, 0])  # reference camera
    pts = np.random.default_rng(0).normal(size=(10, 3))
    np.testing.assert_allclose(points_to_blender(pts), pts @ BACKEND_TO_BLENDER.T)
    np.testing.assert_allclose(points_from_blender(points_to_blender(pts)), pts)


def test_quaternions_rotate_like_the_points():
    rng = np.random.default_rng(1)
    quats = rng.normal(size=(20, 4))
    converted = quats_to_blender(quats)
    for q, qb in zip(quats, converted):
        np.testing.assert_allclose(quat_to_matrix(qb), BACKEND_TO_BLENDER @ quat_to_matrix(q), atol=1e-12)
    np.testing.assert_allclose(quats_from_blender(converted), quats, atol=1e-12)


def test_camera_pose_round_trip_and_projection():
    from backend.cameras import Camera

    cam = Camera.orbit(-30.0, 60.0, 2.5, 320, 240)
    matrix_world = viewmat_to_blender_matrix_world(cam.viewmat)
    np.testing.assert_allclose(blender_matrix_world_to_viewmat(matrix_world), cam.viewmat, atol=1e-12)
    np.testing.assert_allclose(matrix_world[:3, 3], points_to_blender(cam.center))
    # A point in front of the camera: Blender camera space has it at negative local z, same x, flipped y.
    point = np.array([0.1, 0.2, -0.3])
    local_cv = cam.viewmat[:3, :3] @ point + cam.viewmat[:3, 3]
    local_blender = np.linalg.inv(matrix_world) @ np.append(points_to_blender(point), 1.0)
    np.testing.assert_allclose(local_blender[:3], local_cv * [1, -1, -1], atol=1e-12)
    # Scale in the Blender matrix does not change the pose.
    scaled = matrix_world.copy()
    scaled[:3, :3] *= 3.0
    np.testing.assert_allclose(blender_matrix_world_to_viewmat(scaled), cam.viewmat, atol=1e-12)


def test_intrinsics_round_trip_with_principal_point_and_pixel_aspect():
    for K, (w, h) in [
        (np.array([[400.0, 0, 160.0], [0, 400.0, 120.0], [0, 0, 1]]), (320, 240)),
        (np.array([[500.0, 0, 150.0], [0, 450.0, 140.0], [0, 0, 1]]), (320, 240)),
        (np.array([[300.0, 0, 100.0], [0, 330.0, 250.0], [0, 0, 1]]), (200, 480)),
    ]:
        lens = blender_lens_from_K(K, w, h)
        back = K_from_blender_lens(
            lens["lens"], lens["sensor_width"], lens["sensor_height"], lens["sensor_fit"],
            lens["shift_x"], lens["shift_y"], w, h, lens["pixel_aspect_x"], lens["pixel_aspect_y"],
        )  # fmt: skip
        np.testing.assert_allclose(back, K, atol=1e-9)
    # AUTO fit on a portrait image: the sensor width spans the image height.
    K = K_from_blender_lens(50.0, 36.0, 24.0, "AUTO", 0.0, 0.0, 100, 200)
    np.testing.assert_allclose(K[1, 1], 50.0 / 36.0 * 200)


def test_depth_adjustment_keeps_the_image_footprint():
    from backend.cameras import Camera

    cam = Camera.orbit(0.0, 30.0, 2.0, 64, 64)
    rng = np.random.default_rng(2)
    means = rng.normal(scale=0.2, size=(30, 3))
    scales = np.full((30, 3), 0.05)
    moved, moved_scales = apply_depth_adjustment(means, scales, cam.viewmat, depth_scale=1.5)
    uv0, d0 = cam.project(means)
    uv1, d1 = cam.project(moved)
    np.testing.assert_allclose(uv1, uv0, atol=1e-9)
    np.testing.assert_allclose(d1, 1.5 * d0)
    np.testing.assert_allclose(moved_scales, 0.075)
    shifted, _ = apply_depth_adjustment(means, None, cam.viewmat, depth_offset=0.4)
    # A rigid move of 0.4 along the ray through the centroid: the centroid's pixel stays put.
    np.testing.assert_allclose(
        shifted - means, np.broadcast_to(shifted[0] - means[0], means.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.norm(shifted[0] - means[0]), 0.4)
    np.testing.assert_allclose(
        cam.project(shifted.mean(0, keepdims=True))[0],
        cam.project(means.mean(0, keepdims=True))[0],
        atol=1e-9,
    )
    assert cam.project(shifted.mean(0, keepdims=True))[1][0] > cam.project(means.mean(0, keepdims=True))[1][0]
    np.testing.assert_allclose(camera_center(cam.viewmat), cam.center)


def test_orbits_match_the_backend_orbit_cameras():
    from backend.cameras import Camera, orbit_c2w
    from shared.coords import orbit_angles, orbit_viewmat

    reference = Camera.orbit(0.0, 0.0, 2.0).viewmat
    for elevation, azimuth in [(0, 90), (-30, 45), (60, -120), (-75, 200)]:
        np.testing.assert_allclose(
            orbit_viewmat(reference, np.zeros(3), elevation, azimuth),
            np.linalg.inv(orbit_c2w(elevation, azimuth, 2.0)),
            atol=1e-9,
        )
    # About another centre: the camera turns rigidly, so it stays at the same distance from it.
    center = np.array([0.2, -0.1, 0.3])
    viewmat = orbit_viewmat(reference, center, -20.0, 70.0)
    c2w = np.linalg.inv(viewmat)
    start = np.linalg.inv(reference)[:3, 3]
    assert np.isclose(np.linalg.norm(c2w[:3, 3] - center), np.linalg.norm(start - center))
    elevation, azimuth = orbit_angles("orbit_elevation", 40)
    assert elevation[0] == 75 and elevation[20] == -75 and np.isclose(elevation[30], 0.0)
    elevation, azimuth = orbit_angles("orbit_horizontal", 36)
    np.testing.assert_allclose(azimuth[:3], [0, 10, 20])
    assert np.all(elevation == 0)
