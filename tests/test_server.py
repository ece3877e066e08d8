"""The backend service over real ZeroMQ sockets on loopback, running the real pipeline on CPU.

One server process (`python -m backend serve`) is shared by most tests of this module; the
SIGKILL test starts its own, and the CurveZMQ test serves on 127.0.0.2 from a thread.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared import protocol as P
from shared.client import (
    BackendClient,
    BackendUnavailable,
    CurveKeys,
    EventSubscriber,
    RemoteError,
    collect_reference_uploads,
    generate_client_keys,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_MESSAGE_MB = 1  # small, so oversized messages are cheap to make and fetches take several chunks

# The cpu-demo preset cut down to seconds: the real stages, very few steps on tiny crops.
TINY = {
    "crop_size": 48,
    "stage1.reference_size": 48,
    "stage1.iters": 4,
    "stage1.num_gaussians": 200,
    "stage1.placement_iters": 3,
    "stage1.placement_max_side": 96,
    "stage1.densify.interval": 1000,
    "stage2.steps_per_frame": 1,
    "stage2.frames_per_step": 2,
    "stage2.placement_iters": 3,
    "stage2.joint_iters": 1,
    "stage2.knn": 4,
    "stage2.deformation.spatial_resolutions": [8],
    "stage3.k_sweep_steps": 4,
    "stage3.render_long_side": 48,
    "stage3.loops": 1,
    "stage3.track_grid": 4,
}


def one_object(video):
    """The tiny video with only its first object (half the optimisation work)."""
    shutil.rmtree(video.masks_dir / "002")
    return video


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p with p and p + 1 both free (requests and events)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


class ServerProcess:
    def __init__(self, state: Path, host: str = "127.0.0.1", extra: tuple = ()):
        self.state = state
        self.port = free_port_pair(host)
        self.endpoint = f"tcp://{host}:{self.port}"
        self.log = open(state.parent / f"{state.name}-server-{self.port}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "backend", "serve", "--bind", self.endpoint, "--state", str(state)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "WARNING", *extra], cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        with BackendClient(self.endpoint, timeout=1.0) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"server exited: {self.read_log()}"
                try:
                    return client.hello()
                except BackendUnavailable:
                    continue
        raise AssertionError(f"server did not answer within {timeout}s: {self.read_log()}")

    def read_log(self, tail: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-tail:]

    def stacks(self) -> str:
        """The server's log ending with every thread's stack (the server dumps them on SIGUSR1)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(2.0)
        return f"server log and thread stacks:\n{self.read_log(12000)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("server") / "state"
    proc = ServerProcess(state, extra=("--max-message-mb", str(MAX_MESSAGE_MB)))
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with BackendClient(server.endpoint, timeout=10.0) as c:
        yield c


def wait_state(client: BackendClient, job: str, states: tuple, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.status(job)
        if status["state"] in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} is {status['state']} after {timeout}s: {status.get('error')}")
        time.sleep(0.1)


