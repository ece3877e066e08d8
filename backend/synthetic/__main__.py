"""`python -m backend.synthetic OUT --seed 0 [--frames 16 --size 384x256 --samples 16 --force]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 384x256") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"--size {text!r}: both sides must be at least 16 pixels")
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.synthetic", description=__doc__)
    parser.add_argument("out", type=Path, help="output root (reference layout + gt/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=parse_size, default=(384, 256), help="WIDTHxHEIGHT (default 384x256)")
    parser.add_argument("--samples", type=int, default=4, help="Cycles samples per pixel (anti-aliasing)")
    parser.add_argument("--force", action="store_true", help="regenerate even when OUT matches")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error(f"--frames {args.frames}: need at least 2 frames")

    from backend.synthetic.generate import generate_scene

    width, height = args.size
    generate_scene(args.out, args.seed, args.frames, width, height, args.samples, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
