"""The floor plan is enforced: which packages and wings may import which, read from the source with `ast`.

    .venv/bin/python -m pytest tests/test_layering.py -q

Every import of every module under kd/ counts, including those inside functions (lazy imports are
how a layering breach usually sneaks in). The rules are the ones each wing's `__init__` states.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KD = Path(__file__).resolve().parents[1] / "kd"

FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the on-disk format knows no model and no pipeline
    "kd.cache": ("kd.pipeline", "kd.stages", "kd.cli", "kd.losses", "torch", "transformers", "vllm"),
    # losses are pure functions of tensors
    "kd.losses": ("kd.pipeline", "kd.stages", "kd.cli", "kd.cache", "transformers", "vllm"),
    # the library never reaches up into the entry points
    "kd.pipeline": ("kd.stages", "kd.cli"),
    "kd.pipeline.engines": ("kd.pipeline.training", "kd.losses", "kd.pipeline.evaluation", "kd.pipeline.onpolicy"),
    "kd.pipeline.capture": ("kd.pipeline.training", "kd.losses", "kd.pipeline.evaluation", "kd.pipeline.onpolicy"),
    "kd.pipeline.training": ("kd.pipeline.capture", "kd.pipeline.onpolicy", "kd.pipeline.traces"),
    "kd.pipeline.traces": ("kd.pipeline.training", "kd.pipeline.capture", "kd.losses", "kd.pipeline.onpolicy"),
}
"""package prefix -> import prefixes that no module under it may import."""


def module_name(path: Path) -> str:
    parts = path.relative_to(KD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every absolute module an import statement in `path` names (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    """Every module (and `module.name`) that `source`, a module of `package`, imports, at any depth."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = sorted(KD.rglob("*.py"))


def test_every_module_is_seen():
    assert len(MODULES) > 50
    assert any(module_name(p) == "kd.losses.fused" for p in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_respect_the_floor_plan(path: Path):
    name = module_name(path)
    imported = imports_of(path)
    breaches = [
        f"{name} imports {target} ({package} may not import {banned})"
        for package, banned_list in FORBIDDEN.items()
        if within(name, package)
        for banned in banned_list
        for target in sorted(imported)
        if within(target, banned)
    ]
    assert not breaches, "\n".join(breaches)


def test_the_reader_sees_lazy_and_relative_imports():
    """The checker itself: a function-level import and a relative one are both resolved."""
    source = "def f():\n    from kd.pipeline.training import trainer\nfrom ..pipeline import data\n"
    found = imports_in(source, "kd.cache")
    assert "kd.pipeline.training.trainer" in found
    assert "kd.pipeline.data" in found
    assert not within("kd.pipelines", "kd.pipeline")


def test_no_flat_room_left():
    """kd/pipeline/ keeps only the modules every wing uses at its top level; the rest live in wings."""
    top = sorted(p.stem for p in (KD / "pipeline").glob("*.py") if p.stem != "__init__")
    assert top == ["data", "heads", "models", "progress", "tracking"], top
