"""The backend as a ZeroMQ service: `python -m backend serve [--bind tcp://127.0.0.1:5555] [--state DIR]`.

Sockets
  ROUTER on --bind           requests (shared.protocol); every request gets exactly one reply
  PUB on the events port      progress events, topic = job id (default port: the bind port + 1)

One thread owns both sockets (ZeroMQ sockets are single-threaded). Job workers and the threads
that serve slow requests (submit validates the inputs, render_path rasterizes) hand their events
and replies to it through a queue; it sends them between polls.

Who may connect: a bind to 127.0.0.1 / ::1 / localhost (or ipc://) is open to local users only.
Any other address (0.0.0.0, a LAN address, even 127.0.0.2) turns CurveZMQ on for both sockets:
the server's key pair lives in <state>/server.key{,_secret} (made on first start) and only clients
whose public key file is in <state>/authorized_clients/ get through (ZAP; the folder is re-read
while the server runs). A client without an authorised key gets no reply at all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import fcntl
import ipaddress
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from backend.errors import InputError
from backend.jobs import OUT_DIR, JobError, JobManager, JobStore
from shared import protocol as P

log = logging.getLogger("backend.server")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_STATE = (
    Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "dreamscene4d-backend"
)
# How long a stopping server keeps reading (see BackendServer._refuse_until).
SHUTDOWN_GRACE_S = 0.5
POLL_MS = 20
AUTH_RELOAD_S = 2.0
SERVER_NAME = "dreamscene4d-backend"
KNOWN_GUIDANCE_IDS = ("ashawkey/zero123-xl-diffusers", "ashawkey/stable-zero123-diffusers")
SLOW_TYPES = ("submit", "resume", "render_path")


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach without keys: ipc://, inproc://, and tcp on
    exactly 127.0.0.1, ::1 or localhost. Other 127.x addresses count as remote on purpose: they
    are how a test (or a container's port mapping) stands in for a network address."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def events_endpoint_for(bind: str, events_port: int | None) -> str:
    parts = urlsplit(bind)
    if parts.scheme != "tcp":
        return f"{bind}.events"
    host, _, bind_port = parts.netloc.rpartition(":")
    if events_port is not None:
        port = str(events_port)
    else:  # a wildcard request port ("*") gets a wildcard events port; hello reports the real one
        port = str(int(bind_port) + 1) if bind_port.isdigit() else "*"
    return f"tcp://{host}:{port}"


def ensure_server_keys(state_dir: Path) -> tuple[bytes, bytes]:
    secret_file = state_dir / "server.key_secret"
    if not secret_file.is_file():
        zmq.auth.create_certificates(str(state_dir), "server")
        os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(str(secret_file))
    return public, secret


def _device_info() -> dict:
    try:
        import torch
    except ImportError:  # the service still answers; jobs will fail with a clear message
        return {"kind": "cpu", "gpus": [], "torch": None}
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(
                {
                    "index": index,
                    "name": torch.cuda.get_device_name(index),
                    "free_bytes": free,
                    "total_bytes": total,
                }
            )
    return {"kind": "cuda" if gpus else "cpu", "gpus": gpus, "torch": torch.__version__}


def _available_models(model_dirs: list[Path]) -> dict:
    """Guidance models this server can load without a network: local diffusers folders given with
    --models-dir, and the known hub ids that are in the Hugging Face cache."""
    local = []
    for base in model_dirs:
        candidates = [base, *sorted(p for p in base.iterdir() if p.is_dir())] if base.is_dir() else []
        for folder in candidates:
            if (folder / "model_index.json").is_file() or (folder / "unet").is_dir():
                local.append(str(folder))
    hub_cache = Path(
        os.environ.get(
            "HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        )
    )
    cached = [
        hub_id
        for hub_id in KNOWN_GUIDANCE_IDS
        if (hub_cache / f"models--{hub_id.replace('/', '--')}").is_dir()
    ]
    return {"guidance": ["none", *cached, *local]}


def _presets() -> list[str]:
    try:
        from backend.config import PRESETS

        return list(PRESETS)
    except ImportError:
        return []


class BackendServer:
    def __init__(
        self,
        bind: str = DEFAULT_BIND,
        state_dir: Path = DEFAULT_STATE,
        events_port: int | None = None,
        max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES,
        curve: bool | None = None,
        workers: int | None = None,
        auto_resume: bool = True,
        input_roots: list[Path] | None = None,
        model_dirs: list[Path] | None = None,
        ray_address: str | None = None,
    ):
        self.bind = bind
        self.events_bind = events_endpoint_for(bind, events_port)
        self.state_dir = Path(state_dir).resolve()
        self.max_message_bytes = max_message_bytes
        self.curve = (not is_loopback_endpoint(bind)) if curve is None else curve
        self.input_roots = [Path(p).resolve() for p in input_roots or []]
        self.model_dirs = [Path(p) for p in model_dirs or []]
        self._outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._slow = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="slow-request")
        self._render = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="render-path")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.state_dir / "server.lock", "w")  # noqa: SIM115 (held for the server's life)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another server is already using the state folder {self.state_dir}") from None
        self.store = JobStore(self.state_dir / "jobs")
        run_job, self.ray_executor = self._run_job, None
        if ray_address:
            # Jobs run as Ray tasks that pick their own GPUs; the worker threads here only drive them.
            from functools import partial

            from backend.distributed import RayExecutor

            self.ray_executor = RayExecutor(ray_address)
            run_job = partial(self._run_job, executor=self.ray_executor)
            gpus = int(self.ray_executor.ray.cluster_resources().get("GPU", 0))
            slots = [None] * (workers if workers is not None else max(2, gpus))
        else:
            slots = self._device_slots(workers)
        self.jobs = JobManager(self.store, run_job, self._publish, slots, auto_resume=auto_resume)
        self.events_port: int | None = None

    @staticmethod
    def _device_slots(workers: int | None) -> list[int | None]:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        n = workers if workers is not None else max(1, count)
        if count > 1 and n > 1:
            return [i % count for i in range(n)]
        return [None] * n

    @staticmethod
    def _run_job(*args, **kwargs) -> dict:
        from backend.pipeline import run_job

        return run_job(*args, **kwargs)

    def _validate_job(self, spec: dict) -> None:
        from backend.pipeline import validate_job

        if self.input_roots:
            self._check_input_roots(spec)
        validate_job(spec)

    def _check_input_roots(self, spec: dict) -> None:
        inp = spec["input"]
        # Every path-valued field of every input kind: a field left out here would let a client
        # make the server read files outside its input roots.
        keys = {
            "reference": ("root",),
            "folders": ("frames", "masks", "inpainted", "inpainted_masks"),
            "video": ("path", "masks"),
        }.get(inp["kind"], ())
        jobs_root = self.store.root.resolve()
        for key in keys:
            if not inp.get(key):
                continue
            path = Path(inp[key]).resolve()
            allowed = [*self.input_roots, jobs_root]
            if not any(path == root or root in path.parents for root in allowed):
                raise InputError(
                    f"spec.input.{key} {inp[key]} is outside the folders this server reads "
                    f"({', '.join(map(str, self.input_roots))}); upload the images instead or start the "
                    "server with --input-root"
                )

    # -- cross-thread hand-off
    def _publish(self, job_id: str, payload: dict) -> None:
        self._outbox.put(("pub", job_id, P.encode(P.EVENT, job_id, payload)))

    def _reply_later(self, identity: bytes, parts: list[bytes]) -> None:
        self._outbox.put(("reply", identity, parts))

    # -- main loop
    def serve_forever(self, ready: threading.Event | None = None) -> None:
        ctx = zmq.Context()
        auth = None
        router = ctx.socket(zmq.ROUTER)
        pub = ctx.socket(zmq.PUB)
        try:
            for sock in (router, pub):
                sock.linger = 0
                sock.ipv6 = "[" in self.bind  # an IPv6 literal needs the socket's IPv6 mode
                sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
                sock.sndtimeo = 1000
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished clients are dropped
            pub.setsockopt(zmq.SNDHWM, 10000)
            authorized = self.state_dir / "authorized_clients"
            auth_signature = None
            if self.curve:
                public, secret = ensure_server_keys(self.state_dir)
                authorized.mkdir(exist_ok=True)
                auth = ThreadAuthenticator(ctx, log=logging.getLogger("backend.server.auth"))
                auth.start()
                auth_signature = self._configure_auth(auth, authorized, None)
                for sock in (router, pub):
                    sock.curve_secretkey = secret
                    sock.curve_publickey = public
                    sock.curve_server = True
            router.bind(self.bind)
            pub.bind(self.events_bind)
            self.events_port = int(urlsplit(pub.last_endpoint.decode()).port or 0) or None
            self._write_server_info(router.last_endpoint.decode(), pub.last_endpoint.decode())
            self.jobs.start()
            log.info(
                "serving on %s (events %s), state %s, curve %s",
                router.last_endpoint.decode(),
                pub.last_endpoint.decode(),
                self.state_dir,
                "on" if self.curve else "off (loopback)",
            )
            if ready is not None:
                ready.set()
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            next_auth_check = time.monotonic() + AUTH_RELOAD_S
            while not self._stop.is_set():
                if poller.poll(POLL_MS):
                    for _ in range(1000):
                        try:
                            parts = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(router, parts)
                self._drain_outbox(router, pub)
                if auth is not None and time.monotonic() > next_auth_check:
                    next_auth_check = time.monotonic() + AUTH_RELOAD_S
                    auth_signature = self._configure_auth(auth, authorized, auth_signature)
            self._drain_outbox(router, pub)
            self._refuse_until(router, time.monotonic() + SHUTDOWN_GRACE_S)
        finally:
            self.jobs.stop()
            self._slow.shutdown(wait=False, cancel_futures=True)
            self._render.shutdown(wait=False, cancel_futures=True)
            self._drain_outbox(router, pub)
            # A short linger lets the reply to `shutdown` (and the last events) leave the host.
            router.close(linger=1000)
            pub.close(linger=1000)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._lock_file.close()
            log.info("stopped")

    @staticmethod
    def _refuse_until(router: zmq.Socket, deadline: float) -> None:
        """Answer what still arrives with a `conflict` error until `deadline`.

        Without this pause, on a loaded machine the reply to `shutdown` sometimes never reached
        its client (1 of 3 test runs beside a CPU hog; 0 of 12 with it), although the server had
        queued it and closed with a linger.  The likely cause is the process exiting before the
        client read the reply, with the kernel resetting the connection.
        """
        while (left := deadline - time.monotonic()) > 0:
            if not router.poll(max(1, int(left * 1000))):
                continue
            try:
                parts = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            try:
                request_id = P.decode(parts[1:], 2**62).id
            except P.ProtocolError:
                request_id = None
            error = P.ProtocolError("conflict", "the server is shutting down", request_id)
            try:
                router.send_multipart([parts[0], *P.encode_error(request_id, error)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    @staticmethod
    def _configure_auth(auth: ThreadAuthenticator, folder: Path, previous) -> tuple:
        signature = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.key")))
        if signature != previous:
            auth.configure_curve(domain="*", location=str(folder))
            log.info("authorized client keys: %d", len(signature))
        return signature

    def _write_server_info(self, endpoint: str, events: str) -> None:
        info = {"pid": os.getpid(), "endpoint": endpoint, "events_endpoint": events, "curve": self.curve}
        if self.curve:
            info["server_public_key_file"] = str(self.state_dir / "server.key")
        (self.state_dir / "server.json").write_text(json.dumps(info, indent=1))

    def stop(self) -> None:
        self._stop.set()

    def _drain_outbox(self, router: zmq.Socket, pub: zmq.Socket) -> None:
        while True:
            try:
                kind, address, parts = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "pub":
                    pub.send_multipart([P.event_topic(address), *parts], zmq.NOBLOCK)
                else:
                    router.send_multipart([address, *parts], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # full queue or vanished peer: drop, never block the loop
                log.debug("dropped an outgoing %s message: %s", kind, exc)

    def _handle(self, router: zmq.Socket, parts: list[bytes]) -> None:
        identity, body = parts[0], parts[1:]
        request_id = None
        try:
            msg = P.decode(body, self.max_message_bytes)
            request_id = msg.id
            P.validate_request(msg)
            if msg.type in SLOW_TYPES:
                pool = self._render if msg.type == "render_path" else self._slow
                pool.submit(self._serve_later, identity, msg)
                return
            reply, frames = self._dispatch(msg)
            out = P.encode(P.REPLY, msg.id, reply, frames)
        except Exception as exc:  # every failure becomes an error reply; the loop keeps going
            error = self._as_protocol_error(exc, request_id)
            out = P.encode_error(error.request_id or request_id, error)
        try:
            router.send_multipart([identity, *out], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("could not reply: %s", exc)

    def _serve_later(self, identity: bytes, msg: P.Message) -> None:
        try:
            reply, frames = self._dispatch(msg)
            out = P.encode(P.REPLY, msg.id, reply, frames)
        except Exception as exc:
            out = P.encode_error(msg.id, self._as_protocol_error(exc, msg.id))
        self._reply_later(identity, out)

    @staticmethod
    def _as_protocol_error(exc: Exception, request_id: str | None) -> P.ProtocolError:
        if isinstance(exc, P.ProtocolError):
            return exc
        if isinstance(exc, JobError):
            return P.ProtocolError(exc.code, str(exc), request_id)
        if isinstance(exc, InputError):
            return P.ProtocolError("invalid_input", str(exc), request_id)
        log.exception("request %s failed", request_id)
        return P.ProtocolError("internal", f"{type(exc).__name__}: {exc}", request_id)

    # -- handlers: each returns (reply payload, binary frames)
    def _dispatch(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        return getattr(self, f"_on_{msg.type}")(msg)

    def _on_hello(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        device = _device_info()
        return {
            "server": SERVER_NAME,
            "versions": list(P.SUPPORTED_VERSIONS),
            "types": list(P.REQUEST_TYPES),
            "device": device["kind"],
            "gpus": device["gpus"],
            "torch": device["torch"],
            "models": _available_models(self.model_dirs),
            "presets": _presets(),
            "max_message_bytes": self.max_message_bytes,
            "max_fetch_chunk": P.MAX_FETCH_CHUNK,
            "events_port": self.events_port,
            "curve": self.curve,
            "jobs": self.jobs.counts(),
        }, []

    def _on_submit(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        payload = msg.payload
        uploads = dict(zip(payload.get("uploads", []), msg.frames))
        state = self.jobs.submit(payload["spec"], payload.get("name"), uploads, self._validate_job)
        return {
            "job": state["id"],
            "state": state["state"],
            "queue_position": state.get("queue_position", 0),
        }, []

    def _on_status(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        return self.jobs.status(msg.payload["job"]), []

    def _on_list(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        return {"jobs": self.jobs.list(msg.payload.get("states"))}, []

    def _on_cancel(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        state = self.jobs.cancel(msg.payload["job"])
        return {
            "job": state["id"],
            "state": state["state"],
            "cancel_requested": "cancel_requested" in state,
        }, []

    def _on_resume(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        state = self.jobs.resume(msg.payload["job"], self._validate_job)
        return {"job": state["id"], "state": state["state"]}, []

    def _on_delete(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        return self.jobs.delete(msg.payload["job"]), []

    def _on_fetch(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        p = msg.payload
        job_id, relative = p["job"], p["path"]
        self.jobs.status(job_id)  # not_found for unknown jobs
        target = self.store.artifact(job_id, relative)
        if target.is_dir():
            return {"kind": "dir", "path": relative, "entries": self.store.list_files(job_id, relative)}, []
        offset = p.get("offset", 0)
        length = min(p.get("length", P.DEFAULT_FETCH_CHUNK), P.MAX_FETCH_CHUNK, self.max_message_bytes // 2)
        with open(target, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            reply = {"kind": "file", "path": relative, "size": size, "offset": offset}
            if offset == 0:
                import hashlib

                digest = hashlib.sha256()
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                reply["sha256"] = digest.hexdigest()
            fh.seek(offset)
            data = fh.read(length)
        reply["length"] = len(data)
        reply["eof"] = offset + len(data) >= size
        return reply, [data]

    def _on_render_path(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        from backend.render_path import render_path

        p = msg.payload
        state = self.jobs.status(p["job"])
        scene_dir = self.store.job_dir(p["job"]) / OUT_DIR
        if not (scene_dir / "scene.json").is_file():
            raise JobError("conflict", f"job {p['job']} has no scene yet (it is {state['state']})")
        try:
            pngs = render_path(
                scene_dir, p["cameras"], p.get("objects"), p.get("background"), p.get("alpha", False)
            )
        except ValueError as exc:
            raise P.ProtocolError("invalid_payload", f"render_path: {exc}", msg.id) from None
        return {"frames": len(pngs), "format": "png"}, pngs

    def _on_shutdown(self, msg: P.Message) -> tuple[dict, list[bytes]]:
        # The reply is sent before the loop notices the flag; the running job becomes interrupted.
        log.info("shutdown requested by a client")
        self._stop.set()
        return {"stopping": True, "running": self.jobs.list(["running"])}, []


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        help="request endpoint (default %(default)s; non-loopback => CurveZMQ)",
    )
    p.add_argument(
        "--events-port", type=int, default=None, help="PUB port for progress events (default: bind port + 1)"
    )
    p.add_argument(
        "--state", type=Path, default=DEFAULT_STATE, help="job store and keys (default %(default)s)"
    )
    p.add_argument(
        "--max-message-mb",
        type=float,
        default=P.DEFAULT_MAX_MESSAGE_BYTES / 2**20,
        help="largest request accepted, uploads included (default %(default)s)",
    )
    p.add_argument("--curve", action="store_true", help="require CurveZMQ keys even on a loopback bind")
    p.add_argument("--workers", type=int, default=None, help="jobs run at once (default: one per GPU, or 1)")
    p.add_argument(
        "--no-auto-resume", action="store_true", help="leave interrupted jobs for an explicit 'resume'"
    )
    p.add_argument(
        "--input-root", type=Path, action="append", default=[], help="only read input paths under this folder"
    )
    p.add_argument(
        "--models-dir", type=Path, action="append", default=[], help="folder of local guidance models"
    )
    p.add_argument(
        "--ray",
        default=None,
        metavar="auto|ADDRESS",
        help="run jobs on a Ray cluster, per-object stages one GPU each (--workers: jobs driven at once)",
    )
    p.add_argument("--log-level", default="INFO")


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = BackendServer(
            bind=args.bind,
            state_dir=args.state,
            events_port=args.events_port,
            max_message_bytes=int(args.max_message_mb * 2**20),
            curve=True if args.curve else None,
            workers=args.workers,
            auto_resume=not args.no_auto_resume,
            input_roots=args.input_root,
            model_dirs=args.models_dir,
            ray_address=args.ray,
        )
    except (RuntimeError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck server is waiting on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if server.curve:
        ensure_server_keys(server.state_dir)
        print(
            f"CurveZMQ on: give clients {server.state_dir / 'server.key'}; authorise clients by copying "
            f"their .key files into {server.state_dir / 'authorized_clients'}",
            flush=True,
        )
    try:
        server.serve_forever()
    except zmq.ZMQError as exc:
        print(f"error: cannot serve on {args.bind}: {exc}", file=sys.stderr)
        return 2
    return 0
