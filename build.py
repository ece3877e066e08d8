#!/usr/bin/env python3
"""The one entry point: setup, test, demo, package, serve.

    python build.py setup     create .venv and install the pinned dependencies (idempotent)
    python build.py test      setup, ruff, then the pytest suite (CPU)
    python build.py demo      setup, then the whole product on the built-in synthetic demo
    python build.py package   build and validate the Blender extension zip into dist/
    python build.py serve     start the backend service on loopback

Runs with the system Python (stdlib only); everything else happens inside .venv.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = [ROOT / "requirements.txt", ROOT / "requirements-dev.txt"]
STAMP = VENV / ".requirements.sha256"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requirements_digest() -> str:
    digest = hashlib.sha256()
    for path in REQUIREMENTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run(cmd: list[str | Path], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def setup() -> Path:
    """Create .venv and install pinned requirements; a no-op when nothing changed."""
    python = venv_python()
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == requirements_digest():
        return python
    # torch first and alone: pip then takes the local CPU build instead of resolving a CUDA one.
    torch_pin = next(
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.startswith("torch==")
    )
    run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", torch_pin])
    run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
            ROOT / "requirements-dev.txt",
        ]
    )
    STAMP.write_text(requirements_digest())
    return python


def test(extra: list[str]) -> None:
    python = setup()
    run([python, "-m", "ruff", "check", "."])
    run([python, "-m", "ruff", "format", "--check", "."])
    run([python, "-m", "pytest", "-q", *extra])


def demo(extra: list[str]) -> None:
    python = setup()
    run([python, "-m", "backend", "demo", *extra])


def package(extra: list[str]) -> None:
    python = setup()
    run([python, ROOT / "tools" / "package_extension.py", *extra])


def serve(extra: list[str]) -> None:
    python = setup()
    run([python, "-m", "backend", "serve", *extra])


COMMANDS = {"setup": lambda extra: setup(), "test": test, "demo": demo, "package": package, "serve": serve}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
