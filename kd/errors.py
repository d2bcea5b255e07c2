"""The one exception type users see.

Anything raised as `KdError` is printed by the CLI as a single line (`kd: error: ...`) with a
non-zero exit and no traceback unless `--debug` is given. Messages must name the file and line,
or the flag, that is wrong.
"""


class KdError(Exception):
    """A user-facing error: bad input, a bad flag, or a refused operation."""


def where(path: object, line: int | None = None) -> str:
    """Format a location for an error message: ``data.jsonl:17`` or ``data.jsonl``."""
    return f"{path}:{line}" if line is not None else str(path)
