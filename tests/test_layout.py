"""The layout holds: one contract between the sweep and a trial, public faces per package.

Each check here reads the source (ast), so it fails on the line that breaks the rule."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import trainables.contract as contract

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("search", "trainables", "report", "spaces")
SUBPACKAGES = ("driver", "optimizer", "front", "storage", "tracking", "results", "posthoc")

# contract values that are also other words: (module, literal) -> why it is not the contract's
HOMONYMS = {
    ("trainables/config.py", "final"): "the Binary-Relax lambda schedule named 'final'",
    ("report/cli.py", "final"): "the same lambda schedule name",
    ("search/driver/_cli.py", "brsearch"): "the default MLflow experiment name",
}


# table stems: only their file names are contract literals ("trials" is also a flag, "pareto" a column)
STEMS = {"TRIALS_TABLE", "FRONT_TABLE"}


def _contract_values() -> dict[str, str]:
    """Every literal the contract names: value -> constant name."""
    out = {}
    for name in sorted(set(contract.__all__) - STEMS):
        v = getattr(contract, name)
        if isinstance(v, str):
            out[v] = name
        elif isinstance(v, tuple) and all(isinstance(s, str) for s in v) and name == "OBJECTIVES":
            out.update({s: name for s in v})
    out.update({f: "table_files" for t in (contract.TRIALS_TABLE, contract.FRONT_TABLE) for f in contract.table_files(t)})
    return out


def _product_modules() -> list[Path]:
    return sorted(p for d in PRODUCT for p in (ROOT / d).rglob("*.py") if p != ROOT / "trainables/contract.py")


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def _violations(paths: list[Path], root: Path = ROOT) -> list[str]:
    values = _contract_values()
    found = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        for line, s in _literals(path):
            if s in values and (rel, s) not in HOMONYMS:
                found.append(f"{rel}:{line}: {s!r} is trainables.contract.{values[s]}")
    return found


def test_no_contract_literal_outside_the_contract():
    """Objective names, result keys, file names and statuses are spelled only in trainables.contract."""
    found = _violations(_product_modules())
    assert not found, "\n".join(found)


def test_the_homonym_list_is_current():
    for (rel, s), why in HOMONYMS.items():
        assert s in {v for _, v in _literals(ROOT / rel)}, f"{rel} no longer holds {s!r} ({why}): drop the entry"


def test_planted_literals_trip_the_check(tmp_path):
    """The check itself: a file name, a status and an objective spelled out are each found; a
    docstring naming them is not."""
    planted = tmp_path / "search" / "planted.py"
    planted.parent.mkdir()
    planted.write_text('"""Reads model.pt."""\nPATH = "model.pt"\nDONE = x == "completed"\nY = r["robust_acc"]\n')
    found = _violations([planted], tmp_path)
    assert [f.split(": ", 1)[0] for f in found] == ["search/planted.py:2", "search/planted.py:3", "search/planted.py:4"], found


def test_contract_imports_nothing_heavy():
    tree = ast.parse((ROOT / "trainables/contract.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "math", "collections", "typing"}, imported


def test_the_loop_reports_every_objective():
    from trainables.loop import FINAL_KEYS

    assert set(contract.OBJECTIVES) <= set(FINAL_KEYS)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_names_its_public_api(package):
    mod = importlib.import_module(f"search.{package}")
    assert mod.__doc__ and mod.__all__, f"search.{package} needs a docstring and __all__"
    for name in mod.__all__:
        assert not name.startswith("_")
        assert getattr(mod, name) is not None


def test_search_has_few_top_level_modules():
    top = sorted(p.name for p in (ROOT / "search").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 8, top


def test_tests_import_public_names_only():
    """Tests use `search.<package>` names, never a private module or a private name."""
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "search":
                parts = node.module.split(".")
                if any(p.startswith("_") for p in parts) or any(a.name.startswith("_") for a in node.names):
                    bad.append(f"{path.name}:{node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                bad += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                        if a.name.startswith("search.") and any(p.startswith("_") for p in a.name.split("."))]
    assert not bad, "\n".join(bad)


def test_nothing_in_search_imports_report():
    for path in (ROOT / "search").rglob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert not any(m == "report" or m.startswith("report.") for m in mods), path
