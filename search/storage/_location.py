"""Where a sweep keeps what `--resume` needs: the sweep record and the Optuna study.

Everything lives under the storage path, so a sweep resumes from any machine that reaches it
(after `ray down` / `ray up`, or from another working directory):

* a directory, local or shared (NFS, CIFS, Lustre, a FUSE mount...):
  `<storage>/<name>/brsearch/{sweep.json,optuna.journal}`; the study is an Optuna
  `JournalStorage` file with a symlink lock, which Optuna documents as safe on shared file
  systems (sqlite's file locking is not), and which keeps the study in memory, so the sampler
  does not re-read every trial from a database at each suggest (about 20 ms instead of 74 ms per
  trial at 1,000 trials, docs/benchmarks.md). A sweep started with an `optuna.db` (sqlite, before
  the journal became the default) keeps it;
* `s3://`, `gs://`: the driver keeps the state in a local mirror (`$BRSEARCH_STATE_CACHE`, default
  `~/.cache/brsearch`) and uploads it to `<storage>/<name>/brsearch/` at each Tune experiment
  checkpoint (`StateSync`), before Tune uploads its own; `--resume` downloads it first;
* `--study-storage URL`: an Optuna RDB URL the user names (postgresql://, mysql://, sqlite:///)
  or a journal file path; only the sweep record then goes to the storage path.

This module imports neither Optuna nor Ray (the CLI's input checks stay fast); the storage
objects and the sync callback are in `search.study_storage`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR = "brsearch"  # our own files inside the experiment directory
RECORD = "sweep.json"
STATE_FILES = ("sweep.json", "optuna.db", "optuna.journal")


def is_remote(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def join_uri(base: str, *parts: str) -> str:
    """base/part/... keeping a ?query (endpoint_override=... for S3-compatible servers) at the end."""
    root, q, query = base.partition("?")
    return "/".join([root.rstrip("/"), *parts]) + (q + query)


def mirror_dir(remote_state_dir: str) -> Path:
    """The driver-local copy of a remote sweep's state: one folder per storage URI, the same on
    every machine and from every working directory."""
    root = Path(os.path.expanduser(os.environ.get("BRSEARCH_STATE_CACHE", "~/.cache/brsearch")))
    key = hashlib.sha1(remote_state_dir.partition("?")[0].encode()).hexdigest()[:16]
    name = remote_state_dir.partition("?")[0].rstrip("/").rsplit("/", 2)[-2]
    return root / f"{name}-{key}"


def study_spec_from_flag(value: str) -> dict[str, str]:
    """--study-storage: an Optuna RDB URL, or a path to a journal file; ValueError otherwise."""
    if value.startswith(("sqlite:///", "postgresql", "mysql", "oracle", "mssql")):
        return {"url": value}
    if "://" in value:
        raise ValueError(f"--study-storage {value}: unsupported; accepted: an Optuna RDB URL "
                         f"(postgresql://..., mysql://..., sqlite:///PATH) or a journal file path")
    return {"journal": str(Path(os.path.expanduser(value)).resolve())}


def study_file_spec(state_dir: Path) -> dict[str, str]:
    """The study file in a state folder: the journal, or the sqlite file of a sweep started
    before the journal became the default (so its --resume finds its trials)."""
    if (state_dir / "optuna.db").is_file() and not (state_dir / "optuna.journal").exists():
        return {"sqlite": str(state_dir / "optuna.db")}
    return {"journal": str(state_dir / "optuna.journal")}


# --- the sweep's state ---------------------------------------------------------------------------

@dataclass
class SweepState:
    """The state of sweep `name` under `storage` (a resolved local path or a URI)."""

    storage: str
    name: str
    study_storage: str | None = None  # --study-storage, if any

    @property
    def remote(self) -> bool:
        return is_remote(self.storage)

    @property
    def exp_dir(self) -> str:
        return join_uri(self.storage, self.name) if self.remote else os.path.join(self.storage, self.name)

    @property
    def remote_dir(self) -> str:
        return join_uri(self.storage, self.name, STATE_DIR)

    @property
    def dir(self) -> Path:
        """Where the driver reads and writes the state files."""
        return mirror_dir(self.remote_dir) if self.remote else Path(self.exp_dir) / STATE_DIR

    def study_spec(self) -> dict[str, str]:
        if self.study_storage:
            return study_spec_from_flag(self.study_storage)
        if self.remote:
            return {"mirror": self.remote_dir}
        return study_file_spec(self.dir)

    # remote file access (pyarrow) --------------------------------------------------------------
    def _fs(self, uri: str) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(uri)

    def exists(self) -> bool:
        """Anything stored under the sweep's experiment directory (a sweep of that name)."""
        if not self.remote:
            d = Path(self.exp_dir)
            return d.exists() and any(d.iterdir())
        import pyarrow.fs as pafs

        fs, path = self._fs(self.exp_dir)
        return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))

    def read_record(self) -> dict[str, Any] | None:
        """sweep.json from the storage (the remote copy for s3://, gs://); None if there is none."""
        try:
            if not self.remote:
                return json.loads((self.dir / RECORD).read_text())
            fs, path = self._fs(join_uri(self.remote_dir, RECORD))
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None

    def write_record(self, record: dict[str, Any]) -> None:
        from trainables.fileio import atomic_write_text

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(record, indent=2, default=str), self.dir / RECORD)
        self.push()

    def pull(self) -> list[str]:
        """Remote -> the local mirror (replacing it): what `--resume` needs, from the storage."""
        if not self.remote:
            return []
        import pyarrow.fs as pafs

        fs, path = self._fs(self.remote_dir)
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                 if i.type == pafs.FileType.File and i.base_name in STATE_FILES]
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        for info in infos:
            with fs.open_input_stream(info.path) as src, open(self.dir / info.base_name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return [i.base_name for i in infos]

    def push(self) -> None:
        """The local mirror -> remote. An object store replaces an object in one step."""
        if not self.remote:
            return
        fs, path = self._fs(self.remote_dir)
        for name in STATE_FILES:
            f = self.dir / name
            if f.is_file():
                with open(f, "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
                    shutil.copyfileobj(src, dst)
