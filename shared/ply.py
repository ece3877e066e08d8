"""3DGS-standard binary PLY files (numpy only), the format other splat viewers read.

Vertex properties, all float32, in this order:
    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  opacity  scale_0 scale_1 scale_2  rot_0 rot_1 rot_2 rot_3
with the storage conventions of the reference 3DGS code: colours as degree-0 spherical-harmonic
coefficients (rgb = 0.5 + C0 * f_dc), opacity as a logit, scales as natural logs, rotation as a
(w, x, y, z) quaternion.  Normals are written as zeros.  The functions here take and return the
scene file's conventions (linear scales, opacities in (0, 1), colours in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
PROPERTIES = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    + [f"scale_{i}" for i in range(3)]
    + [f"rot_{i}" for i in range(4)]
)
_EPS = 1e-7


def write_ply(
    path: str | Path,
    means: np.ndarray,
    quats: np.ndarray,
    scales: np.ndarray,
    opacities: np.ndarray,
    colors: np.ndarray,
) -> Path:
    """Write N Gaussians (means [N,3], quats [N,4] wxyz, scales [N,3] linear, opacities [N], colors [N,3])."""
    path = Path(path)
    means = np.asarray(means, dtype=np.float32).reshape(-1, 3)
    count = len(means)
    quats = np.asarray(quats, dtype=np.float32).reshape(count, 4)
    scales = np.asarray(scales, dtype=np.float32).reshape(count, 3)
    opacities = np.asarray(opacities, dtype=np.float32).reshape(count)
    colors = np.asarray(colors, dtype=np.float32).reshape(count, 3)
    record = np.empty(count, dtype=[(name, "<f4") for name in PROPERTIES])
    for axis, name in enumerate("xyz"):
        record[name] = means[:, axis]
    for name in ("nx", "ny", "nz"):
        record[name] = 0.0
    f_dc = (colors - 0.5) / SH_C0
    for i in range(3):
        record[f"f_dc_{i}"] = f_dc[:, i]
    clipped = np.clip(opacities, _EPS, 1.0 - _EPS)
    record["opacity"] = np.log(clipped / (1.0 - clipped))
    log_scales = np.log(np.maximum(scales, 1e-12))
    for i in range(3):
        record[f"scale_{i}"] = log_scales[:, i]
    for i in range(4):
        record[f"rot_{i}"] = quats[:, i]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
    header += [f"property float {name}" for name in PROPERTIES]
    header.append("end_header")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        handle.write(record.tobytes())
    return path


_PLY_TYPES = {
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
    "uchar": "u1", "uint8": "u1", "char": "i1", "int8": "i1",
    "ushort": "u2", "uint16": "u2", "short": "i2", "int16": "i2",
    "uint": "u4", "uint32": "u4", "int": "i4", "int32": "i4",
}  # fmt: skip


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a binary 3DGS PLY; returns means, quats (normalised), scales (linear), opacities, colors.

    Extra vertex properties (normals, higher-order f_rest_*) are accepted and ignored.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file")
        endian, count, fields = None, None, []
        in_vertex = False
        while True:
            line = handle.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header")
            words = line.decode("ascii", errors="replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                endian = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(words[1])
                if endian is None:
                    raise ValueError(f"{path}: PLY format {words[1]} is not supported; write binary PLY")
            elif words[0] == "element":
                in_vertex = words[1] == "vertex"
                if in_vertex:
                    count = int(words[2])
                elif count is None:
                    raise ValueError(f"{path}: element {words[1]} before the vertex element is not supported")
            elif words[0] == "property" and in_vertex:
                if words[1] == "list":
                    raise ValueError(f"{path}: list properties on vertices are not supported")
                fields.append((words[2], endian + _PLY_TYPES[words[1]]))
        if endian is None or count is None:
            raise ValueError(f"{path}: PLY header has no binary format or no vertex element")
        record = np.frombuffer(handle.read(count * np.dtype(fields).itemsize), dtype=fields, count=count)
    names = record.dtype.names
    missing = [name for name in PROPERTIES[:3] + PROPERTIES[6:] if name not in names]
    if missing:
        raise ValueError(f"{path}: not a 3DGS PLY, missing vertex properties {missing}")

    def stack(prefix_names):
        return np.stack([record[name].astype(np.float32) for name in prefix_names], axis=-1)

    quats = stack([f"rot_{i}" for i in range(4)])
    quats = quats / np.maximum(np.linalg.norm(quats, axis=-1, keepdims=True), 1e-12)
    return {
        "means": stack(["x", "y", "z"]),
        "quats": quats.astype(np.float32),
        "scales": np.exp(stack([f"scale_{i}" for i in range(3)])),
        "opacities": (1.0 / (1.0 + np.exp(-record["opacity"].astype(np.float32)))).astype(np.float32),
        "colors": (0.5 + SH_C0 * stack([f"f_dc_{i}" for i in range(3)])).astype(np.float32),
    }


def write_ply_sequence(out_dir: str | Path, object_id: str, arrays: dict[str, np.ndarray]) -> list[Path]:
    """One PLY per frame of a scene object: out_dir/objects/<id>_ply/00000.ply, 00001.ply, ..."""
    folder = Path(out_dir) / "objects" / f"{object_id}_ply"
    paths = []
    for t in range(len(arrays["means"])):
        paths.append(
            write_ply(
                folder / f"{t:05d}.ply",
                arrays["means"][t],
                arrays["quats"][t],
                arrays["scales"][t],
                arrays["opacities"],
                arrays["colors"],
            )
        )
    return paths
