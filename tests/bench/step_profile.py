"""Where a stage-1 step's time goes on CUDA, and what the Zero123 parts cost under each setting.

    python3 -m backend.guidance.random_model /tmp/zero123-xl --size xl
    python3 tests/bench/step_profile.py --model /tmp/zero123-xl [--out step_profile.json]

1. VAE encoder forward+backward (gradient with respect to the input images only; the weights are
   frozen, as in SDS) for 16 renders at 256x256, with the same input the stage-1 loop gives it
   (channels-last strided fp32 renders, requiring grad, mapped to 2x - 1 and cast): eager NCHW
   weights with and without cuDNN autotuning, eager channels-last, torch.compile "default",
   the same compiled with NCHW weights, torch.compile "max-autotune-no-cudagraphs" (opt-in:
   --max-autotune), and the fastest of those in bf16.  Each gradient is
   compared with an fp32 eager reference (relative L2).
2. Zero123 UNet forward at batch 32 (16 views, classifier-free guidance), with the inputs
   `sds_loss` builds: eager, compile "default", compile "reduce-overhead" (CUDA graphs).
3. The real stage-1 loop (`backend.stage1.lift_object`, kid-football object 1, full preset) with
   the modules of the current `guidance.optimize` and of the fastest combination found: CUDA
   events at the entry and exit of each region (rendering, VAE encoder forward, UNet, encoder
   backward, rendering backward, Adam, the rest) give each region's share of the GPU timeline per
   step, by novel-view resolution; a torch.profiler window of a few steps gives GPU kernel time
   by kernel category and how busy the GPU was.
4. If time is left: the stage-2 phase-A shapes (encoder at 20 views, UNet at batch 40: the
   presets' encode_chunk 20) with the fastest settings.

Compiled modules are built once and reused by the loop runs (same shapes and strides, so no
recompilation).  Sections after the first ones are skipped when the --budget-s seconds would be
exceeded; a skipped section says so.  Times are medians of --reps repetitions after warm-up, each
repetition synchronised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from backend import stage1  # noqa: E402
from backend.config import load_config  # noqa: E402
from backend.data import load_reference_layout  # noqa: E402
from backend.guidance.zero123 import make_guidance  # noqa: E402

VIEWS = 16


# ------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, cost_s: float, what: str) -> bool:
        left = self.seconds - self.elapsed()
        if left < cost_s:
            print(f"[skip] {what}: {left:.0f} s of budget left, needs about {cost_s:.0f} s", flush=True)
            return False
        return True


def event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same sizes and strides (compiled code is specialised on strides)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def set_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, max(n, getattr(cfg, name)))


# ------------------------------------------------------------------------------------------------
# 1. VAE encoder forward + backward
# ------------------------------------------------------------------------------------------------


def encoder_inputs(n: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders as the stage-1 loop hands them over: [n, 3, 256, 256] fp32 in [0, 1], strided as a
    permuted [n, H, W, 3] rasteriser output (channels-last), requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hwc = torch.rand(n, 256, 256, 3, device=device, generator=gen)
    x = hwc.permute(0, 3, 1, 2).detach().requires_grad_(True)
    gout = torch.randn(n, 8, 32, 32, device=device, generator=gen)
    return x, gout


def encoder_grad(
    encoder, x: torch.Tensor, gout: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    out = encoder((2 * x - 1).to(dtype))
    return out, gout.to(out.dtype)


def time_encoder(encoder, x, gout, dtype, reps: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        out, g = encoder_grad(encoder, x, gout, dtype)
        torch.autograd.grad(out, x, g)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    fwd, bwd, total = [], [], []
    grad = None
    for _ in range(reps):
        e0, e1, e2 = event(), event(), event()
        e0.record()
        out, g = encoder_grad(encoder, x, gout, dtype)
        e1.record()
        (grad,) = torch.autograd.grad(out, x, g)
        e2.record()
        e2.synchronize()
        fwd.append(e0.elapsed_time(e1))
        bwd.append(e1.elapsed_time(e2))
        total.append(e0.elapsed_time(e2))
    return {
        "fwd_ms": median(fwd),
        "bwd_ms": median(bwd),
        "fwd_bwd_ms": median(total),
        "min_fwd_bwd_ms": min(total),
        "warmup_s": warm_s,
        "grad": grad,
    }


# ------------------------------------------------------------------------------------------------
# 2. UNet forward
# ------------------------------------------------------------------------------------------------


def capture_unet_inputs(guidance, n: int, device) -> tuple[torch.Tensor, ...]:
    """The (latent_in, t, context) that `sds_loss` gives the UNet for n views, via the real code."""
    captured: list[tuple[torch.Tensor, ...]] = []
    original = guidance.predict_noise

    def capture(latent_in, t, encoder_hidden_states):
        captured.append(tuple(strided_copy(a) for a in (latent_in, t, encoder_hidden_states)))
        return original(latent_in, t, encoder_hidden_states)

    if guidance.clip_embeddings is None:
        guidance.set_references(torch.rand(1, 3, 256, 256, device=device))
    x, _ = encoder_inputs(n, device, seed=1)
    de = torch.linspace(-30, 30, n, device=device)
    da = torch.linspace(-180, 180, n, device=device)
    dr = torch.zeros(n, device=device)
    guidance.predict_noise = capture
    try:
        with torch.no_grad():
            latents = guidance.encode_rendered(x)
            guidance.sds_loss_from_latents(latents, de, da, dr, step_ratio=0.5)
    finally:
        del guidance.predict_noise
    return captured[0]


def time_unet(unet, inputs, reps: int, warmup: int) -> dict:
    latent_in, t, context = inputs

    def forward():
        return unet(latent_in, t, encoder_hidden_states=context, return_dict=False)[0]

    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(warmup):
            forward()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        times = []
        out = None
        for _ in range(reps):
            e0, e1 = event(), event()
            e0.record()
            out = forward()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        out = out.clone()
    return {"fwd_ms": median(times), "min_fwd_ms": min(times), "warmup_s": warm_s, "out": out}


# ------------------------------------------------------------------------------------------------
# 3. The real stage-1 loop, instrumented
# ------------------------------------------------------------------------------------------------

# Region -> category of the attribution table.
CATEGORY = {
    "render": "render fwd",
    "render_bwd": "render bwd + losses bwd",
    "vae_enc_fwd": "VAE encoder fwd",
    "vae_enc_bwd": "VAE encoder bwd",
    "unet": "UNet fwd",
    "adam": "Adam",
    "step_head": "other",
    "glue": "other",
    "cameras": "other",
    "sds_glue": "other",
    "backward_head": "other",
    "densify_stats": "other",
    "after_step": "other",
}
CATEGORIES = [
    "render fwd",
    "VAE encoder fwd",
    "UNet fwd",
    "VAE encoder bwd",
    "render bwd + losses bwd",
    "Adam",
    "other",
]


class Marks:
    """CUDA events (and host clocks) at region boundaries; the time from one mark to the next is
    the region named by the first.  GPU time between marks includes any idle time while the host
    is still launching that region's work, so the regions add up to the step's wall time."""

    def __init__(self):
        self.enabled = False
        self.step = -1
        self.records: list[tuple[int, str, torch.cuda.Event, float]] = []
        self.skip_steps: set[int] = set()
        self.on_step = None
        self.strides: tuple[int, ...] | None = None

    def __call__(self, name: str) -> None:
        if self.enabled:
            ev = event()
            ev.record()
            self.records.append((self.step, name, ev, time.perf_counter()))

    def begin_step(self) -> bool:
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step)
        self("step_head")
        return False

    def per_step(self) -> dict[int, dict]:
        torch.cuda.synchronize()
        steps: dict[int, dict] = {}
        for (step, name, ev, host), (_, _, ev_next, host_next) in zip(self.records, self.records[1:]):
            if step in self.skip_steps:
                continue
            entry = steps.setdefault(step, {"gpu": {}, "cpu": {}})
            entry["gpu"][name] = entry["gpu"].get(name, 0.0) + ev.elapsed_time(ev_next)
            entry["cpu"][name] = entry["cpu"].get(name, 0.0) + 1e3 * (host_next - host)
        return steps


@contextlib.contextmanager
def patched(obj, name: str, value):
    """obj.name = value for the duration; an instance attribute shadowing a method is removed."""
    had = name in vars(obj)
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def instrument(guidance, marks: Marks, eager_encoder) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    render_views = stage1.render_views
    sample_novel_cameras = stage1.sample_novel_cameras
    make_optimizer = stage1.make_optimizer
    final_prune = stage1.final_prune
    backward = torch.Tensor.backward
    encode_rendered = guidance.encode_rendered
    predict_noise = guidance.predict_noise
    sds_loss = guidance.sds_loss
    set_references = guidance.set_references

    def between(region: str, fn, after: str):
        """`fn` with the time from its call counted to `region` and what follows to `after`."""

        def marked(*args, **kwargs):
            marks(region)
            out = fn(*args, **kwargs)
            marks(after)
            return out

        return marked

    def make_optimizer_m(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        step = optimizer.step

        def step_m(*a, **k):
            marks("adam")
            out = step(*a, **k)
            marks("after_step")
            return out

        optimizer.step = step_m
        return optimizer

    def final_prune_m(*args, **kwargs):
        marks("end")
        marks.enabled = False
        return final_prune(*args, **kwargs)

    def encode_rendered_m(rendered, generator=None):
        marks("vae_enc_fwd")
        z = encode_rendered(rendered, generator)
        if z.requires_grad:
            z.register_hook(lambda g: marks("vae_enc_bwd"))
        if rendered.requires_grad:
            rendered.register_hook(lambda g: marks("render_bwd"))
        marks.strides = tuple(rendered.stride())
        marks("sds_glue")
        return z

    def set_references_m(images):
        # Once per object, outside the timed loop: run it on the eager encoder so the compiled one
        # is not specialised to a batch of 1 as well.
        compiled = guidance.vae.encoder
        guidance.vae.encoder = eager_encoder
        try:
            return set_references(images)
        finally:
            guidance.vae.encoder = compiled

    for obj, name, value in (
        (stage1, "render_views", between("render", render_views, "glue")),
        (stage1, "sample_novel_cameras", between("cameras", sample_novel_cameras, "glue")),
        (stage1, "make_optimizer", make_optimizer_m),
        (stage1, "final_prune", final_prune_m),
        (torch.Tensor, "backward", between("backward_head", backward, "densify_stats")),
        (guidance, "encode_rendered", encode_rendered_m),
        (guidance, "predict_noise", between("unet", predict_noise, "sds_glue")),
        (guidance, "sds_loss", between("sds_glue", sds_loss, "glue")),
        (guidance, "set_references", set_references_m),
    ):
        stack.enter_context(patched(obj, name, value))
    return stack


KERNEL_CATEGORIES = (
    ("render (gsplat, sort)", ("gsplat", "rasteriz", "isect", "projection", "radixsort", "cub::")),
    ("attention", ("fmha", "flash", "attention", "cutlass::kernel<pytorchmemeff", "mem_eff")),
    ("convolution (cuDNN)", ("conv", "cudnn", "xmma", "dgrad", "fprop", "implicit", "nhwc", "nchw")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "cublas", "matmul")),
    ("Triton (compiled fusions)", ("triton",)),
    ("normalisation (eager)", ("group_norm", "groupnorm", "layer_norm", "batch_norm")),
    ("optimiser", ("multi_tensor", "adam")),
    ("copies / memset", ("memcpy", "memset", "copy_kernel", "cat_")),
    (
        "elementwise / reduction (eager)",
        ("elementwise", "reduce", "vectorized", "unrolled", "index", "scatter"),
    ),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other kernels"


def kernel_table(prof, steps: int, wall_ms: float) -> dict:
    """GPU kernel time per step by category, from a torch.profiler window of `steps` steps."""
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    busy = 0.0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        busy += us
        by_cat[kernel_category(e.name)] = by_cat.get(kernel_category(e.name), 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms / steps,
        "kernel_ms_per_step": busy / 1e3 / steps,
        "gpu_busy_fraction": busy / 1e3 / wall_ms if wall_ms > 0 else float("nan"),
        "by_category_ms_per_step": {
            k: v / 1e3 / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])
        },
        "top_kernels_ms_per_step": [(name[:120], us / 1e3 / steps) for name, us in top],
    }


def lift_run(guidance, encoder, unet, eager_encoder, video, model_path: str, args, label: str) -> dict:
    """Stage 1's lift loop with the given encoder / UNet modules, instrumented (see Marks)."""
    iters = args.lift_steps
    overrides = {
        "guidance.model": model_path,
        "guidance.optimize": False,
        "stage1.iters": iters,
        "stage1.placement_iters": 1,
    }
    config = load_config("full", overrides)
    schedule = config.stage1.novel_resolution_schedule
    resolution = {s: stage1.novel_resolution(schedule, (s + 1) / iters) for s in range(iters)}
    # A profiler window inside the 512 px phase, after warm-up; those steps are left out of the
    # event attribution (the profiler slows the host).
    prof_steps = list(range(iters - 2 - args.profile_steps, iters - 2))
    marks = Marks()
    marks.skip_steps = set(range(args.lift_warmup)) | set(prof_steps)
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    window: dict[str, float] = {}

    def on_step(step: int) -> None:
        if step == prof_steps[0]:
            torch.cuda.synchronize()
            prof.start()
            window["t0"] = time.perf_counter()
        elif step == prof_steps[-1] + 1:
            torch.cuda.synchronize()
            window["t1"] = time.perf_counter()
            prof.stop()

    marks.on_step = on_step
    guidance.vae.encoder, guidance.unet = encoder, unet
    frame, mask = video.object_frames(0)[0], video.object_masks(0)[0]
    marks.enabled = True
    t0 = time.perf_counter()
    with instrument(guidance, marks, eager_encoder):
        stage1.lift_object(frame, mask, config, guidance.device, guidance, None, marks.begin_step, "001")
    run_s = time.perf_counter() - t0
    steps = marks.per_step()
    by_res: dict[int, dict] = {}
    for res in sorted(set(resolution.values())):
        chosen = [steps[s] for s in steps if resolution[s] == res]
        if not chosen:
            continue
        gpu_step = median([sum(e["gpu"].values()) for e in chosen])
        cpu_step = median([sum(e["cpu"].values()) for e in chosen])
        cats_gpu = {c: 0.0 for c in CATEGORIES}
        cats_cpu = {c: 0.0 for c in CATEGORIES}
        for region, category in CATEGORY.items():
            cats_gpu[category] += median([e["gpu"].get(region, 0.0) for e in chosen])
            cats_cpu[category] += median([e["cpu"].get(region, 0.0) for e in chosen])
        by_res[res] = {
            "steps": len(chosen),
            "step_ms": gpu_step,
            "host_step_ms": cpu_step,
            "gpu_ms": cats_gpu,
            "host_ms": cats_cpu,
        }
    wall_ms = 1e3 * (window["t1"] - window["t0"]) if "t1" in window else float("nan")
    try:
        kernels = kernel_table(prof, len(prof_steps), wall_ms)
        if args.out_dir:
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40)
            (Path(args.out_dir) / f"profile_{label}.txt").write_text(table)
    except Exception:
        traceback.print_exc()
        kernels = {}
    # 1000-step estimate with the preset's resolution schedule (30 % / 30 % / 40 %).
    preset = load_config("full").stage1
    full_iters = preset.iters
    counts: dict[int, int] = {}
    for s in range(full_iters):
        r = stage1.novel_resolution(preset.novel_resolution_schedule, (s + 1) / full_iters)
        counts[r] = counts.get(r, 0) + 1
    est = sum(by_res[r]["step_ms"] * n for r, n in counts.items() if r in by_res) / 1e3
    return {
        "label": label,
        "iters": iters,
        "run_s": run_s,
        "encoder_input_strides": marks.strides,
        "by_resolution": by_res,
        "lift_1000_steps_s_estimate": est,
        "kernels": kernels,
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="Zero123-XL folder (backend.guidance.random_model --size xl)"
    )
    parser.add_argument("--data", default=str(REPO / ".devdata" / "davis"))
    parser.add_argument("--video", default="kid-football")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lift-steps", type=int, default=45)
    parser.add_argument("--lift-warmup", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument(
        "--max-autotune",
        action="store_true",
        help="also compile the encoder with max-autotune-no-cudagraphs (slow)",
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip optional sections past this")
    parser.add_argument(
        "--out", default="", help="JSON file for all numbers (default $OUT/step_profile.json)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("step_profile.py needs CUDA", file=sys.stderr)
        return 2
    out_dir = os.environ.get("OUT", "")
    args.out_dir = out_dir
    out_path = Path(args.out or (Path(out_dir) / "step_profile.json" if out_dir else "step_profile.json"))
    budget = Budget(args.budget_s)
    set_recompile_limit(64)
    device = torch.device("cuda")
    fp16 = torch.float16
    info = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(info), flush=True)
    results: dict = {"info": info, "encoder": {}, "unet": {}, "lift": {}, "stage2_shapes": {}}

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=2, default=str))

    config = load_config("full", {"guidance.model": args.model, "guidance.optimize": False})
    guidance = make_guidance(config.guidance, device)
    vae_encoder, raw_unet = guidance.vae.encoder, guidance.unet
    print(f"[{budget.elapsed():.0f} s] model loaded", flush=True)

    # fp32 reference gradient of the encoder.
    x, gout = encoder_inputs(VIEWS, device)
    enc32 = copy.deepcopy(vae_encoder).float()
    out32, g32 = encoder_grad(enc32, x, gout, torch.float32)
    (grad_ref,) = torch.autograd.grad(out32, x, g32)
    del enc32, out32
    torch.cuda.empty_cache()

    enc_modules: dict[str, tuple[torch.nn.Module, torch.dtype]] = {}

    def run_encoder(name: str, module, dtype=fp16) -> None:
        r = time_encoder(module, x, gout, dtype, args.reps, args.warmup)
        r["grad_rel_l2_vs_fp32"] = rel_l2(r.pop("grad"), grad_ref)
        results["encoder"][name] = r
        enc_modules[name] = (module, dtype)
        print(f"[{budget.elapsed():.0f} s] encoder {name}: {json.dumps(r)}", flush=True)
        save()

    # Eager with NCHW weights first (the modules are converted to channels-last below).
    torch.backends.cudnn.benchmark = False
    run_encoder("eager NCHW", vae_encoder)
    torch.backends.cudnn.benchmark = True
    run_encoder("eager NCHW + cudnn.benchmark", vae_encoder)
    # Compiled with NCHW weights (a copy that stays NCHW): the compiled channels-last encoder's
    # backward spent about 10 ms a step in layout copies inside aten::convolution_backward.
    enc_nchw = torch.compile(copy.deepcopy(vae_encoder), dynamic=False, mode="default")
    run_encoder("compile default, NCHW weights", enc_nchw)
    guidance.vae.to(memory_format=torch.channels_last)
    run_encoder("eager channels_last", vae_encoder)
    # The UNet's inputs as sds_loss builds them (their strides are what compiled code sees).
    unet_inputs = capture_unet_inputs(guidance, VIEWS, device)
    print(
        "UNet inputs:", [(tuple(a.shape), tuple(a.stride()), str(a.dtype)) for a in unet_inputs], flush=True
    )
    unet_ref = None

    def run_unet(name: str, module, inputs=unet_inputs, key=None) -> dict:
        nonlocal unet_ref
        r = time_unet(module, inputs, args.reps, args.warmup)
        out = r.pop("out")
        if key is None:
            unet_ref = out if unet_ref is None else unet_ref
            r["out_rel_l2_vs_eager"] = rel_l2(out, unet_ref)
            results["unet"][name] = r
        else:
            results["stage2_shapes"][key] = r
        print(f"[{budget.elapsed():.0f} s] UNet {name}: {json.dumps(r)}", flush=True)
        save()
        return r

    torch.backends.cudnn.benchmark = False
    run_unet("eager NCHW", raw_unet)
    torch.backends.cudnn.benchmark = True
    raw_unet.to(memory_format=torch.channels_last)
    run_unet("eager channels_last", raw_unet)

    # What guidance.optimize does today: channels-last, cudnn.benchmark, compile "default".
    enc_default = torch.compile(vae_encoder, dynamic=False, mode="default")
    run_encoder("compile default", enc_default)
    enc_compile_s = results["encoder"]["compile default"]["warmup_s"]
    unet_default = torch.compile(raw_unet, dynamic=False, mode="default")
    run_unet("compile default", unet_default)
    unet_compile_s = results["unet"]["compile default"]["warmup_s"]
    unet_ro = None
    if budget.allows(unet_compile_s + 100, "UNet compile reduce-overhead"):
        unet_ro = torch.compile(raw_unet, dynamic=False, mode="reduce-overhead")
        run_unet("compile reduce-overhead", unet_ro)
    unet_modules = {
        "eager NCHW": raw_unet,
        "eager channels_last": raw_unet,
        "compile default": unet_default,
        "compile reduce-overhead": unet_ro,
    }

    def fastest() -> tuple[str, str]:
        fp16_enc = {k: v for k, v in results["encoder"].items() if not k.startswith("bf16")}
        best_enc = min(fp16_enc, key=lambda k: fp16_enc[k]["fwd_bwd_ms"])
        best_unet = min(results["unet"], key=lambda k: results["unet"][k]["fwd_ms"])
        results["best"] = {"encoder": best_enc, "unet": best_unet}
        return best_enc, best_unet

    best_enc, best_unet = fastest()
    print(f"[{budget.elapsed():.0f} s] fastest so far: encoder {best_enc}, UNet {best_unet}", flush=True)

    # 3. The real loop: today's optimize settings, then the fastest combination so far.
    video = load_reference_layout(Path(args.data), args.video)
    runs = [("current", enc_default, unet_default)]
    if (best_enc, best_unet) != ("compile default", "compile default"):
        runs.append(("fastest", enc_modules[best_enc][0], unet_modules[best_unet]))
    for label, enc_mod, unet_mod in runs:
        if not budget.allows(40, f"stage-1 loop ({label})"):
            continue
        try:
            r = lift_run(guidance, enc_mod, unet_mod, vae_encoder, video, args.model, args, label)
        except Exception:
            traceback.print_exc()
            continue
        results["lift"][label] = r
        steps = {res: round(v["step_ms"], 1) for res, v in r["by_resolution"].items()}
        print(f"[{budget.elapsed():.0f} s] stage-1 loop {label}: ms/step by resolution {steps}", flush=True)
        save()
    guidance.vae.encoder, guidance.unet = vae_encoder, raw_unet

    # Another compile mode for the encoder (autotuned Triton templates against cuDNN / cuBLAS).
    # Opt-in: on the H100 its autotuning ran over 5 minutes for the encoder without finishing.
    if args.max_autotune and budget.allows(
        2.5 * enc_compile_s + 30, "encoder compile max-autotune-no-cudagraphs"
    ):
        enc_ma = torch.compile(vae_encoder, dynamic=False, mode="max-autotune-no-cudagraphs")
        run_encoder("compile max-autotune-no-cudagraphs", enc_ma)
    best_enc, best_unet = fastest()

    # bf16 variant of the fastest encoder setting (different rounding: not the same numbers).
    best_mod, _ = enc_modules[best_enc]
    needs = (
        20 if best_enc.startswith("eager") else enc_compile_s * (2.5 if "autotune" in best_enc else 1.0) + 20
    )
    if budget.allows(needs, f"encoder bf16 ({best_enc})"):
        enc_bf16 = copy.deepcopy(vae_encoder).to(torch.bfloat16)
        if best_enc.startswith("compile"):
            enc_bf16 = torch.compile(
                enc_bf16, dynamic=False, mode=best_enc.removeprefix("compile ").split(",")[0]
            )
        run_encoder(f"bf16 {best_enc}", enc_bf16, torch.bfloat16)

    # 4. Stage-2 phase-A shapes with encode_chunk 20: encoder on 20 views, UNet at batch 40.
    chunk = 20
    if budget.allows(enc_compile_s + 20, "encoder at 20 views"):
        x20, g20 = encoder_inputs(chunk, device, seed=2)
        r = time_encoder(best_mod, x20, g20, fp16, args.reps, args.warmup)
        r.pop("grad")
        results["stage2_shapes"][f"encoder {best_enc}, {chunk} views"] = r
        print(f"[{budget.elapsed():.0f} s] encoder 20 views: {json.dumps(r)}", flush=True)
        save()
    if budget.allows(results["unet"][best_unet]["warmup_s"] + 20, "UNet at batch 40"):
        inputs40 = capture_unet_inputs(guidance, chunk, device)
        run_unet(best_unet, unet_modules[best_unet], inputs40, key=f"UNet {best_unet}, batch {2 * chunk}")

    results["elapsed_s"] = budget.elapsed()
    save()
    print_summary(results)
    return 0


