"""Command-line options derived from a settings dataclass: every setting is declared once.

A command's settings live in one dataclass (``TrainConfig``, ``CacheConfig``…): each field's type,
its default and the docstring under it. `config_command` turns those fields into typer options, so
the flag (``--field-name``), its default and its ``--help`` text cannot drift from the library's
declaration, and a new setting is added in one place. A field's metadata may adjust its flag
(`kd.settings.cli(...)`): other names (``--lr``), a ``--x/--no-x`` pair, a hidden default, or no flag at all.

Every derived command also takes:

* ``--config FILE`` (YAML or JSON): keys are flag names, ``top_k`` or ``top-k``; flags given on the
  command line override the file; an unknown key or a wrong type is a one-line error naming both;
* ``--print-config``: print the effective configuration as YAML and exit;
* ``--json`` and ``--debug`` (the CLI's usual machine-output and traceback switches).

`write_config` stores the resolved configuration (and kd's version) as ``config.yaml`` in a command's
output directory, so ``kd train --config student/config.yaml`` reruns that training exactly.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from kd import __version__
from kd.errors import KdError
from kd.settings import CLI

CONFIG_FILE_NAME = "config.yaml"
RESERVED_KEYS = ("kd_version",)
"""Keys a config file may hold besides the settings (written by `write_config`)."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its bases), from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _option_type(annotation: Any) -> tuple[type | None, bool]:
    """(scalar type, may be None) of a field annotation such as ``int | None``; None type if not a CLI scalar."""
    origin = typing.get_origin(annotation)
    if origin is list and typing.get_args(annotation) == (str,):  # a repeatable flag: --x A --x B
        return list, False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if list[str] in args and set(args) <= {list[str], str}:  # repeatable; one value stays a string
            return list, False
        if len(args) == 1 and args[0] in (str, int, float, bool):
            return args[0], True
        return None, True
    if annotation in (str, int, float, bool):
        return annotation, False
    if origin is list and typing.get_args(annotation) == (str,):
        return list, False
    return None, False


@dataclasses.dataclass(frozen=True)
class Setting:
    """One dataclass field as seen from the command line."""

    name: str
    type: type
    optional: bool
    default: Any
    required: bool
    flags: tuple[str, ...]
    help: str
    show_default: bool
    argument: bool = False
    """A positional argument (``kd compare A/ B/``) rather than an option."""

    @property
    def flag(self) -> str:
        return self.flags[0].split("/")[0]


