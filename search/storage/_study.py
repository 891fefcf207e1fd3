"""The Optuna storage of a sweep, the callback that keeps an object store's copy current, and
the copy of each Tune snapshot that reaches a local storage before the study does (`publish`).

The storage objects pickle as their *spec* (`open_study_storage`): Tune pickles the searcher with
its study, and a restored searcher must open the state where it is now (after `--resume`
restored it there), not at a path of the machine that started the sweep.
"""
from __future__ import annotations

import logging
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalFileSymlinkLock
from ray.tune import Callback

from trainables.fileio import atomic_path

from ._location import SweepLocation, mirrored_study_spec

log = logging.getLogger(__name__)


class _SpecRDBStorage(RDBStorage):
    def __reduce__(self) -> tuple:
        return (open_study_storage, (self.brsearch_spec,))


class _SpecJournalStorage(JournalStorage):
    def __reduce__(self) -> tuple:
        return (open_study_storage, (self.brsearch_spec,))

    def flush(self) -> None:
        """Write what a snapshot-paced journal holds back (no-op otherwise)."""
        flush = getattr(self._backend, "flush", None)
        if flush is not None:
            flush()


_PACED: weakref.WeakSet = weakref.WeakSet()  # this process's snapshot-paced journals (`flush_studies`)


class SnapshotPacedJournal(BaseJournalBackend):
    """A journal file whose appends reach the file only at `flush`, which the searcher calls when
    Tune saves it into an experiment snapshot (`ParetoSearch.save`); reads in this process see
    them at once, so samplers learn from every outcome as it comes.

    Why: Tune snapshots its experiment on its own period (at least 10 s), while the searcher asks
    and tells Optuna as trials start and end. Written at once, a crash left Optuna with trials the
    restored experiment never heard of, among them finished ones whose results no table held.
    Paced with the snapshot, the study on disk holds what the snapshot holds; what a crash loses
    (asks and outcomes after the last snapshot) Tune runs again, as it does the trials themselves.
    Only for a journal the driver alone writes (the sweep's own study file).
    """

    def __init__(self, inner: JournalFileBackend) -> None:
        self.inner = inner
        self._pending: list[dict[str, Any]] = []
        self._on_disk: int | None = None
        self._lock = threading.Lock()
        _PACED.add(self)

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        with self._lock:
            if self._on_disk is None:
                disk = list(self.inner.read_logs(0))
                self._on_disk = len(disk)
                disk = disk[log_number_from:]
            else:
                disk = list(self.inner.read_logs(log_number_from)) if log_number_from < self._on_disk else []
            return disk + self._pending[max(0, log_number_from - self._on_disk):]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self._lock:
            if self._on_disk is None:
                self._on_disk = sum(1 for _ in self.inner.read_logs(0))
            self._pending.extend(logs)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.inner.append_logs(self._pending)
                self._on_disk = (self._on_disk or 0) + len(self._pending)
                self._pending = []


def flush_studies() -> None:
    """Every snapshot-paced journal of this process to its file (the end of a sweep)."""
    for journal in list(_PACED):
        journal.flush()


PACED = "paced"  # a spec key: the journal is written at Tune's snapshots (SnapshotPacedJournal)


def open_study_storage(spec: dict[str, str]) -> optuna.storages.BaseStorage:
    """The Optuna storage a spec names: {"url": RDB URL}, {"sqlite": path}, {"journal": path} or
    {"mirror": remote state dir} (the study file in the driver-local mirror); a journal with
    {PACED: "1"} added is written at Tune's snapshots (the sweep's searcher, `SnapshotPacedJournal`).

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
        backend: BaseJournalBackend = JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path)))
        if named.get(PACED):
            backend = SnapshotPacedJournal(backend)
        storage = _SpecJournalStorage(backend)
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


def snapshot_target(spec: dict[str, str], staged_dir: str) -> str | None:
    """The local experiment folder a searcher with a snapshot-paced study (`spec`, what its
    storage opened) copies the files Tune stages into `staged_dir` to, ahead of Tune's own
    upload; None without a paced local journal, or when Tune stages in that folder itself.

    Not for an object store: there the study is pushed at the snapshot (`StateSync`) and the
    snapshot goes up later with Tune's upload. Copying the snapshot first was tried; a kill
    between its upload and the study's push (a window an outage of the store widens to minutes)
    left the stored snapshot with trials the stored study lacked, which the restored searcher
    neither counted nor told, and a chaos run ended with 12 trials of 10."""
    if not spec.get(PACED) or "journal" not in spec:
        return None
    exp = Path(spec["journal"]).parent.parent
    return None if exp.resolve() == Path(staged_dir).resolve() else str(exp)


def publish(src: Path, folder: str) -> None:
    """Copy a staged file into the experiment folder in one step (`trainables.fileio.atomic_path`);
    nothing when Tune staged no such file."""
    if not src.is_file():
        return
    with atomic_path(Path(folder) / src.name) as tmp:
        shutil.copyfile(src, tmp)


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
