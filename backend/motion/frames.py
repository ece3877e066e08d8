"""Which frames a stage-2 step trains on."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class FrameSample(NamedTuple):
    frames: list[int]  # distinct frame indices, ascending
    flow_pairs: list[tuple[int, int]]  # (t - 1, t) for every sampled t > 0


def sample_frames(num_frames: int, k: int = 10, rng: np.random.Generator | None = None) -> FrameSample:
    """Draw min(k, T) distinct frames of a T-frame video without replacement.

    The released code draws exactly k frames and fails for videos shorter than k; here a short
    video simply trains on all its frames.  Frame 0 has no previous frame, so it contributes
    no flow pair.
    """
    if num_frames < 1:
        raise ValueError(f"sample_frames needs num_frames >= 1, got {num_frames}")
    if k < 1:
        raise ValueError(f"sample_frames needs k >= 1, got {k}")
    rng = rng if rng is not None else np.random.default_rng()
    count = min(k, num_frames)
    frames = sorted(int(t) for t in rng.choice(num_frames, size=count, replace=False))
    return FrameSample(frames=frames, flow_pairs=[(t - 1, t) for t in frames if t > 0])
