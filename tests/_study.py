"""The Optuna study a sweep keeps in `<storage>/<name>/brsearch/optuna.journal` (search.storage),
read as a user would: `optuna.load_study` on a JournalStorage of that file. Safe while the driver
is writing it (Optuna skips a last line not yet complete)."""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend


def sweep_study(exp_dir: Path, name: str, path: Path | None = None) -> optuna.Study:
    journal = path or Path(exp_dir) / "brsearch" / "optuna.journal"
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))
