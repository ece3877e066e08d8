"""Code both the backend and the Blender add-on run: protocol, client, scene format (stdlib, numpy, pyzmq)."""
