"""Score distillation sampling (SDS) with Zero123 through diffusers.

Notation (DDPM / diffusers schedulers), per novel view i of a batch of N:
    z        latent of the rendered view: vae_scale * VAE encoder(2 x - 1)       `latents`
    t        integer diffusion timestep in [0, 1000)                              `t`
    a_bar(t) cumulative product of (1 - beta), scheduler.alphas_cumprod[t]        `alpha_bar`
    eps      the Gaussian noise added                                            `noise`
    z_t      sqrt(a_bar) z + sqrt(1 - a_bar) eps                                  `noisy`
    eps_hat  classifier-free guided noise estimate                               `eps_hat`
    w(t)     1 - a_bar(t)                                                         `w`
    g        w (eps_hat - eps), the SDS gradient with respect to z                `grad`

Conditioning follows the published Zero123 diffusers pipeline: the reference crop's CLIP image
embedding, concatenated with the camera embedding [radians(d_elev), sin(d_azim), cos(d_azim),
d_radius] and projected back to the embedding width by `clip_camera_projection`, is the UNet's
cross-attention context (one token); the reference's VAE latent (posterior mode, NOT multiplied by
the latent scale: Zero123 was trained that way) is concatenated to the noisy latent as 4 extra
input channels.  The unconditional branch of classifier-free guidance uses a zero context and a
zero image latent.  The UNet batch is [conditional; unconditional], as in the released
DreamScene4D code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backend.cameras import zero123_camera_embedding
from backend.errors import InputError

DEFAULT_HUB_ID = "ashawkey/zero123-xl-diffusers"
SUBFOLDERS = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler", "clip_camera_projection")
ANNEAL_SCHEDULES = ("linear", "hold_then_linear")
RENDERED_LATENT_MODES = ("sample", "mode")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Config file each sub-folder must hold, and the weight files one of which it must hold (none for
# the scheduler and the feature extractor, which are configuration only).
_CONFIG_FILE = {
    "unet": "config.json",
    "vae": "config.json",
    "image_encoder": "config.json",
    "feature_extractor": "preprocessor_config.json",
    "scheduler": "scheduler_config.json",
    "clip_camera_projection": "config.json",
}
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
_TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "model.fp16.safetensors",
    "pytorch_model.fp16.bin",
)
_WEIGHT_FILES = {
    "unet": _DIFFUSERS_WEIGHTS,
    "vae": _DIFFUSERS_WEIGHTS,
    "image_encoder": _TRANSFORMERS_WEIGHTS,
    "clip_camera_projection": _DIFFUSERS_WEIGHTS,
}
# OpenAI CLIP normalisation, used when the feature extractor config does not state its own.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class GuidanceWeightsNotFound(InputError):
    """The guidance model's weights are not in the given folder nor in the local HF cache."""


