"""Write a random-weight Zero123 model in the published diffusers layout.

"tiny" is for CPU tests (the real loader reads it in well under a second); "xl" has the exact
Zero123-XL architecture (Stable Diffusion 1.x UNet with 8 input channels, the SD VAE, CLIP
ViT-L/14 vision tower with a 768-d projection, Linear(772 -> 768) camera projection) for GPU
benchmarks without the real weights.

    python -m backend.guidance.random_model OUT --size xl [--seed 0] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from backend.guidance.zero123 import DTYPES

# Published Zero123 scheduler (scaled-linear betas of Stable Diffusion 1.x, 1000 steps).
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def zero123_configs(size: str) -> dict[str, dict]:
    """Constructor arguments per sub-model for `size` "tiny" or "xl"."""
    if size == "xl":
        unet = {
            "sample_size": 32,  # 256 px / 8
            "in_channels": 8,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "center_input_sample": False,
            "use_linear_projection": False,
            "upcast_attention": False,
        }
        vae = {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "act_fn": "silu",
            "sample_size": 256,
            "scaling_factor": 0.18215,
        }
        clip = {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_channels": 3,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }
        processor_size = 224
    elif size == "tiny":
        unet = {
            "sample_size": 32,
            "in_channels": 8,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (8, 16),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 16,
            "attention_head_dim": 4,
            "norm_num_groups": 4,
        }
        # Four blocks so the latent is 1/8 of the image, like the real VAE (256 px -> 32x32).
        vae = {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (4, 4, 8, 8),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 256,
            "scaling_factor": 0.18215,
        }
        clip = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_channels": 3,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 16,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }
        processor_size = 32
    else:
        raise ValueError(f"size must be 'tiny' or 'xl', not {size!r}")
    feature_extractor = {
        "crop_size": {"height": processor_size, "width": processor_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": processor_size},
    }
    projection = {"embedding_dim": clip["projection_dim"], "additional_embeddings": 4}
    return {
        "unet": unet,
        "vae": vae,
        "image_encoder": clip,
        "feature_extractor": feature_extractor,
        "scheduler": dict(SCHEDULER_CONFIG),
        "clip_camera_projection": projection,
    }


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Freshly built modules are fp32; casting only when asked keeps diffusers from warning.
    return module if dtype == torch.float32 else module.to(dtype)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_random_zero123(
    folder: str | Path, size: str = "tiny", seed: int = 0, dtype: str | None = None
) -> Path:
    """Write a random-weight Zero123 of `size` into `folder`; returns the folder.

    dtype: storage precision ("fp32" | "fp16" | "bf16"); default fp32 for tiny, fp16 for xl
    (the published weights are fp16).
    """
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    dtype = dtype or ("fp16" if size == "xl" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_dtype = DTYPES[dtype]
    configs = zero123_configs(size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(**configs["unet"])
        _cast(unet, torch_dtype).save_pretrained(str(folder / "unet"))
        del unet
        vae = AutoencoderKL(**configs["vae"])
        _cast(vae, torch_dtype).save_pretrained(str(folder / "vae"))
        del vae
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"]))
        _cast(clip, torch_dtype).save_pretrained(str(folder / "image_encoder"))
        del clip
        proj_cfg = configs["clip_camera_projection"]
        width = proj_cfg["embedding_dim"]
        linear = torch.nn.Linear(width + proj_cfg["additional_embeddings"], width)
        (folder / "clip_camera_projection").mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "proj.weight": linear.weight.detach().to(torch_dtype).contiguous(),
                "proj.bias": linear.bias.detach().to(torch_dtype).contiguous(),
            },
            str(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"),
        )
    finally:
        torch.random.set_rng_state(generator_state)
    _write_json(
        folder / "clip_camera_projection" / "config.json",
        {"_class_name": "CLIPCameraProjection", "_diffusers_version": diffusers.__version__, **proj_cfg},
    )
    DDIMScheduler(**configs["scheduler"]).save_pretrained(str(folder / "scheduler"))
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", configs["feature_extractor"])
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "Zero123Pipeline",
            "_diffusers_version": diffusers.__version__,
            "clip_camera_projection": ["zero123", "CLIPCameraProjection"],
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (created if missing)")
    parser.add_argument("--size", choices=("tiny", "xl"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 tiny, fp16 xl")
    args = parser.parse_args(argv)
    out = build_random_zero123(args.out, size=args.size, seed=args.seed, dtype=args.dtype)
    print(f"wrote random {args.size} Zero123 to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
