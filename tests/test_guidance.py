"""Zero123 SDS guidance: real loader on a tiny random model, SDS maths pinned by a fake UNet."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from backend.errors import InputError
from backend.guidance import (
    GuidanceConfig,
    GuidanceWeightsNotFound,
    Zero123Guidance,
    anneal_timestep,
    load_zero123,
    make_guidance,
)
from backend.guidance.random_model import build_random_zero123
from backend.guidance.zero123 import compile_modes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_random_zero123(tmp_path_factory.mktemp("zero123") / "tiny", size="tiny", seed=0)


@pytest.fixture()
def guidance(tiny_model):
    components = load_zero123(str(tiny_model), "cpu", "fp32")
    g = Zero123Guidance(components, GuidanceConfig(model=str(tiny_model), rendered_latent="mode"))
    gen = torch.Generator().manual_seed(0)
    g.set_references(torch.rand(3, 3, 256, 256, generator=gen))
    return g


def test_real_loader_reads_tiny_model_and_falls_back_to_fp32_on_cpu(tiny_model):
    components = load_zero123(str(tiny_model), "cpu", "fp16")
    assert components.dtype == torch.float32
    assert components.unet.config.in_channels == 8
    assert components.camera_projection.proj.in_features == components.camera_projection.proj.out_features + 4
    assert not any(p.requires_grad for p in components.unet.parameters())
    # The tiny CLIP tower takes 32 px images: the loader resizes 256 px crops to its configured size.
    pixels = components.clip_preprocess(torch.rand(2, 3, 256, 256))
    assert pixels.shape == (2, 3, 32, 32)
    assert components.scheduler.alphas_cumprod.shape == (1000,)


def test_references_cache_clip_embedding_and_unscaled_latent_mode(guidance):
    assert guidance.clip_embeddings.shape == (3, 16)
    assert guidance.image_latents.shape == (3, 4, 32, 32)
    x = torch.rand(1, 3, 256, 256)
    guidance.set_references(x)
    expected = guidance.vae.encode(2 * x - 1).latent_dist.mode()
    # Zero123's concat latent is NOT multiplied by the 0.18215 latent scale.
    torch.testing.assert_close(guidance.image_latents, expected)


def test_sds_gradient_reaches_image_and_steps_change_it(guidance):
    torch.manual_seed(0)
    logits = torch.zeros(2, 3, 64, 64, requires_grad=True)  # rendered at 64 px, resized to 256
    optimizer = torch.optim.Adam([logits], lr=0.05)
    start = torch.sigmoid(logits).detach().clone()
    for step in range(3):
        optimizer.zero_grad()
        loss, info = guidance.sds_loss(
            torch.sigmoid(logits),
            d_elevation_deg=torch.tensor([10.0, -20.0]),
            d_azimuth_deg=torch.tensor([45.0, -90.0]),
            d_radius=torch.tensor([0.0, 0.2]),
            step_ratio=step / 3,
            reference_index=torch.tensor([0, 2]),
        )
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0
        assert info["t"] == anneal_timestep(step / 3) and float(info["grad_norm"]) > 0
        optimizer.step()
    change = (torch.sigmoid(logits) - start).abs()
    assert change.max() > 1e-3


class ConstantUNet(torch.nn.Module):
    """Predicts one constant eps for conditional rows (non-zero context) and another otherwise."""

    def __init__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor):
        super().__init__()
        self.eps_cond, self.eps_uncond = eps_cond.view(1, 4, 1, 1), eps_uncond.view(1, 4, 1, 1)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        self.calls.append((sample.clone(), timestep.clone(), encoder_hidden_states.clone()))
        is_cond = (encoder_hidden_states.abs().sum(dim=(1, 2)) > 0).float().view(-1, 1, 1, 1)
        eps = is_cond * self.eps_cond + (1 - is_cond) * self.eps_uncond
        return (eps.expand(sample.shape[0], 4, *sample.shape[-2:]),)


def test_fake_unet_pins_cfg_order_weight_and_gradient_sign(guidance):
    eps_cond = torch.tensor([0.5, -1.0, 2.0, 0.0])
    eps_uncond = torch.tensor([0.1, 0.2, -0.3, 0.4])
    fake = ConstantUNet(eps_cond, eps_uncond)
    guidance.unet = fake
    n, scale = 3, guidance.cfg.guidance_scale
    latents = torch.randn(n, 4, 32, 32, requires_grad=True)
    noise = torch.randn(n, 4, 32, 32)
    index = torch.tensor([2, 0, 1])
    before = latents.detach().clone()
    loss, info = guidance.sds_loss_from_latents(
        latents,
        [0.0, 10.0, -10.0],
        [0.0, 90.0, 180.0],
        [0.0, 0.0, 0.1],
        0.5,
        reference_index=index,
        noise=noise,
    )
    loss.backward()

    ((sample, timestep, context),) = fake.calls
    assert sample.shape == (2 * n, 8, 32, 32) and context.shape == (2 * n, 1, 16)
    assert (timestep == info["t"]).all() and info["t"] == 500
    # Conditional half first: reference latents and a non-zero context; then zeros for both.
    torch.testing.assert_close(sample[:n, 4:], guidance.image_latents[index])
    assert (sample[n:, 4:] == 0).all() and (context[n:] == 0).all()
    assert (context[:n].abs().sum(dim=(1, 2)) > 0).all()
    # Both halves see the same noisy latent z_t = sqrt(a_bar) z + sqrt(1 - a_bar) eps.
    alpha_bar = float(guidance.scheduler.alphas_cumprod[500])
    noisy = math.sqrt(alpha_bar) * before + math.sqrt(1 - alpha_bar) * noise
    torch.testing.assert_close(sample[:n, :4], noisy)
    torch.testing.assert_close(sample[n:, :4], noisy)

    w = 1 - alpha_bar
    assert info["w"] == pytest.approx(w)
    eps_hat = (eps_uncond + scale * (eps_cond - eps_uncond)).view(1, 4, 1, 1)
    g = w * (eps_hat - noise)
    torch.testing.assert_close(latents.grad, g / n)  # dL/dz = g per view, averaged over views
    assert float(info["grad_norm"]) == pytest.approx(float(g.norm()), rel=1e-5)
    # The swapped order would give a clearly different gradient.
    swapped = w * ((eps_cond + scale * (eps_uncond - eps_cond)).view(1, 4, 1, 1) - noise)
    assert (latents.grad - swapped / n).abs().max() > 0.1

    lr = 0.1
    with torch.no_grad():
        latents -= lr * latents.grad
    step = latents.detach() - before
    torch.testing.assert_close(step, -lr * g / n)
    assert float((step * g).sum()) < 0


def test_sum_reduction_is_n_times_mean(guidance):
    guidance.unet = ConstantUNet(torch.ones(4), torch.zeros(4))
    latents = torch.randn(4, 4, 32, 32)
    noise = torch.randn(4, 4, 32, 32)
    args = ([5.0] * 4, [30.0] * 4, [0.0] * 4, 0.2)
    mean, _ = guidance.sds_loss_from_latents(latents, *args, noise=noise)
    total, _ = guidance.sds_loss_from_latents(latents, *args, noise=noise, reduction="sum")
    assert float(total) == pytest.approx(4 * float(mean), rel=1e-6)


def _sds_loss_and_image_grad(guidance, images, noise, chunk):
    guidance.cfg.encode_chunk = chunk
    leaf = images.clone().requires_grad_(True)
    rendered = leaf * 1.0  # a non-leaf, as a renderer's output is
    n = images.shape[0]
    loss, info = guidance.sds_loss(
        rendered,
        torch.linspace(-20.0, 20.0, n),
        torch.linspace(-150.0, 150.0, n),
        torch.zeros(n),
        0.3,
        reference_index=torch.tensor([0, 1, 2, 1, 0])[:n],
        noise=noise,
    )
    (2.0 * loss + 0.01 * leaf.square().sum()).backward()  # inside a larger total, backward once
    return loss, info, leaf.grad


def test_chunked_encode_gives_the_same_loss_and_image_gradient(guidance):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 64, 64, generator=gen)  # resized to 256 inside, per chunk
    noise = torch.randn(5, 4, 32, 32, generator=gen)
    whole, whole_info, whole_grad = _sds_loss_and_image_grad(guidance, images, noise, 0)
    chunked, chunked_info, chunked_grad = _sds_loss_and_image_grad(guidance, images, noise, 2)  # 2+2+1
    assert chunked.requires_grad and chunked.shape == whole.shape == ()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-5, atol=2e-6)
    assert chunked_info["t"] == whole_info["t"] and chunked_info["w"] == whole_info["w"]
    torch.testing.assert_close(chunked_info["grad_norm"], whole_info["grad_norm"], rtol=1e-5, atol=0.0)
    # The SDS part dominates the gradient (mean |dL/dx| about 0.04 here, against atol 2e-6).
    assert (whole_grad - 0.02 * images).abs().mean() > 1e-2

    # Without a graph (evaluation), the chunked path returns the plain value.
    guidance.cfg.encode_chunk = 2
    with torch.no_grad():
        value, _ = guidance.sds_loss(images, 0.0, 30.0, 0.0, 0.3, noise=noise)
    guidance.cfg.encode_chunk = 0
    with torch.no_grad():
        expected, _ = guidance.sds_loss(images, 0.0, 30.0, 0.0, 0.3, noise=noise)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_encode_chunk_and_compile_mode_are_validated(tiny_model):
    GuidanceConfig(encode_chunk=8, compile_mode="max-autotune-no-cudagraphs").validate()
    with pytest.raises(InputError, match="guidance.encode_chunk"):
        make_guidance(GuidanceConfig(model=str(tiny_model), encode_chunk=-1), "cpu")
    with pytest.raises(InputError, match="guidance.compile_mode"):
        GuidanceConfig(compile_mode="fast").validate()


def test_compile_modes_per_module():
    # (UNet, VAE encoder): "auto" CUDA-graphs the forward-only UNet and compiles the encoder
    # (forward + backward) plainly; any other mode applies to both.
    assert GuidanceConfig().compile_mode == "auto"
    assert compile_modes("auto") == ("reduce-overhead", "default")
    assert compile_modes("default") == ("default", "default")
    assert compile_modes("max-autotune-no-cudagraphs") == ("max-autotune-no-cudagraphs",) * 2
    with pytest.raises(InputError, match="guidance.compile_mode"):
        compile_modes("fast")


def test_timestep_anneal_schedules():
    # Released schedule, stage 1 range [0.02, 0.98].
    assert [anneal_timestep(r) for r in (0.0, 0.5, 1.0)] == [980, 500, 20]
    assert anneal_timestep(0.25) == 750
    # Stage-2 range [0.02, 0.5]: the released formula holds 500 through the first half.
    assert [anneal_timestep(r, 0.02, 0.5) for r in (0.0, 0.25, 0.5, 0.75, 1.0)] == [500, 500, 500, 250, 20]
    # Explicit hold-then-linear: t_max for the first half, then t_max -> t_min.
    hold = [anneal_timestep(r, 0.02, 0.5, "hold_then_linear") for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert hold == [500, 500, 500, 260, 20]
    assert anneal_timestep(0.75, 0.02, 0.98, "hold_then_linear") == 500
    with pytest.raises(ValueError, match="anneal"):
        anneal_timestep(0.5, schedule="cosine")


def test_guidance_timestep_uses_config_and_overrides(guidance):
    assert guidance.timestep(0.0) == 980
    assert guidance.timestep(0.0, t_range=(0.02, 0.5)) == 500
    assert guidance.timestep(0.75, t_range=(0.02, 0.5), anneal="hold_then_linear") == 260


def test_camera_embedding_order_in_projection(guidance):
    proj = guidance.camera_projection.proj
    width = proj.out_features
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.zero_()
        for k in range(4):  # output k copies camera component k
            proj.weight[k, width + k] = 1.0
        proj.weight[4, 0] = 1.0  # output 4 copies the first CLIP component
    elev, azim, radius = [15.0, -30.0], [60.0, -135.0], [0.3, -0.2]
    index = torch.tensor([1, 2])
    context, image_latents = guidance.condition(elev, azim, radius, index)
    expected = torch.tensor(
        [
            [math.radians(e), math.sin(math.radians(a)), math.cos(math.radians(a)), r]
            for e, a, r in zip(elev, azim, radius)
        ]
    )
    torch.testing.assert_close(context[:2, 0, :4], expected)
    torch.testing.assert_close(context[:2, 0, 4], guidance.clip_embeddings[index, 0])
    assert (context[2:] == 0).all() and (image_latents[2:] == 0).all()
    torch.testing.assert_close(image_latents[:2], guidance.image_latents[index])


def test_missing_folder_error_names_places_and_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(GuidanceWeightsNotFound) as info:
        load_zero123(str(missing), "cpu", cache_dir=str(tmp_path / "hf"))
    message = str(info.value)
    assert isinstance(info.value, InputError)
    assert str(missing) in message and "does not exist" in message
    assert "--guidance /path/to/zero123-xl-diffusers" in message
    assert "huggingface-cli download ashawkey/zero123-xl-diffusers" in message

    with pytest.raises(GuidanceWeightsNotFound) as info:
        load_zero123("ashawkey/zero123-xl-diffusers", "cpu", cache_dir=str(tmp_path / "hf"))
    message = str(info.value)
    assert "'ashawkey/zero123-xl-diffusers'" in message
    assert str(tmp_path / "hf" / "models--ashawkey--zero123-xl-diffusers") in message
    assert "local folder" in message and "Hugging Face cache" in message


def test_hub_id_is_found_in_local_cache_only(tiny_model, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-zero123"
    shutil.copytree(tiny_model, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    components = load_zero123("someone/tiny-zero123", "cpu", cache_dir=str(cache))
    assert components.folder == str((repo / "snapshots" / "0123abcd").resolve())
    assert components.unet.config.in_channels == 8


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("vae", "sub-folder vae/ is missing"),
        ("clip_camera_projection", "sub-folder clip_camera_projection/ is missing"),
        ("unet/diffusion_pytorch_model.safetensors", "unet/ has no weights"),
        ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json is missing"),
    ],
)
def test_incomplete_model_error_names_the_part(tiny_model, tmp_path, remove, expected):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(GuidanceWeightsNotFound, match="incomplete") as info:
        load_zero123(str(broken), "cpu")
    assert expected in str(info.value) and str(broken) in str(info.value)


def test_make_guidance_none_and_config_validation(tiny_model):
    assert make_guidance(GuidanceConfig(), "cpu") is None
    assert make_guidance(GuidanceConfig(model="None"), "cpu") is None
    built = make_guidance(GuidanceConfig(model=str(tiny_model)), "cpu")
    assert isinstance(built, Zero123Guidance) and built.dtype == torch.float32
    with pytest.raises(InputError, match="guidance.anneal"):
        make_guidance(GuidanceConfig(model=str(tiny_model), anneal="cosine"), "cpu")
    with pytest.raises(InputError, match="guidance.t_min"):
        make_guidance(GuidanceConfig(model=str(tiny_model), t_min=0.6, t_max=0.5), "cpu")


def test_sds_requires_references(tiny_model):
    g = Zero123Guidance(load_zero123(str(tiny_model), "cpu"), GuidanceConfig(model=str(tiny_model)))
    with pytest.raises(RuntimeError, match="set_references"):
        g.sds_loss(torch.rand(1, 3, 256, 256), 0.0, 0.0, 0.0, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_sds_on_cuda(tiny_model):
    g = make_guidance(GuidanceConfig(model=str(tiny_model)), "cuda")
    assert g.dtype == torch.float16
    g.set_references(torch.rand(2, 3, 256, 256, device="cuda"))
    image = torch.rand(4, 3, 256, 256, device="cuda", requires_grad=True)
    loss, _ = g.sds_loss(image, [0.0] * 4, [90.0] * 4, [0.0] * 4, 0.3, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_stage2_with_guidance_scores_every_sampled_frames_novel_views(tiny_model, tiny_video):
    from backend.config import load_config
    from backend.data import load_reference_layout
    from backend.gaussians import GaussianModel
    from backend.stage2 import animate_object

    tiny = tiny_video(num_frames=3)
    video = load_reference_layout(tiny.root, tiny.name)
    state = GaussianModel.random_ball(200, 0.5, torch.Generator().manual_seed(0)).state()
    config = load_config(
        "cpu-demo",
        [
            f"guidance.model={tiny_model}",
            "crop_size=48",
            "stage1.placement_max_side=64",
            "stage2.steps_per_frame=2",
            "stage2.frames_per_step=2",
            "stage2.novel_views_per_frame=2",
            "stage2.placement_iters=2",
            "stage2.joint_iters=2",
            "stage2.knn=4",
            "stage2.deformation.spatial_resolutions=[8]",
            "stage2.deformation.plane_channels=4",
        ],
    )
    components = load_zero123(str(tiny_model), "cpu", "fp32")
    guidance = Zero123Guidance(components, config.guidance)
    batches = []
    sds_loss = guidance.sds_loss

    def recording_sds(images, *args, **kwargs):
        batches.append((images.shape, kwargs["reference_index"].tolist()))
        return sds_loss(images, *args, **kwargs)

    guidance.sds_loss = recording_sds
    events = []
    result = animate_object(
        video, 0, {"gaussians": state}, config, torch.device("cpu"), guidance, events.append
    )
    # One guidance batch a step: 2 views of each of the 2 sampled frames, rendered at 256 px,
    # each conditioned on its own frame's crop.
    assert len(batches) == 6
    for shape, refs in batches:
        assert tuple(shape) == (4, 3, 256, 256)
        assert refs[0] == refs[1] and refs[2] == refs[3] and refs[0] != refs[2]
    sds_values = [e["losses"]["sds"] for e in events if e.get("phase") == "deformation" and "losses" in e]
    assert sds_values and all(math.isfinite(v) for v in sds_values)
    assert result["baked"]["means"].shape == (3, 200, 3)


def test_matmul_attention_gives_the_vae_encoder_the_same_output_and_gradient(tiny_model):
    from backend.guidance.zero123 import use_matmul_attention

    vae = load_zero123(str(tiny_model), "cpu", "fp32").vae
    assert vae.encoder.mid_block.attentions[0] is not None  # the attention being swapped exists
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grads = []
    outs = []
    for swap in (False, True):
        if swap:
            use_matmul_attention(vae)
            assert type(vae.encoder.mid_block.attentions[0].processor).__name__ == "AttnProcessor"
        xi = x.clone().requires_grad_(True)
        out = vae.encoder(xi)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_encoder_compile_options_force_channels_last_in_every_graph():
    from backend.guidance.zero123 import encoder_compile_options

    assert encoder_compile_options("default") == {"force_layout_optimization": True}
    options = encoder_compile_options("reduce-overhead")
    assert options["force_layout_optimization"] is True and options["triton.cudagraphs"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimized_sds_matches_eager_on_cuda(tiny_model):
    """guidance.optimize (compiled encoder with forced layouts, matmul VAE attention, compiled
    UNet) gives the eager loss and image gradient, fp16 on both."""
    results = []
    for optimize in (False, True):
        g = make_guidance(
            GuidanceConfig(model=str(tiny_model), optimize=optimize, rendered_latent="mode"), "cuda"
        )
        gen = torch.Generator(device="cuda").manual_seed(0)
        g.set_references(torch.rand(2, 3, 256, 256, device="cuda", generator=gen))
        image = torch.rand(4, 3, 256, 256, device="cuda", generator=gen).requires_grad_(True)
        noise = torch.randn(4, 4, 32, 32, device="cuda", generator=gen)
        index = torch.tensor([0, 1, 0, 1])
        for _ in range(2):  # the second call runs the compiled (and graphed) code
            image.grad = None
            loss, _ = g.sds_loss(image, [0.0] * 4, [90.0] * 4, [0.0] * 4, 0.3, index, noise=noise)
            loss.backward()
        results.append((float(loss), image.grad.float().clone()))
    (l0, g0), (l1, g1) = results
    assert abs(l1 - l0) <= 2e-2 * abs(l0)
    assert float((g1 - g0).norm() / g0.norm()) < 2e-2


def test_chunks_are_of_equal_size(guidance):
    seen = []
    encode = guidance.encode_rendered

    def recording(x, generator=None):
        seen.append(x.shape[0])
        return encode(x, generator)

    guidance.encode_rendered = recording
    guidance.cfg.encode_chunk = 5
    n = 8  # 4 + 4, not 5 + 3
    images = torch.rand(n, 3, 32, 32, requires_grad=True)
    loss, _ = guidance.sds_loss(images, [0.0] * n, [30.0] * n, [0.0] * n, 0.5)
    loss.backward()
    assert seen == [4, 4]
    assert images.grad is not None and images.grad.abs().sum() > 0
