"""Depth providers: disparity post-processing, a tiny random transformers model through the real
loader (local folder and hub-cache layout), and the named weight-free fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.depth import (
    AUTO_CANDIDATES,
    FALLBACK_NAME,
    MIN_DISPARITY,
    PlacementFallback,
    TransformersDepth,
    disparity_to_depth,
    make_depth_provider,
    validate_depth_model,
)
from backend.errors import InputError


def save_tiny_depth_anything(folder: Path) -> Path:
    """A randomly initialised Depth-Anything with a 2-layer, 16-wide DINOv2 backbone, saved with its
    image processor the way the published checkpoints are laid out."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    torch.manual_seed(0)
    backbone = Dinov2Config(
        image_size=28,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8,
        head_hidden_size=4,
    )
    model = DepthAnythingForDepthEstimation(config)
    # A positive bias on the last layer keeps the ReLU output away from zero, so the random model
    # predicts a usable disparity everywhere.
    with torch.no_grad():
        model.head.conv3.bias.fill_(1.0)
    processor = DPTImageProcessor(
        size={"height": 28, "width": 28},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_disparity_becomes_depth_with_invalid_far_pixels():
    disparity = np.tile(np.linspace(0.0, 4.0, 256, dtype=np.float32), (256, 1))  # max 4 -> normalised by 4
    disparity[100, 200] = 400.0  # a speckle the median filter must remove before normalising matters
    estimate = disparity_to_depth(disparity)
    assert estimate.depth.shape == (256, 256) and estimate.valid.dtype == bool
    # The ramp without the speckle, normalised.
    normalised = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (256, 1))
    assert not estimate.valid[:, :2].any() and estimate.valid[:, 10:].all()
    inside = normalised > MIN_DISPARITY + 0.01
    inside[:, :8] = False  # the median filter mixes columns near the border
    # Depth is the inverse of the normalised disparity (the ramp is smooth, so the median keeps it).
    np.testing.assert_allclose(estimate.depth[inside], 1.0 / normalised[inside], rtol=0.08)
    assert estimate.depth[100, 200] == pytest.approx(estimate.depth[101, 200], rel=0.05)
    assert (estimate.depth[~estimate.valid] == 1.0 / MIN_DISPARITY).all()


def test_tiny_random_depth_model_loads_from_a_local_folder(tmp_path):
    folder = save_tiny_depth_anything(tmp_path / "tiny-depth")
    provider = make_depth_provider(str(folder))
    assert isinstance(provider, TransformersDepth)
    assert provider.name == str(folder) and not provider.metric
    image = np.random.default_rng(0).uniform(size=(50, 74, 3)).astype(np.float32)  # non-square
    estimate = provider.estimate(image)
    assert estimate.depth.shape == (50, 74) and estimate.valid.shape == (50, 74)
    assert np.isfinite(estimate.depth).all() and estimate.valid.any()
    assert estimate.depth[estimate.valid].min() >= 1.0 - 1e-6  # inverse of a max-normalised disparity
    np.testing.assert_array_equal(provider.estimate(image).depth, estimate.depth)


def test_auto_finds_a_cached_depth_anything(tmp_path):
    """'auto' looks in the hub cache (here a cache folder written by the test) and loads from it."""
    repo = AUTO_CANDIDATES[0]
    commit = "0" * 40
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    save_tiny_depth_anything(snapshot)
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    provider = make_depth_provider("auto", cache_dir=tmp_path / "hub")
    assert isinstance(provider, TransformersDepth) and provider.name == repo
    assert provider.estimate(np.full((32, 32, 3), 0.5, np.float32)).depth.shape == (32, 32)


def test_auto_without_weights_falls_back_and_says_so(tmp_path):
    provider = make_depth_provider("auto", cache_dir=tmp_path / "empty-cache")
    assert isinstance(provider, PlacementFallback)
    assert provider.name == FALLBACK_NAME == "fallback:occlusion-order"
    assert all(candidate in provider.note for candidate in AUTO_CANDIDATES)
    assert provider.estimate(np.zeros((8, 8, 3), np.float32)) is None
    none = make_depth_provider("none")
    assert none.name == FALLBACK_NAME and "none" in none.note


def test_named_model_that_is_missing_is_an_input_error(tmp_path):
    with pytest.raises(
        InputError, match=r"depth model 'someone/no-such-depth-model' not found.*stage3.depth_model"
    ):
        make_depth_provider("someone/no-such-depth-model", cache_dir=tmp_path / "empty-cache")


def test_validate_depth_model_fails_early_without_loading(tmp_path):
    validate_depth_model("auto", cache_dir=tmp_path / "empty-cache")
    validate_depth_model("none")
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        validate_depth_model("someone/no-such-depth-model", cache_dir=tmp_path / "empty-cache")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        validate_depth_model(str(tmp_path / "not-a-model"))
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    validate_depth_model(str(tmp_path / "not-a-model"))
