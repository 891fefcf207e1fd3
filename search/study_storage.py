"""The Optuna storage of a sweep, and the callback that keeps an object store's copy current.

The storage objects pickle as their *spec* (`open_study_storage`): Tune pickles the searcher with
its study, and a restored searcher must open the state where it is now (after `--resume`
restored it there), not at a path of the machine that started the sweep.

A sweep's own study is an Optuna journal file that only the driver writes (`DriverJournal`):
the study lives in memory, and the operations since the last Tune experiment checkpoint are
appended to the file in one write at the next one. Why: with Optuna's RDB storage every ask,
suggested parameter, attribute and tell was a SQLAlchemy round trip with a commit (about 17 per
trial) and the sampler re-read the running trials from the database before each suggestion, all
in Tune's single driver loop; that was most of the driver's time per result
(docs/benchmarks.md, "Driver scale").
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalFileSymlinkLock
from ray.tune import Callback

from .state import SweepState, mirror_dir


class DriverJournal(BaseJournalBackend):
    """Optuna's journal file format, written by one process: reads come from memory, appends
    are buffered until `flush` (one append and one fsync, under Optuna's symlink lock, which is
    safe on NFS). The file is what Tune's last experiment checkpoint saw: a crash loses only
    what the restored sweep will redo anyway. `flush` refuses to write after another process
    appended to the file (two drivers on one sweep)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = JournalFileSymlinkLock(path)
        self._mutex = threading.Lock()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as f:  # created if missing
            f.seek(0)
            data = f.read()
            # a line torn by a crash during a write is not part of the journal (Optuna skips it too)
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) < len(data):
                f.truncate(len(whole))
        self._logs: list[dict[str, Any]] = [json.loads(line) for line in whole.splitlines() if line.strip()]
        self._size = len(whole)  # bytes of the file this process knows about
        self._pending: list[str] = []

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        with self._mutex:
            return self._logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        lines = [json.dumps(log, separators=(",", ":")) for log in logs]
        with self._mutex:
            self._pending.extend(lines)
            # replayed from JSON, as a reload of the file would be: a resumed study is the same
            self._logs.extend(json.loads(line) for line in lines)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Append what was buffered since the last flush, durably."""
        with self._mutex:
            if not self._pending:
                return
            data = ("\n".join(self._pending) + "\n").encode()
            self._lock.acquire()
            try:
                size = os.path.getsize(self.path) if os.path.exists(self.path) else -1
                if size != self._size:
                    raise RuntimeError(f"{self.path} changed under this driver ({size} bytes, expected "
                                       f"{self._size}): is another driver running this sweep?")
                with open(self.path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                self._lock.release()
            self._size += len(data)
            self._pending.clear()

    def current(self) -> bool:
        """The file holds exactly what this object read and wrote (no one else touched it)."""
        try:
            return os.path.getsize(self.path) == self._size
        except OSError:
            return False


class _SpecRDBStorage(RDBStorage):
    def __reduce__(self) -> tuple:
        return (open_study_storage, (self.brsearch_spec,))


class _SpecJournalStorage(JournalStorage):
    def __reduce__(self) -> tuple:
        # pickled = saved by reference (Tune saving the searcher at an experiment checkpoint):
        # the file must then hold everything the pickled trials refer to
        flush_study_storage(self)
        return (open_study_storage, (self.brsearch_spec,))


# one DriverJournal storage per file and process: an unpickled or deep-copied searcher shares it
_DRIVER_JOURNALS: dict[str, _SpecJournalStorage] = {}
_LOCK = threading.Lock()


def _driver_journal(path: Path) -> _SpecJournalStorage:
    key = str(path.resolve())
    with _LOCK:
        storage = _DRIVER_JOURNALS.get(key)
        backend = getattr(storage, "_backend", None)
        if storage is None or not isinstance(backend, DriverJournal) or not backend.current():
            # first use, or the file was replaced (a --resume restored it): read it again
            storage = _DRIVER_JOURNALS[key] = _SpecJournalStorage(DriverJournal(key))
        return storage


def open_study_storage(spec: dict[str, str]) -> optuna.storages.BaseStorage:
    """The Optuna storage a spec names: {"url": RDB URL}, {"sqlite": path}, {"journal": path} (a
    journal others may write too: Optuna's file backend), {"driver_journal": path} (the sweep's
    own, `DriverJournal`) or {"mirror": remote state dir} (in the driver-local mirror: the
    driver journal, or sqlite for a sweep started before the journal)."""
    storage: optuna.storages.BaseStorage
    if "url" in spec:
        storage = _SpecRDBStorage(spec["url"])
    elif "journal" in spec:
        path = Path(spec["journal"])
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = _SpecJournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path))))
    elif "driver_journal" in spec:
        storage = _driver_journal(Path(spec["driver_journal"]))
    elif "mirror" in spec and not (mirror_dir(spec["mirror"]) / "optuna.db").exists():
        storage = _driver_journal(mirror_dir(spec["mirror"]) / "optuna.journal")
    else:
        path = Path(spec["sqlite"]) if "sqlite" in spec else mirror_dir(spec["mirror"]) / "optuna.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = _SpecRDBStorage(f"sqlite:///{path}")
    storage.brsearch_spec = dict(spec)  # type: ignore[attr-defined]
    return storage


def flush_study_storage(storage: Any) -> None:
    """Write a driver journal's buffered operations (a no-op for other storages)."""
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, DriverJournal):
        backend.flush()


def load_sweep_study(state_dir: Path, name: str) -> optuna.Study:
    """The stored study of a sweep, read-only use (tests, notebooks): `optuna.journal` or, for a
    sweep started before the journal, `optuna.db`, in its state directory."""
    journal, db = Path(state_dir) / "optuna.journal", Path(state_dir) / "optuna.db"
    if db.exists() and not journal.exists():
        return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


class StateSync(Callback):
    """Uploads the driver's state at each experiment checkpoint. Tune asks callbacks for their
    state right after saving the searcher's (which flushes the study), and uploads both
    afterwards, so the stored study is never older than the stored searcher."""

    def __init__(self, state: SweepState) -> None:
        self.state = state

    def get_state(self) -> dict | None:
        self.state.push()
        return None

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.state.push()
