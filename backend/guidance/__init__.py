"""Score-distillation guidance from Zero123 (diffusers layout), or none.

May import: torch, diffusers, transformers, huggingface_hub, safetensors, backend.cameras,
backend.errors.  diffusers and transformers are imported lazily (inside the loader and the
random-model writer) so that `--guidance none` never pays for them.

Public interface:
    GuidanceConfig            typed settings (published defaults)
    load_zero123(source, device, dtype) -> Zero123Components
    Zero123Guidance           set_references(), sds_loss(), predict_noise()
    make_guidance(cfg, device) -> Zero123Guidance | None   (None for model "none")
    anneal_timestep(...)      the deterministic timestep schedule
    GuidanceWeightsNotFound   InputError raised when weights cannot be found offline
"""

from backend.guidance.zero123 import (
    DEFAULT_HUB_ID,
    SUBFOLDERS,
    CLIPCameraProjection,
    GuidanceConfig,
    GuidanceWeightsNotFound,
    Zero123Components,
    Zero123Guidance,
    anneal_timestep,
    load_zero123,
    make_guidance,
    resolve_model_folder,
)

__all__ = [
    "DEFAULT_HUB_ID",
    "SUBFOLDERS",
    "CLIPCameraProjection",
    "GuidanceConfig",
    "GuidanceWeightsNotFound",
    "Zero123Components",
    "Zero123Guidance",
    "anneal_timestep",
    "load_zero123",
    "make_guidance",
    "resolve_model_folder",
]
