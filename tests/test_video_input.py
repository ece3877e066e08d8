"""A video file as input: decoding, range/stride/size, mask matching, errors, and a run through stage 1.

The MP4s are encoded here (libx264 through imageio-ffmpeg) from the synthetic tiny video, so the
decoded frames can be compared with the exact source pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.cli import build_parser, spec_from_args
from backend.errors import InputError
from backend.pipeline import run_job, validate_job
from backend.video_input import FrameSelection, decode, output_size
from tests.test_pipeline import TINY_STATIC

# libx264 at CRF 10 with 4:2:0 chroma on flat colours: per-pixel errors of a few levels, much more along
# the red/blue shape edges where chroma is subsampled (measured: mean 0.006, PSNR 29.7-31 dB).
MAX_MEAN_ABS_ERROR = 4.0 / 255.0
MIN_PSNR_DB = 27.0


def encode_mp4(
    path: Path,
    frames: np.ndarray,
    fps: float = 10.0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    quality: tuple = ("-crf", "10"),
) -> Path:
    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec=codec,
        pix_fmt_out=pix_fmt,
        output_params=list(quality),
        macro_block_size=1,
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(np.round(frame * 255).astype(np.uint8)))
    writer.close()
    return path


def write_object_masks(folder: Path, masks: np.ndarray, names: list[str], numbers=None) -> Path:
    """masks bool [K, T, H, W] -> folder/<name>/NNNNN.png (numbers default 0..T-1)."""
    numbers = range(masks.shape[1]) if numbers is None else numbers
    for k, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        for t, number in enumerate(numbers):
            Image.fromarray(masks[k, t].astype(np.uint8) * 255).save(folder / name / f"{number:05d}.png")
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.fixture
def clip(tiny_video, tmp_path):
    """The 5-frame tiny video as clip.mp4 with per-object masks numbered 00000..00004."""
    video = tiny_video(num_frames=5)
    path = encode_mp4(tmp_path / "clip.mp4", video.frames)
    masks = write_object_masks(tmp_path / "masks", video.masks, ["ball", "box"])
    return video, path, masks


# Stage 1 only has to run here (its quality is tested in test_pipeline.py): fewer steps.
SHORT_STATIC = TINY_STATIC + ["stage1.iters=30", "stage1.placement_iters=10", "stage1.num_gaussians=300"]


def video_spec(path, masks, **selection):
    return {
        "input": {"kind": "video", "path": str(path), "masks": str(masks), **selection},
        "preset": "cpu-demo",
        "overrides": SHORT_STATIC,
        "stages": "static",
        "device": "cpu",
        "guidance": "none",
    }


def test_decoded_mp4_frames_match_the_source_within_codec_error(clip):
    video, path, _ = clip
    decoded = decode(path, FrameSelection())
    assert decoded.indices == [0, 1, 2, 3, 4] and decoded.source_frames == 5
    assert decoded.size == decoded.source_size == (video.width, video.height)
    assert decoded.fps == pytest.approx(10.0)
    for t, frame in enumerate(decoded.frames):
        got = frame.astype(np.float32) / 255.0
        assert np.abs(got - video.frames[t]).mean() < MAX_MEAN_ABS_ERROR, t
        assert psnr(got, video.frames[t]) > MIN_PSNR_DB, t
    # Each decoded frame is closest to its own source frame: no frame is dropped or repeated.
    for t, frame in enumerate(decoded.frames):
        errors = [np.abs(frame / 255.0 - src).mean() for src in video.frames]
        assert int(np.argmin(errors)) == t


@pytest.mark.parametrize(
    "suffix, codec, pix_fmt, quality",
    [
        (".mov", "prores_ks", "yuv422p10le", ("-profile:v", "3")),
        (".webm", "libvpx-vp9", "yuv420p", ("-crf", "10", "-b:v", "0")),
    ],
)
def test_mov_and_webm_decode_like_the_source(tiny_video, tmp_path, suffix, codec, pix_fmt, quality):
    video = tiny_video(num_frames=3)
    path = encode_mp4(tmp_path / f"clip{suffix}", video.frames, codec=codec, pix_fmt=pix_fmt, quality=quality)
    decoded = decode(path, FrameSelection())
    assert decoded.indices == [0, 1, 2]
    for t, frame in enumerate(decoded.frames):
        assert np.abs(frame / 255.0 - video.frames[t]).mean() < MAX_MEAN_ABS_ERROR, (suffix, t)


def test_range_stride_and_max_side_pick_and_scale_frames(clip):
    video, path, _ = clip
    decoded = decode(path, FrameSelection(start=1, end=5, stride=2, max_side=48))
    assert decoded.indices == [1, 3]
    assert decoded.size == (48, 32)  # 96x64 halved, aspect kept
    small = np.asarray(Image.fromarray((video.frames[3] * 255).round().astype(np.uint8)).resize((48, 32), 4))
    assert np.abs(decoded.frames[1].astype(float) - small).mean() < 6.0
    # Masks at the source size are scaled with the frames (area average, threshold 0.5).
    from backend.pipeline import load_input

    _, _, masks = clip
    data = load_input({"kind": "video", "path": str(path), "masks": str(masks), "max_side": 48}, None)
    assert data.frames.shape == (5, 32, 48, 3) and data.masks.shape == (2, 5, 32, 48)
    for k in range(2):
        small = video.masks[k].reshape(5, 32, 2, 48, 2).mean(axis=(2, 4)) > 0.5
        assert (data.masks[k] == small).mean() > 0.99
    assert output_size(1920, 1080, 512) == (512, 288)
    assert output_size(1080, 1920, 512) == (288, 512)
    assert output_size(300, 200, None) == (300, 200)


@pytest.mark.slow
def test_mp4_with_folder_masks_runs_stage1_from_frames_written_in_the_job_folder(clip, tmp_path):
    video, path, masks = clip
    out = tmp_path / "out"
    report = run_job(video_spec(path, masks, start=1, end=5, stride=2), out)
    assert report["status"] == "done"
    assert sorted(report["objects"]) == ["ball", "box"]  # object ids are the mask folder names
    for oid in ("ball", "box"):
        assert report["objects"][oid]["static"]["iou"] > 0.3, report["objects"][oid]
        assert (out / "checkpoints" / oid / "static.pt").is_file()
    # The frames used are real files in the reference layout inside the job folder.
    frames_dir = out / "input" / "JPEGImages" / "clip"
    assert sorted(p.name for p in frames_dir.iterdir()) == ["00001.png", "00003.png"]
    for t in (1, 3):
        got = np.asarray(Image.open(frames_dir / f"{t:05d}.png")) / 255.0
        assert np.abs(got - video.frames[t]).mean() < MAX_MEAN_ABS_ERROR
        for k, oid in enumerate(("ball", "box")):
            mask = np.asarray(Image.open(out / "input" / "Annotations" / "clip" / oid / f"{t:05d}.png")) > 127
            assert (mask == video.masks[k, t]).all()
    info = json.loads((out / "input" / "video.json").read_text())
    assert info["frames"] == [1, 3] and info["source_frames"] == 5 and info["stride"] == 2


def test_cli_arguments_make_a_video_spec_that_validates(clip):
    video, path, masks = clip
    args = build_parser().parse_args(
        ["run", "--video-file", str(path), "--masks", str(masks), "--frame-range", "2:", "--stride", "1"]
        + ["--max-side", "48", "--out", "/tmp/unused", "--preset", "cpu-demo", "--stages", "static"]
    )
    spec = spec_from_args(args)
    assert spec["input"] == {
        "kind": "video",
        "path": str(path),
        "masks": str(masks),
        "start": 2,
        "end": None,
        "stride": 1,
        "max_side": 48,
    }
    validate_job(spec)  # decodes and checks everything, keeps nothing
    bad = build_parser().parse_args(
        ["run", "--video-file", str(path), "--masks", str(masks), "--frame-range", "x", "--out", "/tmp/u"]
    )
    with pytest.raises(InputError, match="--frame-range 'x' must look like A:B"):
        spec_from_args(bad)


def test_image_sequence_with_any_numeric_names_and_indexed_masks(tiny_video, tmp_path):
    video = tiny_video(num_frames=4, indexed_masks=True)
    sequence = tmp_path / "sequence"
    sequence.mkdir()
    numbers = [7, 9, 10, 100]  # sorted by number, not by text ("100" < "7" as text)
    for t, n in enumerate(numbers):
        Image.fromarray((video.frames[t] * 255).round().astype(np.uint8)).save(sequence / f"shot_{n}.png")
    # Indexed masks numbered by order (12..15 are not frame indices of the sequence; 4 masks, 4 frames).
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    for t, src in enumerate(sorted(video.indexed_masks_dir.iterdir())):
        (indexed / f"{12 + t:05d}.png").write_bytes(src.read_bytes())
    from backend.pipeline import load_input

    data = load_input({"kind": "video", "path": str(sequence), "masks": str(indexed)}, tmp_path / "work")
    assert data.frame_names == ["00000", "00001", "00002", "00003"]
    assert data.object_ids == ["001", "002"]
    np.testing.assert_array_equal(data.frames, video.frames)  # PNG sequence: lossless
    np.testing.assert_array_equal(data.masks, video.masks)


def assert_fails_before_optimising(spec, out, match):
    with pytest.raises(InputError, match=match):
        run_job(spec, out)
    saved = json.loads((out / "report.json").read_text())
    assert saved["status"] == "failed" and not (out / "checkpoints").exists()
    return saved["error"]


def test_unreadable_video_is_a_clear_error(clip, tmp_path):
    _, _, masks = clip
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video\n" * 50)
    assert_fails_before_optimising(
        video_spec(broken, masks), tmp_path / "o1", r"cannot (open|read).*broken\.mp4"
    )
    missing = tmp_path / "missing.mov"
    assert_fails_before_optimising(video_spec(missing, masks), tmp_path / "o2", "missing.mov does not exist")


def test_range_outside_the_clip_is_a_clear_error(clip, tmp_path):
    _, path, masks = clip
    error = assert_fails_before_optimising(
        video_spec(path, masks, start=3, end=9), tmp_path / "o1", r"frame range 3:9 is outside"
    )
    assert "has 5 frames" in error
    assert_fails_before_optimising(video_spec(path, masks, start=5), tmp_path / "o2", "has 5 frames")
    assert_fails_before_optimising(video_spec(path, masks, start=2, end=2), tmp_path / "o3", "is empty")


def test_mask_count_mismatch_names_the_first_frame_without_a_mask(clip, tmp_path):
    video, path, _ = clip
    masks = write_object_masks(tmp_path / "short", video.masks[:, :3], ["ball", "box"])  # frames 0..2 only
    # Range 0:5 stride 2 uses frames 0, 2, 4: three masks by count would pair, so use stride 1.
    error = assert_fails_before_optimising(
        video_spec(path, masks), tmp_path / "o1", "frame 00003 has no mask"
    )
    assert "3 masks" in error and "5 frames" in error
    # The same masks are fine for the frames they cover.
    validate_job(video_spec(path, masks, end=3))


def test_mask_empty_in_the_first_frame_is_a_clear_error(clip, tmp_path):
    video, path, _ = clip
    masks = video.masks.copy()
    masks[1, 0] = False
    folder = write_object_masks(tmp_path / "m", masks, ["ball", "box"])
    assert_fails_before_optimising(
        video_spec(path, folder), tmp_path / "o", r"object box.*first frame 00000 is empty"
    )
    # Starting where the object shows is the fix the message suggests.
    validate_job(video_spec(path, folder, start=1))


def test_protocol_accepts_video_inputs_and_rejects_bad_fields():
    from shared import protocol as P

    def check(inp):
        msg = P.Message(type="submit", id="r1", payload={"spec": {"input": inp}})
        return P.validate_request(msg)

    check({"kind": "video", "path": "/d/clip.mp4", "masks": "/d/masks", "start": 0, "end": None, "stride": 2})
    with pytest.raises(P.ProtocolError, match="stride"):
        check({"kind": "video", "path": "/d/c.mp4", "masks": "/d/m", "stride": 0})
    with pytest.raises(P.ProtocolError, match="unknown keys"):
        check({"kind": "video", "path": "/d/c.mp4", "masks": "/d/m", "fps": 3})
