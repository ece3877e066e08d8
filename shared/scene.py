"""The scene on disk: the contract between the backend and the add-on (numpy only).

    OUT/scene.json            format name, version, frames, fps, image size, input camera, objects
    OUT/objects/<id>.npz      means [T,N,3], quats [T,N,4] (w,x,y,z), scales [T,N,3] (linear),
                              opacities [N], colors [N,3] in [0, 1]; all float32

The .npz files are written uncompressed, so every array is one contiguous run of bytes inside the
zip.  `read_scene` memory-maps those runs directly (no copy, no cache folder): the add-on's
frame-change handler reads one frame of 100k points without loading the whole sequence.
The version is checked on read; an unknown format or version is a `SceneFormatError`.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_NAME = "dreamscene4d-scene"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
SCENE_FILE = "scene.json"

CONVENTION = {
    "world_up": "+Y",
    "camera_axes": "opencv",
    "quat_order": "wxyz",
    "scales": "linear",
    "units": "object-centric",
}

PER_FRAME_ARRAYS = {"means": 3, "quats": 4, "scales": 3}  # name -> last dimension, shape [T, N, D]
STATIC_ARRAYS = {"opacities": None, "colors": 3}  # [N] and [N, 3]
ARRAY_NAMES = tuple(PER_FRAME_ARRAYS) + tuple(STATIC_ARRAYS)


class SceneFormatError(ValueError):
    """A scene folder that does not follow the contract; the message names the file and the fix."""


@dataclass
class Scene:
    """A scene read from disk.

    meta: the parsed scene.json.  objects: id -> {"means", "quats", "scales", "opacities",
    "colors"} arrays, memory-mapped read-only where the file allows it.
    """

    path: Path
    meta: dict
    objects: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def image_size(self) -> tuple[int, int]:
        width, height = self.meta["image_size"]
        return int(width), int(height)

    @property
    def K(self) -> np.ndarray:
        return np.asarray(self.meta["camera"]["K"], dtype=np.float64)

    @property
    def viewmat(self) -> np.ndarray:
        return np.asarray(self.meta["camera"]["viewmat"], dtype=np.float64)

    @property
    def orbit_center(self) -> np.ndarray:
        return np.asarray(self.meta.get("orbit_center", [0.0, 0.0, 0.0]), dtype=np.float64)

    def object_name(self, object_id: str) -> str:
        for entry in self.meta["objects"]:
            if entry["id"] == object_id:
                return str(entry.get("name", object_id))
        raise KeyError(object_id)


def _check_object_id(object_id: str) -> None:
    # Ids become file names: keep them to one plain path component.
    if (
        not isinstance(object_id, str)
        or not object_id
        or object_id in (".", "..")
        or any(c in object_id for c in '/\\:*?"<>|')
    ):
        raise SceneFormatError(f"object id {object_id!r} must be a non-empty name without path separators")


def validate_object_arrays(object_id: str, arrays: dict, num_frames: int | None = None) -> tuple[int, int]:
    """Check one object's arrays against the contract; returns (T, N)."""
    missing = [name for name in ARRAY_NAMES if name not in arrays]
    if missing:
        raise SceneFormatError(
            f"object {object_id}: missing arrays {missing}; each object needs {list(ARRAY_NAMES)}"
        )
    extra = sorted(set(arrays) - set(ARRAY_NAMES))
    if extra:
        raise SceneFormatError(f"object {object_id}: unknown arrays {extra}; allowed are {list(ARRAY_NAMES)}")
    means_shape = np.shape(arrays["means"])
    if len(means_shape) != 3 or means_shape[2] != 3:
        raise SceneFormatError(f"object {object_id}: means has shape {means_shape}, expected [T, N, 3]")
    T, N = int(means_shape[0]), int(means_shape[1])
    if T < 1:
        raise SceneFormatError(f"object {object_id}: means has no frames (shape {means_shape})")
    if num_frames is not None and T != num_frames:
        raise SceneFormatError(f"object {object_id}: means has {T} frames but the scene has {num_frames}")
    expected = {
        "means": (T, N, 3),
        "quats": (T, N, 4),
        "scales": (T, N, 3),
        "opacities": (N,),
        "colors": (N, 3),
    }
    for name, shape in expected.items():
        found = tuple(int(s) for s in np.shape(arrays[name]))
        if found != shape:
            raise SceneFormatError(
                f"object {object_id}: {name} has shape {list(found)}, expected {list(shape)} "
                f"(T={T} frames, N={N} Gaussians from means)"
            )
    return T, N


