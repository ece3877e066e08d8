"""Command line: `python -m backend run|serve|eval|demo ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backend.errors import InputError, JobCancelled


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("input (reference layout, or frames + masks folders)")
    src.add_argument("--data", type=Path, help="root holding JPEGImages/<video>, Annotations/<video>/<obj>")
    src.add_argument("--video", help="video name inside --data")
    src.add_argument("--frames", type=Path, help="folder of frames named NNNNN.png|jpg")
    src.add_argument(
        "--masks", type=Path, help="folder with one sub-folder of masks per object, or indexed masks"
    )
    src.add_argument("--inpainted", type=Path, help="per-object inpainted frames (sub-folder per object)")
    src.add_argument("--inpainted-masks", type=Path, help="per-object amodal masks (sub-folder per object)")
    src.add_argument(
        "--video-file",
        type=Path,
        help="a video file (MP4, MOV, WebM, ...) or a folder of numbered images, with --masks",
    )
    src.add_argument(
        "--frame-range", metavar="A:B", help="with --video-file: frames A to B-1 (0-based; 'A:' = to the end)"
    )
    src.add_argument("--stride", type=int, default=1, help="with --video-file: keep every N-th frame")
    src.add_argument(
        "--max-side", type=int, default=None, help="with --video-file: scale frames so the longest side <= N"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder; rerunning on it resumes")
    p.add_argument("--preset", default="full", help="full | lite | cpu-demo | path/to/preset.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stages", default="static,motion,compose", help="comma list of static,motion,compose")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--guidance", default=None, help="none | local Zero123 folder | hub id (default: the preset's)"
    )
    p.add_argument(
        "--ray",
        default=None,
        metavar="auto|ADDRESS",
        help="run per-object stages as Ray tasks, one GPU each (auto: this machine's cluster or a new one)",
    )


def parse_frame_range(text: str | None) -> tuple[int, int | None]:
    """'A:B' -> (A, B); 'A:' -> (A, None); None -> (0, None)."""
    if not text:
        return 0, None
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start or 0), (int(end) if end.strip() else None)
    except ValueError:
        raise InputError(f"--frame-range {text!r} must look like A:B or A: (0-based, B excluded)") from None


def spec_from_args(args: argparse.Namespace) -> dict:
    if getattr(args, "video_file", None) is not None:
        if args.masks is None or args.data is not None or args.frames is not None:
            raise InputError("--video-file goes with --masks DIR (and not with --data or --frames)")
        start, end = parse_frame_range(args.frame_range)
        source = {
            "kind": "video",
            "path": str(args.video_file),
            "masks": str(args.masks),
            "start": start,
            "end": end,
            "stride": args.stride,
            "max_side": args.max_side,
        }
    elif args.data is not None or args.video is not None:
        if args.data is None or args.video is None:
            raise InputError("--data and --video go together (or use --frames and --masks)")
        source = {"kind": "reference", "root": str(args.data), "video": args.video}
    elif args.frames is not None or args.masks is not None:
        if args.frames is None or args.masks is None:
            raise InputError("--frames and --masks go together (or use --data and --video)")
        source = {
            "kind": "folders",
            "frames": str(args.frames),
            "masks": str(args.masks),
            "inpainted": str(args.inpainted) if args.inpainted else None,
            "inpainted_masks": str(args.inpainted_masks) if args.inpainted_masks else None,
        }
    else:
        raise InputError("no input given: pass --data ROOT --video NAME, or --frames DIR --masks DIR")
    spec = {
        "input": source,
        "preset": args.preset,
        "overrides": list(args.overrides),
        "stages": args.stages,
        "device": args.device,
    }
    if args.guidance is not None:
        spec["guidance"] = args.guidance
    return spec


class TerminalProgress:
    """Prints one line per progress event: object, stage, step/total, losses, ETA."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "progress":
            losses = " ".join(f"{k}={v:.4g}" for k, v in event.get("losses", {}).items())
            eta = event.get("eta_s", 0.0)
            line = (
                f"[{event.get('object') or 'scene'} {event['stage']}/{event.get('phase', '')}] "
                f"{event['step']}/{event['total']} {losses} eta {eta:5.0f}s"
            )
        elif kind == "stage_done":
            line = f"[{event.get('object') or 'scene'} {event['stage']}] finished in {event.get('seconds', 0):.1f}s"
        elif kind == "log":
            line = event["message"]
        else:
            return
        print(line, file=self.stream, flush=True)


def run_main(args: argparse.Namespace) -> int:
    from backend.pipeline import run_job

    t0 = time.perf_counter()
    try:
        spec = spec_from_args(args)
        executor = None
        if getattr(args, "ray", None):
            from backend.distributed import RayExecutor

            executor = RayExecutor(args.ray)
        report = run_job(spec, args.out, on_event=TerminalProgress(), executor=executor)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last finished stage", file=sys.stderr)
        return 130
    summary = {
        oid: {s: {k: round(v, 3) for k, v in m.items() if isinstance(v, (int, float))} for s, m in o.items()}
        for oid, o in report["objects"].items()
    }
    print(
        json.dumps(
            {"status": report["status"], "objects": summary, "scene": report.get("scene", {}).get("summary")}
        )
    )
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description="DreamScene4D backend")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run the optimisation on one video"))
    from backend.server import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="run the ZeroMQ service"))
    from backend.eval import add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="evaluate a finished scene"))
    from backend.demo import add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="the built-in end-to-end demo"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_main(args)
    if args.command == "serve":
        from backend.server import serve_main

        return serve_main(args)
    if args.command == "eval":
        from backend.eval import eval_main

        return eval_main(args)
    if args.command == "demo":
        from backend.demo import demo_main

        return demo_main(args)
    return 2