def _own_fields_first(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls`, those it declares first, then those a base settings class shares
    (`OptimizerSettings`), each in declaration order: dataclasses put a base's fields first, but
    --help and config.yaml should open with the command's own settings and keep the shared ones together."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]


def settings_of(cls: type) -> list[Setting]:
    """The command-line settings of a config dataclass: its own in declaration order, then inherited ones."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in _own_fields_first(cls):
        meta = f.metadata.get(CLI, {})
        typ, optional = _option_type(hints[f.name])
        if meta.get("skip") or typ is None or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        flags = tuple(meta.get("flags") or ()) or ("--" + f.name.replace("_", "-"),)
        if meta.get("argument"):
            flags = (f.name,)  # what click calls the argument (its opts) and --help shows
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring: it is the flag's --help text")
        out.append(
            Setting(
                f.name,
                typ,
                optional,
                default,
                required,
                flags,
                docs[f.name],
                meta.get("show_default", True),
                bool(meta.get("argument")),
            )
        )
    return out


# ----------------------------------------------------------------------------- config files


def _load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KdError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError or json.JSONDecodeError: say where, in one line
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        why = " ".join(str(exc).split())  # yaml's message spans lines (it quotes the source)
        if mark is not None and problem:
            why = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        raise KdError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({why})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _check_type(setting: Setting, value: Any, where: str) -> Any:
    if setting.type is list:  # a file may give one string or a list of strings
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise KdError(f"{where}: '{setting.flag.lstrip('-')}' must be a string or a list of strings, got {value!r}")
        return value
    if value is None and (setting.optional or setting.default is None):
        return None
    ok = isinstance(value, setting.type) and not (setting.type in (int, float) and isinstance(value, bool))
    if setting.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise KdError(
            f"{where}: '{setting.flag.lstrip('-')}' must be {setting.type.__name__}"
            f"{' or null' if setting.optional else ''}, got {type(value).__name__} {value!r}"
        )
    return value


def config_file_values(path: Path, settings: list[Setting]) -> dict[str, Any]:
    """Settings from a config file, keyed by field name; unknown keys and wrong types are errors."""
    by_key: dict[str, Setting] = {}
    for s in settings:
        by_key[s.name] = s
        for flag in s.flags:
            for name in flag.split("/"):
                if not name.startswith("--no-"):
                    by_key[name.lstrip("-").replace("-", "_")] = s
    values = {}
    for key, value in _load_file(path).items():
        normal = str(key).lstrip("-").replace("-", "_")
        if normal in RESERVED_KEYS:
            continue
        if normal not in by_key:
            raise KdError(f"--config {path}: unknown key '{key}' (not a flag of this command)")
        setting = by_key[normal]
        values[setting.name] = _check_type(setting, value, f"--config {path}")
    return values


def resolved(cfg: Any) -> dict[str, Any]:
    """The command-line settings of a config object, as plain values (what config.yaml holds)."""
    return {s.name: getattr(cfg, s.name) for s in settings_of(type(cfg))}


def config_text(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump({"kd_version": __version__, **resolved(cfg)}, sort_keys=False, allow_unicode=True)


def write_config(directory: str | Path, cfg: Any) -> Path:
    """Write `cfg` as DIRECTORY/config.yaml (atomically), for `--config` to rerun the command exactly."""
    from kd.cache.manifest import atomic_write_text

    path = Path(directory) / CONFIG_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_text(cfg))
    return path


# ----------------------------------------------------------------------------- commands


class CommonSwitches(typing.NamedTuple):
    as_json: bool
    debug: bool


def config_command(
    app: typer.Typer,
    name: str,
    config_cls: type,
    run: Callable[[Any, CommonSwitches], None],
    *,
    doc: str,
    prepare: Callable[[dict[str, Any], set[str]], dict[str, Any]] | None = None,
    json_help: str = "Print the summary as JSON on stdout.",
) -> None:
    """Register `kd NAME` with one option per setting of `config_cls`, plus --config/--print-config/--json.

    Args:
        run: called with the built config object and the common switches.
        prepare: turns the merged values into constructor arguments (e.g. defaults from the
            environment); receives the names given explicitly (command line or file).
    """
    settings = settings_of(config_cls)
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    for s in settings:
        default = None if s.required else s.default
        if s.argument:
            # Positional: typer wants None (not []) as the default of a variadic argument.
            argument = typer.Argument(None, help=escape(s.help), show_default=False)
            annotation = typing.Optional[list[str]] if s.type is list else typing.Optional[s.type]  # noqa: UP045
            kind = inspect.Parameter.KEYWORD_ONLY
            params.append(inspect.Parameter(s.name, kind, default=argument, annotation=annotation))
            continue
        # escape: typer renders --help with rich markup, where "[default: x]" would vanish as a tag.
        option = typer.Option(
            default,
            *s.flags,
            help=escape(s.help),
            show_default=s.show_default and not s.required,
            metavar="FILE" if s.type is list else None,  # the list settings so far are all files
        )
        if s.type is list:
            annotation = typing.Optional[typing.List[str]]  # noqa: UP006, UP045 - typer
        else:
            annotation = s.type if not (s.optional or default is None) else typing.Optional[s.type]  # noqa: UP045 - typer
        params.append(inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    params += [
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="YAML or JSON file of settings (keys: flag names)."),
            annotation=typing.Optional[str],  # noqa: UP045 - typer
        ),
        inspect.Parameter(
            "print_config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, "--print-config", help="Print the effective configuration and exit."),
            annotation=bool,
        ),
        inspect.Parameter(
            "as_json",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, "--json", help=json_help),
            annotation=bool,
        ),
        inspect.Parameter(
            "debug",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, "--debug", help="Show tracebacks."),
            annotation=bool,
        ),
    ]

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        given = {
            s.name
            for s in settings
            # By name: typer may carry its own copy of click's ParameterSource enum.
            if getattr(ctx.get_parameter_source(s.name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
        }
        values = {s.name: kwargs[s.name] for s in settings}
        for s in settings:
            if s.type is list:  # typer gives None (or ()) for a repeatable flag or a variadic argument not used
                values[s.name] = list(values[s.name] or s.default or [])
                if s.argument and not values[s.name]:
                    given.discard(s.name)
        if kwargs["config_file"]:
            from_file = config_file_values(Path(kwargs["config_file"]), settings)
            values.update({k: v for k, v in from_file.items() if k not in given})
            given |= set(from_file)
        for s in settings:
            if s.required and values[s.name] is None:
                raise KdError(f"{s.flag} is required (on the command line or in --config)")
        arguments = prepare(values, given) if prepare else values
        cfg = config_cls(**arguments)
        if kwargs["print_config"]:
            typer.echo(config_text(cfg), nl=False)
            return
        run(cfg, CommonSwitches(kwargs["as_json"], kwargs["debug"]))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)
