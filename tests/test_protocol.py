"""The wire protocol on its own: framing, versions, schemas, path fences (no sockets)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import protocol as P


def request(type_: str, payload: dict, frames=(), request_id: str = "r1") -> P.Message:
    return P.validate_request(P.decode(P.encode(type_, request_id, payload, list(frames))))


def error_of(fn, *args) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        fn(*args)
    return info.value


def test_round_trip_keeps_header_and_binary_frames():
    parts = P.encode("fetch", "abc", {"job": "j1", "path": "out/scene.json"}, [b"\x00\x01", b""])
    msg = P.decode(parts)
    assert (msg.v, msg.type, msg.id, msg.payload) == (
        1,
        "fetch",
        "abc",
        {"job": "j1", "path": "out/scene.json"},
    )
    assert msg.frames == [b"\x00\x01", b""]


def test_unsupported_version_names_the_supported_ones():
    parts = [json.dumps({"v": 7, "type": "hello", "id": "x", "payload": {}}).encode()]
    err = error_of(P.decode, parts)
    assert err.code == "unsupported_version" and err.request_id == "x"
    assert err.payload()["supported_versions"] == [1]
    # A bool is not a version even though True == 1 in Python.
    assert error_of(P.decode, [b'{"v": true, "type": "hello", "id": "x"}']).code == "unsupported_version"


def test_unknown_type_names_the_supported_ones():
    err = error_of(P.validate_request, P.decode(P.encode("explode", "x", {})))
    assert err.code == "unknown_type"
    assert err.payload()["supported_types"] == list(P.REQUEST_TYPES)
    assert "render_path" in err.message


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"", "bad_message"),
        (b"\xff\xfe", "bad_message"),
        (b"[1, 2]", "bad_message"),
        (b'{"v": 1, "type": "hello", "id": "x", "payload": {}, "extra": 1}', "bad_message"),
        (b'{"v": 1, "type": "hello", "id": 5}', "bad_message"),
        (b'{"v": 1, "type": "hello", "id": "x", "payload": NaN}', "bad_message"),
        (b"[" * 100000, "bad_message"),  # deep nesting: RecursionError must not escape
        (b'{"v": 1, "type": "hello", "id": "x", "payload": 1' + b"1" * 5000 + b"}", "bad_message"),
    ],
)
def test_malformed_headers_are_protocol_errors(raw, code):
    assert error_of(P.decode, [raw]).code == code


def test_size_limits():
    assert error_of(P.decode, [b"{}", b"x" * 2000], 1000).code == "too_large"
    assert error_of(P.decode, [b"{}"] * (P.MAX_FRAMES + 2)).code == "too_large"
    assert error_of(P.decode, [b" " * (P.MAX_HEADER_BYTES + 1)]).code == "too_large"


def test_requests_need_an_id():
    msg = P.decode([b'{"v": 1, "type": "hello", "payload": {}}'])
    assert error_of(P.validate_request, msg).code == "bad_message"


def test_render_requests_are_bounded_in_pixels():
    cam = {"viewmat": [[0] * 4] * 4, "K": [[0] * 3] * 3, "width": 4096, "height": 4096}
    err = error_of(request, "render_path", {"job": "a", "cameras": [cam] * 40})
    assert err.code == "invalid_payload" and "split the path" in err.message
    request("render_path", {"job": "a", "cameras": [cam] * 20})


@pytest.mark.parametrize(
    "type_, payload, frames, fragment",
    [
        ("status", {}, (), "missing ['job']"),
        ("status", {"job": "../etc"}, (), "job id"),
        ("status", {"job": "a", "x": 1}, (), "unknown keys ['x']"),
        ("fetch", {"job": "a", "path": "../state.json"}, (), "'..'"),
        ("fetch", {"job": "a", "path": "/etc/passwd"}, (), "relative"),
        ("fetch", {"job": "a", "path": "out\\..\\x"}, (), "relative"),
        ("fetch", {"job": "a", "path": "out", "length": 10**9}, (), "length"),
        ("submit", {"spec": {"input": {"kind": "reference", "root": "/d"}}}, (), "missing ['video']"),
        (
            "submit",
            {"spec": {"input": {"kind": "folders", "frames": "/f", "masks": "/m"}, "device": "tpu"}},
            (),
            "device",
        ),
        (
            "submit",
            {
                "spec": {
                    "input": {"kind": "reference", "root": "/d", "video": "v"},
                    "stages": ["motion", "motion"],
                }
            },
            (),
            "stages",
        ),
        (
            "submit",
            {"spec": {"input": {"kind": "reference", "root": "/d", "video": "v"}, "overrides": {"a b": 1}}},
            (),
            "dotted",
        ),
        (
            "submit",
            {
                "spec": {
                    "input": {"kind": "reference", "root": "/d", "video": "v"},
                    "overrides": {"x": {"y": 1}},
                }
            },
            (),
            "overrides",
        ),
        ("submit", {"spec": {"input": {"kind": "upload", "video": "v"}}}, (), "binary frames"),
        (
            "submit",
            {"spec": {"input": {"kind": "upload", "video": "v"}}, "uploads": ["JPEGImages/v/00000.png"]},
            (),
            "0 binary",
        ),
        (
            "submit",
            {"spec": {"input": {"kind": "upload", "video": "v"}}, "uploads": ["JPEGImages/v/../../x.png"]},
            (b"x",),
            "'..'",
        ),
        (
            "submit",
            {"spec": {"input": {"kind": "upload", "video": "v"}}, "uploads": ["JPEGImages/w/00000.png"]},
            (b"x",),
            "video name",
        ),
        (
            "submit",
            {"spec": {"input": {"kind": "upload", "video": "v"}}, "uploads": ["Annotations/v/00000.png"]},
            (b"x",),
            "<object>",
        ),
        (
            "submit",
            {"spec": {"input": {"kind": "upload", "video": "v"}}, "uploads": ["JPEGImages/v/a.exe"]},
            (b"x",),
            "png",
        ),
        ("render_path", {"job": "a", "cameras": []}, (), "cameras"),
        (
            "render_path",
            {"job": "a", "cameras": [{"viewmat": [[1]], "K": [[1]], "width": 4, "height": 4}]},
            (),
            "4x4",
        ),
        (
            "render_path",
            {
                "job": "a",
                "cameras": [{"viewmat": [[0] * 4] * 4, "K": [[0] * 3] * 3, "width": 0, "height": 4}],
            },
            (),
            "width",
        ),
        (
            "render_path",
            {
                "job": "a",
                "cameras": [{"viewmat": [[0] * 4] * 4, "K": [[0] * 3] * 3, "width": 4, "height": 4}],
                "objects": {"001": {"depth_scale": -1}},
            },
            (),
            "depth_scale",
        ),
    ],
)
def test_schema_errors_name_the_field(type_, payload, frames, fragment):
    err = error_of(request, type_, payload, frames)
    assert err.code == "invalid_payload"
    assert fragment in err.message, err.message


def test_valid_requests_pass():
    request("hello", {})
    request("list", {"states": ["done"]})
    request(
        "fetch", {"job": "20261125-101010-abcdef", "path": "out/objects/001.npz", "offset": 0, "length": 1024}
    )
    request(
        "submit",
        {
            "spec": {
                "input": {"kind": "upload", "video": "tiny"},
                "preset": "cpu-demo",
                "overrides": {"stage1.iters": 20},
            },
            "uploads": ["JPEGImages/tiny/00054.png", "Annotations/tiny/001/00054.png"],
        },
        (b"a", b"b"),
    )
    cam = {
        "viewmat": [[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1]],
        "K": [[50, 0, 32], [0, 50, 32], [0, 0, 1]],
    }
    request(
        "render_path",
        {
            "job": "j",
            "cameras": [{**cam, "width": 64, "height": 64, "frame": 3}],
            "objects": {"001": {"depth_scale": 1.2, "visible": False}},
        },
    )


@pytest.mark.parametrize("path", ["", "a/b", "objects/001.npz"])
def test_relative_paths_accepted(path):
    assert P.check_relative_path(path, allow_empty=True) == path


@pytest.mark.parametrize("path", ["..", "a/../b", "/abs", "a//b", "a/./b", "C:x", "a\\b", "a\x00b", "a\nb"])
def test_relative_paths_refused(path):
    with pytest.raises(ValueError):
        P.check_relative_path(path)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    type_=st.sampled_from(P.REQUEST_TYPES) | st.text(max_size=12),
    payload=st.dictionaries(
        st.sampled_from(
            ["job", "path", "spec", "cameras", "uploads", "offset", "length", "objects", "states", "x"]
        ),
        json_values,
        max_size=5,
    ),
    frames=st.lists(st.binary(max_size=16), max_size=3),
)
def test_arbitrary_payloads_only_raise_protocol_errors(type_, payload, frames):
    try:
        request(type_, payload, frames)
    except P.ProtocolError as err:
        assert err.code in P.ERROR_CODES


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_arbitrary_bytes_only_raise_protocol_errors(parts):
    try:
        P.validate_request(P.decode(parts))
    except P.ProtocolError as err:
        assert err.code in P.ERROR_CODES
