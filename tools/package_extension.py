"""Build the Blender extension zip: `python build.py package` (or run this file directly).

1. Stage blender_addon/ with shared/ copied inside it (one source; the add-on imports the copy).
2. Bundle pyzmq wheels for Blender's Pythons (3.11 for 4.2-5.0, 3.13 for 5.1+) on Linux x86_64 and
   aarch64, Windows x86_64 and macOS arm64 and x86_64, downloaded with `pip download` into a cache
   folder (only here, at packaging time; tests reuse the cache or build without foreign wheels),
   and list them in the staged manifest.
3. Build and validate the zip with Blender's own extension tool, blender_ext.py, which ships
   inside the bpy wheel (scripts/addons_core/bl_pkg/cli/blender_ext.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_VERSIONS = ("3.11", "3.13")
# Each target lists the platform tags pip may match, newest first (pip only takes exact tags).
PLATFORMS = {
    "linux-x64": [
        "manylinux_2_28_x86_64",
        "manylinux_2_26_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ],
    "linux-arm64": [
        "manylinux_2_28_aarch64",
        "manylinux_2_26_aarch64",
        "manylinux_2_17_aarch64",
        "manylinux2014_aarch64",
    ],
    "windows-x64": ["win_amd64"],
    "macos-arm64": ["macosx_11_0_arm64", "macosx_10_15_universal2", "macosx_10_9_universal2"],
    "macos-x64": [
        "macosx_10_15_x86_64",
        "macosx_10_9_x86_64",
        "macosx_10_15_universal2",
        "macosx_10_9_universal2",
    ],
}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache")


class PackagingError(RuntimeError):
    pass


def blender_ext_script() -> Path:
    """blender_ext.py inside the installed bpy package (found without importing bpy)."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise PackagingError(
            "the bpy module is not installed; `pip install bpy` provides Blender's extension tool"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if found:
            return found[-1]
    raise PackagingError(
        f"no scripts/addons_core/bl_pkg/cli/blender_ext.py under {spec.submodule_search_locations}"
    )


def stage(repo_root: Path, staging: Path) -> Path:
    """blender_addon/ + shared/ copied into staging/dreamscene4d; returns that folder."""
    source = staging / "dreamscene4d"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(repo_root / "blender_addon", source, ignore=IGNORED)
    shutil.copytree(repo_root / "shared", source / "shared", ignore=IGNORED)
    if not (source / "shared" / "__init__.py").exists():
        # Inside the extension shared must be a regular package for relative imports.
        (source / "shared" / "__init__.py").write_text('"""Code shared with the backend (bundled copy)."""\n')
    return source


def download_wheels(cache: Path, pyzmq_version: str) -> list[Path]:
    """pyzmq wheels for every (Python, platform) target, downloaded into cache when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels: set[Path] = set()
    for python in PYTHON_VERSIONS:
        for target, tags in PLATFORMS.items():
            command = [
                sys.executable, "-m", "pip", "download", f"pyzmq=={pyzmq_version}", "--only-binary=:all:",
                "--no-deps", "--disable-pip-version-check", "--python-version", python, "--dest", str(cache),
            ]  # fmt: skip
            for tag in tags:
                command += ["--platform", tag]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise PackagingError(
                    f"pip could not download pyzmq {pyzmq_version} for Python {python} on {target}:\n"
                    f"{result.stdout[-1500:]}{result.stderr[-1500:]}"
                )
            saved = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", result.stdout)
            if not saved:
                raise PackagingError(
                    f"pip reported no wheel for Python {python} on {target}:\n{result.stdout[-1500:]}"
                )
            wheels.update(Path(s).resolve() for s in saved)
    return sorted(wheels)


def cached_wheels(cache: Path, pyzmq_version: str) -> list[Path]:
    return sorted(cache.glob(f"pyzmq-{pyzmq_version}-*.whl")) if cache.is_dir() else []


def write_manifest_wheels(source: Path, wheels: list[Path]) -> None:
    """Copy the wheels into source/wheels and list them in the staged manifest."""
    folder = source / "wheels"
    folder.mkdir(exist_ok=True)
    for wheel in wheels:
        shutil.copy2(wheel, folder / wheel.name)
    manifest = source / "blender_manifest.toml"
    text = manifest.read_text()
    listed = ",\n".join(f'  "./wheels/{wheel.name}"' for wheel in wheels)
    replacement = f"wheels = [\n{listed}\n]" if wheels else ""
    new_text, count = re.subn(r"(?m)^wheels\s*=\s*\[[^\]]*\]", replacement, text)
    if count != 1:
        raise PackagingError(f"{manifest}: expected one `wheels = [...]` line to fill in")
    manifest.write_text(new_text)


def _run_blender_ext(arguments: list[str]) -> str:
    command = [sys.executable, str(blender_ext_script()), *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise PackagingError(f"{' '.join(arguments[:1])} failed ({result.returncode}):\n{output[-3000:]}")
    return output


def manifest_version(source: Path) -> str:
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (source / "blender_manifest.toml").read_text())
    if match is None:
        raise PackagingError("blender_manifest.toml has no version")
    return match.group(1)


def build_extension(
    repo_root: str | Path = ROOT,
    dist_dir: str | Path | None = None,
    wheels: str = "download",
    wheel_cache: str | Path | None = None,
    pyzmq_version: str | None = None,
) -> Path:
    """Stage, bundle wheels, build and validate; returns the zip's path.

    wheels: "download" (fetch what the cache lacks), "cache" (only what the cache holds; an
    error when it is empty) or "none" (no foreign wheels; the add-on then needs pyzmq in
    Blender's Python for backend features).
    """
    repo_root = Path(repo_root)
    dist_dir = Path(dist_dir) if dist_dir is not None else repo_root / "dist"
    cache = Path(wheel_cache) if wheel_cache is not None else dist_dir / "wheel_cache"
    pyzmq_version = pyzmq_version or importlib.metadata.version("pyzmq")
    source = stage(repo_root, dist_dir / "staging")
    if wheels == "download":
        bundled = download_wheels(cache, pyzmq_version)
    elif wheels == "cache":
        bundled = cached_wheels(cache, pyzmq_version)
        if not bundled:
            raise PackagingError(
                f"no pyzmq {pyzmq_version} wheels cached in {cache}; run with --wheels download once"
            )
    elif wheels == "none":
        bundled = []
    else:
        raise PackagingError(f"wheels must be download, cache or none, not {wheels!r}")
    write_manifest_wheels(source, bundled)
    _run_blender_ext(["validate", str(source)])
    zip_path = dist_dir / f"dreamscene4d-{manifest_version(source)}.zip"
    zip_path.unlink(missing_ok=True)
    _run_blender_ext(["build", "--source-dir", str(source), "--output-filepath", str(zip_path)])
    _run_blender_ext(["validate", str(zip_path)])
    return zip_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    parser.add_argument("--wheels", choices=["download", "cache", "none"], default="download")
    parser.add_argument("--wheel-cache", type=Path, default=None, help="default: <dist>/wheel_cache")
    parser.add_argument("--pyzmq-version", default=None, help="default: the pyzmq installed here")
    args = parser.parse_args(argv)
    try:
        zip_path = build_extension(ROOT, args.dist, args.wheels, args.wheel_cache, args.pyzmq_version)
    except PackagingError as error:
        print(f"package: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"zip": str(zip_path), "bytes": zip_path.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
