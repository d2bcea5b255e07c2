"""The `kd` command line.

    kd cache-logits --data train.jsonl --out cache/      # stage one: run the teacher once
    kd inspect cache/ --verify                           # what is in a cache; checksums
    kd train --from-cache cache/ --student ... --out s/  # stage two: train from the cache
    kd gen-traces --prompts problems.jsonl --out t.jsonl # black-box reasoning traces
    kd eval --model s/ --data test.jsonl --teacher T     # compare a student with its teacher
    kd demo                                              # the whole pipeline on the embedded teacher

Every stage module in `kd.stages` registers its own command; this file only assembles them and
turns errors into one line (`kd: error: ...`, exit 1) unless --debug is given.
"""

from __future__ import annotations

import importlib
import sys

import typer

from kd import __version__
from kd.errors import KdError

app = typer.Typer(
    name="kd",
    help="Offline knowledge distillation for LLMs: cache teacher logits once, train many students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Stage modules, each exposing `register(app)`. Imported lazily by name so a missing optional
# dependency of one stage does not break the others.
STAGE_MODULES = (
    "kd.stages.cache_logits",
    "kd.stages.inspect",
    "kd.stages.train",
    "kd.stages.gen_traces",
    "kd.stages.on_policy",
    "kd.stages.evaluate",
    "kd.stages.compare",
    "kd.stages.demo",
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"kd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show version."),
) -> None:
    """kd: offline knowledge distillation for LLMs."""


for _name in STAGE_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:  # a stage not written yet, or one whose module is absent
        if _exc.name != _name:
            raise
        continue
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, printing user errors as one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="kd", standalone_mode=False)
    except KdError as exc:
        if debug:
            raise
        print(f"kd: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("kd: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        kind = _click_kind(exc)
        if kind == "Exit":
            sys.exit(exc.exit_code)
        if kind == "Abort":
            print("kd: aborted", file=sys.stderr)
            sys.exit(130)
        if debug:
            raise
        if kind == "ClickException":
            ctx = getattr(exc, "ctx", None)
            command = f"{ctx.command_path}: " if ctx is not None else "kd: "
            print(f"{command}error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, OSError) and exc.filename is not None:  # a path kd cannot create, read or write
            print(f"kd: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            sys.exit(1)
        print(
            f"kd: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr
        )
        sys.exit(1)
    # Without standalone mode typer turns Ctrl-C into a *returned* 130 (and typer.Exit(n) into n).
    if code == 130:
        print("kd: interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


def _click_kind(exc: BaseException) -> str | None:
    """Exit, Abort or ClickException for click's exceptions, including the copy of click that newer
    typer releases carry (typer._click), whose classes are not click's; None for anything else."""
    names = {klass.__name__ for klass in type(exc).__mro__}
    for kind in ("Exit", "Abort", "ClickException"):
        if kind in names:
            return kind
    return None


if __name__ == "__main__":
    main()
