"""Errors the backend reports to the user as-is."""


class InputError(ValueError):
    """Bad user input: missing, misnamed, mismatched or unreadable files, or invalid settings.

    The message names the offending file, folder or field and says how to fix it, e.g.
    ``masks/002 has 10 frames but frames/ has 11: 00054.png has no mask``.  The server sends it
    to the client unchanged, so it must make sense without a traceback.
    """


class JobCancelled(Exception):
    """Raised at a step boundary when the caller asked the run to stop; checkpoints are kept."""
