"""The layering of the design notes: a layer imports only layers below it (checked on source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medgen"
HEAVY = ("torch", "monai", "mlflow")
UPPER = ("medgen.models", "medgen.training", "medgen.inference", "medgen.stages", "medgen.tracking",
         "medgen.pipeline", "medgen.cli", "medgen.adapt")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules_under(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((PACKAGE / folder).rglob("*.py"))]


@pytest.mark.parametrize("path", modules_under("io", "archive"), ids=lambda p: p.name)
def test_lower_layers_import_no_torch_monai_mlflow_or_upper_layers(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in HEAVY or m.startswith(UPPER)}
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


def test_only_tracking_imports_mlflow():
    users = [p.relative_to(PACKAGE.parent).as_posix() for p in sorted(PACKAGE.rglob("*.py"))
             if any(m.split(".")[0] == "mlflow" for m in imported_modules(p))]
    assert users == ["medgen/tracking.py"]


@pytest.mark.parametrize("path", modules_under("data", "metrics", "baselines"), ids=lambda p: p.name)
def test_data_and_metrics_do_not_reach_up(path):
    bad = {m for m in imported_modules(path) if m.startswith(UPPER)}
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules_under("models"), ids=lambda p: p.name)
def test_models_do_not_reach_up(path):
    """Networks are built below training, sampling and the stages (a bundle's networks too)."""
    upper = tuple(u for u in UPPER if u != "medgen.models")
    bad = {m for m in imported_modules(path) if m.startswith(upper)}
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["sampling.py", "schedulers.py", "synthesis.py"])
def test_samplers_import_no_model_code(name):
    """diffusers' rule: samplers see a network only as a callable."""
    bad = {m for m in imported_modules(PACKAGE / "inference" / name) if m.startswith("medgen.models")}
    assert not bad, f"medgen/inference/{name} imports {sorted(bad)}"