def wait_event(sub: EventSubscriber, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = sub.recv(timeout=max(0.01, deadline - time.monotonic()))
        if event is not None and predicate(event):
            return event
    raise AssertionError(f"no matching event within {timeout}s")


def reference_spec(video, **extra) -> dict:
    return {
        "input": {"kind": "reference", "root": str(video.root), "video": video.name},
        "preset": "cpu-demo",
        **extra,
    }


# ----------------------------------------------------------------------------- a job end to end


def test_uploaded_job_runs_to_done_and_fetches_byte_identical(server, client, tiny_video, tmp_path):
    video = tiny_video(num_frames=3)
    info = client.hello()
    assert info["versions"] == [1] and info["device"] == "cpu" and "cpu-demo" in info["presets"]
    assert info["max_message_bytes"] == MAX_MESSAGE_MB * 2**20 and not info["curve"]
    uploads = collect_reference_uploads(video.root, video.name)
    assert len(uploads) == 3 * 3  # 3 frames + 2 objects x 3 masks
    with client.subscribe() as events:
        time.sleep(0.3)  # let the subscription reach the PUB socket before anything is published
        job = client.submit(
            {"input": {"kind": "upload", "video": video.name}, "preset": "cpu-demo", "overrides": TINY},
            name="tiny",
            uploads=uploads,
        )["job"]
        seen = []
        final = wait_event(
            events, lambda e: e["job"] == job and (seen.append(e) or e["state"] in P.FINAL_STATES), 120
        )
    status = client.status(job)
    assert final["state"] == "done", status.get("error")
    kinds = [e["event"]["type"] for e in seen]
    assert kinds[0] == "state" and seen[0]["event"]["state"] in ("queued", "running")
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
    progress = [e["event"] for e in seen if e["event"]["type"] == "progress"]
    assert {p["stage"] for p in progress} >= {"static", "motion"}
    assert all(
        0 <= p["step"] <= p["total"] and isinstance(p["losses"], dict) and "eta_s" in p for p in progress
    )
    done_stages = [
        (e["event"]["object"], e["event"]["stage"]) for e in seen if e["event"]["type"] == "stage_done"
    ]
    assert {
        ("001", "static"),
        ("002", "static"),
        ("001", "motion"),
        ("002", "motion"),
        (None, "compose"),
    } <= set(done_stages)
    # Catch-up: status holds the last progress of each object/stage and every finished stage.
    assert "001/static" in status["progress"] and len(status["stages_done"]) == len(done_stages)

    # The uploaded images landed in the job folder in the reference layout, unchanged.
    job_dir = server.state / "jobs" / job
    for relative, data in uploads.items():
        assert (job_dir / "input" / relative).read_bytes() == data

    # Fetch the whole out folder over the socket (1 MiB messages: big files come in chunks).
    fetched = client.fetch_tree(job, "out", tmp_path / "fetched")
    local = sorted(
        p.relative_to(job_dir / "out").as_posix() for p in (job_dir / "out").rglob("*") if p.is_file()
    )
    assert sorted(p.relative_to(tmp_path / "fetched").as_posix() for p in fetched) == local
    assert "scene.json" in local and any(p.startswith("objects/") and p.endswith(".npz") for p in local)
    for relative in local:
        assert (tmp_path / "fetched" / relative).read_bytes() == (job_dir / "out" / relative).read_bytes(), (
            relative
        )
    npz = next(p for p in local if p.endswith(".npz"))
    small_chunks = client.fetch_file(job, f"out/{npz}", tmp_path / "chunked.npz", chunk=4096)
    assert small_chunks.read_bytes() == (job_dir / "out" / npz).read_bytes()

    # Artifact paths never leave the job folder, not even through a symlink planted inside it.
    (job_dir / "out" / "escape").symlink_to(server.state)
    with pytest.raises(RemoteError) as err:
        client.fetch_file(job, "out/escape/server.json", tmp_path / "x")
    assert err.value.code == "invalid_payload" and "leaves the job folder" in str(err.value)
    assert not any(e["path"].startswith("out/escape") for e in client.list_files(job, "out"))
    with pytest.raises(RemoteError) as err:
        client.request("fetch", {"job": job, "path": "../server.json"})
    assert err.value.code == "invalid_payload"

    check_render_path(client, job, tmp_path / "fetched")


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.float64) / 255.0


