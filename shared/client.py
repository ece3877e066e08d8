"""Client of the backend service (stdlib + pyzmq), used by the Blender add-on and by scripts.

    client = BackendClient("tcp://127.0.0.1:5555")
    info = client.hello()
    job = client.submit({"input": {"kind": "reference", "root": "/data/davis", "video": "kid-football"},
                         "preset": "lite"})["job"]
    with client.subscribe([job]) as events:
        event = events.recv(timeout=1.0)          # None when nothing arrived in time
    client.fetch_tree(job, "out", "/tmp/scene")  # files byte-identical to the job folder

Requests go over a DEALER socket with a fresh request id each; replies with another id (left
over from a request that timed out) are dropped. After a timeout the socket is rebuilt, so a
request that never reached the server is not delivered later by surprise (the "lazy pirate"
pattern). Sockets are not thread-safe: use one client per thread, or the client's own lock,
which every call takes.

Remote servers: give `keys=CurveKeys.from_files(server_public_file, client_secret_file)`.
`python -m shared.client keygen DIR` makes a client key pair; copy the `.key` (public) file into
the server's `<state>/authorized_clients/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth

from . import protocol as P


class RemoteError(Exception):
    """The server answered with an error reply; `code` is one of protocol.ERROR_CODES."""

    def __init__(self, payload: dict):
        self.payload = payload
        self.code = payload.get("code", "internal")
        super().__init__(f"[{self.code}] {payload.get('message', '')}")


class BackendUnavailable(TimeoutError):
    """No reply in time: the server is down, unreachable, or refused our keys."""


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys (Z85 bytes) a client needs for a server bound to a non-loopback address."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_public_file: str | Path, client_secret_file: str | Path) -> CurveKeys:
        server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        client_public, client_secret = zmq.auth.load_certificate(str(client_secret_file))
        if client_secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key; pass the '.key_secret' file")
        return cls(server_public, client_public, client_secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


def generate_client_keys(directory: str | Path, name: str = "client") -> tuple[Path, Path]:
    """Write <name>.key (public, give it to the server admin) and <name>.key_secret (keep it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def collect_reference_uploads(root: str | Path, video: str) -> dict[str, bytes]:
    """Read a local reference-layout input (JPEGImages/<video>, Annotations/<video>/<obj>, ...)
    into the {relative path: bytes} mapping that `submit(uploads=...)` sends."""
    root = Path(root)
    uploads: dict[str, bytes] = {}
    for folder in P.REFERENCE_FOLDERS:
        base = root / folder / video
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix.lower() in P.IMAGE_SUFFIXES:
                uploads[path.relative_to(root).as_posix()] = path.read_bytes()
    if not any(k.startswith("JPEGImages/") for k in uploads):
        raise FileNotFoundError(f"no frames under {root / 'JPEGImages' / video}")
    return uploads


def _host_of(endpoint: str) -> str:
    return urlsplit(endpoint).hostname or "127.0.0.1"


class BackendClient:
    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5555",
        timeout: float = 10.0,
        keys: CurveKeys | None = None,
        context: zmq.Context | None = None,
    ):
        self.endpoint = endpoint
        self.timeout = timeout
        self.keys = keys
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.RLock()
        self._sock: zmq.Socket | None = None
        self._server_info: dict | None = None

    # -- socket lifecycle
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            # Queue only on completed connections (after the Curve handshake), so a request to a
            # dead or refusing server fails here instead of being delivered minutes later.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.ipv6 = "[" in self.endpoint
            if self.keys is not None:
                self.keys.apply(sock)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- generic request
    def request(
        self,
        type_: str,
        payload: dict | None = None,
        frames: list[bytes] | tuple = (),
        timeout: float | None = None,
    ) -> tuple[dict, list[bytes]]:
        """Send one request and wait for its reply; returns (payload, binary frames)."""
        timeout = self.timeout if timeout is None else timeout
        request_id = uuid.uuid4().hex
        parts = P.encode(type_, request_id, payload or {}, frames)
        with self._lock:
            sock = self._socket()
            deadline = time.monotonic() + timeout
            sock.sndtimeo = max(1, int(timeout * 1000))
            try:
                sock.send_multipart(parts, copy=len(parts) < 8)
            except zmq.Again:
                self._reset()
                raise BackendUnavailable(
                    f"could not reach {self.endpoint} within {timeout:.1f}s (server down, or it refused our keys)"
                ) from None
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                    self._reset()
                    raise BackendUnavailable(
                        f"no reply from {self.endpoint} to {type_!r} within {timeout:.1f}s"
                    )
                reply = sock.recv_multipart()
                try:
                    msg = P.decode(reply, max_message_bytes=2**62)
                except P.ProtocolError:
                    continue
                if msg.id != request_id:
                    continue  # reply to an earlier request that timed out
                if msg.type == P.ERROR:
                    raise RemoteError(msg.payload)
                return msg.payload, msg.frames

    # -- typed calls
    def hello(self, timeout: float | None = None) -> dict:
        info, _ = self.request(
            "hello",
            {"client": f"shared.client python {sys.version_info[0]}.{sys.version_info[1]}"},
            timeout=timeout,
        )
        self._server_info = info
        return info

    def submit(self, spec: dict, name: str | None = None, uploads: dict[str, bytes] | None = None) -> dict:
        payload: dict[str, Any] = {"spec": spec}
        if name is not None:
            payload["name"] = name
        frames: list[bytes] = []
        if uploads:
            payload["uploads"] = list(uploads)
            frames = [uploads[k] for k in payload["uploads"]]
        return self.request("submit", payload, frames, timeout=max(self.timeout, 60.0))[0]

    def status(self, job: str) -> dict:
        return self.request("status", {"job": job})[0]

    def list_jobs(self, states: list[str] | None = None) -> list[dict]:
        return self.request("list", {} if states is None else {"states": states})[0]["jobs"]

    def cancel(self, job: str) -> dict:
        return self.request("cancel", {"job": job})[0]

    def resume(self, job: str) -> dict:
        return self.request("resume", {"job": job}, timeout=max(self.timeout, 60.0))[0]

    def delete(self, job: str) -> dict:
        return self.request("delete", {"job": job})[0]

    def shutdown(self) -> dict:
        return self.request("shutdown", {})[0]

    def list_files(self, job: str, path: str = "") -> list[dict]:
        """Files under `path` of the job folder: [{"path": relative to the job folder, "size"}]."""
        reply, _ = self.request("fetch", {"job": job, "path": path})
        if reply.get("kind") != "dir":
            raise NotADirectoryError(f"{path!r} in job {job} is a file")
        return reply["entries"]

    def fetch_file(self, job: str, path: str, dest: str | Path, chunk: int = P.DEFAULT_FETCH_CHUNK) -> Path:
        """Download one artifact in chunks; checks size and SHA-256 against the server's."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        offset, size, digest, want = 0, None, hashlib.sha256(), None
        with open(tmp, "wb") as fh:
            while True:
                reply, frames = self.request(
                    "fetch", {"job": job, "path": path, "offset": offset, "length": chunk}
                )
                if reply.get("kind") != "file":
                    raise IsADirectoryError(f"{path!r} in job {job} is a folder; use fetch_tree")
                if offset == 0:
                    size, want = reply["size"], reply.get("sha256")
                data = frames[0] if frames else b""
                fh.write(data)
                digest.update(data)
                offset += len(data)
                if reply["eof"] or not data:
                    break
        if offset != size or (want is not None and digest.hexdigest() != want):
            tmp.unlink(missing_ok=True)
            raise OSError(
                f"{path!r} of job {job} changed or was cut short while fetching ({offset} of {size} bytes)"
            )
        os.replace(tmp, dest)
        return dest

    def fetch_tree(self, job: str, path: str, dest_dir: str | Path) -> list[Path]:
        """Download every file under `path` (relative to the job folder) into dest_dir, same layout."""
        dest_dir = Path(dest_dir)
        prefix = f"{path}/" if path else ""
        out = []
        for entry in self.list_files(job, path):
            rel = P.check_relative_path(entry["path"])
            local = dest_dir / rel[len(prefix) :] if rel.startswith(prefix) else dest_dir / rel
            out.append(self.fetch_file(job, rel, local))
        return out

    def render_path(
        self,
        job: str,
        cameras: list[dict],
        objects: dict[str, dict] | None = None,
        background: list[float] | None = None,
        alpha: bool = False,
        timeout: float = 600.0,
    ) -> list[bytes]:
        """Render the finished scene at each camera {viewmat 4x4, K 3x3, width, height, frame};
        returns one PNG (bytes) per camera."""
        payload: dict[str, Any] = {"job": job, "cameras": cameras, "alpha": alpha}
        if objects:
            payload["objects"] = objects
        if background is not None:
            payload["background"] = list(background)
        reply, frames = self.request("render_path", payload, timeout=timeout)
        if len(frames) != reply.get("frames", -1):
            raise OSError(f"render_path returned {len(frames)} frames, expected {reply.get('frames')}")
        return frames

    def events_endpoint(self) -> str:
        info = self._server_info or self.hello()
        scheme = urlsplit(self.endpoint).scheme
        host = _host_of(self.endpoint)
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{info['events_port']}"

    def subscribe(self, jobs: list[str] | None = None) -> EventSubscriber:
        return EventSubscriber(self.events_endpoint(), jobs, keys=self.keys, context=self._ctx)


class EventSubscriber:
    """Progress events of some jobs (all when `jobs` is None). Events published before the
    subscription reached the server are not replayed: call `status` to catch up."""

    def __init__(
        self,
        endpoint: str,
        jobs: list[str] | None = None,
        keys: CurveKeys | None = None,
        context: zmq.Context | None = None,
    ):
        self._jobs = None if jobs is None else set(jobs)
        self._sock = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.linger = 0
        self._sock.ipv6 = "[" in endpoint
        if keys is not None:
            keys.apply(self._sock)
        for job in jobs if jobs is not None else [""]:
            self._sock.subscribe(P.event_topic(job))
        self._sock.connect(endpoint)

    def subscribe(self, job: str) -> None:
        if self._jobs is not None:
            self._jobs.add(job)
        self._sock.subscribe(P.event_topic(job))

    def recv(self, timeout: float | None = None) -> dict | None:
        """Next event payload ({"job", "seq", "state", "event": {...}}), or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000) + 1, zmq.POLLIN):
                return None
            parts = self._sock.recv_multipart()
            try:
                msg = P.decode(parts[1:], max_message_bytes=2**62)
            except P.ProtocolError:
                continue
            job = msg.payload.get("job")
            # Topics match by prefix ("j1" also matches "j10"), so check the exact job.
            if msg.type == P.EVENT and (self._jobs is None or job in self._jobs):
                return msg.payload

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="make a client key pair for a remote (CurveZMQ) server")
    keygen.add_argument("directory")
    keygen.add_argument("--name", default="client")
    hello = sub.add_parser("hello", help="ask a server who it is")
    hello.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    hello.add_argument("--server-key", help="the server's public key file (<state>/server.key)")
    hello.add_argument("--client-key", help="this client's secret key file (.key_secret)")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        public, secret = generate_client_keys(args.directory, args.name)
        print(f"public key (copy into the server's <state>/authorized_clients/): {public}")
        print(f"secret key (keep private): {secret}")
        return 0
    keys = CurveKeys.from_files(args.server_key, args.client_key) if args.server_key else None
    with BackendClient(args.endpoint, keys=keys) as client:
        print(json.dumps(client.hello(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
