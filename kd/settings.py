"""How a settings dataclass field asks for a particular command-line flag (read by kd.stages.options).

Settings are declared once, in the library's dataclasses (``TrainConfig``, ``CacheConfig``…): type,
default and the docstring under each field. Most fields need nothing more: their flag is
``--field-name``. This module holds the one helper for the exceptions, so the library can state
them without importing the CLI.
"""

from __future__ import annotations

from typing import Any

CLI = "kd_cli"
"""Dataclass field-metadata key holding a field's command-line adjustments."""


def cli(*flags: str, skip: bool = False, show_default: bool = True, argument: bool = False) -> dict[str, Any]:
    """Field metadata for the command line: ``field(default=..., metadata=cli("--learning-rate", "--lr"))``.

    Args:
        flags: the option's names, replacing ``--field-name`` (e.g. ``"--verify/--no-verify"``).
        skip: no command-line option (settings only a library caller sets).
        show_default: False for defaults too long for --help (a whole prompt template).
        argument: a positional argument instead of an option (a ``list[str]`` field takes any number:
            ``kd compare A/ B/ C/``).
    """
    return {CLI: {"flags": flags, "skip": skip, "show_default": show_default, "argument": argument}}
