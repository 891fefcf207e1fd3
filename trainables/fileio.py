"""Crash-safe file writes (write beside the target, fsync, rename over it), a per-node file lock,
and patience with an object store that is away.

A crash mid-write leaves the previous good file (rename is atomic on POSIX file systems)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
# what pyarrow's S3 and GCS clients say when the store is unreachable or overloaded, as opposed to
# an answer (no such key, access denied) that waiting will not change
TRANSIENT = re.compile(r"NETWORK_CONNECTION|SERVICE_UNAVAILABLE|SLOW_DOWN|REQUEST_TIME|INTERNAL_FAILURE|THROTTLING"
                       r"|HTTP status 5\d\d|Could not connect|Couldn't connect|Connection refused|Connection reset"
                       r"|timed out|Broken pipe", re.I)
PATIENCE_ENV = "BRSEARCH_STORAGE_PATIENCE_S"  # how long to wait for the store (default 900 s)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale(path: Path) -> None:
    """Temporary files of `path` left by a writer that was killed mid-write (its process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def node_lock(root: str, name: str) -> Iterator[None]:
    """Holds `<root>/.<name>.lock` exclusively: the trials of one node that share a data root
    prepare (download, unpack) a data set one at a time, so it is fetched once; the others wait,
    then find it there. flock is per node (and works on NFSv4, where it is a POSIX lock)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def unwritable(path: str | os.PathLike) -> str | None:
    """None if the directory `path` (there or not yet) can be created and written, else why not.
    The nearest existing ancestor must be a directory (not a file), and a scratch directory is
    created in it and removed again: os.access says yes to root everywhere, /proc and read-only
    mounts included. Checked before anything is written, so bad input leaves nothing behind."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    while not os.path.lexists(p):
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".brsearch-probe-", dir=p))
    except OSError as e:
        return f"cannot create anything in {p} ({e.strerror or e})"
    return None


def is_transient(error: BaseException) -> bool:
    """An I/O error that a later try may not meet: the store unreachable, overloaded or failing."""
    return isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and bool(TRANSIENT.search(str(error)))


def patiently(op: Callable[[], T], what: str, patience_s: float | None = None) -> T:
    """`op()`, tried again with backoff (1 s doubling to 30 s) while it fails with a transient I/O
    error, for up to `patience_s` (default $BRSEARCH_STORAGE_PATIENCE_S, else 900 s): an object
    store restarting or away for minutes does not end the sweep. One line when the wait starts and
    one when the store is back; the last error is raised when the patience runs out.

    Args:
        op: the storage operation (idempotent: it may run more than once).
        what: what it does, for the two lines ("upload sweep.json").
        patience_s: seconds to keep trying.
    """
    patience = float(os.environ.get(PATIENCE_ENV, 900)) if patience_s is None else patience_s
    start, delay = time.monotonic(), 1.0
    while True:
        try:
            out = op()
        except OSError as e:
            waited = time.monotonic() - start
            if not is_transient(e) or waited >= patience:
                raise
            if delay == 1.0:
                print(f"brsearch: storage unreachable ({what}: {str(e).splitlines()[0][:160]}); "
                      f"trying again for up to {patience:.0f} s", file=sys.stderr, flush=True)
            time.sleep(min(delay, max(0.0, patience - waited)))
            delay = min(30.0, delay * 2)
            continue
        if delay > 1.0:
            print(f"brsearch: storage reachable again after {time.monotonic() - start:.0f} s ({what})",
                  file=sys.stderr, flush=True)
        return out
