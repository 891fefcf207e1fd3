"""An empty MLflow sqlite store made once per test session and copied where a sweep will track.

Creating MLflow's tables on a new sqlite file (its alembic migrations) takes 3 to 6 s on this
2-core machine, about a fifth of a tiny sweep. The suite runs some twenty sweeps, each against a
fresh store; copying one migrated empty store saves that time without changing what a sweep does
with its store. The CLI's own first-run creation is still exercised: by making the template, and
by the tests that give the CLI a path with no store (bad input, the quick start's defaults).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_template: Path | None = None


def _make_template() -> Path:
    from mlflow.tracking import MlflowClient

    root = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
    atexit.register(shutil.rmtree, root, True)
    path = root / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


def mlflow_db(directory: Path, name: str = "mlflow.db") -> Path:
    """`directory/name`, holding an empty migrated store unless a store is already there (a
    resumed sweep keeps its own)."""
    global _template
    dest = Path(directory) / name
    if not dest.exists():
        if _template is None:
            _template = _make_template()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template, dest)
    return dest


def mlflow_uri(directory: Path, name: str = "mlflow.db") -> str:
    return f"sqlite:///{mlflow_db(directory, name)}"
