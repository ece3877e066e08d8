"""Wire protocol between the Blender add-on (or any client) and the backend service.

A message is a ZeroMQ multipart message: one JSON header frame followed by zero or more raw
binary frames for bulk data (uploaded images, artifact chunks, rendered PNGs)::

    header = {"v": 1, "type": <str>, "id": <request id str>, "payload": {...}}

Requests travel DEALER -> ROUTER and carry a client-chosen request id; the reply carries the same
id with type ``"reply"`` (success) or ``"error"`` (payload ``{"code", "message", ...}``; an
unsupported version or type names what the server supports). Progress events travel PUB -> SUB
as ``[topic, header]`` where the topic is the job id (UTF-8) and the header has type ``"event"``.

This module is pure stdlib so Blender's Python can import it. Every check here raises
`ProtocolError`, whose `code` goes into the error reply; the server never lets one escape.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

REQUEST_TYPES = (
    "hello",
    "submit",
    "status",
    "list",
    "cancel",
    "resume",
    "delete",
    "fetch",
    "render_path",
    "shutdown",
)
REPLY = "reply"
ERROR = "error"
EVENT = "event"

JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = ("done", "failed", "cancelled")
STAGES = ("static", "motion", "compose")
DEVICES = ("auto", "cpu", "cuda")
REFERENCE_FOLDERS = ("JPEGImages", "Annotations", "InpaintedImages", "InpaintedMasks")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Limits. The server may lower max_message_bytes; the rest are protocol constants.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_FRAMES = 20000
MAX_FETCH_CHUNK = 8 * 1024 * 1024
DEFAULT_FETCH_CHUNK = 4 * 1024 * 1024
MAX_RENDER_CAMERAS = 2000
MAX_RENDER_SIDE = 4096
MAX_RENDER_PIXELS = 2000 * 512 * 512  # per request, all cameras together: bounds the reply's memory
MAX_REQUEST_ID = 128
MAX_STRING = 4096

ERROR_CODES = (
    "bad_message",  # framing, JSON or header shape is wrong
    "unsupported_version",
    "unknown_type",
    "invalid_payload",  # payload does not match the schema of its type
    "too_large",
    "not_found",
    "conflict",  # the job is in a state where the request makes no sense
    "invalid_input",  # the job's inputs fail validation (same checks as the CLI)
    "internal",
)

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PRESET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_CUDA_INDEX_RE = re.compile(r"^cuda:[0-9]{1,2}$")
_OVERRIDE_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ProtocolError(Exception):
    """A message that cannot be served; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: str | None = None, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.extra = extra

    def payload(self) -> dict:
        return {"code": self.code, "message": self.message, **self.extra}


@dataclass
class Message:
    type: str
    id: str | None
    payload: dict
    frames: list[bytes] = field(default_factory=list)
    v: int = PROTOCOL_VERSION


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


def encode(
    type_: str, request_id: str | None, payload: dict, frames: list[bytes] | tuple = ()
) -> list[bytes]:
    header = {"v": PROTOCOL_VERSION, "type": type_, "id": request_id, "payload": payload}
    return [dumps(header), *[bytes(f) if not isinstance(f, bytes) else f for f in frames]]


def encode_error(request_id: str | None, error: ProtocolError) -> list[bytes]:
    return encode(ERROR, request_id, error.payload())


