"""Add-on preferences: where the backend is, keys for remote backends, and a local backend child process."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bpy
from bpy.props import IntProperty, StringProperty

ADDON_ID = __package__


def get_preferences(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon is not None else None


class BackendProcess:
    """The backend started from Blender (`python -m backend serve`); stopped when Blender quits."""

    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _log_file = None

    @classmethod
    def start(cls, python: str, working_dir: str, bind: str, state_dir: str) -> Path:
        if cls.running():
            raise RuntimeError(f"the backend is already running (pid {cls.process.pid})")
        if not python or not Path(python).is_file():
            raise FileNotFoundError(
                f"backend Python {python!r} does not exist; set it in the add-on preferences"
            )
        if not working_dir or not (Path(working_dir) / "backend").is_dir():
            raise FileNotFoundError(
                f"backend folder {working_dir!r} has no backend/ package; point it at the DreamScene4D checkout"
            )
        state = Path(state_dir) if state_dir else Path(tempfile.gettempdir()) / "dreamscene4d-state"
        state.mkdir(parents=True, exist_ok=True)
        cls.log_path = state / "backend.log"
        cls._log_file = open(cls.log_path, "ab")  # noqa: SIM115 - stays open for the child's lifetime
        command = [python, "-m", "backend", "serve", "--bind", bind, "--state", str(state)]
        cls._log_file.write(f"$ {' '.join(command)}\n".encode())
        cls._log_file.flush()
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        # Blender's own PYTHONHOME / PYTHONPATH must not leak into the backend's interpreter.
        for key in ("PYTHONHOME", "PYTHONPATH"):
            environment.pop(key, None)
        cls.process = subprocess.Popen(
            command, cwd=working_dir, stdout=cls._log_file, stderr=subprocess.STDOUT, env=environment
        )
        return cls.log_path

    @classmethod
    def running(cls) -> bool:
        return cls.process is not None and cls.process.poll() is None

    @classmethod
    def stop(cls, timeout: float = 10.0) -> int | None:
        if cls.process is None:
            return None
        if cls.process.poll() is None:
            cls.process.terminate()
            try:
                cls.process.wait(timeout)
            except subprocess.TimeoutExpired:
                cls.process.kill()
                cls.process.wait(timeout)
        code = cls.process.returncode
        cls.process = None
        if cls._log_file is not None:
            cls._log_file.close()
            cls._log_file = None
        return code

    @classmethod
    def log_tail(cls, lines: int = 30) -> list[str]:
        if cls.log_path is None or not cls.log_path.exists():
            return []
        text = cls.log_path.read_text(errors="replace").splitlines()
        return text[-lines:]


atexit.register(BackendProcess.stop)


def _default_backend_root() -> str:
    # A repository checkout has backend/ beside blender_addon/; an installed extension does not.
    here = Path(__file__).resolve().parent.parent
    return str(here) if (here / "backend").is_dir() else ""


class DS4D_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    address: StringProperty(
        name="Backend Address",
        description="ZeroMQ endpoint of the backend's request socket",
        default="tcp://127.0.0.1:5555",
    )
    server_public_key: StringProperty(
        name="Server Public Key",
        description="The server's public key file (server.key from its state folder); needed for non-loopback backends",
        subtype="FILE_PATH",
    )
    client_secret_key: StringProperty(
        name="Client Secret Key",
        description="This client's secret key file (client.key_secret; its public half goes to the server's authorized_clients/)",
        subtype="FILE_PATH",
    )
    backend_python: StringProperty(
        name="Backend Python",
        description="A Python that has the backend's dependencies installed (e.g. the checkout's .venv/bin/python)",
        subtype="FILE_PATH",
        default=sys.executable if "python" in Path(sys.executable).name.lower() else "",
    )
    backend_root: StringProperty(
        name="Backend Folder",
        description="The DreamScene4D checkout holding backend/ (the child process runs there)",
        subtype="DIR_PATH",
        default=_default_backend_root(),
    )
    state_dir: StringProperty(
        name="State Folder",
        description="The backend's job store and keys (empty: a folder in the temporary directory)",
        subtype="DIR_PATH",
    )
    request_timeout: IntProperty(name="Request Timeout (s)", default=5, min=1, max=600)

    def draw(self, context):
        layout = self.layout
        column = layout.column()
        column.prop(self, "address")
        box = column.box()
        box.label(text="Remote backends (CurveZMQ)")
        box.prop(self, "server_public_key")
        box.prop(self, "client_secret_key")
        box = column.box()
        box.label(text="Local backend process")
        box.prop(self, "backend_python")
        box.prop(self, "backend_root")
        box.prop(self, "state_dir")
        row = box.row()
        row.operator("dreamscene4d.backend_start", icon="PLAY")
        row.operator("dreamscene4d.backend_stop", icon="CANCEL")
        row.operator("dreamscene4d.backend_show_log", icon="TEXT")
        if BackendProcess.running():
            box.label(text=f"Running, pid {BackendProcess.process.pid}; log {BackendProcess.log_path}")
        elif BackendProcess.log_path is not None:
            box.label(text=f"Stopped; log {BackendProcess.log_path}")


def curve_keys(preferences):
    """CurveKeys from the preferences, or None for a loopback backend without keys."""
    if preferences is None or not preferences.server_public_key:
        return None
    from ._shared import client_module

    server = bpy.path.abspath(preferences.server_public_key)
    secret = bpy.path.abspath(preferences.client_secret_key)
    if not secret:
        raise ValueError("a server public key needs this client's secret key file too")
    return client_module().CurveKeys.from_files(server, secret)


classes = (DS4D_AddonPreferences,)
