"""What a sweep's data *is*, apart from where it sits on this machine.

A sweep is identified by its space and its data by identity (the dataset's name, its subsets,
epochs and every other pinned value), never by a path: `--data-root ./data` resolves against the
working directory, and after `ray down` / `ray up`, or on another machine, the same data sits
elsewhere. `sweep_fingerprint` is the space's fingerprint with the place left out; a folder
dataset is identified by the listing of its train/ and test/ trees (`data_identity`), so the same
images at another mount point are the same sweep and other images are not.

`place` is where this run reads the data from; the driver hands it to every trial
(`trainables.tune.trainable`'s `data_at`), restored ones included, whose stored configs still
name the old place.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.optimizer import Space
from search.redact import redact

FOLDER = "folder:"
PLACE_KEYS = ("data_root", "download")  # where the data sits and whether it may be fetched: not what it is


def is_folder(dataset: Any) -> bool:
    return isinstance(dataset, str) and dataset.startswith(FOLDER)


def sweep_fingerprint(space: dict[str, Any]) -> str:
    """The identity of a space (`Space.describe()`, or the one sweep.json stores) without the
    data's place: PLACE_KEYS dropped, a folder dataset's path replaced by `folder:` (its content
    is checked apart, by `data_identity`)."""
    fixed = {k: v for k, v in (space.get("fixed") or {}).items() if k not in PLACE_KEYS}
    if is_folder(fixed.get("dataset")):
        fixed["dataset"] = FOLDER
    body = {"params": space.get("params") or {}, "fixed": fixed, "func": space.get("define_by_run") or ""}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_identity(dataset: str) -> str | None:
    """A built-in dataset's name; for `folder:PATH` a digest of the file names under train/ and
    test/ (names, not bytes: reading 60,000 images would take minutes, listing them a second),
    or None where this machine cannot list the folder (a cluster's head without the data)."""
    if not is_folder(dataset):
        return dataset
    root = Path(os.path.expanduser(dataset[len(FOLDER):]))
    h = hashlib.sha256()
    try:
        for split in ("train", "test"):
            for dirpath, dirnames, filenames in os.walk(root / split, onerror=_raise):
                dirnames.sort()
                rel = Path(dirpath).relative_to(root).as_posix()
                for f in sorted(filenames):
                    h.update(f"{rel}/{f}\n".encode())
    except OSError:
        return None
    return FOLDER + h.hexdigest()[:16]


def _raise(e: OSError) -> None:
    raise e


def same_sweep(stored: Mapping[str, Any], space: Space) -> bool:
    """`space` (pinned values included) is the stored sweep's, wherever the data sits: compared on
    the stored space itself (sweep.json keeps it), else on the stored fingerprint (a space whose
    stored values were redacted, or a sweep recorded with the place in its fingerprint).

    Args:
        stored: the sweep's sweep.json.
        space: the space this run would train.
    """
    now = sweep_fingerprint(space.describe())
    desc = stored.get("space")
    if isinstance(desc, dict) and sweep_fingerprint(desc) == now:
        return True
    return stored.get("fingerprint") in (now, space.fingerprint())


def place(space: Space) -> dict[str, Any]:
    """Where trials read the data from: the dataset (a folder's path), the data root, the
    download switch."""
    return {k: space.fixed[k] for k in ("dataset", *PLACE_KEYS) if k in space.fixed}


def data_moved(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    """`data_root A -> B` where the place that matters differs (a folder's path, else the data
    root; digits reads no files), or None: what the one line of a resume from elsewhere says."""
    dataset = now.get("dataset")
    if not stored or dataset == "digits":
        return None
    key = "dataset" if is_folder(dataset) else "data_root"
    was, now_at = redact(stored.get(key)), redact(now.get(key))  # sweep.json keeps the place redacted
    return f"{key} {was} -> {now_at}" if was != now_at else None
