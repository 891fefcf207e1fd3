"""A finished sweep's files, wherever its `--storage-path` put them.

The tools a user runs after a sweep (search.evaluate, search.export) read its tables, its record
and one checkpoint per trial, and write a few files back. On a cluster the sweep lives on
`s3://`/`gs://` (every node must reach it), so these tools cannot ask users to copy the whole
experiment down first: they work on a local copy holding just the files they read, fetched
through pyarrow's filesystem (the client Tune itself uses; `?endpoint_override=...` works), and
push back what they change. For a local directory every call is a no-op on the directory itself.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .state import is_remote, join_uri, mirror_dir

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


@dataclass
class SweepFiles:
    storage: str  # --storage-path as given (a directory, file://..., s3://..., gs://...)
    name: str

    @property
    def remote(self) -> bool:
        return is_remote(self.storage)

    @property
    def uri(self) -> str:
        """The experiment directory as the user would name it (local: a resolved path)."""
        if self.remote:
            return join_uri(self.storage, self.name)
        return str(Path(os.path.expanduser(self.storage.replace("file://", "", 1))).resolve() / self.name)

    @property
    def dir(self) -> Path:
        """Where the tools read and write: the experiment itself, or its local copy."""
        if self.remote:  # mirror_dir names the folder after the path's second-to-last part: the sweep
            return mirror_dir(join_uri(self.storage, self.name, "files"))
        return Path(self.uri)

    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(self.uri)

    def fetch(self, *rel: str) -> list[Path]:
        """Copy these experiment-relative files down (replacing older copies); returns the local
        paths of those that exist. A file gone from the storage is gone from the copy too."""
        if not self.remote:
            return [self.dir / r for r in rel if (self.dir / r).is_file()]
        import pyarrow.fs as pafs

        fs, root = self._fs()
        got = []
        for r in rel:
            dst = self.dir / r
            info = fs.get_file_info(f"{root}/{r}")
            if info.type != pafs.FileType.File:
                dst.unlink(missing_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".part")
            with fs.open_input_stream(f"{root}/{r}") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, dst)
            got.append(dst)
        return got

    def checkpoints(self, trial_id: str) -> list[str]:
        """The trial's checkpoint folder names, newest first."""
        if not self.remote:
            d = self.dir / f"trial_{trial_id}"
            names = [p.name for p in d.iterdir() if p.is_dir()] if d.is_dir() else []
        else:
            import pyarrow.fs as pafs

            fs, root = self._fs()
            sel = pafs.FileSelector(f"{root}/trial_{trial_id}", allow_not_found=True)
            names = [i.base_name for i in fs.get_file_info(sel) if i.type == pafs.FileType.Directory]
        found = [(int(m.group(1)), n) for n in names if (m := CHECKPOINT_RE.match(n))]
        return [n for _, n in sorted(found, reverse=True)]

    def final_checkpoint(self, trial_id: str, files: tuple[str, ...] = ("model.pt", "state.pt")) -> Path | None:
        """The newest checkpoint of the trial that holds `files[0]` (the deployed model), with
        `files` available locally; None if no checkpoint holds it."""
        for ck in self.checkpoints(trial_id):
            got = self.fetch(*(f"trial_{trial_id}/{ck}/{f}" for f in files))
            if got and got[0].name == files[0]:
                return got[0].parent
        return None

    def push(self, paths: list[Path]) -> list[str]:
        """Local copies -> the storage (an object store replaces an object in one step); returns
        where they went."""
        if not self.remote:
            return [str(p) for p in paths]
        fs, root = self._fs()
        out = []
        for p in paths:
            rel = p.resolve().relative_to(self.dir.resolve()).as_posix()
            with open(p, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
                shutil.copyfileobj(src, dst)
            out.append(join_uri(self.uri, rel))
        return out