def check_render_path(client: BackendClient, job: str, scene_dir: Path) -> None:
    scene = json.loads((scene_dir / "scene.json").read_text())
    width, height = scene["image_size"]
    viewmat, K = np.array(scene["camera"]["viewmat"]), np.array(scene["camera"]["K"])
    turned = viewmat.copy()
    angle = np.radians(40.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    turned[:3, :3] = viewmat[:3, :3] @ rotation  # a camera looking from elsewhere
    cams = [
        {"viewmat": m.tolist(), "K": K.tolist(), "width": width, "height": height, "frame": f}
        for m, f in ((viewmat, 0), (turned, 0), (viewmat, scene["num_frames"] - 1))
    ]
    plain = [decode_png(p) for p in client.render_path(job, cams, background=[1.0, 1.0, 1.0])]
    assert plain[0].shape == (height, width, 3) and plain[0].min() < 0.9  # something was drawn on white
    pushed = [
        decode_png(p)
        for p in client.render_path(
            job, cams, objects={"001": {"depth_scale": 1.6}}, background=[1.0, 1.0, 1.0]
        )
    ]
    # Scaling along the input camera's rays (positions and sizes by k) keeps that view the same,
    # and moves the object as seen from a turned camera.
    assert np.abs(pushed[0] - plain[0]).mean() < 0.01
    assert np.abs(pushed[1] - plain[1]).mean() > 3 * np.abs(pushed[0] - plain[0]).mean() + 1e-3
    hidden = client.render_path(
        job, cams[:1], objects={o["id"]: {"visible": False} for o in scene["objects"]}, alpha=True
    )
    rgba = decode_png(hidden[0])
    assert rgba.shape == (height, width, 4) and rgba[..., 3].max() == 0.0
    with pytest.raises(RemoteError) as err:
        client.render_path(job, [{**cams[0], "frame": scene["num_frames"]}])
    assert err.value.code == "invalid_payload" and "frame" in str(err.value)


def test_bad_inputs_are_refused_before_queueing(client, tiny_video):
    video = tiny_video(num_frames=3, name="broken")
    (video.masks_dir / "002" / f"{video.frame_names[1]}.png").unlink()
    before = len(client.list_jobs())
    with pytest.raises(RemoteError) as err:
        client.submit(reference_spec(video, overrides=TINY))
    assert err.value.code == "invalid_input" and video.frame_names[1] in str(err.value)
    uploads = collect_reference_uploads(video.root, video.name)
    uploads["JPEGImages/broken/00099.png"] = b"GIF89a not an image"
    with pytest.raises(RemoteError) as err:
        client.submit({"input": {"kind": "upload", "video": "broken"}}, uploads=uploads)
    assert err.value.code == "invalid_input" and "00099.png" in str(err.value)
    assert len(client.list_jobs()) == before


# ----------------------------------------------------------------------------- events and cancel


def test_two_subscribers_see_events_and_cancel_is_fast(server, client, tiny_video):
    video = one_object(tiny_video(num_frames=3, name="long"))
    overrides = {**TINY, "stage2.steps_per_frame": 100000}  # stage 2 would run for hours
    with client.subscribe() as first, client.subscribe() as second:
        time.sleep(0.3)
        job = client.submit(reference_spec(video, overrides=overrides))["job"]

        def in_motion(e: dict) -> bool:
            return (
                e["job"] == job and e["event"].get("stage") == "motion" and e["event"]["type"] == "progress"
            )

        a = wait_event(first, in_motion, 90)
        b = wait_event(second, in_motion, 10)
        assert a["event"]["object"] == b["event"]["object"] == "001"
        t0 = time.monotonic()
        assert client.cancel(job)["cancel_requested"]
        wait_event(first, lambda e: e["job"] == job and e["state"] == "cancelled", 2.0)
        assert time.monotonic() - t0 < 2.0
        wait_event(second, lambda e: e["job"] == job and e["state"] == "cancelled", 1.0)
    assert client.status(job)["state"] == "cancelled"
    out = server.state / "jobs" / job / "out"
    assert (out / "checkpoints" / "001" / "static.pt").is_file()  # kept after the cancel
    with pytest.raises(RemoteError) as err:
        client.cancel(job)
    assert err.value.code == "conflict"
    # Resume puts it back in the queue; a running job cannot be deleted, a cancelled one can.
    assert client.resume(job)["state"] == "queued"
    wait_state(client, job, ("running",), 10)
    with pytest.raises(RemoteError) as err:
        client.delete(job)
    assert err.value.code == "conflict"
    client.cancel(job)
    wait_state(client, job, ("cancelled",), 2.0)
    assert client.delete(job)["deleted"]
    assert not (server.state / "jobs" / job).exists()
    with pytest.raises(RemoteError) as err:
        client.status(job)
    assert err.value.code == "not_found"


def test_jobs_run_one_at_a_time_in_submission_order(client, tiny_video):
    video = tiny_video(num_frames=3, name="order")
    spec = reference_spec(video, overrides={**TINY, "stage1.iters": 100000}, stages=["static"])
    jobs = [client.submit(spec)["job"] for _ in range(3)]
    wait_state(client, jobs[0], ("running",), 10)
    assert [client.status(j)["state"] for j in jobs] == ["running", "queued", "queued"]
    assert client.status(jobs[2])["queue_position"] == 1
    client.cancel(jobs[1])  # a queued job is cancelled at once
    assert client.status(jobs[1])["state"] == "cancelled"
    client.cancel(jobs[0])
    wait_state(client, jobs[2], ("running",), 3.0)
    client.cancel(jobs[2])
    wait_state(client, jobs[2], ("cancelled",), 2.0)
    for job in jobs:
        client.delete(job)


# ----------------------------------------------------------------------------- fuzzing


def _assert_answers_hello(endpoint: str) -> None:
    with BackendClient(endpoint, timeout=5.0) as fresh:
        info = fresh.hello()
    assert info["server"] == "dreamscene4d-backend" and info["versions"] == [1]


def test_fuzzed_messages_leave_the_server_answering(server, client):
    ctx = zmq.Context.instance()
    rng = random.Random(4)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.endpoint)
    try:
        # 1. Random bytes, truncated valid messages, too many frames, too many bytes in total:
        #    each gets exactly one error reply.
        valid = [
            P.encode("status", "r", {"job": "nope"}),
            P.encode("fetch", "r", {"job": "nope", "path": "out/scene.json", "offset": 0}),
            P.encode(
                "render_path",
                "r",
                {
                    "job": "nope",
                    "cameras": [
                        {"viewmat": [[1, 0, 0, 0]] * 4, "K": [[1, 0, 0]] * 3, "width": 8, "height": 8}
                    ],
                },
            ),
        ]
        batch = []
        for i in range(1500):
            if i % 3 == 0:
                parts = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 4))]
            elif i % 3 == 1:
                parts = list(rng.choice(valid))
                parts[0] = parts[0][: rng.randint(0, len(parts[0]) - 1)]
            else:
                header = bytearray(rng.choice(valid)[0])
                for _ in range(rng.randint(1, 4)):
                    header[rng.randrange(len(header))] = rng.randrange(256)
                parts = [bytes(header)]
            batch.append(parts)
        batch.append([P.encode("hello", "r", {})[0]] + [b""] * (P.MAX_FRAMES + 1))
        batch.append(
            [P.encode("hello", "r", {})[0]] + [b"x" * (400 * 1024)] * 3
        )  # 1.2 MiB in frames of 400 KiB
        for parts in batch:
            sock.send_multipart(parts)
        replies = []
        deadline = time.monotonic() + 30
        while len(replies) < len(batch) and time.monotonic() < deadline:
            if sock.poll(1000):
                replies.append(P.decode(sock.recv_multipart()))
        assert len(replies) == len(batch)
        assert all(r.type in (P.ERROR, P.REPLY) for r in replies)
        codes = {r.payload.get("code") for r in replies if r.type == P.ERROR}
        assert {"bad_message", "too_large"} <= codes

        # 2. Structured requests with random payloads: each reply matches its request id.
        json_values = st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=30),
            lambda inner: (
                st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
            ),
            max_leaves=25,
        )
        keys = [
            "job",
            "path",
            "spec",
            "cameras",
            "uploads",
            "offset",
            "length",
            "objects",
            "states",
            "input",
            "v",
        ]
        types = [t for t in P.REQUEST_TYPES if t != "shutdown"] + ["", "HELLO", "event"]
        counter = iter(range(10**9))

        @settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            version=st.sampled_from([1, 1, 1, 0, 2, "1", None, 1.0]),
            type_=st.sampled_from(types) | st.text(max_size=10),
            payload=st.dictionaries(st.sampled_from(keys), json_values, max_size=4) | json_values,
            frames=st.lists(st.binary(max_size=40), max_size=3),
        )
        def one(version, type_, payload, frames):
            request_id = f"fz{next(counter)}"
            header = {"v": version, "type": type_, "id": request_id, "payload": payload}
            sock.send_multipart([json.dumps(header).encode(), *frames])
            assert sock.poll(10000), f"no reply to {header}"
            reply = P.decode(sock.recv_multipart())
            assert reply.id == request_id and reply.type in (P.ERROR, P.REPLY)
            if reply.type == P.ERROR:
                assert reply.payload["code"] in P.ERROR_CODES and reply.payload["message"]

        one()
    finally:
        sock.close(0)

    # 3. Frames over the socket-level limit (zmq MAXMSGSIZE): the server drops that connection.
    big = ctx.socket(zmq.DEALER)
    big.linger = 0
    big.connect(server.endpoint)
    big.send_multipart([P.encode("hello", "big", {})[0], b"x" * (MAX_MESSAGE_MB * 2**20 + 1)])
    assert not big.poll(500)
    big.close(0)

    assert server.proc.poll() is None
    _assert_answers_hello(server.endpoint)
    with pytest.raises(RemoteError) as err:
        client.request("explode", {})
    assert err.value.code == "unknown_type" and err.value.payload["supported_types"] == list(P.REQUEST_TYPES)


