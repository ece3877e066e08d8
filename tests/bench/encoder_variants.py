"""VAE encoder forward+backward (gradient into the rendered images, weights frozen) under the
compile settings that `guidance.optimize` could use, at the SDS batch sizes of the presets:
16 views (stage 1) and 20 (stage 2's chunks of `encode_chunk` 20).

    python3 -m backend.guidance.random_model /tmp/zero123-xl --size xl
    python3 tests/bench/encoder_variants.py --model /tmp/zero123-xl --out encoder_variants.json

Variants, all fp16 with channels-last weights and cuDNN autotuning:
  "before":           torch.compile "default", fused SDPA attention (the previous optimize path)
  "forced layout":    + channels-last forced in the backward graph too (`encoder_compile_options`)
  "matmul attention": + the VAE self-attention as two batched GEMMs (`use_matmul_attention`)
  "both":             forced layout and matmul attention (what `guidance.optimize` now does)
Each gradient is compared with an fp32 eager reference (relative L2), and a torch.profiler window
of the "both" variant lists where its GPU time goes, by kernel.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import encoder_grad, encoder_inputs, rel_l2, set_recompile_limit, time_encoder  # noqa: E402

from backend.guidance.zero123 import encoder_compile_options, load_zero123, use_matmul_attention  # noqa: E402

VARIANTS = {
    "before": (False, False),
    "forced layout": (True, False),
    "matmul attention": (False, True),
    "both": (True, True),
}


def build(vae, forced_layout: bool, matmul_attention: bool):
    vae = copy.deepcopy(vae)
    if matmul_attention:
        use_matmul_attention(vae)
    vae.to(memory_format=torch.channels_last)
    options = encoder_compile_options("default") if forced_layout else {}
    return torch.compile(vae.encoder, dynamic=False, options=options)


def kernel_table(encoder, x, gout, steps: int = 5, top: int = 12) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            out, g = encoder_grad(encoder, x, gout, torch.float16)
            torch.autograd.grad(out, x, g)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        ms = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1000.0 / steps
        if ms > 0:
            rows.append((round(ms, 3), e.key[:120]))
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--views", default="16,20")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="encoder_variants.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    set_recompile_limit(64)
    torch.backends.cudnn.benchmark = True
    vae = load_zero123(args.model, device, "fp16").vae
    results = {
        "info": {
            "card": torch.cuda.get_device_name(),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
        },
        "encoder": {},
    }
    for n in [int(v) for v in args.views.split(",")]:
        x, gout = encoder_inputs(n, device)
        reference = copy.deepcopy(vae.encoder).float()
        out32, g32 = encoder_grad(reference, x, gout, torch.float32)
        (grad_ref,) = torch.autograd.grad(out32, x, g32)
        del reference, out32
        for name, flags in VARIANTS.items():
            if n != 16 and name not in ("before", "both"):
                continue
            encoder = build(vae, *flags)
            r = time_encoder(encoder, x, gout, torch.float16, args.reps, args.warmup)
            r["grad_rel_l2_vs_fp32"] = rel_l2(r.pop("grad"), grad_ref)
            if name == "both" and n == 16:
                r["kernels_ms_per_step"] = kernel_table(encoder, x, gout)
            results["encoder"][f"{name}, {n} views"] = r
            print(f"{name}, {n} views: " + json.dumps(r), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
            del encoder
            torch.cuda.empty_cache()
    print("| variant | views | fwd ms | bwd ms | fwd+bwd ms | grad rel L2 vs fp32 |")
    print("|---|---|---|---|---|---|")
    for key, r in results["encoder"].items():
        name, views = key.rsplit(", ", 1)
        print(
            f"| {name} | {views.split()[0]} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | "
            f"{r['fwd_bwd_ms']:.1f} | {r['grad_rel_l2_vs_fp32']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