@dataclass
class GuidanceConfig:
    """Zero123 SDS settings; defaults are the published numbers (METHOD.md)."""

    # "none", a local folder in diffusers layout, or a hub id looked up in the local HF cache only.
    model: str = "none"
    guidance_scale: float = 5.0
    # Timestep range as fractions of the 1000 training steps, and the anneal schedule:
    # "linear": t = round((1 - step_ratio) * 1000) clipped to [t_min, t_max] (released code);
    # "hold_then_linear": t_max for the first half, then linear from t_max down to t_min.
    t_min: float = 0.02
    t_max: float = 0.98
    anneal: str = "linear"
    # Weights precision on CUDA ("fp16" | "bf16" | "fp32"); always fp32 on CPU.
    dtype: str = "fp16"
    vae_scale: float = 0.18215
    # Side of the square images Zero123 sees (renders and references are resized to it).
    image_size: int = 256
    # Latent of a rendered view: "sample" draws from the VAE posterior (as the released code does),
    # "mode" takes its mean.
    rendered_latent: str = "sample"
    # Where to look for hub ids; empty = huggingface_hub's default cache (HF_HUB_CACHE / HF_HOME).
    cache_dir: str = ""
    # Speed (CUDA only; same maths): channels-last memory layout, torch.compile of the UNet
    # and the VAE encoder (with `compile_mode`) and cuDNN autotuning.  Off = the eager baseline of
    # the benchmark.  "auto": the UNet (forward only, one batch size per stage) with
    # "reduce-overhead" (CUDA graphs), the VAE encoder (forward and backward) with "default"; any
    # other mode applies to both (see `compile_modes`).
    optimize: bool = False
    compile_mode: str = "auto"
    # Memory (any device; same maths): SDS over at most this many rendered views at a time, each
    # chunk's VAE encoder graph freed before the next is built.  0 = all views in one batch.
    encode_chunk: int = 0

    def validate(self) -> None:
        if not self.model.strip():
            raise InputError(
                "guidance.model is empty: set it to none, a folder in diffusers layout, or a hub id "
                f"such as {DEFAULT_HUB_ID} that is in the local Hugging Face cache"
            )
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise InputError(
                f"guidance.t_min={self.t_min} and guidance.t_max={self.t_max} must satisfy "
                "0 <= t_min < t_max <= 1 (fractions of the 1000 diffusion steps)"
            )
        if self.anneal not in ANNEAL_SCHEDULES:
            raise InputError(f"guidance.anneal={self.anneal!r} is not one of {', '.join(ANNEAL_SCHEDULES)}")
        if self.dtype not in DTYPES:
            raise InputError(f"guidance.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.rendered_latent not in RENDERED_LATENT_MODES:
            raise InputError(
                f"guidance.rendered_latent={self.rendered_latent!r} is not one of {', '.join(RENDERED_LATENT_MODES)}"
            )
        if self.guidance_scale < 0:
            raise InputError(f"guidance.guidance_scale={self.guidance_scale} must be >= 0")
        if self.image_size <= 0 or self.image_size % 8:
            raise InputError(f"guidance.image_size={self.image_size} must be a positive multiple of 8")
        compile_modes(self.compile_mode)  # raises on an unknown mode
        if (
            isinstance(self.encode_chunk, bool)
            or not isinstance(self.encode_chunk, int)
            or self.encode_chunk < 0
        ):
            raise InputError(
                f"guidance.encode_chunk={self.encode_chunk!r} must be an integer >= 0 "
                "(0 = encode all rendered views at once)"
            )


def compile_modes(mode: str) -> tuple[str, str]:
    """torch.compile modes (UNet, VAE encoder) for `guidance.compile_mode`.

    "auto" graphs the UNet with CUDA graphs ("reduce-overhead"): it runs forward only, under
    no_grad, at one batch size per stage, and its many small kernels leave the H100 waiting on
    kernel launches otherwise (batch 32: 25.5 ms compiled "default", 17.9 ms with CUDA graphs,
    tests/bench/results.md).  The encoder keeps "default": its forward feeds the backward.
    """
    if mode not in COMPILE_MODES:
        raise InputError(f"guidance.compile_mode={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return ("reduce-overhead", "default") if mode == "auto" else (mode, mode)


def encoder_compile_options(mode: str) -> dict[str, Any]:
    """Inductor options for the VAE encoder: those of torch.compile `mode`, plus channels-last
    layouts forced in every graph the encoder compiles to, its backward included.

    Inductor picks channels-last per graph by counting `aten.convolution` nodes; the backward
    graph holds only `convolution_backward` nodes, so it counts none and keeps NCHW.  Each of its
    convolution backwards (cuDNN, channels-last weights) then first copied its NCHW incoming
    gradient to channels-last: about 10 ms of copies in a 16-view step on an H100
    (tests/bench/step_profile_h100.json, "direct_copy_kernel").
    """
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode), "force_layout_optimization": True}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """Half precision only where it is fast and supported: on CPU everything runs in fp32."""
    if name not in DTYPES:
        raise InputError(f"guidance.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name] if torch.device(device).type == "cuda" else torch.float32


def anneal_timestep(
    step_ratio: float,
    t_min: float = 0.02,
    t_max: float = 0.98,
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
) -> int:
    """Deterministic SDS timestep for training progress `step_ratio` in [0, 1].

    "linear" is the released schedule, t = round((1 - step_ratio) * T) clipped to
    [t_min T, t_max T]; with t_range (0.02, 0.5) it already holds t at 500 for the first half
    of training and then falls as 1000 (1 - step_ratio).  "hold_then_linear" holds t_max T for
    step_ratio < 0.5 and then goes linearly from t_max T to t_min T over the second half,
    whatever t_max is.
    """
    if schedule not in ANNEAL_SCHEDULES:
        raise ValueError(f"unknown anneal schedule {schedule!r}; expected one of {ANNEAL_SCHEDULES}")
    ratio = min(max(float(step_ratio), 0.0), 1.0)
    lo = round(t_min * num_train_timesteps)
    hi = round(t_max * num_train_timesteps)
    if schedule == "linear":
        t = round((1.0 - ratio) * num_train_timesteps)
    elif ratio < 0.5:
        t = hi
    else:
        t = round(hi - (hi - lo) * (ratio - 0.5) / 0.5)
    # Timesteps index alphas_cumprod, so T itself is out of range.
    return int(min(max(t, lo), hi, num_train_timesteps - 1))


class CLIPCameraProjection(nn.Module):
    """Linear(embedding_dim + 4 -> embedding_dim) over [CLIP image embedding, camera embedding].

    Same parameter names (`proj.weight`, `proj.bias`) and config keys (`embedding_dim`,
    `additional_embeddings`) as the published Zero123 diffusers pipeline's module.
    """

    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.additional_embeddings = additional_embeddings
        self.proj = nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.proj(embedding)


@dataclass
class ClipPreprocess:
    """CLIPImageProcessor's resize / centre crop / normalise, done in torch so it batches on GPU."""

    shortest_edge: int
    crop_size: tuple[int, int]
    mean: tuple[float, ...] = _CLIP_MEAN
    std: tuple[float, ...] = _CLIP_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> normalised pixel values [B, 3, crop_h, crop_w] (fp32)."""
        x = images.float()
        h, w = x.shape[-2:]
        scale = self.shortest_edge / min(h, w)
        size = (max(self.shortest_edge, int(h * scale)), max(self.shortest_edge, int(w * scale)))
        if size != (h, w):
            # Bicubic with antialias approximates PIL's bicubic resampling; PIL clips to the
            # 8-bit range, hence the clamp.
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        ch, cw = self.crop_size
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass
class Zero123Components:
    """The loaded parts of a Zero123 model, frozen, on one device, in one dtype."""

    unet: nn.Module
    vae: nn.Module
    image_encoder: nn.Module
    camera_projection: CLIPCameraProjection
    scheduler: Any  # diffusers DDIMScheduler (only its alphas_cumprod and config are used)
    clip_preprocess: ClipPreprocess
    device: torch.device
    dtype: torch.dtype
    source: str = ""
    folder: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Finding and loading weights
# --------------------------------------------------------------------------------------------


def _default_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _how_to_provide(source: str) -> str:
    hub_id = source if _HUB_ID.match(source) and not Path(source).expanduser().exists() else DEFAULT_HUB_ID
    return (
        "Provide the weights with `--guidance /path/to/zero123-xl-diffusers` (a folder in diffusers "
        f"layout with the sub-folders {', '.join(SUBFOLDERS)}), or pre-populate the Hugging Face "
        f"cache on a machine with network access: `huggingface-cli download {hub_id}` (set HF_HOME or "
        "HF_HUB_CACHE to use another cache; the backend never downloads).  `--guidance none` runs "
        "without score distillation."
    )


def resolve_model_folder(source: str, cache_dir: str | None = None) -> Path:
    """A local folder, or a hub id found in the local Hugging Face cache (never the network)."""
    source = str(source).strip()
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    looked: list[str] = []
    if path.exists():
        looked.append(f"local path {path.resolve()} (a file, not a folder)")
    else:
        looked.append(f"local folder {path.resolve()} (does not exist)")
    if _HUB_ID.match(source):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        cache = cache_dir or _default_cache_dir()
        repo_folder = Path(cache) / ("models--" + source.replace("/", "--"))
        try:
            return Path(snapshot_download(repo_id=source, cache_dir=cache, local_files_only=True)).resolve()
        except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as err:
            reason = "no cached snapshot" if not repo_folder.exists() else f"no usable snapshot: {err}"
            looked.append(f"Hugging Face cache {repo_folder} ({reason}; offline lookup only)")
    else:
        looked.append(
            "the Hugging Face cache was not searched: the value is not a hub id of the form owner/name"
        )
    places = "\n".join(f"  - {place}" for place in looked)
    raise GuidanceWeightsNotFound(
        f"Zero123 guidance model '{source}' not found. Looked in:\n{places}\n{_how_to_provide(source)}"
    )


def check_model_folder(folder: Path, source: str) -> None:
    """Every sub-folder, config and weight file is there, before anything heavy is loaded."""
    problems: list[str] = []
    for sub in SUBFOLDERS:
        sub_dir = folder / sub
        if not sub_dir.is_dir():
            problems.append(f"sub-folder {sub}/ is missing")
            continue
        if not (sub_dir / _CONFIG_FILE[sub]).is_file():
            problems.append(f"{sub}/{_CONFIG_FILE[sub]} is missing")
        weights = _WEIGHT_FILES.get(sub)
        if weights and not any((sub_dir / name).is_file() for name in weights):
            problems.append(f"{sub}/ has no weights (expected one of {', '.join(weights)})")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise GuidanceWeightsNotFound(
            f"Zero123 guidance model '{source}' at {folder} is incomplete:\n{listed}\n{_how_to_provide(source)}"
        )


def _variant(sub_dir: Path, weights: tuple[str, ...]) -> str | None:
    """diffusers/transformers load `*.fp16.*` files only when asked for the fp16 variant."""
    plain = [name for name in weights if ".fp16." not in name]
    return None if any((sub_dir / name).is_file() for name in plain) else "fp16"


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_camera_projection(sub_dir: Path) -> CLIPCameraProjection:
    config = _read_json(sub_dir / "config.json")
    state: dict[str, torch.Tensor] | None = None
    for name in _DIFFUSERS_WEIGHTS:
        file = sub_dir / name
        if not file.is_file() or name.endswith(".json"):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
        break
    if state is None or "proj.weight" not in state or "proj.bias" not in state:
        found = sorted(state) if state is not None else []
        raise InputError(
            f"{sub_dir} must hold the tensors proj.weight and proj.bias of a Linear(768 + 4 -> 768); "
            f"found {found}"
        )
    out_dim, in_dim = state["proj.weight"].shape
    embedding_dim = int(config.get("embedding_dim", out_dim))
    additional = int(config.get("additional_embeddings", in_dim - out_dim))
    if (embedding_dim, additional) != (out_dim, in_dim - out_dim) or additional != 4:
        raise InputError(
            f"{sub_dir}: proj.weight is {out_dim}x{in_dim} but config.json says embedding_dim={embedding_dim}, "
            f"additional_embeddings={additional}; Zero123 needs a Linear(embedding_dim + 4 -> embedding_dim)"
        )
    module = CLIPCameraProjection(embedding_dim, additional)
    module.load_state_dict({"proj.weight": state["proj.weight"], "proj.bias": state["proj.bias"]})
    return module


def _clip_preprocess_from_config(path: Path, encoder_image_size: int) -> ClipPreprocess:
    config = _read_json(path)

    def side(value: Any, default: int) -> int:
        if isinstance(value, dict):
            if "shortest_edge" in value:
                return int(value["shortest_edge"])
            return int(min(value.get("height", default), value.get("width", default)))
        return int(value) if value is not None else default

    # The encoder's configured input size is the crop: a processor that disagrees with it would feed
    # the vision transformer a wrong number of patches.
    crop = encoder_image_size
    shortest = side(config.get("size"), crop) if config.get("do_resize", True) else crop
    if side(config.get("crop_size"), crop) != crop or shortest < crop:
        shortest = crop
    mean = (
        tuple(float(v) for v in config.get("image_mean", _CLIP_MEAN))
        if config.get("do_normalize", True)
        else (0.0,) * 3
    )
    std = (
        tuple(float(v) for v in config.get("image_std", _CLIP_STD))
        if config.get("do_normalize", True)
        else (1.0,) * 3
    )
    return ClipPreprocess(shortest_edge=shortest, crop_size=(crop, crop), mean=mean, std=std)


def _load_image_encoder(sub_dir: Path, dtype: torch.dtype) -> nn.Module:
    import transformers
    from transformers import CLIPVisionModelWithProjection

    variant = _variant(sub_dir, _TRANSFORMERS_WEIGHTS)
    major = int(transformers.__version__.split(".")[0])
    # transformers 5 renamed `torch_dtype` to `dtype`; older releases would store an unknown
    # `dtype` keyword in the config and silently load fp32.
    dtype_kw = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    return CLIPVisionModelWithProjection.from_pretrained(str(sub_dir), variant=variant, **dtype_kw)


def load_zero123(
    source: str,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "fp16",
    cache_dir: str | None = None,
) -> Zero123Components:
    """Load Zero123 from a diffusers-layout folder or a hub id already in the local HF cache.

    Raises GuidanceWeightsNotFound (an InputError) naming every place looked and how to provide
    the weights; sub-folders and files are checked before any weights are read.
    """
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    if device.type != "cuda":
        torch_dtype = torch.float32
    folder = resolve_model_folder(source, cache_dir)
    check_model_folder(folder, source)

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(
        str(folder / "unet"), torch_dtype=torch_dtype, variant=_variant(folder / "unet", _DIFFUSERS_WEIGHTS)
    )
    vae = AutoencoderKL.from_pretrained(
        str(folder / "vae"), torch_dtype=torch_dtype, variant=_variant(folder / "vae", _DIFFUSERS_WEIGHTS)
    )
    image_encoder = _load_image_encoder(folder / "image_encoder", torch_dtype)
    camera_projection = _load_camera_projection(folder / "clip_camera_projection").to(torch_dtype)
    scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"))
    clip_preprocess = _clip_preprocess_from_config(
        folder / "feature_extractor" / "preprocessor_config.json", int(image_encoder.config.image_size)
    )

    latent_channels = int(vae.config.latent_channels)
    if int(unet.config.in_channels) != 2 * latent_channels:
        raise InputError(
            f"{folder / 'unet'} takes {unet.config.in_channels} input channels; a Zero123 UNet takes "
            f"{2 * latent_channels} ({latent_channels} noisy + {latent_channels} conditioning latent). "
            "Is this a Zero123 model?"
        )
    widths = {
        "unet cross_attention_dim": int(unet.config.cross_attention_dim),
        "image_encoder projection_dim": int(image_encoder.config.projection_dim),
        "clip_camera_projection embedding_dim": camera_projection.embedding_dim,
    }
    if len(set(widths.values())) != 1:
        raise InputError(f"{folder}: embedding widths disagree: {widths}")

    modules = (unet, vae, image_encoder, camera_projection)
    for module in modules:
        module.eval().requires_grad_(False).to(device)
    return Zero123Components(
        unet=unet,
        vae=vae,
        image_encoder=image_encoder,
        camera_projection=camera_projection,
        scheduler=scheduler,
        clip_preprocess=clip_preprocess,
        device=device,
        dtype=torch_dtype,
        source=str(source),
        folder=str(folder),
    )


# --------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------


def _per_view(values: Any, n: int, device: torch.device, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} values for {n} views")
    return t


def use_matmul_attention(vae: nn.Module) -> None:
    """Run the VAE's self-attention (one head of 512 channels over the 32x32 latent grid) as
    plain matrix products and a softmax instead of fused scaled-dot-product attention.

    Same maths.  No flash kernel takes a head of 512 channels, so PyTorch falls back to its
    memory-efficient kernel, whose backward alone took 4.4 ms of a 16-view stage-1 step on an
    H100 (tests/bench/step_profile_h100.json); at 1024 tokens the score matrix is small, and two
    batched GEMMs do the same work in a fraction of that (tests/bench/encoder_variants.py).
    """
    from diffusers.models.attention_processor import AttnProcessor

    vae.set_attn_processor(AttnProcessor())


class Zero123Guidance:
    """SDS loss for rendered novel views, conditioned on cached reference crops.

    Usage: `set_references(crops)` once per object (all frames for stage 2), then per step
    `loss, info = sds_loss(renders, d_elev, d_azim, d_radius, step_ratio, reference_index)`.
    """

    def __init__(self, components: Zero123Components, cfg: GuidanceConfig | None = None):
        self.cfg = cfg or GuidanceConfig()
        self.cfg.validate()
        self.unet = components.unet
        self.vae = components.vae
        self.image_encoder = components.image_encoder
        self.camera_projection = components.camera_projection
        self.scheduler = components.scheduler
        self.clip_preprocess = components.clip_preprocess
        self.device = components.device
        self.dtype = components.dtype
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        # a_bar(t) on the host: per-step scalars are Python floats, so no device sync is needed.
        self._alphas_cumprod = [float(a) for a in self.scheduler.alphas_cumprod.double()]
        self.clip_embeddings: torch.Tensor | None = None  # [B, D]
        self.image_latents: torch.Tensor | None = None  # [B, 4, h, w], unscaled posterior mode
        if self.cfg.optimize and self.device.type == "cuda":
            self._optimize_for_cuda()

    def _optimize_for_cuda(self) -> None:
        # The UNet runs at a fixed batch per stage, and the VAE encoder forward+backward is the
        # slowest part of a step: both gain from fused kernels and NHWC convolutions.  The
        # convolution shapes are fixed, so cuDNN's autotuning pays for itself after a few steps
        # (it is a process-wide switch).
        torch.backends.cudnn.benchmark = True
        use_matmul_attention(self.vae)
        self.unet.to(memory_format=torch.channels_last)
        self.vae.to(memory_format=torch.channels_last)
        unet_mode, encoder_mode = compile_modes(self.cfg.compile_mode)
        self.unet = torch.compile(self.unet, dynamic=False, mode=unet_mode)
        self.vae.encoder = torch.compile(
            self.vae.encoder, dynamic=False, options=encoder_compile_options(encoder_mode)
        )

    # -- inputs ----------------------------------------------------------------------------

    def _to_model_size(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        size = self.cfg.image_size
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False)
        return images

    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> projected CLIP image embeddings [B, D]."""
        pixels = self.clip_preprocess(images.to(self.device)).to(self.dtype)
        return self.image_encoder(pixel_values=pixels).image_embeds

    @torch.no_grad()
    def set_references(self, images: torch.Tensor) -> None:
        """Cache the CLIP embedding and VAE latent of each reference crop [B, 3, 256, 256] in [0, 1]."""
        x = self._to_model_size(images.to(self.device, torch.float32))
        self.clip_embeddings = self.encode_clip(x)
        # Unscaled posterior mode, as the published pipeline feeds Zero123's concat channels.
        self.image_latents = self.vae.encode((2 * x - 1).to(self.dtype)).latent_dist.mode()

    def encode_rendered(
        self, rendered: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """rendered [N, 3, H, W] in [0, 1] -> scaled latents [N, 4, h, w]; differentiable."""
        x = self._to_model_size(rendered.to(self.device))
        posterior = self.vae.encode((2 * x - 1).to(self.dtype)).latent_dist
        z = (
            posterior.sample(generator=generator)
            if self.cfg.rendered_latent == "sample"
            else posterior.mode()
        )
        return z * self.cfg.vae_scale

    def timestep(
        self, step_ratio: float, t_range: tuple[float, float] | None = None, anneal: str | None = None
    ) -> int:
        t_min, t_max = t_range if t_range is not None else (self.cfg.t_min, self.cfg.t_max)
        return anneal_timestep(step_ratio, t_min, t_max, anneal or self.cfg.anneal, self.num_train_timesteps)

    def condition(
        self,
        d_elevation_deg: Any,
        d_azimuth_deg: Any,
        d_radius: Any,
        reference_index: torch.Tensor | None = None,
        n: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet context [2N, 1, D] and conditioning latents [2N, 4, h, w], conditional half first."""
        if self.clip_embeddings is None or self.image_latents is None:
            raise RuntimeError("Zero123Guidance.set_references() must be called before computing SDS")
        if n is None:
            n = int(torch.as_tensor(d_elevation_deg).numel())
        index = self._reference_index(reference_index, n)
        camera = zero123_camera_embedding(
            _per_view(d_elevation_deg, n, self.device, "d_elevation_deg"),
            _per_view(d_azimuth_deg, n, self.device, "d_azimuth_deg"),
            _per_view(d_radius, n, self.device, "d_radius"),
        )
        clip = self.clip_embeddings[index]
        context = self.camera_projection(torch.cat([clip, camera.to(clip.dtype)], dim=-1)).unsqueeze(1)
        image_latents = self.image_latents[index]
        # Unconditional branch: zero context (after projection) and zero image latent.
        context = torch.cat([context, torch.zeros_like(context)], dim=0)
        image_latents = torch.cat([image_latents, torch.zeros_like(image_latents)], dim=0)
        return context, image_latents

    def _reference_index(self, reference_index: torch.Tensor | None, n: int) -> torch.Tensor:
        assert self.clip_embeddings is not None
        if reference_index is None:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        index = torch.as_tensor(reference_index, dtype=torch.long, device=self.device).reshape(-1)
        if index.numel() != n:
            raise ValueError(f"reference_index has {index.numel()} entries for {n} views")
        return index

    # -- the UNet, in one place so it can be compiled or CUDA-graphed -------------------------

    def predict_noise(
        self, latent_in: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """latent_in [2N, 8, h, w], t [2N] (long), encoder_hidden_states [2N, 1, D] -> eps [2N, 4, h, w].

        With CUDA graphs (compile mode "auto" or "reduce-overhead") the returned tensor is the
        graph's output buffer, overwritten by the next call of the same shape: use it (or copy
        it) before calling again, as `sds_loss_from_latents` does.
        """
        return self.unet(latent_in, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    # -- SDS ---------------------------------------------------------------------------------

    def sds_loss(
        self,
        rendered: torch.Tensor,
        d_elevation_deg: Any,
        d_azimuth_deg: Any,
        d_radius: Any,
        step_ratio: float,
        reference_index: torch.Tensor | None = None,
        t_range: tuple[float, float] | None = None,
        anneal: str | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, dict]:
        """SDS loss of rendered novel views [N, 3, H, W] in [0, 1] (resized to 256 if needed).

        d_elevation_deg / d_azimuth_deg / d_radius: [N] (or scalars) offsets of each view from the
        reference view; reference_index: [N] long, which cached reference conditions each view
        (default all 0).  t_range / anneal override the config (stage 2: (0.02, 0.5)).  `noise`
        ([N, 4, h, w]) and `generator` (on the model device) make a step reproducible.
        Gradients reach `rendered` through the VAE encoder only.  Returns (loss, info) with info
        {"t": int, "w": float, "grad_norm": 0-d tensor (not synced)}.

        With `encode_chunk` > 0 and more views than that, the views go through the VAE encoder and
        the UNet a chunk at a time (see `_chunked_sds_loss`); loss value and gradient are the same.
        """
        views = (d_elevation_deg, d_azimuth_deg, d_radius, step_ratio)
        options = {
            "reference_index": reference_index,
            "t_range": t_range,
            "anneal": anneal,
            "noise": noise,
            "generator": generator,
            "reduction": reduction,
        }
        chunk = self.cfg.encode_chunk
        if chunk > 0 and rendered.shape[0] > chunk:
            return self._chunked_sds_loss(rendered, *views, **options)
        return self.sds_loss_from_latents(self.encode_rendered(rendered, generator), *views, **options)

    def _chunked_sds_loss(
        self,
        rendered: torch.Tensor,
        d_elevation_deg: Any,
        d_azimuth_deg: Any,
        d_radius: Any,
        step_ratio: float,
        reference_index: torch.Tensor | None,
        t_range: tuple[float, float] | None,
        anneal: str | None,
        noise: torch.Tensor | None,
        generator: torch.Generator | None,
        reduction: str,
    ) -> tuple[torch.Tensor, dict]:
        """`sds_loss` over `encode_chunk` views at a time, for memory.

        The SDS loss is a sum of independent per-view terms (the VAE encoder's group norms and
        the UNet act on each image alone), so the views split into chunks exactly.  Each chunk is
        encoded from a detached copy of its rendered images, its loss (divided by the total N for
        "mean") is differentiated back to that copy at once, and its encoder graph is freed before
        the next chunk; only one chunk's activations are alive at a time.  The returned tensor has
        the full loss as its value, and `rendered` receives the accumulated image gradient when the
        caller runs backward (once, with the rest of its losses):
            loss = L + (sum(x * G) - sg(sum(x * G))),  G = dL/dx from the chunks, x = rendered.
        One timestep for all chunks (it depends on `step_ratio` only); `noise` is split by chunk.
        With "sample" latents or drawn noise, the random draws differ from one unchunked batch.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if rendered.ndim != 4:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(rendered.shape)}")
        n = rendered.shape[0]
        if noise is not None and noise.shape[0] != n:
            raise ValueError(f"noise has {noise.shape[0]} views for {n} rendered views")
        de = _per_view(d_elevation_deg, n, self.device, "d_elevation_deg")
        da = _per_view(d_azimuth_deg, n, self.device, "d_azimuth_deg")
        dr = _per_view(d_radius, n, self.device, "d_radius")
        index = self._reference_index(reference_index, n)
        scale = 1.0 / n if reduction == "mean" else 1.0
        with_grad = torch.is_grad_enabled() and rendered.requires_grad
        chunk = self.cfg.encode_chunk
        values: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        grad_norms: list[torch.Tensor] = []
        info: dict = {}
        # Chunks of equal size (at most `encode_chunk`): 32 views go as 16 + 16, not 20 + 12, so
        # two objects lifted together run the compiled shapes of one object's 16 views.
        chunk = math.ceil(n / math.ceil(n / chunk))
        for start in range(0, n, chunk):
            part = slice(start, min(start + chunk, n))
            x = rendered[part].detach().requires_grad_(with_grad)
            with torch.set_grad_enabled(with_grad):
                latents = self.encode_rendered(x, generator)
                loss, info = self.sds_loss_from_latents(
                    latents,
                    de[part],
                    da[part],
                    dr[part],
                    step_ratio,
                    reference_index=index[part],
                    t_range=t_range,
                    anneal=anneal,
                    noise=None if noise is None else noise[part],
                    generator=generator,
                    reduction="sum",
                )
                loss = loss * scale
            if with_grad:
                (grad,) = torch.autograd.grad(loss, x)
                grads.append(grad)
            values.append(loss.detach())
            grad_norms.append(info["grad_norm"])
            del latents, loss, x
        value = torch.stack(values).sum()
        info = {**info, "grad_norm": torch.linalg.vector_norm(torch.stack(grad_norms))}
        if not with_grad:
            return value, info
        link = (rendered * torch.cat(grads)).sum()
        # link - sg(link) is exactly 0 in value, so the loss value is the chunks' sum unchanged.
        return value + (link - link.detach()), info

    def sds_loss_from_latents(
        self,
        latents: torch.Tensor,
        d_elevation_deg: Any,
        d_azimuth_deg: Any,
        d_radius: Any,
        step_ratio: float,
        reference_index: torch.Tensor | None = None,
        t_range: tuple[float, float] | None = None,
        anneal: str | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, dict]:
        """SDS on scaled latents z [N, 4, h, w]; see `sds_loss`."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        n = latents.shape[0]
        t = self.timestep(step_ratio, t_range, anneal)
        alpha_bar = self._alphas_cumprod[t]
        w = 1.0 - alpha_bar
        with torch.no_grad():
            if noise is None:
                noise = torch.randn(
                    latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
                )
            elif noise.shape != latents.shape:
                raise ValueError(f"noise {tuple(noise.shape)} does not match latents {tuple(latents.shape)}")
            noise = noise.to(latents.device, latents.dtype)
            # z_t = sqrt(a_bar) z + sqrt(1 - a_bar) eps  (scheduler.add_noise with a shared t)
            noisy = math.sqrt(alpha_bar) * latents.detach() + math.sqrt(1.0 - alpha_bar) * noise
            context, image_latents = self.condition(
                d_elevation_deg, d_azimuth_deg, d_radius, reference_index, n
            )
            latent_in = torch.cat([torch.cat([noisy, noisy], dim=0), image_latents.to(noisy.dtype)], dim=1)
            t_in = torch.full((2 * n,), t, dtype=torch.long, device=latents.device)
            eps = self.predict_noise(latent_in, t_in, context).float()
            eps_cond, eps_uncond = eps.chunk(2)
            eps_hat = eps_uncond + self.cfg.guidance_scale * (eps_cond - eps_uncond)
            grad = torch.nan_to_num(w * (eps_hat - noise.float()))
        # target = sg(z - g), so L = 0.5 * sum_i ||z_i - target_i||^2 / N has
        # dL/dz_i = (z_i - target_i) / N = g_i / N: each view pushes its latent by its own SDS
        # gradient g_i = w(t) (eps_hat - eps), averaged over the N views ("sum" drops the 1/N, as
        # the released stage-1 code does).  The UNet Jacobian is omitted on purpose (SDS).
        z = latents.float()
        target = (z - grad).detach()
        loss = 0.5 * (z - target).pow(2).sum()
        if reduction == "mean":
            loss = loss / n
        info = {"t": t, "w": w, "grad_norm": grad.detach().norm()}
        return loss, info


def make_guidance(cfg: GuidanceConfig, device: torch.device | str) -> Zero123Guidance | None:
    """None for model "none"; otherwise load the weights (offline) and build the guidance."""
    cfg.validate()
    if cfg.model.strip().lower() == "none":
        return None
    components = load_zero123(cfg.model, device, cfg.dtype, cache_dir=cfg.cache_dir or None)
    return Zero123Guidance(components, cfg)
