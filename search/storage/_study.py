"""The Optuna storage of a sweep, and the callback that keeps an object store's copy current.

The storage objects pickle as their *spec* (`open_study_storage`): Tune pickles the searcher with
its study, and a restored searcher must open the state where it is now (after `--resume`
restored it there), not at a path of the machine that started the sweep.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from ray.tune import Callback

from ._location import SweepLocation, mirrored_study_spec

log = logging.getLogger(__name__)


class _SpecRDBStorage(RDBStorage):
    def __reduce__(self) -> tuple:
        return (open_study_storage, (self.brsearch_spec,))


class _SpecJournalStorage(JournalStorage):
    def __reduce__(self) -> tuple:
        return (open_study_storage, (self.brsearch_spec,))


def open_study_storage(spec: dict[str, str]) -> optuna.storages.BaseStorage:
    """The Optuna storage a spec names: {"url": RDB URL}, {"sqlite": path}, {"journal": path} or
    {"mirror": remote state dir} (the study file in the driver-local mirror).

    Args:
        spec: what `SweepLocation.study_spec` or --study-storage names.
    """
    named = dict(spec)  # what the storage pickles as: a mirror is looked up again where it is unpickled
    if "mirror" in spec:
        spec = mirrored_study_spec(spec["mirror"])
    storage: optuna.storages.BaseStorage
    if "url" in spec:
        storage = _SpecRDBStorage(spec["url"])
    elif "journal" in spec:
        path = Path(spec["journal"])
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        storage = _SpecJournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path))))
    else:
        path = Path(spec["sqlite"])
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = _SpecRDBStorage(f"sqlite:///{path}")
    storage.brsearch_spec = named  # type: ignore[attr-defined]
    return storage


def _drop_torn_tail(path: Path) -> None:
    """A driver killed inside an append can leave a last line without its newline; Optuna skips
    it on reading but would append the next record onto it, which makes the journal unreadable.
    The driver is the journal's only writer, so cutting that partial line off before opening is
    safe (the operation it recorded did not complete)."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, 2)
            if size == 0:
                return
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            f.seek(0)
            keep = f.read().rfind(b"\n") + 1
            f.truncate(keep)
            log.warning("%s: cut off a partial last record (%d bytes) left by a killed driver", path, size - keep)
    except FileNotFoundError:
        return


class StateSync(Callback):
    """Uploads the driver's state at each experiment checkpoint. Tune asks callbacks for their
    state right after saving the searcher's, and uploads both afterwards, so the stored study is
    never older than the stored searcher."""

    def __init__(self, location: SweepLocation) -> None:
        self.location = location

    def get_state(self) -> dict | None:
        self.location.push_state()
        return None

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.location.push_state()
