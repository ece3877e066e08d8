"""Input loading and validation (backend/data.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from backend.data import (
    InputSummary,
    load_folders,
    load_reference_layout,
    validate_folders,
    validate_reference_layout,
)
from backend.errors import InputError


def test_input_error_is_value_error():
    assert issubclass(InputError, ValueError)


def test_loads_tiny_reference_layout(tiny_video):
    video = tiny_video()
    data = load_reference_layout(video.root, video.name)
    assert data.name == "tiny"
    assert data.frame_names == video.frame_names == ["00054", "00055", "00056", "00057", "00058"]
    assert data.object_ids == ["001", "002"]
    assert (data.width, data.height) == (96, 64)
    assert data.frames.shape == (5, 64, 96, 3) and data.frames.dtype == np.float32
    assert data.masks.shape == (2, 5, 64, 96) and data.masks.dtype == bool
    np.testing.assert_allclose(data.frames, video.frames, atol=1e-6)
    np.testing.assert_array_equal(data.masks, video.masks)
    assert data.inpainted_frames is None and data.inpainted_masks is None
    assert data.inpainted_objects == []
    assert data.mask_layout == "per-object"
    assert [p.name for p in data.frame_paths] == [f"{n}.png" for n in video.frame_names]
    assert data.mask_paths[1][2] == video.mask_path(1, 2)
    # Without inpainting, each object is fitted to the video frames and its visible masks.
    assert data.object_frames(1) is data.frames
    np.testing.assert_array_equal(data.object_masks(1), video.masks[1])


def test_frames_sorted_by_number_not_starting_at_zero_nor_consecutive(tiny_video):
    video = tiny_video(first_number=7, step=3, num_frames=4)
    data = load_reference_layout(video.root, video.name)
    assert data.frame_names == ["00007", "00010", "00013", "00016"]
    assert data.frame_numbers == [7, 10, 13, 16]
    np.testing.assert_array_equal(data.masks, video.masks)


def test_keeps_aspect_ratio_of_portrait_video(tiny_video):
    video = tiny_video(width=40, height=90)
    data = load_reference_layout(video.root, video.name)
    assert data.frames.shape[1:3] == (90, 40)
    np.testing.assert_array_equal(data.masks, video.masks)


def test_single_frame_video_loads(tiny_video):
    video = tiny_video(num_frames=1)
    data = load_reference_layout(video.root, video.name)
    assert data.num_frames == 1 and data.num_objects == 2


def test_jpeg_frames(tiny_video):
    video = tiny_video(ext="jpg")
    data = load_reference_layout(video.root, video.name)
    assert data.frame_paths[0].suffix == ".jpg"
    np.testing.assert_allclose(data.frames, video.frames, atol=1e-6)


def test_inpainted_frames_and_amodal_masks(tiny_video):
    video = tiny_video(inpainted=True)
    data = load_reference_layout(video.root, video.name)
    assert data.inpainted_objects == ["001", "002"]
    assert data.inpainted_frames.shape == (2, 5, 64, 96, 3)
    assert data.inpainted_masks.shape == (2, 5, 64, 96)
    # The disc's inpainted frames have the square painted over: they differ from the video there.
    square = video.masks[1]
    assert np.abs(data.inpainted_frames[0][square] - data.frames[square]).max() > 0.2
    np.testing.assert_array_equal(data.inpainted_frames[0][~square], data.frames[~square])
    assert data.object_frames(0) is not data.frames
    np.testing.assert_array_equal(data.object_frames(0), data.inpainted_frames[0])
    assert data.inpainted_dir == video.inpainted_dir


def test_inpainting_for_some_objects_falls_back_for_others(tiny_video):
    video = tiny_video(inpainted=True)
    shutil.rmtree(video.inpainted_dir / "002")
    shutil.rmtree(video.inpainted_masks_dir / "002")
    data = load_reference_layout(video.root, video.name)
    assert data.inpainted_objects == ["001"]
    np.testing.assert_array_equal(data.inpainted_frames[1], data.frames)
    np.testing.assert_array_equal(data.inpainted_masks[1], data.masks[1])
    assert data.object_frames(1) is data.frames


def test_object_subset_keeps_requested_order(tiny_video):
    video = tiny_video()
    data = load_reference_layout(video.root, video.name, objects=["002", 1])
    assert data.object_ids == ["002", "001"]
    np.testing.assert_array_equal(data.masks[0], video.masks[1])
    with pytest.raises(InputError, match="object 007 is not in"):
        load_reference_layout(video.root, video.name, objects=["007"])


def test_load_folders_per_object(tiny_video):
    video = tiny_video(inpainted=True)
    data = load_folders(video.frames_dir, video.masks_dir, video.inpainted_dir, video.inpainted_masks_dir)
    reference = load_reference_layout(video.root, video.name)
    np.testing.assert_array_equal(data.masks, reference.masks)
    np.testing.assert_array_equal(data.inpainted_frames, reference.inpainted_frames)
    with pytest.raises(InputError, match="inpainted_masks_dir"):
        load_folders(video.frames_dir, video.masks_dir, video.inpainted_dir)


def test_load_folders_indexed_palette_masks(tiny_video):
    video = tiny_video(indexed_masks=True)
    assert Image.open(next(video.indexed_masks_dir.iterdir())).mode == "P"
    data = load_folders(video.frames_dir, video.indexed_masks_dir)
    assert data.mask_layout == "indexed"
    assert data.object_ids == ["001", "002"]
    np.testing.assert_array_equal(data.masks, video.masks)
    only_square = load_folders(video.frames_dir, video.indexed_masks_dir, objects=["002"])
    np.testing.assert_array_equal(only_square.masks[0], video.masks[1])


def _rewrite_indexed(video, convert):
    for t, name in enumerate(video.frame_names):
        labels = video.masks[0, t] * 1 + video.masks[1, t] * 2
        convert(labels.astype(np.uint8)).save(video.indexed_masks_dir / f"{name}.png")


def test_indexed_masks_as_gray_indices_and_davis_colours(tiny_video):
    video = tiny_video(indexed_masks=True)
    _rewrite_indexed(video, Image.fromarray)  # mode L, values 0, 1, 2
    data = load_folders(video.frames_dir, video.indexed_masks_dir)
    assert data.object_ids == ["001", "002"]
    np.testing.assert_array_equal(data.masks, video.masks)

    davis = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]], dtype=np.uint8)
    _rewrite_indexed(video, lambda labels: Image.fromarray(davis[labels]))  # RGB in DAVIS colours
    data = load_folders(video.frames_dir, video.indexed_masks_dir)
    assert data.object_ids == ["001", "002"]
    np.testing.assert_array_equal(data.masks, video.masks)


def test_single_binary_mask_per_frame_is_one_object(tiny_video):
    video = tiny_video(indexed_masks=True)
    _rewrite_indexed(video, lambda labels: Image.fromarray(np.where(labels == 2, 255, 0).astype(np.uint8)))
    data = load_folders(video.frames_dir, video.indexed_masks_dir)
    assert data.object_ids == ["001"]
    np.testing.assert_array_equal(data.masks[0], video.masks[1])


def test_mask_formats_rgb_rgba_palette_and_soft(tiny_video):
    video = tiny_video()
    m = video.masks[0, 0]
    path = video.mask_path(0, 0)
    soft = np.where(m, 200, 90).astype(np.uint8)  # 200/255 > 0.5 > 90/255
    cases = [
        Image.fromarray(np.stack([m * 255, m * 0, m * 0], -1).astype(np.uint8)),  # coloured RGB
        Image.fromarray(np.dstack([np.zeros((*m.shape, 3), np.uint8), m.astype(np.uint8) * 255])),  # alpha
        Image.fromarray(soft),
        Image.fromarray(m.astype(np.uint8) * 255).convert("1"),
    ]
    for image in cases:
        image.save(path)
        data = load_reference_layout(video.root, video.name)
        np.testing.assert_array_equal(data.masks[0, 0], m, err_msg=image.mode)


def test_validate_only_matches_load_and_keeps_no_pixels(tiny_video):
    video = tiny_video(inpainted=True, first_number=0)
    summary = validate_reference_layout(video.root, video.name)
    assert isinstance(summary, InputSummary)
    assert summary == load_reference_layout(video.root, video.name).summary()
    assert (summary.width, summary.height, summary.num_frames) == (96, 64, 5)
    assert summary.inpainted_objects == ["001", "002"]
    assert validate_folders(video.frames_dir, video.masks_dir).object_ids == ["001", "002"]


# ---------------------------------------------------------------------------------------------
# Bad inputs: each must raise InputError naming the offending file or folder.


def _write_garbage(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bad_frame_name(v):
    shutil.copy(v.frame_path(0), v.frames_dir / "frame_7.png")
    return ["frame_7.png", "5-digit"]


def bad_mask_name(v):
    shutil.copy(v.mask_path(1, 0), v.masks_dir / "002" / "54.png")
    return ["54.png", "rename"]


def frame_without_mask(v):
    v.mask_path(1, 2).unlink()
    return ["00056.png has no mask", "object 002", "Annotations/tiny/002"]


def mask_without_frame(v):
    v.frame_path(3).unlink()
    return ["Annotations/tiny/001/00057.png", "has no frame"]


def frame_size_mismatch(v):
    Image.fromarray(np.zeros((64, 90, 3), np.uint8)).save(v.frame_path(2))
    return ["00056.png", "90x64", "96x64"]


def mask_size_mismatch(v):
    Image.fromarray(np.full((60, 96), 255, np.uint8)).save(v.mask_path(0, 1))
    return ["Annotations/tiny/001/00055.png", "96x60", "96x64"]


def empty_first_mask(v):
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(v.mask_path(1, 0))
    return ["Annotations/tiny/002/00054.png", "object 002", "empty"]


def corrupt_frame(v):
    _write_garbage(v.frame_path(1))
    return ["JPEGImages/tiny/00055.png", "cannot read"]


def truncated_mask(v):
    # A later mask, so even validate-only (which keeps no pixels) must decode it.
    path = v.mask_path(0, 3)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)).save(path)
    _truncate(path)
    return ["Annotations/tiny/001/00057.png", "cannot read"]


def empty_frames_folder(v):
    for path in v.frames_dir.iterdir():
        path.unlink()
    return ["JPEGImages/tiny", "no frames"]


def missing_video(v):
    shutil.rmtree(v.frames_dir)
    return ["JPEGImages/tiny", "not found"]


def missing_annotations(v):
    shutil.rmtree(v.masks_dir)
    return ["Annotations/tiny", "no masks"]


def duplicate_frame_number(v):
    Image.open(v.frame_path(0)).save(v.frames_dir / "00054.jpg")
    return ["00054.jpg", "00054.png", "both frame 00054"]


def inpainted_frame_missing(v):
    (v.inpainted_dir / "001" / "00056.png").unlink()
    return ["00056.png has no inpainted frame", "InpaintedImages/tiny/001"]


def inpainted_mask_extra(v):
    shutil.copy(v.inpainted_masks_dir / "002" / "00054.png", v.inpainted_masks_dir / "002" / "00099.png")
    return ["InpaintedMasks/tiny/002/00099.png", "has no frame"]


def inpainted_masks_folder_missing_for_object(v):
    shutil.rmtree(v.inpainted_masks_dir / "002")
    return ["InpaintedImages/tiny/002", "InpaintedMasks/tiny/002"]


def inpainted_masks_root_missing(v):
    shutil.rmtree(v.inpainted_masks_dir)
    return ["InpaintedImages/tiny", "InpaintedMasks/tiny"]


def inpainted_unknown_object(v):
    shutil.copytree(v.inpainted_dir / "002", v.inpainted_dir / "005")
    shutil.copytree(v.inpainted_masks_dir / "002", v.inpainted_masks_dir / "005")
    return ["InpaintedImages/tiny/005", "object 005"]


def inpainted_frame_size(v):
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(v.inpainted_dir / "002" / "00055.png")
    return ["InpaintedImages/tiny/002/00055.png", "48x32", "96x64"]


def masks_mixed_layout(v):
    shutil.copy(v.mask_path(0, 0), v.masks_dir / "00054.png")
    return ["Annotations/tiny", "one layout"]


BAD_INPUTS = [
    bad_frame_name,
    bad_mask_name,
    frame_without_mask,
    mask_without_frame,
    frame_size_mismatch,
    mask_size_mismatch,
    empty_first_mask,
    corrupt_frame,
    truncated_mask,
    empty_frames_folder,
    missing_video,
    missing_annotations,
    duplicate_frame_number,
    inpainted_frame_missing,
    inpainted_mask_extra,
    inpainted_masks_folder_missing_for_object,
    inpainted_masks_root_missing,
    inpainted_unknown_object,
    inpainted_frame_size,
    masks_mixed_layout,
]


@pytest.mark.parametrize("validate", [False, True], ids=["load", "validate"])
@pytest.mark.parametrize("breaker", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_raises_input_error_naming_the_file(tiny_video, breaker, validate):
    video = tiny_video(inpainted=True)
    expected = breaker(video)
    check = validate_reference_layout if validate else load_reference_layout
    with pytest.raises(InputError) as info:
        check(video.root, video.name)
    for text in expected:
        assert text in str(info.value), f"{text!r} not in {info.value}"


def test_missing_root_and_unknown_video(tiny_video, tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        load_reference_layout(tmp_path / "nowhere", "tiny")
    video = tiny_video()
    with pytest.raises(InputError) as info:
        load_reference_layout(video.root, "other")
    assert "JPEGImages/other" in str(info.value) and "tiny" in str(info.value)  # lists what exists
    with pytest.raises(InputError, match="plain folder name"):
        load_reference_layout(video.root, "../tiny")


def test_load_folders_errors_name_paths(tiny_video, tmp_path):
    video = tiny_video(indexed_masks=True)
    with pytest.raises(InputError, match="does not exist"):
        load_folders(tmp_path / "frames", video.masks_dir)
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no masks"):
        load_folders(video.frames_dir, empty)
    (video.indexed_masks_dir / "00056.png").unlink()
    with pytest.raises(InputError, match="00056.png has no mask"):
        load_folders(video.frames_dir, video.indexed_masks_dir)


def test_indexed_object_missing_from_first_frame(tiny_video):
    video = tiny_video(indexed_masks=True)
    first = video.indexed_masks_dir / f"{video.frame_names[0]}.png"
    labels = np.asarray(Image.open(first)).copy()
    labels[labels == 2] = 0
    image = Image.frombytes("P", (video.width, video.height), labels.tobytes())
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])
    image.save(first)
    with pytest.raises(InputError) as info:
        load_folders(video.frames_dir, video.indexed_masks_dir)
    assert "object 002" in str(info.value) and "00054.png" in str(info.value)
    # Leaving the late object out is the documented fix.
    assert load_folders(video.frames_dir, video.indexed_masks_dir, objects=["001"]).object_ids == ["001"]


def test_jpeg_compressed_colour_masks_are_rejected(tiny_video):
    video = tiny_video(indexed_masks=True)
    rng = np.random.default_rng(1)
    for path in video.indexed_masks_dir.iterdir():
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    with pytest.raises(InputError, match="distinct colours"):
        load_folders(video.frames_dir, video.indexed_masks_dir)


def test_non_image_files_are_ignored(tiny_video):
    video = tiny_video()
    (video.frames_dir / "notes.txt").write_text("shot on a phone")
    (video.frames_dir / ".DS_Store").write_bytes(b"\0")
    assert load_reference_layout(video.root, video.name).num_frames == 5


# ---------------------------------------------------------------------------------------------
# Real DAVIS clips (skipped when ../shared is absent)


def test_davis_kid_football(davis_root):
    data = load_reference_layout(davis_root, "kid-football")
    assert data.num_frames == 11 and data.object_ids == ["001", "002"]
    assert (data.width, data.height) == (512, 512)
    assert data.frame_names[0] == "00054"
    assert data.masks.any(axis=(2, 3)).all()  # every object visible in every frame
    fractions = data.masks.mean(axis=(1, 2, 3))
    assert np.all((fractions > 0.001) & (fractions < 0.5))
    assert data.inpainted_frames is None
    assert 0.05 < data.frames.mean() < 0.95


def test_davis_stroller_with_inpainting(davis_root):
    data = load_reference_layout(davis_root, "stroller")
    assert data.num_frames == 10 and data.frame_names[:2] == ["00048", "00050"]
    assert data.inpainted_objects == ["001", "002"]
    assert data.inpainted_frames.shape == (2, 10, 512, 512, 3)
    assert data.inpainted_masks[:, 0].any(axis=(1, 2)).all()
    assert validate_reference_layout(davis_root, "stroller") == data.summary()