def _as_float32(object_id: str, name: str, value) -> np.ndarray:
    array = np.ascontiguousarray(value, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise SceneFormatError(f"object {object_id}: {name} has non-finite values")
    return array


def write_scene(out_dir: str | Path, meta: dict, objects: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write scene.json and objects/<id>.npz into out_dir; returns the path of scene.json.

    meta must hold "fps", "image_size" [W, H] and "camera" {"K" 3x3, "viewmat" 4x4}; it may hold
    "frame_names" (T names), "orbit_center" (default origin), "renders" {name: path relative to
    out_dir}, "tracks" (path or None) and "object_names" {id: display name}.  "format", "version",
    "num_frames", "convention" and "objects" are filled in here (given values must agree).
    Arrays are validated and stored as float32; quaternions are normalised.
    """
    out_dir = Path(out_dir)
    if not objects:
        raise SceneFormatError("write_scene: a scene needs at least one object")
    for key in ("fps", "image_size", "camera"):
        if key not in meta:
            raise SceneFormatError(f"write_scene: meta has no {key!r}; it needs fps, image_size and camera")
    num_frames = meta.get("num_frames")
    prepared: dict[str, dict[str, np.ndarray]] = {}
    for object_id, arrays in objects.items():
        _check_object_id(object_id)
        T, _ = validate_object_arrays(object_id, arrays, num_frames)
        num_frames = T
        converted = {name: _as_float32(object_id, name, arrays[name]) for name in ARRAY_NAMES}
        norms = np.linalg.norm(converted["quats"], axis=-1, keepdims=True)
        if np.any(norms < 1e-12):
            raise SceneFormatError(f"object {object_id}: quats has zero-length quaternions")
        converted["quats"] = (converted["quats"] / norms).astype(np.float32)
        if np.any(converted["scales"] < 0):
            raise SceneFormatError(
                f"object {object_id}: scales must be linear (>= 0), found negatives; log scales?"
            )
        prepared[object_id] = converted

    width, height = (int(v) for v in meta["image_size"])
    K = np.asarray(meta["camera"]["K"], dtype=np.float64)
    viewmat = np.asarray(meta["camera"]["viewmat"], dtype=np.float64)
    if K.shape != (3, 3) or viewmat.shape != (4, 4):
        raise SceneFormatError(
            f"write_scene: camera K must be 3x3 and viewmat 4x4, got {K.shape} and {viewmat.shape}"
        )
    frame_names = [str(n) for n in meta.get("frame_names", [f"{i:05d}" for i in range(num_frames)])]
    if len(frame_names) != num_frames:
        raise SceneFormatError(f"write_scene: {len(frame_names)} frame_names for {num_frames} frames")
    for key, value in (("format", FORMAT_NAME), ("version", FORMAT_VERSION)):
        if key in meta and meta[key] != value:
            raise SceneFormatError(f"write_scene: meta {key} is {meta[key]!r}; this writer writes {value!r}")
    names = dict(meta.get("object_names", {}))
    for entry in meta.get("objects", []) or []:
        names.setdefault(entry["id"], entry.get("name", entry["id"]))

    (out_dir / "objects").mkdir(parents=True, exist_ok=True)
    entries = []
    for object_id, arrays in prepared.items():
        relative = f"objects/{object_id}.npz"
        # np.savez stores members uncompressed (ZIP_STORED), which is what makes them mappable.
        np.savez(out_dir / relative, **arrays)
        entries.append(
            {
                "id": object_id,
                "name": str(names.get(object_id, object_id)),
                "file": relative,
                "num_gaussians": int(arrays["means"].shape[1]),
            }
        )
    known = {"format", "version", "num_frames", "convention", "objects", "object_names"}
    document = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_frames": int(num_frames),
        "fps": float(meta["fps"]),
        "image_size": [width, height],
        "frame_names": frame_names,
        "convention": dict(CONVENTION),
        "camera": {"K": K.tolist(), "viewmat": viewmat.tolist()},
        "orbit_center": [float(v) for v in meta.get("orbit_center", [0.0, 0.0, 0.0])],
        "objects": entries,
        "renders": dict(meta.get("renders", {})),
        "tracks": meta.get("tracks"),
    }
    for key, value in meta.items():  # keep anything else the writer was given (e.g. notes)
        if key not in known and key not in document:
            document[key] = value
    scene_file = out_dir / SCENE_FILE
    temporary = scene_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=1))
    temporary.replace(scene_file)  # readers never see a half-written scene.json
    return scene_file


def _npz_member_memmap(path: Path, member: str) -> np.ndarray | None:
    """Memory-map one array stored uncompressed inside an .npz; None if it cannot be mapped."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            local_header = handle.read(30)
            if local_header[:4] != b"PK\x03\x04":
                return None
            name_length, extra_length = struct.unpack("<HH", local_header[26:30])
            data_start = info.header_offset + 30 + name_length + extra_length
            handle.seek(data_start)
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                return None
            if dtype.hasobject:
                return None
            offset = handle.tell()
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C"
    )


def load_object_arrays(path: str | Path, mmap: bool = True) -> dict[str, np.ndarray]:
    """Arrays of one object's .npz; memory-mapped when stored uncompressed and mmap is True."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        if mmap:
            for name in ARRAY_NAMES:
                mapped = _npz_member_memmap(path, f"{name}.npy")
                if mapped is not None:
                    arrays[name] = mapped
        missing = [name for name in ARRAY_NAMES if name not in arrays]
        if missing:
            with np.load(path, allow_pickle=False) as data:
                for name in missing:
                    if name in data.files:
                        arrays[name] = data[name]
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise SceneFormatError(f"{path}: cannot read the object arrays ({error})") from error
    return arrays


def _require(document: dict, key: str, scene_file: Path):
    if key not in document:
        raise SceneFormatError(f"{scene_file}: missing key {key!r}")
    return document[key]


def read_scene_meta(path: str | Path) -> tuple[Path, dict]:
    """Parse and check scene.json (path of the file or of its folder); returns (scene_file, meta)."""
    path = Path(path)
    scene_file = path / SCENE_FILE if path.is_dir() else path
    if not scene_file.is_file():
        raise SceneFormatError(f"{scene_file}: no scene file; expected the {SCENE_FILE} a backend run writes")
    try:
        document = json.loads(scene_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SceneFormatError(f"{scene_file}: not valid JSON ({error})") from error
    if not isinstance(document, dict):
        raise SceneFormatError(f"{scene_file}: expected a JSON object at the top level")
    found_format = document.get("format")
    if found_format != FORMAT_NAME:
        raise SceneFormatError(f"{scene_file}: format is {found_format!r}, expected {FORMAT_NAME!r}")
    version = document.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise SceneFormatError(
            f"{scene_file}: scene version {version!r} is not supported; this reader supports versions "
            f"{list(SUPPORTED_VERSIONS)} (update the add-on or re-export the scene)"
        )
    num_frames = _require(document, "num_frames", scene_file)
    if not isinstance(num_frames, int) or num_frames < 1:
        raise SceneFormatError(f"{scene_file}: num_frames must be a positive integer, got {num_frames!r}")
    image_size = _require(document, "image_size", scene_file)
    if not (isinstance(image_size, list) and len(image_size) == 2 and all(int(v) > 0 for v in image_size)):
        raise SceneFormatError(f"{scene_file}: image_size must be [W, H], got {image_size!r}")
    _require(document, "fps", scene_file)
    camera = _require(document, "camera", scene_file)
    if np.shape(camera.get("K")) != (3, 3) or np.shape(camera.get("viewmat")) != (4, 4):
        raise SceneFormatError(f"{scene_file}: camera needs K (3x3) and viewmat (4x4)")
    convention = document.get("convention", CONVENTION)
    for key, value in CONVENTION.items():
        if convention.get(key, value) != value:
            raise SceneFormatError(
                f"{scene_file}: convention {key} is {convention.get(key)!r}; version 1 scenes use {value!r}"
            )
    objects = _require(document, "objects", scene_file)
    if not isinstance(objects, list) or not objects:
        raise SceneFormatError(f"{scene_file}: objects must be a non-empty list")
    return scene_file, document


def read_scene(path: str | Path, mmap: bool = True) -> Scene:
    """Read a scene folder (or its scene.json) and check every object's arrays against the header."""
    scene_file, meta = read_scene_meta(path)
    root = scene_file.parent.resolve()
    scene = Scene(path=root, meta=meta)
    num_frames = int(meta["num_frames"])
    for entry in meta["objects"]:
        object_id = entry.get("id")
        _check_object_id(object_id)
        relative = entry.get("file", f"objects/{object_id}.npz")
        object_file = (root / relative).resolve()
        if root not in object_file.parents:
            raise SceneFormatError(
                f"{scene_file}: object {object_id} file {relative!r} is outside the scene folder"
            )
        if not object_file.is_file():
            raise SceneFormatError(f"{scene_file}: object {object_id} file {relative} does not exist")
        arrays = load_object_arrays(object_file, mmap=mmap)
        try:
            _, N = validate_object_arrays(object_id, arrays, num_frames)
        except SceneFormatError as error:
            raise SceneFormatError(f"{object_file}: {error}") from None
        if "num_gaussians" in entry and int(entry["num_gaussians"]) != N:
            raise SceneFormatError(
                f"{scene_file}: object {object_id} lists {entry['num_gaussians']} Gaussians but {relative} has {N}"
            )
        scene.objects[object_id] = arrays
    return scene
