"""Keeping a trial's last checkpoints without Tune's forced experiment snapshots.

Tune deletes a trial's checkpoints past `CheckpointConfig(num_to_keep)`, and to keep its stored
experiment state from pointing at a deleted one it forces a snapshot (every changed trial
re-encoded, the searcher pickled, the state uploaded) each time a trial has saved `num_to_keep`
checkpoints since the last. With a checkpoint per result that is a snapshot every few results, each
costing more the more trials the sweep has (docs/benchmarks.md, "Driver scale").

The sweep therefore lets Tune keep every checkpoint (no forced snapshot: Tune snapshots on its own
period) and `CheckpointKeeper` deletes the old ones: a trial's newest `keep`, and every checkpoint
a recent snapshot names, stay. A snapshot names each trial's newest checkpoint at the moment Tune
asks the callbacks for their state (`get_state`, right after it wrote the trials' state), so the
stored experiment state, which is one of the last `snapshots` ones, never names a deleted
checkpoint; where it still does (an upload that lagged more snapshots than that), the trial goes
on from its newest readable checkpoint (trainables.tune).
"""
from __future__ import annotations

import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)


class CheckpointKeeper(Callback):
    """Deletes a trial's checkpoints but its newest `keep` and those the last `snapshots`
    experiment snapshots name, on a background thread (an object store's delete is a request).

    Args:
        keep: checkpoints kept per trial, newest first (the sweep keeps 2).
        snapshots: recent experiment snapshots whose checkpoints are kept.
    """

    def __init__(self, keep: int = 2, snapshots: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}; accepted: an integer >= 1")
        self.keep, self.snapshots = keep, snapshots
        self._init()

    def _init(self, saved: dict[str, list[str]] | None = None) -> None:
        # per trial, its checkpoints not deleted yet, oldest first, relative to the experiment
        self._kept: dict[str, list[str]] = collections.defaultdict(list, saved or {})
        self._named: collections.deque[set[str]] = collections.deque(maxlen=self.snapshots)
        self._named_any: set[str] = set()  # their union
        self._fs: Any = None
        self._root = ""
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
        return {"keep": self.keep, "snapshots": self.snapshots, "kept": dict(self._kept)}

    def __setstate__(self, state: dict) -> None:
        self.keep, self.snapshots = state["keep"], state["snapshots"]
        self._init(state["kept"])

    # --- Tune's hooks ------------------------------------------------------------------------
    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        path = PurePosixPath(checkpoint.path)
        self._fs, self._root = checkpoint.filesystem, str(path.parent.parent)
        kept = self._kept[trial.trial_id]
        kept.append(f"{path.parent.name}/{path.name}")
        old = [c for c in kept[:-self.keep] if c not in self._named_any]
        if old:
            self._kept[trial.trial_id] = [c for c in kept if c not in old]
            self._delete(old)

    def get_state(self) -> dict | None:
        """Called at each experiment snapshot, after the trials' state was written: what it names."""
        self._named.append({kept[-1] for kept in self._kept.values() if kept})
        self._named_any = set().union(*self._named)
        return {"kept": {t: list(k) for t, k in self._kept.items() if k}}

    def set_state(self, state: dict) -> None:
        """A restored sweep: the checkpoints the last snapshot knew, still to be pruned."""
        self._kept = collections.defaultdict(list, state.get("kept") or {})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for f in self._pending:
            f.result()
        self._pending.clear()

    # --- deletion ------------------------------------------------------------------------------
    def _delete(self, rel: list[str]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brsearch-keeper")
        again = [r for f in self._pending if f.done() for r in f.result()]  # failed while the storage was away
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._pool.submit(_delete_dirs, self._fs, self._root, again + rel))


def _delete_dirs(fs: Any, root: str, rel: list[str]) -> list[str]:
    """Deletes the checkpoint folders; returns those it could not (tried again with the next)."""
    failed = []
    for r in rel:
        try:
            fs.delete_dir(f"{root}/{r}")
        except FileNotFoundError:
            pass
        except OSError as e:  # the storage away: tried again at the trial's next prune
            log.warning("could not delete checkpoint %s/%s yet: %s", root, r, str(e).splitlines()[0][:200])
            failed.append(r)
    return failed