def print_summary(results: dict) -> None:
    print("\n== VAE encoder, 16 x 256x256, forward + backward to the images (ms, median) ==")
    print("| setting | fwd | bwd | fwd+bwd | grad rel. L2 vs fp32 | first calls s |")
    print("|---|---|---|---|---|---|")
    for name, r in results["encoder"].items():
        print(
            f"| {name} | {fmt(r['fwd_ms'])} | {fmt(r['bwd_ms'])} | {fmt(r['fwd_bwd_ms'])} | "
            f"{r['grad_rel_l2_vs_fp32']:.2e} | {fmt(r['warmup_s'], 0)} |"
        )
    print("\n== Zero123 UNet forward, batch 32 (ms, median) ==")
    print("| setting | fwd | out rel. L2 vs eager | first calls s |")
    print("|---|---|---|---|")
    for name, r in results["unet"].items():
        print(f"| {name} | {fmt(r['fwd_ms'])} | {r['out_rel_l2_vs_eager']:.2e} | {fmt(r['warmup_s'], 0)} |")
    for key, r in results["stage2_shapes"].items():
        ms = r.get("fwd_bwd_ms", r.get("fwd_ms"))
        print(f"stage-2 shape: {key}: {fmt(ms)} ms")
    for label, run in results["lift"].items():
        print(
            f"\n== stage-1 loop, {label}: GPU-timeline ms per step by region (median; host ms in brackets) =="
        )
        resolutions = list(run["by_resolution"])
        print("| region | " + " | ".join(f"{r} px" for r in resolutions) + " |")
        print("|---|" + "---|" * len(resolutions))
        for c in CATEGORIES:
            cells = [
                f"{fmt(run['by_resolution'][r]['gpu_ms'][c])} ({fmt(run['by_resolution'][r]['host_ms'][c])})"
                for r in resolutions
            ]
            print(f"| {c} | " + " | ".join(cells) + " |")
        cells = [
            f"{fmt(run['by_resolution'][r]['step_ms'])} ({fmt(run['by_resolution'][r]['host_step_ms'])})"
            for r in resolutions
        ]
        print("| step | " + " | ".join(cells) + " |")
        print(f"1000-step lift estimate: {fmt(run['lift_1000_steps_s_estimate'])} s")
        k = run["kernels"]
        if not k:
            continue
        print(
            f"profiler window ({k['steps']} steps at 512 px): {fmt(k['wall_ms_per_step'])} ms/step wall, "
            f"{fmt(k['kernel_ms_per_step'])} ms/step kernels (GPU busy {fmt(100 * k['gpu_busy_fraction'], 0)} %)"
        )
        for cat, ms in k["by_category_ms_per_step"].items():
            print(f"  {cat}: {fmt(ms, 2)} ms/step")
    best = results.get("best", {})
    enc = results["encoder"].get(best.get("encoder"), {}).get("fwd_bwd_ms")
    unet = results["unet"].get(best.get("unet"), {}).get("fwd_ms")
    if enc and unet:
        print(
            f"\nstage-1 floor (fastest encoder fwd+bwd + UNet) x 1000 steps: "
            f"({fmt(enc)} + {fmt(unet)}) ms x 1000 = {fmt(enc + unet)} s"
        )


if __name__ == "__main__":
    sys.exit(main())