# ----------------------------------------------------------------------------- crash and resume


def test_sigusr1_dumps_thread_stacks_and_keeps_serving(server, client):
    before = len(server.read_log(10**7))
    dump = server.stacks()[-(len(server.read_log(10**7)) - before) :]
    assert "most recent call first" in dump and "serve_forever" in dump
    assert client.hello()["server"]


def test_sigkill_during_stage2_resumes_from_stage1_checkpoints(tmp_path, tiny_video):
    video = one_object(tiny_video(num_frames=3, name="crash"))
    state = tmp_path / "state"
    first = ServerProcess(state)
    try:
        first.wait_ready()
        with BackendClient(first.endpoint) as client, client.subscribe() as events:
            time.sleep(0.3)
            job = client.submit(reference_spec(video, overrides=TINY))["job"]
            wait_event(events, lambda e: e["job"] == job and e["event"].get("stage") == "motion", 90)
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait(10)
    finally:
        first.stop()
    checkpoints = state / "jobs" / job / "out" / "checkpoints"
    static_mtimes = {p: p.stat().st_mtime_ns for p in checkpoints.glob("*/static.pt")}
    assert len(static_mtimes) == 1
    assert json.loads((state / "jobs" / job / "state.json").read_text())["state"] == "running"

    second = ServerProcess(state, extra=("--log-level", "INFO"))
    try:
        second.wait_ready()
        with BackendClient(second.endpoint) as client:
            status = wait_state(client, job, P.FINAL_STATES, 120)
            assert status["state"] == "done", status.get("error")
            states = [h["state"] for h in status["history"]]
            assert states[-4:] == ["interrupted", "queued", "running", "done"]
            # Stage 1 finished once, before the kill; stage 2 and 3 finished after the restart.
            finished = [e["stage"] for e in status["stages_done"]]
            assert finished.count("static") == 1 and finished[-2:] == ["motion", "compose"]
            assert {p: p.stat().st_mtime_ns for p in checkpoints.glob("*/static.pt")} == static_mtimes
            assert (checkpoints / "001" / "motion.pt").is_file()
            assert (state / "jobs" / job / "out" / "scene.json").is_file()
            # A loaded machine can take a while to wind the worker down after a finished job.
            try:
                client.request("shutdown", {}, timeout=60.0)
            except BackendUnavailable as exc:
                raise AssertionError(f"{exc}; {second.stacks()}") from None
        try:
            assert second.proc.wait(60) == 0, second.read_log()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running 60 s after shutdown; {second.stacks()}") from None
    finally:
        second.stop()


