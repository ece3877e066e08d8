"""GPU benchmark: stage 1 and stage 2 cost per object, peak memory, composed-scene render FPS.

Runs the real pipeline functions with the full preset and a full-size random-weight Zero123
(the Zero123-XL architecture: the compute is the same as with real weights).  Where a whole
stage would take too long for one session, a fixed number of steps is timed after warm-up and
extrapolated to the preset's step count; such figures are marked "extrapolated".

    python tests/bench/bench.py --data .devdata/davis --videos kid-football --mode eager,optimized \
        --model /tmp/zero123-xl --out tests/bench/results.json

"eager" is the baseline (guidance.optimize=false, guidance.encode_chunk=0); "optimized" sets
guidance.optimize=true, guidance.compile_mode and guidance.encode_chunk (default 20: stage 1's 16
views go through the VAE encoder at once, stage 2's 40 in two chunks of 20; 8 measured lower
memory but slower steps, see results.md).  Several modes run one after
another, each in its own process, so neither inherits the other's compiled code, cuDNN settings
or allocations.  The eager run also checks on the device that chunked SDS gives the unchunked
loss and image gradient.

Appends one run per (video, mode) to results.json and rewrites the table of results.md from it
(what follows the table's command list, from the first "## " heading on, is kept).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from backend import stage1, stage2  # noqa: E402
from backend.cameras import input_camera  # noqa: E402
from backend.config import load_config  # noqa: E402
from backend.data import load_reference_layout  # noqa: E402
from backend.guidance.zero123 import make_guidance  # noqa: E402

# "together": optimized, with the objects of a video lifted in one stage-1 loop (one SDS batch a
# step for all of them, `stage1.lift_objects`); stage 2 then runs object after object as in the
# other modes.
MODES = ("eager", "optimized", "together")


class StepClock:
    """Records the wall time of every progress event per object and phase (events come every
    step when `report_every` is 1), so the time per step after warm-up can be read off.  Objects
    lifted together report the same steps: each one's lift time per step is the joint step's."""

    def __init__(self):
        self.times: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def __call__(self, event: dict) -> None:
        if event.get("type") == "progress":
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            key = (str(event.get("object")), f"{event['stage']}/{event['phase']}")
            self.times.setdefault(key, []).append((event["step"], time.perf_counter()))

    def phases(self, object_id: str) -> list[str]:
        return [phase for (oid, phase) in self.times if oid == object_id]

    def seconds_per_step(self, object_id: str, phase: str, warmup: int) -> float:
        points = [p for p in self.times.get((object_id, phase), []) if p[0] > warmup]
        if len(points) < 2:
            return float("nan")
        (s0, t0), (s1, t1) = points[0], points[-1]
        return (t1 - t0) / max(s1 - s0, 1)


def run_video(args, video_name: str, guidance=None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    video = load_reference_layout(Path(args.data), video_name)
    T = video.num_frames
    full = load_config(args.preset)
    steps = {
        "lift": full.stage1.iters,
        "placement": full.stage1.placement_iters,
        "deformation": full.stage2.steps_per_frame * T,
        "placement2": full.stage2.placement_iters,
        "joint": full.stage2.joint_iters,
    }
    overrides = [
        f"stage1.iters={args.steps}",
        f"stage1.placement_iters={args.steps}",
        f"stage2.steps_per_frame={max(1, args.steps // T + 1)}",
        f"stage2.placement_iters={args.steps}",
        f"stage2.joint_iters={args.steps}",
        f"guidance.model={args.model}",
    ]
    if args.mode in ("optimized", "together"):
        overrides += [
            "guidance.optimize=true",
            f"guidance.compile_mode={args.compile_mode}",
            f"guidance.encode_chunk={args.encode_chunk}",
        ]
    else:
        overrides += ["guidance.optimize=false", "guidance.encode_chunk=0"]
        torch.backends.cudnn.benchmark = False
    config = load_config(args.preset, overrides)
    # Progress (and with it the clock's device sync and the losses' host reads) every
    # --report-every steps, as the pipeline reports every 20th of 1000 steps; 1 syncs every step.
    stage1.report_every = lambda total: args.report_every
    stage2.report_every = lambda total: args.report_every
    guidance = guidance if guidance is not None else make_guidance(config.guidance, device)
    check = chunk_check(guidance, args.encode_chunk, device) if args.mode == "eager" else None
    per_object = []
    baked = {}
    together = args.mode == "together"
    clock = StepClock()
    items = [
        stage1.LiftInput(video.object_frames(k)[0], video.object_masks(k)[0], object_id)
        for k, object_id in enumerate(video.object_ids)
    ]
    groups = [list(range(len(items)))] if together else [[k] for k in range(len(items))]
    for group in groups:
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        t0 = time.perf_counter()
        results = stage1.lift_objects([items[k] for k in group], config, device, guidance, clock)
        t1 = time.perf_counter()
        stage1_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        for k, result in zip(group, results):
            object_id = items[k].object_id
            torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
            ckpt = result.checkpoint()
            t2 = time.perf_counter()
            if args.stage1_only:
                motion = {
                    "baked": {
                        k2: v.detach()
                        for k2, v in stage1.transform_gaussians(
                            result.model.activated(),
                            result.scale,
                            torch.as_tensor(result.translation, dtype=torch.float32, device=device),
                        ).items()
                    }
                }
                motion["baked"] = {
                    k2: (v[None] if k2 in ("means", "quats", "scales") else v)
                    for k2, v in motion["baked"].items()
                }
            else:
                motion = stage2.animate_object(video, k, ckpt, config, device, guidance, clock)
            t3 = time.perf_counter()
            baked[object_id] = motion["baked"]
            warm = args.warmup
            sps = {phase: clock.seconds_per_step(object_id, phase, warm) for phase in clock.phases(object_id)}
            # A joint lift step does every object's step: its cost is shared among them.
            stage1_s = (
                sps["static/lift"] * steps["lift"] / len(group) + sps["static/placement"] * steps["placement"]
            )
            stage2_s = (
                float("nan")
                if args.stage1_only
                else (
                    sps["motion/deformation"] * steps["deformation"]
                    + sps["motion/placement"] * steps["placement2"]
                    + sps["motion/joint"] * steps["joint"]
                )
            )
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            per_object.append(
                {
                    "object": object_id,
                    "stage1_s": stage1_s,
                    "stage2_s": stage2_s,
                    "seconds_per_step": sps,
                    "measured_s": {"stage1 (its group)": t1 - t0, "stage2": t3 - t2},
                    "peak_gb": max(peak, stage1_peak),
                    "stage1_peak_gb_of_group": stage1_peak,
                    "static_psnr": result.metrics["psnr"],
                    **(
                        {}
                        if args.stage1_only
                        else {
                            "motion_psnr": motion["metrics"]["psnr"],
                            "motion_iou": motion["metrics"]["iou"],
                        }
                    ),
                }
            )
            print(json.dumps(per_object[-1]), flush=True)
    fps = render_fps(baked, video.width, video.height, device)
    return {
        "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "command": os.environ.get("BENCH_COMMAND") or " ".join(sys.argv),
        "mode": args.mode,
        "compile_mode": config.guidance.compile_mode if config.guidance.optimize else None,
        "encode_chunk": config.guidance.encode_chunk,
        "preset": args.preset,
        "video": video_name,
        "objects": len(video.object_ids),
        "frames": T,
        "extrapolated": True,
        "timed_steps": args.steps,
        "report_every": args.report_every,
        "stage1_s_per_object": float(np.mean([o["stage1_s"] for o in per_object])),
        "stage1_s_all_objects": float(sum(o["stage1_s"] for o in per_object)),
        "stage2_s_per_object": float(np.mean([o["stage2_s"] for o in per_object])),
        "total_s": float(sum(o["stage1_s"] + o["stage2_s"] for o in per_object)),
        "stages": "static" if args.stage1_only else "static,motion",
        "peak_gb": float(max(o["peak_gb"] for o in per_object)),
        "render_fps_512": fps,
        "per_object": per_object,
        "_guidance": guidance,
        **({"chunk_check": check} if check is not None else {}),
    }


def chunk_check(guidance, chunk: int, device, n: int = 16) -> dict:
    """Chunked against unchunked SDS on this device and dtype: loss and image gradient, with the
    same noise and the posterior-mode latent.  Leaves the guidance as it was."""
    if guidance is None or chunk <= 0 or chunk >= n:
        return {}
    gen = torch.Generator(device=device).manual_seed(0)
    guidance.set_references(torch.rand(2, 3, 256, 256, device=device, generator=gen))
    images = torch.rand(n, 3, 256, 256, device=device, generator=gen)
    noise = torch.randn(n, 4, 32, 32, device=device, generator=gen)
    args = (torch.linspace(-30, 30, n), torch.linspace(-180, 180, n), torch.zeros(n), 0.3)
    index = torch.arange(n, device=device) % 2
    saved = (guidance.cfg.encode_chunk, guidance.cfg.rendered_latent)
    guidance.cfg.rendered_latent = "mode"
    out = {}
    for c in (0, chunk):
        guidance.cfg.encode_chunk = c
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        x = images.clone().requires_grad_(True)
        loss, _ = guidance.sds_loss(x, *args, reference_index=index, noise=noise)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        out[c] = (float(loss), x.grad.detach().float(), peak)
    guidance.cfg.encode_chunk, guidance.cfg.rendered_latent = saved
    (l0, g0, p0), (l1, g1, p1) = out[0], out[chunk]
    result = {
        "views": n,
        "encode_chunk": chunk,
        "loss": l0,
        "loss_rel_diff": abs(l1 - l0) / max(abs(l0), 1e-30),
        "grad_max_abs": float(g0.abs().max()),
        "grad_max_abs_diff": float((g1 - g0).abs().max()),
        "grad_rel_l2_diff": float((g1 - g0).norm() / g0.norm().clamp_min(1e-30)),
        "peak_gb_unchunked": p0,
        "peak_gb_chunked": p1,
    }
    print(json.dumps({"chunk_check": result}), flush=True)
    return result


def render_fps(baked: dict, width: int, height: int, device, repeats: int = 200) -> float:
    """Composed scene (all objects in one rasterize call) at 512 px long side, frame 0."""
    scale = 512 / max(width, height)
    cam = input_camera(width, height).resized(round(width * scale), round(height * scale))
    g = {
        k: torch.cat([b[k][0] if b[k].dim() == 3 else b[k] for b in baked.values()]).to(device)
        for k in next(iter(baked.values()))
    }
    with torch.no_grad():
        for _ in range(10):
            stage1.render_views(g, [cam], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            stage1.render_views(g, [cam], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats / (time.perf_counter() - t0)


def _mode_label(r: dict) -> str:
    if r["mode"] not in ("optimized", "together") or "encode_chunk" not in r:
        return r["mode"]
    parts = ["optimized, objects together" if r["mode"] == "together" else r["mode"]]
    if r.get("compile_mode") not in (None, "default"):
        parts.append(r["compile_mode"])
    if r.get("encode_chunk"):
        parts.append(f"chunk {r['encode_chunk']}")
    return ", ".join(parts)


def _seconds(value: float) -> str:
    return "(stage 1 only)" if value != value else f"{value:.1f}"


def write_markdown(results: dict, path: Path) -> None:
    kept = ""
    if path.is_file():
        old = path.read_text()
        at = old.find("\n## ")
        kept = old[at:] if at >= 0 else ""
    lines = [
        "# Benchmark results",
        "",
        "Full preset, full-size random-weight Zero123 (Zero123-XL architecture). Stage times are",
        "extrapolated from the timed steps after warm-up to the preset's step counts (marked *).",
        '"optimized, chunk N": guidance.optimize=true with guidance.encode_chunk=N (SDS over at most N',
        'views at a time); "optimized" rows without a chunk encode all views at once.',
        "",
        "| card | date | mode | video | objects | frames | stage 1 s/object* | stage 2 s/object* | total s* | peak GB | render FPS 512 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['card']} | {r['date']} | {_mode_label(r)} | {r['video']} | {r['objects']} | {r['frames']} | "
            f"{r['stage1_s_per_object']:.1f} | {_seconds(r['stage2_s_per_object'])} | {_seconds(r['total_s'])} | "
            f"{r['peak_gb']:.1f} | {r['render_fps_512']:.0f} |"
        )
    commands = list(dict.fromkeys(f"    {r['command']}" for r in results["runs"]))
    lines += ["", "Commands:", ""] + commands
    path.write_text("\n".join(lines) + "\n" + kept)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO / ".devdata" / "davis"))
    parser.add_argument("--videos", default="kid-football")
    parser.add_argument("--preset", default="full")
    parser.add_argument(
        "--model", required=True, help="Zero123 folder (e.g. from backend.guidance.random_model --size xl)"
    )
    parser.add_argument(
        "--mode",
        default="optimized",
        help="eager, optimized, or several comma-separated (each in its own process, in order)",
    )
    parser.add_argument(
        "--encode-chunk", type=int, default=20, help="optimized mode: guidance.encode_chunk (0 = all views)"
    )
    parser.add_argument(
        "--compile-mode",
        default="auto",
        choices=["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="optimized mode: guidance.compile_mode (auto: UNet with CUDA graphs, encoder default)",
    )
    parser.add_argument("--steps", type=int, default=60, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--report-every", type=int, default=5, help="steps between progress events (and device syncs)"
    )
    parser.add_argument(
        "--stage1-only", action="store_true", help="skip stage 2 (e.g. where OpenCV is missing)"
    )
    parser.add_argument(
        "--then-together",
        action="store_true",
        help="after an optimized run, stage 1 again with the objects together in the same process",
    )
    parser.add_argument("--out", default=str(REPO / "tests" / "bench" / "results.json"))
    args = parser.parse_args()
    modes = args.mode.split(",")
    if any(m not in MODES for m in modes):
        parser.error(f"--mode takes {', '.join(MODES)} or a comma-separated list of them, not {args.mode!r}")
    if len(modes) > 1:
        failed = 0
        for mode in modes:
            argv = [sys.executable, __file__, "--data", args.data, "--videos", args.videos]
            argv += ["--preset", args.preset, "--model", args.model, "--mode", mode]
            argv += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out]
            argv += ["--report-every", str(args.report_every)]
            argv += ["--encode-chunk", str(args.encode_chunk), "--compile-mode", args.compile_mode]
            argv += ["--stage1-only"] if args.stage1_only else []
            argv += ["--then-together"] if args.then_together and mode == "optimized" else []
            failed += subprocess.run(argv).returncode != 0
        return 1 if failed else 0
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    for name in args.videos.split(","):
        runs = [run_video(args, name)]
        if args.then_together and args.mode == "optimized":
            # Stage 1 again with the objects together, in this process: the compiled guidance
            # (same shapes: 2 x 16 views go through it as two chunks of 16) is reused as is.
            again = argparse.Namespace(**{**vars(args), "mode": "together", "stage1_only": True})
            runs.append(run_video(again, name, guidance=runs[0]["_guidance"]))
        for run in runs:
            run.pop("_guidance")
            results["runs"].append(run)
            out.write_text(json.dumps(results, indent=2))
            write_markdown(results, out.with_suffix(".md"))
            print(json.dumps({k: v for k, v in run.items() if k != "per_object"}), flush=True)
        del runs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
