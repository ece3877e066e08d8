"""Typed configuration: YAML presets in configs/ merged with `--set key=value` overrides.

One dataclass per component; the defaults are the published numbers (METHOD.md), so
`configs/full.yaml` only states them again for the reader.  Unknown keys are errors that name
the key and list the valid ones.  The resolved config is saved beside every run's outputs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backend.errors import InputError
from backend.guidance.zero123 import GuidanceConfig
from backend.motion.hexplane import DeformationConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("full", "lite", "cpu-demo")


@dataclass
class DensifyConfig:
    interval: int = 100
    max_gaussians: int = 15000
    grad_threshold: float = 0.01
    clone_max_scale: float = 0.005
    split_factor: float = 1.6
    prune_opacity: float = 0.01
    prune_max_scale: float = 0.05
    final_prune_opacity: float = 0.01
    final_prune_max_scale: float = 0.1
    # Densification stops after this fraction of training so the last steps refine a fixed set.
    until_ratio: float = 1.0


@dataclass
class Stage1Config:
    iters: int = 1000
    num_gaussians: int = 5000
    init_radius: float = 0.5
    novel_views: int = 16
    reference_size: int = 256
    # (fraction of training, novel-view resolution): 128 -> 256 -> 512 at 30% / 60%.
    novel_resolution_schedule: list[list[float]] = field(
        default_factory=lambda: [[0.0, 128], [0.3, 256], [0.6, 512]]
    )
    elevation_range: list[float] = field(default_factory=lambda: [-30.0, 30.0])
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    radius_range: list[float] = field(default_factory=lambda: [-0.5, 0.5])
    lr_position: float = 1e-2
    lr_position_final: float = 2e-4
    lr_position_steps: int = 500
    lr_color: float = 1e-2
    lr_opacity: float = 5e-2
    lr_scale: float = 5e-3
    lr_rotation: float = 5e-3
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"rgb": 10000.0, "mask": 1000.0, "sds": 1.0}
    )
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    placement_iters: int = 1000
    placement_max_side: int = 720
    placement_lr: float = 1e-3
    placement_loss_weights: dict[str, float] = field(default_factory=lambda: {"rgb": 1000.0, "mask": 100.0})
    preview_every: int = 0
    # Lift all objects of a video in one loop with one SDS batch a step (tests/bench/results.md);
    # false lifts them one after another.  Same maths either way.
    objects_together: bool = True


@dataclass
class Stage2Config:
    steps_per_frame: int = 100
    frames_per_step: int = 10
    novel_views_per_frame: int = 4
    sds_t_range: list[float] = field(default_factory=lambda: [0.02, 0.5])
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {
            "rgb": 10000.0,
            "mask": 1000.0,
            "flow": 10000.0,
            "sds": 1.0,
            "scale_deviation": 1000.0,
            "scale_consistency": 50000.0,
            "rigidity": 50000.0,
        }
    )
    knn: int = 16
    placement_iters: int = 500
    placement_lr: float = 1e-3
    placement_lr_final: float = 2e-5
    placement_loss_weights: dict[str, float] = field(default_factory=lambda: {"rgb": 1000.0, "mask": 100.0})
    # "ray_aligned" (ours): uniform scale, depth offsets along the ray through the object's centre;
    # "projective": the video camera sees each placed object exactly as the crop camera did, at
    # the cost of a depth stretch; "similarity": translation and uniform scale, as published.
    # backend/motion/placement.py gives the measurements.
    placement_model: typing.Literal["ray_aligned", "projective", "similarity"] = "ray_aligned"
    joint_iters: int = 100
    joint_lr_factor: float = 0.1
    # Departure, off in the published presets: phase C may also fine-tune the canonical colours
    # (one colour per Gaussian, shared by all frames) at this learning rate.  Without a prior
    # (guidance none) nothing else colours the sides an object turns towards the camera after
    # frame 0; the video itself shows them.  0 keeps the canonical Gaussians frozen.
    joint_color_lr: float = 0.0
    # Departure, off in the published presets: phase C may also fine-tune the canonical
    # opacities and log-scales at this learning rate, so Gaussians fitted on a small crop can
    # sharpen against the full frames.  0 keeps them frozen.
    joint_shape_lr: float = 0.0
    # Long side (px) of the full frames that phase C fits; 0 uses stage1.placement_max_side, as
    # phase B does.
    joint_max_side: int = 0
    deformation: DeformationConfig = field(default_factory=DeformationConfig)


@dataclass
class Stage3Config:
    # "auto" (Depth-Anything small from the local cache, else the weight-free occlusion-order
    # fallback), "none" (that fallback),
    # or a local folder / hub id of a transformers depth-estimation model.
    depth_model: str = "auto"
    k_sweep_min: float = 0.65
    k_sweep_max: float = 1.5
    # The published sweep: 1000 steps of 0.00085 from 0.65.
    k_sweep_steps: int = 1000
    alpha_threshold: float = 0.75
    # Input-view work (depth sweep, metrics, track visibility) at most this size; the published
    # composition works on frames resized to at most 720 px.
    work_long_side: int = 720
    # Mask erosion (px) at a 512 px long side, scaled with the working size.
    mask_erosion: int = 7
    render_long_side: int = 512
    loops: int = 5
    orbit_frames: int = 0
    fps: float = 10.0
    write_ply_sequence: bool = False
    track_grid: int = 48
    # A tracked Gaussian is visible when its depth <= the rendered depth at its pixel + this; grid
    # points are matched only to Gaussians within this of the rendered depth in frame 0.
    track_depth_tolerance: float = 0.1


@dataclass
class Config:
    seed: int = 0
    crop_size: int = 256
    crop_fill: float = 0.65
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML/CLI value against a dataclass field type; convert ints to floats."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise InputError(f"config key '{key}' must be a mapping of {sorted(_field_types(annotation))}")
        return _build(annotation, value, key + ".")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise InputError(
                f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InputError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise InputError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise InputError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise InputError(f"config key '{key}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"config key '{key}' must be a mapping, got {value!r}")
        _, item_type = typing.get_args(annotation)
        return {str(k): _coerce(v, item_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except InputError:
                continue
        raise InputError(f"config key '{key}' has an invalid value {value!r}")
    if origin is tuple:
        return tuple(value)
    return value


# Integer keys that count or size something there must be at least one of; every other integer
# key must be >= 0 (0 means "off" or "the default" there, as its comment says).
AT_LEAST_ONE = frozenset(
    {
        "crop_size",
        "guidance.image_size",
        "stage1.iters",
        "stage1.num_gaussians",
        "stage1.reference_size",
        "stage1.lr_position_steps",
        "stage1.densify.interval",
        "stage1.densify.max_gaussians",
        "stage1.placement_max_side",
        "stage2.steps_per_frame",
        "stage2.frames_per_step",
        "stage2.knn",
        "stage2.deformation.plane_channels",
        "stage2.deformation.min_time_resolution",
        "stage2.deformation.hidden",
        "stage3.k_sweep_steps",
        "stage3.work_long_side",
        "stage3.render_long_side",
        "stage3.loops",
        "stage3.track_grid",
    }
)


def _check_range(key: str, value: Any) -> None:
    # A negative learning rate would climb the loss; 0 is how a preset turns a group off.
    if key.endswith("_lr") and isinstance(value, float) and value < 0:
        raise InputError(f"config key '{key}' is a learning rate and must be >= 0, got {value}")
    if isinstance(value, int) and not isinstance(value, bool):
        least = 1 if key in AT_LEAST_ONE else 0
        if value < least:
            raise InputError(f"config key '{key}' must be an integer >= {least}, got {value}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise InputError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under '{prefix or '<root>'}' are: "
            + ", ".join(sorted(types_))
        )
    kwargs = {name: _coerce(value, types_[name], prefix + name) for name, value in values.items()}
    for name, value in kwargs.items():
        _check_range(prefix + name, value)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """`stage1.iters=300` -> ("stage1.iters", 300); the value is parsed as YAML."""
    if "=" not in text:
        raise InputError(f"override '{text}' must look like key=value, e.g. stage1.iters=300")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; on a command line it means the number.
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _merge_override(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    # Overrides replace a single leaf, so a loss weight can be changed without restating the rest.
    out = dict(base)
    parts = key.split(".")
    if len(parts) == 1:
        out[parts[0]] = value
        return out
    child = out.get(parts[0])
    out[parts[0]] = _merge_override(child if isinstance(child, dict) else {}, ".".join(parts[1:]), value)
    return out


def load_config(preset: str | Path = "full", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Preset name (or YAML path) + overrides -> Config.  Raises InputError on any bad key or value."""
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise InputError(
            f"preset '{preset}' not found (looked for {path}); choose one of {', '.join(PRESETS)}"
        )
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a mapping of config keys")
    # Start from the defaults so an override of one entry of a mapping (a loss weight, say) keeps
    # the entries the preset file does not restate.
    values = _deep_merge(dataclasses.asdict(Config()), values)
    pairs = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else list((overrides or {}).items())
    )
    for key, value in pairs:
        values = _merge_override(values, key, value)
    return _build(Config, values)


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