# ----------------------------------------------------------------------------- who may connect


def test_non_loopback_bind_needs_curve_keys(tmp_path):
    from backend.server import BackendServer

    state = tmp_path / "state"
    allowed_public, allowed_secret = generate_client_keys(tmp_path / "allowed", "blender")
    other_public, other_secret = generate_client_keys(tmp_path / "other", "laptop")
    (state / "authorized_clients").mkdir(parents=True)
    shutil.copy(allowed_public, state / "authorized_clients" / allowed_public.name)
    host = "127.0.0.2"  # on the loopback interface, but not 127.0.0.1: treated as a network address
    port = free_port_pair(host)
    server = BackendServer(bind=f"tcp://{host}:{port}", state_dir=state)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"ready": ready}, daemon=True)
    thread.start()
    try:
        assert ready.wait(30)
        server_key = state / "server.key"
        assert server_key.is_file() and (state / "server.key_secret").stat().st_mode & 0o077 == 0
        endpoint = f"tcp://{host}:{port}"
        with BackendClient(endpoint, timeout=1.5) as plain:
            with pytest.raises(BackendUnavailable):
                plain.hello()
        stranger = CurveKeys.from_files(server_key, other_secret)
        with BackendClient(endpoint, timeout=1.5, keys=stranger) as refused:
            with pytest.raises(BackendUnavailable):
                refused.hello()
        keys = CurveKeys.from_files(server_key, allowed_secret)
        with BackendClient(endpoint, timeout=5.0, keys=keys) as trusted:
            info = trusted.hello()
            assert info["curve"] is True
            # Events are encrypted too: a keyless subscriber hears nothing, a trusted one does.
            with EventSubscriber(f"tcp://{host}:{info['events_port']}") as deaf, trusted.subscribe() as heard:
                time.sleep(0.5)
                server._publish(
                    "probe", {"job": "probe", "seq": 1, "state": "queued", "event": {"type": "log"}}
                )
                assert heard.recv(timeout=3.0)["job"] == "probe"
                assert deaf.recv(timeout=0.3) is None
        # The authorised-keys folder is re-read while the server runs.
        shutil.copy(other_public, state / "authorized_clients" / other_public.name)
        time.sleep(2.5)
        with BackendClient(endpoint, timeout=5.0, keys=stranger) as now_allowed:
            assert now_allowed.hello()["curve"] is True
    finally:
        server.stop()
        thread.join(15)
    assert not thread.is_alive()


def test_loopback_detection():
    from backend.server import is_loopback_endpoint

    assert is_loopback_endpoint("tcp://127.0.0.1:5555") and is_loopback_endpoint("tcp://[::1]:5555")
    assert is_loopback_endpoint("tcp://localhost:5555") and is_loopback_endpoint("ipc:///tmp/x")
    for remote in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://127.0.0.2:5555", "tcp://192.168.1.4:5555"):
        assert not is_loopback_endpoint(remote)
