"""Agreement and speed of the two rasterizer back ends (gsplat vs the PyTorch reference).

Random scenes (Gaussians in a ball of radius 0.5) seen from orbit cameras; both back ends render
colour, alpha and expected depth and back-propagate one loss that touches all three.  Reported:
relative L2 error and max abs error of each image, relative L2 error and cosine similarity of each
gradient, the share of identical radii, and fwd+bwd time per render.  A float64 run of the
reference gives the ground truth; the float32 reference against it shows the precision floor.

    python tests/bench/raster_agreement.py --out tests/bench/raster_agreement_results.md   # CUDA
    python tests/bench/raster_agreement.py --device cpu --gaussians 5000 --sizes 256       # CPU timing
    python tests/bench/raster_agreement.py --cpu-smoke                                      # quick check
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.cameras import Camera, stack_cameras  # noqa: E402
from backend.raster import rasterize  # noqa: E402

PARAM_NAMES = ["means", "quats", "scales", "opacities", "colors", "means2d"]
IMAGE_NAMES = ["color", "alpha", "depth"]


def random_scene(n: int, seed: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    means = (
        d
        / d.norm(dim=1, keepdim=True)
        * torch.rand(n, 1, generator=gen, dtype=torch.float64) ** (1 / 3)
        * 0.5
    )
    quats = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    scales = torch.exp(torch.empty(n, 3, dtype=torch.float64).uniform_(-5.0, -3.0, generator=gen))  # 7-50 mm
    opacities = 0.05 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    colors = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    return [t.to(device) for t in (means, quats, scales, opacities, colors)]


def orbit_cameras(n_views: int, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    cams = [
        Camera.orbit(-30.0 + 20.0 * (i % 4), 360.0 * i / n_views, width=size, height=size)
        for i in range(n_views)
    ]
    return stack_cameras(cams, device=device)


def render_with_grads(scene, viewmats, Ks, size, backend, dtype, loss_weights, background):
    params = [t.to(dtype).clone().requires_grad_() for t in scene]
    out = rasterize(
        *params,
        viewmats.to(dtype),
        Ks.to(dtype),
        size,
        size,
        background=background.to(dtype),
        backend=backend,
    )
    w_color, w_alpha, w_depth = (w.to(dtype) for w in loss_weights)
    loss = (
        (out.color * w_color).sum()
        + (out.alpha * w_alpha).sum()
        + 0.1 * (out.depth * out.alpha * w_depth).sum()
    )
    loss.backward()
    images = {"color": out.color.detach(), "alpha": out.alpha.detach(), "depth": out.depth.detach()}
    grads = dict(zip(PARAM_NAMES, [p.grad for p in params] + [out.means2d.grad]))
    return images, grads, out.radii


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm()).clamp(min=1e-30)).item()


def compare(test, truth) -> dict[str, str]:
    images, grads, radii = test
    t_images, t_grads, t_radii = truth
    row = {}
    covered = t_images["alpha"] > 0.5
    for name in IMAGE_NAMES:
        a, b = images[name], t_images[name]
        if name == "depth":  # expected depth is ill-conditioned where almost nothing is seen
            a, b = a[covered], b[covered]
        row[name] = f"{rel(a, b):.1e} / {(a.double() - b.double()).abs().max().item():.1e}"
    for name in PARAM_NAMES:
        row["d " + name] = f"{rel(grads[name], t_grads[name]):.1e} ({cosine(grads[name], t_grads[name]):.6f})"
    row["radii equal"] = f"{(radii == t_radii).double().mean().item() * 100:.2f} %"
    return row


def time_render(scene, viewmats, Ks, size, backend, device, repeats) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one fwd+bwd render of one view (float32)."""
    params = [t.float().clone().requires_grad_() for t in scene]
    vm, K = viewmats[:1].float(), Ks[:1].float()
    wall, cpu = [], []
    for i in range(repeats + 3):
        for p in params:
            p.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = rasterize(*params, vm, K, size, size, backend=backend)
        (out.color.sum() + out.alpha.sum() + out.depth.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def markdown_table(rows: list[dict[str, str]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: reference only")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="quick check: CPU, reference only, small sizes"
    )
    parser.add_argument("--gaussians", type=int, default=2000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=20, help="timed fwd+bwd renders per back end")
    args = parser.parse_args()

    device = "cpu" if args.cpu_smoke else args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu or --cpu-smoke")
    backends = ["torch"] if device == "cpu" else ["torch", "gsplat"]
    if args.cpu_smoke:
        args.sizes, args.gaussians, args.repeats = [s // 4 for s in args.sizes], min(args.gaussians, 300), 3

    report = [
        "# Rasterizer agreement: gsplat vs PyTorch reference",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- device: {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}",
        f"- torch {torch.__version__}, CPU threads {torch.get_num_threads()}, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores",
    ]
    if "gsplat" in backends:
        import gsplat

        start = time.perf_counter()
        warm_scene = random_scene(100, 0, device)
        vm, K = orbit_cameras(1, 64, device)
        rasterize(*[t.float() for t in warm_scene], vm, K, 64, 64, backend="gsplat")
        torch.cuda.synchronize()
        report.append(
            f"- gsplat {gsplat.__version__} (first call incl. JIT build / load: {time.perf_counter() - start:.0f} s)"
        )
    report += [
        f"- scenes: {args.gaussians} Gaussians in a ball of radius 0.5, scales e^U(-5,-3), opacity U(0.05, 0.95), "
        f"{args.views} orbit views at radius 2 (Zero123 fov), seeds {args.seeds}",
        "- loss: sum(color W1) + sum(alpha W2) + 0.1 sum(depth alpha W3), W random in [0, 1)",
        "- images: relative L2 error / max abs error (depth only where reference alpha > 0.5); gradients: "
        "relative L2 error (cosine similarity); truth = the reference in float64",
        "",
    ]

    rows = []
    for size in args.sizes:
        for seed in args.seeds:
            scene = random_scene(args.gaussians, seed, device)
            viewmats, Ks = orbit_cameras(args.views, size, device)
            gen = torch.Generator().manual_seed(100 + seed)
            loss_weights = [
                torch.rand(args.views, size, size, d, generator=gen, dtype=torch.float64).to(device)
                for d in (3, 1, 1)
            ]
            background = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64, device=device)
            truth = render_with_grads(
                scene, viewmats, Ks, size, "torch", torch.float64, loss_weights, background
            )
            for backend in backends:
                test = render_with_grads(
                    scene, viewmats, Ks, size, backend, torch.float32, loss_weights, background
                )
                label = "reference f32" if backend == "torch" else "gsplat f32"
                row = {"size": str(size), "seed": str(seed), "back end": label}
                row.update(compare(test, truth))
                rows.append(row)
                print(row, flush=True)
    report += ["## Agreement with the float64 reference", "", markdown_table(rows), ""]

    size = max(args.sizes)
    scene = random_scene(args.gaussians, 0, device)
    viewmats, Ks = orbit_cameras(1, size, device)
    timing = []
    for backend in backends:
        wall, cpu = time_render(scene, viewmats, Ks, size, backend, device, args.repeats)
        timing.append(
            {
                "back end": backend,
                "fwd+bwd per render (wall)": f"{wall * 1e3:.2f} ms",
                "process CPU time": f"{cpu * 1e3:.0f} ms",
            }
        )
        print(timing[-1], flush=True)
    report += [
        f"## Time of one {size}x{size} render, {args.gaussians} Gaussians, forward + backward (median of {args.repeats})",
        "",
        markdown_table(timing),
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
