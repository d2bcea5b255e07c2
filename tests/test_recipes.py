"""Every recipe in recipes/ is a valid --config of its command (nothing is run; paths need not exist).

.venv/bin/python -m pytest tests/test_recipes.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_kd_in_process

RECIPES = sorted((REPO / "recipes").glob("*/*.yaml"))


def test_there_are_recipes_for_the_common_jobs():
    names = {p.parent.name for p in RECIPES}
    assert {"qwen2.5-7b-to-0.5b-top64", "llama3.1-8b-to-3.2-1b-rs", "r1-trace-sft"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates(recipe: Path):
    command = recipe.stem
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    assert any(f"--config recipes/{recipe.parent.name}/{recipe.name}" in line for line in header), (
        "the header must show the exact command line"
    )
    proc = run_kd_in_process(command, "--config", str(recipe), "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    for key, value in yaml.safe_load(recipe.read_text()).items():
        assert printed[key.replace("-", "_")] == value, key
