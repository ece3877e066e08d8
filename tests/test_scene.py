"""The scene file contract (shared/scene.py) and the 3DGS PLY export (shared/ply.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.ply import SH_C0, read_ply, write_ply, write_ply_sequence
from shared.scene import (
    FORMAT_NAME,
    SUPPORTED_VERSIONS,
    SceneFormatError,
    read_scene,
    write_scene,
)


def make_object(rng: np.random.Generator, T: int, N: int) -> dict[str, np.ndarray]:
    quats = rng.normal(size=(T, N, 4)).astype(np.float32)
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    return {
        "means": rng.normal(size=(T, N, 3)).astype(np.float32),
        "quats": quats,
        "scales": rng.uniform(0.01, 0.1, size=(T, N, 3)).astype(np.float32),
        "opacities": rng.uniform(0.05, 0.95, size=N).astype(np.float32),
        "colors": rng.uniform(0, 1, size=(N, 3)).astype(np.float32),
    }


def make_meta(T: int) -> dict:
    K = [[300.0, 0.0, 128.0], [0.0, 300.0, 96.0], [0.0, 0.0, 1.0]]
    viewmat = np.eye(4)
    viewmat[2, 3] = 2.0
    return {
        "fps": 12.0,
        "image_size": [256, 192],
        "frame_names": [f"{54 + i:05d}" for i in range(T)],
        "camera": {"K": K, "viewmat": viewmat.tolist()},
        "orbit_center": [0.0, 0.1, 0.0],
        "renders": {"fixed": "renders/fixed.mp4"},
        "tracks": None,
        "object_names": {"001": "dog"},
    }


def test_round_trip_memory_maps_and_keeps_values(tmp_path):
    rng = np.random.default_rng(0)
    objects = {"001": make_object(rng, 5, 40), "002": make_object(rng, 5, 7)}
    scene_file = write_scene(tmp_path, make_meta(5), objects)
    meta = json.loads(scene_file.read_text())
    assert meta["format"] == FORMAT_NAME and meta["version"] == 1 and meta["num_frames"] == 5
    assert meta["objects"][0] == {"id": "001", "name": "dog", "file": "objects/001.npz", "num_gaussians": 40}
    assert meta["convention"]["world_up"] == "+Y"

    scene = read_scene(tmp_path)
    assert scene.num_frames == 5 and scene.image_size == (256, 192) and scene.fps == 12.0
    assert scene.object_name("001") == "dog" and scene.object_name("002") == "002"
    assert np.allclose(scene.orbit_center, [0.0, 0.1, 0.0])
    for object_id, arrays in objects.items():
        loaded = scene.objects[object_id]
        for name, value in arrays.items():
            assert isinstance(loaded[name], np.memmap), name  # mapped, not loaded
            np.testing.assert_allclose(loaded[name], value, rtol=1e-6, atol=1e-7)
    # Reading one frame touches only that frame's bytes: the slice is still a view of the file.
    assert np.shares_memory(scene.objects["001"]["means"][3], scene.objects["001"]["means"])
    # Without mmap the same values come back as ordinary arrays.
    plain = read_scene(tmp_path / "scene.json", mmap=False)
    assert not isinstance(plain.objects["001"]["means"], np.memmap)
    np.testing.assert_array_equal(plain.objects["001"]["means"], scene.objects["001"]["means"])


def test_writer_normalises_quaternions_and_checks_shapes(tmp_path):
    rng = np.random.default_rng(1)
    obj = make_object(rng, 3, 10)
    obj["quats"] = obj["quats"] * 3.0
    write_scene(tmp_path, make_meta(3), {"001": obj})
    quats = read_scene(tmp_path).objects["001"]["quats"]
    np.testing.assert_allclose(np.linalg.norm(quats, axis=-1), 1.0, atol=1e-6)

    bad = make_object(rng, 3, 10)
    bad["scales"] = bad["scales"][:, :9]
    with pytest.raises(
        SceneFormatError, match=r"object 001: scales has shape \[3, 9, 3\], expected \[3, 10, 3\]"
    ):
        write_scene(tmp_path / "bad", make_meta(3), {"001": bad})
    with pytest.raises(SceneFormatError, match="has 4 frames but the scene has 3"):
        write_scene(
            tmp_path / "bad", make_meta(3), {"001": make_object(rng, 3, 4), "002": make_object(rng, 4, 4)}
        )
    with pytest.raises(SceneFormatError, match="2 frame_names for 3 frames"):
        meta = make_meta(3)
        meta["frame_names"] = meta["frame_names"][:2]
        write_scene(tmp_path / "bad", meta, {"001": make_object(rng, 3, 4)})
    with pytest.raises(SceneFormatError, match="path separators"):
        write_scene(tmp_path / "bad", make_meta(3), {"../x": make_object(rng, 3, 4)})
    nan = make_object(rng, 3, 4)
    nan["means"][0, 0, 0] = np.nan
    with pytest.raises(SceneFormatError, match="means has non-finite values"):
        write_scene(tmp_path / "bad", make_meta(3), {"001": nan})


def test_unknown_version_or_format_is_a_clear_error(tmp_path):
    write_scene(tmp_path, make_meta(2), {"001": make_object(np.random.default_rng(2), 2, 3)})
    scene_file = tmp_path / "scene.json"
    meta = json.loads(scene_file.read_text())
    meta["version"] = 7
    scene_file.write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError) as info:
        read_scene(tmp_path)
    message = str(info.value)
    assert str(scene_file) in message and "version 7" in message and str(list(SUPPORTED_VERSIONS)) in message
    meta["version"], meta["format"] = 1, "some-other-scene"
    scene_file.write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="format is 'some-other-scene', expected 'dreamscene4d-scene'"):
        read_scene(tmp_path)


def test_reader_rejects_inconsistent_files(tmp_path):
    rng = np.random.default_rng(3)
    write_scene(tmp_path, make_meta(2), {"001": make_object(rng, 2, 5)})
    scene_file = tmp_path / "scene.json"
    meta = json.loads(scene_file.read_text())
    meta["objects"][0]["num_gaussians"] = 6
    scene_file.write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="lists 6 Gaussians but objects/001.npz has 5"):
        read_scene(tmp_path)
    meta["objects"][0]["num_gaussians"] = 5
    meta["objects"][0]["file"] = "../../etc/passwd"
    scene_file.write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="outside the scene folder"):
        read_scene(tmp_path)
    meta["objects"][0]["file"] = "objects/001.npz"
    meta["num_frames"] = 3
    scene_file.write_text(json.dumps(meta))
    with pytest.raises(SceneFormatError, match="means has 2 frames but the scene has 3"):
        read_scene(tmp_path)
    with pytest.raises(SceneFormatError, match="no scene file"):
        read_scene(tmp_path / "missing")


def test_compressed_npz_still_reads(tmp_path):
    rng = np.random.default_rng(4)
    obj = make_object(rng, 2, 5)
    write_scene(tmp_path, make_meta(2), {"001": obj})
    np.savez_compressed(tmp_path / "objects" / "001.npz", **obj)  # someone re-saved it compressed
    loaded = read_scene(tmp_path).objects["001"]
    assert not isinstance(loaded["means"], np.memmap)
    np.testing.assert_allclose(loaded["means"], obj["means"])


def test_ply_round_trip_uses_3dgs_storage_conventions(tmp_path):
    rng = np.random.default_rng(5)
    obj = make_object(rng, 1, 50)
    path = write_ply(
        tmp_path / "a.ply",
        obj["means"][0],
        obj["quats"][0],
        obj["scales"][0],
        obj["opacities"],
        obj["colors"],
    )
    raw = path.read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    assert b"format binary_little_endian 1.0" in header and b"element vertex 50" in header
    assert len(body) == 50 * 17 * 4
    record = np.frombuffer(body, dtype="<f4").reshape(50, 17)
    # Column 9 is the logit of the opacity, 10..12 the log scales, 6..8 the SH DC term.
    np.testing.assert_allclose(record[:, 9], np.log(obj["opacities"] / (1 - obj["opacities"])), rtol=1e-5)
    np.testing.assert_allclose(record[:, 10:13], np.log(obj["scales"][0]), rtol=1e-5)
    np.testing.assert_allclose(record[:, 6:9], (obj["colors"] - 0.5) / SH_C0, rtol=1e-5, atol=1e-5)
    back = read_ply(path)
    for name in ("means", "quats", "scales", "opacities", "colors"):
        expected = obj[name][0] if obj[name].ndim == 3 else obj[name]
        np.testing.assert_allclose(back[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_ply_sequence_has_one_file_per_frame(tmp_path):
    obj = make_object(np.random.default_rng(6), 4, 9)
    paths = write_ply_sequence(tmp_path, "002", obj)
    assert [p.name for p in paths] == ["00000.ply", "00001.ply", "00002.ply", "00003.ply"]
    assert paths[0].parent == tmp_path / "objects" / "002_ply"
    np.testing.assert_allclose(read_ply(paths[2])["means"], obj["means"][2], rtol=1e-6)


def test_ply_reader_rejects_ascii(tmp_path):
    path = tmp_path / "ascii.ply"
    path.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n")
    with pytest.raises(ValueError, match="format ascii is not supported"):
        read_ply(path)