def decode(parts: list[bytes], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse a multipart message into a Message; header shape and limits only (not the payload)."""
    if not parts:
        raise ProtocolError("bad_message", "empty message: expected a JSON header frame")
    if len(parts) > MAX_FRAMES + 1:
        raise ProtocolError("too_large", f"message has {len(parts)} frames; at most {MAX_FRAMES + 1} allowed")
    total = sum(len(p) for p in parts)
    if total > max_message_bytes:
        raise ProtocolError(
            "too_large", f"message is {total} bytes; this server accepts at most {max_message_bytes}"
        )
    raw = parts[0]
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header is {len(raw)} bytes; at most {MAX_HEADER_BYTES} allowed")
    try:
        header = loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_message", f"header frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", "header must be a JSON object {v, type, id, payload}")
    request_id = header.get("id")
    if not (request_id is None or (isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID)):
        raise ProtocolError("bad_message", f"header 'id' must be a string of 1-{MAX_REQUEST_ID} characters")
    unknown = set(header) - {"v", "type", "id", "payload"}
    if unknown:
        raise ProtocolError("bad_message", f"unknown header keys {sorted(unknown)}", request_id)
    version = header.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version!r} is not supported; this side speaks {list(SUPPORTED_VERSIONS)}",
            request_id,
            supported_versions=list(SUPPORTED_VERSIONS),
        )
    type_ = header.get("type")
    if not isinstance(type_, str):
        raise ProtocolError("bad_message", "header 'type' must be a string", request_id)
    payload = header.get("payload", {})
    if not isinstance(payload, dict):
        raise ProtocolError("bad_message", "header 'payload' must be a JSON object", request_id)
    return Message(type=type_, id=request_id, payload=payload, frames=list(parts[1:]), v=version)


# ----------------------------------------------------------------------------- payload schemas


def _fail(msg: Message, text: str) -> ProtocolError:
    return ProtocolError("invalid_payload", f"{msg.type}: {text}", msg.id)


def _check_keys(msg: Message, obj: dict, where: str, required: tuple = (), optional: tuple = ()) -> None:
    missing = [k for k in required if k not in obj]
    if missing:
        raise _fail(msg, f"{where} is missing {missing}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise _fail(msg, f"{where} has unknown keys {unknown}; allowed: {sorted(required + optional)}")


def _string(
    msg: Message, value: Any, where: str, max_len: int = MAX_STRING, allow_empty: bool = False
) -> str:
    if not isinstance(value, str) or (not value and not allow_empty) or len(value) > max_len or "\0" in value:
        raise _fail(msg, f"{where} must be a non-empty string of at most {max_len} characters")
    return value


def _int(msg: Message, value: Any, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(msg, f"{where} must be an integer in [{lo}, {hi}]")
    return value


def _number(msg: Message, value: Any, where: str, lo: float = -1e9, hi: float = 1e9) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise _fail(msg, f"{where} must be a finite number in [{lo}, {hi}]")
    return float(value)


def _bool(msg: Message, value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise _fail(msg, f"{where} must be true or false")
    return value


def _matrix(msg: Message, value: Any, where: str, rows: int, cols: int) -> list[list[float]]:
    if not isinstance(value, list) or len(value) != rows:
        raise _fail(msg, f"{where} must be a {rows}x{cols} list of numbers")
    out = []
    for row in value:
        if not isinstance(row, list) or len(row) != cols:
            raise _fail(msg, f"{where} must be a {rows}x{cols} list of numbers")
        out.append([_number(msg, x, where, -1e7, 1e7) for x in row])
    return out


def job_id_ok(value: Any) -> bool:
    return isinstance(value, str) and bool(JOB_ID_RE.match(value))


def _job(msg: Message, payload: dict) -> str:
    value = payload.get("job")
    if not job_id_ok(value):
        raise _fail(msg, "'job' must be a job id (letters, digits, '_' or '-', at most 64 characters)")
    return value


def check_relative_path(value: Any, where: str = "path", allow_empty: bool = False) -> str:
    """A '/'-separated relative path with no '..', absolute part, backslash or control character.

    The server still resolves the result against its job folder; this is the first of two fences.
    """
    if not isinstance(value, str) or len(value) > 1024:
        raise ValueError(f"{where} must be a string of at most 1024 characters")
    if value in ("", "."):
        if allow_empty:
            return ""
        raise ValueError(f"{where} must not be empty")
    if value.startswith("/") or "\\" in value or ":" in value:
        raise ValueError(f"{where} {value!r} must be relative, '/'-separated, without ':' or '\\'")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{where} contains a control character")
    parts = value.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{where} {value!r} must not contain empty, '.' or '..' parts")
    return value


def check_upload_path(value: Any, video: str) -> str:
    """Uploaded files go into the reference layout: <Folder>/<video>/[<object>/]NNNNN.png."""
    path = check_relative_path(value, "upload path")
    parts = path.split("/")
    if parts[0] not in REFERENCE_FOLDERS:
        raise ValueError(f"upload path {path!r} must start with one of {list(REFERENCE_FOLDERS)}")
    if len(parts) < 3 or parts[1] != video:
        raise ValueError(f"upload path {path!r} must be <Folder>/{video}/... (the spec's video name)")
    expected = 3 if parts[0] == "JPEGImages" else 4
    if len(parts) != expected:
        shape = f"{parts[0]}/{video}/" + ("NNNNN.png" if expected == 3 else "<object>/NNNNN.png")
        raise ValueError(f"upload path {path!r} must look like {shape}")
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES) or not _NAME_RE.match(parts[-1]):
        raise ValueError(f"upload path {path!r} must name a {'/'.join(IMAGE_SUFFIXES)} file")
    if expected == 4 and not _NAME_RE.match(parts[2]):
        raise ValueError(f"upload path {path!r}: object folder {parts[2]!r} must be letters/digits")
    return path


def _override_value_ok(value: Any, depth: int) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= MAX_STRING
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, list) and depth < 3 and len(value) <= 64:
        return all(_override_value_ok(x, depth + 1) for x in value)
    return False


def validate_spec(msg: Message, spec: Any, uploaded: bool) -> dict:
    """Shape of a job spec (see backend.pipeline.run_job); content checks are the pipeline's."""
    if not isinstance(spec, dict):
        raise _fail(msg, "'spec' must be a JSON object")
    _check_keys(
        msg,
        spec,
        "spec",
        required=("input",),
        optional=("preset", "overrides", "stages", "device", "guidance", "name"),
    )
    inp = spec["input"]
    if not isinstance(inp, dict):
        raise _fail(msg, "spec.input must be an object with a 'kind'")
    kind = inp.get("kind")
    if uploaded:
        if kind != "upload":
            raise _fail(msg, "with uploaded files spec.input must be {'kind': 'upload', 'video': name}")
        _check_keys(msg, inp, "spec.input", required=("kind", "video"))
        if not isinstance(inp["video"], str) or not _NAME_RE.match(inp["video"]):
            raise _fail(msg, "spec.input.video must be a folder name (letters, digits, '.', '_', '-')")
    elif kind == "reference":
        _check_keys(msg, inp, "spec.input", required=("kind", "root", "video"))
        _string(msg, inp["root"], "spec.input.root")
        _string(msg, inp["video"], "spec.input.video", 256)
    elif kind == "folders":
        _check_keys(
            msg,
            inp,
            "spec.input",
            required=("kind", "frames", "masks"),
            optional=("inpainted", "inpainted_masks"),
        )
        for key in ("frames", "masks"):
            _string(msg, inp[key], f"spec.input.{key}")
        for key in ("inpainted", "inpainted_masks"):
            if inp.get(key) is not None:
                _string(msg, inp[key], f"spec.input.{key}")
    elif kind == "video":
        _check_keys(
            msg,
            inp,
            "spec.input",
            required=("kind", "path", "masks"),
            optional=("start", "end", "stride", "max_side", "name"),
        )
        for key in ("path", "masks"):
            _string(msg, inp[key], f"spec.input.{key}")
        if "name" in inp and not (isinstance(inp["name"], str) and _NAME_RE.match(inp["name"])):
            raise _fail(msg, "spec.input.name must be a folder name (letters, digits, '.', '_', '-')")
        for key, lo in (("start", 0), ("end", 1), ("stride", 1), ("max_side", 8)):
            if inp.get(key) is not None or (key in ("start", "stride") and key in inp):
                _int(msg, inp[key], f"spec.input.{key}", lo, 10**7)
    elif kind == "upload":
        raise _fail(msg, "spec.input.kind 'upload' needs the files as binary frames listed in 'uploads'")
    else:
        raise _fail(msg, f"spec.input.kind must be 'reference', 'folders', 'video' or 'upload', not {kind!r}")
    if "preset" in spec and not (isinstance(spec["preset"], str) and _PRESET_RE.match(spec["preset"])):
        raise _fail(msg, "spec.preset must be a preset name such as 'full', 'lite' or 'cpu-demo'")
    overrides = spec.get("overrides", {})
    if not isinstance(overrides, dict) or len(overrides) > 500:
        raise _fail(msg, "spec.overrides must be an object of at most 500 'section.key': value entries")
    for key, value in overrides.items():
        if not _OVERRIDE_KEY_RE.match(key) or len(key) > 200:
            raise _fail(msg, f"spec.overrides key {key!r} must be a dotted name like 'stage1.iters'")
        if not _override_value_ok(value, depth=0):
            raise _fail(
                msg, f"spec.overrides[{key!r}] must be a number, string, bool, null or short (nested) list"
            )
    if "stages" in spec:
        stages = spec["stages"]
        if (
            not isinstance(stages, list)
            or not stages
            or any(s not in STAGES for s in stages)
            or len(set(stages)) != len(stages)
        ):
            raise _fail(msg, f"spec.stages must be a non-empty list of distinct names from {list(STAGES)}")
    if "device" in spec and not (
        spec["device"] in DEVICES
        or (isinstance(spec["device"], str) and _CUDA_INDEX_RE.match(spec["device"]))
    ):
        raise _fail(msg, f"spec.device must be one of {list(DEVICES)} or 'cuda:N'")
    if "name" in spec:
        _string(msg, spec["name"], "spec.name", 200)
    if "guidance" in spec:
        _string(msg, spec["guidance"], "spec.guidance", 1024)
    return spec


def validate_request(msg: Message) -> Message:
    """Check a request's type and payload schema; returns the message, raises ProtocolError."""
    if msg.type not in REQUEST_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {msg.type[:64]!r}; supported: {list(REQUEST_TYPES)}",
            msg.id,
            supported_types=list(REQUEST_TYPES),
        )
    if msg.id is None:
        raise ProtocolError("bad_message", "requests need a header 'id' (echoed in the reply)")
    p = msg.payload
    t = msg.type
    if t in ("hello", "shutdown"):
        _check_keys(msg, p, "payload", optional=("client",))
        if "client" in p:
            _string(msg, p["client"], "client", 256)
    elif t == "submit":
        _check_keys(msg, p, "payload", required=("spec",), optional=("name", "uploads"))
        uploads = p.get("uploads")
        if "name" in p:
            _string(msg, p["name"], "name", 200)
        if uploads is not None:
            if not isinstance(uploads, list) or not uploads or len(uploads) > MAX_FRAMES:
                raise _fail(msg, f"'uploads' must be a non-empty list of at most {MAX_FRAMES} paths")
            if len(uploads) != len(msg.frames):
                raise _fail(
                    msg,
                    f"'uploads' lists {len(uploads)} paths but {len(msg.frames)} binary frames came with it",
                )
        elif msg.frames:
            raise _fail(msg, f"{len(msg.frames)} binary frames came without an 'uploads' list naming them")
        spec = validate_spec(msg, p["spec"], uploaded=uploads is not None)
        if uploads is not None:
            seen = set()
            for path in uploads:
                try:
                    check_upload_path(path, spec["input"]["video"])
                except ValueError as exc:
                    raise _fail(msg, str(exc)) from None
                if path in seen:
                    raise _fail(msg, f"upload path {path!r} is listed twice")
                seen.add(path)
    elif t == "status":
        _check_keys(msg, p, "payload", required=("job",))
        _job(msg, p)
    elif t == "list":
        _check_keys(msg, p, "payload", optional=("states",))
        states = p.get("states")
        if states is not None and (not isinstance(states, list) or any(s not in JOB_STATES for s in states)):
            raise _fail(msg, f"'states' must be a list of names from {list(JOB_STATES)}")
    elif t in ("cancel", "resume", "delete"):
        _check_keys(msg, p, "payload", required=("job",))
        _job(msg, p)
    elif t == "fetch":
        _check_keys(msg, p, "payload", required=("job", "path"), optional=("offset", "length"))
        _job(msg, p)
        try:
            check_relative_path(p["path"], "fetch path", allow_empty=True)
        except ValueError as exc:
            raise _fail(msg, str(exc)) from None
        if "offset" in p:
            _int(msg, p["offset"], "offset", 0, 2**62)
        if "length" in p:
            _int(msg, p["length"], "length", 1, MAX_FETCH_CHUNK)
    elif t == "render_path":
        _check_keys(
            msg, p, "payload", required=("job", "cameras"), optional=("objects", "background", "alpha")
        )
        _job(msg, p)
        cams = p["cameras"]
        if not isinstance(cams, list) or not 0 < len(cams) <= MAX_RENDER_CAMERAS:
            raise _fail(msg, f"'cameras' must be a list of 1-{MAX_RENDER_CAMERAS} cameras")
        for i, cam in enumerate(cams):
            if not isinstance(cam, dict):
                raise _fail(msg, f"cameras[{i}] must be an object")
            _check_keys(
                msg, cam, f"cameras[{i}]", required=("viewmat", "K", "width", "height"), optional=("frame",)
            )
            _matrix(msg, cam["viewmat"], f"cameras[{i}].viewmat", 4, 4)
            _matrix(msg, cam["K"], f"cameras[{i}].K", 3, 3)
            _int(msg, cam["width"], f"cameras[{i}].width", 1, MAX_RENDER_SIDE)
            _int(msg, cam["height"], f"cameras[{i}].height", 1, MAX_RENDER_SIDE)
            if "frame" in cam:
                _int(msg, cam["frame"], f"cameras[{i}].frame", 0, 10**6)
        pixels = sum(cam["width"] * cam["height"] for cam in cams)
        if pixels > MAX_RENDER_PIXELS:
            raise _fail(msg, f"{pixels} pixels in one request; at most {MAX_RENDER_PIXELS}: split the path")
        objects = p.get("objects", {})
        if not isinstance(objects, dict) or len(objects) > 1000:
            raise _fail(msg, "'objects' must be an object of object id -> adjustments")
        for oid, adj in objects.items():
            if not _NAME_RE.match(oid) or not isinstance(adj, dict):
                raise _fail(msg, f"objects[{oid[:64]!r}] must be an object keyed by an object id")
            _check_keys(msg, adj, f"objects[{oid!r}]", optional=("depth_scale", "depth_offset", "visible"))
            if "depth_scale" in adj:
                _number(msg, adj["depth_scale"], f"objects[{oid!r}].depth_scale", 1e-3, 1e3)
            if "depth_offset" in adj:
                _number(msg, adj["depth_offset"], f"objects[{oid!r}].depth_offset", -1e4, 1e4)
            if "visible" in adj:
                _bool(msg, adj["visible"], f"objects[{oid!r}].visible")
        if "background" in p:
            bg = p["background"]
            if not isinstance(bg, list) or len(bg) != 3:
                raise _fail(msg, "'background' must be [r, g, b] in [0, 1]")
            for x in bg:
                _number(msg, x, "background", 0.0, 1.0)
        if "alpha" in p:
            _bool(msg, p["alpha"], "alpha")
    return msg


def event_topic(job_id: str) -> bytes:
    return job_id.encode("utf-8")
