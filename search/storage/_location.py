"""Where a sweep lives: one model for the driver, `--resume` and the tools run after a sweep.

A sweep is the folder `<storage>/<name>/` (Tune's experiment directory) under `--storage-path`:

* a directory, local or shared (NFS, CIFS, Lustre, a FUSE mount...): everything is read and
  written in place; the sweep's own state is `<storage>/<name>/brsearch/{sweep.json,optuna.journal}`.
  The study is an Optuna `JournalStorage` file with a symlink lock, which Optuna documents as
  safe on shared file systems (sqlite's file locking is not) and which keeps the study in memory,
  so the sampler does not re-read every trial from a database at each suggest
  (docs/benchmarks.md, "Study storage"). A sweep started with an `optuna.db` keeps it.
* `s3://`, `gs://` (every node of a cluster must reach the storage): the driver and the tools work
  on a local copy (`$BRSEARCH_STATE_CACHE`, default `~/.cache/brsearch`, one folder per sweep URI,
  the same from every working directory) holding just the files they use, fetched and pushed back
  through pyarrow's filesystem (the client Tune itself uses; `?endpoint_override=...` works).
  The driver pushes its state at each Tune experiment checkpoint (search.storage.StateSync) and
  `--resume` pulls it first.
* `--study-storage URL`: an Optuna RDB URL the user names (postgresql://, mysql://, sqlite:///)
  or a journal file path; only the sweep record then goes to the storage path.

Imports neither Optuna nor Ray, so the command line's checks stay fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.contract import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    RECORD_FILE,
    STATE_DIR,
    STUDY_JOURNAL,
    STUDY_SQLITE,
    checkpoint_index,
    trial_dir,
)

STATE_FILES = (RECORD_FILE, STUDY_SQLITE, STUDY_JOURNAL)
TUNE_SNAPSHOT = "experiment_state-{}.json"  # a Tune experiment snapshot, by session (TuneController.CKPT_FILE_TMPL)


def is_remote(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def join_uri(base: str, *parts: str) -> str:
    """base/part/... keeping a ?query (endpoint_override=... for S3-compatible servers) at the end.

    Args:
        base: a URI or path, possibly with a ?query.
        parts: path parts to append.
    """
    root, q, query = base.partition("?")
    return "/".join([root.rstrip("/"), *parts]) + (q + query)


def resolve_storage(storage: str) -> str:
    """--storage-path as the sweep records it: a URI as given, a directory absolute."""
    if is_remote(storage):
        return storage
    return str(Path(os.path.expanduser(storage.replace("file://", "", 1))).resolve())


def _cache_dir(uri: str) -> Path:
    """The local copy of a remote sweep: one folder per experiment URI (its query left out)."""
    root = Path(os.path.expanduser(os.environ.get("BRSEARCH_STATE_CACHE", "~/.cache/brsearch")))
    bare = uri.partition("?")[0].rstrip("/")
    return root / f"{bare.rsplit('/', 1)[-1]}-{hashlib.sha1(bare.encode()).hexdigest()[:16]}"


def study_spec_from_flag(value: str) -> dict[str, str]:
    """--study-storage: an Optuna RDB URL, or a path to a journal file; ValueError otherwise."""
    if value.startswith(("sqlite:///", "postgresql", "mysql", "oracle", "mssql")):
        return {"url": value}
    if "://" in value:
        raise ValueError(f"--study-storage {value}: unsupported; accepted: an Optuna RDB URL "
                         f"(postgresql://..., mysql://..., sqlite:///PATH) or a journal file path")
    return {"journal": str(Path(os.path.expanduser(value)).resolve())}


def study_file_spec(state_dir: Path) -> dict[str, str]:
    """The study file in a state folder: the journal, or the sqlite file of a sweep started with one."""
    if (state_dir / STUDY_SQLITE).is_file() and not (state_dir / STUDY_JOURNAL).exists():
        return {"sqlite": str(state_dir / STUDY_SQLITE)}
    return {"journal": str(state_dir / STUDY_JOURNAL)}


def mirrored_study_spec(remote_state_dir: str) -> dict[str, str]:
    """The study file of a remote sweep in this machine's local copy (a spec {"mirror": URI} is
    resolved here, where it is unpickled, not where the sweep started)."""
    exp = remote_state_dir.partition("?")[0].rstrip("/").rsplit("/", 1)[0]
    return study_file_spec(_cache_dir(exp) / STATE_DIR)


@dataclass(frozen=True)
class SweepLocation:
    """Sweep `name` under `storage` (a directory or an s3://, gs:// URI; `~` and `file://` are
    resolved), with the study in `study_storage` when the user named one."""

    storage: str
    name: str
    study_storage: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", resolve_storage(self.storage))

    @property
    def remote(self) -> bool:
        return is_remote(self.storage)

    @property
    def exp_dir(self) -> str:
        """The experiment directory as Tune and the user name it: a URI, or an absolute path."""
        return join_uri(self.storage, self.name) if self.remote else os.path.join(self.storage, self.name)

    @property
    def local_dir(self) -> Path:
        """Where this machine reads and writes the sweep's files: the experiment directory itself,
        or its local copy."""
        return _cache_dir(self.exp_dir) if self.remote else Path(self.exp_dir)

    @property
    def state_dir(self) -> Path:
        """The sweep's own files (sweep.json, the study), on this machine."""
        return self.local_dir / STATE_DIR

    def study_spec(self) -> dict[str, str]:
        """What search.storage.open_study_storage opens (and a pickled storage opens again)."""
        if self.study_storage:
            return study_spec_from_flag(self.study_storage)
        if self.remote:
            return {"mirror": join_uri(self.exp_dir, STATE_DIR)}
        return study_file_spec(self.state_dir)

    # --- the sweep's record --------------------------------------------------------------------
    def exists(self) -> bool:
        """Anything stored under the experiment directory (a sweep of that name)."""
        if not self.remote:
            d = Path(self.exp_dir)
            return d.exists() and any(d.iterdir())
        import pyarrow.fs as pafs

        from trainables.fileio import patiently

        fs, path = self._fs()
        return bool(patiently(lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)),
                              f"list {self.exp_dir}"))

    def read_record(self) -> dict[str, Any] | None:
        """sweep.json from the storage itself (for s3://, gs://: the remote copy); None if none."""
        try:
            got = self.fetch(f"{STATE_DIR}/{RECORD_FILE}")
            return json.loads(got[0].read_text()) if got else None
        except (OSError, ValueError):
            return None

    def write_record(self, record: dict[str, Any]) -> None:
        from trainables.fileio import atomic_write_text

        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(record, indent=2, default=str), self.state_dir / RECORD_FILE)
        self.push_state()

    def pull_state(self) -> list[str]:
        """The stored state replaces this machine's copy (what `--resume` needs); no-op locally."""
        if not self.remote:
            return []
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return [p.name for p in self.fetch(*(f"{STATE_DIR}/{n}" for n in STATE_FILES))]

    def push_state(self) -> None:
        """This machine's state -> the storage (an object store replaces an object in one step)."""
        self.push([self.state_dir / n for n in STATE_FILES if (self.state_dir / n).is_file()])

    # --- files of a finished sweep ---------------------------------------------------------------
    def has_tune_snapshot(self) -> bool:
        """Whether the storage holds a Tune experiment snapshot (`experiment_state-*.json`, what
        `Tuner.restore` continues from). A driver killed before Tune's first has only its
        `tuner.pkl`, and Ray's restore then starts an experiment of one trial."""
        prefix, suffix = TUNE_SNAPSHOT.split("{}")
        return any(n.startswith(prefix) and n.endswith(suffix) for n in self._names("", folders=False))

    def checkpoints(self, trial_id: str) -> list[str]:
        """The trial's checkpoint folder names, newest first."""
        names = self._names(trial_dir(trial_id), folders=True)
        found = [(i, n) for n in names if (i := checkpoint_index(n)) is not None]
        return [n for _, n in sorted(found, reverse=True)]

    def _names(self, rel: str, *, folders: bool) -> list[str]:
        """The names of the folders (or files) in an experiment-relative folder; [] if it is missing."""
        if not self.remote:
            d = self.local_dir / rel
            return [p.name for p in d.iterdir() if p.is_dir() == folders] if d.is_dir() else []
        import pyarrow.fs as pafs

        from trainables.fileio import patiently

        fs, root = self._fs()
        sel = pafs.FileSelector(f"{root}/{rel}".rstrip("/"), allow_not_found=True)
        kind = pafs.FileType.Directory if folders else pafs.FileType.File
        return [i.base_name for i in patiently(lambda: fs.get_file_info(sel), f"list {rel or self.exp_dir}")
                if i.type == kind]

    def final_checkpoint(self, trial_id: str) -> Path | None:
        """The newest checkpoint of the trial that holds the deployed model, with the model and the
        training state on this machine; None if no checkpoint holds a model."""
        for ck in self.checkpoints(trial_id):
            got = self.fetch(*(f"{trial_dir(trial_id)}/{ck}/{f}" for f in (MODEL_FILE, CHECKPOINT_FILE)))
            if got and got[0].name == MODEL_FILE:
                return got[0].parent
        return None if self.remote else self.tune_checkpoint(trial_id)

    def tune_checkpoint(self, trial_id: str) -> Path | None:
        """Tune's own record of a local trial's latest checkpoint (whatever its directory is named)."""
        from ray.tune import ExperimentAnalysis

        try:
            trials = ExperimentAnalysis(self.exp_dir).trials
        except Exception:  # noqa: BLE001 - no readable Tune state: the caller reports "no checkpoint"
            return None
        for t in trials:
            if t.trial_id == trial_id and t.checkpoint is not None:
                return Path(t.checkpoint.path)
        return None

    # --- the one copy routine, both ways -------------------------------------------------------
    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(self.exp_dir)

    def fetch(self, *rel: str) -> list[Path]:
        """These experiment-relative files on this machine (copied down, replacing older copies, for
        s3://, gs://); returns the paths of those that exist. A file gone from the storage is gone
        from the copy too."""
        if not self.remote:
            return [self.local_dir / r for r in rel if (self.local_dir / r).is_file()]
        import pyarrow.fs as pafs

        from trainables.fileio import patiently

        fs, root = self._fs()

        def down(r: str, dst: Path) -> bool:
            if fs.get_file_info(f"{root}/{r}").type != pafs.FileType.File:
                return False
            tmp = dst.with_name(dst.name + ".part")
            with fs.open_input_stream(f"{root}/{r}") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, dst)
            return True

        got = []
        for r in rel:
            dst = self.local_dir / r
            dst.parent.mkdir(parents=True, exist_ok=True)
            if patiently(lambda: down(r, dst), f"download {r}"):  # noqa: B023 - called at once
                got.append(dst)
            else:
                dst.unlink(missing_ok=True)
        return got

    def push(self, paths: list[Path]) -> list[str]:
        """Files under `local_dir` -> the storage, at the same relative paths; returns where they
        are (locally: the paths themselves)."""
        if not self.remote:
            return [str(p) for p in paths]
        from trainables.fileio import patiently

        fs, root = self._fs()

        def up(p: Path, rel: str) -> None:
            with open(p, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
                shutil.copyfileobj(src, dst)

        out = []
        for p in paths:
            rel = p.resolve().relative_to(self.local_dir.resolve()).as_posix()
            patiently(lambda: up(p, rel), f"upload {rel}")  # noqa: B023 - called at once
            out.append(join_uri(self.exp_dir, rel))
        return out
