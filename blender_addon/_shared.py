"""Access to the `shared/` package from both layouts the add-on runs in.

In the extension zip, `shared/` is copied inside the add-on package (one source, bundled by
`build.py package`); in a repository checkout it is the sibling top-level package.  The client
module needs pyzmq, which is only imported when a backend is used.
"""

from __future__ import annotations

import importlib
import importlib.util

_BUNDLED = f"{__package__}.shared"
_PREFIX = _BUNDLED if importlib.util.find_spec(_BUNDLED) is not None else "shared"

coords = importlib.import_module(f"{_PREFIX}.coords")
scene_format = importlib.import_module(f"{_PREFIX}.scene")
ply = importlib.import_module(f"{_PREFIX}.ply")


def client_module():
    """shared.client (imports pyzmq): the error names the missing wheel instead of failing at load."""
    try:
        return importlib.import_module(f"{_PREFIX}.client")
    except ImportError as error:
        raise RuntimeError(
            f"the backend client cannot load ({error}); the extension bundles pyzmq wheels, "
            "reinstall it from the release zip for this platform"
        ) from error
